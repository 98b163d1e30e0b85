"""Decode any supported audio input into one mono float32 waveform, and cut it into model windows.

Inputs are file paths, raw file bytes, or ``(sample_rate, array)`` tuples (the shape Gradio's numpy ``Audio`` gives).
Files are decoded with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3, ...) first; containers libsndfile
cannot read (m4a, mp4, webm, ...) go through FFmpeg when it is installed. Either way the result is the same: the native
channels are averaged into mono here (not by the decoder) so both paths agree, and the waveform is resampled only on
request. Nothing here is random: the same input always gives the same samples and the same windows.

Bad input raises the typed errors of :mod:`engine.errors` with a message meant for the user.
"""
from __future__ import annotations

import errno
import io
import json
import math
import numbers
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import NoReturn, Union

import numpy as np
import soundfile as sf

from engine.config import WINDOW_POLICIES
from engine.errors import (
    AudioError,
    AudioTooLongError,
    EmptyAudioError,
    NonFiniteAudioError,
    UndecodableAudioError,
    UnsupportedFormatError,
)

AudioSource = Union[str, os.PathLike, bytes, bytearray, tuple[int, np.ndarray]]

DEFAULT_MAX_DURATION_S = 1800.0
FFMPEG_INSTALL_HINT = (
    "install FFmpeg (`apt-get install ffmpeg`, or add `ffmpeg` to packages.txt on a Hugging Face Space)"
)

# Containers/codecs libsndfile cannot read but FFmpeg can, by file extension. Used only to tell the user that FFmpeg
# is missing (UnsupportedFormatError) rather than that the file is broken (UndecodableAudioError).
_FFMPEG_EXTENSIONS: dict[str, str] = {
    ".m4a": "M4A (MPEG-4 audio)",
    ".m4b": "M4B (MPEG-4 audiobook)",
    ".mp4": "MP4",
    ".m4v": "M4V (MPEG-4 video)",
    ".mov": "QuickTime MOV",
    ".3gp": "3GP",
    ".3g2": "3G2",
    ".aac": "AAC",
    ".webm": "WebM",
    ".mkv": "Matroska (MKV)",
    ".mka": "Matroska audio (MKA)",
    ".wma": "WMA",
    ".wmv": "WMV",
    ".asf": "ASF",
    ".amr": "AMR",
    ".ac3": "AC-3",
    ".eac3": "E-AC-3",
    ".dts": "DTS",
    ".ape": "Monkey's Audio (APE)",
    ".wv": "WavPack",
    ".alac": "ALAC",
    ".flv": "FLV",
    ".avi": "AVI",
    ".mpg": "MPEG",
    ".mpeg": "MPEG",
    ".ts": "MPEG-TS",
}

_PROBE_BYTES = 16  # enough for every magic number below


# --------------------------------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare ndarrays and raise
class Audio:
    """A decoded clip: mono float32 samples plus where they came from."""

    waveform: np.ndarray  # [T] float32, mono, at sample_rate, C-contiguous
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    source: str  # file name, "<bytes>" or "<array>"

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def original_duration_s(self) -> float:
        # Resampling keeps the duration up to one output sample, so the waveform is a good enough measure.
        return self.duration_s


@dataclass(frozen=True)
class Window:
    """One model window: samples [start_sample, end_sample) of a waveform."""

    index: int
    start_sample: int
    end_sample: int  # exclusive
    start_s: float
    end_s: float

    @property
    def num_samples(self) -> int:
        return self.end_sample - self.start_sample


# --------------------------------------------------------------------------------------------------------------------
# public API


