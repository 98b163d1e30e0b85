"""MS-CLAP 2022 (Microsoft CLAP, ``CLAP_weights_2022.pth``): a Cnn14 audio tower and a BERT text tower.

This is the frozen backbone of Audio-Free Prompt Tuning (AFPT; docs: audio_free_prompt_tuning.md §1.1, §1.6, §6).
The module tree re-implements ``microsoft/CLAP`` (2022 tree) so the released checkpoint's ``["model"]`` state dict
loads strictly, key for key (§6.2):

- audio (``audio_encoder.base.*``): PANNs Cnn14 at 44.1 kHz. Front end as torchlibrosa computes it: STFT as a conv1d
  with DFT kernels (periodic Hann folded in, centre/reflect padding, n_fft = window = 1024, hop 320) -> power ->
  slaney mel matrix ``melW`` (64 bins, 50-14000 Hz) -> 10·log10(max(mel, 1e-10)) -> ``bn0`` over mel bins. Then six
  conv blocks (two 3x3 conv + BN + ReLU each; 64 -> 2048 channels) with 2x2 average pooling after blocks 1-5 and
  none after block 6 (Cnn14's 1x1 pool), dropout 0.2 after each block in training mode. Mean over frequency gives
  the feature map [B, 2048, T'];
  - clip feature (MS-CLAP): max over time + mean over time -> (dropout 0.5) -> ReLU(fc1);
  - frame features (AFPT's head, §1.6): max_pool1d(3, stride 1) + avg_pool1d(3, stride 1) over time -> T'-2
    frames -> (dropout 0.5) -> ReLU(fc1) per frame. A 5-s window gives 690 log-mel frames, T' = 21, 19 frames
    (about 0.26 s apart);
  ``fc_audioset`` (AudioSet tagging) exists only so that the checkpoint's keys exist;
- text (``caption_encoder.base.*``): HF ``BertModel`` (bert-base-uncased, with its pooler, which MS-CLAP does not
  use). The sentence feature is the last hidden state of ``[CLS]``. Captions are lower-cased by the uncased
  tokenizer, truncated to 100 tokens (MS-CLAP's ``text_len``) and padded to the longest in a batch (MS-CLAP pads to
  100; with the attention mask the [CLS] state is the same up to float rounding);
- heads (``*.projection``): ``Projection``: e1 = W1·x (no bias), e2 = Dropout0.5(W2·GELU(e1)) (no bias),
  out = LayerNorm(e1 + e2); audio 2048 -> 1024, text 768 -> 1024. Outputs are L2-normalised here;
- ``logit_scale``: the checkpoint stores its log. ``MsClapBackend.logit_scale`` is exp of it clamped to [0, ln 100],
  as AFPT's ``return_temp()`` does (so 1 <= logit_scale <= 100); the raw value is ``raw_logit_scale``.

Windows: MS-CLAP 2022 was trained on 5-s clips, so ``max_window_s`` is 5 and long audio is cut into 5-s windows by
the base class. Set ``audio.window_s = 5`` (and ``audio.hop_s <= 5``) for this backend; the registry factory and
:meth:`MsClapBackend.from_checkpoint` clamp larger values to 5 s themselves and log that
(:func:`msclap_audio_config`). Windows shorter than 5 s are tiled (repeated) to 5 s and cut, as MS-CLAP's loader
does; MS-CLAP crops longer files at a random offset, which never happens here (windows are at most 5 s), so the same
audio always gives the same embedding and a window's embedding never depends on its batch-mates.

Sizes are not stored in the checkpoint: :func:`infer_msclap_config` reads them from tensor shapes (Cnn14 channel
widths, fc1/fc_audioset sizes, n_fft, mel bins, BERT vocabulary/hidden/layers/intermediate/positions/token types,
joint size), so the released model and tiny test models load with no extra settings. BERT's attention heads are not
visible in any shape: ``hidden // 64`` (12 for bert-base). Front-end rates (44.1 kHz, hop 320, 50-14000 Hz) are the
released model's; ``melW`` itself comes from the checkpoint.

Checkpoints are read with ``torch.load(weights_only=True)`` (``["model"]`` or a bare state dict) or from
``.safetensors``: nothing is unpickled. Stale ``*.position_ids`` / ``*.token_type_ids`` buffers saved by old
``transformers`` versions are dropped; everything else must match exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.clap import checkpoints
from engine.clap.base import ClapBackend, EncoderTextTower, fingerprint_tensors, l2_normalize, resolve_device
# torchlibrosa-compatible front end (STFT as conv with DFT kernels, slaney mel, power_to_db), shared with DRCap's
# CLAP. Its modules read sample_rate/n_fft/n_mels/f_min/f_max/amin from the config they get, which MsClapConfig has.
from engine.clap.drcap import _LogMel, _PowerSpectrogram
from engine.clap.tiny import UNTRAINED_MARKER
from engine.config import AudioConfig
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

AUDIO_PREFIX = "audio_encoder.base."
TEXT_PREFIX = "caption_encoder.base."
DEFAULT_TOKENIZER = "bert-base-uncased"
HUB_REPO = "microsoft/msclap"  # clap.model = "microsoft/msclap" fetches CLAP_weights_2022.pth from the hub (cache)
HUB_FILE = "CLAP_weights_2022.pth"


@dataclass(frozen=True)
class MsClapConfig:
    """Every size of MS-CLAP 2022; the defaults are the released model's (config_2022.yml, §1.1)."""

    # front end (torchlibrosa Spectrogram + LogmelFilterBank)
    sample_rate: int = 44_100
    n_fft: int = 1024  # = window size (the config's n_fft: 1028 is unused by the 2022 code)
    hop_length: int = 320
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14_000.0
    amin: float = 1e-10
    clip_s: float = 5.0  # training clip length: the longest window, and what shorter windows are tiled to
    # Cnn14
    conv_widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    out_emb: int = 2048  # fc1 width
    num_classes: int = 527  # fc_audioset (AudioSet tagging head, unused)
    # BERT (bert-base-uncased)
    text_vocab_size: int = 30_522
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_positions: int = 512
    text_type_vocab_size: int = 2
    text_pad_token_id: int = 0
    text_layer_norm_eps: float = 1e-12
    max_text_tokens: int = 100  # MS-CLAP's text_len
    # joint space
    joint_dim: int = 1024
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0  # AFPT clamps exp(logit_scale) to at most this

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_widths", tuple(int(w) for w in self.conv_widths))
        if not self.conv_widths:
            raise ValueError("Cnn14 needs at least one conv block")
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"BERT hidden size {self.text_hidden_size} is not a multiple of {self.text_heads} heads")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_s * self.sample_rate))

    @property
    def num_frames(self) -> int:
        """Frame embeddings per (tiled) window: 19 for 5 s at 44.1 kHz with hop 320."""
        frames = 1 + self.clip_samples // self.hop_length  # 690 log-mel frames
        for _ in range(len(self.conv_widths) - 1):  # 2x2 average pooling after every block but the last
            frames //= 2
        return frames - 2  # max/avg pooling with kernel 3, stride 1


