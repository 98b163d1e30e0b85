"""The load benchmark end to end on the tiny profile: a real server on loopback, concurrent clients, a short run."""
from __future__ import annotations

import pytest

from benchmarks import bench_load
from tests.helpers import small_caption_set


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory) -> list[str]:
    """Arguments serving the tiny profile on a small datastore (building its full one takes minutes on 2 cores)."""
    captions = tmp_path_factory.mktemp("bench-load") / "captions.txt"
    captions.write_text("\n".join(small_caption_set(300)) + "\n")
    return ["--profile", "tiny", "--set", f"datastore.sources={captions}", "--set", "caption.max_new_tokens=4"]


def test_a_short_load_run_answers_every_request(tiny_app):
    summary = bench_load.main([*tiny_app, "--clients", "2", "--requests", "6", "--max-seconds", "120", "--no-write"])
    assert summary["requests"] == 6 and summary["unfinished"] == 0
    assert summary["errors"] == 0, summary["error_messages"]
    assert summary["by_kind"]["bad_audio"]["refused"] == 1  # the not-audio upload got the app's own message
    assert sum(s["requests"] for s in summary["by_kind"].values()) == 6
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"]
    assert 0 < summary["rss_before_mb"] <= summary["rss_peak_mb"]
    assert summary["rss_after_mb"] <= summary["rss_peak_mb"]


def test_the_server_is_stopped_when_the_run_is_interrupted(tiny_app, monkeypatch):
    """A Ctrl-C while the app is still starting (the cheap moment to test; the load phase exits the same way)."""
    spawned, exit_codes = [], []
    real_stop = bench_load.stop

    def interrupted(process, url, log, timeout_s):
        spawned.append(process.poll() is None)
        raise KeyboardInterrupt

    def watched_stop(process):
        real_stop(process)
        exit_codes.append(process.poll())

    monkeypatch.setattr(bench_load, "wait_ready", interrupted)
    monkeypatch.setattr(bench_load, "stop", watched_stop)
    with pytest.raises(KeyboardInterrupt):
        bench_load.main([*tiny_app, "--no-write"])
    assert spawned == [True] and exit_codes and exit_codes[0] is not None  # it ran, and had exited when main gave up


def test_only_the_apps_own_message_counts_as_a_refusal():
    bad_audio = bench_load.REQUESTS["bad_audio"]
    typed = "Could not decode 'not_audio.wav' as audio (format not recognised). The file may be corrupt or not audio."
    assert bench_load.judge_refusal(bad_audio, typed) == "refused"
    generic = "The upstream Gradio app has raised an exception but has not enabled verbose error reporting."
    assert bench_load.judge_refusal(bad_audio, generic) == "error"
    leaked = "Could not decode 'not_audio.wav' as audio: /tmp/gradio/3f2a/not_audio.wav: Invalid data found"
    assert bench_load.judge_refusal(bad_audio, leaked) == "error"  # a server path in the message is a fault
