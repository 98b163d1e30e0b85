"""Text-only DRCap training: the mapping network (+ LoRA, or the whole LLM) learns to write a caption from its
CLAP text embedding, with similar captions in the prompt.

    python -m trainers.train_drcap --train data/drcap/train_rag.jsonl --val data/drcap/val_rag.jsonl --out runs/x
    python -m trainers.train_drcap --train ../shared/data/audiocaps/train.csv --out runs/tiny \\
        --set llm.model=builtin:tiny-llama --use-peft false --freeze-llm false --lr 1e-3 --total-steps 2000

Models come from the profile (--profile, --set clap.* / llm.*); training settings are the flags below (DRCap's
defaults). Several GPUs: the same command under `accelerate launch` or `torchrun --nproc_per_node N` (DDP).
Checkpoints (out/best, out/last) are model.safetensors + drcap_config.json, loaded by the captioner with
`--set caption.checkpoint=out/best`. Each is replaced as a whole (a symlink to a hidden, complete version folder), so
a run killed while saving keeps its previous checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from engine.atomic import commit_directory, recover_directory
from engine.captioner import build_model
from engine.clap import ClapBackend, create_clap
from engine.config import AppConfig, DrcapTrainConfig, load_config
from engine.datastore import CaptionDatastore, add_band_retrieval, embed_captions, read_caption_records
from engine.drcap import DrcapModel, write_checkpoint
from engine.errors import ConfigError
from engine.llm import load_llm
from trainers.cli import run_trainer

log = logging.getLogger("train_drcap")
STATE_FILE = "training_state.pt"


class CaptionSet(Dataset):
    """Records with precomputed CLAP text embeddings (the CLAP is frozen, so each text is embedded once)."""

    def __init__(self, records: list[dict], embeddings: np.ndarray) -> None:
        self.records, self.embeddings = records, torch.from_numpy(embeddings)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str], str]:
        r = self.records[i]
        return self.embeddings[i], list(r.get("similar_captions", [])), r["target"]


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (seed + epoch), so a resumed run replays exactly the same order."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        return iter(np.random.default_rng(self.seed + self.epoch).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


def collate(items: list) -> tuple[torch.Tensor, list[list[str]], list[str]]:
    embeddings, similar, answers = zip(*items)
    return torch.stack(embeddings), list(similar), list(answers)


def load_records(path: str, clap: ClapBackend, app: AppConfig, cfg: DrcapTrainConfig, needs_rag: bool,
                 store: CaptionDatastore | None) -> tuple[list[dict], CaptionDatastore | None]:
    """Caption records; training retrieval is computed when the file has no ``similar_captions``."""
    records = read_caption_records(path, app.datastore.csv_column, app.datastore.jsonl_field)
    if not records:
        raise ConfigError(f"{path} holds no captions")
    if needs_rag and not all("similar_captions" in r for r in records):
        if store is None:
            log.info("No similar_captions in %s: building the retrieval datastore from its captions", path)
            store = CaptionDatastore.build([r["target"] for r in records], clap, app.datastore, show_progress=False)
        records = add_band_retrieval(records, clap, store, cfg.band_low, cfg.band_high, cfg.rag_k, cfg.seed)
    return records, store


@dataclass
class TrainResult:
    summary: dict
    model: DrcapModel  # the model as it is after the last step (out/last), in training mode
    train_records: list[dict]  # the records trained on (with similar_captions)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to 0 at ``total`` (DRCap's LambdaLR)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


def mixed_precision_for(setting: str, llm_dtype: torch.dtype, device_type: str, trains_llm_weights: bool) -> str:
    """accelerate's ``mixed_precision`` for an LLM computing in ``llm_dtype``: "fp16" (autocast + GradScaler),
    "bf16" (autocast, no scaler: bf16 has fp32's range) or "no".

    "auto" autocasts to the LLM's own compute dtype (a bf16 LLM under fp16 autocast would squeeze its activations
    into fp16's range). An explicit choice may differ only over an fp32 LLM (classic mixed precision) or be "no".
    """
    if setting not in ("auto", "no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be auto, fp16, bf16 or no, not {setting!r}")
    native = _AUTOCAST.get(llm_dtype)
    if native is None:
        raise ConfigError(f"The LLM computes in {llm_dtype}, which training has no mixed precision for")
    chosen = native if setting == "auto" else setting
    if chosen not in ("no", native) and native != "no":
        raise ConfigError(f"mixed_precision = {setting} does not match the LLM's {native} weights; use auto (= "
                          f"{native}) or set llm.dtype")
    if chosen == "fp16" and device_type != "cuda":
        raise ConfigError("fp16 mixed precision needs a CUDA device (loss scaling); on the CPU use llm.dtype = bf16 "
                          "or fp32")
    if chosen == "fp16" and native == "fp16" and trains_llm_weights:
        raise ConfigError("Training an fp16 LLM's own weights: loss scaling cannot unscale fp16 gradients; use "
                          "llm.dtype = bf16 or fp32, or LoRA (--use-peft true)")
    return chosen


def set_trainable(model: DrcapModel, cfg: DrcapTrainConfig) -> None:
    """Mapping network always; LoRA when use_peft (peft already froze the base); the whole LLM when not frozen."""
    for name, p in model.named_parameters():
        if name.startswith("encoder_projector."):
            p.requires_grad_(True)
        elif cfg.use_peft:
            p.requires_grad_(".lora_" in name)
        else:
            p.requires_grad_(not cfg.freeze_llm)


def checkpoint_meta(clap: ClapBackend, app: AppConfig, cfg: DrcapTrainConfig, model: DrcapModel, **training) -> dict:
    meta = {"clap": {"name": clap.name, "backend": app.clap.backend, "fingerprint": clap.fingerprint,
                     "embedding_dim": clap.embedding_dim},
            "llm": {"model": app.llm.model, "hidden_size": int(model.llm.config.hidden_size)},
            "layout": asdict(model.layout), "mapping_hidden": cfg.mapping_hidden,
            "training": {**training, "config": asdict(cfg)}}
    if cfg.use_peft:
        meta["lora"] = {"lora_r": app.llm.lora_r, "lora_alpha": app.llm.lora_alpha,
                        "lora_dropout": app.llm.lora_dropout, "lora_targets": list(app.llm.lora_targets)}
    return meta


def save_full_model(directory: Path, model: DrcapModel) -> None:
    """With freeze_llm=false the LLM's weights changed too: save it beside the adapters (save_pretrained)."""
    model.llm.save_pretrained(directory / "llm")
    model.tokenizer.save_pretrained(directory / "llm")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator) -> float:
    model.eval()
    losses = []
    for embeddings, similar, answers in loader:
        losses.append(accelerator.gather(model(embeddings, similar, answers).detach().reshape(1)).mean().item())
    model.train()
    return float(np.mean(losses)) if losses else float("nan")


