"""The annotation store: queues from folders, lists and uploads with stable ids; typed errors for bad input;
resume after a restart; two annotators at once; acknowledged decisions surviving SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.annotations import (
    DB_FILE,
    AnnotationStore,
    Decision,
    ModelVersions,
    Suggestion,
    content_id,
    list_queues,
    now_iso,
    open_store,
    path_id,
    queue_from_folder,
    queue_from_list,
    queue_name_for,
)
from engine.errors import AudioScribeError, ConfigError, DatastoreError, UndecodableAudioError
from tests.helpers import PROJECT_ROOT


def write_clip(path: Path, seconds: float = 0.25, freq: float = 440.0, sample_rate: int = 16_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sample_rate)
    return path


@pytest.fixture
def clip_folder(tmp_path) -> Path:
    """5 clips in a nested folder, plus files that are not audio."""
    folder = tmp_path / "clips"
    for i, name in enumerate(["b.wav", "a.wav", "sub/c.flac", "sub/d.wav", "z/e.ogg"]):
        write_clip(folder / name, freq=300 + 100 * i)
    (folder / "notes.txt").write_text("not audio")
    (folder / "sub" / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


@pytest.fixture
def store(tmp_path, clip_folder) -> AnnotationStore:
    store = open_store(tmp_path / "stores", "birds")
    store.add_folder(clip_folder)
    yield store
    store.close()


# --------------------------------------------------------------------------------------------------------------------
# queues


def test_folder_queue_is_sorted_recursive_audio_only(clip_folder):
    items = queue_from_folder(clip_folder)
    assert [i.name for i in items] == ["a.wav", "b.wav", "sub/c.flac", "sub/d.wav", "z/e.ogg"]
    assert all(i.clip_id == path_id(i.path) and Path(i.path).is_absolute() for i in items)


def test_ids_and_order_are_stable_across_reopen(tmp_path, clip_folder):
    with open_store(tmp_path / "stores", "q") as store:
        assert store.add_folder(clip_folder) == 5
        first = store.clips()
    with open_store(tmp_path / "stores", "q") as again:
        assert again.add_folder(clip_folder) == 0  # the same queue opened twice: the same clips
        assert again.clips() == first
    assert [c.position for c in first] == list(range(5))
    assert first[0].duration_s == pytest.approx(0.25)
    assert list_queues(tmp_path / "stores") == ["q"]


def test_csv_list_resolves_relative_paths_and_prefills(tmp_path, clip_folder):
    list_file = tmp_path / "lists" / "queue.csv"
    list_file.parent.mkdir()
    list_file.write_text("path,caption,labels\n"
                         "../clips/sub/d.wav,a bird sings,bird;wind\n"
                         f"{clip_folder / 'a.wav'},,\n"
                         "../clips/sub/d.wav,duplicate row,\n")
    items = queue_from_list(list_file)
    assert [i.path for i in items] == [str((clip_folder / "sub/d.wav").resolve()), str(clip_folder / "a.wav")]
    assert items[0].caption == "a bird sings" and items[0].labels == ("bird", "wind")
    # the same file gets the same id whichever way it was named
    assert items[0].clip_id == queue_from_folder(clip_folder)[3].clip_id
    with open_store(tmp_path / "stores", "list") as store:
        store.add_list(list_file)
        clip = store.clips()[0]
        assert (clip.caption, clip.labels, clip.name) == ("a bird sings", ("bird", "wind"), "../clips/sub/d.wav")


def test_jsonl_list_reads_source_or_file_name(tmp_path, clip_folder):
    list_file = clip_folder / "queue.jsonl"
    list_file.write_text(json.dumps({"source": "a.wav", "labels": ["dog", " dog ", "Rain"]}) + "\n\n" +
                         json.dumps({"file_name": "z/e.ogg", "caption": "waves"}) + "\n")
    items = queue_from_list(list_file)
    assert [i.name for i in items] == ["a.wav", "z/e.ogg"]
    assert items[0].labels == ("dog", "Rain") and items[1].caption == "waves"


def test_list_without_path_column_names_the_columns_found(tmp_path):
    list_file = tmp_path / "bad.csv"
    list_file.write_text("name,caption\nx.wav,hello\n")
    with pytest.raises(DatastoreError, match=r"columns found: name, caption") as error:
        queue_from_list(list_file)
    assert "path" in str(error.value) and "source" in str(error.value)


def test_jsonl_records_without_path_are_named(tmp_path):
    list_file = tmp_path / "bad.jsonl"
    list_file.write_text('{"source": "a.wav"}\n{"caption": "x"}\n{"wav": "b.wav"}\n')
    with pytest.raises(DatastoreError, match=r"record\(s\) 2, 3 have no path field.*fields found: caption, "
                                             r"source, wav"):
        queue_from_list(list_file)


def test_missing_paths_are_collected_in_one_error(tmp_path, clip_folder):
    list_file = clip_folder / "queue.csv"
    list_file.write_text("source\na.wav\nmissing1.wav\nsub/d.wav\nnope/missing2.flac\n")
    with pytest.raises(DatastoreError, match=r"2 file\(s\) listed in queue.csv do not exist: missing1.wav, "
                                             r"nope/missing2.flac"):
        queue_from_list(list_file)


def test_empty_folder_and_unknown_list_type(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatastoreError, match="No audio files"):
        queue_from_folder(tmp_path / "empty")
    (tmp_path / "list.xlsx").write_text("x")
    with pytest.raises(DatastoreError, match="list.xlsx"):
        queue_from_list(tmp_path / "list.xlsx")


def test_uploads_are_copied_into_the_store_and_keyed_by_content(tmp_path):
    upload_dir = tmp_path / "gradio" / "abc123"
    first = write_clip(upload_dir / "dog.wav", freq=500)
    same = upload_dir.parent / "other" / "dog copy.wav"
    same.parent.mkdir()
    same.write_bytes(first.read_bytes())
    other = write_clip(upload_dir / "rain.wav", freq=900)
    with open_store(tmp_path / "stores", "uploads") as store:
        assert store.add_uploads([first, same, other]) == 2  # identical bytes: one clip
        ids = {c.clip_id for c in store.clips()}
        assert ids == {content_id(first), content_id(other)}
        for path in (first, same, other):
            path.unlink()  # Gradio's upload cache expires
        clips = store.clips()
        assert all(Path(c.path).is_file() and Path(c.path).parent == store.media_dir for c in clips)
        assert [c.name for c in clips] == ["dog.wav", "rain.wav"]
        # the same file uploaded again later (another temporary path) maps to the same clip
        again = write_clip(tmp_path / "later" / "dog.wav", freq=500)
        assert store.add_uploads([again]) == 0


def test_undecodable_uploads_are_named_and_nothing_is_added(tmp_path):
    good = write_clip(tmp_path / "up" / "good.wav")
    png = tmp_path / "up" / "picture.wav"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
    with open_store(tmp_path / "stores", "uploads") as store:
        with pytest.raises(UndecodableAudioError, match="picture.wav") as error:
            store.add_uploads([good, png])
        assert "good.wav" not in str(error.value)
        assert len(store) == 0 and not store.media_dir.exists()
        with pytest.raises(DatastoreError, match="gone.wav"):
            store.add_uploads([tmp_path / "up" / "gone.wav"])


def test_queue_names_are_checked(tmp_path):
    for bad in ("", "../escape", ".hidden", "a/b", "x" * 65):
        with pytest.raises(ConfigError, match="Invalid queue name"):
            open_store(tmp_path, bad)
    assert queue_name_for("/data/My Clips (2024).csv") == "My-Clips-2024"


# --------------------------------------------------------------------------------------------------------------------
# decisions


def test_record_returns_the_committed_decision_and_keeps_suggestions_apart(store):
    clip = store.clips()[0]
    suggestion = Suggestion(caption="a dog barks", retrieved=("a dog is barking", "dogs bark"), labels=("dog",),
                            scores={"dog": 0.8, "cat": 0.1}, label_source="tuned")
    models = ModelVersions(clap_name="laion/clap", clap_fingerprint="abc", datastore_version="v-000002",
                           datastore_size=45716, llm="tiny-llama", decoder="beam4", prompt_key="k1")
    started = now_iso()
    recorded = store.record(Decision(clip.clip_id, "alice", "edit", "  a small dog\nbarks twice ", ["dog", "Dog"],
                                     suggestion, models, started_at=started, note="clear"))
    assert recorded.id == 1 and recorded.decided_at >= started and recorded.seconds_spent >= 0
    assert (recorded.caption, recorded.labels) == ("a small dog barks twice", ("dog",))
    stored = store.latest_decision(clip.clip_id)
    assert stored == recorded
    assert stored.suggestion == suggestion and stored.models == models and stored.caption != suggestion.caption
    # dicts (what the app builds from JSON) are accepted for suggestion and models
    from_dicts = store.record(Decision(clip.clip_id, "bob", "accept", "dog", suggestion={"caption": "x"},
                                       models={"clap_name": "m", "unknown_future_field": 1}))
    assert from_dicts.suggestion.caption == "x" and from_dicts.models.clap_name == "m"


@pytest.mark.parametrize("decision, error, message", [
    (dict(status="approve"), ConfigError, "Unknown decision status 'approve'"),
    (dict(status="accept", caption="   "), ConfigError, "'accept' decision needs a caption"),
    (dict(status="edit", caption=""), ConfigError, "'edit' decision needs a caption"),
    (dict(status="accept", caption="x", labels=["dog;cat"]), ConfigError, "Labels cannot contain"),
    (dict(status="accept", caption="x", labels="dog"), ConfigError, "list of label names"),
    (dict(status="skip", started_at="yesterday"), ConfigError, "ISO 8601"),
    (dict(status="skip", seconds_spent=-1.0), ConfigError, "seconds_spent"),
    (dict(clip_id="no-such-clip", status="skip"), DatastoreError, "no clip with id 'no-such-clip'"),
])
def test_invalid_decisions_are_refused_with_typed_errors(store, decision, error, message):
    fields = {"clip_id": store.clips()[0].clip_id, "annotator": "alice", **decision}
    with pytest.raises(error, match=message):
        store.record(Decision(**fields))
    assert store.decisions(latest_only=False) == []
    assert issubclass(error, AudioScribeError)


def test_skip_and_flag_need_no_caption(store):
    a, b = store.clips()[:2]
    store.record(Decision(a.clip_id, "alice", "skip"))
    store.record(Decision(b.clip_id, "", "FLAG", note="clipping"))
    assert store.latest_decision(b.clip_id).annotator == "anonymous"
    assert store.progress() == store.progress(None)
    assert (store.progress().skipped, store.progress().flagged) == (1, 1)


def test_decisions_are_append_only(store):
    clip = store.clips()[0]
    store.record(Decision(clip.clip_id, "alice", "accept", "a bird"))
    store.record(Decision(clip.clip_id, "alice", "flag"))
    connection = sqlite3.connect(store.db_path)
    for statement in ("UPDATE decisions SET caption = 'x'", "DELETE FROM decisions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute(statement)
    connection.close()
    everything = store.decisions(latest_only=False)
    assert [d.status for d in everything] == ["accept", "flag"]
    assert [d.status for d in store.decisions()] == ["flag"]  # the latest is current
    assert store.decisions(statuses=["accept", "edit"]) == []  # accepted, then flagged: not accepted any more


def test_progress_and_latest_per_annotator(store):
    a, b, c = (clip.clip_id for clip in store.clips()[:3])
    store.record(Decision(a, "alice", "accept", "one"))
    store.record(Decision(b, "alice", "edit", "two"))
    store.record(Decision(a, "bob", "skip"))
    store.record(Decision(c, "bob", "flag"))
    assert store.progress() == type(store.progress())(5, 3, 0, 1, 1, 1)  # a's latest is bob's skip
    assert store.progress("alice") == type(store.progress())(5, 2, 1, 1, 0, 0)
    assert store.progress().remaining == 2
    assert [d.status for d in store.decisions(annotator="alice")] == ["accept", "edit"]
    assert [d.clip_id for d in store.decisions(latest_only=False, annotator="bob")] == [a, c]
    assert store.latest_decision(a).annotator == "bob" and store.latest_decision(a, "alice").caption == "one"
    assert store.annotators() == ["alice", "bob"]


# --------------------------------------------------------------------------------------------------------------------
# resume and navigation


def test_resume_after_reopening_the_store(tmp_path, clip_folder):
    root = tmp_path / "stores"
    with open_store(root, "birds") as store:
        store.add_folder(clip_folder)
        clips = store.clips()
        for clip in clips[:2]:
            store.record(Decision(clip.clip_id, "alice", "accept", f"caption of {clip.name}"))
    with open_store(root, "birds") as reopened:  # a new object, as after a server restart
        assert reopened.resume("alice") == clips[2]
        assert reopened.next_clip("alice") == clips[2]
        assert reopened.first_undecided("alice") == clips[2]
        assert reopened.resume("bob") == clips[0]  # each annotator resumes where they are
        assert reopened.progress("alice").decided == 2


def test_resume_continues_after_the_last_decided_clip_and_wraps(store):
    clips = store.clips()
    for index in (0, 3):  # decided 1, then jumped ahead to 4
        store.record(Decision(clips[index].clip_id, "alice", "skip"))
    assert store.resume("alice") == clips[4]
    store.record(Decision(clips[4].clip_id, "alice", "skip"))
    assert store.resume("alice") == clips[1]  # nothing undecided after the last one: back to the first gap
    for index in (1, 2):
        store.record(Decision(clips[index].clip_id, "alice", "skip"))
    assert store.resume("alice") is None and store.first_undecided("alice") is None
    assert store.first_undecided() is None and store.first_undecided("carol") == clips[0]


def test_next_and_previous(store):
    clips = store.clips()
    store.record(Decision(clips[1].clip_id, "alice", "accept", "x"))
    assert store.next_clip("alice", after=clips[0].clip_id) == clips[1]
    assert store.next_clip("alice", after=clips[0].clip_id, undecided_only=True) == clips[2]
    assert store.next_clip("alice", after=clips[4].clip_id) is None
    assert store.previous_clip(clips[2].clip_id) == clips[1]
    assert store.previous_clip(clips[0].clip_id) is None
    with pytest.raises(DatastoreError, match="no clip with id"):
        store.next_clip("alice", after="missing")


# --------------------------------------------------------------------------------------------------------------------
# concurrency and durability


def test_two_annotators_at_once_keep_every_decision(tmp_path, clip_folder):
    root = tmp_path / "stores"
    with open_store(root, "shared") as setup:
        setup.add_folder(clip_folder)
        clip_ids = [c.clip_id for c in setup.clips()]
    stores = {"alice": open_store(root, "shared"), "bob": open_store(root, "shared")}  # two sessions
    acknowledged: dict[str, list] = {"alice": [], "bob": []}
    barrier = threading.Barrier(2)

    def annotate(annotator: str) -> None:
        barrier.wait()
        for i in range(50):
            status = ("accept", "edit", "skip", "flag")[i % 4]
            clip_id = clip_ids[(i * 3 + len(annotator)) % len(clip_ids)]
            acknowledged[annotator].append(stores[annotator].record(
                Decision(clip_id, annotator, status, f"{annotator} {i}" if status in ("accept", "edit") else "")))

    threads = [threading.Thread(target=annotate, args=(name,)) for name in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for s in stores.values():
        s.close()
    with open_store(root, "shared") as store:
        rows = store.decisions(latest_only=False)
        assert len(rows) == 100 and sorted(d.id for d in rows) == list(range(1, 101))
        assert {d.id for d in rows} == {d.id for acks in acknowledged.values() for d in acks}
        everything = [d for acks in acknowledged.values() for d in acks]
        expected = {clip: max((d for d in everything if d.clip_id == clip), key=lambda d: d.id) for clip in clip_ids}
        assert {d.clip_id: d for d in store.decisions()} == expected
        for annotator, acks in acknowledged.items():
            mine = {clip: max((d for d in acks if d.clip_id == clip), key=lambda d: d.id) for clip in clip_ids}
            assert {d.clip_id: d for d in store.decisions(annotator=annotator)} == mine
        assert store.integrity_check() == "ok"


def test_one_store_object_shared_by_threads(store):
    clip_ids = [c.clip_id for c in store.clips()]
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                store.record(Decision(clip_ids[i % 5], f"user{n}", "skip"))
                store.progress()
                store.resume(f"user{n}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(store.decisions(latest_only=False)) == 80


_CHILD = """
import sys
from engine.annotations import Decision, open_store
store = open_store(sys.argv[1], "crash")
clip_ids = [c.clip_id for c in store.clips()]
i = 0
while True:
    decision = store.record(Decision(clip_ids[i % len(clip_ids)], "child", "edit", f"caption {i} " + "x" * (i % 500),
                                     suggestion={"caption": "s" * 2000, "retrieved": ["r"] * 20}))
    print(decision.id, flush=True)  # printed only after record() returned: the acknowledgement
    i += 1
