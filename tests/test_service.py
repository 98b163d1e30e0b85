"""The engine facade: datastore resolution and caching, retrieval and classification of loaded audio."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from engine.config import AppConfig
from engine.datastore import CaptionDatastore
from engine.errors import AudioTooLongError, DatastoreError, ModelLoadError
from engine.service import AudioScribe, open_datastore
from tests.helpers import noise_clip, small_caption_set


@pytest.fixture
def caption_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(small_caption_set(400)) + "\n")
    return path


def make_config(tmp_path, tiny_clap_dir, caption_file, **datastore) -> AppConfig:
    config = AppConfig(cache_dir=str(tmp_path / "cache"))
    config.clap.model, config.clap.device = str(tiny_clap_dir), "cpu"
    config.datastore.sources = [str(caption_file)]
    config.caption.enabled = False  # captioning has its own tests (test_drcap.py, test_app.py)
    for key, value in datastore.items():
        setattr(config.datastore, key, value)
    return config


def test_datastore_is_built_once_then_loaded_from_the_cache(tmp_path, tiny_clap, tiny_clap_dir, caption_file,
                                                            monkeypatch):
    config = make_config(tmp_path, tiny_clap_dir, caption_file)
    first = open_datastore(config, tiny_clap, show_progress=False)
    assert len(first) == 400
    cached = list((tmp_path / "cache" / "datastores").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached datastore should have been loaded")
    monkeypatch.setattr(CaptionDatastore, "from_files", no_rebuild)
    assert open_datastore(config, tiny_clap).captions == first.captions
    # Changing the captions changes the cache key.
    caption_file.write_text("only one caption\n")
    monkeypatch.undo()
    assert len(open_datastore(config, tiny_clap, show_progress=False)) == 1


def test_explicit_datastore_path_is_built_there_and_checked(tmp_path, tiny_clap, other_clap, tiny_clap_dir,
                                                            caption_file):
    config = make_config(tmp_path, tiny_clap_dir, caption_file, path=str(tmp_path / "store"))
    open_datastore(config, tiny_clap, show_progress=False)
    assert (tmp_path / "store" / "manifest.json").is_file()
    with pytest.raises(DatastoreError, match="built with CLAP"):
        open_datastore(config, other_clap)
    config.datastore.sources = []
    config.datastore.path = str(tmp_path / "empty")
    with pytest.raises(DatastoreError, match="holds no datastore and datastore.sources is empty"):
        open_datastore(config, tiny_clap)
    config.datastore.path = ""
    assert open_datastore(config, tiny_clap) is None


def test_retrieve_and_classify_a_file(tmp_path, tiny_clap_dir, caption_file):
    service = AudioScribe.from_config(make_config(tmp_path, tiny_clap_dir, caption_file, top_k=4), show_progress=False)
    stereo_44k = np.stack([noise_clip(12.0, 44_100), noise_clip(12.0, 44_100, seed=2)], axis=1)
    sf.write(tmp_path / "clip.wav", stereo_44k, 44_100, subtype="PCM_16")
    audio = service.load(str(tmp_path / "clip.wav"))
    assert audio.sample_rate == 48_000 and audio.original_channels == 2

    found = service.retrieve(audio)
    assert len(found.clip.captions[0]) == 4 and len(found.windows) == 2  # 12 s: (0,10) and the shifted (2,12)
    clip_embedding = service.clap.embed_audio([audio])
    np.testing.assert_array_equal(found.clip.indices, service.datastore.search(clip_embedding, 4).indices)
    assert found.per_window.scores.shape == (2, 4)

    result = service.classify(audio, ["dog", "rain"], multi_label=False)
    assert result.scores.shape == (2,) and result.scores.sum() == pytest.approx(1.0, abs=1e-5)
    status = service.status()
    assert status["clap_untrained"] is True and status["datastore_size"] == 400 and status["captioner"] == "off"
    with pytest.raises(ModelLoadError, match="Captioning is off"):
        service.caption(audio)


def test_duration_limit_comes_from_the_config(tmp_path, tiny_clap_dir, caption_file):
    config = make_config(tmp_path, tiny_clap_dir, caption_file)
    config.audio.max_duration_s = 5.0
    service = AudioScribe.from_config(config, show_progress=False)
    with pytest.raises(AudioTooLongError):
        service.load((48_000, noise_clip(6.0)))


def test_a_datastore_to_build_is_built_in_the_background_and_requests_say_so(tmp_path, tiny_clap_dir, caption_file,
                                                                            monkeypatch):
    import threading

    from engine.errors import NotReadyError

    release = threading.Event()
    real_from_files = CaptionDatastore.from_files

    def held_build(*args, **kwargs):  # the build waits until the test has looked at the not-ready state
        kwargs["progress"](100, 400)
        assert release.wait(60)
        return real_from_files(*args, **kwargs)

    monkeypatch.setattr(CaptionDatastore, "from_files", held_build)
    config = make_config(tmp_path, tiny_clap_dir, caption_file)
    scribe = AudioScribe.from_config(config, show_progress=False, background=True)  # returns before the build ends
    audio = scribe.load((16_000, noise_clip(2.0, 16_000)))
    for _ in range(100):
        if scribe.readiness.total:
            break
        threading.Event().wait(0.05)
    assert scribe.readiness.state == "building" and "100 of 400 captions embedded" in scribe.readiness.describe()
    with pytest.raises(NotReadyError, match="not ready yet: Building the caption datastore"):
        scribe.retrieve(audio)
    assert len(scribe.classify(audio, ["dog", "rain"]).scores) == 2  # zero-shot needs no datastore
    release.set()
    assert scribe.wait_until_ready(60).state == "ready" and len(scribe.datastore) == 400
    assert scribe.status()["readiness"] == "ready" and len(scribe.retrieve(audio).clip.captions[0]) == 5
    again = AudioScribe.from_config(config, show_progress=False, background=True)  # cached now: loaded at once
    assert again.datastore is not None and again.readiness.state == "ready"


def test_a_failed_background_build_is_reported(tmp_path, tiny_clap_dir, caption_file, monkeypatch):
    def broken(*args, **kwargs):
        raise DatastoreError("disk full")

    monkeypatch.setattr(CaptionDatastore, "from_files", broken)
    scribe = AudioScribe.from_config(make_config(tmp_path, tiny_clap_dir, caption_file), show_progress=False,
                                     background=True)
    assert scribe.wait_until_ready(60).state == "failed"
    with pytest.raises(DatastoreError, match="Loading failed: disk full"):
        scribe.retrieve(scribe.load((16_000, noise_clip(1.0, 16_000))))


def test_a_domain_from_captions_serves_one_request_and_can_be_saved_by_name(tmp_path, tiny_clap_dir, caption_file):
    scribe = AudioScribe.from_config(make_config(tmp_path, tiny_clap_dir, caption_file), show_progress=False)
    audio = scribe.load((16_000, noise_clip(2.0, 16_000)))
    captions = ["A violin plays a slow melody", "A cello and a violin play together", "Piano chords ring out"]
    domain = scribe.build_domain("strings", captions)
    found = scribe.retrieve(audio, k=3, domain=domain)
    assert sorted(found.clip.captions[0]) == sorted(captions)  # only the domain's captions
    assert len(scribe.retrieve(audio, k=3).clip.captions[0]) == 3 and scribe.datastore is not domain.datastore
    assert scribe.domain_names() == []
    scribe.save_domain(domain)
    assert scribe.domain_names() == ["strings"]
    assert scribe.load_domain("strings").datastore.captions == captions
    for bad in ("", "../etc", "a/b", "x" * 65):
        with pytest.raises(DatastoreError, match="cannot name a domain"):
            scribe.build_domain(bad, captions)
    with pytest.raises(DatastoreError, match="No saved domain is called 'nope'"):
        scribe.load_domain("nope")
