"""Featurisation: LAION-CLAP's log-mel in torch (engine.clap.features) against transformers' numpy
``ClapFeatureExtractor``, the HF backend before/after, and DRCap's / MS-CLAP's torch front ends against an
independent numpy log-mel.

Closeness is measured two ways on a whole batch ``a`` (ours) vs ``b`` (reference): ``max|a - b| / max|b| < 1e-4``,
and elementwise ``allclose(rtol=1e-4, atol=1e-4 * max|b|)``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

from engine.clap.base import l2_normalize
from engine.clap.features import ClapFeatures
from engine.clap.hf import HFClapBackend
from engine.clap.tiny import train_caption_tokenizer
from engine.config import AudioConfig
from engine.errors import AudioTooLongError, ConfigError, EmptyAudioError
from tests.helpers import noise_clip

TOLERANCE = 1e-4


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    ours, reference = ours.double(), reference.double()
    assert ours.shape == reference.shape
    scale = reference.abs().max()
    assert (ours - reference).abs().max() / scale < tolerance
    torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance * float(scale))


def signals(sample_rate: int, seconds: float) -> dict[str, np.ndarray]:
    """Varied mono float32 test windows of at most ``seconds``."""
    rng = np.random.default_rng(0)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    nyquist = sample_rate / 2
    return {
        "white noise": (0.1 * rng.standard_normal(n)).astype(np.float32),
        "sine": (0.5 * np.sin(2 * np.pi * 1000.3 * t)).astype(np.float32),
        # 100 Hz rising to 0.8 Nyquist over the window
        "chirp": (0.5 * np.sin(2 * np.pi * (100 * t + (0.8 * nyquist - 100) / (2 * seconds) * t ** 2))
                  ).astype(np.float32),
        "near silence": (1e-6 * rng.standard_normal(n)).astype(np.float32),
        "faint noise": (3e-5 * rng.standard_normal(n)).astype(np.float32),  # partly at the -100 dB floor
        "exact silence": np.zeros(n, dtype=np.float32),
        "0.05 s": (0.3 * rng.standard_normal(int(0.05 * sample_rate))).astype(np.float32),
        "2.7 s tone": (0.5 * np.sin(2 * np.pi * 440 * t[:int(2.7 * sample_rate)])).astype(np.float32),
        "one sample short": noise_clip(seconds, sample_rate, seed=3)[:-1],
    }


# --- LAION-CLAP features vs ClapFeatureExtractor ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_extractor(tiny_clap_dir) -> ClapFeatureExtractor:
    """The tiny test model's saved preprocessor config (rand_trunc), read back from disk."""
    return ClapFeatureExtractor.from_pretrained(str(tiny_clap_dir))


EXTRACTORS = {
    "default (fusion)": lambda: ClapFeatureExtractor(),
    "rand_trunc": lambda: ClapFeatureExtractor(truncation="rand_trunc"),
    "rand_trunc, repeat": lambda: ClapFeatureExtractor(truncation="rand_trunc", padding="repeat"),
    "fusion, pad": lambda: ClapFeatureExtractor(truncation="fusion", padding="pad"),
    # other sizes: 16 kHz, 3-s windows, an FFT length that is not a power of 2, 80 mels
    "16 kHz, n_fft 400": lambda: ClapFeatureExtractor(feature_size=80, sampling_rate=16_000, hop_length=160,
                                                       max_length_s=3, fft_window_size=400, frequency_max=8000,
                                                       truncation="rand_trunc"),
    "odd n_fft 401": lambda: ClapFeatureExtractor(feature_size=40, sampling_rate=16_000, hop_length=160,
                                                  max_length_s=2, fft_window_size=401, frequency_max=8000,
                                                  truncation="rand_trunc"),
}


def reference_features(extractor: ClapFeatureExtractor, windows: list[np.ndarray]) -> torch.Tensor:
    return extractor(windows, sampling_rate=extractor.sampling_rate, return_tensors="pt")["input_features"]


