"""Train the demo CLAP's audio tower contrastively against the frozen all-MiniLM-L6-v2 sentence encoder.

    python -m trainers.train_demo_clap --corpus data/soundworld --out runs/demo_clap --epochs 12
    python -m trainers.train_demo_clap --corpus data/soundworld --out runs/demo_clap \\
        --extra-text assets/captions/audiocaps_train.txt --minutes 10

The text side is frozen: MiniLM sentence features (computed once per caption) through a linear projection that
is initialised with the principal components of the corpus' (and --extra-text) captions and by default stays fixed,
so wordings the corpus never used keep MiniLM's geometry. The audio tower learns to land each clip near its
captions (every paraphrase, both caption styles); other clips with the same sources are partial positives. The
epoch with the best validation zero-shot accuracy is kept. The output folder loads with
``--set clap.backend=demo --set clap.model=<out>``.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from engine.clap.base import l2_normalize
from engine.clap.demo import (
    DemoClapConfig,
    DemoClapModel,
    SentenceEncoder,
    load_sentence_cache,
    resolve_text_encoder,
    save_demo_clap,
    save_sentence_cache,
)
from engine.config import DemoClapTrainConfig
from engine.datastore import read_captions, unique_captions
from engine.errors import ConfigError
from trainers.cli import run_trainer

log = logging.getLogger("train_demo_clap")
ZERO_SHOT_TEMPLATE = "This is a sound of {}."


# --------------------------------------------------------------------------------------------------------------------
# data


def read_corpus(corpus: Path) -> tuple[list[dict], list[str]]:
    """Manifest rows and the class labels of a soundworld build."""
    manifest, classes = corpus / "manifest.jsonl", corpus / "classes.json"
    if not manifest.is_file() or not classes.is_file():
        raise ConfigError(f"{corpus} is not a soundworld build (manifest.jsonl / classes.json missing); "
                          "build one with python -m trainers.soundworld build --out " + str(corpus))
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    labels = [c["label"] for c in json.loads(classes.read_text())]
    return rows, labels


def clip_captions(row: dict) -> list[str]:
    return list(row["captions_a"]) + list(row["captions_b"])


def load_wave(corpus: Path, row: dict, sample_rate: int) -> np.ndarray:
    audio, sr = sf.read(corpus / row["path"], dtype="float32", always_2d=True)
    if sr != sample_rate:
        raise ConfigError(f"{row['path']} is at {sr} Hz; the demo CLAP is trained at {sample_rate} Hz")
    return audio.mean(axis=1)


@torch.no_grad()
def raw_log_mels(model: DemoClapModel, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Un-normalised log-mels [M, T] per clip (the mel transform is fixed, so this is done once)."""
    return [torch.log(model.audio.mel(torch.from_numpy(w)) + 1e-6) for w in waves]


def sentence_features(encoder: SentenceEncoder, texts: Sequence[str], cache_file: Path | None,
                      batch_size: int = 256) -> dict[str, np.ndarray]:
    """MiniLM features of each text, memoised in ``cache_file`` across runs."""
    cache = load_sentence_cache(cache_file) if cache_file is not None else {}
    todo = sorted({t for t in texts if t not in cache}, key=len)  # similar lengths batch with little padding
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for text, row in zip(chunk, encoder(chunk).numpy()):
            cache[text] = row.astype(np.float32)
        if start // batch_size % 20 == 0:
            log.info("sentence features: %d / %d new texts", start + len(chunk), len(todo))
    if cache_file is not None and todo:
        save_sentence_cache(cache_file, cache)
    return cache