# --------------------------------------------------------------------------------------------------------------------
# Cnn14 (PANNs; same module names as microsoft/CLAP's copy)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias), each followed by BatchNorm and ReLU; then average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool) if pool != (1, 1) else x


class Cnn14(nn.Module):
    """Cnn14 with its log-mel front end: waveform -> feature map [B, C, T'] -> clip or frame features."""

    def __init__(self, config: MsClapConfig) -> None:
        super().__init__()
        self.config = config
        # The front end is computed, not learned (DFT kernels, mel matrix); its construction needs real tensors, so
        # under a meta-device context (MsClapModel.empty) it is built on the CPU.
        with torch.device("cpu") if torch.empty(()).is_meta else contextlib.nullcontext():
            self.spectrogram_extractor = _PowerSpectrogram(config.n_fft, config.hop_length)
            self.logmel_extractor = _LogMel(config)  # type: ignore[arg-type]  # duck-typed: same field names
        self.bn0 = nn.BatchNorm2d(config.n_mels)
        widths = config.conv_widths
        for i, (cin, cout) in enumerate(zip((1, *widths[:-1]), widths), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(cin, cout))
        self.fc1 = nn.Linear(widths[-1], config.out_emb)
        self.fc_audioset = nn.Linear(config.out_emb, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:  # PANNs' init_layer / init_bn
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> list[ConvBlock]:
        return [getattr(self, f"conv_block{i}") for i in range(1, len(self.config.conv_widths) + 1)]

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] float32 -> [B, 1, frames, n_mels]: log-mel after ``bn0`` (frames = 1 + L // hop)."""
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))
        return self.bn0(x.transpose(1, 3)).transpose(1, 3)

    def feature_map(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, 1, frames, n_mels] -> [B, C, T']: the conv blocks, then the mean over frequency."""
        x = log_mel.to(self.fc1.weight.dtype)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            x = block(x, (2, 2) if i < len(blocks) - 1 else (1, 1))
            x = F.dropout(x, p=0.2, training=self.training)
        return x.mean(dim=3)

    def clip_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, T'] -> [B, out_emb]: max + mean over time, then ReLU(fc1) (MS-CLAP's ``embedding``)."""
        x = feature_map.max(dim=2).values + feature_map.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        return F.relu(self.fc1(x))

    def frame_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, T'] -> [B, T'-2, out_emb]: AFPT's frame head (max + avg pooling, kernel 3, stride 1; ReLU(fc1))."""
        x = F.max_pool1d(feature_map, kernel_size=3, stride=1) + F.avg_pool1d(feature_map, kernel_size=3, stride=1)
        x = F.dropout(x, p=0.5, training=self.training)
        return F.relu(self.fc1(x.transpose(1, 2)))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] -> clip features [B, out_emb]."""
        return self.clip_features(self.feature_map(self.log_mel(waveform)))


class Projection(nn.Module):
    """MS-CLAP's projection head: LayerNorm(e1 + Dropout(W2·GELU(e1))) with e1 = W1·x; no biases."""

    def __init__(self, d_in: int, d_out: int, p: float = 0.5) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.linear1(x)
        return self.layer_norm(e1 + self.drop(self.linear2(F.gelu(e1))))


