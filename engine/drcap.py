"""DRCap's trainable part and its prompt: the mapping network, projection decoding and the LLM input layouts.

Reference: drcap.md (§1.3 mapping network, §1.5 input layout, §3.2 projection decoding). Token sequences, with
P = "USER: <instruction> \\n ASSISTANT:", R = "cap1. cap2. cap3. " and A = the caption:

    rag_first            [BOS] R [EOS] <soft> [BOS] P A [EOS]            (DRCap's default)
    use_rag, !rag_first  <soft> [BOS] "USER: Similar audios sound like: " R "This audio sounds like \\n ASSISTANT:" A [EOS]
    neither              <soft> [BOS] P A [EOS]

At inference A and the final EOS are left out and the LLM continues. The loss covers A and the final EOS only.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from engine.clap.checkpoints import failure_reason, read_json_object, read_safetensors, torch_load_tensors
from engine.errors import ModelLoadError
from engine.fast_decode import FastPlan, default_plan, fast_generate

IGNORE_INDEX = -100
CHECKPOINT_FORMAT = "audioscribe-drcap"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "drcap_config.json"
# Weight files of a release folder (beside an optional peft adapter), highest priority first.
_RELEASE_FILES = ("model.pt", "model.safetensors", "encoder_projector.pt")


class MappingNetwork(nn.Module):
    """CLAP embedding [B, D] -> one soft token [B, 1, H]: Linear(D, hidden) -> ReLU -> Linear(hidden, H).

    Parameter names (linear1, linear2) match DRCap's ``encoder_projector`` so its model.pt loads as is.
    """

    def __init__(self, clap_dim: int, llm_dim: int, hidden: int = 2048) -> None:
        super().__init__()
        self.linear1 = nn.Linear(clap_dim, hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden, llm_dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(embeddings))).unsqueeze(1)  # [B, 1, H]


def project_onto_support(audio: torch.Tensor, support: torch.Tensor, temperature: float,
                         renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DRCap's projection decoding: ``softmax(a·Sᵀ/τ)·S`` over the whole support.

    audio [B, D] unit-norm, support [N, D] unit-norm -> (projected [B, D], weights [B, N]). The result is not
    renormalised (‖ê‖ ≤ 1) unless asked, as in DRCap.
    """
    weights = torch.softmax(audio.float() @ support.float().T / temperature, dim=-1)  # [B, N]
    projected = weights @ support.float()  # [B, D]
    if renormalize:
        projected = projected / projected.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return projected, weights


# --------------------------------------------------------------------------------------------------------------------
# prompt layout


@dataclass(frozen=True)
class PromptLayout:
    use_rag: bool = True
    rag_first: bool = True
    instruction: str = "Describe the audio you hear."

    @property
    def name(self) -> str:
        return "rag_first" if self.rag_first else ("rag_sentence" if self.use_rag else "no_rag")


@dataclass
class EncodedPrompt:
    """One sample's token ids around the soft token, and how many ids after it are prompt (not answer)."""

    before: list[int]  # ids before the soft token
    after: list[int]  # ids after it: prompt (+ answer + EOS when training)
    prompt_after: int  # the first `prompt_after` ids of `after` are prompt; the rest is the answer to learn

    @property
    def length(self) -> int:
        return len(self.before) + 1 + len(self.after)


def joined_captions(captions: Sequence[str]) -> str:
    """DRCap's R: each caption followed by '. ' (a caption ending in '.' becomes '..', as in DRCap)."""
    return "".join(f"{c}. " for c in captions)


