"""Small numpy signal helpers (no scipy: it is not a project dependency).

Filtering is done in the frequency domain: clips are short (<= 10 s), so one FFT per operation is both the simplest
and the fastest option in plain numpy.
"""
from __future__ import annotations

import functools

import numpy as np

SR = 16000


def fast_len(n: int) -> int:
    """Smallest 2^a * 3^b >= n: FFT sizes that pocketfft handles fast (odd clip lengths can be prime)."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def band_shape(n: int, sr: int, lo: float | None = None, hi: float | None = None, order: int = 2) -> np.ndarray:
    """Magnitude response (rfft bins) of a Butterworth-like band-pass; lo/hi None leave that side open."""
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    gain = np.ones_like(freqs)
    if hi is not None:
        gain /= np.sqrt(1.0 + (freqs / hi) ** (2 * order))
    if lo is not None:
        with np.errstate(divide="ignore"):
            gain /= np.sqrt(1.0 + (lo / np.maximum(freqs, 1e-3)) ** (2 * order))
    return gain


def filt(x: np.ndarray, lo: float | None = None, hi: float | None = None, order: int = 2, sr: int = SR) -> np.ndarray:
    """Zero-phase band/low/high-pass of x (lo/hi in Hz)."""
    if x.size == 0:
        return x
    size = fast_len(x.size)
    spec = np.fft.rfft(x, size) * band_shape(size, sr, lo, hi, order)
    return np.fft.irfft(spec, n=size)[: x.size].astype(np.float32)


NOISE_SECONDS = 11.0


def _grid(freq: float | None) -> float | None:
    """Round a corner frequency to a 1/6-octave grid so that noise buffers can be shared."""
    return None if freq is None else float(round(2 ** (round(np.log2(freq) * 6) / 6)))


@functools.lru_cache(maxsize=256)
def _noise_buffer(exponent: float, lo: float | None, hi: float | None, sr: int) -> np.ndarray:
    n = int(NOISE_SECONDS * sr)
    rng = np.random.default_rng([int(exponent * 100), int(lo or 0), int(hi or 0)])
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec *= 1.0 / np.maximum(freqs, 20.0) ** (exponent / 2.0)
    spec *= band_shape(n, sr, lo, hi)
    out = np.fft.irfft(spec, n=n)
    return (out / (np.sqrt(np.mean(out ** 2)) + 1e-12)).astype(np.float32)


def colored_noise(rng: np.random.Generator, n: int, exponent: float = 0.0, lo: float | None = None,
                  hi: float | None = None, sr: int = SR) -> np.ndarray:
    """Unit-RMS noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown), optionally band-limited.

    Cut at a random offset (and direction) from a buffer computed once per spectral shape: an FFT per call was
    the single largest cost of a build. Requests longer than the buffer are tiled.
    """
    buf = _noise_buffer(float(exponent), _grid(lo), _grid(hi), sr)
    if rng.random() < 0.5:
        buf = buf[::-1]
    if n > buf.size:
        reps = int(np.ceil(n / buf.size)) + 1
        buf = np.tile(buf, reps)
    off = int(rng.integers(0, buf.size - n + 1))
    return buf[off: off + n].copy()


def resample(x: np.ndarray, sr_in: int, sr_out: int = SR) -> np.ndarray:
    """FFT resampling (band-limited); fine for the short files the material cache decodes once."""
    if sr_in == sr_out or x.size == 0:
        return x.astype(np.float32)
    n_out = int(round(x.size * sr_out / sr_in))
    spec = np.fft.rfft(x)
    m = n_out // 2 + 1
    if m <= spec.size:
        spec = spec[:m]
    else:
        spec = np.concatenate([spec, np.zeros(m - spec.size, dtype=spec.dtype)])
    return (np.fft.irfft(spec, n=n_out) * (n_out / x.size)).astype(np.float32)


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Linear convolution truncated to len(x)."""
    n = x.size + h.size - 1
    size = fast_len(n)
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: x.size]
    return y.astype(np.float32)


RT60_GRID = (0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6)
IR_VARIANTS = 4


@functools.lru_cache(maxsize=None)
def _ir(rt60: float, damp_hz: float, variant: int) -> np.ndarray:
    rng = np.random.default_rng([int(rt60 * 100), int(damp_hz), variant])
    return make_ir(rng, rt60, damp_hz)


def reverb_ir(rng: np.random.Generator, rt60: float, sr: int = SR, damp_hz: float = 4000.0) -> np.ndarray:
    """A room impulse response near rt60 seconds, picked by rng from a small fixed set (computed once)."""
    grid = min(RT60_GRID, key=lambda g: abs(g - rt60))
    return _ir(grid, float(damp_hz), int(rng.integers(IR_VARIANTS)))


def make_ir(rng: np.random.Generator, rt60: float, damp_hz: float = 4000.0, sr: int = SR) -> np.ndarray:
    """Synthetic room impulse response: exponentially decaying, low-passed noise (no direct path)."""
    n = max(int(rt60 * sr), 64)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail = filt(tail.astype(np.float32), hi=damp_hz, sr=sr)
    tail[: int(0.005 * sr)] = 0.0  # pre-delay
    return (tail / (np.sqrt(np.sum(tail ** 2)) + 1e-12)).astype(np.float32)


def envelope(n: int, attack: float, release: float, sr: int = SR) -> np.ndarray:
    """Linear fade-in/fade-out envelope (seconds), avoiding clicks at event boundaries."""
    env = np.ones(n, dtype=np.float32)
    a, r = min(int(attack * sr), n // 2), min(int(release * sr), n // 2)
    if a > 0:
        env[:a] = np.linspace(0.0, 1.0, a, dtype=np.float32)
    if r > 0:
        env[n - r:] = np.minimum(env[n - r:], np.linspace(1.0, 0.0, r, dtype=np.float32))
    return env


def frame_rms(x: np.ndarray, frame: int = 800) -> np.ndarray:
    """RMS of non-overlapping frames (50 ms at 16 kHz)."""
    n = (x.size // frame) * frame
    if n == 0:
        return np.array([np.sqrt(np.mean(x ** 2)) if x.size else 0.0])
    return np.sqrt(np.mean(x[:n].reshape(-1, frame) ** 2, axis=1))


def level_db(x: np.ndarray) -> float:
    """Perceived-level proxy in dBFS: the 90th percentile of 50-ms frame RMS, or the peak minus 14 dB if higher.

    The percentile measures steady sounds (rain, speech) without being diluted by pauses; the peak term stops
    sparse clicks (a dripping tap, a ticking clock) from being boosted until they clip.
    """
    steady = np.percentile(frame_rms(x), 90)
    peak = np.abs(x).max() if x.size else 0.0
    return float(20.0 * np.log10(max(steady, peak * 10 ** (-14 / 20)) + 1e-9))


def set_level(x: np.ndarray, target_db: float) -> np.ndarray:
    """Scale x so that level_db(x) == target_db."""
    return (x * 10.0 ** ((target_db - level_db(x)) / 20.0)).astype(np.float32)


def band_fraction(x: np.ndarray, lo: float, hi: float, sr: int = SR) -> float:
    """Fraction of the signal's energy between lo and hi Hz (used by tests and build checks)."""
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / sr)
    total = power.sum() + 1e-12
    return float(power[(freqs >= lo) & (freqs <= hi)].sum() / total)