class _AudioEncoder(nn.Module):
    def __init__(self, config: MsClapConfig) -> None:
        super().__init__()
        self.base = Cnn14(config)
        self.projection = Projection(config.out_emb, config.joint_dim)


class _CaptionEncoder(nn.Module):
    def __init__(self, config: MsClapConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.base = BertModel(BertConfig(
            vocab_size=config.text_vocab_size, hidden_size=config.text_hidden_size,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            intermediate_size=config.text_intermediate_size, max_position_embeddings=config.text_max_positions,
            type_vocab_size=config.text_type_vocab_size, layer_norm_eps=config.text_layer_norm_eps,
            pad_token_id=config.text_pad_token_id), add_pooling_layer=True)
        self.projection = Projection(config.text_hidden_size, config.joint_dim)


class MsClapModel(nn.Module):
    """The MS-CLAP 2022 ``CLAP`` module tree: its ``state_dict`` has the released checkpoint's keys (§6.2)."""

    def __init__(self, config: MsClapConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MsClapConfig()
        self.audio_encoder = _AudioEncoder(config)
        self.caption_encoder = _CaptionEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @classmethod
    def empty(cls, config: MsClapConfig | None = None) -> MsClapModel:
        """A model whose weights are allocated on the CPU but not initialised, to load a full state dict into.

        Random initialisation of 200 M parameters takes seconds (most of it BERT's) and is thrown away when a
        checkpoint is loaded, so the model is built on the meta device and only then given CPU memory. The front
        end (computed DFT kernels and mel matrix) and BERT's non-persistent ``position_ids`` / ``token_type_ids``
        buffers are real; every other tensor holds garbage until :func:`load_state_dict_strictly` fills it.
        """
        with torch.device("meta"):
            model = cls(config)
        for module in model.modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if any(t.is_meta for t in own):
                module.to_empty(device="cpu", recurse=False)
        embeddings = model.bert.embeddings
        with torch.no_grad():
            positions = embeddings.position_ids.shape[-1]
            embeddings.position_ids.copy_(torch.arange(positions).expand(1, -1))
            embeddings.token_type_ids.zero_()
        return model

    @property
    def cnn14(self) -> Cnn14:
        return self.audio_encoder.base

    @property
    def bert(self):
        return self.caption_encoder.base

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] equal-length waveforms -> [B, D] clip embeddings (not normalised)."""
        return self.audio_encoder.projection(self.cnn14(waveform))

    def encode_frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, T'-2, D] frame embeddings (not normalised; AFPT's ``encode_frame``)."""
        cnn = self.cnn14
        return self.audio_encoder.projection(cnn.frame_features(cnn.feature_map(cnn.log_mel(waveform))))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> [B, H]: the last hidden state of [CLS] (token types all 0)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        return hidden[:, 0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> [B, D] (not normalised)."""
        return self.caption_encoder.projection(self.text_features(input_ids, attention_mask))


# --------------------------------------------------------------------------------------------------------------------
# checkpoints: the reading and the strict load are engine.clap.checkpoints'; here are MS-CLAP's key names and words

_MODEL = "MS-CLAP"
_ARCHITECTURE = "MS-CLAP 2022 (Cnn14 audio encoder + BERT text encoder)"
_PATH_HINT = (f"clap.model must be the path of MS-CLAP's {HUB_FILE} (hub: {HUB_REPO}, `hf download {HUB_REPO} "
              f"{HUB_FILE}`), a .safetensors file of its state dict, or \"{HUB_REPO}\" to use the hub copy")


def infer_msclap_config(state_dict: Mapping[str, torch.Tensor],
                        defaults: MsClapConfig | None = None) -> MsClapConfig:
    """The sizes of the model a state dict was saved from, read from tensor shapes.

    Sizes whose tensors are missing keep the ``defaults`` (the released model's), so a damaged checkpoint still
    builds a model and the strict load then names what is missing. BERT's attention heads are ``hidden // 64``
    (bert-base: 12; at least 1, and 1 when that does not divide the hidden size).
    """
    d = defaults or MsClapConfig()
    changes: dict[str, object] = {}
    shape = partial(checkpoints.tensor_shape, state_dict)
    if (s := shape(AUDIO_PREFIX + "spectrogram_extractor.stft.conv_real.weight")) and len(s) == 3:
        changes["n_fft"] = s[2]
    if (s := shape(AUDIO_PREFIX + "logmel_extractor.melW")) and len(s) == 2:
        changes["n_mels"] = s[1]
    blocks = {int(m[1]) for key in state_dict if (m := re.match(re.escape(AUDIO_PREFIX) + r"conv_block(\d+)\.", key))}
    if blocks and min(blocks) >= 1:
        count = max(blocks)
        widths = []
        for i in range(1, count + 1):
            s = shape(f"{AUDIO_PREFIX}conv_block{i}.conv1.weight")
            widths.append(s[0] if s and len(s) == 4 else (d.conv_widths[i - 1] if i <= len(d.conv_widths) else 1))
        changes["conv_widths"] = tuple(widths)
    if (s := shape(AUDIO_PREFIX + "fc1.weight")) and len(s) == 2:
        changes["out_emb"] = s[0]
    if (s := shape(AUDIO_PREFIX + "fc_audioset.weight")) and len(s) == 2:
        changes["num_classes"] = s[0]
    if (s := shape("audio_encoder.projection.linear1.weight")) and len(s) == 2:
        changes["joint_dim"] = s[0]
    changes.update(checkpoints.infer_hf_text_sizes(state_dict, TEXT_PREFIX, d.text_hidden_size))
    return checkpoints.config_with(d, changes, f"{_MODEL} model")


def load_msclap_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an MS-CLAP state dict without unpickling anything.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``, taking the
    ``"model"`` entry of a training checkpoint (``CLAP_weights_2022.pth`` is ``{"model": state_dict, ...}``) or the
    whole file when it is a bare state dict. Stale HF buffers (``*.position_ids``, ``*.token_type_ids``) are dropped.
    """
    return checkpoints.read_state_dict(path, released_file=f"MS-CLAP's {HUB_FILE}", layout=f"as {HUB_FILE} has it")


def load_state_dict_strictly(model: MsClapModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every key; any missing or unexpected key or shape mismatch is a :class:`ModelLoadError` naming them."""
    checkpoints.load_state_dict_strictly(model, state_dict, source, architecture=_ARCHITECTURE)


def msclap_audio_config(audio: AudioConfig | None, max_window_s: float = 5.0) -> AudioConfig:
    """A copy of ``audio`` whose window and hop are at most ``max_window_s`` (MS-CLAP 2022 sees 5 s at once).

    The application default window is 10 s (LAION-CLAP's); MS-CLAP was trained on 5-s clips, so a larger window is
    lowered to 5 s (and the hop to at most 5 s) with a log message instead of failing on the first clip.
    """
    audio = audio or AudioConfig(window_s=max_window_s, hop_s=max_window_s)
    if audio.window_s <= max_window_s + 1e-9:
        return replace(audio)
    clamped = replace(audio, window_s=max_window_s, hop_s=min(audio.hop_s, max_window_s))
    log.info("MS-CLAP sees at most %.1f s of audio at once: audio.window_s %.1f -> %.1f s, audio.hop_s %.1f -> %.1f s "
             "(set audio.window_s = 5 for this backend to silence this)", max_window_s, audio.window_s,
             clamped.window_s, audio.hop_s, clamped.hop_s)
    return clamped


# --------------------------------------------------------------------------------------------------------------------
# the backend


class MsClapBackend(ClapBackend):
    """MS-CLAP 2022 behind the :class:`ClapBackend` interface, with frame embeddings and a text tower (AFPT)."""

    def __init__(self, model: MsClapModel, tokenizer, *, name: str, audio_config: AudioConfig | None = None,
                 device: torch.device | str = "cpu", fp16: bool = False, batch_size: int = 16,
                 text_batch_size: int = 256, max_text_tokens: int | None = None, is_untrained: bool = False) -> None:
        config = model.config
        super().__init__(msclap_audio_config(audio_config, config.clip_s), batch_size, text_batch_size)
        device = torch.device(device)
        # Taken from the float32 CPU weights before any cast, so the same on every device and dtype.
        audio_head, text_head = model.audio_encoder.projection, model.caption_encoder.projection
        self.fingerprint = fingerprint_tensors(
            [audio_head.linear1.weight, audio_head.linear2.weight, text_head.linear1.weight,
             text_head.linear2.weight, model.logit_scale], type(model).__name__)
        if getattr(tokenizer, "cls_token_id", None) is None:
            raise ModelLoadError(f"The tokenizer for {name} has no [CLS] token; MS-CLAP's text tower needs a BERT "
                                 "tokenizer (clap.tokenizer, e.g. bert-base-uncased)")
        if len(tokenizer) > config.text_vocab_size:
            raise ModelLoadError(f"The tokenizer has {len(tokenizer)} tokens but the BERT text tower of {name} only "
                                 f"{config.text_vocab_size}; clap.tokenizer names the wrong tokenizer")
        self.config = config
        self.raw_logit_scale = float(model.logit_scale.detach().float())
        # AFPT's return_temp(): logit_scale.clamp_(0, ln 100).exp(), so 1 <= logit_scale <= 100.
        self.logit_scale = math.exp(min(max(self.raw_logit_scale, 0.0), math.log(config.logit_scale_max)))
        self.dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
        self.model = model.to(device=device).eval()
        if self.dtype != torch.float32:
            # The front end (STFT kernels, melW, bn0) stays float32: STFT powers reach ~(n_fft/2)² = 2.6e5, beyond
            # float16's 65504, and casting the kernels down and back would round them.
            cnn = self.model.cnn14
            for module in (*cnn.blocks, cnn.fc1, cnn.fc_audioset, self.model.audio_encoder.projection,
                           self.model.caption_encoder):
                module.to(self.dtype)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.is_untrained = is_untrained
        self.sample_rate = config.sample_rate
        self.max_window_s = config.clip_s
        self.embedding_dim = config.joint_dim
        self.max_text_tokens = min(max_text_tokens or config.max_text_tokens, config.text_max_positions)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, tokenizer=DEFAULT_TOKENIZER, device: str = "auto",
                        fp16: bool = True, audio_config: AudioConfig | None = None, batch_size: int = 16,
                        text_batch_size: int = 256, model_config: MsClapConfig | None = None,
                        max_text_tokens: int | None = None) -> MsClapBackend:
        """Load ``CLAP_weights_2022.pth`` (or a ``.safetensors`` of its state dict) and a BERT tokenizer.

        ``path`` may also be ``"microsoft/msclap"``: the 2022 weights from the Hugging Face hub (or its cache).
        ``tokenizer`` is a hub id, a local folder or a tokenizer object; empty means bert-base-uncased. Sizes are
        read from the checkpoint (:func:`infer_msclap_config`) unless ``model_config`` is given. ``audio_config``
        windows longer than 5 s are lowered to 5 s (:func:`msclap_audio_config`).
        """
        torch_device = resolve_device(device)
        checkpoint = _checkpoint_file(path)
        state_dict = load_msclap_state_dict(checkpoint)
        config = model_config or infer_msclap_config(state_dict)
        model = MsClapModel.empty(config)  # uninitialised: the strict load below fills every weight
        load_state_dict_strictly(model, state_dict, str(checkpoint))
        tokenizer_object, tokenizer_name = checkpoints.resolve_tokenizer(
            tokenizer, default=DEFAULT_TOKENIZER, model=_MODEL, kind="the bert-base-uncased tokenizer")
        backend = cls(model, tokenizer_object, name=str(checkpoint), audio_config=audio_config,
                      device=torch_device, fp16=fp16, batch_size=batch_size, text_batch_size=text_batch_size,
                      max_text_tokens=max_text_tokens,
                      is_untrained=(checkpoint.parent / UNTRAINED_MARKER).is_file())
        log.info("Loaded CLAP %s (tokenizer %s, logit scale %.2f)", backend.describe(), tokenizer_name,
                 backend.logit_scale)
        return backend

    # --- audio ---------------------------------------------------------------------------------------------------

    def prepare_windows(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows -> [B, 5 s of samples] float32 on the device: shorter windows tiled (repeated) and cut to 5 s.

        MS-CLAP's loader repeats a short clip ceil(5 s / length) times and keeps the first 5 s; the same here, for
        each window on its own, so a window's input never depends on the other windows of its batch.
        """
        target = self.config.clip_samples
        rows = []
        for window in windows:
            samples = np.asarray(window, dtype=np.float32).reshape(-1)
            if samples.size == 0:
                raise ValueError("an audio window holds no samples")
            if samples.size > target:
                raise ValueError(f"a window of {samples.size / self.sample_rate:.2f} s is longer than the "
                                 f"{self.max_window_s} s {self.name} sees at once")
            if samples.size < target:
                samples = np.tile(samples, -(-target // samples.size))[:target]
            rows.append(samples)
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def _feature_map(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        cnn = self.model.cnn14
        return cnn.feature_map(cnn.log_mel(self.prepare_windows(windows)))  # [B, C, T']

    @torch.inference_mode()
    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        features = self.model.cnn14.clip_features(self._feature_map(windows))
        return l2_normalize(self.model.audio_encoder.projection(features)).cpu()  # [B, D]

    @torch.inference_mode()
    def _embed_window_and_frame_batch(self, windows: Sequence[np.ndarray]
                                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """AFPT's frame embeddings: 19 per 5-s window (each about 0.26 s of the tiled window), unit-norm; the window
        embedding from the same feature map."""
        feature_map = self._feature_map(windows)
        projection = self.model.audio_encoder.projection
        clips = l2_normalize(projection(self.model.cnn14.clip_features(feature_map))).cpu()  # [B, D]
        frames = self.model.cnn14.frame_features(feature_map)  # [B, T, out_emb]
        return clips, list(l2_normalize(projection(frames)).cpu())

    # --- text ----------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_length: int | None = None, pad_to_max: bool = False):
        """Texts -> BERT ids ([CLS] ... [SEP]), lower-cased by the uncased tokenizer, truncated to 100 tokens."""
        return self.tokenizer(list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
                              max_length=max_length or self.max_text_tokens, return_tensors="pt")

    @torch.inference_mode()
    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        embeddings = self.model.encode_text(tokens["input_ids"].to(self.device),
                                            tokens["attention_mask"].to(self.device))
        return l2_normalize(embeddings).cpu()

    def text_tower(self) -> EncoderTextTower:
        """BERT + the caption projection; sentence feature = the [CLS] state (MS-CLAP does not use BERT's pooler)."""
        encoder = self.model.caption_encoder
        return EncoderTextTower(self.tokenizer, encoder.base, encoder.projection, self.device)


def _checkpoint_file(path: str | os.PathLike) -> Path:
    if str(path) == HUB_REPO:  # the released weights from the hub (or its cache)
        return _hub_checkpoint()
    return checkpoints.checkpoint_file(path, model=_MODEL, hint=_PATH_HINT)


def _hub_checkpoint() -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_REPO, HUB_FILE))
    except Exception as e:  # noqa: BLE001 - offline, not cached, hub unreachable
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
                 else "the hub could not be reached")
        raise ModelLoadError(
            f"Could not get {HUB_FILE} from {HUB_REPO} ({where}; {type(e).__name__}: {e}). Download it once where "
            f"there is internet (`hf download {HUB_REPO} {HUB_FILE}`) and set clap.model to the file.") from e


# --------------------------------------------------------------------------------------------------------------------
# a tiny random model, for tests and offline development

_TINY_CORPUS_LINES = 2000


def train_bert_tokenizer(lines: Sequence[str] | None = None, vocab_size: int = 1000):
    """A lower-casing BERT WordPiece tokenizer trained on captions (the first 2,000 shipped AudioCaps captions)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer  # tokenizers-backed in transformers 5

    if lines is None:
        corpus = Path(__file__).resolve().parents[2] / "assets" / "captions" / "audiocaps_train.txt"
        lines = corpus.read_text(encoding="utf-8").splitlines()[:_TINY_CORPUS_LINES]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator([line for line in lines if line.strip()], vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                  show_progress=False)
    vocab = dict(sorted(wordpiece.get_vocab().items(), key=lambda item: item[1]))
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)


def tiny_msclap_config(vocab_size: int) -> MsClapConfig:
    """Small sizes that keep every code path of the released model: the full 44.1-kHz front end, six conv blocks
    (so 5 s still gives 19 frames), BERT with 2 layers and 1 head, 16-d joint space."""
    return MsClapConfig(conv_widths=(4, 8, 8, 16, 16, 32), out_emb=32, num_classes=5, text_vocab_size=vocab_size,
                        text_hidden_size=32, text_layers=2, text_heads=1, text_intermediate_size=64,
                        text_max_positions=128, joint_dim=16)


def make_tiny_msclap_model(seed: int = 0, vocab_size: int | None = None) -> MsClapModel:
    """A tiny random :class:`MsClapModel` (deterministic for a seed), sized for the tiny BERT tokenizer."""
    if vocab_size is None:
        vocab_size = len(train_bert_tokenizer())
    torch.manual_seed(seed)
    model = MsClapModel(tiny_msclap_config(vocab_size)).eval()
    with torch.no_grad():
        # plausible normalisation statistics for log-mels (dB) instead of mean 0, variance 1
        model.cnn14.bn0.running_mean.fill_(-20.0)
        model.cnn14.bn0.running_var.fill_(400.0)
        # Wider random matrices than the training initialisation spread the embeddings, so tests can tell inputs
        # apart (as for the other tiny CLAPs). Still random weights.
        for module, std in ((model.caption_encoder.base, 0.3), (model.caption_encoder.projection, 0.3),
                            (model.audio_encoder.projection, 0.3)):
            for parameter in module.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, std)
    return model


def build_tiny_msclap(directory: str | os.PathLike, seed: int = 0, *, safetensors: bool = False
                      ) -> tuple[Path, Path]:
    """Write a tiny random MS-CLAP in the released layout and a tiny BERT tokenizer folder.

    Returns ``(checkpoint, tokenizer_dir)``: ``directory/CLAP_weights_2022.pth`` holding ``{"model": state_dict}``
    (or ``directory/model.safetensors``) and ``directory/tokenizer``. The folder carries the untrained marker, so the
    backend loaded from it reports ``is_untrained``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bert_tokenizer()
    tokenizer_dir = directory / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    checkpoint = checkpoints.write_untrained_checkpoint(
        directory, make_tiny_msclap_model(seed, len(tokenizer)).state_dict(), released_file=HUB_FILE,
        safetensors=safetensors, seed=seed, what="randomly initialised tiny MS-CLAP 2022; embeddings carry no meaning")
    return checkpoint, tokenizer_dir


__all__ = ["Cnn14", "ConvBlock", "MsClapBackend", "MsClapConfig", "MsClapModel", "Projection",
           "build_tiny_msclap", "infer_msclap_config", "load_msclap_state_dict", "load_state_dict_strictly",
           "make_tiny_msclap_model", "msclap_audio_config", "tiny_msclap_config", "train_bert_tokenizer"]
