"""Audio-free prompt tuning (AFPT): learn CLAP prompt vectors for a set of class names from captions alone.

Reference: audio_free_prompt_tuning.md. Two sets of ``prompt_len`` vectors (coarse and fine), shared by all classes,
are placed right after the first token of " <class name>" in the text tower's input, instead of a hand-written
template. Training needs no audio: the frozen CLAP text embedding of a caption that mentions a class stands in for
that class's audio embedding.

- coarse: caption sentence embedding s vs coarse-prompted class embeddings t_c:   z = τ · cos(s, t_c)
- fine:   caption token embeddings w_j vs fine-prompted class embeddings f_c, pooled over tokens with a softmax
          (temperature 0.1):   u_c = Σ_j softmax_j(cos(w_j, f_c) / T) · cos(w_j, f_c),   z_f = τ · u_c
- loss:   CE(z) + CE(z_f) (single-label) or the pairwise ranking hinge on raw cosines (multi-label)
- audio:  the clip embedding takes s's place and frame embeddings take the tokens' place; logits are summed.

Caption features come from the frozen encoder and are computed once, so a step only encodes the C class prompts
(twice: coarse and fine). Only the prompt vectors receive gradients; the backbone is never modified.

The defaults deviate from AFPT's code in a few documented places (PromptTuningConfig); ``tuning.preset = "reference"``
(engine.config.TUNING_PRESETS) reproduces the code's numbers.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.atomic import atomic_write, atomic_write_text
from engine.audio import Audio, Window
from engine.clap.base import ClapBackend, TextTower, TokenizedText, WindowEmbeddings
from engine.config import TUNING_PRECISIONS, PromptTuningConfig
from engine.errors import AudioScribeError, ClassifierInputError, ConfigError, ModelLoadError

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompts.json"  # a readable copy of the header's metadata
HEADER_KEY = "audioscribe"  # the safetensors header entry holding the metadata as JSON
FORMAT = "audioscribe-prompts"
ProgressCallback = Callable[[float, str], None]  # (fraction done, message)
# fp16 loss scale to start from. With GradScaler's default 2**16 some scaled fp16 gradients overflow and the step is
# skipped while the scale halves (measured on the tiny CLAP: 2 of 8 steps lost, prompts 30-50 % off float32's), which a
# run of a few dozen steps (tuning.preset = "quick") cannot spare; at 2**10 none was skipped (prompts within 0.5 %),
# and gradients are still lifted 1,000x clear of fp16's subnormal range.
LOSS_SCALE = 2.0 ** 10


def _read_prompts_file(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a prompts file; metadata from the header, or from prompts.json beside a version-1
    file (written before the header held it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{file.name} is not a safetensors file of tuned prompts ({e})") from e
    if {"coarse", "fine"} - tensors.keys():
        raise ModelLoadError(f"{file.name} holds no 'coarse' and 'fine' prompt tensors")
    try:
        if HEADER_KEY in header:
            meta = json.loads(header[HEADER_KEY])
        elif (file.parent / META_FILE).is_file():
            meta = json.loads((file.parent / META_FILE).read_text(encoding="utf-8"))
        else:
            raise ModelLoadError(f"{file.name} holds prompt tensors but no class names (no metadata in its header "
                                 f"and no {META_FILE} beside it)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"The metadata of {file.name} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelLoadError(f"{file.name} is not a tuned-prompts file (format {FORMAT!r} expected)")
    return tensors, meta


class TuningCancelled(AudioScribeError):
    """Tuning was stopped by the caller (e.g. the user pressed Stop)."""


# --------------------------------------------------------------------------------------------------------------------
# prompted class embeddings


def tokenize_classes(tower: TextTower, class_names: Sequence[str], max_tokens: int):
    """' ' + name, as AFPT writes class strings (for byte-level BPE the leading space gives the mid-sentence form)."""
    return tower.tokenize([" " + name for name in class_names], max_length=max_tokens)


def insert_prompts(tokens: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, L, H] token embeddings, [C, L] mask, [P, H] prompts -> [C, 1+P+L-1, H] and its mask.

    The prompts go after the first token ([CLS] / <s>) and before the class-name tokens.
    """
    count = tokens.shape[0]
    spliced = torch.cat([tokens[:, :1], prompts.unsqueeze(0).expand(count, -1, -1).to(tokens.dtype), tokens[:, 1:]],
                        dim=1)
    ones = torch.ones(count, prompts.shape[0], dtype=mask.dtype, device=mask.device)
    return spliced, torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)