@pytest.mark.parametrize("config", list(EXTRACTORS))
def test_each_signal_matches_the_numpy_extractor(config):
    extractor = EXTRACTORS[config]()
    features = ClapFeatures.from_extractor(extractor)
    channels = 4 if extractor.truncation == "fusion" else 1
    n_fft, size = extractor.fft_window_size, extractor.nb_max_samples
    frames = 1 + (size + 2 * (n_fft // 2) - n_fft) // extractor.hop_length  # centred frames
    for name, window in signals(extractor.sampling_rate, extractor.max_length_s).items():
        ours = features([window])
        assert ours.dtype == torch.float32
        assert ours.shape == (1, channels, frames, extractor.feature_size), name
        assert_close(ours, reference_features(extractor, [window]))
        if channels == 4:  # for windows that fit, the four fusion channels are the same map
            assert torch.equal(ours[:, 0], ours[:, 3])


def test_tiny_model_config_and_a_mixed_batch(tiny_extractor):
    features = ClapFeatures.from_extractor(tiny_extractor)
    assert not features.fused and features.padding == "repeatpad"
    assert torch.equal(features.mel_filters, torch.from_numpy(tiny_extractor.mel_filters_slaney).float())
    batch = list(signals(48_000, 10.0).values()) + [noise_clip(s, 48_000, seed=i) for i, s in enumerate([0.3, 7.5])]
    # float64 samples that float32 cannot hold: the extractor computes with them as they are, so do we
    batch.append(np.random.default_rng(9).standard_normal(48_000 * 2) * 0.1)
    ours = features(batch)
    reference = reference_features(tiny_extractor, batch)
    assert ours.shape == (len(batch), 1, 1001, 64)
    assert_close(ours, reference)
    # each row is computed on its own: batch-mates change nothing
    for row in (0, 6, len(batch) - 1):
        torch.testing.assert_close(features([batch[row]])[0], ours[row], rtol=0, atol=1e-4)


def test_fused_features_match_the_extractor_and_is_longer_stays_false():
    extractor = ClapFeatureExtractor()  # fusion
    batch = [noise_clip(s, 48_000, seed=i) for i, s in enumerate([1.0, 4.0, 10.0])]
    reference = extractor(batch, sampling_rate=48_000, return_tensors="pt")
    # The extractor marks one RANDOM window as longer when none is (LAION-CLAP's HTSAT does the same); the
    # backend keeps is_longer all False, so only input_features are compared.
    assert int(reference["is_longer"].sum()) == 1
    assert_close(ClapFeatures.from_extractor(extractor)(batch), reference["input_features"])


def test_the_gpu_code_path_equals_the_cpu_one():
    """On a GPU the whole batch is one FFT call without kept buffers; run that path here on the CPU (and on CUDA
    when there is one) and compare it with the CPU path (one row at a time, blocks of frames, kept buffers)."""
    features = ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc"))
    batch = [noise_clip(s, 48_000, seed=i) for i, s in enumerate([10.0, 0.3, 6.1])]
    cpu = features(batch)[:, 0]  # [B, frames, mels]
    whole_batch = torch.empty_like(cpu)
    with torch.inference_mode():
        features._log_mel(batch, whole_batch, None, None)
    torch.testing.assert_close(whole_batch, cpu, rtol=0, atol=1e-4)
    # and blocks of frames per FFT call (a setting) give the same as whole windows
    features.cpu_block_frames = 128
    torch.testing.assert_close(features(batch)[:, 0], cpu, rtol=0, atol=1e-4)
    if torch.cuda.is_available():
        on_gpu = ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc")).to("cuda")
        torch.testing.assert_close(on_gpu(batch).cpu()[:, 0], cpu, rtol=0, atol=1e-4)


def test_concurrent_callers_get_their_own_results():
    """The CPU buffers kept between calls are shared by every caller of the module (the app embeds from several
    threads): results must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    features = ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc"))
    batches = [[noise_clip(s, 48_000, seed=i)] for i, s in enumerate([10.0, 0.2, 4.0, 10.0, 1.0, 7.0])]
    expected = [features(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(features, batches * 3))
    for i, result in enumerate(results):
        assert torch.equal(result, expected[i % len(batches)])


def test_bad_windows_and_settings_are_typed_errors():
    features = ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc"))
    with pytest.raises(EmptyAudioError):
        features([np.zeros(0, dtype=np.float32)])
    with pytest.raises(AudioTooLongError, match="480001 samples"):
        features([np.zeros(480_001, dtype=np.float32)])
    with pytest.raises(ConfigError, match="padding"):
        ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc", padding="reflect"))
    with pytest.raises(ConfigError, match="truncation"):
        ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="crop"))


# --- the HF backend before/after ------------------------------------------------------------------------------------


def numpy_path_embeddings(backend: HFClapBackend, windows: list[np.ndarray]) -> torch.Tensor:
    """What the backend computed before: the numpy extractor's features, is_longer all False."""
    features = reference_features(backend.feature_extractor, windows)
    with torch.inference_mode():
        pooled = backend.model.audio_model(input_features=features,
                                           is_longer=torch.zeros(len(windows), 1, dtype=torch.bool)).pooler_output
        return l2_normalize(backend.model.audio_projection(pooled))


def backend_windows() -> list[np.ndarray]:
    return [noise_clip(s, 48_000, seed=i) for i, s in enumerate([10.0, 3.0, 0.5])] + [signals(48_000, 10.0)["chirp"]]


def test_tiny_clap_embeddings_agree_with_the_numpy_path(tiny_clap):
    windows = backend_windows()
    with torch.inference_mode():  # buffers made in inference mode (as the backend's calls do) are reused outside it
        tiny_clap._input_features(windows)
    features, is_longer = tiny_clap._input_features(windows)
    assert features.shape == (4, 1, 1001, 64) and features.dtype == tiny_clap.dtype
    assert not is_longer.any() and is_longer.shape == (4, 1)
    ours = tiny_clap.embed_audio(windows)
    cosine = (ours * numpy_path_embeddings(tiny_clap, windows)).sum(dim=1)
    assert cosine.min() > 0.9999


@pytest.fixture(scope="module")
def fused_clap(tmp_path_factory) -> HFClapBackend:
    """A tiny random fused ClapModel (enable_fusion) saved with the default (fusion) extractor."""
    directory = tmp_path_factory.mktemp("tiny-fused-clap")
    tokenizer = train_caption_tokenizer()
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id),
        audio_config=dict(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                          window_size=8, spec_size=256, num_mel_bins=64, enable_fusion=True),
        projection_dim=32)
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(directory)
    ClapFeatureExtractor().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return HFClapBackend.from_pretrained(str(directory), device="cpu")


