"""Limits on work a request may ask for: each refusal is a typed error that names the limit and the setting."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import PromptTuningConfig, load_config
from engine.datastore import read_captions
from engine.errors import ClassifierInputError, ConfigError, DatastoreError
from engine.prompt_tuning import TrainingTexts, tune


def test_tuning_more_classes_than_the_limit_is_refused_before_any_work(tiny_clap):
    names = [f"class {i}" for i in range(4)]
    data = TrainingTexts([f"a sound of class {i}" for i in range(4)], np.eye(4, dtype=np.float32))
    with pytest.raises(ClassifierInputError, match=r"4 class names to tune; the limit is 3 \(tuning.max_classes\)"):
        tune(tiny_clap, names, data, PromptTuningConfig(max_classes=3, epochs=1),
             progress=lambda *_: pytest.fail("tuning started"))
    assert PromptTuningConfig().max_classes == 50


def test_a_caption_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_text("a dog barks\n" * 200_000)  # 2.3 MB
    with pytest.raises(DatastoreError, match=r"huge.txt is 2 MB; the limit is 1 MB \(datastore.max_caption_file_mb\)"):
        read_captions(path, max_mb=1)
    assert len(read_captions(path, max_mb=3)) == 200_000


def test_limits_are_settings_with_checked_values():
    config = load_config("tiny", environ={})
    assert (config.classify.max_classes, config.tuning.max_classes, config.caption.max_window_captions,
            config.datastore.max_caption_file_mb, config.server.upload_ttl_s) == (1000, 50, 30, 512.0, 86_400)
    for setting in ("tuning.max_classes=0", "caption.max_window_captions=0", "server.upload_ttl_s=0",
                    "datastore.max_caption_file_mb=0"):
        with pytest.raises(ConfigError, match=setting.split("=")[0]):
            load_config("tiny", [setting], environ={})


def test_the_app_deletes_old_uploads(tiny_clap_dir, tmp_path):
    from app.ui import build_demo
    from engine.service import AudioScribe

    config = load_config("tiny", [f"cache_dir={tmp_path}", f"clap.model={tiny_clap_dir}", "caption.enabled=false",
                                  "server.upload_ttl_s=600"], environ={})
    config.datastore.sources = []
    demo = build_demo(AudioScribe.from_config(config, show_progress=False))
    assert demo.delete_cache == (600, 600)
