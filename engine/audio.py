"""Decode any supported audio input into one mono float32 waveform, and cut it into model windows.

Inputs are file paths, raw file bytes, or ``(sample_rate, array)`` tuples (the shape Gradio's numpy ``Audio`` gives).
Files are decoded with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3, ...) first; containers libsndfile
cannot read (m4a, mp4, webm, ...) go through FFmpeg when it is installed. Either way the result is the same: the native
channels are averaged into mono here (not by the decoder) so both paths agree, and the waveform is resampled only on
request. Nothing here is random: the same input always gives the same samples and the same windows.

Memory: every input is decoded in blocks of a few MiB, each block down-mixed and resampled at once, so the peak stays
near the size of the mono result whatever the file's channel count and sample rate (an 8-channel 96 kHz file never
exists in memory at full width). Headers are checked before decoding: the duration limit, at most
:data:`MAX_CHANNELS` channels and :data:`MAX_SAMPLE_RATE` Hz, and a pair of rates that can be resampled cheaply.

Bad input raises the typed errors of :mod:`engine.errors` with a message meant for the user. Messages name a file by
its base name only, never by the folder it sits in (for uploads, a server-side temporary folder).
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
from typing import IO, Iterator, NoReturn, Union

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

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

# What a file's header may claim, checked before decoding. Memory does not grow with either (files are decoded in
# blocks), but decoding time does, and no real recording needs more.
MAX_CHANNELS = 64
MAX_SAMPLE_RATE = 384_000

_BLOCK_BYTES = 1 << 22  # interleaved float32 decoded per block: 4 MiB whatever the channel count
_RESAMPLE_BUDGET = 1 << 20  # float32 elements (4 MiB) per intermediate array of one resampling step
# Resampling convolves with a [new, 1, orig + 2 * width] sinc kernel, for the two rates divided by their gcd. Rates
# without a large common factor (44101 -> 48000 Hz) would need 8 GiB for it and as many multiply-adds per output
# sample; every pair of common rates needs fewer than 2**18 elements.
_MAX_RESAMPLE_KERNEL = 1 << 20  # elements (4 MiB)
_UNKNOWN_LENGTH_S = 60.0  # output allocated up front (in seconds) when a header does not state its length
_SOUNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, TypeError, ValueError)


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
        return _load_tuple(source, target_sample_rate, max_duration_s)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), target_sample_rate, max_duration_s)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(os.fspath(source), target_sample_rate, max_duration_s)
    raise TypeError(
        f"Unsupported audio source of type {type(source).__name__}; "
        "expected a path, bytes, or a (sample_rate, array) tuple."
    )


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Convert an array as Gradio gives it to mono float32 [T] (the mean over channels).

    Integer samples are scaled to [-1, 1): int16 / 2**15, int32 / 2**31, int8 / 2**7, uint8 (x - 128) / 2**7.
    Floats are kept as they are. 1-D is mono; 2-D is (samples, channels), unless it looks like (channels, samples):
    at most 8 rows and more columns than rows.
    """
    return _downmix(_as_frames(samples))


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited (windowed sinc) resampling of a [T] waveform; float32 out, the input itself when rates match.

    The same filter as ``torchaudio.functional.resample`` (equal within float rounding), applied span by span so
    that memory stays near the size of the input and output. Rates that share no large common factor (44101 ->
    48000 Hz) raise :class:`AudioError` (a ValueError): their filter alone would need gigabytes.
    """
    orig_sr = _check_sample_rate(orig_sr, what="orig_sr", error=ValueError)
    target_sr = _check_sample_rate(target_sr, what="target_sr", error=ValueError)
    samples = np.ascontiguousarray(waveform, dtype=np.float32)
    if orig_sr == target_sr:
        return samples
    if samples.ndim != 1:  # [..., T]: each row on its own, as torchaudio does
        rows = [resample(row, orig_sr, target_sr) for row in samples.reshape(-1, samples.shape[-1])]
        return np.stack(rows).reshape(*samples.shape[:-1], -1)
    resampler = _Resampler(orig_sr, target_sr, what="The waveform")
    out = _GrowingArray(resampler.output_length(samples.shape[0]), limit=None)
    for chunk in (*resampler.push(samples), *resampler.finish()):
        out.append(chunk)
    return out.take()


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
# sources -> Audio


def _load_tuple(source: tuple, target_sample_rate: int | None, max_duration_s: float) -> Audio:
    if len(source) != 2:
        raise AudioError(f"An audio tuple must be (sample_rate, samples), got {len(source)} items.")
    sample_rate = _check_sample_rate(source[0], what="The sample rate of the audio array", error=AudioError)
    samples = np.asarray(source[1])
    # Shape alone gives the duration, so refuse long arrays before converting them.
    num_samples, channels, channels_first = _array_layout(samples)
    _check_duration(num_samples / sample_rate, max_duration_s)
    if num_samples == 0 or channels == 0:
        raise EmptyAudioError(f"The audio array (shape {samples.shape}) contains no samples.")
    rows = samples.reshape(-1, 1) if samples.ndim == 1 else (samples.T if channels_first else samples)  # [T, C] view
    sink = _MonoSink("<array>", sample_rate, channels, target_sample_rate, max_duration_s, num_samples)
    step = _block_frames(channels)
    for start in range(0, num_samples, step):  # converted block by block: no full-width float32 copy
        sink.push(_to_float32(rows[start : start + step]))  # [t, C]
    return sink.finish()


def _load_path(path: str, target_sample_rate: int | None, max_duration_s: float) -> Audio:
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "Audio file not found", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Expected an audio file, got a directory", path)
    name = os.path.basename(path) or path
    if os.path.getsize(path) == 0:
        raise EmptyAudioError(f"'{name}' is empty (0 bytes); it contains no samples.")

    audio, sf_error = _decode_soundfile(path, name, max_duration_s, target_sample_rate)
    if audio is not None:
        return audio
    if ffmpeg_available():
        return _decode_ffmpeg(path, name, max_duration_s, target_sample_rate)
    with open(path, "rb") as f:
        head = f.read(_PROBE_BYTES)
    _raise_not_decodable(name, head, os.path.splitext(path)[1], sf_error)


def _load_bytes(data: bytes, target_sample_rate: int | None, max_duration_s: float) -> Audio:
    name = "<bytes>"
    if not data:
        raise EmptyAudioError("The audio data is empty (0 bytes); it contains no samples.")

    audio, sf_error = _decode_soundfile(io.BytesIO(data), name, max_duration_s, target_sample_rate)
    if audio is not None:
        return audio
    if not ffmpeg_available():
        _raise_not_decodable(name, data[:_PROBE_BYTES], "", sf_error)
    # FFmpeg gets a real file, not a pipe: MP4/M4A may keep the index (moov atom) at the end, which needs seeking.
    tmp = tempfile.NamedTemporaryFile(prefix="audioscribe-", suffix=".bin", delete=False)
    try:
        with tmp:
            tmp.write(data)
        return _decode_ffmpeg(tmp.name, name, max_duration_s, target_sample_rate)
    finally:
        os.unlink(tmp.name)


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


def _decode_soundfile(
    file: str | io.BytesIO, name: str, max_duration_s: float, target_sample_rate: int | None
) -> tuple[Audio | None, str]:
    """Decode with libsndfile, block by block: (Audio, "") or (None, libsndfile's error) when it cannot read it."""
    try:
        info = sf.info(file)
    except _SOUNDFILE_ERRORS as exc:
        return None, _short_error(exc, file, name)
    sample_rate, channels = int(info.samplerate), int(info.channels)
    _check_stream_layout(sample_rate, channels, name)
    if info.frames > 0:  # some headers do not know their length; the sink still stops one block past the limit
        _check_duration(info.frames / sample_rate, max_duration_s)
    sink = _MonoSink(name, sample_rate, channels, target_sample_rate, max_duration_s, info.frames)
    if isinstance(file, io.BytesIO):
        file.seek(0)
    try:
        with sf.SoundFile(file) as sound:
            for block in _soundfile_blocks(sound):
                sink.push(block)
    except AudioError:
        raise  # the limit was hit: not a decoding failure, though AudioError is a ValueError too
    except _SOUNDFILE_ERRORS as exc:
        return None, _short_error(exc, file, name)
    return sink.finish(), ""


def _soundfile_blocks(sound: sf.SoundFile) -> Iterator[np.ndarray]:
    """Successive [t, C] float32 blocks of ``sound``, each a view of one reused buffer, until libsndfile stops."""
    buffer = np.empty((_block_frames(sound.channels), sound.channels), dtype=np.float32)
    while True:
        block = sound.read(out=buffer)  # reads to the end, not to the header's frame count, which may be wrong
        if block.shape[0] == 0:
            return
        yield block


def _decode_ffmpeg(path: str, name: str, max_duration_s: float, target_sample_rate: int | None) -> Audio:
    """Decode the first audio stream with FFmpeg at its native rate and channel count, streaming its output."""
    sample_rate, channels, duration_s = _ffprobe_audio_stream(path, name)
    _check_stream_layout(sample_rate, channels, name)
    if duration_s is not None:
        _check_duration(duration_s, max_duration_s)
    expected_frames = round(duration_s * sample_rate) if duration_s is not None else 0
    sink = _MonoSink(name, sample_rate, channels, target_sample_rate, max_duration_s, expected_frames)

    # -ac/-ar restate the probed values: normally no-ops, they guarantee the layout the reshape below relies on.
    # FFmpeg's own down-mix (-ac 1) is not used: it weights channels by layout (5.1 drops LFE), unlike the plain
    # mean that the soundfile path takes, and the output is streamed anyway, so its width costs no memory.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn", "-sn", "-dn",
           "-ac", str(channels), "-ar", str(sample_rate)]  # fmt: skip
    if not math.isinf(max_duration_s):
        cmd += ["-t", f"{max_duration_s + 1.0:.3f}"]  # bounded even when the container does not state a duration
    cmd += ["-f", "f32le", "-acodec", "pcm_f32le", "-"]
    # stderr goes to a file, not a pipe: a pipe nobody reads while stdout is streamed could fill up and block FFmpeg.
    with tempfile.TemporaryFile() as stderr:
        returncode = _stream_ffmpeg(cmd, channels, sink, stderr)
        if returncode != 0:
            raise UndecodableAudioError(
                f"FFmpeg could not decode '{name}': {_stderr_tail(_read_tail(stderr), path, name)}. "
                "The file may be corrupt or not audio at all."
            )
    return sink.finish()