def test_fused_backend_agrees_and_never_depends_on_batch_mates(fused_clap):
    assert fused_clap.features.fused and fused_clap.feature_extractor.truncation == "fusion"
    windows = backend_windows()
    features, is_longer = fused_clap._input_features(windows)
    assert features.shape == (4, 4, 1001, 64) and not is_longer.any()
    ours = fused_clap.embed_audio(windows, batch_size=4)
    assert (ours * numpy_path_embeddings(fused_clap, windows)).sum(dim=1).min() > 0.9999
    # with the extractor's random is_longer a window's embedding changed with its batch; here it does not
    alone = torch.cat([fused_clap.embed_audio([w]) for w in windows])
    assert (ours - alone).abs().max() < 1e-5


# --- DRCap's and MS-CLAP's front ends vs an independent numpy log-mel -------------------------------------------------


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz, log_step = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / log_step,
                    hz / f_sp)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, log_step = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), f_sp * mel)


def numpy_slaney_mel(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """[n_fft/2+1, n_mels]: triangles between consecutive slaney-mel points, each scaled to unit area (2 / width)."""
    bin_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2))
    rising = (bin_hz[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bin_hz[None]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T


def numpy_mel_power(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, mel: np.ndarray) -> np.ndarray:
    """[frames, n_mels] mel power: centred frames (reflect padding), periodic Hann, |rfft|^2, float64 throughout."""
    x = np.pad(np.asarray(wave, dtype=np.float64), n_fft // 2, mode="reflect")
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frames = 1 + (x.size - n_fft) // hop
    power = np.abs(np.fft.rfft(x[np.arange(frames)[:, None] * hop + n] * window, axis=-1)) ** 2
    return power @ mel


def front_end_cases():
    from engine.clap.drcap import DrcapClapConfig, make_tiny_drcap_model
    from engine.clap.msclap import MsClapConfig, make_tiny_msclap_model

    vocab = 600
    drcap = make_tiny_drcap_model(0, vocab).htsat.audio_feats_extractor
    msclap = make_tiny_msclap_model(0, vocab).cnn14
    return {
        "drcap": (DrcapClapConfig(), drcap.mel_trans, drcap.log_trans, 10.0),
        "msclap": (MsClapConfig(), msclap.spectrogram_extractor, msclap.logmel_extractor, 5.0),
    }


@pytest.fixture(scope="module")
def front_ends():
    return front_end_cases()


@pytest.mark.parametrize("name", ["drcap", "msclap"])
def test_front_end_log_mel_matches_numpy(front_ends, name):
    """The authors' front ends (torchlibrosa) run their STFT as a float32 convolution; that is kept, so the check
    is: mel power within 1e-5 of its maximum for every signal, log-mel within 1e-4 relative for broadband signals,
    and for pure tones within 1e-4 where the reference is within 80 dB of its peak (float32 lifts the bins ~100 dB
    below a tone's peak by up to 0.1 dB: 4e-4..9e-4 of the range, measured)."""
    config, power_module, log_module, seconds = front_ends[name]
    mel = numpy_slaney_mel(config.sample_rate, config.n_fft, config.n_mels, config.f_min, config.f_max)
    np.testing.assert_allclose(log_module.melW.double().numpy(), mel, rtol=0, atol=1e-5 * mel.max())
    tonal = {"sine", "chirp", "2.7 s tone"}
    for signal, wave in signals(config.sample_rate, seconds).items():
        if wave.size <= config.n_fft // 2:  # reflect padding needs more than half a frame (prepare_windows pads)
            continue
        power = power_module(torch.from_numpy(wave)[None])  # [1, 1, frames, bins]
        ours_power = (power @ log_module.melW)[0, 0].double()
        ours = log_module(power)[0, 0]
        reference_power = torch.from_numpy(numpy_mel_power(wave, config.sample_rate, config.n_fft,
                                                           config.hop_length, mel))
        reference = 10 * torch.log10(reference_power.clamp_min(config.amin))
        assert ours.shape == reference.shape == (1 + wave.size // config.hop_length, config.n_mels), signal
        if reference_power.max() > 0:
            assert (ours_power - reference_power).abs().max() / reference_power.max() < 1e-5, signal
        if signal in tonal:
            loud = reference > reference.max() - 80
            assert (ours.double() - reference)[loud].abs().max() / reference.abs().max() < TOLERANCE, signal
        else:
            assert_close(ours, reference)


def test_front_ends_batched_equal_per_window():
    """prepare_windows + log-mel of a batch of mixed lengths equals each window's alone."""
    from engine.clap.drcap import DrcapClapBackend, make_tiny_drcap_model
    from engine.clap.msclap import MsClapBackend, make_tiny_msclap_model, train_bert_tokenizer

    tokenizer = train_caption_tokenizer()
    drcap = DrcapClapBackend(make_tiny_drcap_model(0, len(tokenizer)), tokenizer, name="in-memory",
                             audio_config=AudioConfig(), device=torch.device("cpu"), fp16=False, batch_size=8,
                             text_batch_size=8)
    windows = [noise_clip(s, 32_000, seed=i) for i, s in enumerate([10.0, 3.0, 0.01, 3.0, 7.3])]
    batched = drcap.prepare_windows(windows)  # [B, 1, 1024, mels]
    assert batched.shape == (5, 1, 1024, 64)
    for row, window in enumerate(windows):
        torch.testing.assert_close(drcap.prepare_windows([window])[0], batched[row], rtol=0, atol=1e-4)

    bert_tokenizer = train_bert_tokenizer()
    msclap = MsClapBackend(make_tiny_msclap_model(0, len(bert_tokenizer)), bert_tokenizer, name="in-memory")
    cnn = msclap.model.cnn14
    windows = [noise_clip(s, 44_100, seed=i) for i, s in enumerate([5.0, 1.3, 0.05, 4.99])]
    batched = cnn.log_mel(msclap.prepare_windows(windows))  # [B, 1, 690, mels]
    assert batched.shape == (4, 1, 690, 64)
    for row, window in enumerate(windows):
        torch.testing.assert_close(cnn.log_mel(msclap.prepare_windows([window]))[0], batched[row], rtol=0, atol=1e-4)
