"""The config system: profiles, environment variables and overrides, with type checks and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import AppConfig, list_profiles, load_config
from engine.errors import ConfigError


def test_default_profile_is_the_offline_demo_bundle_with_resolved_paths():
    config = load_config(environ={})
    assert config.profile == "offline" and config.clap.backend == "demo"
    for path in (config.clap.model, config.datastore.path, config.caption.checkpoint, config.llm.model):
        assert Path(path).is_absolute() and Path(path).is_dir(), path
    assert Path(config.clap.model).name == "clap" and Path(config.datastore.path).name == "style_a"
    assert {"offline", "tiny", "laion"} <= set(list_profiles())


def test_tiny_profile_resolves_caption_paths():
    config = load_config("tiny", environ={})
    assert config.clap.model == "builtin:tiny-random"
    source = Path(config.datastore.sources[0])
    assert source.is_absolute() and source.is_file() and source.name == "audiocaps_train.txt"


def test_priority_profile_then_environment_then_overrides():
    environ = {"AUDIOSCRIBE_PROFILE": "laion", "AUDIOSCRIBE_CLAP__DEVICE": "cpu", "AUDIOSCRIBE_DATASTORE__TOP_K": "9",
               "AUDIOSCRIBE_CLASSIFY__MULTI_LABEL": "yes", "AUDIOSCRIBE_UNRELATED": "ignored"}
    config = load_config(overrides=["datastore.top_k=3", "classify.templates=A {}.,Sound of {}"], environ=environ)
    assert config.profile == "laion" and config.clap.model == "laion/clap-htsat-unfused"
    assert config.clap.device == "cpu"
    assert config.datastore.top_k == 3  # the override beats the environment
    assert config.classify.multi_label is True
    assert config.classify.templates == ["A {}.", "Sound of {}"]


def test_profile_file_with_relative_paths(tmp_path):
    (tmp_path / "caps.txt").write_text("a dog barks\n")
    profile = tmp_path / "mine.toml"
    profile.write_text('cache_dir = "/tmp/x"\n[audio]\nwindow_s = 5\nhop_s = 2.5\n'
                       '[datastore]\nsources = ["caps.txt"]\npath = "store"\n')
    config = load_config(str(profile), environ={})
    assert config.profile == "mine" and config.cache_dir == "/tmp/x"
    assert config.audio.window_s == 5.0 and config.audio.hop_s == 2.5
    assert config.datastore.sources == [str(tmp_path / "caps.txt")]
    assert config.datastore.path == str(tmp_path / "store")


@pytest.mark.parametrize("override, message", [
    ("clap.colour=red", "Unknown setting 'clap.colour'"),
    ("gpu.device=cpu", "Unknown setting section 'gpu'"),
    ("datastore.top_k=many", "datastore.top_k .* must be an integer"),
    ("datastore.top_k=0", "datastore.top_k must be at least 1"),
    ("clap.fp16=maybe", "must be true or false"),
    ("audio.last_window=wrap", "audio.last_window must be one of shift, keep, drop"),
    ("audio.hop_s=-1", "audio.hop_s must be positive"),
    ("classify.threshold=1.5", "classify.threshold must be between 0 and 1"),
    ("no-equals-sign", "must look like section.field=value"),
])
def test_bad_settings_fail_loudly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override], environ={})


def test_bad_profiles_fail_loudly(tmp_path):
    with pytest.raises(ConfigError, match="Unknown profile 'nope'; shipped profiles: .*laion"):
        load_config("nope", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), environ={})
    (tmp_path / "bad.toml").write_text("[clap\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(tmp_path / "bad.toml"), environ={})
    (tmp_path / "typo.toml").write_text("[clap]\nbatch_size = \"big\"\n")
    with pytest.raises(ConfigError, match=r"clap.batch_size \(from .*typo.toml\) must be an integer"):
        load_config(str(tmp_path / "typo.toml"), environ={})


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIOSCRIBE_CACHE", str(tmp_path))
    assert AppConfig().resolved_cache_dir() == tmp_path
    assert AppConfig(cache_dir=str(tmp_path / "c")).resolved_cache_dir() == tmp_path / "c"


def test_every_shipped_profile_loads():
    for name in list_profiles():
        config = load_config(name, environ={})
        assert config.profile == name
        assert all(Path(p).is_file() for p in config.datastore.sources), name
    drcap = load_config("drcap", environ={})
    assert drcap.clap.backend == "drcap" and Path(drcap.clap.model).is_absolute()  # ../../models/... resolved
    assert drcap.caption.checkpoint.endswith("models/drcap/model.pt")
