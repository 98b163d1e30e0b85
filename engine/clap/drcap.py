"""DRCap's own CLAP: the WavCaps-style "ASE" model (HTSAT-Swin audio tower + RoBERTa text tower).

DRCap (X-LANCE/SLAM-LLM ``examples/drcap_zeroshot_aac``) decodes captions from the embeddings of a CLAP trained with
the WavCaps retrieval code. This module re-implements that model so its released checkpoint (``best_model.pt``,
``ckpt["model"]``) loads strictly, key for key (docs: drcap.md §1.2 and §8):

- audio (``audio_encoder.audio_enc.*``): 32-kHz waveform -> STFT as a conv1d with DFT kernels (Hann window folded in,
  centre/reflect padding, n_fft 1024, hop 320) -> power -> slaney mel matrix (64 bins, 50-14000 Hz) -> 10·log10 with
  amin 1e-6 -> ``bn0`` over mel bins -> bicubic stretch of the time axis to 1024 frames -> fold 1024x64 into a
  256x256 image (4 time chunks stacked along frequency) -> HTSAT-Swin (96-d patches, depths 2/2/6/2, window 8) ->
  final 8x8 map read as 2 frequency groups x 32 time steps; mean over the groups gives 32 frame features (768-d);
  their mean is the clip feature;
- text (``text_encoder.text_encoder.*``): ``RobertaModel`` without pooler; the feature is the hidden state of ``<s>``;
  captions raw, padded to the longest, truncated to 30 tokens;
- heads: ``audio_proj`` / ``text_proj`` = Linear(768,1024) -> ReLU -> Linear(1024,1024), outputs L2-normalised;
  ``temp`` is the learned contrastive temperature (logits = cos / temp), which DRCap also uses as its
  projection-decoding temperature τ.

The Swin blocks are written here rather than borrowed from ``transformers`` (``ClapAudioEncoder``): HF's version
splits q/k/v into three linears, computes shift masks on the fly instead of storing ``attn_mask`` buffers and names
every module differently, so a converter would have to rewrite most keys both ways. Own blocks keep the state dict
identical to the released one and a strict ``load_state_dict`` is the check.

Sizes are not stored in the checkpoint. :func:`infer_drcap_config` reads them from tensor shapes (widths, depths,
heads, window, classes, joint size, RoBERTa sizes), so the released model and tiny test models load with no extra
settings. The one size shapes do not reveal is the number of RoBERTa attention heads: it is taken as
``hidden // 64`` (12 for roberta-base; the convention of the BERT family), or the default when the hidden size is the
default; pass ``model_config`` to :meth:`DrcapClapBackend.from_checkpoint` to override everything.

Differences from the released inference code, on purpose:
- every window is stretched to 1024 frames on its own. The SLAM-LLM collator zero-pads the waveforms of a batch to
  the longest one before the stretch, so a short clip's embedding depends on its batch-mates (drcap.md §7). Here a
  window's embedding does not depend on the batch it is in;
- windows shorter than n_fft/2 + 1 samples (16 ms) are zero-padded to that length, because reflect padding needs at
  least that much signal (the released code raises an error);
- inference only: no SpecAugment (training-time augmentation); stochastic depth exists but is off in eval mode.

Checkpoints are read with ``torch.load(weights_only=True)`` or from ``.safetensors``: nothing is unpickled.
:func:`convert_checkpoint_to_safetensors` converts a file that holds pickled objects, for users who trust it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.clap import checkpoints
from engine.clap.base import ClapBackend, EncoderTextTower, fingerprint_tensors, l2_normalize, resolve_device
from engine.clap.checkpoints import STALE_BUFFER_SUFFIXES  # noqa: F401 - re-exported: it used to live here
from engine.clap.tiny import UNTRAINED_MARKER
from engine.config import AudioConfig
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

AUDIO_PREFIX = "audio_encoder.audio_enc."
TEXT_PREFIX = "text_encoder.text_encoder."
DEFAULT_TOKENIZER = "roberta-base"


@dataclass(frozen=True)
class DrcapClapConfig:
    """Every size of the DRCap CLAP; the defaults are the released model's (drcap.md §1.2)."""

    # front end
    sample_rate: int = 32_000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14_000.0
    amin: float = 1e-6
    max_window_s: float = 10.0  # the released loaders read the first 10 s of each file
    # HTSAT-Swin
    spec_size: int = 256  # the Swin input image is spec_size x spec_size; it holds spec_size * freq_ratio frames
    patch_size: int = 4  # patch = stride
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 527  # the unused AudioSet heads tscam_conv / head (kept so the checkpoint's keys exist)
    drop_path_rate: float = 0.1  # training only
    # RoBERTa text tower (roberta-base)
    text_vocab_size: int = 50_265
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_positions: int = 514
    text_type_vocab_size: int = 1
    text_pad_token_id: int = 1
    text_layer_norm_eps: float = 1e-5
    max_text_tokens: int = 30
    # joint space
    joint_dim: int = 1024
    temp_init: float = 0.07

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.n_mels  # 4: time chunks stacked along frequency

    @property
    def target_frames(self) -> int:
        return self.spec_size * self.freq_ratio  # 1024 log-mel frames fill the image

    @property
    def audio_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)  # 768

    @property
    def num_frames(self) -> int:
        """Frame features per window (32): the time positions of the final Swin map."""
        final = self.spec_size // self.patch_size // 2 ** (len(self.depths) - 1)  # 8
        return final * self.freq_ratio

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads {self.num_heads} needs one entry per stage of depths {self.depths}")
        if self.spec_size % self.n_mels or self.freq_ratio < 1:
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of n_mels {self.n_mels}")
        final = self.spec_size // self.patch_size // 2 ** (len(self.depths) - 1)
        if final < self.freq_ratio or final % self.freq_ratio:
            raise ValueError(f"the final Swin map ({final}x{final}) must split into {self.freq_ratio} time chunks")


