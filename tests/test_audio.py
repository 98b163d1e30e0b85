"""engine.audio: decoding every supported input into mono float32, the error paths, and window planning.

All audio is synthesised into tmp_path at test time. Tests that need FFmpeg are marked with ``requires_ffmpeg``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine import audio as audio_mod
from engine.audio import (
    Audio,
    Window,
    ffmpeg_available,
    load_audio,
    plan_windows,
    resample,
    split_windows,
    to_mono,
)
from engine.errors import (
    AudioError,
    AudioTooLongError,
    EmptyAudioError,
    NonFiniteAudioError,
    UndecodableAudioError,
    UnsupportedFormatError,
)
from tests.audio_synth import (
    ensure_ffmpeg,
    ffmpeg_encode,
    ffmpeg_lavfi,
    noise,
    peak_frequency,
    requires_ffmpeg,
    rms,
    sine,
    write_sf,
    write_silent_wav,
)
from tests.helpers import PROJECT_ROOT

SR = 48000


@pytest.fixture
def sine_wav(tmp_path: Path) -> Path:
    """2 s of a 1 kHz sine at 48 kHz, PCM_16: the source for the lossy encodes."""
    return write_sf(tmp_path / "sine.wav", sine(1000, SR, 2.0), SR, subtype="PCM_16")


@pytest.fixture
def no_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_mod, "ffmpeg_available", lambda: False)


@pytest.fixture
def forbid_decoding(monkeypatch: pytest.MonkeyPatch):
    """Call it (after making the test files) to make every full decode fail, proving a check used the header alone.

    Reading samples with soundfile and starting ``ffmpeg`` fail; ``sf.info`` and ``ffprobe`` keep working.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("the audio was decoded, but the check should have happened before decoding")

    real_popen = subprocess.Popen

    def popen_probe_only(cmd, *args, **kwargs):
        if cmd[0] == "ffmpeg":
            refuse()
        return real_popen(cmd, *args, **kwargs)

    def arm() -> None:
        monkeypatch.setattr(sf, "read", refuse)
        monkeypatch.setattr(sf.SoundFile, "read", refuse)
        monkeypatch.setattr(audio_mod.subprocess, "Popen", popen_probe_only)  # subprocess.run starts a Popen too

    return arm


# --------------------------------------------------------------------------------------------------------------------
# lossless formats reproduce the samples