def prompted_class_embeddings(tower: TextTower, class_ids: torch.Tensor, class_mask: torch.Tensor,
                              prompts: torch.Tensor, double_embedding: bool = False) -> torch.Tensor:
    """[C, D] (unnormalised) class embeddings with ``prompts`` [P, H] inserted; P may be 0."""
    tokens = tower.embed_full(class_ids) if double_embedding else tower.embed_words(class_ids)  # [C, L, H]
    inputs, mask = insert_prompts(tokens, class_mask, prompts)
    hidden = tower.encode(inputs, mask)  # [C, 1+P+L-1, H]
    return tower.project(tower.sentence_features(hidden, mask))  # [C, D]


def prompted_class_pair(tower: TextTower, class_ids: torch.Tensor, class_mask: torch.Tensor, coarse: torch.Tensor,
                        fine: torch.Tensor, double_embedding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, D], [C, D]) unnormalised class embeddings with the coarse and with the fine prompts ([P, H] each), in one
    encoder pass over 2C sequences: the same values as two ``prompted_class_embeddings`` calls (each row is encoded
    on its own; with dropout on, every row still gets its own mask), for one batched pass instead of two."""
    count = class_ids.shape[0]
    ids = torch.cat([class_ids, class_ids])  # [2C, L]: each half embedded separately (own dropout when training)
    tokens = tower.embed_full(ids) if double_embedding else tower.embed_words(ids)  # [2C, L, H]
    with_coarse, mask = insert_prompts(tokens[:count], class_mask, coarse)
    with_fine, _ = insert_prompts(tokens[count:], class_mask, fine)
    inputs, masks = torch.cat([with_coarse, with_fine]), torch.cat([mask, mask])  # [2C, 1+P+L-1, H]
    embeddings = tower.project(tower.sentence_features(tower.encode(inputs, masks), masks))  # [2C, D]
    return embeddings[:count], embeddings[count:]


def softmax_pool(similarity: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                 mask_padding: bool = True) -> torch.Tensor:
    """[B, L, C] cosines -> [B, C]: Σ_j softmax_j(S/T) · S over the valid positions.

    ``mask`` [B, L] marks valid positions. With ``mask_padding`` padding is excluded; without it (AFPT's code)
    padding gets logit 0 in the softmax and its raw similarity is still summed.
    """
    if mask is None:
        weights = torch.softmax(similarity / temperature, dim=1)
        return (weights * similarity).sum(dim=1)
    valid = mask.unsqueeze(-1).to(similarity.dtype)  # [B, L, 1]
    if mask_padding:
        logits = (similarity / temperature).masked_fill(valid == 0, float("-inf"))
        return (torch.softmax(logits, dim=1) * similarity * valid).sum(dim=1)
    weights = torch.softmax(similarity * valid / temperature, dim=1)
    return (weights * similarity).sum(dim=1)


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float = 5.0, margin: float = 1.0) -> torch.Tensor:
    """AFPT's multi-label loss: mean over the batch of Σ_{neg i, pos j} max(0, margin − scale·s_j + scale·s_i)."""
    scaled = scale * scores  # [B, C]
    diff = margin - scaled.unsqueeze(1) + scaled.unsqueeze(2)  # [B, i, j] = margin - s_j + s_i
    pairs = (labels == 0).unsqueeze(2) & (labels == 1).unsqueeze(1)  # i negative, j positive
    return (F.relu(diff) * pairs).sum(dim=(1, 2)).mean()


# --------------------------------------------------------------------------------------------------------------------
# frozen caption features


@dataclass
class CaptionFeatures:
    sentence: torch.Tensor  # [N, D] unit-norm
    tokens: torch.Tensor  # [N, L, D] unit-norm token embeddings (positions after the first), float16 to save memory
    mask: torch.Tensor  # [N, L]
    key: str = ""  # what they were computed from (texts and settings; training_inputs), to check reuse against


@torch.no_grad()
def caption_features(tower: TextTower, texts: Sequence[str], max_tokens: int, batch_size: int = 64,
                     pad_to_max: bool = False, fp32: bool = False) -> CaptionFeatures:
    """Sentence and token embeddings of captions from the frozen text tower (eval mode), computed once.

    By default captions are encoded in batches of similar length (each padded only to its own longest caption), then
    placed in one [N, L, D] tensor padded with zero vectors to the longest caption of the set, with a mask. With
    ``pad_to_max`` every caption is padded to ``max_tokens`` as AFPT's code does, so the pads' own token features
    (which the leaky mask of ``softmax_pool(mask_padding=False)`` pools over) are the encoder's, for every caption.
    Token features are stored in float16 to halve their memory unless ``fp32``.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tokens = tower.tokenize([texts[i] for i in rows], max_length=max_tokens, pad_to_max=pad_to_max)
        hidden = tower.encode(tower.embed_words(tokens.input_ids), tokens.attention_mask)  # [b, l, H]
        sentence = F.normalize(tower.project(tower.sentence_features(hidden, tokens.attention_mask)).float(), dim=-1)
        words = F.normalize(tower.project(hidden[:, 1:]).float(), dim=-1)  # [b, l-1, D]
        chunks.append((rows, sentence.cpu(), words.to("cpu", _token_dtype(fp32)), tokens.attention_mask[:, 1:].cpu()))
    width = max(words.shape[1] for _, _, words, _ in chunks)
    dim = chunks[0][1].shape[1]
    sentences = torch.empty(len(texts), dim)
    token_embeddings = torch.zeros(len(texts), width, dim, dtype=_token_dtype(fp32))
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for rows, sentence, words, words_mask in chunks:
        index = torch.tensor(rows)
        sentences[index] = sentence
        token_embeddings[index, :words.shape[1]] = words
        mask[index, :words.shape[1]] = words_mask
    return CaptionFeatures(sentences, token_embeddings, mask)


def _token_dtype(fp32: bool) -> torch.dtype:
    return torch.float32 if fp32 else torch.float16


def token_limit(tower: TextTower) -> int | None:
    """The most tokens the tower's encoder takes (its position table), or None when the tower does not say."""
    encoder = getattr(tower, "encoder", None)
    positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if positions is None:
        return None
    # RoBERTa-style embeddings (HF CLAP, DRCap's CLAP) number positions from padding_idx + 1; BERT's from 0.
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return int(positions) - (int(padding_idx) + 1 if padding_idx is not None else 0)


def text_lengths(tower: TextTower, config: PromptTuningConfig) -> tuple[int, int]:
    """(caption tokens, class tokens) from the config, capped so that captions and prompted class strings
    (class tokens + prompt_len) fit the tower's positions: the reference preset asks for AFPT's 100 + 68, which a
    tower with fewer positions (e.g. the tiny test CLAP) cannot take."""
    caption, classes = config.caption_max_tokens, config.class_max_tokens
    limit = token_limit(tower)
    if limit is None or (caption <= limit and classes + config.prompt_len <= limit):
        return caption, classes
    capped = min(caption, limit), max(2, min(classes, limit - config.prompt_len))
    log.warning("The CLAP's text tower takes at most %d tokens: caption/class lengths %d/%d capped to %d/%d",
                limit, caption, classes, *capped)
    return capped


# --------------------------------------------------------------------------------------------------------------------
# tuned prompts


@dataclass
class TunedPrompts:
    """Learned coarse and fine prompt vectors for a class list, tied to the CLAP they were tuned on."""

    class_names: list[str]
    coarse: torch.Tensor  # [P, H]
    fine: torch.Tensor  # [P, H]
    config: PromptTuningConfig
    clap_name: str
    clap_fingerprint: str
    report: dict = field(default_factory=dict)  # texts per class, losses per epoch, time

    def is_for(self, class_names: Sequence[str]) -> bool:
        """True when these prompts were tuned for exactly these class names, in this order (case aside)."""
        return [n.casefold() for n in self.class_names] == [n.casefold() for n in class_names]

    def content_key(self) -> str:
        """A hash of everything that determines the class embeddings (for caching them)."""
        import hashlib

        digest = hashlib.sha256(json.dumps([self.class_names, self.clap_fingerprint, asdict(self.config)]).encode())
        for tensor in (self.coarse, self.fine):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": 2, "class_names": self.class_names, "clap": {
            "name": self.clap_name, "fingerprint": self.clap_fingerprint}, "config": asdict(self.config),
            "report": self.report}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/prompts.safetensors`` in one atomic write: the tensors and, in the safetensors header,
        the class names, the CLAP and the settings, so prompts can never be read under another file's class names.
        ``prompts.json`` beside it is a readable copy that loading ignores."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tensors = {"coarse": self.coarse.detach().contiguous().cpu(), "fine": self.fine.detach().contiguous().cpu()}
        atomic_write(directory / PROMPTS_FILE,
                     lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(meta)}))
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, clap: ClapBackend | None = None) -> TunedPrompts:
        """Prompts from a folder written by :meth:`save` or from its ``.safetensors`` file alone (e.g. uploaded)."""
        path = Path(path)
        file = path / PROMPTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"{path} holds no tuned prompts ({PROMPTS_FILE})")
        tensors, meta = _read_prompts_file(file)
        try:
            config = PromptTuningConfig(**meta["config"])
            prompts = cls(list(meta["class_names"]), tensors["coarse"], tensors["fine"], config,
                          meta["clap"]["name"], meta["clap"]["fingerprint"], meta.get("report", {}))
        except (KeyError, TypeError) as e:
            raise ModelLoadError(f"{file.name} is not a tuned-prompts file of this AudioScribe (missing or unknown "
                                 f"field {e})") from e
        expected = (config.prompt_len, prompts.coarse.shape[-1])
        if prompts.coarse.ndim != 2 or prompts.coarse.shape != prompts.fine.shape or \
                prompts.coarse.shape[0] != config.prompt_len:
            raise ModelLoadError(f"{file.name} holds prompts of shape {tuple(prompts.coarse.shape)} / "
                                 f"{tuple(prompts.fine.shape)}; expected {expected} each")
        if clap is not None:
            prompts.check_compatible(clap)
        return prompts

    def check_compatible(self, clap: ClapBackend) -> None:
        if clap.fingerprint != self.clap_fingerprint:
            raise ModelLoadError(f"These prompts were tuned on CLAP {self.clap_name!r} (fingerprint "
                                 f"{self.clap_fingerprint}); the loaded CLAP {clap.name!r} is another model. Tune "
                                 "them again for this CLAP.")


