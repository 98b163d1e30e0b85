"""The HF CLAP backend on a tiny random ClapModel saved to and reloaded from a local directory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.audio import Audio
from engine.clap import create_clap
from engine.clap.base import pool_windows
from engine.clap.hf import HFClapBackend
from engine.config import AppConfig, AudioConfig
from engine.errors import ConfigError, ModelLoadError
from tests.helpers import noise_clip


def test_reload_reports_model_facts(tiny_clap, tiny_clap_dir):
    assert tiny_clap.sample_rate == 48_000
    assert tiny_clap.embedding_dim == 32
    assert tiny_clap.max_window_s == pytest.approx(10.0)
    assert tiny_clap.is_untrained  # the marker file written by build_tiny_clap
    assert tiny_clap.logit_scale == pytest.approx(float(tiny_clap.model.logit_scale_a.detach().exp()))
    assert "UNTRAINED" in tiny_clap.describe()


def test_same_clip_twice_gives_identical_embeddings(tiny_clap):
    clip = noise_clip(4.0)
    first, second = tiny_clap.embed_audio([clip]), tiny_clap.embed_audio([clip.copy()])
    assert torch.equal(first, second)
    # ... also for a clip longer than the 10-s window, where the feature extractor would crop at random if fed whole
    long_clip = noise_clip(23.0, seed=3)
    assert torch.equal(tiny_clap.embed_audio([long_clip]), tiny_clap.embed_audio([long_clip]))


def test_a_fresh_load_gives_the_same_embeddings_and_fingerprint(tiny_clap, tiny_clap_dir, other_clap):
    again = HFClapBackend.from_pretrained(str(tiny_clap_dir), device="cpu")
    clip = noise_clip(3.0)
    assert torch.equal(again.embed_audio([clip]), tiny_clap.embed_audio([clip]))
    assert torch.equal(again.embed_text(["a dog barks"]), tiny_clap.embed_text(["a dog barks"]))
    assert again.fingerprint == tiny_clap.fingerprint
    assert other_clap.fingerprint != tiny_clap.fingerprint


def test_embeddings_are_unit_norm_with_expected_shapes(tiny_clap):
    audio = tiny_clap.embed_audio([noise_clip(2.0), noise_clip(12.0, seed=1)])
    text = tiny_clap.embed_text(["rain on a roof", "a siren wails", "birds"])
    assert audio.shape == (2, 32) and text.shape == (3, 32)
    assert audio.dtype == torch.float32 and text.dtype == torch.float32
    torch.testing.assert_close(audio.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))


def test_batched_equals_one_by_one(tiny_clap):
    clips = [noise_clip(s, seed=i) for i, s in enumerate([0.5, 3.0, 10.0, 14.0, 7.25])]
    batched = tiny_clap.embed_audio(clips, batch_size=8)
    singles = torch.cat([tiny_clap.embed_audio([c], batch_size=1) for c in clips])
    assert (batched - singles).abs().max() < 1e-5
    texts = ["a dog barks", "water runs from a tap while a man speaks", "silence", "engine"]
    assert (tiny_clap.embed_text(texts, batch_size=64)
            - torch.cat([tiny_clap.embed_text([t], batch_size=1) for t in texts])).abs().max() < 1e-5


def test_35_second_clip_is_windowed_and_pooled(tiny_clap):
    clip = noise_clip(35.0, seed=7)
    result = tiny_clap.embed_windows([clip])[0]
    # Default policy "shift": full 10-s windows, the last moved back to end at the clip's end.
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (25.0, 35.0)]
    assert result.embeddings.shape == (4, 32)
    for window, row in zip(result.windows, result.embeddings):
        alone = tiny_clap.embed_audio([clip[window.start_sample:window.end_sample]])[0]
        assert (alone - row).abs().max() < 1e-5
    mean = result.embeddings.mean(dim=0)
    torch.testing.assert_close(result.pooled, mean / mean.norm())
    torch.testing.assert_close(tiny_clap.embed_audio([clip])[0], result.pooled)


def test_window_policy_keep_gives_a_short_last_window(tiny_clap_dir):
    clap = HFClapBackend.from_pretrained(str(tiny_clap_dir), device="cpu",
                                         audio_config=AudioConfig(last_window="keep"))
    windows = clap.embed_windows([noise_clip(35.0)])[0].windows
    assert [(w.start_s, w.end_s) for w in windows][-1] == (30.0, 35.0)


def test_audio_at_the_wrong_rate_is_refused(tiny_clap):
    wrong = Audio(waveform=noise_clip(1.0, 16_000), sample_rate=16_000, original_sample_rate=16_000,
                  original_channels=1, source="<array>")
    with pytest.raises(ValueError, match="needs 48000 Hz"):
        tiny_clap.embed_audio([wrong])


def test_window_longer_than_the_model_sees_is_a_config_error(tiny_clap_dir):
    clap = HFClapBackend.from_pretrained(str(tiny_clap_dir), device="cpu", audio_config=AudioConfig(window_s=15.0))
    with pytest.raises(ConfigError, match="sees at most 10.0 s"):
        clap.embed_audio([noise_clip(20.0)])


def test_text_input_errors_and_empty_batches(tiny_clap):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_clap.embed_text("a dog")
    assert tiny_clap.embed_text([]).shape == (0, 32)
    assert tiny_clap.embed_audio([]).shape == (0, 32)


def test_long_captions_are_truncated_not_rejected(tiny_clap):
    long_caption = " ".join(["a dog barks"] * 100)
    assert tiny_clap.embed_text([long_caption]).shape == (1, 32)


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not load a CLAP model from"):
        HFClapBackend.from_pretrained(str(tmp_path / "nowhere"), device="cpu")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        HFClapBackend.from_pretrained("laion/clap-htsat-unfused-does-not-exist", device="cpu")


def test_cuda_requested_without_cuda_is_a_config_error(tiny_clap_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so the request is valid")
    with pytest.raises(ConfigError, match="no usable CUDA"):
        HFClapBackend.from_pretrained(str(tiny_clap_dir), device="cuda")


def test_registry_builds_the_builtin_tiny_model_into_the_cache(tmp_path):
    config = AppConfig(cache_dir=str(tmp_path))
    config.clap.model = "builtin:tiny-random"
    config.clap.device = "cpu"
    clap = create_clap(config)
    assert clap.is_untrained and str(tmp_path) in clap.name
    assert create_clap(config).fingerprint == clap.fingerprint  # second call loads the cached copy
    config.clap.backend = "nope"
    with pytest.raises(ConfigError, match="Unknown CLAP backend 'nope'"):
        create_clap(config)


def test_pool_windows_is_the_renormalised_mean():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(pool_windows(vectors), torch.tensor([1.0, 1.0]) / np.sqrt(2))
