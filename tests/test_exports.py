"""Exports of annotation decisions: the content of every format, read back by pandas, by the trainers' own readers
and (when installed) by Hugging Face datasets."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from engine.annotations import Decision, ModelVersions, Suggestion, open_store
from engine.classifier import parse_class_names
from engine.datastore import read_caption_records, read_captions
from engine.errors import ConfigError, DatastoreError
from engine.exports import (
    DEFAULT_NAMES,
    FORMATS,
    Selection,
    export,
    export_audiocaps,
    export_audiofolder,
    export_csv,
    export_jsonl,
    export_label_studio,
    export_tune_prompts,
)
from tests.test_annotations import write_clip

MODELS = ModelVersions(clap_name="tiny-clap", clap_fingerprint="f" * 40, datastore_version="v-000003",
                       datastore_size=1234, llm="tiny-llama", decoder="drcap-beam", prompt_key="k" * 64)


def suggestion(i: int) -> Suggestion:
    return Suggestion(caption=f"generated {i}", retrieved=(f"retrieved {i} a", f"retrieved {i} b"),
                      labels=("dog",), scores={"dog": 0.7, "rain": 0.2}, label_source="zero-shot")


@pytest.fixture
def store(tmp_path):
    """Clips 0-4: 0 edited by bob then accepted by alice, 1 edited, 2 skipped, 3 flagged, 4 undecided."""
    folder = tmp_path / "clips"
    for i, name in enumerate(["dog.wav", "rain.wav", "noise.wav", "sub/bad.wav", "sub/later.flac"]):
        write_clip(folder / name, freq=300 + 100 * i)
    store = open_store(tmp_path / "stores", "demo")
    store.add_folder(folder)
    c = {clip.name: clip.clip_id for clip in store.clips()}
    store.record(Decision(c["dog.wav"], "bob", "edit", "a dog", ["dog"], suggestion(0), MODELS))
    store.record(Decision(c["dog.wav"], "alice", "accept", "generated 0", ["dog"], suggestion(0), MODELS,
                          started_at="2024-01-01T00:00:00Z", note="fine"))
    store.record(Decision(c["rain.wav"], "alice", "edit", "rain falls on a roof, 'loudly'", ["rain", "car horn"],
                          suggestion(1), MODELS))
    store.record(Decision(c["noise.wav"], "alice", "skip", suggestion=suggestion(2)))
    store.record(Decision(c["sub/bad.wav"], "bob", "flag", "", ["dog"], note="clipped"))
    yield store
    store.close()


def test_nothing_accepted_is_a_typed_error(tmp_path):
    write_clip(tmp_path / "clips" / "a.wav")
    with open_store(tmp_path / "stores", "empty") as store:
        store.add_folder(tmp_path / "clips")
        for fmt in FORMATS:
            with pytest.raises(DatastoreError, match="no clip is accepted or edited yet"):
                export(store, fmt, tmp_path / "out")
        store.record(Decision(store.clips()[0].clip_id, "alice", "skip"))
        with pytest.raises(DatastoreError, match="Nothing to export"):
            export_csv(store, tmp_path / "out" / "x.csv")
        assert export_csv(store, tmp_path / "out" / "x.csv", Selection(statuses=("skip",))).rows == 1
    assert not (tmp_path / "out" / DEFAULT_NAMES["audiofolder"]).exists()


def test_csv_has_every_field_one_row_per_clip(store, tmp_path):
    result = export_csv(store, tmp_path / "out" / "annotations.csv")
    assert result.paths == [tmp_path / "out" / "annotations.csv"] and result.rows == 2
    table = pd.read_csv(result.paths[0], keep_default_na=False)
    assert list(table["file_name"]) == ["dog.wav", "rain.wav"]
    assert list(table["status"]) == ["accept", "edit"] and list(table["annotator"]) == ["alice", "alice"]
    assert list(table["caption"]) == ["generated 0", "rain falls on a roof, 'loudly'"]
    assert list(table["labels"]) == ["dog", "rain;car horn"]
    assert list(table["suggested_caption"]) == ["generated 0", "generated 1"]  # kept apart from the decision
    assert json.loads(table["retrieved_captions"][1]) == ["retrieved 1 a", "retrieved 1 b"]
    assert json.loads(table["label_scores"][0]) == {"dog": 0.7, "rain": 0.2}
    assert float(table["seconds_spent"][0]) > 0 and table["seconds_spent"][1] == "" and table["note"][0] == "fine"
    assert set(table.columns) >= {"decision_id", "clip_id", "position", "path", "duration_s", "started_at",
                                  "decided_at", "label_source", "clap_name", "clap_fingerprint", "datastore_version",
                                  "datastore_size", "llm", "decoder", "prompt_key"}
    assert table["datastore_size"][0] == 1234 and table["prompt_key"][0] == "k" * 64


def test_selection_options(store, tmp_path):
    everything = Selection(statuses=("accept", "edit", "skip", "flag"), latest_only=False)
    table = pd.read_csv(export_csv(store, tmp_path / "all.csv", everything).paths[0], keep_default_na=False)
    assert list(table["status"]) == ["edit", "accept", "skip", "edit", "flag"]  # queue order, then time
    bob = pd.read_csv(export_csv(store, tmp_path / "bob.csv", Selection(annotator="bob")).paths[0])
    assert list(bob["caption"]) == ["a dog"]  # bob's own latest, although alice decided later
    with_flags = pd.read_csv(export_csv(store, tmp_path / "f.csv", Selection(statuses=("accept", "flag"))).paths[0])
    assert list(with_flags["status"]) == ["accept", "flag"]


def test_jsonl_nests_suggestion_and_models(store, tmp_path):
    result = export_jsonl(store, tmp_path / "annotations.jsonl")
    records = [json.loads(line) for line in result.paths[0].read_text().splitlines()]
    assert [r["caption"] for r in records] == ["generated 0", "rain falls on a roof, 'loudly'"]
    assert records[1]["labels"] == ["rain", "car horn"]
    assert records[1]["suggestion"] == {"caption": "generated 1", "retrieved": ["retrieved 1 a", "retrieved 1 b"],
                                        "labels": ["dog"], "scores": {"dog": 0.7, "rain": 0.2},
                                        "label_source": "zero-shot"}
    assert records[0]["models"]["clap_fingerprint"] == "f" * 40


def test_audiofolder_metadata_and_files(store, tmp_path):
    result = export_audiofolder(store, tmp_path / "out" / "dataset")
    folder, metadata = result.paths
    table = pd.read_csv(metadata, keep_default_na=False)
    assert table.columns[0] == "file_name"
    assert list(table["file_name"]) == ["audio/dog.wav", "audio/rain.wav"]
    assert list(table["caption"]) == ["generated 0", "rain falls on a roof, 'loudly'"]
    assert list(table["labels"]) == ["dog", "rain;car horn"]
    for name, clip in zip(table["file_name"], [c for c in store.clips() if c.name in ("dog.wav", "rain.wav")]):
        assert (folder / name).read_bytes() == Path(clip.path).read_bytes()
    assert "path" not in table.columns  # the server's folders stay out of a shared dataset

    # a second export replaces the first as a whole
    store.record(Decision(store.clips()[4].clip_id, "alice", "accept", "later"))
    table = pd.read_csv(export_audiofolder(store, tmp_path / "out" / "dataset", link=False).paths[1])
    assert list(table["file_name"]) == ["audio/dog.wav", "audio/rain.wav", "audio/sub/later.flac"]
    assert (folder / "audio" / "sub" / "later.flac").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".lock")) == \
        [".dataset.v-000002", "dataset"]


def test_audiofolder_loads_with_datasets_when_installed(store, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = export_audiofolder(store, tmp_path / "dataset").paths[0]
    loaded = datasets.load_dataset("audiofolder", data_dir=str(folder), split="train")
    assert sorted(loaded["caption"]) == ["generated 0", "rain falls on a roof, 'loudly'"]


def test_audiofolder_never_replaces_a_user_folder(store, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not an earlier audiofolder export"):
        export_audiofolder(store, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_label_studio_predictions_are_separate_from_annotations(store, tmp_path):
    result = export_label_studio(store, tmp_path / "ls.json", Selection(latest_only=False),
                                 audio_url=lambda clip: f"/data/local-files/?d=clips/{clip.name}",
                                 annotator_emails={"alice": "alice@example.org"})
    tasks_path, config_path = result.paths
    tasks = json.loads(tasks_path.read_text())
    assert isinstance(tasks, list) and len(tasks) == 2 and result.rows == 3
    dog, rain = tasks
    assert dog["data"]["audio"] == "/data/local-files/?d=clips/dog.wav"
    assert dog["data"]["retrieved"] == "retrieved 0 a\nretrieved 0 b"
    # the model's suggestion is a prediction ...
    (prediction,) = dog["predictions"]
    assert "tiny-clap" in prediction["model_version"] and "v-000003" in prediction["model_version"]
    assert prediction["score"] == 0.7
    assert _results(prediction) == {"textarea": ["generated 0"], "choices": ["dog"]}
    # ... each decision an annotation (bob's edit, then alice's accept)
    assert [_results(a)["textarea"] for a in dog["annotations"]] == [["a dog"], ["generated 0"]]
    assert "completed_by" not in dog["annotations"][0]  # bob has no Label Studio account
    assert dog["annotations"][1]["completed_by"] == {"email": "alice@example.org"}
    assert dog["annotations"][1]["created_at"].endswith("Z") and dog["annotations"][1]["lead_time"] > 0
    assert [d["annotator"] for d in dog["meta"]["decisions"]] == ["bob", "alice"]
    assert _results(rain["annotations"][0])["choices"] == ["rain", "car horn"]
    for task in tasks:
        for item in [r for a in task["annotations"] + task["predictions"] for r in a["result"]]:
            assert (item["to_name"], item["from_name"]) in {("audio", "caption"), ("audio", "labels")}
    # the labeling config names the same controls
    view = ET.fromstring(config_path.read_text())
    assert view.find("Audio").get("value") == "$audio"
    assert view.find("TextArea").get("name") == "caption"
    assert [c.get("value") for c in view.find("Choices")] == ["car horn", "dog", "rain"]


def _results(annotation: dict) -> dict:
    return {r["type"]: r["value"]["text" if r["type"] == "textarea" else "choices"] for r in annotation["result"]}


def test_label_studio_skip_is_cancelled(store, tmp_path):
    tasks = json.loads(export_label_studio(store, tmp_path / "ls.json", Selection(statuses=("skip",))).paths[0]
                       .read_text())
    assert [a["was_cancelled"] for a in tasks[0]["annotations"]] == [True]
    assert tasks[0]["data"]["audio"].endswith("noise.wav")


def test_audiocaps_csv_feeds_the_datastore_and_drcap_readers(store, tmp_path):
    result = export_audiocaps(store, tmp_path / "captions.csv")
    table = pd.read_csv(result.paths[0])
    assert list(table.columns[:4]) == ["audiocap_id", "file_name", "start_time", "caption"]
    assert read_captions(result.paths[0]) == ["generated 0", "rain falls on a roof, 'loudly'"]
    records = read_caption_records(result.paths[0])  # what train_drcap reads
    assert [r["key"] for r in records] == [str(i) for i in table["audiocap_id"]]
    assert [r["target"] for r in records] == ["generated 0", "rain falls on a roof, 'loudly'"]


def test_tune_prompts_csv_is_read_by_the_trainer(store, tmp_path):
    from trainers.tune_prompts import labelled_audio

    result = export_tune_prompts(store, tmp_path / "labels.csv")
    csv_path, classes_path = result.paths
    classes = parse_class_names(classes_path.read_text())
    assert classes == ["car horn", "dog", "rain"]
    sources, labels = labelled_audio(csv_path, classes)
    clips = {c.name: c.path for c in store.clips()}
    assert sources == [clips["dog.wav"], clips["rain.wav"]]
    assert labels.tolist() == [[0, 1, 0], [1, 0, 1]]


def test_tune_prompts_needs_labels(tmp_path):
    write_clip(tmp_path / "clips" / "a.wav")
    with open_store(tmp_path / "stores", "nolabels") as store:
        store.add_folder(tmp_path / "clips")
        store.record(Decision(store.clips()[0].clip_id, "alice", "accept", "a caption"))
        with pytest.raises(DatastoreError, match="no selected decision has labels"):
            export_tune_prompts(store, tmp_path / "labels.csv")


def test_export_dispatch_default_names_and_atomic_overwrite(store, tmp_path):
    out = tmp_path / "exports"
    written = {fmt: export(store, fmt, out) for fmt in FORMATS}
    for fmt, result in written.items():
        assert result.format == fmt and result.paths[0] == out / DEFAULT_NAMES[fmt] and result.paths[0].exists()
    before = (out / "annotations.csv").read_text()
    store.record(Decision(store.clips()[4].clip_id, "alice", "edit", "a later clip"))
    export(store, "csv", out)
    assert (out / "annotations.csv").read_text() != before
    assert not [p for p in out.iterdir() if ".tmp" in p.name or ".staging" in p.name]  # no leftovers
    with pytest.raises(ConfigError, match="Unknown export format 'xlsx'"):
        export(store, "xlsx", out)


def test_a_missing_audio_file_is_named(store, tmp_path):
    dog = next(c for c in store.clips() if c.name == "dog.wav")
    Path(dog.path).unlink()
    with pytest.raises(DatastoreError, match=r"no longer on disk: .*dog.wav"):
        export_audiofolder(store, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()