def ffmpeg_available() -> bool:
    """True when both ``ffmpeg`` and ``ffprobe`` are on PATH (looked up on every call, never cached)."""
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def load_audio(
    source: AudioSource,
    target_sample_rate: int | None = None,
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> Audio:
    """Decode ``source`` into mono float32, resampled to ``target_sample_rate`` when given.

    Raises FileNotFoundError for a missing path, and the :mod:`engine.errors` audio errors for empty, undecodable,
    non-finite or too long input. The duration limit is checked from the header before decoding when possible.
    """
    if target_sample_rate is not None:
        target_sample_rate = _check_sample_rate(target_sample_rate, what="target_sample_rate", error=ValueError)
    if not (max_duration_s > 0):  # also rejects NaN
        raise ValueError(f"max_duration_s must be > 0, got {max_duration_s!r}")

    if isinstance(source, tuple):
        frames, sample_rate, name = _frames_from_tuple(source, max_duration_s)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        frames, sample_rate, name = _frames_from_bytes(bytes(source), max_duration_s)
    elif isinstance(source, (str, os.PathLike)):
        frames, sample_rate, name = _frames_from_path(os.fspath(source), max_duration_s)
    else:
        raise TypeError(
            f"Unsupported audio source of type {type(source).__name__}; "
            "expected a path, bytes, or a (sample_rate, array) tuple."
        )
    return _finish(frames, sample_rate, name, target_sample_rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Convert an array as Gradio gives it to mono float32 [T] (the mean over channels).

    Integer samples are scaled to [-1, 1): int16 / 2**15, int32 / 2**31, int8 / 2**7, uint8 (x - 128) / 2**7.
    Floats are kept as they are. 1-D is mono; 2-D is (samples, channels), unless it looks like (channels, samples):
    at most 8 rows and more columns than rows.
    """
    return _downmix(_as_frames(samples))


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited (windowed sinc) resampling of a [T] waveform; float32 out, the input itself when rates match."""
    orig_sr = _check_sample_rate(orig_sr, what="orig_sr", error=ValueError)
    target_sr = _check_sample_rate(target_sr, what="target_sr", error=ValueError)
    if orig_sr == target_sr:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    # Imported here: torch costs seconds to import and loading at the native rate does not need it.
    import torch
    import torchaudio.functional as taf

    tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))  # [T]
    out = taf.resample(tensor, orig_sr, target_sr)  # [ceil(T * target / orig)]
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def plan_windows(
    num_samples: int,
    sample_rate: int,
    window_s: float,
    hop_s: float,
    last_window: str = "shift",
) -> list[Window]:
    """Lay windows of ``window_s`` every ``hop_s`` over ``num_samples`` samples; see AudioConfig for ``last_window``.

    A clip no longer than one window gives exactly one window covering it. Otherwise full windows are placed while
    they fit, and the tail after them (if any) is handled by ``last_window``.
    """
    window, hop = _window_lengths(num_samples, sample_rate, window_s, hop_s, last_window)
    if num_samples <= window:
        return [_window(0, 0, num_samples, sample_rate)]

    spans = [(start, start + window) for start in range(0, num_samples - window + 1, hop)]
    last_end, next_start = spans[-1][1], spans[-1][0] + hop
    # A tail is audio after the last full window (hop <= window) that a next window would also have started on
    # (hop > window: the gaps between windows are intended, so audio before the next hop start is not a tail).
    if max(last_end, next_start) < num_samples:
        if last_window == "shift":
            spans.append((num_samples - window, num_samples))  # full length, ends at the clip's end
        elif last_window == "keep":
            spans.append((next_start, num_samples))  # shorter than a window
        # "drop": leave the tail out
    return [_window(i, start, end, sample_rate) for i, (start, end) in enumerate(spans)]


def split_windows(
    audio: Audio | np.ndarray,
    sample_rate: int | None = None,
    *,
    window_s: float = 10.0,
    hop_s: float = 10.0,
    last_window: str = "shift",
) -> tuple[list[np.ndarray], list[Window]]:
    """Cut a waveform into windows (see :func:`plan_windows`); the chunks are views of the waveform, not copies."""
    if isinstance(audio, Audio):
        if sample_rate is not None and sample_rate != audio.sample_rate:
            raise ValueError(f"sample_rate={sample_rate} contradicts the Audio's own rate {audio.sample_rate}")
        waveform, sample_rate = audio.waveform, audio.sample_rate
    else:
        if sample_rate is None:
            raise ValueError("sample_rate is required when splitting a bare array")
        waveform = np.asarray(audio)
    if waveform.ndim != 1:
        raise ValueError(f"split_windows expects a mono [T] waveform, got shape {waveform.shape}")

    windows = plan_windows(waveform.shape[0], sample_rate, window_s, hop_s, last_window)
    chunks = [waveform[w.start_sample : w.end_sample] for w in windows]  # each [w.num_samples]
    return chunks, windows


# --------------------------------------------------------------------------------------------------------------------
# sources -> (frames [T, C] float32, native sample rate, display name)


def _frames_from_tuple(source: tuple, max_duration_s: float) -> tuple[np.ndarray, int, str]:
    if len(source) != 2:
        raise AudioError(f"An audio tuple must be (sample_rate, samples), got {len(source)} items.")
    sample_rate = _check_sample_rate(source[0], what="The sample rate of the audio array", error=AudioError)
    samples = np.asarray(source[1])
    # Shape alone gives the duration, so refuse long arrays before converting them.
    num_samples = _array_layout(samples)[0]
    _check_duration(num_samples / sample_rate, max_duration_s)
    return _as_frames(samples), sample_rate, "<array>"


