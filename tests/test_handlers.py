"""The app's handlers called directly, without a server: a service on tiny random models, plain Python values in,
the values the page shows out."""
from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from app.charts import TUNED, ZERO_SHOT, chart_values, comparison_chart
from app.handlers import (
    NONE_ABOVE,
    SUPPORT_COLUMNS,
    TIMELINE_COLUMNS,
    WINDOW_CLASS_COLUMNS,
    Handlers,
    window_note,
)
from app.tabs.common import headline_label
from app.tuning_report import selection_counts
from app.ui import display_name
from engine.audio import Window
from engine.prompt_tuning import PROMPTS_FILE, TunedPrompts
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config

CLASSES = "dog\nrain\nsiren"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    root = tmp_path_factory.mktemp("handlers")
    config = tiny_app_config(root, tiny_clap_dir, tiny_llama_dir)
    t = config.tuning
    t.prompt_len, t.epochs, t.min_texts_per_class, t.max_texts_per_class = 4, 2, 4, 12
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture(scope="module")
def handlers(service) -> Handlers:
    return Handlers(service)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, np.concatenate([noise_clip(7.0, 16_000), noise_clip(7.0, 16_000, seed=4)]), 16_000)
    return str(path)


@pytest.fixture(scope="module")
def tuned(handlers) -> TunedPrompts:
    _, _, prompts, _ = handlers.classify.tune(CLASSES, False, None, request=session("tuner"))
    return prompts


def session(name: str) -> SimpleNamespace:
    """What a handler reads from gr.Request."""
    return SimpleNamespace(session_hash=name)


def windows(*spans: tuple[float, float]) -> list[Window]:
    return [Window(i, int(a * 16_000), int(b * 16_000), a, b) for i, (a, b) in enumerate(spans)]


# --- windows and the timeline ---------------------------------------------------------------------------------------

def test_overlapping_windows_are_explained():
    note = window_note(windows((0, 10), (4, 14)), hop_s=10)
    assert "moved back to end at the clip's end (4–14 s)" in note and "6 s are in both" in note
    assert window_note(windows((0, 10), (10, 20)), hop_s=10) == ""
    assert window_note(windows((0, 10)), hop_s=10) == ""
    assert "starts every 5 s" in window_note(windows((0, 10), (5, 15), (10, 20)), hop_s=5)


def test_describe_gives_a_timeline_support_captions_and_an_overlap_note(handlers, service, long_wav):
    info, generated, retrieved, support, table, plot = handlers.caption.describe(long_wav, 3, 1, 8, CLASSES)
    expected = service.caption(service.load(long_wav))
    assert generated == expected.clip.caption
    assert "Windows overlap" in info and "(4–14 s)" in info and "1 beams, ≤ 8 tokens" in info
    assert list(table.columns) == TIMELINE_COLUMNS
    assert table["window"].tolist() == ["0–10 s", "4–14 s"]
    assert table["caption"].tolist() == [r.caption for r in expected.per_window]
    assert all(len(cell.split(" · ")) == 3 for cell in table["top labels"])  # the 3 best of dog, rain, siren
    assert list(support.columns) == SUPPORT_COLUMNS
    assert support["support caption"].tolist() == [c for c, _ in expected.clip.support_top] and len(support) == 5
    points = chart_values(plot)
    assert {p["window"] for p in points} == {"0–10 s", "4–14 s"} and {p["class"] for p in points} == {"dog", "rain",
                                                                                                    "siren"}
    assert len(retrieved) == 3


def test_generation_settings_apply_to_one_request_only(handlers, service, long_wav):
    before = dataclasses.replace(service.config.caption)
    info, generated, *_ = handlers.caption.describe(long_wav, 3, 2, 5, CLASSES)
    assert "2 beams, ≤ 5 tokens" in info
    settings = dataclasses.replace(before, num_beams=2, max_new_tokens=5)
    assert generated == service.caption(service.load(long_wav), settings=settings).clip.caption
    assert service.config.caption == before  # the shared config is never changed
    with pytest.raises(gr.Error, match="Beams must be 1-8"):
        handlers.caption.describe(long_wav, 3, 50, 5, CLASSES)