def _pcm16_samples(num: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(-32768, 32768, size=(num, channels), dtype=np.int16)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "AIFF", "WAVEX"])
def test_pcm16_is_exact(tmp_path: Path, fmt: str) -> None:
    ints = _pcm16_samples(SR // 2)  # [T, 1]
    path = write_sf(tmp_path / f"x.{fmt.lower()}", ints, SR, format=fmt, subtype="PCM_16")
    audio = load_audio(path)
    # libsndfile scales 16-bit PCM by 1/32768, so the float samples are exactly the integers / 2**15.
    np.testing.assert_array_equal(audio.waveform, ints[:, 0].astype(np.float32) / 32768)
    assert audio.sample_rate == SR and audio.original_sample_rate == SR and audio.original_channels == 1
    assert audio.duration_s == pytest.approx(0.5)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_pcm24_is_exact(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(2)
    ints24 = rng.integers(-(2**23), 2**23, size=SR // 4, dtype=np.int32)
    # soundfile writes int32 arrays to PCM_24 by keeping the top 24 bits, so put the values there.
    path = write_sf(tmp_path / f"x.{fmt.lower()}", ints24 << 8, SR, format=fmt, subtype="PCM_24")
    audio = load_audio(path)
    np.testing.assert_array_equal(audio.waveform, (ints24 / 2**23).astype(np.float32))


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_float_wav_is_exact_and_not_normalised(tmp_path: Path, subtype: str) -> None:
    data = noise(SR // 4, amplitude=3.0)  # beyond [-1, 1]: nothing may clip or rescale it
    audio = load_audio(write_sf(tmp_path / "x.wav", data, SR, subtype=subtype))
    np.testing.assert_array_equal(audio.waveform, data)
    assert audio.waveform.dtype == np.float32 and audio.waveform.flags.c_contiguous


def test_pcm32_and_u8_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ints = rng.integers(-(2**31), 2**31, size=1000, dtype=np.int32)
    audio = load_audio(write_sf(tmp_path / "x32.wav", ints, SR, subtype="PCM_32"))
    np.testing.assert_allclose(audio.waveform, ints / 2**31, atol=1e-7)
    u8 = write_sf(tmp_path / "x8.wav", np.array([-1.0, -0.5, 0.0, 0.5], dtype=np.float32), SR, subtype="PCM_U8")
    np.testing.assert_array_equal(load_audio(u8).waveform, [-1.0, -0.5, 0.0, 0.5])


# --------------------------------------------------------------------------------------------------------------------
# lossy formats: right duration, rate and pitch


# (extension, how to make it from the 2 s sine wav, duration tolerance in s: encoder padding/priming)
_SOUNDFILE_LOSSY = {
    "mp3": dict(format="MP3", subtype="MPEG_LAYER_III"),
    "ogg": dict(format="OGG", subtype="VORBIS"),
    "opus": dict(format="OGG", subtype="OPUS"),
}
_FFMPEG_LOSSY = {
    "m4a": ("-c:a", "aac", "-b:a", "128k"),
    "mp4": ("-c:a", "aac", "-b:a", "128k"),
    "webm": ("-c:a", "libopus", "-b:a", "96k"),
    "mkv": ("-c:a", "libvorbis"),
}


def _assert_decoded_sine(audio: Audio, expected_sr: int = SR) -> None:
    assert audio.sample_rate == expected_sr
    assert audio.original_channels == 1
    # AAC pads to whole 1024-sample frames; 30 ms covers every codec here.
    assert audio.duration_s == pytest.approx(2.0, abs=0.03)
    assert peak_frequency(audio.waveform, audio.sample_rate) == pytest.approx(1000, abs=2)
    assert rms(audio.waveform) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert audio.waveform.dtype == np.float32 and audio.waveform.flags.c_contiguous


@pytest.mark.parametrize("ext", sorted(_SOUNDFILE_LOSSY))
def test_soundfile_lossy_formats(tmp_path: Path, ext: str) -> None:
    path = write_sf(tmp_path / f"x.{ext}", sine(1000, SR, 2.0), SR, **_SOUNDFILE_LOSSY[ext])
    audio = load_audio(path)
    _assert_decoded_sine(audio)
    assert audio.source == f"x.{ext}"


@pytest.mark.parametrize("ext", sorted(_FFMPEG_LOSSY))
@requires_ffmpeg
def test_ffmpeg_formats(tmp_path: Path, sine_wav: Path, ext: str) -> None:
    path = ffmpeg_encode(sine_wav, tmp_path / f"x.{ext}", *_FFMPEG_LOSSY[ext])
    _assert_decoded_sine(load_audio(path))


@requires_ffmpeg
def test_ffmpeg_path_matches_soundfile_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both decoders must give the very same samples: native rate and channels, and our own down-mix."""
    ints = _pcm16_samples(SR // 2, channels=6)
    path = write_sf(tmp_path / "x.flac", ints, SR, subtype="PCM_16")
    via_soundfile = load_audio(path, target_sample_rate=16000)
    monkeypatch.setattr(audio_mod, "_decode_soundfile", lambda *a, **k: (None, "forced"))
    via_ffmpeg = load_audio(path, target_sample_rate=16000)
    np.testing.assert_array_equal(via_ffmpeg.waveform, via_soundfile.waveform)
    assert (via_ffmpeg.original_channels, via_ffmpeg.original_sample_rate) == (6, SR)


@requires_ffmpeg
def test_ffmpeg_keeps_native_rate_and_channels(tmp_path: Path) -> None:
    left, right = sine(440, 44100, 1.0, 0.4), sine(2000, 44100, 1.0, 0.2)
    src = write_sf(tmp_path / "st.wav", np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    audio = load_audio(ffmpeg_encode(src, tmp_path / "st.m4a", "-c:a", "aac", "-b:a", "192k"))
    assert (audio.sample_rate, audio.original_sample_rate, audio.original_channels) == (44100, 44100, 2)
    # The mean of the channels: both tones at half their amplitude.
    spectrum = np.abs(np.fft.rfft(audio.waveform[:44100])) / (44100 / 2)
    assert spectrum[440] == pytest.approx(0.2, rel=0.05) and spectrum[2000] == pytest.approx(0.1, rel=0.05)


# --------------------------------------------------------------------------------------------------------------------
# resampling


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000, 192000])
def test_resample_to_48k_keeps_duration_and_pitch(tmp_path: Path, rate: int) -> None:
    path = write_sf(tmp_path / "x.wav", sine(1000, rate, 1.0), rate, subtype="FLOAT")
    audio = load_audio(path, target_sample_rate=SR)
    assert audio.sample_rate == SR and audio.original_sample_rate == rate
    assert len(audio.waveform) == SR  # 1 s exactly: ceil(T * 48000 / rate) with T = rate
    assert peak_frequency(audio.waveform, SR) == pytest.approx(1000, abs=1)
    # Amplitude survives (edges excluded: the sinc filter sees zeros beyond the clip).
    assert rms(audio.waveform[SR // 10 : -SR // 10]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    assert audio.waveform.dtype == np.float32 and audio.waveform.flags.c_contiguous


def test_resample_is_a_no_op_at_the_same_rate() -> None:
    x = sine(1000, SR, 0.1)
    np.testing.assert_array_equal(resample(x, SR, SR), x)
    assert resample(x.astype(np.float64), SR, SR).dtype == np.float32
    with pytest.raises(ValueError, match="target_sr"):
        resample(x, SR, 0)


def test_no_target_rate_keeps_native(tmp_path: Path) -> None:
    audio = load_audio(write_sf(tmp_path / "x.wav", sine(1000, 22050, 0.5), 22050))
    assert audio.sample_rate == audio.original_sample_rate == 22050


# --------------------------------------------------------------------------------------------------------------------
# down-mix


@pytest.mark.parametrize("channels", range(1, 9))
def test_downmix_is_the_channel_mean(tmp_path: Path, channels: int) -> None:
    # Channel c holds a constant offset plus its own tone, so any weighting other than the plain mean shows.
    t = np.arange(SR // 10) / SR
    data = np.stack(
        [0.05 * (c + 1) + 0.1 * np.sin(2 * np.pi * 300 * (c + 1) * t) for c in range(channels)], axis=1
    ).astype(np.float32)  # [T, C]
    audio = load_audio(write_sf(tmp_path / "x.wav", data, SR, subtype="FLOAT"))
    assert audio.original_channels == channels
    np.testing.assert_allclose(audio.waveform, data.mean(axis=1), atol=1e-7)
    assert np.mean(audio.waveform) == pytest.approx(0.05 * (channels + 1) / 2, abs=2e-3)


# --------------------------------------------------------------------------------------------------------------------
# (sample_rate, array) tuples, as Gradio gives them


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 16384, -32768, 32767], dtype=np.int16), [0.0, 0.5, -1.0, 32767 / 32768]),
        (np.array([0, 2**30, -(2**31)], dtype=np.int32), [0.0, 0.5, -1.0]),
        (np.array([128, 192, 0, 255], dtype=np.uint8), [0.0, 0.5, -1.0, 127 / 128]),
        (np.array([0, 64, -128], dtype=np.int8), [0.0, 0.5, -1.0]),
        (np.array([0.25, -0.75, 2.0], dtype=np.float64), [0.25, -0.75, 2.0]),
        (np.array([0.25, -0.75], dtype=np.float16), [0.25, -0.75]),
    ],
    ids=["int16", "int32", "uint8", "int8", "float64", "float16"],
)
def test_tuple_dtypes_are_scaled(values: np.ndarray, expected: list[float]) -> None:
    audio = load_audio((16000, values))
    np.testing.assert_array_equal(audio.waveform, np.array(expected, dtype=np.float32))
    assert audio.waveform.dtype == np.float32
    assert (audio.sample_rate, audio.original_channels, audio.source) == (16000, 1, "<array>")


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.float64])
@pytest.mark.parametrize("channels_first", [False, True])
def test_tuple_layouts(dtype: type, channels_first: bool) -> None:
    left = np.full(1000, 0.5)
    right = np.linspace(-1.0, 0.5, 1000)
    stereo = np.stack([left, right], axis=1)  # [T, 2] in [-1, 1]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        offset = 128 if dtype == np.uint8 else 0
        scale = -info.min if dtype != np.uint8 else 128
        stereo_q = np.clip(np.round(stereo * scale) + offset, info.min, info.max).astype(dtype)
        expected = ((stereo_q.astype(np.float64) - offset) / scale).mean(axis=1)
    else:
        stereo_q = stereo.astype(dtype)
        expected = stereo.mean(axis=1)
    array = stereo_q.T if channels_first else stereo_q
    audio = load_audio((8000, array))
    assert audio.original_channels == 2
    assert audio.duration_s == pytest.approx(1000 / 8000)
    np.testing.assert_allclose(audio.waveform, expected, atol=1e-6)


def test_to_mono_layout_rule() -> None:
    # (samples, channels) is the default; at most 8 rows with more columns than rows means (channels, samples).
    assert to_mono(np.ones((3, 2), dtype=np.float32)).shape == (3,)
    assert to_mono(np.ones((2, 3), dtype=np.float32)).shape == (3,)
    assert to_mono(np.ones((8, 9), dtype=np.float32)).shape == (9,)
    assert to_mono(np.ones((9, 10), dtype=np.float32)).shape == (9,)  # 9 channels-first is not recognised
    assert to_mono(np.ones((4, 4), dtype=np.float32)).shape == (4,)
    np.testing.assert_array_equal(to_mono(np.array([[1.0, 3.0], [2.0, 4.0]])), [2.0, 3.0])


def test_tuple_array_is_copied() -> None:
    samples = np.zeros(100, dtype=np.float32)
    audio = load_audio((8000, samples))
    samples[:] = 1.0  # the caller reusing its buffer must not change the Audio
    assert not audio.waveform.any()


def test_tuple_resampled() -> None:
    audio = load_audio((16000, sine(1000, 16000, 1.0)), target_sample_rate=SR)
    assert (audio.sample_rate, audio.original_sample_rate, len(audio.waveform)) == (SR, 16000, SR)
    assert peak_frequency(audio.waveform, SR) == pytest.approx(1000, abs=1)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ((16000, np.zeros((2, 3, 4), dtype=np.float32)), AudioError, "1-D .* or 2-D"),
        ((0, np.zeros(10, dtype=np.float32)), AudioError, "sample rate .* positive integer"),
        ((-8000, np.zeros(10, dtype=np.float32)), AudioError, "positive integer"),
        ((44100.0, np.zeros(10, dtype=np.float32)), AudioError, "positive integer"),
        ((True, np.zeros(10, dtype=np.float32)), AudioError, "positive integer"),
        ((16000, np.zeros(10, dtype=np.int64)), AudioError, "Unsupported audio sample type int64"),
        ((16000, np.zeros(10, dtype=np.complex64)), AudioError, "Unsupported audio sample type"),
        ((16000, np.zeros(0, dtype=np.int16)), EmptyAudioError, "contains no samples"),
        ((16000, np.zeros((0, 2), dtype=np.int16)), EmptyAudioError, "contains no samples"),
        ((16000,), AudioError, r"\(sample_rate, samples\)"),
    ],
)
def test_bad_tuples(source: tuple, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        load_audio(source)
    assert type(info.value) is error


def test_numpy_integer_sample_rate_is_accepted() -> None:
    assert load_audio((np.int64(8000), np.zeros(8, dtype=np.int16))).sample_rate == 8000


# --------------------------------------------------------------------------------------------------------------------
# bytes


def test_wav_bytes_match_the_file(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "x.wav", noise(4000, channels=2), 16000, subtype="PCM_16")
    from_path = load_audio(path)
    for data in (path.read_bytes(), bytearray(path.read_bytes())):
        from_bytes = load_audio(data)
        np.testing.assert_array_equal(from_bytes.waveform, from_path.waveform)
        assert (from_bytes.source, from_bytes.original_channels) == ("<bytes>", 2)


@requires_ffmpeg
def test_m4a_bytes_match_the_file_and_leave_no_temp_file(
    tmp_path: Path, sine_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ffmpeg_encode(sine_wav, tmp_path / "x.m4a", "-c:a", "aac")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_bytes = load_audio(path.read_bytes())
    np.testing.assert_array_equal(from_bytes.waveform, load_audio(path).waveform)
    assert from_bytes.source == "<bytes>"
    assert list(scratch.iterdir()) == []


@requires_ffmpeg
def test_ffmpeg_errors_name_the_source_not_the_temp_file() -> None:
    garbage = b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 4  # an MP4 signature over junk
    with pytest.raises(UndecodableAudioError, match="<bytes>") as info:
        load_audio(garbage)
    assert tempfile.gettempdir() not in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# bad input


def test_zero_length_wav(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SR, subtype="PCM_16")
    with pytest.raises(EmptyAudioError, match="'empty.wav' contains no samples"):
        load_audio(path)
    with pytest.raises(EmptyAudioError, match="contains no samples"):
        load_audio(path.read_bytes())


def test_zero_bytes(tmp_path: Path) -> None:
    with pytest.raises(EmptyAudioError, match=r"empty \(0 bytes\)"):
        load_audio(b"")
    empty_file = tmp_path / "nothing.wav"
    empty_file.touch()
    with pytest.raises(EmptyAudioError, match=r"'nothing.wav' is empty \(0 bytes\)"):
        load_audio(empty_file)


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["with-ffmpeg", "without-ffmpeg"])
def test_random_garbage_bytes(monkeypatch: pytest.MonkeyPatch, ffmpeg: bool) -> None:
    if ffmpeg:
        ensure_ffmpeg()
    else:
        monkeypatch.setattr(audio_mod, "ffmpeg_available", lambda: False)
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(UndecodableAudioError, match="Could not decode '<bytes>'.*corrupt or not audio"):
        load_audio(garbage)


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["with-ffmpeg", "without-ffmpeg"])
def test_truncated_wav_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ffmpeg: bool) -> None:
    if ffmpeg:
        ensure_ffmpeg()
    else:
        monkeypatch.setattr(audio_mod, "ffmpeg_available", lambda: False)
    full = write_sf(tmp_path / "full.wav", sine(1000, SR, 0.1), SR, subtype="PCM_16").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[:30])  # stops inside the fmt chunk
    with pytest.raises(UndecodableAudioError, match="'cut.wav'"):
        load_audio(cut)


def test_corrupt_wav_format_field(tmp_path: Path, no_ffmpeg: None) -> None:
    data = bytearray(write_sf(tmp_path / "ok.wav", sine(1000, SR, 0.1), SR, subtype="PCM_16").read_bytes())
    data[20:22] = (0x7777).to_bytes(2, "little")  # an audio format code that does not exist
    with pytest.raises(UndecodableAudioError, match="corrupt or not audio"):
        load_audio(bytes(data))


def test_wav_with_data_cut_short_decodes_what_is_there(tmp_path: Path) -> None:
    ints = _pcm16_samples(1000)
    data = write_sf(tmp_path / "x.wav", ints, SR, subtype="PCM_16").read_bytes()
    audio = load_audio(data[: 44 + 2 * 600])  # header still claims 1000 samples
    np.testing.assert_array_equal(audio.waveform, ints[:600, 0] / np.float32(32768))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_wav(tmp_path: Path, bad: float) -> None:
    data = sine(1000, 16000, 1.0)
    data[[8000, 8001, 12000]] = bad  # first bad sample at exactly 0.5 s
    path = write_sf(tmp_path / "bad.wav", data, 16000, subtype="FLOAT")
    with pytest.raises(NonFiniteAudioError, match=r"'bad.wav' contains 3 non-finite samples .* 0:00:00\.500 "):
        load_audio(path, target_sample_rate=SR)


def test_non_finite_arrays() -> None:
    stereo = np.zeros((1000, 2), dtype=np.float64)
    stereo[250, 1] = np.nan
    stereo[999, 0] = np.inf
    with pytest.raises(NonFiniteAudioError, match=r"2 non-finite samples .* 0:00:00\.250 \(sample 250\)"):
        load_audio((1000, stereo))
    with pytest.raises(NonFiniteAudioError, match=r"1 non-finite sample \("):
        load_audio((1000, np.array([0.0, np.inf], dtype=np.float32)))


def test_too_long_is_refused_from_the_header(tmp_path: Path, forbid_decoding) -> None:
    path = write_sf(tmp_path / "five.wav", sine(1000, 8000, 5.0), 8000, subtype="PCM_16")
    forbid_decoding()
    with pytest.raises(AudioTooLongError, match=r"Audio is 0:00:05 long; the limit is 0:00:02\. Split the file"):
        load_audio(path, max_duration_s=2)
    with pytest.raises(AudioTooLongError, match=r"0:00:05 long; the limit is 0:00:02\.5\."):
        load_audio(path.read_bytes(), max_duration_s=2.5)


def test_two_hour_file_is_refused_without_decoding(tmp_path: Path, forbid_decoding) -> None:
    path = write_silent_wav(tmp_path / "two_hours.wav", duration_s=7200, sample_rate=8000)
    assert sf.info(str(path)).frames == 7200 * 8000  # really 2 h of 8 kHz PCM_16 (sparse on disk)
    forbid_decoding()
    with pytest.raises(
        AudioTooLongError,
        match=r"^Audio is 2:00:00 long; the limit is 0:30:00\. Split the file, or raise audio\.max_duration_s\.$",
    ):
        load_audio(path)


def test_limit_boundary(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "two.wav", sine(1000, 8000, 2.0), 8000, subtype="PCM_16")
    assert load_audio(path, max_duration_s=2.0).duration_s == 2.0  # exactly at the limit is fine
    with pytest.raises(AudioTooLongError):
        load_audio((8000, np.zeros(8001, dtype=np.int16)), max_duration_s=1.0)
    with pytest.raises(ValueError, match="max_duration_s"):
        load_audio(path, max_duration_s=0)


def test_header_understating_length_is_still_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a header claims no length, the read itself stops one frame past the limit."""
    path = write_sf(tmp_path / "five.wav", sine(1000, 8000, 5.0), 8000, subtype="PCM_16")
    real_info = sf.info

    def info_without_length(file):
        info = real_info(file)
        info.frames = 0
        return info

    monkeypatch.setattr(sf, "info", info_without_length)
    with pytest.raises(AudioTooLongError, match=r"^Audio is longer than the limit of 0:00:02\. Split the file"):
        load_audio(path, max_duration_s=2)


@requires_ffmpeg
def test_too_long_ffmpeg_file_is_refused_from_ffprobe(tmp_path: Path, forbid_decoding) -> None:
    src = write_sf(tmp_path / "five.wav", sine(1000, SR, 5.0), SR, subtype="PCM_16")
    path = ffmpeg_encode(src, tmp_path / "five.m4a", "-c:a", "aac")
    forbid_decoding()
    with pytest.raises(AudioTooLongError, match=r"Audio is 0:00:05 long; the limit is 0:00:02\."):
        load_audio(path, max_duration_s=2)


@requires_ffmpeg
def test_ffmpeg_output_is_bounded_without_a_duration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container that states no duration is still cut off just past the limit instead of decoded in full."""
    src = write_sf(tmp_path / "five.wav", sine(1000, SR, 5.0), SR, subtype="PCM_16")
    path = ffmpeg_encode(src, tmp_path / "five.webm", "-c:a", "libopus")
    real_probe = audio_mod._ffprobe_audio_stream
    monkeypatch.setattr(audio_mod, "_ffprobe_audio_stream", lambda *a: (*real_probe(*a)[:2], None))
    with pytest.raises(AudioTooLongError, match=r"^Audio is longer than the limit of 0:00:02\. Split the file"):
        load_audio(path, max_duration_s=2)
    assert load_audio(path, max_duration_s=6).duration_s == pytest.approx(5.0, abs=0.03)


@requires_ffmpeg
def test_ffmpeg_missing_for_m4a(tmp_path: Path, sine_wav: Path, no_ffmpeg: None) -> None:
    path = ffmpeg_encode(sine_wav, tmp_path / "x.m4a", "-c:a", "aac")
    for source in (path, path.read_bytes()):
        with pytest.raises(UnsupportedFormatError, match="MPEG-4.*FFmpeg is not installed") as info:
            load_audio(source)
        assert "apt-get install ffmpeg" in str(info.value) and "packages.txt" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("clip.bin", b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + b"\x00" * 64, "MPEG-4"),
        ("clip.bin", b"\x1a\x45\xdf\xa3" + b"\x00" * 64, "Matroska/WebM"),
        ("clip.bin", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11" + b"\x00" * 64, "ASF/WMA"),
        ("clip.bin", b"\xff\xf1\x50\x80" + b"\x00" * 64, "AAC"),
        ("clip.webm", b"junk" * 20, "WebM"),
        ("clip.M4A", b"junk" * 20, "M4A"),
        ("clip.wma", b"junk" * 20, "WMA"),
    ],
)
def test_ffmpeg_containers_without_ffmpeg(
    tmp_path: Path, no_ffmpeg: None, name: str, content: bytes, match: str
) -> None:
    """Detected by magic bytes or extension alone, so this runs (and matters most) where FFmpeg is absent."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError, match=f"{match}.*FFmpeg is not installed"):
        load_audio(path)


def test_ffmpeg_available_reads_path_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_mod.shutil, "which", lambda name: None)
    assert ffmpeg_available() is False
    monkeypatch.setattr(audio_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert ffmpeg_available() is True
    monkeypatch.setattr(audio_mod.shutil, "which", lambda name: None if name == "ffprobe" else "/usr/bin/ffmpeg")
    assert ffmpeg_available() is False  # ffmpeg alone is not enough: durations come from ffprobe


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["with-ffmpeg", "without-ffmpeg"])
def test_text_file_named_wav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ffmpeg: bool) -> None:
    if ffmpeg:
        ensure_ffmpeg()
    else:
        monkeypatch.setattr(audio_mod, "ffmpeg_available", lambda: False)
    path = tmp_path / "notes.wav"
    path.write_text("These are my meeting notes, not audio.\n" * 50)
    with pytest.raises(UndecodableAudioError, match="'notes.wav'") as info:
        load_audio(path)
    assert type(info.value) is UndecodableAudioError  # not UnsupportedFormatError: FFmpeg would not help


@requires_ffmpeg
def test_video_without_audio(tmp_path: Path) -> None:
    path = ffmpeg_lavfi(tmp_path / "silent_video.mp4", "color=c=black:s=16x16:d=0.2", "-c:v", "mpeg4")
    with pytest.raises(UndecodableAudioError, match="'silent_video.mp4' contains no audio stream"):
        load_audio(path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav") as info:
        load_audio(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_audio(str(missing))


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "x.wav", sine(1000, 8000, 0.1), 8000)
    with pytest.raises(ValueError, match="target_sample_rate"):
        load_audio(path, target_sample_rate=0)
    with pytest.raises(TypeError, match="Unsupported audio source"):
        load_audio(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# memory: files are decoded in blocks, down-mixed and resampled as they go (fault 4 of issue 8)


# Decodes argv[1] at 48 kHz and prints how far its peak RSS rose above its RSS before the decode, in MiB.
# argv[2] == "ffmpeg" forces the FFmpeg path.
_DECODE_IN_CHILD = """
import json, sys
import numpy as np
import torch, torchaudio.transforms  # loaded by the app before any upload: not a decode's cost
from engine import audio as audio_mod
from tests.helpers import proc_status_kib, reset_peak_rss

if sys.argv[2] == "ffmpeg":
    audio_mod._decode_soundfile = lambda *args: (None, "forced")
audio_mod.load_audio((96000, np.zeros((9600, 8), np.float32)), 48000)  # warm-up: one-off first-use allocations
reset_peak_rss()
before = proc_status_kib("VmRSS")
audio = audio_mod.load_audio(sys.argv[1], 48000)
print(json.dumps({
    "growth_mib": (proc_status_kib("VmHWM") - before) / 1024,
    "layout": [audio.num_samples, audio.sample_rate, audio.original_sample_rate, audio.original_channels],
    "silent": not audio.waveform.any(),
}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads a process's peak RSS from Linux /proc")
@pytest.mark.parametrize("decoder", ["soundfile", "ffmpeg"])
def test_wide_hires_flac_decodes_within_the_size_of_its_mono_result(tmp_path: Path, decoder: str) -> None:
    """8 channels x 96 kHz x 5 min of silence: a FLAC of a few hundred KB that once took 2 GB to decode.

    Bound: the peak RSS of the decoding process may rise by the mono float32 result at 48 kHz (5 min x 48 kHz x 4 B
    = 55 MiB) plus 64 MiB for blocks and buffers. The file as float32 is 879 MiB, 8x the mono result at 96 kHz.
    """
    if decoder == "ffmpeg":
        ensure_ffmpeg()
    path = tmp_path / "wide.flac"
    with sf.SoundFile(path, "w", samplerate=96000, channels=8, subtype="PCM_16", format="FLAC") as out:
        silence = np.zeros((96000 * 10, 8), dtype=np.int16)
        for _ in range(30):
            out.write(silence)
    done = subprocess.run([sys.executable, "-c", _DECODE_IN_CHILD, str(path), decoder],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layout"] == [300 * SR, SR, 96000, 8] and result["silent"]
    bound_mib = 300 * SR * 4 / 2**20 + 64
    assert result["growth_mib"] < bound_mib, f"peak RSS rose by {result['growth_mib']:.0f} MiB (> {bound_mib:.0f})"


@pytest.fixture(scope="module")
def long_multichannel_flac(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """41.7 s of 6-channel noise, PCM_16 FLAC: 12 decode blocks of 174,762 frames, the last one ragged."""
    ints = np.random.default_rng(7).integers(-30000, 30000, size=(2_000_003, 6), dtype=np.int16)
    path = write_sf(tmp_path_factory.mktemp("long") / "long.flac", ints, SR, subtype="PCM_16")
    reference = sf.read(str(path), dtype="float32", always_2d=True)[0].mean(axis=1)  # whole file at once, [T]
    return path, reference


@pytest.mark.parametrize("decoder", ["soundfile", "ffmpeg"])
def test_block_decoding_equals_a_whole_file_decode(
    long_multichannel_flac: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch, decoder: str
) -> None:
    import torch
    import torchaudio.functional as taf

    path, reference = long_multichannel_flac
    if decoder == "ffmpeg":
        ensure_ffmpeg()
        monkeypatch.setattr(audio_mod, "_decode_soundfile", lambda *a, **k: (None, "forced"))
    native = load_audio(path)
    assert (native.num_samples, native.original_channels, native.sample_rate) == (2_000_003, 6, SR)
    np.testing.assert_allclose(native.waveform, reference, rtol=0, atol=1e-6)
    # Resampled block by block, it matches torchaudio resampling the whole mono reference at once.
    resampled = load_audio(path, target_sample_rate=16000)
    expected = taf.resample(torch.from_numpy(reference), SR, 16000).numpy()
    assert resampled.waveform.shape == expected.shape == (666_668,)
    np.testing.assert_allclose(resampled.waveform, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("header_frames", [0, 1000], ids=["unknown", "understated"])
def test_header_with_a_wrong_length_still_decodes_in_full(
    long_multichannel_flac: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch, header_frames: int
) -> None:
    """The output is allocated from the header's frame count, which may be missing or wrong (some ogg/mp3): it grows."""
    path, reference = long_multichannel_flac
    real_info = sf.info

    def info_with_wrong_length(file):
        info = real_info(file)
        info.frames = header_frames
        return info

    monkeypatch.setattr(sf, "info", info_with_wrong_length)
    monkeypatch.setattr(audio_mod, "_UNKNOWN_LENGTH_S", 1.0)  # so that an unknown length must grow too
    audio = load_audio(path)
    np.testing.assert_allclose(audio.waveform, reference, rtol=0, atol=1e-6)
    assert audio.waveform.flags.c_contiguous and audio.waveform.flags.writeable


def test_non_finite_samples_are_counted_across_blocks(tmp_path: Path) -> None:
    data = np.zeros((1_200_000, 2), dtype=np.float32)  # 2 channels: 524,288 frames a block, so 3 blocks
    data[100_000, 0] = np.nan
    data[[600_000, 1_199_999], 1] = np.inf
    data[600_000, 0] = -np.inf  # the same frame as an infinity in the other channel: one bad frame
    path = write_sf(tmp_path / "bad.wav", data, SR, subtype="FLOAT")
    with pytest.raises(NonFiniteAudioError, match=r"'bad.wav' contains 3 non-finite samples .* \(sample 100000\)\.$"):
        load_audio(path, target_sample_rate=16000)


@pytest.mark.parametrize("decoder", ["soundfile", "ffmpeg"])
@pytest.mark.parametrize(
    ("channels", "rate", "match"),
    [(65, 8000, r"'odd.wav' has 65 audio channels; at most 64"), (1, 400_000, r"400000 Hz; at most 384000 Hz")],
)
def test_absurd_channel_counts_and_rates_are_refused_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forbid_decoding, decoder: str, channels: int, rate: int,
    match: str,
) -> None:
    path = write_sf(tmp_path / "odd.wav", np.zeros((100, channels), dtype=np.int16), rate, subtype="PCM_16")
    if decoder == "ffmpeg":
        ensure_ffmpeg()
        monkeypatch.setattr(audio_mod, "_decode_soundfile", lambda *a, **k: (None, "forced"))
    forbid_decoding()
    with pytest.raises(AudioError, match=match) as info:
        load_audio(path)
    assert type(info.value) is AudioError


def test_rates_without_a_large_common_factor_are_refused_before_decoding(tmp_path: Path, forbid_decoding) -> None:
    """44101 -> 48000 Hz would need an 8 GiB resampling kernel (the rates are coprime)."""
    path = write_sf(tmp_path / "odd.wav", sine(1000, 44101, 0.2), 44101, subtype="PCM_16")
    assert load_audio(path).sample_rate == 44101  # at its own rate it is fine
    forbid_decoding()
    with pytest.raises(AudioError, match=r"^'odd.wav' has a sample rate of 44101 Hz, which cannot be resampled to 48"):
        load_audio(path, target_sample_rate=SR)
    with pytest.raises(ValueError, match="44101 Hz"):
        resample(np.zeros(10, dtype=np.float32), 44101, SR)


@pytest.mark.parametrize(("orig", "target"), [(96000, SR), (44100, SR), (8000, SR), (44100, 16000), (22050, 16000)])
def test_resample_matches_torchaudio(orig: int, target: int) -> None:
    import torch
    import torchaudio.functional as taf

    x = noise(orig * 3 + 17, seed=3)  # 3 s: many spans of the block-wise kernel product
    expected = taf.resample(torch.from_numpy(x), orig, target).numpy()
    got = resample(x, orig, target)
    assert got.shape == expected.shape and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    rows = resample(np.stack([x, -x]), orig, target)  # [..., T]: row by row, as torchaudio
    np.testing.assert_array_equal(rows, np.stack([got, -got]))


def test_resampling_does_not_depend_on_how_the_input_is_cut() -> None:
    """Both decoders feed the resampler blocks of their own sizes; the output must still be the same, bit for bit."""
    x = noise(SR * 4 + 3, seed=4)
    whole = resample(x, SR, 16000)
    resampler = audio_mod._Resampler(SR, 16000, what="x")
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 40_000, size=200))
    pieces = [piece for part in np.split(x, cuts[cuts < x.size]) for piece in resampler.push(part)]
    np.testing.assert_array_equal(np.concatenate([*pieces, *resampler.finish()]), whole)


# --------------------------------------------------------------------------------------------------------------------
# error messages name the file, never the folder it sits in (fault 7 of issue 8)


_CORRUPT = {
    "truncated_header.wav": lambda full_wav: full_wav[:30],  # stops inside the fmt chunk
    "notes.wav": lambda full_wav: b"These are my meeting notes, not audio.\n" * 50,
    "clip.m4a": lambda full_wav: b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 4,  # MP4 signature over junk
}


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["with-ffmpeg", "without-ffmpeg"])
@pytest.mark.parametrize("name", sorted(_CORRUPT))
def test_errors_name_the_file_but_not_the_server_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ffmpeg: bool, name: str
) -> None:
    """Uploads sit in Gradio's temporary folder (.../gradio/<hash>/name); the user must see only the name."""
    if ffmpeg:
        ensure_ffmpeg()
    else:
        monkeypatch.setattr(audio_mod, "ffmpeg_available", lambda: False)
    folder = tmp_path / "gradio" / "5f0e3c2ab1d94e7f8a6b" / "upload"
    folder.mkdir(parents=True)
    full_wav = write_sf(tmp_path / "full.wav", sine(1000, SR, 0.1), SR, subtype="PCM_16").read_bytes()
    path = folder / name
    path.write_bytes(_CORRUPT[name](full_wav))
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert f"'{name}'" in message
    for hidden in (str(tmp_path), "gradio", "5f0e3c2ab1d94e7f8a6b", "upload/"):
        assert hidden not in message, message