def pca_projection(features: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [dim, H] and bias [dim] of x -> (x - mean) @ V[:, :dim] on unit-norm features (V: eigenvectors of
    the H x H covariance, largest first; H x H, so any number of texts fits in memory)."""
    x = torch.from_numpy(features).double()
    x = x / x.norm(dim=1, keepdim=True)
    mean = x.mean(0)
    centered = x - mean
    _, vectors = torch.linalg.eigh(centered.T @ centered)  # ascending eigenvalues, columns = components
    weight = vectors.flip(1)[:, :dim].T.float()  # [dim, H]
    return weight, -(weight @ mean.float())


# --------------------------------------------------------------------------------------------------------------------
# training


def pad_batch(mels: Sequence[torch.Tensor], pad_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised log-mels [M, T_i] -> [B, M, T_max] padded with the value of silence, and lengths [B]."""
    lengths = torch.tensor([m.shape[1] for m in mels])
    out = pad_value[None, :, None].expand(len(mels), -1, int(lengths.max())).clone()
    for i, m in enumerate(mels):
        out[i, :, :m.shape[1]] = m
    return out, lengths


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of clips of similar length (little padding), in random order; jitter varies them per epoch."""
    keys = np.asarray(lengths, dtype=np.float64) * rng.uniform(0.85, 1.15, len(lengths))
    order = np.argsort(keys)
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, label_keys: Sequence[str],
                     same_labels_weight: float) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: the clip's own caption 1, captions of same-label clips a weight."""
    logits = scale * audio @ text.T  # [B, B]
    keys = np.asarray(label_keys)
    same = torch.from_numpy(keys[:, None] == keys[None, :]).float()
    targets = torch.eye(len(keys)) + same_labels_weight * (same - torch.eye(len(keys)))
    targets = targets / targets.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@torch.no_grad()
def zero_shot_accuracy(model: DemoClapModel, mels: list[torch.Tensor], labels: list[str], classes: list[str],
                       class_features: torch.Tensor, pad_value: torch.Tensor, batch_size: int = 64) -> float:
    """Top-1 accuracy of single-source clips against "This is a sound of <class>." prompts."""
    if not mels:
        return float("nan")
    text = l2_normalize(model.project_text(class_features))  # [C, D]
    correct = 0
    for start in range(0, len(mels), batch_size):
        batch, lengths = pad_batch(mels[start:start + batch_size], pad_value)
        clip, _, _ = model.audio(batch, lengths)
        predicted = (l2_normalize(clip) @ text.T).argmax(1).tolist()
        correct += sum(classes[p] == y for p, y in zip(predicted, labels[start:start + batch_size]))
    return correct / len(mels)


def train(cfg: DemoClapTrainConfig, show_progress: bool = True) -> dict:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus, out = Path(cfg.corpus), Path(cfg.out)
    rows, classes = read_corpus(corpus)
    split = {name: [r for r in rows if r["split"] == name] for name in ("train", "val")}
    if len(split["train"]) < cfg.batch_size:
        raise ConfigError(f"{corpus} has {len(split['train'])} training clips, fewer than one batch of "
                          f"{cfg.batch_size}")
    arch = DemoClapConfig(embedding_dim=cfg.embedding_dim, channels=[int(c) for c in cfg.channels])
    model = DemoClapModel(arch)

    # Audio: log-mels once, normalised by the training set's per-band statistics.
    raw = {name: raw_log_mels(model, [load_wave(corpus, r, arch.sample_rate) for r in rs])
           for name, rs in split.items()}
    stacked = torch.cat(raw["train"], dim=1)
    model.audio.mel_mean.copy_(stacked.mean(1))
    model.audio.mel_std.copy_(stacked.std(1).clamp_min(1e-3))
    norm = {name: [((m - model.audio.mel_mean[:, None]) / model.audio.mel_std[:, None]).half() for m in ms]
            for name, ms in raw.items()}
    pad_value = (math.log(1e-6) - model.audio.mel_mean) / model.audio.mel_std
    log.info("log-mels of %d clips ready (%.0f s)", len(rows), time.perf_counter() - started)

    # Text: frozen sentence features of every caption, the class prompts and the extra text.
    encoder = SentenceEncoder(resolve_text_encoder(arch.text_encoder), torch.device("cpu"), arch.max_text_tokens)
    captions = {name: [clip_captions(r) for r in rs] for name, rs in split.items()}
    prompts = [ZERO_SHOT_TEMPLATE.format(c) for c in classes]
    extra = _extra_text(cfg)
    corpus_texts = unique_captions([c for caps in captions["train"] + captions["val"] for c in caps])
    features = sentence_features(encoder, corpus_texts + prompts + extra,
                                 Path(cfg.sentence_cache) if cfg.sentence_cache else None)
    weight, bias = pca_projection(np.stack([features[t] for t in corpus_texts + extra]), arch.embedding_dim)
    model.text_projection.weight.data.copy_(weight)
    model.text_projection.bias.data.copy_(bias)
    model.text_projection.requires_grad_(cfg.train_text_projection)
    class_features = torch.from_numpy(np.stack([features[p] for p in prompts]))
    log.info("sentence features of %d texts ready (%.0f s)", len(features), time.perf_counter() - started)

    val_single = [(m, r["labels"][0]) for m, r in zip(norm["val"], split["val"]) if len(r["labels"]) == 1]
    groups = [{"params": model.audio.parameters()}, {"params": [model.logit_scale]}]
    if cfg.train_text_projection:
        groups.append({"params": model.text_projection.parameters(), "lr": cfg.lr * cfg.text_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(split["train"]) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g.get("lr", cfg.lr) for g in groups],
                                                    total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    keys = ["|".join(sorted(r["labels"])) for r in split["train"]]
    lengths = [m.shape[1] for m in norm["train"]]
    best, history, train_started = None, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for batch_ids in length_batches(lengths, cfg.batch_size, rng):
            mels, mel_lengths = pad_batch([norm["train"][i].float() for i in batch_ids], pad_value)
            if cfg.freq_mask:
                mels = _freq_mask(mels, cfg.freq_mask, rng, pad_value)
            texts = [captions["train"][i][rng.integers(len(captions["train"][i]))] for i in batch_ids]
            text = l2_normalize(model.project_text(torch.from_numpy(np.stack([features[t] for t in texts]))))
            clip, _, _ = model.audio(mels, mel_lengths)
            scale = model.logit_scale.exp().clamp(max=100.0)
            loss = contrastive_loss(l2_normalize(clip), text, scale, [keys[i] for i in batch_ids],
                                    cfg.same_labels_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        model.eval()
        accuracy = zero_shot_accuracy(model, [m.float() for m, _ in val_single], [y for _, y in val_single],
                                      classes, class_features, pad_value)
        record = {"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 4),
                  "val_zero_shot_top1": round(accuracy, 4), "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
                  "seconds": round(time.perf_counter() - train_started, 1)}
        history.append(record)
        log.info("epoch %s", record)
        if best is None or accuracy >= best[0]:
            best = (accuracy, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if cfg.minutes and time.perf_counter() - train_started > 60 * cfg.minutes:
            log.info("time budget of %.1f min reached after epoch %d", cfg.minutes, epoch + 1)
            break
    model.load_state_dict(best[2])
    arch = replace(arch, trained=True, classes=classes, about=_about(classes, corpus),
                   training={"corpus": str(corpus), "train_clips": len(split["train"]),
                             "val_clips": len(split["val"]), "best_epoch": best[1], "history": history,
                             "config": asdict(cfg)})
    save_demo_clap(out, model.eval(), arch)
    summary = {"out": str(out), "best_epoch": best[1], "val_zero_shot_top1": best[0],
               "epochs_run": len(history), "seconds": round(time.perf_counter() - started, 1)}
    (out / "training_summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    return summary


def _extra_text(cfg: DemoClapTrainConfig) -> list[str]:
    texts = unique_captions(t for path in cfg.extra_text for t in read_captions(path))
    if len(texts) > cfg.extra_text_max:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, cfg.extra_text_max).astype(int)]
    return texts


def _freq_mask(mels: torch.Tensor, width: int, rng: np.random.Generator, pad_value: torch.Tensor) -> torch.Tensor:
    """One band of up to ``width`` mel bins per clip set to silence (SpecAugment's frequency masking)."""
    for i in range(mels.shape[0]):
        w = int(rng.integers(0, width + 1))
        if w:
            lo = int(rng.integers(0, mels.shape[1] - w))
            mels[i, lo:lo + w] = pad_value[lo:lo + w, None]
    return mels


def _about(classes: list[str], corpus: Path) -> str:
    return (f"a small CLAP trained on AudioScribe's own synthetic/recorded sound corpus ({corpus.name}): "
            f"{len(classes)} sound classes ({', '.join(classes)}); it knows nothing else")


def main(argv: Sequence[str] | None = None) -> int:
    return run_trainer(__doc__, "python -m trainers.train_demo_clap", DemoClapTrainConfig,
                       lambda cfg, args: train(cfg, show_progress=not args.quiet), argv, uses_profile=False)


if __name__ == "__main__":
    sys.exit(main())