class PromptedClassifier:
    """Class embeddings from tuned prompts, and scores for audio (coarse, fine and combined)."""

    def __init__(self, clap: ClapBackend, prompts: TunedPrompts) -> None:
        prompts.check_compatible(clap)
        self.clap, self.prompts, self.config = clap, prompts, prompts.config
        tower = clap.text_tower()
        ids = tokenize_classes(tower, prompts.class_names, text_lengths(tower, self.config)[1])
        with torch.no_grad():  # coarse and fine in one encoder pass, float32 (no autocast: scoring is exact)
            coarse, fine = prompted_class_pair(tower, ids.input_ids, ids.attention_mask,
                                               prompts.coarse.to(tower.device), prompts.fine.to(tower.device),
                                               self.config.double_embedding)
            self.coarse = F.normalize(coarse.float(), dim=-1).cpu()  # [C, D]
            self.fine = F.normalize(fine.float(), dim=-1).cpu()  # [C, D]
        self.tau = min(clap.logit_scale, self.config.logit_scale_max)

    def scores(self, clip: torch.Tensor, frames: torch.Tensor) -> dict[str, np.ndarray]:
        """clip [D] and frames [T, D] unit-norm -> {coarse, fine, combined} per class.

        Single-label: softmax of τ-scaled logits (combined = softmax of the summed logits). Multi-label: raw cosines
        (combined = their sum), as AFPT scores multi-label data.
        """
        coarse_cos = clip.float() @ self.coarse.T  # [C]
        fine_cos = softmax_pool((frames.float() @ self.fine.T).unsqueeze(0), None,
                                self.config.token_temperature)[0]  # [C]
        if self.config.multi_label:
            return {"coarse": coarse_cos.numpy(), "fine": fine_cos.numpy(), "combined": (coarse_cos + fine_cos).numpy()}
        z, zf = self.tau * coarse_cos, self.tau * fine_cos
        return {"coarse": z.softmax(-1).numpy(), "fine": zf.softmax(-1).numpy(), "combined": (z + zf).softmax(-1).numpy()}

    def classify(self, audio: Audio, embedded: WindowEmbeddings | None = None) -> TunedClassification:
        """Scores for the whole clip (pooled clip embedding; all frames of all windows) and per window, from one
        audio-tower pass (``embedded`` with frames, when the caller already made it)."""
        if embedded is None or embedded.frames is None:
            embedded = self.clap.embed_windows([audio], frames=True)[0]
        frames = embedded.frames
        clip = self.scores(embedded.pooled, torch.cat(frames))
        per_window = [self.scores(embedded.embeddings[i], frames[i])["combined"] for i in range(len(frames))]
        return TunedClassification(self.prompts.class_names, clip, embedded.windows, np.stack(per_window))