# --------------------------------------------------------------------------------------------------------------------
# windows


def _spans(windows: list[Window], sample_rate: int = 1) -> list[tuple[float, float]]:
    return [(w.start_sample / sample_rate, w.end_sample / sample_rate) for w in windows]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("shift", [(0, 10), (10, 20), (20, 30), (25, 35)]),
        ("keep", [(0, 10), (10, 20), (20, 30), (30, 35)]),
        ("drop", [(0, 10), (10, 20), (20, 30)]),
    ],
)
def test_plan_windows_35s(policy: str, expected: list[tuple[int, int]]) -> None:
    windows = plan_windows(35 * SR, SR, 10.0, 10.0, policy)
    assert _spans(windows, SR) == expected
    assert [w.index for w in windows] == list(range(len(expected)))
    assert [(w.start_s, w.end_s) for w in windows] == [(float(a), float(b)) for a, b in expected]


@pytest.mark.parametrize("policy", ["shift", "keep", "drop"])
def test_short_clip_is_one_window(policy: str) -> None:
    assert plan_windows(3 * SR, SR, 10.0, 10.0, policy) == [Window(0, 0, 3 * SR, 0.0, 3.0)]
    assert plan_windows(10 * SR, SR, 10.0, 10.0, policy) == [Window(0, 0, 10 * SR, 0.0, 10.0)]
    assert plan_windows(1, SR, 10.0, 10.0, policy) == [Window(0, 0, 1, 0.0, 1 / SR)]