def _frames_from_path(path: str, max_duration_s: float) -> tuple[np.ndarray, int, str]:
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "Audio file not found", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Expected an audio file, got a directory", path)
    name = os.path.basename(path) or path
    if os.path.getsize(path) == 0:
        raise EmptyAudioError(f"'{name}' is empty (0 bytes); it contains no samples.")

    decoded, sf_error = _decode_soundfile(path, max_duration_s)
    if decoded is not None:
        return (*decoded, name)
    with open(path, "rb") as f:
        head = f.read(_PROBE_BYTES)
    return (*_decode_without_soundfile(path, name, head, os.path.splitext(path)[1], sf_error, max_duration_s), name)


def _frames_from_bytes(data: bytes, max_duration_s: float) -> tuple[np.ndarray, int, str]:
    name = "<bytes>"
    if not data:
        raise EmptyAudioError("The audio data is empty (0 bytes); it contains no samples.")

    decoded, sf_error = _decode_soundfile(io.BytesIO(data), max_duration_s)
    if decoded is not None:
        return (*decoded, name)
    if not ffmpeg_available():
        _raise_not_decodable(name, data[:_PROBE_BYTES], "", sf_error)
    # FFmpeg gets a real file, not a pipe: MP4/M4A may keep the index (moov atom) at the end, which needs seeking.
    tmp = tempfile.NamedTemporaryFile(prefix="audioscribe-", suffix=".bin", delete=False)
    try:
        with tmp:
            tmp.write(data)
        return (*_decode_ffmpeg(tmp.name, name, max_duration_s), name)
    finally:
        os.unlink(tmp.name)


def _decode_without_soundfile(
    path: str, name: str, head: bytes, extension: str, sf_error: str, max_duration_s: float
) -> tuple[np.ndarray, int]:
    """The fallback once libsndfile gave up: FFmpeg if installed, else a precise error."""
    if ffmpeg_available():
        return _decode_ffmpeg(path, name, max_duration_s)
    _raise_not_decodable(name, head, extension, sf_error)


def _raise_not_decodable(name: str, head: bytes, extension: str, sf_error: str) -> NoReturn:
    container = _ffmpeg_container(head, extension)
    if container is not None:
        raise UnsupportedFormatError(
            f"'{name}' looks like {container} audio, which needs FFmpeg to decode, and FFmpeg is not installed. "
            f"To fix, {FFMPEG_INSTALL_HINT}, or convert the file to WAV, FLAC, OGG or MP3."
        )
    raise UndecodableAudioError(
        f"Could not decode '{name}' as audio ({sf_error or 'format not recognised'}). "
        "The file may be corrupt or not audio at all."
    )


def _ffmpeg_container(head: bytes, extension: str) -> str | None:
    """Name of the FFmpeg-only format ``head`` (the first bytes) or else ``extension`` points to, or None."""
    if head[4:8] == b"ftyp":
        return "MPEG-4 (MP4/M4A/MOV/3GP)"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "ASF/WMA"
    if head[:5] == b"#!AMR":
        return "AMR"
    if head[:4] == b"ADIF" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0):
        return "AAC"  # ADIF header, or an ADTS frame sync (layer bits 00, unlike MP3's)
    if head[:2] == b"\x0b\x77":
        return "AC-3"
    if head[:4] == b"MAC ":
        return "Monkey's Audio (APE)"
    if head[:4] == b"wvpk":
        return "WavPack"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    return _FFMPEG_EXTENSIONS.get(extension.lower())


# --------------------------------------------------------------------------------------------------------------------
# decoders


def _decode_soundfile(file: str | io.BytesIO, max_duration_s: float) -> tuple[tuple[np.ndarray, int] | None, str]:
    """Decode with libsndfile: ((frames [T, C] float32, sample rate), "") or (None, libsndfile's error message)."""
    try:
        info = sf.info(file)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        return None, _short_error(exc)
    if isinstance(file, io.BytesIO):
        file.seek(0)

    sample_rate = int(info.samplerate)
    if info.frames > 0:  # some headers do not know their length; the bounded read below still protects
        _check_duration(info.frames / sample_rate, max_duration_s)
    max_frames = _max_frames(max_duration_s, sample_rate)
    try:
        # Read one frame past the limit so that a header which under-reports the length is still caught.
        frames, _ = sf.read(
            file, dtype="float32", always_2d=True, frames=-1 if max_frames is None else max_frames + 1
        )  # [T, C]
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        return None, _short_error(exc)
    if max_frames is not None and frames.shape[0] > max_frames:
        _raise_too_long(None, max_duration_s)
    return (frames, sample_rate), ""