@dataclass
class TunedClassification:
    class_names: list[str]
    scores: dict[str, np.ndarray]  # coarse, fine, combined: [C] each
    windows: list[Window]
    window_scores: np.ndarray  # [W, C] combined

    def as_dict(self, which: str = "combined") -> dict[str, float]:
        return {n: float(s) for n, s in zip(self.class_names, self.scores[which])}


# --------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingTexts:
    """Captions standing in for audio: texts with their labels."""

    texts: list[str]
    labels: np.ndarray  # [N, C] multi-hot (single-label data has exactly one 1 per row)


def training_texts(selection, multi_label: bool) -> TrainingTexts:
    """TrainingTexts from a text selection: every text (multi-hot) for multi-label tuning; for single-label tuning
    only texts that belong to exactly one class."""
    labels = np.asarray(selection.labels, dtype=np.float32)
    if multi_label:
        return TrainingTexts(list(selection.texts), labels)
    keep = np.flatnonzero(labels.sum(axis=1) == 1)
    return TrainingTexts([selection.texts[i] for i in keep], labels[keep])


def tune(clap: ClapBackend, class_names: Sequence[str], data: TrainingTexts, config: PromptTuningConfig | None = None,
         progress: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None,
         inputs: tuple[CaptionFeatures, TokenizedText] | None = None) -> TunedPrompts:
    """Learn coarse and fine prompts for ``class_names`` from captions (no audio). Seeded; cancellable.

    ``progress`` gets the plan first (steps, before any model work), then after every step the elapsed time and
    an estimate of the rest (:class:`TuningClock`). ``inputs`` are this run's caption features and class ids from
    :func:`training_inputs` when the caller already has them (e.g. several seeds on the same texts)."""
    config = config or PromptTuningConfig()
    names = list(class_names)
    _check_inputs(names, data, config)
    tower = clap.text_tower()
    plan = plan_tuning(len(names), len(data.texts), config)
    clock = TuningClock(plan, early_stop=config.patience > 0)
    _report(progress, 0.0, f"{plan.describe()} Embedding the captions…")
    if inputs is None:
        inputs = training_inputs(tower, data.texts, names, config)
    else:
        _check_reuse(inputs[0], tower, data.texts, config)
    features, class_ids = inputs
    clock.features_done()
    _report(progress, 0.0, f"{len(data.texts):,} captions embedded in {format_duration(clock.features_s)}; timing "
                           "the first step for an estimate…")
    generator = torch.Generator().manual_seed(config.seed)
    coarse = nn.Parameter(torch.randn(config.prompt_len, tower.hidden_size, generator=generator) * config.init_std)
    fine = nn.Parameter(torch.randn(config.prompt_len, tower.hidden_size, generator=generator) * config.init_std)
    coarse.data, fine.data = coarse.data.to(tower.device), fine.data.to(tower.device)
    optimizer = torch.optim.AdamW([coarse, fine], lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=config.weight_decay)
    # float16 gradients underflow: fp16 compute (autocast, or an fp16 model) always goes with loss scaling.
    scaler = torch.amp.GradScaler(tower.device.type, init_scale=LOSS_SCALE,
                                  enabled=compute_dtype(tower, config) == torch.float16)
    labels = torch.from_numpy(data.labels.astype(np.float32))
    tau = min(clap.logit_scale, config.logit_scale_max)
    order_rng = np.random.default_rng(config.seed)
    step, losses, estimated = 0, [], None
    # Class prompts are encoded by a private view of the tower: its own dropout switch, the shared weights. The
    # served model stays in eval mode throughout, so other sessions' embeddings never see dropout.
    trainer_view = tower.private_view(training=config.train_dropout)
    for epoch in range(config.epochs):
        epoch_losses = []
        for batch in np.array_split(order_rng.permutation(len(data.texts)), plan.steps_per_epoch):
            if should_stop is not None and should_stop():
                raise TuningCancelled("Prompt tuning was cancelled")
            index = torch.from_numpy(batch)
            loss = _step_loss(trainer_view, class_ids, coarse, fine, features, index, labels[index], tau, config)
            # Gradients for the prompts only: autograd.grad never writes .grad into the shared weights (which may
            # require grad) and never needs their requires_grad flags changed, so concurrent runs cannot race.
            coarse.grad, fine.grad = torch.autograd.grad(scaler.scale(loss), [coarse, fine])
            scaler.step(optimizer)  # unscales; skips the step when a scaled gradient overflowed
            scaler.update()
            epoch_losses.append(loss.item())
            step += 1
            clock.step_done()
            estimated = estimated or clock.estimate().total_s  # the first estimate: one measured step x the plan
            _report(progress, step / plan.steps, clock.message(epoch, epoch_losses[-1]))
        losses.append(float(np.mean(epoch_losses)))
        if plateaued(losses, config.patience, config.plateau_tolerance):
            break
    report = {"epoch_losses": losses, "texts": len(data.texts), "texts_per_class": data.labels.sum(0).astype(int)
              .tolist(), "seconds": round(clock.elapsed_s, 2), "steps": step, "steps_planned": plan.steps,
              "stopped_early": len(losses) < config.epochs, "features_seconds": round(clock.features_s, 2),
              "step_seconds": round(clock.step_cost() or 0.0, 3), "estimated_seconds": round(estimated or 0.0, 1),
              "compute_dtype": str(compute_dtype(tower, config)).removeprefix("torch.")}
    return TunedPrompts(names, coarse.detach().cpu(), fine.detach().cpu(), config, clap.name, clap.fingerprint, report)


