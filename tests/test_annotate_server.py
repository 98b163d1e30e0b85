"""Annotation against a real server process: every acknowledged decision survives a SIGKILL of the server, and
two sessions annotating the same queue never lose or overwrite each other's decisions."""
from __future__ import annotations

import os
import signal
import threading

import pytest
import soundfile as sf
from gradio_client import Client

from benchmarks.bench_load import running_app
from engine.annotations import AnnotationStore
from tests.helpers import noise_clip, small_caption_set


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("annotate-server")
    (root / "captions.txt").write_text("\n".join(small_caption_set(200)) + "\n")
    clips = root / "clips"
    clips.mkdir()
    for i in range(6):
        sf.write(clips / f"clip{i}.wav", noise_clip(1.0, 16_000, seed=i), 16_000)
    overrides = [f"datastore.sources={root / 'captions.txt'}", "caption.max_new_tokens=4", "caption.num_beams=1",
                 f"annotate.root={root / 'annotations'}", f"cache_dir={root / 'cache'}"]
    return {"root": root, "clips": clips, "overrides": overrides}


def accept(client: Client, caption: str, annotator: str) -> str:
    """Accept the clip shown with ``caption``; returns the saved note (the acknowledgement)."""
    *_, saved = client.predict(caption, [], "", annotator, api_name="/accept_clip")
    return saved


def test_acknowledged_decisions_survive_a_sigkill_of_the_server(setup):
    acknowledged = []
    with running_app("tiny", setup["overrides"], setup["root"] / "app1.log", 180) as (process, url):
        client = Client(url, verbose=False)
        client.predict("durable", str(setup["clips"]), None, "ada", api_name="/open_queue")
        for i in range(4):
            saved = accept(client, f"caption {i}", "ada")
            assert saved.startswith("Saved: **accept**"), saved
            acknowledged.append(f"caption {i}")
        os.killpg(process.pid, signal.SIGKILL)  # no shutdown of any kind
        process.wait(10)
        client.close()
    store = AnnotationStore.open(setup["root"] / "annotations", "durable")
    assert [d.caption for d in sorted(store.decisions(), key=lambda d: d.id)] == acknowledged
    assert store.integrity_check() == "ok"
    with running_app("tiny", setup["overrides"], setup["root"] / "app2.log", 180) as (_, url):
        client = Client(url, verbose=False)
        audio, header, *_ = client.predict("durable", "", None, "ada", api_name="/open_queue")
        assert "clip 5 of 6" in header  # resumed after the last acknowledged decision
        client.close()


def test_two_sessions_on_one_queue_keep_both_annotators_decisions(setup):
    with running_app("tiny", setup["overrides"], setup["root"] / "app3.log", 180) as (_, url):
        clients = {name: Client(url, verbose=False) for name in ("ann", "bob")}
        for name, client in clients.items():
            client.predict("shared", str(setup["clips"]), None, name, api_name="/open_queue")

        def annotate(name: str) -> None:
            for i in range(6):
                accept(clients[name], f"{name} {i}", name)

        threads = [threading.Thread(target=annotate, args=(name,)) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        for client in clients.values():
            client.close()
    store = AnnotationStore.open(setup["root"] / "annotations", "shared")
    for name in ("ann", "bob"):
        mine = store.decisions(latest_only=False, annotator=name)
        assert sorted(d.caption for d in mine) == sorted(f"{name} {i}" for i in range(6))
        assert store.progress(name).decided == 6
    assert len(store.decisions(latest_only=False)) == 12