def _stream_ffmpeg(cmd: list[str], channels: int, sink: _MonoSink, stderr: IO[bytes]) -> int:
    """Run FFmpeg, feed its raw float32 output to ``sink`` block by block, and return its exit status.

    If the sink refuses a block (too long), FFmpeg is killed instead of being left to decode the rest.
    """
    frame_bytes = 4 * channels
    buffer = bytearray(_block_frames(channels) * frame_bytes)
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    try:
        while (size := _read_full(process.stdout, buffer)) >= frame_bytes:
            usable = size // frame_bytes  # whole frames; a partial trailing frame (only at the end) is dropped
            sink.push(np.frombuffer(buffer, dtype="<f4", count=usable * channels).reshape(usable, channels))
            if size < len(buffer):
                break  # end of output
    except BaseException:
        process.kill()
        raise
    finally:
        process.stdout.close()
        process.wait()
    return process.returncode


def _read_full(stream: IO[bytes], buffer: bytearray) -> int:
    """Fill ``buffer`` from ``stream`` unless the stream ends first; returns the number of bytes read."""
    filled = 0
    with memoryview(buffer) as view:
        while filled < len(buffer):
            got = stream.readinto(view[filled:])
            if not got:
                break
            filled += got
    return filled


def _read_tail(file: IO[bytes], max_bytes: int = 1 << 16) -> bytes:
    """The last ``max_bytes`` of ``file``: FFmpeg may log an error per broken packet of a long file."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - max_bytes))
    return file.read()


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
    if (sample_rate or 0) <= 0 or (channels or 0) <= 0:
        raise UndecodableAudioError(f"'{name}' has an audio stream without a usable sample rate or channel count.")
    # Matroska/WebM store the duration only on the container, MP4 on both.
    duration = _to_float(stream.get("duration")) or _to_float((probe.get("format") or {}).get("duration"))
    return sample_rate, channels, duration


# --------------------------------------------------------------------------------------------------------------------
# block-wise down-mix and resampling


class _MonoSink:
    """Takes decoded frames block by block and keeps only the mono result at the output rate.

    Each block is checked (limit, NaN/inf), averaged to mono and resampled at once, so nothing as wide as the file
    is ever held. Errors come in the order a whole-file decode gave them: too long as soon as the limit is passed;
    empty, then non-finite, once every block is in.
    """

    def __init__(
        self,
        name: str,
        sample_rate: int,
        channels: int,
        target_sample_rate: int | None,
        max_duration_s: float,
        expected_frames: int,
    ) -> None:
        self._name, self._sample_rate, self._channels = name, sample_rate, channels
        self._out_rate = target_sample_rate or sample_rate
        self._max_duration_s = max_duration_s
        self._max_frames = _max_frames(max_duration_s, sample_rate)
        # Built before any decoding, so that unusable rates are refused from the header alone.
        self._resampler = (
            _Resampler(sample_rate, self._out_rate, what=f"'{name}'") if self._out_rate != sample_rate else None
        )
        self._out = _GrowingArray(
            self._output_length(self._expected_frames(expected_frames)),
            limit=None if self._max_frames is None else self._output_length(self._max_frames),
        )
        self._frames = 0  # input frames seen
        self._non_finite = 0  # frames with a NaN or infinity in any channel
        self._first_non_finite = 0

    def push(self, frames: np.ndarray) -> None:
        """Add frames [t, C] float32 (may be a view of a buffer the caller reuses: nothing keeps a reference)."""
        if self._max_frames is not None and self._frames + frames.shape[0] > self._max_frames:
            _raise_too_long(None, self._max_duration_s)  # the read stopped here, so the real length is unknown
        self._count_non_finite(frames)
        self._frames += frames.shape[0]
        if self._non_finite:
            return  # finish() will refuse the audio: down-mixing and resampling the rest would be wasted work
        mono = _downmix(frames)  # [t]
        for chunk in self._resampler.push(mono) if self._resampler is not None else (mono,):
            self._out.append(chunk)

    def finish(self) -> Audio:
        if self._frames == 0:
            raise EmptyAudioError(f"'{self._name}' contains no samples.")
        if self._non_finite:
            count, first = self._non_finite, self._first_non_finite
            raise NonFiniteAudioError(
                f"'{self._name}' contains {count} non-finite sample{'s' if count != 1 else ''} (NaN or infinity); "
                f"the first is at {_format_duration(first / self._sample_rate, decimals=3)} (sample {first})."
            )
        if self._resampler is not None:
            for chunk in self._resampler.finish():
                self._out.append(chunk)
        return Audio(
            waveform=self._out.take(),
            sample_rate=self._out_rate,
            original_sample_rate=self._sample_rate,
            original_channels=self._channels,
            source=self._name,
        )

    def _count_non_finite(self, frames: np.ndarray) -> None:
        finite = np.isfinite(frames)  # [t, C]
        if finite.all():
            return
        bad = ~finite.all(axis=1)  # [t] True where any channel is NaN or +-inf
        if not self._non_finite:
            self._first_non_finite = self._frames + int(np.argmax(bad))
        self._non_finite += int(bad.sum())

    def _expected_frames(self, header_frames: int) -> int:
        """Frames to allocate the output for: the header's count, within the limit (headers can lie or not know)."""
        if header_frames <= 0:
            header_frames = int(_UNKNOWN_LENGTH_S * self._sample_rate)
        return header_frames if self._max_frames is None else min(header_frames, self._max_frames)

    def _output_length(self, frames: int) -> int:
        return frames if self._resampler is None else self._resampler.output_length(frames)