def train(app: AppConfig, cfg: DrcapTrainConfig, show_progress: bool = True, clap: ClapBackend | None = None
          ) -> TrainResult:
    """Train as ``cfg`` says; ``clap`` (default: the one ``app`` names) embeds the captions."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not cfg.train:
        raise ConfigError("--train is required: a DRCap jsonl or a caption file")
    set_seed(cfg.seed)
    out = Path(cfg.out)
    clap = clap or create_clap(app)
    needs_rag = cfg.rag_first or cfg.use_rag
    train_records, store = load_records(cfg.train, clap, app, cfg, needs_rag, None)
    if cfg.val:
        val_records, _ = load_records(cfg.val, clap, app, cfg, needs_rag, store)
    else:  # hold out a seeded slice of the training captions
        order = np.random.default_rng(cfg.seed).permutation(len(train_records))
        cut = max(1, int(round(cfg.val_fraction * len(train_records))))
        val_records = [train_records[i] for i in order[:cut]]
        train_records = [train_records[i] for i in order[cut:]]
    if cfg.max_val_samples:
        val_records = val_records[:cfg.max_val_samples]
    train_set = CaptionSet(train_records, embed_captions(clap, [r["text"] for r in train_records]))
    val_set = CaptionSet(val_records, embed_captions(clap, [r["text"] for r in val_records]))

    app.caption.use_rag, app.caption.rag_first = cfg.use_rag, cfg.rag_first
    app.caption.instruction, app.caption.mapping_hidden = cfg.instruction, cfg.mapping_hidden
    llm = load_llm(app.llm, app.resolved_cache_dir())  # on this rank's device (cuda:LOCAL_RANK under a launcher)
    model = build_model(llm, clap, app, checkpoint=None, trainable=True, use_peft=cfg.use_peft)
    set_trainable(model, cfg)
    mixed = mixed_precision_for(cfg.mixed_precision, llm.dtype, llm.device.type,
                                trains_llm_weights=not cfg.use_peft and not cfg.freeze_llm)
    # cpu=True on a CPU: without it accelerate ignores a launcher's ranks on a machine without GPUs (no DDP over gloo).
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=llm.device.type == "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("Trainable parameters: %s", f"{sum(p.numel() for p in params):,}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.total_steps))
    sampler = EpochSampler(len(train_set), cfg.seed, cfg.shuffle)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    if len(train_loader) == 0:
        raise ConfigError(f"{len(train_set)} training captions are fewer than one batch of {cfg.batch_size}")
    # The scheduler is not prepared: accelerate would step it once per rank at every optimizer step (it assumes a
    # schedule counted in single-process batches), so with N ranks the LR would reach 0 after total_steps / N.
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    step, epoch, best_val, skip_batches = 0, 0, math.inf, 0
    recover_directory(out / "last")  # a run killed while replacing an older real-folder checkpoint
    if cfg.resume and (out / "last" / STATE_FILE).is_file():
        step, epoch, best_val, skip_batches = _resume(out / "last", accelerator, model, optimizer, scheduler)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    last_step = min(cfg.total_steps, cfg.epochs * steps_per_epoch)
    history: list[dict] = []
    first_step, stopping = step, False
    bar = tqdm(total=last_step, initial=step, desc="Training", disable=not (show_progress and
                                                                             accelerator.is_main_process))
    model.train()
    started = time.perf_counter()
    running = []
    while step < last_step and epoch < cfg.epochs:
        # Through the prepared loader: accelerate re-sets the sampler's epoch from its own iteration counter, which
        # starts at 0 in a resumed run.
        (train_loader if hasattr(train_loader, "set_epoch") else sampler).set_epoch(epoch)
        for batch_index, (embeddings, similar, answers) in enumerate(train_loader):
            if skip_batches:  # resuming mid-epoch: the seeded order is replayed, the first batches skipped
                skip_batches -= 1
                continue
            with accelerator.accumulate(model):
                if cfg.noise_std > 0:
                    embeddings = embeddings + cfg.noise_std * torch.randn_like(embeddings)
                loss = model(embeddings, similar, answers)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf/nan gradients
                scheduler.step()
            step += 1
            running.append(accelerator.reduce(loss.detach(), reduction="mean").item())  # the mean over ranks
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{np.mean(running[-cfg.log_every:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            stopping = bool(cfg.stop_after) and step - first_step >= cfg.stop_after
            if step % cfg.val_every == 0 or step == last_step or stopping:
                val_loss = evaluate(model, val_loader, accelerator)
                record = {"step": step, "epoch": epoch, "train_loss": float(np.mean(running[-cfg.val_every:])),
                          "val_loss": val_loss, "lr": scheduler.get_last_lr()[0],
                          "seconds": round(time.perf_counter() - started, 1)}
                history.append(record)
                log.info("step %d: %s", step, record)
                improved = val_loss < best_val
                best_val = min(best_val, val_loss)
                _save(out, accelerator, model, optimizer, scheduler, clap, app, cfg, record, improved, best_val,
                      epoch, batch_index + 1, len(train_loader))
            if step >= last_step or stopping:
                break
        if stopping:
            break
        epoch += 1
    bar.close()
    summary = {"steps": step, "epochs": epoch, "best_val_loss": best_val, "history": history,
               "best": str(out / "best"), "last": str(out / "last"), "stopped_early": stopping}
    if accelerator.is_main_process:
        (out / "history.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(summary, accelerator.unwrap_model(model), train_records)


def _save(out: Path, accelerator, model, optimizer, scheduler, clap, app, cfg, record, improved: bool,
          best_val: float, epoch: int, batches_done: int, batches_per_epoch: int) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    inner: DrcapModel = accelerator.unwrap_model(model)
    meta = checkpoint_meta(clap, app, cfg, inner, **record)
    # Position for resume: the next batch of this epoch (or the start of the next one).
    next_epoch, skip = (epoch + 1, 0) if batches_done >= batches_per_epoch else (epoch, batches_done)
    state = {"step": record["step"], "epoch": next_epoch, "skip_batches": skip, "best_val": best_val,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}
    full_model = not cfg.use_peft and not cfg.freeze_llm
    save_training_checkpoint(out / "last", inner, meta, state, full_model)
    if improved:
        save_training_checkpoint(out / "best", inner, meta, None, full_model)


def save_training_checkpoint(directory: Path, model: DrcapModel, meta: dict, state: dict | None,
                             full_model: bool) -> Path:
    """One checkpoint folder (adapters + settings, the LLM when fully fine-tuned, the resume state), replaced as a
    whole (engine.atomic.commit_directory): killed at any moment, ``directory`` holds the previous checkpoint or
    this one, never the weights of one step beside the optimizer state of another."""
    def write(folder: Path) -> None:
        write_checkpoint(folder, model, meta)
        if full_model:
            save_full_model(folder, model)
        if state is not None:
            torch.save(state, folder / STATE_FILE)

    return commit_directory(directory, write)


def _resume(directory: Path, accelerator, model, optimizer, scheduler) -> tuple[int, int, float, int]:
    from engine.drcap import read_checkpoint

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    inner: DrcapModel = accelerator.unwrap_model(model)
    inner.load_adapters(read_checkpoint(directory).weights, str(directory))
    if (directory / "llm").is_dir():  # full fine-tuning: the LLM weights too
        from transformers import AutoModelForCausalLM
        trained = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=inner.llm.dtype)
        inner.llm.load_state_dict(trained.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    log.info("Resumed from %s at step %d", directory, state["step"])
    return int(state["step"]), int(state["epoch"]), float(state["best_val"]), int(state["skip_batches"])


def main(argv: Sequence[str] | None = None) -> int:
    return run_trainer(__doc__, "python -m trainers.train_drcap", DrcapTrainConfig,
                       lambda cfg, args: train(load_config(args.profile, args.overrides), cfg,
                                               show_progress=not args.quiet).summary, argv)


if __name__ == "__main__":
    sys.exit(main())