@pytest.mark.parametrize("policy", ["shift", "keep", "drop"])
def test_exact_multiple_adds_no_extra_window(policy: str) -> None:
    assert _spans(plan_windows(30 * SR, SR, 10.0, 10.0, policy), SR) == [(0, 10), (10, 20), (20, 30)]


def test_overlapping_hops() -> None:
    expected = [(0, 10), (5, 15), (10, 20), (15, 25), (20, 30), (25, 35)]
    for policy in ("shift", "keep", "drop"):  # the last full window reaches the end: no tail to handle
        assert _spans(plan_windows(35 * SR, SR, 10.0, 5.0, policy), SR) == expected
    assert _spans(plan_windows(37 * SR, SR, 10.0, 5.0, "shift"), SR) == expected + [(27, 37)]
    assert _spans(plan_windows(37 * SR, SR, 10.0, 5.0, "keep"), SR) == expected + [(30, 37)]
    assert _spans(plan_windows(37 * SR, SR, 10.0, 5.0, "drop"), SR) == expected


def test_hop_longer_than_window_leaves_gaps() -> None:
    assert _spans(plan_windows(35, 1, 10, 15, "keep")) == [(0, 10), (15, 25), (30, 35)]
    assert _spans(plan_windows(35, 1, 10, 15, "shift")) == [(0, 10), (15, 25), (25, 35)]
    # 26 s: the next window would start at 30 s, past the end, so there is no tail, only the intended gap.
    assert _spans(plan_windows(26, 1, 10, 15, "shift")) == [(0, 10), (15, 25)]


