"""The Adapt tab's handlers, called directly (no server): a domain from caption files, saved, chosen, compared."""
from __future__ import annotations

import pandas as pd
import pytest
import soundfile as sf
from gradio.exceptions import Error as GradioError

from app.tabs.adapt import AdaptHandlers
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config


def no_progress(*args, **kwargs) -> None:
    """Stands in for gr.Progress outside a Gradio event."""


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    config = tiny_app_config(tmp_path_factory.mktemp("adapt"), tiny_clap_dir, tiny_llama_dir, 200, max_new_tokens=6)
    return AudioScribe.from_config(config, show_progress=False)


def test_build_save_choose_reset_and_compare(service, tmp_path):
    handlers = AdaptHandlers(service)
    txt, csv = tmp_path / "strings.txt", tmp_path / "more.csv"
    txt.write_text("A violin plays a slow melody\nA cello hums\n\nA violin plays a slow melody\n")
    pd.DataFrame({"caption": ["Piano chords ring out"]}).to_csv(csv, index=False)
    status, domain = handlers.build([str(txt), str(csv)], None, "strings", progress=no_progress)
    assert domain.datastore.captions == ["A violin plays a slow melody", "A cello hums", "Piano chords ring out"]
    assert "**strings**, 3 captions, built for this browser session" in status
    assert service.domain_names() == []  # the session's own until saved
    clip = tmp_path / "clip.wav"
    sf.write(clip, noise_clip(3.0, 16_000), 16_000)
    table = handlers.compare(str(clip), domain)
    assert table["captions from"].tolist() == ["default", "domain strings"]
    assert table["best retrieved caption"][1] in domain.datastore.captions
    assert table["best retrieved caption"][0] in service.datastore.captions
    status, dropdown = handlers.save(domain)
    assert "saved" in status and service.domain_names() == ["strings"]
    status, chosen = handlers.choose("strings")
    assert chosen.datastore.captions == domain.datastore.captions and "loaded from the saved domains" in status
    status, none = handlers.reset()
    assert none is None and "the default" in status


def test_bad_inputs_keep_a_message(service, tmp_path):
    handlers = AdaptHandlers(service)
    (tmp_path / "ok.txt").write_text("a caption\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(GradioError, match="No captions to build a domain from"):
        handlers.build([str(empty)], None, "x", progress=no_progress)
    with pytest.raises(GradioError, match="cannot name a domain"):
        handlers.build([str(tmp_path / "ok.txt")], None, "../up", progress=no_progress)
    with pytest.raises(GradioError, match="Build or choose a domain first"):
        clip = tmp_path / "c.wav"
        sf.write(clip, noise_clip(1.0, 16_000), 16_000)
        handlers.compare(str(clip), None)
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(GradioError, match="has no 'caption' column"):
        handlers.build([str(bad)], None, "x", progress=no_progress)