def _decode_ffmpeg(path: str, name: str, max_duration_s: float) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg at its native rate and channel count -> (frames [T, C], rate)."""
    sample_rate, channels, duration_s = _ffprobe_audio_stream(path, name)
    if duration_s is not None:
        _check_duration(duration_s, max_duration_s)

    # -ac/-ar restate the probed values: normally no-ops, they guarantee the layout the reshape below relies on.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn", "-sn", "-dn",
           "-ac", str(channels), "-ar", str(sample_rate)]  # fmt: skip
    max_frames = _max_frames(max_duration_s, sample_rate)
    if max_frames is not None:
        cmd += ["-t", f"{max_duration_s + 1.0:.3f}"]  # bounded even when the container does not state a duration
    cmd += ["-f", "f32le", "-acodec", "pcm_f32le", "-"]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if result.returncode != 0:
        raise UndecodableAudioError(
            f"FFmpeg could not decode '{name}': {_stderr_tail(result.stderr, path, name)}. "
            "The file may be corrupt or not audio at all."
        )

    usable = len(result.stdout) // (4 * channels) * (4 * channels)  # drop a partial trailing frame, if any
    frames = np.frombuffer(result.stdout[:usable], dtype="<f4").reshape(-1, channels)  # [T, C], read-only view
    if max_frames is not None and frames.shape[0] > max_frames:
        _raise_too_long(None, max_duration_s)  # output was cut at the limit, so its length is not the real one
    return frames, sample_rate


def _ffprobe_audio_stream(path: str, name: str) -> tuple[int, int, float | None]:
    """(sample rate, channels, duration in s or None) of the first audio stream, read without decoding."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_streams", "-show_format", "-of", "json", path]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if result.returncode != 0:
        raise UndecodableAudioError(
            f"Could not decode '{name}' as audio: {_stderr_tail(result.stderr, path, name)}. "
            "The file may be corrupt or not audio at all."
        )
    try:
        probe = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise UndecodableAudioError(f"Could not read the stream information of '{name}' ({exc}).") from exc
    streams = probe.get("streams") or []
    if not streams:
        raise UndecodableAudioError(f"'{name}' contains no audio stream.")
    stream = streams[0]
    sample_rate = _to_int(stream.get("sample_rate"))
    channels = _to_int(stream.get("channels"))
    if not sample_rate or not channels:
        raise UndecodableAudioError(f"'{name}' has an audio stream without a usable sample rate or channel count.")
    # Matroska/WebM store the duration only on the container, MP4 on both.
    duration = _to_float(stream.get("duration")) or _to_float((probe.get("format") or {}).get("duration"))
    return sample_rate, channels, duration


# --------------------------------------------------------------------------------------------------------------------
# shared steps