def training_inputs(tower: TextTower, texts: Sequence[str], class_names: Sequence[str], config: PromptTuningConfig
                    ) -> tuple[CaptionFeatures, TokenizedText]:
    """The frozen caption features and the class token ids a tuning run trains on, as the config asks. Computed
    once per run (every epoch reuses them); pass them to :func:`tune` to share them between runs on the same texts
    and settings (seeds, presets that differ only in training values)."""
    caption_tokens, class_tokens = text_lengths(tower, config)
    features = caption_features(tower, texts, caption_tokens, pad_to_max=config.pad_captions_to_max,
                                fp32=config.caption_tokens_fp32)
    features.key = _features_key(tower, texts, config)
    return features, tokenize_classes(tower, class_names, class_tokens)


def _features_key(tower: TextTower, texts: Sequence[str], config: PromptTuningConfig) -> str:
    """The texts and the settings caption features depend on (not the training values: epochs, lr, prompts)."""
    import hashlib

    settings = (text_lengths(tower, config)[0], config.pad_captions_to_max, config.caption_tokens_fp32)
    return hashlib.sha256(json.dumps([list(texts), settings]).encode()).hexdigest()


def _check_reuse(features: CaptionFeatures, tower: TextTower, texts: Sequence[str], config: PromptTuningConfig
                 ) -> None:
    if features.key != _features_key(tower, texts, config):
        raise ClassifierInputError("The precomputed caption features are for other texts or caption settings "
                                   "(caption_max_tokens, pad_captions_to_max, caption_tokens_fp32); compute them "
                                   "with training_inputs for this run")


