"""The interface every CLAP backend implements.

A backend turns mono float32 audio at its own ``sample_rate`` and plain strings into unit-norm vectors of one shared
``embedding_dim``. The base class does everything that is the same for all backends: cutting long clips into windows,
batching windows across clips, pooling window embeddings, and batching texts. A backend only embeds one batch of
windows no longer than ``max_window_s`` and one batch of texts.
"""
from __future__ import annotations

import copy
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.audio import Audio, Window, split_windows
from engine.config import AudioConfig
from engine.distributed import cuda_device_count, device_for_rank
from engine.errors import ConfigError


@dataclass(frozen=True)
class WindowEmbeddings:
    """The embeddings of one clip's windows and their pooled clip embedding: everything describe, classify and
    tuned classify need, from one pass of the audio tower (frames only when asked for)."""

    windows: list[Window]
    embeddings: torch.Tensor  # [W, D] unit-norm, one row per window
    pooled: torch.Tensor  # [D] unit-norm: mean of the window vectors, renormalised
    frames: list[torch.Tensor] | None = None  # per window [T_w, D] unit-norm frame embeddings (fine prompts)


@dataclass
class TokenizedText:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens


class TextTower(ABC):
    """The pieces of a CLAP text branch that prompt tuning needs (BERT/RoBERTa-style encoders, [CLS]-first).

    Plain text embedding is ``project(sentence_features(encode(embed_words(ids), mask), mask))``, which must equal
    ``ClapBackend.embed_text`` before normalisation. Prompt vectors are spliced into ``embed_words``' output after the
    first token; ``encode`` adds position (and token-type) embeddings itself, exactly once.
    """

    hidden_size: int  # H of the token embeddings
    device: torch.device

    @abstractmethod
    def tokenize(self, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> TokenizedText:
        """Ids with the tokenizer's special tokens ([CLS] ... [SEP] / <s> ... </s>), on ``device``."""

    @abstractmethod
    def embed_words(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, H]: word embeddings only (no position/type embeddings, no LayerNorm)."""

    @abstractmethod
    def embed_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, H]: the whole embeddings module (word + position + type, LayerNorm), as AFPT's code
        feeds to the encoder (which then adds positions again: its "double embedding")."""

    @abstractmethod
    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, L, H] last hidden states (the encoder adds position/type embeddings)."""

    @abstractmethod
    def sentence_features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, H]: the backend's own sentence pooling (e.g. the [CLS] state, or HF CLAP's pooler)."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., D]: the text projection head (not normalised)."""

    def frozen_parameters(self) -> list[torch.nn.Parameter]:
        """Every weight the tower uses (for checks that tuning leaves them untouched)."""
        return []

    def private_view(self, training: bool) -> TextTower:
        """This tower with its own train/eval flags and the same weights (no copy of a tensor).

        The served model is shared by every session of an app process; switching it to train mode for a tuning run
        (AFPT encodes class prompts with dropout on) would put dropout into everyone else's embeddings. The view's
        modules are shallow copies that share parameters and buffers but not the ``training`` flag.
        """
        view = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                setattr(view, name, mode_private_copy(value, training))
        return view