def encode_prompt(tokenizer, layout: PromptLayout, similar: Sequence[str], answer: str | None = None
                  ) -> EncodedPrompt:
    """Token ids of one sample in the layout's order (see the module docstring)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def segment(text: str) -> list[int]:  # Llama's encode(): BOS + tokens
        return [bos] + tokenizer(text, add_special_tokens=False)["input_ids"]

    if layout.rag_first:
        before = segment(joined_captions(similar)) + [eos]
        prompt = f"USER: {layout.instruction} \n ASSISTANT:"
    else:
        before = []
        if layout.use_rag:
            prompt = f"USER: Similar audios sound like: {joined_captions(similar)}This audio sounds like \n ASSISTANT:"
        else:
            prompt = f"USER: {layout.instruction} \n ASSISTANT:"
    prompt_ids = segment(prompt)
    if answer is None:
        return EncodedPrompt(before=before, after=prompt_ids, prompt_after=len(prompt_ids))
    # Prompt and answer are tokenised together (the answer follows "ASSISTANT:" with no space), as DRCap does;
    # the label mask still uses the prompt's own length.
    return EncodedPrompt(before=before, after=segment(prompt + answer) + [eos], prompt_after=len(prompt_ids))


@dataclass
class Batch:
    """Padded LLM inputs; ``soft_position`` marks where each row's soft token goes."""

    input_ids: torch.Tensor  # [B, L] (the soft-token slot holds the pad id)
    attention_mask: torch.Tensor  # [B, L]
    soft_position: torch.Tensor  # [B] index of the soft token in each row
    labels: torch.Tensor | None  # [B, L] with IGNORE_INDEX outside the answer


