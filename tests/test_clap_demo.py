"""The demo CLAP backend (engine/clap/demo.py): a random audio tower with the real all-MiniLM-L6-v2 text encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.clap import create_clap
from engine.clap.demo import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DemoClapBackend,
    build_random_demo_clap,
    resolve_text_encoder,
)
from engine.config import AppConfig
from engine.errors import ModelLoadError
from tests.helpers import noise_clip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_random_demo_clap(tmp_path_factory.mktemp("demo-clap"), seed=0)


@pytest.fixture(scope="module")
def demo(demo_dir) -> DemoClapBackend:
    return DemoClapBackend.from_folder(demo_dir, device="cpu")


def test_loads_through_the_registry_and_says_it_is_untrained(demo_dir):
    config = AppConfig()
    config.clap.backend, config.clap.model, config.clap.device = "demo", str(demo_dir), "cpu"
    clap = create_clap(config)
    assert isinstance(clap, DemoClapBackend) and clap.is_untrained
    assert clap.sample_rate == 16_000 and clap.embedding_dim == 128 and clap.max_window_s == 10.0


def test_text_embeddings_come_from_minilm_and_are_unit_norm(demo):
    texts = ["A dog barks", "a dog is barking loudly", "Rain falls on a tin roof"]
    vectors = demo.embed_text(texts)
    assert vectors.shape == (3, 128)
    np.testing.assert_allclose(vectors.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # MiniLM is a real sentence encoder: even through a random projection, the paraphrase is the closer text.
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2]


def test_text_tower_reproduces_embed_text(demo):
    """Prompt tuning's path (word embeddings -> encoder -> mean pool -> projection) equals plain embedding."""
    tower = demo.text_tower()
    texts = ["a siren wails", "footsteps on gravel followed by a door"]
    tokens = tower.tokenize(texts, max_length=64)
    hidden = tower.encode(tower.embed_words(tokens.input_ids), tokens.attention_mask)
    projected = tower.project(tower.sentence_features(hidden, tokens.attention_mask))
    torch.testing.assert_close(torch.nn.functional.normalize(projected, dim=-1).detach(), demo.embed_text(texts),
                               atol=1e-5, rtol=0)


def test_audio_windows_frames_and_batch_independence(demo):
    ten_s, short = noise_clip(10.0, 16_000, seed=0), noise_clip(0.4, 16_000, seed=1)
    alone = demo.embed_audio([short])[0]
    together = demo.embed_audio([ten_s, short])[1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)  # padding in a batch changes nothing
    windows, frames = demo.embed_frames(noise_clip(25.0, 16_000))
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]
    assert all(f.shape == (31, 128) for f in frames)  # 500 mel frames / 16
    np.testing.assert_allclose(frames[0].norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_fingerprint_is_stable_and_tells_weights_apart(demo_dir, tmp_path):
    again = DemoClapBackend.from_folder(demo_dir, device="cpu")
    other = DemoClapBackend.from_folder(build_random_demo_clap(tmp_path / "other", seed=1), device="cpu")
    assert again.fingerprint == DemoClapBackend.from_folder(demo_dir, device="cpu").fingerprint
    assert other.fingerprint != again.fingerprint


def test_bad_folders_are_model_load_errors(demo_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not a demo CLAP folder"):
        DemoClapBackend.from_folder(tmp_path, device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((demo_dir / CONFIG_FILE).read_text())
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        DemoClapBackend.from_folder(broken, device="cpu")
    (broken / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        DemoClapBackend.from_folder(broken, device="cpu")
    wider = build_random_demo_clap(tmp_path / "wider", embedding_dim=64)
    (broken / WEIGHTS_FILE).write_bytes((wider / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="does not fit demo_clap.json"):
        DemoClapBackend.from_folder(broken, device="cpu")
    (broken / CONFIG_FILE).write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ModelLoadError, match="malformed"):
        DemoClapBackend.from_folder(broken, device="cpu")


def test_missing_text_encoder_package_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="not installed: pip install -r requirements.txt"):
        resolve_text_encoder("package:no-such-minilm-package")
    with pytest.raises(ModelLoadError, match="config.json missing"):
        resolve_text_encoder(str(tmp_path))