class EncoderTextTower(TextTower):
    """The text tower of a [CLS]-first Hugging Face encoder (BERT, RoBERTa, ClapTextModel) and a projection head.

    ``pool`` turns the last hidden states into the sentence feature: the first token's state by default, or e.g.
    HF CLAP's pooler (dense + tanh over the first token).
    """

    def __init__(self, tokenizer, encoder: torch.nn.Module, projection: torch.nn.Module, device: torch.device,
                 pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.projection = projection
        self.pool = pool
        self.hidden_size = int(encoder.config.hidden_size)
        self.device = device

    def tokenize(self, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> TokenizedText:
        tokens = self.tokenizer(list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
                                max_length=max_length, return_tensors="pt")
        return TokenizedText(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    def embed_words(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embeddings.word_embeddings(input_ids)

    def embed_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The encoder adds position embeddings (BERT: 0..L-1; RoBERTa: from padding_idx + 1, as for real tokens
        # before the padding) and token-type 0, then LayerNorm, exactly once.
        token_types = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            token_type_ids=token_types).last_hidden_state

    def sentence_features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(hidden) if self.pool is not None else hidden[:, 0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    def frozen_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.projection.parameters())


def mode_private_copy(module: torch.nn.Module, training: bool) -> torch.nn.Module:
    """A copy of ``module``'s tree that shares every parameter and buffer (the same tensors) but has its own
    ``training`` flags, all set to ``training``."""
    clone = copy.copy(module)  # a new object whose _parameters/_buffers dicts are the original's
    clone._modules = {name: None if child is None else mode_private_copy(child, training)
                      for name, child in module._modules.items()}
    clone.training = training
    return clone


def serving_state_ok(modules: Iterable[torch.nn.Module]) -> bool:
    """True when no module (at any depth) is in train mode: what a shared, served model must always be."""
    return not any(m.training for root in modules for m in root.modules())


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unit-norm along ``dim`` in float32 (fp16 norms lose precision)."""
    x = x.float()
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def pool_windows(window_embeddings: torch.Tensor) -> torch.Tensor:
    """[W, D] unit vectors -> [D]: their mean, renormalised (a direction average, not a length average)."""
    return l2_normalize(window_embeddings.mean(dim=0))


def resolve_device(device: str) -> torch.device:
    """'auto' picks a CUDA device when there is one, else the CPU; under torchrun / accelerate launch "auto" and
    "cuda" mean this rank's own GPU (engine.distributed.device_for_rank)."""
    return device_for_rank(device, os.environ, cuda_device_count())


def fingerprint_tensors(tensors: Iterable[torch.Tensor], *extra: str) -> str:
    """A short stable hash of weights (in float32 on the CPU, so it is the same on every device and dtype)."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode())
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class ClapBackend(ABC):
    """A CLAP model: ``embed_audio`` and ``embed_text`` into one unit-norm space.

    Subclasses set ``name``, ``sample_rate``, ``embedding_dim``, ``max_window_s``, ``logit_scale``, ``fingerprint``,
    ``device`` and implement :meth:`_embed_window_batch` and :meth:`_embed_text_batch`.
    """

    name: str  # what the model was loaded from: hub id or local directory
    sample_rate: int  # audio must be mono float32 at this rate
    embedding_dim: int  # D
    max_window_s: float  # the longest audio the model sees in one pass
    logit_scale: float  # multiplies audio-text cosine similarities into logits (1 / temperature)
    fingerprint: str  # identifies the weights; datastores record it
    is_untrained: bool = False  # True for randomly initialised weights (the UI says so)
    about: str = ""  # what a narrowly trained model knows, in one sentence, for the UI ("" = a general CLAP)
    known_classes: tuple[str, ...] = ()  # the sound classes it was trained on, when that is a closed list
    device: torch.device

    def __init__(self, audio_config: AudioConfig, batch_size: int, text_batch_size: int) -> None:
        self.audio_config = audio_config
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size

    # --- what a backend implements -------------------------------------------------------------------------------

    @abstractmethod
    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows of at most ``max_window_s`` -> [B, D] float32 unit-norm on the CPU."""

    @abstractmethod
    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [B, D] float32 unit-norm on the CPU."""

    def text_tower(self) -> TextTower:
        """Access to the text branch for prompt tuning; backends that support it override this."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its text tower")

    def _embed_window_and_frame_batch(self, windows: Sequence[np.ndarray]
                                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Windows -> ([B, D] window embeddings, per window [T, D] frame embeddings), all float32 unit-norm on the
        CPU, from ONE forward pass of the audio tower (both come from its last feature map)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose frame-level audio embeddings")

    def _embed_frame_batch(self, windows: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Windows -> per window [T, D] float32 unit-norm frame embeddings (time order) on the CPU."""
        return self._embed_window_and_frame_batch(windows)[1]

    def embed_frames(self, clip: Audio | np.ndarray) -> tuple[list[Window], list[torch.Tensor]]:
        """Frame-level embeddings of each window of one clip: (windows, [[T_w, D] per window])."""
        embedded = self.embed_windows([clip], frames=True)[0]
        return embedded.windows, embedded.frames

    # --- shared behaviour ----------------------------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        return 1.0 / self.logit_scale

    def describe(self) -> str:
        state = "UNTRAINED random weights" if self.is_untrained else "trained weights"
        return (f"{self.name} ({type(self).__name__}, {state}, {self.embedding_dim}-d, {self.sample_rate} Hz, "
                f"{self.device})")

    def embed_text(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Texts -> [B, D] float32 unit-norm on the CPU, in ``batch_size`` chunks."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, not a single string")
        size = batch_size or self.text_batch_size
        if len(texts) == 0:
            return torch.empty(0, self.embedding_dim)
        # Batch texts of similar length together: each batch is padded to its longest text, so mixing short and
        # long captions wastes most of the compute (2.8x on AudioCaps, benchmarks/RESULTS.md). Rows go back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [self._embed_text_batch([texts[i] for i in order[j:j + size]]) for j in range(0, len(order), size)]
        embedded = torch.empty(len(texts), self.embedding_dim)
        embedded[torch.tensor(order)] = torch.cat(chunks)
        return embedded

    def embed_windows(self, clips: Sequence[Audio | np.ndarray], batch_size: int | None = None,
                      frames: bool = False) -> list[WindowEmbeddings]:
        """Per-window and pooled embeddings of each clip (clips are mono float32 at ``sample_rate``), and with
        ``frames`` the frame embeddings of each window too, from the same forward pass.

        Windows of all clips are batched together, so many short clips cost as few forward passes as possible.
        """
        self._check_window_config()
        per_clip: list[tuple[list[np.ndarray], list[Window]]] = []
        for clip in clips:
            if isinstance(clip, Audio) and clip.sample_rate != self.sample_rate:
                raise ValueError(f"Audio is at {clip.sample_rate} Hz but {self.name} needs {self.sample_rate} Hz; "
                                 f"load it with load_audio(..., target_sample_rate={self.sample_rate})")
            per_clip.append(split_windows(clip, self.sample_rate, window_s=self.audio_config.window_s,
                                          hop_s=self.audio_config.hop_s, last_window=self.audio_config.last_window))
        flat = [w for pieces, _ in per_clip for w in pieces]
        size = batch_size or self.batch_size
        batches = [flat[i:i + size] for i in range(0, len(flat), size)]
        frame_rows: list[torch.Tensor] = []
        if frames:
            outputs = [self._embed_window_and_frame_batch(batch) for batch in batches]
            vector_parts = [vectors for vectors, _ in outputs]
            frame_rows = [f for _, per_window in outputs for f in per_window]
        else:
            vector_parts = [self._embed_window_batch(batch) for batch in batches]
        vectors = torch.cat(vector_parts) if flat else torch.empty(0, self.embedding_dim)
        results, offset = [], 0
        for pieces, windows in per_clip:
            rows = vectors[offset:offset + len(pieces)]  # [W, D]
            clip_frames = frame_rows[offset:offset + len(pieces)] if frames else None
            offset += len(pieces)
            results.append(WindowEmbeddings(windows=windows, embeddings=rows, pooled=pool_windows(rows),
                                            frames=clip_frames))
        return results

    def embed_audio(self, clips: Sequence[Audio | np.ndarray], batch_size: int | None = None) -> torch.Tensor:
        """Clips -> [B, D] unit-norm clip embeddings (long clips: pooled over windows)."""
        if len(clips) == 0:
            return torch.empty(0, self.embedding_dim)
        return torch.stack([w.pooled for w in self.embed_windows(clips, batch_size)])

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules this backend serves with (for checks that they stay in eval mode)."""
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def _check_window_config(self) -> None:
        if self.audio_config.window_s > self.max_window_s + 1e-9:
            raise ConfigError(f"audio.window_s is {self.audio_config.window_s} s but {self.name} sees at most "
                              f"{self.max_window_s} s at once; lower audio.window_s")