def test_retrieve_timeline_shows_the_best_retrieved_caption_per_window(handlers, service, long_wav):
    info, clip, table, _ = handlers.caption.retrieve(long_wav, 2, CLASSES)
    found = service.retrieve(service.load(long_wav), 2)
    assert table["caption"].tolist() == [c[0] for c in found.per_window.captions]
    assert clip["caption"].tolist() == found.clip.captions[0] and "best retrieved caption" in info


# --- uploads and errors ---------------------------------------------------------------------------------------------

def test_an_upload_is_checked_at_once(handlers, tmp_path, long_wav):
    fake = tmp_path / "picture.wav"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))  # a PNG renamed .wav
    message = handlers.caption.check_audio(str(fake))
    assert message.startswith("❌") and "'picture.wav'" in message and str(tmp_path) not in message
    assert handlers.classify.check_audio(long_wav).startswith("✅ **long.wav**: 14.00 s")
    assert handlers.caption.check_audio(None) == ""


def test_a_failing_request_raises_for_the_page_to_show(handlers, tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("not audio")
    with pytest.raises(gr.Error, match="Could not decode 'notes.wav'"):
        handlers.caption.describe(str(fake), 3, 1, 8, CLASSES)
    with pytest.raises(gr.Error, match="Upload or record"):
        handlers.classify.classify(None, CLASSES, "This is a sound of {}.", False, 0.5)


# --- classification -------------------------------------------------------------------------------------------------

def test_multi_label_with_nothing_above_the_threshold_predicts_nothing(handlers, long_wav):
    info, label, per_window, *_ = handlers.classify.classify(long_wav, CLASSES, "This is a sound of {}.", True, 0.99)
    assert label["label"] == f"{NONE_ABOVE} (0.99)" and f"**{NONE_ABOVE}**" in info
    assert [c["label"] for c in label["confidences"]] and all(c["confidence"] < 0.99 for c in label["confidences"])
    _, single, *_ = handlers.classify.classify(long_wav, CLASSES, "This is a sound of {}.", False, 0.5)
    assert single["label"] == max(single["confidences"], key=lambda c: c["confidence"])["label"]
    assert list(per_window.columns) == WINDOW_CLASS_COLUMNS and per_window["window"].tolist() == ["0–10 s", "4–14 s"]


def test_the_label_component_keeps_the_headline_it_is_given():
    value = {"label": "none above threshold (0.5)", "confidences": [{"label": "siren", "confidence": 0.02}]}
    shown = headline_label().postprocess(value)
    assert shown.label == "none above threshold (0.5)" and shown.confidences[0].label == "siren"
    assert headline_label().postprocess({"dog": 0.7, "rain": 0.3}).label == "dog"  # plain scores: the top class


def test_zero_shot_and_tuned_bars_are_grouped_in_class_order(handlers, tuned, long_wav):
    names = "siren, dog, rain"  # not alphabetical: the plot keeps this order
    *_, plot, table = handlers.classify.classify(long_wav, names, "This is a sound of {}.", False, 0.5, None)
    assert set(table["method"]) == {ZERO_SHOT}
    reordered = TunedPrompts(**{**tuned.__dict__, "class_names": ["siren", "dog", "rain"]})
    *_, plot, table = handlers.classify.classify(long_wav, names, "This is a sound of {}.", False, 0.5, reordered)
    spec = json.loads(plot.plot)
    assert spec["encoding"]["x"]["sort"] == ["siren", "dog", "rain"]
    assert spec["encoding"]["xOffset"]["field"] == "method"  # side by side, not stacked
    assert spec["encoding"]["color"]["scale"]["domain"] == [ZERO_SHOT, TUNED]  # the legend names both
    values = chart_values(plot)
    assert [(v["class"], v["method"]) for v in values] == [(n, m) for m in (ZERO_SHOT, TUNED)
                                                           for n in ("siren", "dog", "rain")]
    assert sum(v["score"] for v in values if v["method"] == TUNED) == pytest.approx(1.0, abs=1e-3)


def test_many_classes_plot_the_best_only(handlers, long_wav):
    names = "\n".join(f"class {i}" for i in range(40))
    info, label, per_window, plot, table = handlers.classify.classify(long_wav, names, "This is a sound of {}.",
                                                                      False, 0.5)
    assert len(table) == 40 and len(label["confidences"]) == 10 and len(chart_values(plot)) == 12
    assert "The plot shows the 12 best of the 40 classes" in info
    order = json.loads(plot.plot)["encoding"]["x"]["sort"]
    assert order == sorted(order, key=lambda n: int(n.split()[1]))  # class order, not best-first


def test_comparison_chart_without_tuned_scores_has_one_series():
    plot = comparison_chart([("b", ZERO_SHOT, 0.6), ("a", ZERO_SHOT, 0.4)], ["b", "a"])
    assert json.loads(plot.plot)["encoding"]["color"]["scale"]["domain"] == [ZERO_SHOT]


# --- prompt tuning --------------------------------------------------------------------------------------------------

def test_tuning_reports_a_table_and_warns_about_classes_no_caption_mentions(handlers, service):
    status, report, prompts, files = handlers.classify.tune("dog\nzzqx\nblorft", False, None, request=session("a"))
    assert "Tuned 3 classes" in status and "dog**" not in status
    assert "No caption in the datastore mentions **zzqx**" in status
    assert "No caption in the datastore mentions **blorft**" in status
    lines = report.splitlines()
    assert lines[0] == "**Tuning report**: the training captions of each of the 3 classes"
    assert lines[2].startswith("| class | captions mentioning it |") and len(lines) == 4 + 3
    assert lines[5].startswith("| zzqx | 0 | 0 | ")
    loaded = TunedPrompts.load(files[0], service.clap)
    assert files[0].endswith(PROMPTS_FILE) and loaded.class_names == ["dog", "zzqx", "blorft"]


def test_tuning_shows_the_plan_at_once_and_the_time_left_at_every_step(handlers):
    lines = []

    class Progress:  # what gr.Progress receives
        def __call__(self, fraction, desc=None):
            lines.append((fraction, desc))

    status, _, prompts, _ = handlers.classify.tune(CLASSES, False, None, request=session("clock"),
                                                   progress=Progress())
    steps = prompts.report["steps_planned"]
    assert lines[0] == (0.0, "Choosing training captions for 3 classes…")  # shown as soon as Tune is pressed
    assert lines[1][0] == 0.0 and lines[1][1].startswith(f"Tuning 3 classes on {prompts.report['texts']} captions: "
                                                         f"{steps} steps")
    updates = [desc for fraction, desc in lines if fraction > 0]
    assert len(updates) == prompts.report["steps"] == steps
    assert all(re.fullmatch(rf"Step {k}/{steps} \(epoch \d+/\d+\), loss [\d.]+: \d+ s elapsed, ≈ \d+ s left", desc)
               for k, desc in enumerate(updates, start=1))
    assert updates[-1].endswith("≈ 0 s left")
    assert re.search(r"Run time \d+ s \(estimated after the first step: \d+ s; preset `default`\)\.", status)


def test_the_preset_chosen_on_the_page_sets_the_run_and_the_server_settings_stay(handlers, service):
    server = dataclasses.asdict(service.config.tuning)
    status, _, quick, _ = handlers.classify.tune(CLASSES, False, None, None, "quick", request=session("quick"))
    assert (quick.config.preset, quick.config.prompt_len, quick.config.max_texts_per_class,
            quick.config.epochs, quick.config.patience) == ("quick", 8, 32, 6, 1)
    assert quick.coarse.shape[0] == 8 and "preset `quick`" in status
    # Captions chosen with the preset's cap (32 per class), not the server's (12 here).
    assert 12 < max(quick.report["texts_per_class"]) <= 32
    assert dataclasses.asdict(service.config.tuning) == server  # one user's choice never changes the server's
    # The server's own preset (or none) keeps its explicit settings (this fixture's prompt_len 4, 2 epochs).
    _, _, same, _ = handlers.classify.tune(CLASSES, False, None, None, server["preset"], request=session("same"))
    assert (same.config.prompt_len, same.config.epochs) == (4, 2)
    with pytest.raises(gr.Error, match="tuning.preset must be one of default, reference, quick, got 'fastest'"):
        handlers.classify.tune(CLASSES, False, None, None, "fastest", request=session("bad"))


def test_selection_counts_read_the_engines_report(service):
    selection = service.select_tuning_texts(["dog barking", "rain", "zzqx"])
    counts = selection_counts(selection.format_report(), ["dog barking", "rain", "zzqx"])
    assert [(c.name, c.found, c.matched, c.nearest, c.total) for c in counts] == [
        (r.name, r.available, r.matched, r.topped_up, r.total) for r in selection.report]
    assert selection_counts("not a table", ["dog"]) is None


def test_stop_is_an_outcome_that_keeps_the_previous_prompts(handlers, tuned):
    bob = session("bob")
    handlers.classify.tuning_requested(bob)  # pressed Tune: the run may still be queued
    assert handlers.classify.stop_tuning(bob) == "Stopping after the current step…"
    assert handlers.classify.stopping(bob)
    status, report, prompts, files = handlers.classify.tune(CLASSES, False, tuned, request=bob)
    assert status == "Stopped after 0 steps; the previous prompts are kept."
    assert report == prompts == files == gr.skip()  # the previous report, prompts and files stay as they are
    assert not handlers.classify.stopping(bob)


def test_stop_when_idle_says_so_and_does_not_stop_a_later_run(handlers):
    dave = session("dave")
    assert handlers.classify.stop_tuning(dave) == "Nothing to stop: no tuning run is going in this session."
    assert not handlers.classify.stopping(dave)
    status, _, prompts, _ = handlers.classify.tune(CLASSES, False, None, request=dave)
    assert status.startswith("Tuned 3 classes") and prompts.report["steps"] > 0


def test_stopping_mid_run_counts_the_steps_done(handlers, service, monkeypatch):
    erin = session("erin")
    original = service.tune_prompts

    def stop_after_two_steps(*args, progress, should_stop, **kwargs):
        def report(fraction, message):
            progress(fraction, message)
            if fraction > 0 and report.steps == 1:
                handlers.classify.stop_tuning(erin)
            report.steps += fraction > 0
        report.steps = 0
        return original(*args, progress=report, should_stop=should_stop, **kwargs)

    monkeypatch.setattr(service, "tune_prompts", stop_after_two_steps)
    status, *_ = handlers.classify.tune(CLASSES, False, None, request=erin)
    assert status == "Stopped after 2 steps; this session has no tuned prompts, so Classify shows zero-shot scores only."


# --- tuned prompts as files -----------------------------------------------------------------------------------------

def test_downloaded_prompts_upload_again(handlers, tuned, tmp_path):
    files = handlers.classify.export(tuned)
    status, report, prompts, class_text = handlers.classify.load_prompts(files[0])
    assert prompts.content_key() == tuned.content_key() and class_text == CLASSES
    assert status.startswith("Loaded prompts for 3 classes from prompts.safetensors") and "| dog |" in report
    assert json.loads(open(files[1]).read())["class_names"] == ["dog", "rain", "siren"]


def test_uploaded_prompts_of_another_clap_or_another_file_are_refused(handlers, tuned, tmp_path):
    foreign = TunedPrompts(**{**tuned.__dict__, "clap_fingerprint": "another", "clap_name": "other-clap"})
    path = foreign.save(tmp_path / "foreign") / PROMPTS_FILE
    with pytest.raises(gr.Error, match="tuned on CLAP 'other-clap'.*another model"):
        handlers.classify.load_prompts(str(path))
    picture = tmp_path / "prompts.safetensors"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(gr.Error, match="not a safetensors file of tuned prompts"):
        handlers.classify.load_prompts(str(picture))


# --- what the page shows about the server ---------------------------------------------------------------------------

def test_model_names_never_show_server_paths(tmp_path):
    assert display_name("laion/clap-htsat-unfused") == "laion/clap-htsat-unfused"
    assert display_name(str(tmp_path / "models" / "clap")) == "models/clap"
    assert display_name("~/.cache/audioscribe/tiny-clap") == "audioscribe/tiny-clap"