class _Resampler:
    """``torchaudio.functional.resample`` fed block by block: the same sinc kernel and the same zero padding at both
    ends, applied to fixed spans of the signal so that the output does not depend on how the input was cut.

    torchaudio pads the whole signal x into [0] * width + x + [0] * (width + orig) and convolves it with stride
    ``orig`` (rates divided by their gcd): position j reads padded samples [j * orig, j * orig + taps) and gives
    ``new`` output samples. Only the padded signal from the next unprocessed position on is kept here.
    """

    def __init__(self, orig_sr: int, target_sr: int, *, what: str) -> None:
        gcd = math.gcd(orig_sr, target_sr)
        self._orig, self._new = orig_sr // gcd, target_sr // gcd
        # torchaudio's filter half-width for its defaults (lowpass_filter_width=6, rolloff=0.99), computed here to
        # refuse a huge kernel before building it.
        width = math.ceil(6 * self._orig / (min(self._orig, self._new) * 0.99))
        if self._new * (self._orig + 2 * width) > _MAX_RESAMPLE_KERNEL:
            raise AudioError(
                f"{what} has a sample rate of {orig_sr} Hz, which cannot be resampled to {target_sr} Hz at a "
                f"reasonable cost (the two rates share only a factor of {gcd}). "
                "Convert it to a common rate such as 44100 or 48000 Hz."
            )
        import torch  # imported here: torch costs seconds to import, and loading at the native rate does not need it
        import torchaudio.transforms

        transform = torchaudio.transforms.Resample(orig_sr, target_sr, dtype=torch.float32)
        kernel = transform.kernel.numpy()  # [new, 1, taps]
        self._taps = kernel.shape[-1]
        self._kernel_t = np.ascontiguousarray(kernel[:, 0, :].T)  # [taps, new]
        self._tail = transform.width + self._orig  # zeros torchaudio appends after the signal
        # Positions per product: the windows [chunk, taps] and the output [chunk, new] stay within the budget.
        self._chunk = max(1, _RESAMPLE_BUDGET // max(self._taps, self._new))
        self._pending = np.zeros(transform.width, dtype=np.float32)  # padded signal not yet fully used
        self._length = 0  # input samples seen
        self._emitted = 0  # output samples returned

    def output_length(self, num_samples: int) -> int:
        """ceil(T * new / orig) output samples for T input samples, as torchaudio."""
        return -(-num_samples * self._new // self._orig)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Add input samples [t]; returns the output chunks that are now complete."""
        self._length += samples.shape[0]
        self._pending = np.concatenate([self._pending, samples])
        return self._convolve(final=False)

    def finish(self) -> list[np.ndarray]:
        """The remaining output, trimmed to ``output_length`` of all the input."""
        self._pending = np.concatenate([self._pending, np.zeros(self._tail, dtype=np.float32)])
        chunks, keep = [], self.output_length(self._length) - self._emitted
        for chunk in self._convolve(final=True):
            chunks.append(chunk[:keep])
            keep -= chunks[-1].shape[0]
        return chunks

    def _convolve(self, *, final: bool) -> list[np.ndarray]:
        positions = max(0, (self._pending.shape[0] - self._taps) // self._orig + 1)
        if not final:
            positions -= positions % self._chunk  # whole chunks only: spans fall at the same places for any blocks
        chunks = []
        for start in range(0, positions, self._chunk):
            count = min(self._chunk, positions - start)
            span = self._pending[start * self._orig : (start + count - 1) * self._orig + self._taps]
            chunks.append(self._apply_kernel(span))  # [count * new]
        self._pending = self._pending[positions * self._orig :]
        self._emitted += sum(chunk.shape[0] for chunk in chunks)
        return chunks

    def _apply_kernel(self, span: np.ndarray) -> np.ndarray:
        """torchaudio's strided conv1d as a product of the sliding windows with the kernel, in NumPy: torch's
        threaded conv1d costs milliseconds of thread synchronisation per call on a busy CPU, times hundreds of
        calls per file."""
        windows = sliding_window_view(span, self._taps)[:: self._orig]  # [count, taps], a strided view
        if self._new > 1:
            windows = np.ascontiguousarray(windows)  # a BLAS matrix product pays for this copy
        return (windows @ self._kernel_t).reshape(-1)  # [count, new] -> position-major, as torchaudio interleaves


class _GrowingArray:
    """A float32 array filled from the front and grown in place (realloc), not rebuilt from pieces at the end, so
    that the peak stays near the final size."""

    def __init__(self, capacity: int, *, limit: int | None) -> None:
        # np.empty: pages a too-high estimate never fills are never touched, so they cost no memory.
        self._data = np.empty(max(capacity, 1), dtype=np.float32)
        self._size = 0
        self._limit = limit  # never grow past this by over-allocating (only by what is really appended)

    def append(self, samples: np.ndarray) -> None:
        end = self._size + samples.shape[0]
        if end > self._data.shape[0]:
            capacity = max(end, self._data.shape[0] * 3 // 2)
            if self._limit is not None:
                capacity = max(end, min(capacity, self._limit))
            self._data.resize(capacity, refcheck=False)  # safe: no view of the buffer outlives a call
        self._data[self._size : end] = samples
        self._size = end

    def take(self) -> np.ndarray:
        """The filled part, C-contiguous and writeable; the object must not be used afterwards."""
        self._data.resize(self._size, refcheck=False)
        return self._data


def _block_frames(channels: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * channels))


def _check_stream_layout(sample_rate: int, channels: int, name: str) -> None:
    """Refuse, from the header, channel counts and rates that no real recording has."""
    if channels > MAX_CHANNELS:
        raise AudioError(
            f"'{name}' has {channels} audio channels; at most {MAX_CHANNELS} are supported. "
            "Down-mix it to fewer channels first."
        )
    if sample_rate > MAX_SAMPLE_RATE:
        raise AudioError(
            f"'{name}' has a sample rate of {sample_rate} Hz; at most {MAX_SAMPLE_RATE} Hz is supported. "
            "Convert it to a common rate such as 44100 or 48000 Hz."
        )


# --------------------------------------------------------------------------------------------------------------------
# shared steps


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


def _short_error(exc: Exception, file: object, name: str) -> str:
    """libsndfile's own words on one line; soundfile's wrapper text around them quotes the full path."""
    text = (getattr(exc, "error_string", None) or str(exc)).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    return _hide_path(text, file, name) if isinstance(file, str) else text


def _stderr_tail(stderr: bytes, path: str, name: str, max_chars: int = 500) -> str:
    """The end of FFmpeg's error output, with the (possibly temporary) path replaced by the name the user knows."""
    text = _hide_path(stderr.decode("utf-8", errors="replace").strip(), path, name)
    return (text[-max_chars:] if text else "no error output").replace("\n", " | ")


def _hide_path(text: str, path: str, name: str) -> str:
    """``text`` with the file's path replaced by ``name`` and its folder removed: a message must not show where
    the server keeps files (for uploads, Gradio's temporary folder)."""
    for full in dict.fromkeys((path, os.path.abspath(path))):  # as given and absolute, in that order
        text = text.replace(full, name)
        folder = os.path.dirname(full)
        if folder:
            text = text.replace(folder + os.sep, "")
    return text


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
