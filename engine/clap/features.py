"""LAION-CLAP input features in torch: what ``transformers.ClapFeatureExtractor`` computes, batched, on any device.

The HF extractor loops over STFT frames in numpy (about 19 ms of CPU for a 10-s clip at 48 kHz here);
:class:`ClapFeatures` computes the same log-mel spectrogram with one ``torch.fft.rfft`` over framed windows, in
2-3x less CPU time on one thread, batched, and on the model's device (benchmarks/bench_features.py). It covers
the only path the backend uses: windows of at most ``nb_max_samples`` (the base class never hands it longer ones,
so the extractor's random crops and random fusion chunks never apply):

1. padding to ``nb_max_samples``: ``repeatpad`` (tile ``int(max / len)`` times, then zeros), ``repeat`` (tile past
   the end, cut) or ``pad`` (zeros), as the extractor's ``padding`` says;
2. STFT: the extractor's own periodic Hann window, n_fft = ``fft_window_size``, ``hop_length``, centred frames with
   reflect padding, so 1 + max // hop frames;
3. power |X|^2, then the extractor's own mel filter array (``mel_filters_slaney`` for ``rand_trunc``, the htk
   ``mel_filters`` for ``fusion``), read from the instance so the numbers are identical;
4. dB: 10·log10(max(mel, 1e-10)) (the extractor's floor; it ignores its ``top_db``, so do we);
5. [B, 1, frames, mels] float32, or for ``fusion`` the same map stacked 4 times: [B, 4, frames, mels].

Precision: the STFT runs in float64, as the extractor's does. A float32 FFT has an absolute error of about 1e-7 of
the frame's loudest bin, which lifts bins that float64 puts at the -100 dB floor by up to 0.25 dB for a sine or a
chirp (measured: max error / max |value| 2.4e-3 for float32, 8e-8 for float64). The spectrum is then rounded to
complex64, as the extractor stores it, and the mel product and the log run in float32 (relative error ~1e-6).

CPU: rows are computed one at a time (a whole window per FFT call unless ``cpu_block_frames`` says otherwise), in
buffers the module keeps between calls (about 21 MB for a 10-s window at 48 kHz). Fresh multi-megabyte buffers are fresh pages from the kernel on most calls (glibc
returns them between calls), and those page faults cost about as much as the FFT on a small virtual machine. One
lock guards the buffers, so concurrent callers take turns for the few milliseconds the features take. On a GPU the
whole batch is one FFT call and the caching allocator reuses memory.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import AudioTooLongError, ConfigError, EmptyAudioError

PADDINGS = ("repeatpad", "repeat", "pad")
TRUNCATIONS = ("rand_trunc", "fusion")
FUSION_CHANNELS = 4  # global + 3 local views; for windows that fit, all four are the same map
DB_FLOOR = 1e-10  # the extractor's mel_floor and power_to_db's min_value: -100 dB


class ClapFeatures(nn.Module):
    """Windows of mono audio -> LAION-CLAP log-mel input features, equal to ``ClapFeatureExtractor``'s within 1e-6
    of their largest magnitude (tests/test_features.py).

    ``is_longer`` is not computed here: for windows that fit it is False. In ``fusion`` mode the extractor (copying
    LAION-CLAP's ``HTSAT.forward``, which does it in training and inference alike) marks a RANDOM window of the batch
    as longer when none is, so an embedding would depend on chance and on its batch-mates; callers pass all False
    instead, a deliberate difference from both, so a window's embedding depends on its own samples only.
    """

    # Frames per FFT call on the CPU (None: the whole window). Cache-sized blocks save ~10% of the work on one
    # thread, but with 2 threads on a busy machine every extra parallel op waits for its second thread, and 8
    # blocks cost several times more than one call (benchmarks/bench_features.py measures both).
    cpu_block_frames: int | None = None

    def __init__(self, *, max_samples: int, n_fft: int, hop_length: int, window: np.ndarray, mel_filters: np.ndarray,
                 padding: str = "repeatpad", fused: bool = False) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ConfigError(f"CLAP feature padding {padding!r} is not one of {PADDINGS}")
        if max_samples <= n_fft // 2:  # reflect padding needs more samples than half a frame
            raise ConfigError(f"a CLAP window of {max_samples} samples is too short for an FFT of {n_fft}")
        self.max_samples, self.n_fft, self.hop_length = int(max_samples), int(n_fft), int(hop_length)
        self._workspace: dict[str, torch.Tensor] = {}  # CPU buffers reused across calls (see the module docstring)
        self._workspace_lock = threading.Lock()
        self.padding, self.fused = padding, bool(fused)
        self.register_buffer("window", torch.as_tensor(np.asarray(window, dtype=np.float64)), persistent=False)
        filters = torch.as_tensor(np.asarray(mel_filters, dtype=np.float32))  # [n_fft/2+1, mels]
        self.register_buffer("mel_filters", filters, persistent=False)
        # Only bins some filter weighs are used (for 0-14 kHz at 48 kHz: 299 of 513); the rest add exact zeros.
        used = (filters != 0).any(dim=1).nonzero().flatten()
        self.first_bin, self.end_bin = int(used.min()), int(used.max()) + 1
        # [2 * used bins, mels]: each filter row twice, for the interleaved (re^2, im^2) of its bin
        self.register_buffer("mel_filters_pairs", filters[self.first_bin:self.end_bin].repeat_interleave(2, dim=0),
                             persistent=False)

    @classmethod
    def from_extractor(cls, extractor) -> ClapFeatures:
        """The features a ``transformers.ClapFeatureExtractor`` computes with its current settings (its
        ``truncation`` picks the filter bank and the channel count)."""
        from transformers.audio_utils import window_function

        if extractor.truncation not in TRUNCATIONS:
            raise ConfigError(f"CLAP feature truncation {extractor.truncation!r} is not one of {TRUNCATIONS}")
        fused = extractor.truncation == "fusion"
        return cls(max_samples=extractor.nb_max_samples, n_fft=extractor.fft_window_size,
                   hop_length=extractor.hop_length, window=window_function(extractor.fft_window_size, "hann"),
                   mel_filters=extractor.mel_filters if fused else extractor.mel_filters_slaney,
                   padding=extractor.padding, fused=fused)

    @property
    def num_frames(self) -> int:
        """Centred frames of a padded window: 1 + max_samples // hop for an even n_fft."""
        return 1 + (self.max_samples + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length

    def check(self, windows: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Typed errors for windows the model cannot see, before anything is computed."""
        for window in windows:
            length = int(np.prod(window.shape))
            if length == 0:
                raise EmptyAudioError("An audio window holds no samples.")
            if length > self.max_samples:
                raise AudioTooLongError(f"An audio window of {length} samples is longer than the {self.max_samples} "
                                        "the CLAP model sees at once; cut the audio into shorter windows.")

    def pad(self, windows: Sequence[np.ndarray | torch.Tensor], edge: int = 0,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Windows -> [B, edge + max_samples + edge] on the module's device (in ``out`` when given; else float32 if
        every window is float32, float64 otherwise): each window padded on its own to ``max_samples``
        (``padding``); the ``edge`` samples on both sides are left for the caller to fill."""
        self.check(windows)
        size = self.max_samples
        if out is None:
            out = torch.empty(len(windows), edge + size + edge, dtype=self.sample_dtype(windows),
                              device=self.window.device)
        for row, window in enumerate(windows):
            samples = torch.as_tensor(window).reshape(-1).to(out.device)
            length = samples.numel()
            if self.padding == "repeatpad":
                copies = size // length  # int(max / len) whole copies, zeros after
            elif self.padding == "repeat":
                copies = -(-size // length)  # past the end, cut at max
            else:
                copies = 1
            whole = min(copies, size // length)  # copies that fit entirely
            filled = whole * length
            out[row, edge:edge + filled].view(whole, length).copy_(samples)  # broadcast: no tiled temporary
            tail = min(size, copies * length) - filled  # "repeat": the part of the last copy that fits
            out[row, edge + filled:edge + filled + tail] = samples[:tail]
            out[row, edge + filled + tail:edge + size] = 0.0
        return out

    @staticmethod
    def sample_dtype(windows: Sequence[np.ndarray | torch.Tensor]) -> torch.dtype:
        """float32 when every window is float32 (audio as the engine loads it), else float64 (as the extractor
        converts everything). The FFT is float64 either way: float32 samples are exact in float64."""
        float32 = (np.float32, torch.float32)
        return torch.float32 if all(window.dtype in float32 for window in windows) else torch.float64

    @torch.inference_mode()  # the kept buffers are inference tensors: every call must update them in this mode
    def forward(self, windows: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Windows (mono, at most ``max_samples`` each) -> [B, 1 or 4, frames, mels] float32 log-mel in dB."""
        self.check(windows)
        log_mel = torch.empty(len(windows), self.num_frames, self.mel_filters.shape[1], device=self.window.device)
        if self.window.device.type == "cpu":  # one row at a time, in the kept buffers
            with self._workspace_lock:
                for row in range(len(windows)):
                    self._log_mel(windows[row:row + 1], log_mel[row:row + 1], self.cpu_block_frames, self._buffer)
        else:  # the whole batch at once
            self._log_mel(windows, log_mel, None, None)
        channels = FUSION_CHANNELS if self.fused else 1
        return log_mel[:, None].expand(-1, channels, -1, -1).contiguous()  # [B, C, frames, mels]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of ``shape`` kept between calls under ``name`` (made again if the shape changes)."""
        buffer = self._workspace.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._workspace[name] = torch.empty(shape, dtype=dtype)
        return buffer

    def _log_mel(self, windows: Sequence[np.ndarray | torch.Tensor], out: torch.Tensor, block: int | None,
                 buffer) -> None:
        """Windows -> ``out`` [B, frames, mels] float32, ``block`` frames per FFT call (None: all at once);
        intermediate results go to ``buffer(name, shape, dtype)`` tensors when it is given, else to new tensors."""
        rows, edge, size = len(windows), self.n_fft // 2, self.max_samples
        # Centred frames: n_fft/2 reflected samples on each side (what torch.stft / np.pad "reflect" add), written
        # into the same buffer as the padded windows instead of copying them again.
        # On the CPU the kept waveform buffer is float64 (float32 samples are exact in it): the windowing multiply
        # then reads float64 frames instead of promoting each overlapping frame on the fly (measured faster).
        dtype = torch.float64 if buffer else self.sample_dtype(windows)
        padded = buffer("waveform", (rows, edge + size + edge), dtype) if buffer else None
        waveform = self.pad(windows, edge, out=padded)  # [B, edge + S + edge]
        waveform[:, :edge] = waveform[:, edge + 1:2 * edge + 1].flip(-1)
        waveform[:, edge + size:] = waveform[:, size - 1:edge + size - 1].flip(-1)
        frames = waveform.unfold(-1, self.n_fft, self.hop_length)  # [B, T, n_fft], a view
        count = frames.shape[1]
        block = block or count
        used_bins = self.end_bin - self.first_bin

        def space(name: str, width: tuple[int, ...], dtype: torch.dtype, n: int) -> torch.Tensor | None:
            return buffer(name, (rows, block, *width), dtype)[:, :n] if buffer else None

        for start in range(0, count, block):
            n = min(block, count - start)
            # float64 from here (float32 samples times the float64 window promote, exactly)
            windowed = torch.mul(frames[:, start:start + n], self.window,
                                 out=space("windowed", (self.n_fft,), torch.float64, n))
            spectrum = torch.fft.rfft(windowed, out=space("spectrum", (self.n_fft // 2 + 1,), torch.complex128, n))
            # (re, im) of the used bins, rounded to float32 as the extractor rounds its spectrum to complex64
            used = torch.view_as_real(spectrum[:, :, self.first_bin:self.end_bin])  # [B, n, used bins, 2]
            parts = space("parts", (used_bins, 2), torch.float32, n)
            parts = used.to(torch.float32) if parts is None else parts.copy_(used)
            # |X|^2 @ filters == [re^2, im^2] @ (each filter row twice): the sum of squares happens in the matmul
            torch.matmul(parts.square_().flatten(2), self.mel_filters_pairs, out=out[:, start:start + n])
        out.clamp_min_(DB_FLOOR).log10_().mul_(10.0)