def collate(prompts: Sequence[EncodedPrompt], pad_id: int, left_pad: bool, with_labels: bool) -> Batch:
    """Pad to the longest row: right padding for training, left padding for generation."""
    width = max(p.length for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    soft = torch.zeros(len(prompts), dtype=torch.long)
    for row, p in enumerate(prompts):
        sequence = p.before + [pad_id] + p.after
        start = width - len(sequence) if left_pad else 0
        ids[row, start:start + len(sequence)] = torch.tensor(sequence)
        mask[row, start:start + len(sequence)] = 1
        soft[row] = start + len(p.before)
        answer_start = start + len(p.before) + 1 + p.prompt_after
        labels[row, answer_start:start + len(sequence)] = torch.tensor(p.after[p.prompt_after:], dtype=torch.long)
    return Batch(ids, mask, soft, labels if with_labels else None)


# --------------------------------------------------------------------------------------------------------------------
# the model: mapping network + LLM (with LoRA)


class DrcapModel(nn.Module):
    """``encoder_projector`` (the mapping network) + ``llm`` (a causal LM, peft-wrapped when LoRA is used).

    The names of trainable parameters equal those in DRCap's released model.pt, so both checkpoint formats load.
    """

    def __init__(self, llm: nn.Module, tokenizer, clap_dim: int, mapping_hidden: int, layout: PromptLayout) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.layout = layout
        self.encoder_projector = MappingNetwork(clap_dim, int(llm.config.hidden_size), mapping_hidden)

    @property
    def clap_dim(self) -> int:
        return self.encoder_projector.linear1.in_features

    def embed(self, batch: Batch, clap_embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's soft-token slot replaced by the mapped CLAP embedding: [B, L, H]."""
        token_embeddings = self.llm.get_input_embeddings()(batch.input_ids)  # [B, L, H]
        soft = self.encoder_projector(clap_embeddings.to(self.encoder_projector.linear1.weight.dtype))  # [B, 1, H]
        rows = torch.arange(len(batch.soft_position), device=token_embeddings.device)
        token_embeddings = token_embeddings.clone()
        token_embeddings[rows, batch.soft_position] = soft[:, 0].to(token_embeddings.dtype)
        return token_embeddings

    def prepare(self, similar: Sequence[Sequence[str]], answers: Sequence[str] | None, left_pad: bool) -> Batch:
        prompts = [encode_prompt(self.tokenizer, self.layout, s, None if answers is None else answers[i])
                   for i, s in enumerate(similar)]
        return collate(prompts, self.tokenizer.pad_token_id, left_pad=left_pad, with_labels=answers is not None)

    def forward(self, clap_embeddings: torch.Tensor, similar: Sequence[Sequence[str]], answers: Sequence[str]
                ) -> torch.Tensor:
        """Next-token cross-entropy on the answers (+ EOS), given [B, D] CLAP text embeddings (DDP calls this)."""
        return self.loss(clap_embeddings, similar, answers)

    def loss(self, clap_embeddings: torch.Tensor, similar: Sequence[Sequence[str]], answers: Sequence[str]
             ) -> torch.Tensor:
        """Next-token cross-entropy on the answers (+ EOS), given [B, D] CLAP text embeddings."""
        device = self.encoder_projector.linear1.weight.device
        batch = _to(self.prepare(similar, answers, left_pad=False), device)
        out = self.llm(inputs_embeds=self.embed(batch, clap_embeddings.to(device)),
                       attention_mask=batch.attention_mask, labels=batch.labels)
        return out.loss

    @torch.inference_mode()
    def generate(self, clap_embeddings: torch.Tensor, similar: Sequence[Sequence[str]], num_beams: int = 4,
                 max_new_tokens: int = 200, repetition_penalty: float = 1.0, fast: bool | FastPlan = True
                 ) -> list[str]:
        """Captions for [B, D] (projected) CLAP embeddings; greedy when num_beams is 1.

        ``fast``: True = the device's fast path (static KV cache + compiled decode step on CUDA; plain generate on
        the CPU, where it does not pay: engine.fast_decode), False = plain ``generate``, a FastPlan = that plan.
        Both give the same tokens."""
        return self.decode_texts(self.generate_ids(clap_embeddings, similar, num_beams, max_new_tokens,
                                                   repetition_penalty, fast))

    @torch.inference_mode()
    def generate_ids(self, clap_embeddings: torch.Tensor, similar: Sequence[Sequence[str]], num_beams: int = 4,
                     max_new_tokens: int = 200, repetition_penalty: float = 1.0, fast: bool | FastPlan = True
                     ) -> torch.Tensor:
        """The new token ids [B, T] behind :meth:`generate` (rows padded with EOS after their end)."""
        device = self.encoder_projector.linear1.weight.device
        batch = _to(self.prepare(similar, None, left_pad=True), device)
        tok = self.tokenizer
        arguments = dict(inputs_embeds=self.embed(batch, clap_embeddings.to(device)),
                         attention_mask=batch.attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        plan = default_plan(device) if fast is True else (fast or None)
        if plan is None:
            return self.llm.generate(do_sample=False, **arguments)
        return fast_generate(self.llm, plan=plan, **arguments)

    def decode_texts(self, ids: torch.Tensor) -> list[str]:
        """Token ids [B, T] -> captions with whitespace and newlines collapsed."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)  # only new tokens: the input was embeddings
        return [" ".join(t.replace("\n", " ").split()) for t in texts]

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters DRCap trains (mapping network + LoRA), under DRCap's names."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def adapter_names(self) -> list[str]:
        """Names of the mapping-network and LoRA parameters, whether or not they are being trained now."""
        return [n for n, _ in self.named_parameters() if n.startswith("encoder_projector.") or ".lora_" in n]

    def load_adapters(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load mapping network + LoRA weights; anything missing, unexpected or mis-shaped is a ModelLoadError."""
        own = dict(self.named_parameters())
        expected = set(self.adapter_names())
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected)
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ModelLoadError(_key_report(source, missing, unexpected, wrong))
        with torch.no_grad():
            for name, value in state_dict.items():
                own[name].copy_(value.to(own[name].dtype))


def _to(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.soft_position.to(device),
                 None if batch.labels is None else batch.labels.to(device))


def _key_report(source: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    def first(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    parts = [f"The DRCap checkpoint {source} does not fit this model"]
    if missing:
        parts.append(f"{len(missing)} missing: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {first(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with other shapes: {first(wrong)}")
    parts.append("Check that llm.model, the LoRA settings (llm.lora_r, llm.lora_targets) and the CLAP's embedding "
                 "size are the ones the checkpoint was trained with.")
    return ". ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# checkpoint files


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself (our JSON; for DRCap's model.pt, what its tensors imply)."""

    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict  # the JSON config (empty for a DRCap model.pt)

    @property
    def uses_lora(self) -> bool:
        return any(".lora_" in k for k in self.weights)

    @property
    def mapping_shape(self) -> tuple[int, int, int]:
        """(CLAP dim, hidden, LLM dim) of the mapping network."""
        first = self.weights["encoder_projector.linear1.weight"]
        second = self.weights["encoder_projector.linear2.weight"]
        return first.shape[1], first.shape[0], second.shape[0]

    @property
    def lora_rank(self) -> int | None:
        ranks = {v.shape[0] for k, v in self.weights.items() if ".lora_A." in k}
        return ranks.pop() if len(ranks) == 1 else None


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read mapping network + LoRA weights from any of the layouts a user may have:

    - our folder: model.safetensors + drcap_config.json (written by trainers.train_drcap);
    - DRCap's released model.pt (a flat state dict), or a folder holding it;
    - a peft adapter folder (adapter_config.json + adapter_model.safetensors/.bin) for the LoRA part, next to a
      model.pt or encoder_projector weights for the mapping network. Where model.pt and the adapter both hold a
      LoRA tensor, model.pt's wins, as in DRCap's loader (adapter first, model.pt on top).

    .pt/.bin files are read with ``weights_only=True``: only tensors and plain containers, never arbitrary objects.
    LoRA settings (r, alpha, dropout, target modules) come from adapter_config.json when there is one.
    """
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        meta = read_json_object(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
        return CheckpointInfo(path, _load_tensors(path / WEIGHTS_FILE), meta)
    if path.is_dir():
        # DRCap's loader applies the peft adapter first and then model.pt (strict=False) on top, so where both hold
        # a LoRA tensor model.pt's value is the one the model runs with; keys only in the adapter stay.
        weights = _peft_adapter_weights(path)
        for name in reversed(_RELEASE_FILES):  # reversed: the first file in the list wins among the files
            if (path / name).is_file():
                weights.update(_load_tensors(path / name))
        if "encoder_projector.linear1.weight" not in weights:
            raise ModelLoadError(f"{path} holds no DRCap mapping network: expected {WEIGHTS_FILE} (ours), DRCap's "
                                 "model.pt, or a peft adapter folder next to a model.pt")
        return CheckpointInfo(path, weights, _lora_meta(path))
    if not path.is_file():
        raise ModelLoadError(f"DRCap checkpoint {path} does not exist")
    weights = _load_tensors(path)
    if "encoder_projector.linear1.weight" not in weights:
        raise ModelLoadError(f"{path} holds no DRCap mapping network (encoder_projector.linear1.weight)")
    return CheckpointInfo(path, weights, _lora_meta(path.parent))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or, without unpickling any object, a ``.pt``/``.bin`` file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    weights = torch_load_tensors(path, hint="A DRCap checkpoint is a flat state dict of tensors (DRCap's model.pt) "
                                            "or our model.safetensors.")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelLoadError(f"{path} is not a flat state dict of tensors")
    return dict(weights)


def _peft_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """LoRA weights of a peft adapter folder under DRCap's names (peft saves them without the adapter name)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            saved = _load_tensors(folder / name)
            return {"llm." + re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", key): value
                    for key, value in saved.items()}
    return {}


def _lora_meta(folder: Path) -> dict:
    """{"lora": {...}} from a peft adapter_config.json in ``folder``, else {}."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return {}
    config = read_json_object(config_file)
    targets = config.get("target_modules") or ["q_proj", "v_proj"]
    try:
        return {"lora": {"lora_r": int(config.get("r", 8)), "lora_alpha": int(config.get("lora_alpha", 32)),
                         "lora_dropout": float(config.get("lora_dropout", 0.05)),
                         "lora_targets": sorted(targets) if isinstance(targets, list) else [targets]}}
    except (TypeError, ValueError) as e:  # "r": "eight", a list of mixed types, ...
        raise ModelLoadError(f"{config_file} holds an unusable LoRA setting ({failure_reason(e)}): r and "
                             "lora_alpha must be integers, lora_dropout a number, target_modules module names") from e


def write_checkpoint(directory: str | os.PathLike, model: DrcapModel, meta: dict) -> Path:
    """Save mapping network + LoRA as safetensors and the settings needed to rebuild the model as JSON."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.named_parameters()
               if k in set(model.adapter_names())}
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, directory / WEIGHTS_FILE)
    full_meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta}
    (directory / CONFIG_FILE).write_text(json.dumps(full_meta, indent=2))
    return directory