def branch_cosines(tower: TextTower, class_ids: TokenizedText, coarse: torch.Tensor, fine: torch.Tensor,
                   features: CaptionFeatures, index: torch.Tensor, config: PromptTuningConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time (coarse, fine) cosines [B, C] of the captions ``index`` against the prompted classes; the
    logits are τ times these (single-label), the ranking loss takes them as they are (multi-label).

    Only the class-prompt encoding runs under autocast (``tuning.mixed_precision``): it is the step's cost, while
    the cosines are scaled by τ up to 100, so they are computed in float32."""
    device = coarse.device
    with _autocast(tower, config):
        t, f = prompted_class_pair(tower, class_ids.input_ids, class_ids.attention_mask, coarse, fine,
                                   config.double_embedding)  # [C, D] each
    t, f = F.normalize(t.float(), dim=-1), F.normalize(f.float(), dim=-1)
    sentence = features.sentence[index].to(device)  # [B, D]
    tokens = features.tokens[index].to(device).float()  # [B, L, D]
    coarse_cos = sentence @ t.T  # [B, C]
    fine_cos = softmax_pool(tokens @ f.T, features.mask[index].to(device), config.token_temperature,
                            config.mask_padding)  # [B, C]
    return coarse_cos, fine_cos


def _step_loss(tower, class_ids, coarse, fine, features: CaptionFeatures, index, labels, tau: float,
               config: PromptTuningConfig) -> torch.Tensor:
    coarse_cos, fine_cos = branch_cosines(tower, class_ids, coarse, fine, features, index, config)
    labels = labels.to(coarse.device)
    if config.multi_label:
        return ranking_loss(coarse_cos, labels, config.ranking_scale) + ranking_loss(fine_cos, labels,
                                                                                       config.ranking_scale)
    target = labels.argmax(dim=1)
    return F.cross_entropy(tau * coarse_cos, target) + F.cross_entropy(tau * fine_cos, target)


def plateaued(losses: Sequence[float], patience: int, tolerance: float) -> bool:
    """True when the last ``patience`` epoch losses are all above (1 - tolerance) x the best loss before them: the
    loss has stopped falling. Never with ``patience`` 0 or before patience + 1 epochs."""
    if patience <= 0 or len(losses) <= patience:
        return False
    return min(losses[-patience:]) > (1.0 - tolerance) * min(losses[:-patience])


# --------------------------------------------------------------------------------------------------------------------
# mixed precision


def _weights_dtype(tower: TextTower) -> torch.dtype:
    return next((p.dtype for p in tower.frozen_parameters() if p.is_floating_point()), torch.float32)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where oneDNN runs bf16 matmuls natively;
    elsewhere bf16 is emulated and slower than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch._C._cpu, name)() for name in checks if hasattr(torch._C._cpu, name))
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(tower: TextTower, setting: str) -> torch.dtype | None:
    """The autocast dtype for encoding class prompts, or None (no autocast: the model's own dtype).

    "auto": on CUDA the model's own dtype (fp16 or bf16 weights already compute in half precision; float32 stays
    float32); on a CPU bf16 where it is native (measured faster than float32 on an AMX Xeon:
    benchmarks/RESULTS.md), else none."""
    if setting not in TUNING_PRECISIONS:
        raise ConfigError(f"tuning.mixed_precision must be one of {', '.join(TUNING_PRECISIONS)}, got {setting!r}")
    if setting == "no":
        return None
    if setting in ("bf16", "fp16"):
        return torch.bfloat16 if setting == "bf16" else torch.float16
    if tower.device.type == "cpu" and _weights_dtype(tower) == torch.float32 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def compute_dtype(tower: TextTower, config: PromptTuningConfig) -> torch.dtype:
    """The dtype the class-prompt encoding computes in: the autocast dtype, or the model's own."""
    return autocast_dtype(tower, config.mixed_precision) or _weights_dtype(tower)


def _autocast(tower: TextTower, config: PromptTuningConfig):
    dtype = autocast_dtype(tower, config.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(tower.device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# run time: the plan, the clock, the estimate


@dataclass(frozen=True)
class TuningPlan:
    """How many optimizer steps a run takes (at most: an early stop may end it sooner). Arithmetic only."""

    classes: int
    texts: int
    epochs: int
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.texts / self.batch_size)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        return (f"Tuning {self.classes} classes on {self.texts:,} captions: {self.steps:,} steps ({self.epochs} "
                f"epochs × {self.steps_per_epoch}).")


def plan_tuning(classes: int, texts: int, config: PromptTuningConfig) -> TuningPlan:
    return TuningPlan(classes, texts, config.epochs, config.batch_size)


@dataclass(frozen=True)
class TuningEstimate:
    """Where a run stands in time: measured so far, and the rest at the measured cost per step."""

    steps_done: int
    steps: int  # planned
    elapsed_s: float  # since the run began, caption features included
    step_s: float | None  # the cost per step the rest is estimated with (None before the first step)
    early_stop: bool  # the run may end before `steps` (tuning.patience): the remaining time is then an upper bound

    @property
    def remaining_s(self) -> float | None:
        return None if self.step_s is None else (self.steps - self.steps_done) * self.step_s

    @property
    def total_s(self) -> float | None:
        remaining = self.remaining_s
        return None if remaining is None else self.elapsed_s + remaining

    def describe(self) -> str:
        if self.remaining_s is None:
            return f"{format_duration(self.elapsed_s)} elapsed"
        bound = "at most " if self.early_stop else ""
        return f"{format_duration(self.elapsed_s)} elapsed, {bound}≈ {format_duration(self.remaining_s)} left"


class TuningClock:
    """Times a run: the caption features, then every step. The rest of the run is estimated as the remaining steps
    times the cost per step measured so far: the first step alone until there are others, then the mean of the
    latest ``window`` steps after it (the first carries warm-up; the window follows a machine whose load changes).

    ``clock`` is injectable (tests)."""

    def __init__(self, plan: TuningPlan, early_stop: bool = False, window: int = 20,
                 clock: Callable[[], float] | None = None) -> None:
        self.plan, self.early_stop, self.window = plan, early_stop, window
        self._clock = clock or time.perf_counter
        self.started = self._last = self._clock()
        self.features_s = 0.0
        self.step_times: list[float] = []

    def features_done(self) -> None:
        now = self._clock()
        self.features_s, self._last = now - self.started, now

    def step_done(self) -> None:
        now = self._clock()
        self.step_times.append(now - self._last)
        self._last = now

    @property
    def elapsed_s(self) -> float:
        return self._last - self.started

    def step_cost(self) -> float | None:
        later = self.step_times[1:][-self.window:]
        return float(np.mean(later)) if later else (self.step_times[0] if self.step_times else None)

    def estimate(self) -> TuningEstimate:
        return TuningEstimate(len(self.step_times), self.plan.steps, self.elapsed_s, self.step_cost(),
                              self.early_stop)

    def message(self, epoch: int, loss: float) -> str:
        """The progress line after a step: where the run is, its loss, the time spent and the time left."""
        done = len(self.step_times)
        return (f"Step {done:,}/{self.plan.steps:,} (epoch {epoch + 1}/{self.plan.epochs}), loss {loss:.4f}: "
                f"{self.estimate().describe()}")


def format_duration(seconds: float) -> str:
    """42 s, 6 min 05 s, 1 h 04 min."""
    whole = round(max(0.0, float(seconds)))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


# --------------------------------------------------------------------------------------------------------------------
# checks


def _check_inputs(names: list[str], data: TrainingTexts, config: PromptTuningConfig) -> None:
    if not names:
        raise ClassifierInputError("Give at least one class name to tune prompts for")
    if len(names) > config.max_classes:
        raise ClassifierInputError(f"{len(names)} class names to tune; the limit is {config.max_classes} "
                                   "(tuning.max_classes): every step encodes every class, so a run grows with the "
                                   "square of the class count. Tune fewer classes, or zero-shot classify them all.")
    if len({n.casefold() for n in names}) != len(names):
        raise ClassifierInputError("Class names must be distinct (case-insensitive)")
    if data.labels.shape != (len(data.texts), len(names)):
        raise ClassifierInputError(f"labels are {data.labels.shape}; expected ({len(data.texts)}, {len(names)})")
    missing = [n for n, count in zip(names, data.labels.sum(0)) if count == 0]
    if missing:
        raise ClassifierInputError(f"No training texts for: {', '.join(missing)}")
    if not config.multi_label and (data.labels.sum(1) != 1).any():
        raise ClassifierInputError("Single-label tuning needs exactly one label per text; use multi_label")


def _report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)