# --------------------------------------------------------------------------------------------------------------------
# front end (torchlibrosa's Spectrogram + LogmelFilterBank, same parameter names)


def stft_kernels(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary DFT kernels times a periodic Hann window, each [n_fft/2+1, 1, n_fft] (torchlibrosa's)."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    # (k*n) mod n_fft keeps the angle small, so cos/sin are exact to float64 rounding for every bin.
    angle = 2 * math.pi * torch.remainder(k[:, None] * n[None, :], n_fft) / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    real = torch.cos(angle) * window
    imag = -torch.sin(angle) * window
    return real[:, None, :].float(), imag[:, None, :].float()


def slaney_mel_matrix(config: DrcapClapConfig) -> torch.Tensor:
    """[n_fft/2+1, n_mels]: librosa's default mel filterbank (slaney scale, slaney area normalisation)."""
    import torchaudio

    return torchaudio.functional.melscale_fbanks(
        n_freqs=config.n_fft // 2 + 1, f_min=config.f_min, f_max=config.f_max, n_mels=config.n_mels,
        sample_rate=config.sample_rate, norm="slaney", mel_scale="slaney")


class _ConvSTFT(nn.Module):
    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, kernel_size=n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, kernel_size=n_fft, stride=hop_length, bias=False)
        real, imag = stft_kernels(n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(real)
            self.conv_imag.weight.copy_(imag)
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] -> real, imag [B, bins, frames] with frames = 1 + L // hop (centred frames, reflect padding)."""
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x), self.conv_imag(x)


class _PowerSpectrogram(nn.Module):
    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.stft = _ConvSTFT(n_fft, hop_length)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(waveform)
        return (real ** 2 + imag ** 2).transpose(1, 2)[:, None]  # [B, 1, frames, bins]


class _LogMel(nn.Module):
    def __init__(self, config: DrcapClapConfig) -> None:
        super().__init__()
        self.amin = config.amin
        self.melW = nn.Parameter(slaney_mel_matrix(config), requires_grad=False)  # [bins, n_mels]

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melW)
        # torchlibrosa's power_to_db with ref 1.0 (so the reference term is 0) and top_db None
        return 10.0 * torch.log10(torch.clamp(mel, min=self.amin)) - 10.0 * math.log10(max(self.amin, 1.0))