def _finish(frames: np.ndarray, sample_rate: int, name: str, target_sample_rate: int | None) -> Audio:
    """Validate decoded frames [T, C], then down-mix and resample them into an Audio."""
    if frames.shape[0] == 0:
        raise EmptyAudioError(f"'{name}' contains no samples.")
    _check_finite(frames, sample_rate, name)
    waveform = _downmix(frames)  # [T]
    if target_sample_rate is not None:
        waveform = resample(waveform, sample_rate, target_sample_rate)  # [T']
    # Writeable too: torch.from_numpy warns on read-only arrays (FFmpeg output is a read-only buffer view).
    waveform = np.require(waveform, dtype=np.float32, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return Audio(
        waveform=waveform,
        sample_rate=target_sample_rate or sample_rate,
        original_sample_rate=sample_rate,
        original_channels=int(frames.shape[1]),
        source=name,
    )


def _downmix(frames: np.ndarray) -> np.ndarray:
    """[T, C] -> [T]: the plain mean over channels (no loudness normalisation)."""
    if frames.shape[1] == 1:
        return frames[:, 0]
    return frames.mean(axis=1, dtype=np.float32)


def _as_frames(samples: np.ndarray) -> np.ndarray:
    """Any supported array layout and dtype -> frames [T, C] float32 (always a new array, never the caller's)."""
    samples = np.asarray(samples)
    num_samples, channels, channels_first = _array_layout(samples)
    if num_samples == 0 or channels == 0:
        raise EmptyAudioError(f"The audio array (shape {samples.shape}) contains no samples.")
    frames = _to_float32(samples)
    if frames.ndim == 1:
        return frames[:, None]  # [T, 1]
    return frames.T if channels_first else frames  # [T, C]


def _array_layout(samples: np.ndarray) -> tuple[int, int, bool]:
    """(num samples, num channels, whether the array is channels-first) of a 1-D or 2-D sample array."""
    if samples.ndim == 1:
        return samples.shape[0], 1, False
    if samples.ndim != 2:
        raise AudioError(
            f"An audio array must be 1-D (samples) or 2-D (samples, channels), got shape {samples.shape}."
        )
    rows, cols = samples.shape
    # Gradio gives (samples, channels); a short, wide array is almost surely (channels, samples) instead.
    if rows <= 8 and cols > rows:
        return cols, rows, True
    return rows, cols, False


def _to_float32(samples: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1); keep float values. Returns a new float32 array of the same shape."""
    kind, size = samples.dtype.kind, samples.dtype.itemsize
    if kind == "f":
        return samples.astype(np.float32)  # astype copies, so the Audio never aliases the caller's array
    if kind == "i" and size in (1, 2, 4):
        return samples.astype(np.float32) * np.float32(1.0 / 2 ** (8 * size - 1))
    if kind == "u" and size == 1:
        return (samples.astype(np.float32) - np.float32(128.0)) * np.float32(1.0 / 128.0)
    raise AudioError(
        f"Unsupported audio sample type {samples.dtype}; use int16, int32, int8, uint8 or float samples."
    )


def _check_finite(frames: np.ndarray, sample_rate: int, name: str) -> None:
    bad = ~np.isfinite(frames).all(axis=1)  # [T] True where any channel is NaN or +-inf
    if bad.any():
        count = int(bad.sum())
        first = int(np.argmax(bad))
        raise NonFiniteAudioError(
            f"'{name}' contains {count} non-finite sample{'s' if count != 1 else ''} (NaN or infinity); "
            f"the first is at {_format_duration(first / sample_rate, decimals=3)} (sample {first})."
        )


def _check_duration(duration_s: float, max_duration_s: float) -> None:
    if duration_s > max_duration_s:
        _raise_too_long(duration_s, max_duration_s)


def _raise_too_long(duration_s: float | None, max_duration_s: float) -> NoReturn:
    """``duration_s`` None: only known to exceed the limit (the read stopped there)."""
    limit = _format_duration(max_duration_s)
    if duration_s is None:
        what = f"Audio is longer than the limit of {limit}"
    else:
        what = f"Audio is {_format_duration(duration_s)} long; the limit is {limit}"
    raise AudioTooLongError(f"{what}. Split the file, or raise audio.max_duration_s.")


def _max_frames(max_duration_s: float, sample_rate: int) -> int | None:
    """The most frames allowed at ``sample_rate``, or None when there is no limit (infinity)."""
    return None if math.isinf(max_duration_s) else int(math.floor(max_duration_s * sample_rate))


def _format_duration(seconds: float, decimals: int = 1) -> str:
    """H:MM:SS, plus ``decimals`` fraction digits only when they are not all zero (so 2.4 s does not print as 2 s)."""
    scale = 10**decimals
    ticks = int(round(seconds * scale))
    whole, frac = divmod(ticks, scale)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return text if frac == 0 else f"{text}.{frac:0{decimals}d}"


def _window_lengths(
    num_samples: int, sample_rate: int, window_s: float, hop_s: float, last_window: str
) -> tuple[int, int]:
    """Validate plan_windows' arguments and return (window, hop) in samples."""
    if not (window_s > 0):
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    if not (hop_s > 0):
        raise ValueError(f"hop_s must be > 0, got {hop_s!r}")
    if last_window not in WINDOW_POLICIES:
        raise ValueError(f"last_window must be one of {', '.join(WINDOW_POLICIES)}; got {last_window!r}")
    sample_rate = _check_sample_rate(sample_rate, what="sample_rate", error=ValueError)
    if num_samples <= 0:
        raise EmptyAudioError("Cannot cut windows from audio that contains no samples.")
    window, hop = round(window_s * sample_rate), round(hop_s * sample_rate)
    if window < 1 or hop < 1:
        raise ValueError(
            f"window_s={window_s} and hop_s={hop_s} must each span at least one sample at {sample_rate} Hz"
        )
    return window, hop


def _window(index: int, start: int, end: int, sample_rate: int) -> Window:
    return Window(index, start, end, start / sample_rate, end / sample_rate)


def _check_sample_rate(value: object, *, what: str, error: type[Exception]) -> int:
    # bool is an Integral too, and True Hz is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise error(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _short_error(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _stderr_tail(stderr: bytes, path: str, name: str, max_chars: int = 500) -> str:
    """The end of FFmpeg's error output, with the (possibly temporary) path replaced by the name the user knows."""
    text = stderr.decode("utf-8", errors="replace").strip().replace(path, name)
    return (text[-max_chars:] if text else "no error output").replace("\n", " | ")


def _to_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _to_float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) and result > 0 else None