def test_window_sample_arithmetic_rounds() -> None:
    windows = plan_windows(44100 * 3, 44100, 1.0 / 3, 1.0 / 3)
    assert all(w.num_samples == 14700 for w in windows)
    assert windows[-1].end_sample == 44100 * 3


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((100, SR, 0.0, 10.0, "shift"), ValueError, "window_s"),
        ((100, SR, -1.0, 10.0, "shift"), ValueError, "window_s"),
        ((100, SR, 10.0, 0.0, "shift"), ValueError, "hop_s"),
        ((100, SR, 10.0, float("nan"), "shift"), ValueError, "hop_s"),
        ((100, SR, 10.0, 10.0, "pad"), ValueError, "last_window must be one of shift, keep, drop"),
        ((100, 0, 10.0, 10.0, "shift"), ValueError, "sample_rate"),
        ((0, SR, 10.0, 10.0, "shift"), EmptyAudioError, "no samples"),
        ((100, SR, 1e-6, 10.0, "shift"), ValueError, "at least one sample"),
    ],
)
def test_plan_windows_validation(args: tuple, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan_windows(*args)


def test_split_windows_returns_the_slices() -> None:
    waveform = np.arange(35 * 100, dtype=np.float32)  # 35 s at 100 Hz: sample i has value i
    chunks, windows = split_windows(waveform, 100, window_s=10, hop_s=10, last_window="shift")
    assert [(w.start_sample, w.end_sample) for w in windows] == [(0, 1000), (1000, 2000), (2000, 3000), (2500, 3500)]
    for chunk, w in zip(chunks, windows):
        np.testing.assert_array_equal(chunk, np.arange(w.start_sample, w.end_sample, dtype=np.float32))
        assert np.shares_memory(chunk, waveform)  # views: no copy of a 30-minute clip

    audio = Audio(waveform, 100, 100, 1, "<array>")
    chunks2, windows2 = split_windows(audio, last_window="keep")
    assert windows2[-1] == Window(3, 3000, 3500, 30.0, 35.0)
    assert len(chunks2[-1]) == 500


def test_split_windows_validation() -> None:
    with pytest.raises(ValueError, match="sample_rate is required"):
        split_windows(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        split_windows(np.zeros((10, 2), dtype=np.float32), 100)
    with pytest.raises(ValueError, match="contradicts"):
        split_windows(Audio(np.zeros(10, dtype=np.float32), 100, 100, 1, "<array>"), 200)


# --------------------------------------------------------------------------------------------------------------------
# determinism and the Audio type


@pytest.mark.parametrize("ext", ["wav", "mp3", "opus"])
def test_loading_is_deterministic(tmp_path: Path, ext: str) -> None:
    kwargs = {"wav": dict(subtype="PCM_16"), **_SOUNDFILE_LOSSY}[ext]
    path = write_sf(tmp_path / f"x.{ext}", noise(SR, channels=2, seed=5), SR, **kwargs)
    first = load_audio(path, target_sample_rate=44100)
    second = load_audio(path, target_sample_rate=44100)
    np.testing.assert_array_equal(first.waveform, second.waveform)
    assert split_windows(first, window_s=0.3, hop_s=0.2)[1] == split_windows(second, window_s=0.3, hop_s=0.2)[1]


def test_audio_properties(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "x.wav", noise(22050 * 3, channels=2), 22050, subtype="PCM_16")
    audio = load_audio(path, target_sample_rate=16000)
    assert audio.duration_s == pytest.approx(3.0, abs=1 / 16000)
    assert audio.original_duration_s == pytest.approx(3.0, abs=1 / 16000)
    assert (audio.sample_rate, audio.original_sample_rate, audio.original_channels) == (16000, 22050, 2)
    assert audio.source == "x.wav"
    assert audio.waveform.flags.c_contiguous and audio.waveform.flags.writeable
    with pytest.raises(AttributeError):
        audio.sample_rate = 8000  # type: ignore[misc]


def test_path_types(tmp_path: Path) -> None:
    path = write_sf(tmp_path / "x.wav", sine(1000, 8000, 0.1), 8000)
    expected = load_audio(path).waveform
    for source in (str(path), path):
        np.testing.assert_array_equal(load_audio(source).waveform, expected)