class _AudioFeature(nn.Module):
    def __init__(self, config: DrcapClapConfig) -> None:
        super().__init__()
        self.mel_trans = _PowerSpectrogram(config.n_fft, config.hop_length)
        self.log_trans = _LogMel(config)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.log_trans(self.mel_trans(waveform))  # [B, 1, frames, n_mels]


# --------------------------------------------------------------------------------------------------------------------
# HTSAT-Swin (Ke Chen's HTS-AT as in WavCaps; re-implemented, same module names)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window*window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, window*window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_position_index(window: int) -> torch.Tensor:
    """[window², window²]: row into the (2w-1)² bias table for each pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2], >= 0
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def _shift_attention_mask(resolution: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """[nW, window², window²]: 0 inside a region of the cyclically shifted map, -100 across regions."""
    h, w = resolution
    regions = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, rows, cols, :] = label
            label += 1
    ids = _window_partition(regions, window).squeeze(-1)  # [nW, N]
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class _DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample while training; the identity in eval mode."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B*nW, N, C]; mask [nW, N, N] (0 / -100) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(bw // windows, windows, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.heads, n, n)
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], heads: int, window: int, shift: int,
                 mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        if min(resolution) <= window:  # the whole map fits in one window: no partition, no shift (last stage)
            window, shift = min(resolution), 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        # A None buffer is not saved, as in the released model: masks exist only for shifted blocks.
        self.register_buffer("attn_mask", _shift_attention_mask(resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_window_partition(y, self.window), self.attn_mask)
        y = _window_reverse(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _PatchMerging(nn.Module):
    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        # the order of the four sub-grids is part of the weights' meaning
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, heads: int, window: int,
                 mlp_ratio: float, drop_paths: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            _SwinBlock(dim, resolution, heads, window, shift=0 if i % 2 == 0 else window // 2,
                       mlp_ratio=mlp_ratio, drop_path=drop_paths[i])
            for i in range(depth)])
        self.downsample = _PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))  # [B, H*W, C], row-major


class HtsatSwin(nn.Module):
    """HTSAT-Swin audio encoder with its log-mel front end: waveform -> fine-grained frame features [B, 32, 768]."""

    def __init__(self, config: DrcapClapConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_feats_extractor = _AudioFeature(config)
        self.bn0 = nn.BatchNorm2d(config.n_mels)
        self.patch_embed = _PatchEmbed(config.patch_size, config.embed_dim)
        grid = config.spec_size // config.patch_size
        drop_paths = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
            start = sum(config.depths[:i])
            self.layers.append(_SwinStage(
                config.embed_dim * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depth, heads, config.window_size,
                config.mlp_ratio, drop_paths[start:start + depth], downsample=i < len(config.depths) - 1))
        width = config.audio_width
        self.norm = nn.LayerNorm(width)
        # AudioSet tagging heads of HTS-AT: unused for embeddings, present so that the checkpoint's keys exist.
        final = grid // 2 ** (len(config.depths) - 1)
        self.tscam_conv = nn.Conv2d(width, config.num_classes, kernel_size=(final // config.freq_ratio, 3),
                                    padding=(0, 1))
        self.head = nn.Linear(config.num_classes, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:  # HTS-AT's: truncated normal linears, unit LayerNorms
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, _WindowAttention):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] float32 -> [B, 1, frames, n_mels]: log-mel after ``bn0`` (frames = 1 + L // hop)."""
        x = self.audio_feats_extractor(waveform)
        return self.bn0(x.transpose(1, 3)).transpose(1, 3)

    def stretch(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> [B, 1, 1024, F]: bicubic stretch (align_corners) of shorter inputs, as HTS-AT does.

        Each row is interpolated on its own, so stretching a batch equals stretching its rows one by one.
        """
        _, _, frames, mels = log_mel.shape
        target_t, target_f = self.config.target_frames, self.config.spec_size // self.config.freq_ratio
        if frames > target_t or mels > target_f:
            raise ValueError(f"a log-mel of {frames}x{mels} does not fit the {target_t}x{target_f} the model sees; "
                             f"windows must be at most {self.config.max_window_s} s")
        if frames < target_t or mels < target_f:
            log_mel = F.interpolate(log_mel, size=(target_t, target_f), mode="bicubic", align_corners=True)
        return log_mel

    def fold(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, 1, 1024, 64] -> [B, 1, 256, 256]: 4 consecutive 256-frame chunks stacked along frequency.

        Image row = chunk * 64 + mel bin, image column = frame within the chunk.
        """
        b, c, frames, mels = log_mel.shape
        ratio = self.config.freq_ratio
        x = log_mel.transpose(2, 3).reshape(b, c, mels, ratio, frames // ratio)  # [B, 1, F, chunk, t]
        return x.permute(0, 1, 3, 2, 4).reshape(b, c, ratio * mels, frames // ratio)

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1, 256, 256] -> fine-grained frame features [B, 32, 768] in time order."""
        x = self.patch_embed(image.to(self.patch_embed.proj.weight.dtype))
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        b, n, c = x.shape
        side = int(math.isqrt(n))  # 8: rows = chunk * groups + frequency group, columns = time within the chunk
        ratio = self.config.freq_ratio
        groups = side // ratio  # 2 frequency groups per chunk
        x = x.transpose(1, 2).reshape(b, c, ratio, groups, side)  # [B, C, chunk, group, t]
        x = x.permute(0, 1, 3, 2, 4).reshape(b, c, groups, ratio * side)  # [B, C, group, chunk * side + t]
        return x.mean(dim=2).transpose(1, 2)  # [B, 32, C]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] equal-length waveforms -> [B, 32, 768] (the released ``fine_grained_embedding``)."""
        return self.forward_image(self.fold(self.stretch(self.log_mel(waveform))))


# --------------------------------------------------------------------------------------------------------------------
# the ASE model


class _AudioEncoder(nn.Module):
    def __init__(self, config: DrcapClapConfig) -> None:
        super().__init__()
        self.audio_enc = HtsatSwin(config)


class _TextEncoder(nn.Module):
    def __init__(self, config: DrcapClapConfig) -> None:
        super().__init__()
        from transformers import RobertaConfig, RobertaModel

        self.text_encoder = RobertaModel(RobertaConfig(
            vocab_size=config.text_vocab_size, hidden_size=config.text_hidden_size,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            intermediate_size=config.text_intermediate_size, max_position_embeddings=config.text_max_positions,
            type_vocab_size=config.text_type_vocab_size, layer_norm_eps=config.text_layer_norm_eps,
            pad_token_id=config.text_pad_token_id, bos_token_id=0, eos_token_id=2), add_pooling_layer=False)


def _head(width: int, joint: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, joint), nn.ReLU(), nn.Linear(joint, joint))


class DrcapClapModel(nn.Module):
    """The WavCaps/DRCap ``ASE`` module tree: its ``state_dict`` has the released checkpoint's keys."""

    def __init__(self, config: DrcapClapConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DrcapClapConfig()
        self.audio_encoder = _AudioEncoder(config)
        self.text_encoder = _TextEncoder(config)
        self.audio_proj = _head(config.audio_width, config.joint_dim)
        self.text_proj = _head(config.text_hidden_size, config.joint_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))

    @property
    def htsat(self) -> HtsatSwin:
        return self.audio_encoder.audio_enc

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, L] equal-length waveforms -> [B, D] unit-norm (ASE.encode_audio without projection decoding)."""
        return F.normalize(self.audio_proj(self.htsat(waveform).mean(dim=1)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> [B, hidden]: the last hidden state of ``<s>`` (before the projection)."""
        hidden = self.text_encoder.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return hidden[:, 0, :]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> [B, D] unit-norm (ASE.encode_text)."""
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# checkpoints: the reading and the strict load are engine.clap.checkpoints'; here are DRCap's key names and words

_MODEL = "DRCap CLAP"
_RELEASED_FILE = "a DRCap/WavCaps best_model.pt"
_LAYOUT = "as WavCaps/DRCap save it"
_ARCHITECTURE = "the DRCap CLAP (WavCaps ASE: HTSAT audio encoder + RoBERTa text encoder)"
_PATH_HINT = ("clap.model must be the path of DRCap's CLAP checkpoint file (best_model.pt from the DRCap release, or "
              "a .safetensors file made by convert_checkpoint_to_safetensors)")


def infer_drcap_config(state_dict: Mapping[str, torch.Tensor],
                       defaults: DrcapClapConfig | None = None) -> DrcapClapConfig:
    """The sizes of the model a state dict was saved from, read from tensor shapes.

    Sizes whose tensors are missing keep the ``defaults`` (the released model's), so a damaged checkpoint still
    builds a model and the strict load then names what is missing. Read from shapes: n_fft (STFT kernels), n_mels
    (melW), patch size and embed_dim (patch_embed), depths (blocks per stage), heads per stage and window size (the
    relative position bias tables), mlp_ratio (fc1), num_classes (head), joint_dim (audio_proj.2), and RoBERTa's
    vocabulary, hidden size, layers, intermediate size, positions and token types. RoBERTa's attention heads are not
    visible in any shape: ``hidden // 64`` (roberta-base: 12), or the default for the default hidden size.
    """
    d = defaults or DrcapClapConfig()
    changes: dict[str, object] = {}
    shape = partial(checkpoints.tensor_shape, state_dict)
    if (s := shape(AUDIO_PREFIX + "audio_feats_extractor.mel_trans.stft.conv_real.weight")) and len(s) == 3:
        changes["n_fft"] = s[2]
    if (s := shape(AUDIO_PREFIX + "audio_feats_extractor.log_trans.melW")) and len(s) == 2:
        changes["n_mels"] = s[1]
    if (s := shape(AUDIO_PREFIX + "patch_embed.proj.weight")) and len(s) == 4:
        changes["embed_dim"], changes["patch_size"] = s[0], s[3]
    embed_dim = int(changes.get("embed_dim", d.embed_dim))
    blocks: dict[int, int] = {}
    for key in state_dict:
        if match := re.match(re.escape(AUDIO_PREFIX) + r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if blocks:
        stages = max(blocks) + 1
        changes["depths"] = tuple(blocks.get(i, d.depths[i] if i < len(d.depths) else 1) for i in range(stages))
        heads = []
        for i in range(stages):
            s = shape(f"{AUDIO_PREFIX}layers.{i}.blocks.0.attn.relative_position_bias_table")
            heads.append(s[1] if s and len(s) == 2 else (d.num_heads[i] if i < len(d.num_heads) else 1))
        changes["num_heads"] = tuple(heads)
    if (s := shape(f"{AUDIO_PREFIX}layers.0.blocks.0.attn.relative_position_bias_table")) and len(s) == 2:
        side = math.isqrt(s[0])
        if side * side == s[0] and side % 2 == 1:
            changes["window_size"] = (side + 1) // 2
    if (s := shape(f"{AUDIO_PREFIX}layers.0.blocks.0.mlp.fc1.weight")) and len(s) == 2 and embed_dim:
        changes["mlp_ratio"] = s[0] / embed_dim
    if (s := shape(AUDIO_PREFIX + "head.weight")) and len(s) == 2:
        changes["num_classes"] = s[0]
    if (s := shape("audio_proj.2.weight")) and len(s) == 2:
        changes["joint_dim"] = s[0]
    changes.update(checkpoints.infer_hf_text_sizes(state_dict, TEXT_PREFIX, d.text_hidden_size))
    return checkpoints.config_with(d, changes, _MODEL)


def load_drcap_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a DRCap CLAP state dict without unpickling anything.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``, taking the
    ``"model"`` entry of a WavCaps-style training checkpoint (``{"model": ..., "epoch": ..., ...}``) or the whole
    file when it is a bare state dict. Stale HF buffers (``*.position_ids``, ``*.token_type_ids``) are dropped.
    """
    return checkpoints.read_state_dict(path, released_file=_RELEASED_FILE, layout=_LAYOUT)


def convert_checkpoint_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a pickled DRCap/WavCaps checkpoint to ``.safetensors`` (only the model's tensors are kept).

    This TRUSTS ``src``: it is read with ``torch.load(weights_only=False)``, which unpickles it and can run any code
    the file contains. Run it once, knowingly, on a file from a source you trust; AudioScribe itself never does.
    """
    from safetensors.torch import save_file

    obj = torch.load(Path(src), map_location="cpu", weights_only=False)
    state_dict = checkpoints.state_dict_from(obj, Path(src), layout=_LAYOUT)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}, str(dst))
    return dst


def load_state_dict_strictly(model: DrcapClapModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every key; any missing or unexpected key or shape mismatch is a :class:`ModelLoadError` that names them."""
    checkpoints.load_state_dict_strictly(model, state_dict, source, architecture=_ARCHITECTURE)


# --------------------------------------------------------------------------------------------------------------------
# the backend


class DrcapClapBackend(ClapBackend):
    """DRCap's CLAP behind the :class:`ClapBackend` interface (plus frame-level audio embeddings)."""

    def __init__(self, model: DrcapClapModel, tokenizer, *, name: str, audio_config: AudioConfig,
                 device: torch.device, fp16: bool, batch_size: int, text_batch_size: int,
                 max_text_tokens: int | None = None, is_untrained: bool = False) -> None:
        super().__init__(audio_config, batch_size, text_batch_size)
        config = model.config
        # Taken from the float32 CPU weights before any cast, so the same on every device and dtype.
        self.fingerprint = fingerprint_tensors(
            [model.audio_proj[0].weight, model.audio_proj[2].weight, model.text_proj[0].weight,
             model.text_proj[2].weight, model.temp], type(model).__name__)
        self.temp = float(model.temp.detach().float())
        if not self.temp > 0:
            raise ModelLoadError(f"{name}: the CLAP temperature 'temp' is {self.temp}; it must be positive")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id != config.text_pad_token_id:
            raise ModelLoadError(f"The tokenizer pads with id {pad_id} but the RoBERTa text tower of {name} pads with "
                                 f"{config.text_pad_token_id}; use a RoBERTa tokenizer (clap.tokenizer)")
        if len(tokenizer) > config.text_vocab_size:
            raise ModelLoadError(f"The tokenizer has {len(tokenizer)} tokens but the text tower of {name} only "
                                 f"{config.text_vocab_size}; clap.tokenizer names the wrong tokenizer")
        self.config = config
        self.dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        # The front end stays float32: STFT powers reach ~(n_fft/2)² = 2.6e5, beyond float16's 65504.
        self.model.htsat.audio_feats_extractor.float()
        self.model.htsat.bn0.float()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.is_untrained = is_untrained
        self.sample_rate = config.sample_rate
        self.max_window_s = config.max_window_s
        self.embedding_dim = config.joint_dim
        self.logit_scale = 1.0 / self.temp  # logits = cos / temp
        # RoBERTa positions start after the padding index, hence the 2 positions fewer than the table has.
        self.max_text_tokens = min(max_text_tokens or config.max_text_tokens, config.text_max_positions - 2)

    @property
    def temperature(self) -> float:
        """The learned ``temp`` exactly (DRCap's projection-decoding τ); ``logit_scale`` is its inverse."""
        return self.temp

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, tokenizer=DEFAULT_TOKENIZER, device: str = "auto",
                        fp16: bool = True, audio_config: AudioConfig | None = None, batch_size: int = 16,
                        text_batch_size: int = 256, model_config: DrcapClapConfig | None = None,
                        max_text_tokens: int | None = None) -> DrcapClapBackend:
        """Load a DRCap CLAP checkpoint (``best_model.pt``-style or ``.safetensors``) and its RoBERTa tokenizer.

        ``tokenizer`` is a hub id, a local folder or a tokenizer object; empty means roberta-base. Sizes are read
        from the checkpoint (:func:`infer_drcap_config`) unless ``model_config`` is given.
        """
        torch_device = resolve_device(device)
        checkpoint = checkpoints.checkpoint_file(path, model=_MODEL, hint=_PATH_HINT)
        state_dict = load_drcap_state_dict(checkpoint)
        config = model_config or infer_drcap_config(state_dict)
        model = DrcapClapModel(config)
        load_state_dict_strictly(model, state_dict, str(checkpoint))
        tokenizer_object, tokenizer_name = checkpoints.resolve_tokenizer(
            tokenizer, default=DEFAULT_TOKENIZER, model=_MODEL, kind="a RoBERTa tokenizer")
        backend = cls(model, tokenizer_object, name=str(checkpoint), audio_config=audio_config or AudioConfig(),
                      device=torch_device, fp16=fp16, batch_size=batch_size, text_batch_size=text_batch_size,
                      max_text_tokens=max_text_tokens,
                      is_untrained=(checkpoint.parent / UNTRAINED_MARKER).is_file())
        log.info("Loaded CLAP %s (tokenizer %s, temp %.4f)", backend.describe(), tokenizer_name, backend.temp)
        return backend

    # --- audio ---------------------------------------------------------------------------------------------------

    def prepare_windows(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows -> [B, 1, 1024, n_mels] float32 on the device: log-mel after bn0, each stretched on its own.

        The released collator zero-pads the waveforms of a batch to the longest before the stretch, so there a
        clip's embedding depends on its batch-mates. Here each window's log-mel is computed from its own samples
        and stretched to 1024 frames by itself (windows of equal length share one front-end pass, which is the same
        per row), so batching never changes a window's embedding.
        """
        htsat = self.model.htsat
        hop, min_samples = self.config.hop_length, self.config.n_fft // 2 + 1
        limit = self.config.target_frames
        by_length: dict[int, list[int]] = {}
        for i, window in enumerate(windows):
            frames = 1 + len(window) // hop
            if frames > limit:
                raise ValueError(f"a window of {len(window) / self.sample_rate:.2f} s gives {frames} log-mel frames; "
                                 f"{self.name} sees at most {limit} (windows of at most {self.max_window_s} s)")
            by_length.setdefault(len(window), []).append(i)
        out = torch.empty(len(windows), 1, limit, self.config.n_mels, device=self.device)
        for length, rows in by_length.items():
            wave = torch.from_numpy(np.stack([np.asarray(windows[i], dtype=np.float32) for i in rows]))
            if length < min_samples:  # reflect padding needs n_fft/2 + 1 samples: pad tiny windows with silence
                wave = F.pad(wave, (0, min_samples - length))
            out[rows] = htsat.stretch(htsat.log_mel(wave.to(self.device)))
        return out

    def _frame_features(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        htsat = self.model.htsat
        return htsat.forward_image(htsat.fold(self.prepare_windows(windows)))  # [B, 32, C] on the device

    @torch.inference_mode()
    def frame_features(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows (mono float32 at 32 kHz, at most 10 s) -> [B, 32, 768] float32 CPU frame features, before
        the projection (the released ``fine_grained_embedding``; frame i covers about 1/32 of the window)."""
        return self._frame_features(windows).float().cpu()

    @torch.inference_mode()
    def frame_embeddings(self, windows: Sequence[np.ndarray], normalize: bool = True) -> torch.Tensor:
        """Windows -> [B, 32, D] frame-level embeddings in the joint space: ``audio_proj`` applied to every frame
        (unit-norm per frame when ``normalize``). The clip embedding projects the frame *mean* instead; as the head
        is non-linear, it is not the mean of these."""
        projected = self.model.audio_proj(self._frame_features(windows))
        return (l2_normalize(projected) if normalize else projected.float()).cpu()

    @torch.inference_mode()
    def _embed_window_and_frame_batch(self, windows: Sequence[np.ndarray]
                                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """32 frames per window (HTSAT's final map averaged over its 2 frequency groups), projected, unit-norm; the
        window embedding projects their mean, as :meth:`_embed_window_batch`."""
        features = self._frame_features(windows)  # [B, 32, C]
        clips = l2_normalize(self.model.audio_proj(features.mean(dim=1))).cpu()  # [B, D]
        return clips, list(l2_normalize(self.model.audio_proj(features)).cpu())

    def text_tower(self) -> EncoderTextTower:
        """RoBERTa (no pooler) + ``text_proj``; sentence feature = the ``<s>`` state, as ASE.encode_text."""
        return EncoderTextTower(self.tokenizer, self.model.text_encoder.text_encoder, self.model.text_proj,
                                self.device)

    @torch.inference_mode()
    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        pooled = self._frame_features(windows).mean(dim=1)  # [B, 768]: mean over the 64 final positions
        return l2_normalize(self.model.audio_proj(pooled)).cpu()

    # --- text ----------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]):
        """Raw captions -> RoBERTa ids: padded to the longest, truncated to ``max_text_tokens`` (30)."""
        return self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_tokens,
                              return_tensors="pt")

    @torch.inference_mode()
    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        embeddings = self.model.encode_text(tokens["input_ids"].to(self.device),
                                            tokens["attention_mask"].to(self.device))
        return l2_normalize(embeddings).cpu()


# --------------------------------------------------------------------------------------------------------------------
# a tiny random model, for tests and offline development


def tiny_drcap_config(vocab_size: int) -> DrcapClapConfig:
    """Small sizes that keep every code path of the released model: 4 Swin stages of 2 blocks (shifted windows with
    masks in stages 0-2, the unshifted last stage), 8x8 final map, 32 frames; RoBERTa with 2 layers."""
    return DrcapClapConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5,
                           text_vocab_size=vocab_size, text_hidden_size=32, text_layers=2, text_heads=1,
                           text_intermediate_size=64, text_max_positions=40, joint_dim=16)


def make_tiny_drcap_model(seed: int = 0, vocab_size: int | None = None) -> DrcapClapModel:
    """A tiny random :class:`DrcapClapModel` (deterministic for a seed), sized for the caption tokenizer."""
    if vocab_size is None:
        from engine.clap.tiny import train_caption_tokenizer

        vocab_size = len(train_caption_tokenizer())
    torch.manual_seed(seed)
    model = DrcapClapModel(tiny_drcap_config(vocab_size)).eval()
    with torch.no_grad():
        # plausible normalisation statistics for log-mels (dB) instead of mean 0, variance 1
        model.htsat.bn0.running_mean.fill_(-30.0)
        model.htsat.bn0.running_var.fill_(400.0)
        # With the training initialisation (std 0.02) a random tower maps every input to nearly one direction
        # (cosine ~1.0 between unrelated captions). Wider random matrices spread the embeddings (mean cosine ~0.75
        # between unrelated clips, ~0.9 between captions), so tests can tell inputs apart. Still random weights.
        for module, std in ((model.text_encoder, 0.3), (model.text_proj, 0.3), (model.htsat.patch_embed, 0.1),
                            (model.htsat.layers, 0.1), (model.audio_proj, 0.1)):
            for name, parameter in module.named_parameters():
                if parameter.dim() >= 2 and "relative_position" not in name:
                    parameter.normal_(0.0, std)
    return model


def build_tiny_drcap_clap(directory: str | os.PathLike, seed: int = 0, *, safetensors: bool = False
                          ) -> tuple[Path, Path]:
    """Write a tiny random DRCap CLAP in the released layout and a tiny RoBERTa tokenizer folder.

    Returns ``(checkpoint, tokenizer_dir)``: ``directory/best_model.pt`` holding ``{"model": state_dict,
    "epoch": 0}`` (or ``directory/model.safetensors``) and ``directory/tokenizer``. The folder carries the
    untrained marker, so the backend loaded from it reports ``is_untrained``.
    """
    from engine.clap.tiny import train_caption_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_caption_tokenizer()
    tokenizer_dir = directory / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    checkpoint = checkpoints.write_untrained_checkpoint(
        directory, make_tiny_drcap_model(seed, len(tokenizer)).state_dict(), released_file="best_model.pt",
        extra={"epoch": 0}, safetensors=safetensors, seed=seed,
        what="randomly initialised tiny DRCap CLAP; embeddings carry no meaning")
    return checkpoint, tokenizer_dir


__all__ = ["DrcapClapBackend", "DrcapClapConfig", "DrcapClapModel", "HtsatSwin", "build_tiny_drcap_clap",
           "convert_checkpoint_to_safetensors", "infer_drcap_config", "load_drcap_state_dict",
           "load_state_dict_strictly", "make_tiny_drcap_model", "slaney_mel_matrix", "stft_kernels",
           "tiny_drcap_config"]