"""


def test_acknowledged_decisions_survive_sigkill(tmp_path, clip_folder):
    root = tmp_path / "stores"
    with open_store(root, "crash") as setup:
        setup.add_folder(clip_folder)
    acknowledged: list[int] = []
    for round_ in range(3):  # three kills, each at whatever point the child has reached
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], cwd=PROJECT_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(5 + 7 * round_):
                line = child.stdout.readline()
                assert line, f"the child stopped early: {child.stderr.read()[-2000:]}"
                acknowledged.append(int(line))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
        assert child.returncode == -signal.SIGKILL
        acknowledged += [int(line) for line in child.stdout.read().split()]  # acknowledged before the kill landed
        child.stdout.close()
        child.stderr.close()
    with open_store(root, "crash") as store:
        assert store.integrity_check() == "ok"
        ids = {d.id for d in store.decisions(latest_only=False)}
        assert set(acknowledged) <= ids
        assert all(d.caption.startswith("caption ") for d in store.decisions(latest_only=False))
    connection = sqlite3.connect(root / "crash" / DB_FILE)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_a_damaged_store_is_a_typed_error_naming_the_file(tmp_path):
    folder = tmp_path / "stores" / "broken"
    folder.mkdir(parents=True)
    (folder / DB_FILE).write_bytes(b"this is not a database, just text " * 200)
    with pytest.raises(DatastoreError, match="annotations.sqlite is damaged or not an annotation store") as error:
        open_store(tmp_path / "stores", "broken")
    assert str(folder / DB_FILE) in str(error.value)


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    with open_store(tmp_path, "future") as store:
        path = store.db_path
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(DatastoreError, match="newer AudioScribe"):
        open_store(tmp_path, "future")


def test_a_damaged_page_is_found_when_the_store_is_opened(tmp_path, clip_folder):
    with open_store(tmp_path / "stores", "pages") as store:
        store.add_folder(clip_folder)
        clip_id = store.clips()[0].clip_id
        for i in range(300):
            store.record(Decision(clip_id, "alice", "edit", f"caption {i} " * 20))
    path = tmp_path / "stores" / "pages" / DB_FILE  # the last close checkpointed the WAL into the file
    data = bytearray(path.read_bytes())
    data[3 * 4096:3 * 4096 + 600] = b"\xab" * 600  # overwrite part of a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match=r"damaged .*\(database disk image is malformed\)"):
        open_store(tmp_path / "stores", "pages")
