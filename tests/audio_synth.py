"""Test audio made at test time (no binary fixtures in the repo), plus the FFmpeg requirement helper.

Everything is deterministic: sines, fixed-seed noise, fixed encoder settings.
"""
from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import soundfile as sf

REQUIRE_FFMPEG_ENV = "AUDIOSCRIBE_REQUIRE_FFMPEG"

F = TypeVar("F", bound=Callable)


# --------------------------------------------------------------------------------------------------------------------
# FFmpeg requirement


def ffmpeg_installed() -> bool:
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def ensure_ffmpeg() -> None:
    """Skip the running test without FFmpeg; fail it instead where CI demands FFmpeg (AUDIOSCRIBE_REQUIRE_FFMPEG=1)."""
    if ffmpeg_installed():
        return
    if os.environ.get(REQUIRE_FFMPEG_ENV) == "1":
        pytest.fail(f"FFmpeg not installed, but {REQUIRE_FFMPEG_ENV}=1 requires it", pytrace=False)
    pytest.skip("FFmpeg not installed")


def requires_ffmpeg(test: F) -> F:
    """Decorator for tests that need ffmpeg/ffprobe: skipped without them, failed instead under CI's env var.

    Decided at run time (not collection time) so that fixtures and parametrisation work unchanged.
    """

    @functools.wraps(test)  # keeps the signature, so pytest still injects fixtures
    def wrapper(*args, **kwargs):
        ensure_ffmpeg()
        return test(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# signals


def sine(freq_hz: float, sample_rate: int, duration_s: float, amplitude: float = 0.5) -> np.ndarray:
    """[T] float32 sine starting at phase 0."""
    t = np.arange(round(duration_s * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def noise(num_samples: int, channels: int | None = None, seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    """Fixed-seed uniform noise in [-amplitude, amplitude): [T] or [T, C] float32."""
    shape = (num_samples,) if channels is None else (num_samples, channels)
    rng = np.random.default_rng(seed)
    return (amplitude * rng.uniform(-1.0, 1.0, size=shape)).astype(np.float32)


def peak_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    """Frequency (Hz) of the largest FFT bin of a Hann-windowed [T] waveform."""
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1.0 / sample_rate)[np.argmax(spectrum)])


def rms(waveform: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))


# --------------------------------------------------------------------------------------------------------------------
# files


def write_sf(path: Path, data: np.ndarray, sample_rate: int, **kwargs) -> Path:
    """soundfile.write that returns the path; ``data`` is [T] or [T, C]."""
    sf.write(str(path), data, sample_rate, **kwargs)
    return path


def ffmpeg_encode(source: Path, dest: Path, *codec_args: str) -> Path:
    """Encode ``source`` into ``dest`` with FFmpeg (container from the extension); skips/fails without FFmpeg."""
    ensure_ffmpeg()
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source), *codec_args, str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


def ffmpeg_lavfi(dest: Path, lavfi: str, *codec_args: str) -> Path:
    """Render an FFmpeg filter-graph source (e.g. a video test pattern) into ``dest``."""
    ensure_ffmpeg()
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", lavfi, *codec_args, str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


def write_silent_wav(path: Path, duration_s: float, sample_rate: int = 8000) -> Path:
    """A valid mono PCM_16 WAV of silence, written as a sparse file: hours of audio cost no time and no disk."""
    data_bytes = round(duration_s * sample_rate) * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)  # the hole reads back as zeros
    return path
