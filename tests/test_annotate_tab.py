"""The Annotate and Export tabs' handlers, called directly (no server): open a queue, take suggestions, decide,
resume after a restart, export, and feed the accepted captions into Adapt."""
from __future__ import annotations

import zipfile

import pandas as pd
import pytest
import soundfile as sf
from gradio.exceptions import Error as GradioError

from app.tabs.adapt import AdaptHandlers
from app.tabs.annotate import AnnotateHandlers, AnnotateState
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config

LABELS = "dog\nrain\nsiren"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    config = tiny_app_config(tmp_path_factory.mktemp("annotate"), tiny_clap_dir, tiny_llama_dir, 200, max_new_tokens=6)
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(5):
        sf.write(folder / f"clip{i}.wav", noise_clip(1.5, 16_000, seed=i), 16_000)
    return folder


def shown(result: tuple) -> dict:
    audio, header, progress, caption, labels, note, state = result[:7]
    return {"audio": audio, "header": header, "progress": progress, "caption": caption, "labels": labels,
            "state": state}


def test_annotate_a_folder_resume_after_a_restart_and_export(service, clips, tmp_path):
    handlers = AnnotateHandlers(service)
    result = handlers.open_queue("birds", str(clips), None, "ada", None)
    view = shown(result)
    assert view["audio"].endswith("clip0.wav") and "clip 1 of 5" in view["header"]
    assert "Queue **birds**: 5 clips (5 new)" in result[7]
    suggestion_md, caption, labels, state = handlers.suggest(view["state"], "", [], LABELS, None, None)
    assert "Generated caption:" in suggestion_md and "zero-shot" in suggestion_md
    assert caption == state.suggestion.caption and len(labels["value"] if isinstance(labels, dict) else
                                                       labels.value) == 1
    after = shown(handlers.decide("accept", caption, ["dog"], "", state, "ada", None))
    assert after["audio"].endswith("clip1.wav") and "1 of 5 decided by **ada**" in after["progress"]
    _, _, _, _, state2 = (None, *handlers.suggest(after["state"], "", [], LABELS, None, None))
    after = shown(handlers.decide("accept", "a rain shower on a roof", ["rain"], "", state2, "ada", None))
    after = shown(handlers.decide("skip", "", [], "", after["state"], "ada", None))
    assert after["audio"].endswith("clip3.wav")

    restarted = AnnotateHandlers(service)  # a new server process: the store is reopened from disk
    resumed = shown(restarted.open_queue("birds", "", None, "ada", None))
    assert resumed["audio"].endswith("clip3.wav") and "3 of 5 decided" in resumed["progress"]
    back = shown(restarted.move(-1, resumed["state"], "ada", None))
    assert back["audio"].endswith("clip2.wav") and "your last decision: **skip**" in back["header"]
    store = restarted.store("birds")
    decisions = {d.clip_id: d for d in store.decisions()}
    edited = [d for d in decisions.values() if d.status == "edit"]
    assert len(decisions) == 3 and len(edited) == 1 and edited[0].caption == "a rain shower on a roof"
    assert edited[0].suggestion.caption and edited[0].models.clap_fingerprint == service.clap.fingerprint
    assert edited[0].annotator == "ada" and edited[0].seconds_spent is not None

    files, summary = restarted.export("birds", ["csv", "audiofolder", "tune_prompts"], ["accept", "edit"])
    assert summary["clips"].tolist()[0] == 2
    table = pd.read_csv(next(f for f in files if f.endswith(".csv") and "tune" not in f))
    assert sorted(table["caption"]) == sorted([decisions[k].caption for k in decisions if decisions[k].status
                                               in ("accept", "edit")])
    archive = next(f for f in files if f.endswith(".zip"))
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
    assert "metadata.csv" in names and sum(n.endswith(".wav") for n in names) == 2

    adapt = AdaptHandlers(service, restarted)
    status, domain = adapt.build(None, "birds", "birds-domain", progress=lambda *a, **k: None)
    assert "a rain shower on a roof" in domain.datastore.captions and len(domain.datastore) == 2


def test_bad_queue_inputs_keep_a_message(service, tmp_path):
    handlers = AnnotateHandlers(service)
    with pytest.raises(GradioError, match="queue is empty"):
        handlers.open_queue("empty", "", None, "ada", None)
    with pytest.raises(GradioError, match="Open a queue first"):
        handlers.decide("accept", "x", [], "", AnnotateState(), "ada", None)
    with pytest.raises(GradioError, match="Choose at least one export format"):
        handlers.export("empty", [], ["accept"])
    service.config.annotate.server_paths = False
    try:
        with pytest.raises(GradioError, match="annotate.server_paths"):
            handlers.open_queue("x", str(tmp_path), None, "ada", None)
    finally:
        service.config.annotate.server_paths = True
