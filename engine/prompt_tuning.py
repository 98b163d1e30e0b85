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

import json
import logging
import math
import os
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
from engine.config import PromptTuningConfig
from engine.errors import AudioScribeError, ClassifierInputError, ModelLoadError

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompts.json"  # a readable copy of the header's metadata
HEADER_KEY = "audioscribe"  # the safetensors header entry holding the metadata as JSON
FORMAT = "audioscribe-prompts"
ProgressCallback = Callable[[float, str], None]  # (fraction done, message)


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
        with torch.no_grad():
            self.coarse = F.normalize(prompted_class_embeddings(
                tower, ids.input_ids, ids.attention_mask, prompts.coarse.to(tower.device),
                self.config.double_embedding).float(), dim=-1).cpu()  # [C, D]
            self.fine = F.normalize(prompted_class_embeddings(
                tower, ids.input_ids, ids.attention_mask, prompts.fine.to(tower.device),
                self.config.double_embedding).float(), dim=-1).cpu()  # [C, D]
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
         progress: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None) -> TunedPrompts:
    """Learn coarse and fine prompts for ``class_names`` from captions (no audio). Seeded; cancellable."""
    import time

    config = config or PromptTuningConfig()
    names = list(class_names)
    _check_inputs(names, data, config)
    started = time.perf_counter()
    tower = clap.text_tower()
    generator = torch.Generator().manual_seed(config.seed)
    coarse = nn.Parameter(torch.randn(config.prompt_len, tower.hidden_size, generator=generator) * config.init_std)
    fine = nn.Parameter(torch.randn(config.prompt_len, tower.hidden_size, generator=generator) * config.init_std)
    coarse.data, fine.data = coarse.data.to(tower.device), fine.data.to(tower.device)
    optimizer = torch.optim.AdamW([coarse, fine], lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=config.weight_decay)
    _report(progress, 0.0, f"Embedding {len(data.texts)} captions")
    features, class_ids = training_inputs(tower, data.texts, names, config)
    labels = torch.from_numpy(data.labels.astype(np.float32))
    tau = min(clap.logit_scale, config.logit_scale_max)
    order_rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(data.texts) / config.batch_size)
    total, step, losses = config.epochs * steps_per_epoch, 0, []
    # Class prompts are encoded by a private view of the tower: its own dropout switch, the shared weights. The
    # served model stays in eval mode throughout, so other sessions' embeddings never see dropout.
    trainer_view = tower.private_view(training=config.train_dropout)
    for epoch in range(config.epochs):
        epoch_losses = []
        for batch in np.array_split(order_rng.permutation(len(data.texts)), steps_per_epoch):
            if should_stop is not None and should_stop():
                raise TuningCancelled("Prompt tuning was cancelled")
            index = torch.from_numpy(batch)
            loss = _step_loss(trainer_view, class_ids, coarse, fine, features, index, labels[index], tau, config)
            # Gradients for the prompts only: autograd.grad never writes .grad into the shared weights (which may
            # require grad) and never needs their requires_grad flags changed, so concurrent runs cannot race.
            coarse.grad, fine.grad = torch.autograd.grad(loss, [coarse, fine])
            optimizer.step()
            epoch_losses.append(loss.item())
            step += 1
            _report(progress, step / total, f"Epoch {epoch + 1}/{config.epochs}, loss {loss.item():.4f}")
        losses.append(float(np.mean(epoch_losses)))
    report = {"epoch_losses": losses, "texts": len(data.texts), "texts_per_class": data.labels.sum(0).astype(int)
              .tolist(), "seconds": round(time.perf_counter() - started, 2), "steps": step}
    return TunedPrompts(names, coarse.detach().cpu(), fine.detach().cpu(), config, clap.name, clap.fingerprint, report)


def training_inputs(tower: TextTower, texts: Sequence[str], class_names: Sequence[str], config: PromptTuningConfig
                    ) -> tuple[CaptionFeatures, TokenizedText]:
    """The frozen caption features and the class token ids a tuning run trains on, as the config asks."""
    caption_tokens, class_tokens = text_lengths(tower, config)
    features = caption_features(tower, texts, caption_tokens, pad_to_max=config.pad_captions_to_max,
                                fp32=config.caption_tokens_fp32)
    return features, tokenize_classes(tower, class_names, class_tokens)


def branch_cosines(tower: TextTower, class_ids: TokenizedText, coarse: torch.Tensor, fine: torch.Tensor,
                   features: CaptionFeatures, index: torch.Tensor, config: PromptTuningConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time (coarse, fine) cosines [B, C] of the captions ``index`` against the prompted classes; the
    logits are τ times these (single-label), the ranking loss takes them as they are (multi-label)."""
    device = coarse.device
    t = F.normalize(prompted_class_embeddings(tower, class_ids.input_ids, class_ids.attention_mask, coarse,
                                              config.double_embedding).float(), dim=-1)  # [C, D]
    f = F.normalize(prompted_class_embeddings(tower, class_ids.input_ids, class_ids.attention_mask, fine,
                                              config.double_embedding).float(), dim=-1)  # [C, D]
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
