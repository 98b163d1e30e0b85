"""The Gradio app, driven through gradio_client against a launched server (as a remote user would)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.charts import chart_values
from app.ui import build_demo
from engine.config import load_config
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config


@pytest.fixture(scope="module", params=["tiny", "bundle"])
def service(request, tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    """The app on tiny random models, and on the shipped demo bundle (the default profile)."""
    root = tmp_path_factory.mktemp("app")
    if request.param == "bundle":
        config = load_config("offline", [f"cache_dir={root / 'cache'}"], environ={})
    else:
        config = tiny_app_config(root, tiny_clap_dir, tiny_llama_dir)
    config.caption.num_beams, config.caption.max_new_tokens = 1, 8
    t = config.tuning
    t.prompt_len, t.epochs, t.min_texts_per_class, t.max_texts_per_class = 4, 2, 4, 12
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture(scope="module")
def client(service):
    demo = build_demo(service)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    client = Client(demo.local_url, verbose=False)
    yield client
    client.close()
    demo.close()


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("audio") / "two_tones.wav"
    sf.write(path, np.stack([noise_clip(4.0, 44_100), noise_clip(4.0, 44_100, seed=1)], axis=1), 44_100)
    return str(path)


def test_every_event_has_an_api_name_and_every_endpoint_says_what_it_does(service, client):
    demo = build_demo(service)
    names = {dep.get("api_name") for dep in demo.config["dependencies"]}
    assert {"describe", "retrieve", "classify", "tune_prompts", "stop_tuning", "load_prompts"} <= names
    assert None not in names
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/describe", "/retrieve", "/classify", "/tune_prompts", "/stop_tuning", "/load_prompts",
            "/check_caption_audio", "/check_classify_audio"} <= endpoints.keys()
    for name, endpoint in endpoints.items():
        assert endpoint["description"], f"{name} has no description"
        labels = [r["label"] for r in endpoint["returns"]] + [p["label"] for p in endpoint["parameters"]]
        assert all(label and not label.startswith("value_") for label in labels), f"{name}: {labels}"
    assert not {"/tune_started", "/tune_finished", "/stop_requested"} & endpoints.keys()  # UI-only steps


def test_heavy_events_share_one_limited_queue_and_light_ones_never_wait(service):
    from app.tabs.common import HEAVY_LIMIT

    fns = {fn.api_name: fn for fn in build_demo(service).fns.values()}
    for name in ("describe", "retrieve", "classify", "tune_prompts"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("heavy", HEAVY_LIMIT)
    for name in ("check_caption_audio", "check_classify_audio", "stop_tuning", "load_prompts"):
        assert fns[name].concurrency_limit is None and fns[name].concurrency_id != "heavy"
    for name in ("tune_started", "tune_finished", "stop_requested"):
        assert not fns[name].queue


def test_errors_and_progress_show_on_one_line_so_earlier_results_stay(service):
    demo = build_demo(service)
    ids = {c["id"]: c["props"].get("elem_id") for c in demo.config["components"]}
    shown_on = {dep["api_name"]: [ids[i] for i in dep["show_progress_on"] or []]
                for dep in demo.config["dependencies"]}
    assert shown_on["describe"] == shown_on["retrieve"] == ["caption-info"]
    assert shown_on["classify"] == ["classify-info"]
    assert shown_on["tune_prompts"] == shown_on["load_prompts"] == ["tune-progress"]


def test_the_page_has_stable_element_ids(service):
    demo = build_demo(service)
    ids = {c["props"].get("elem_id") for c in demo.config["components"]}
    assert {"caption-audio", "describe-button", "generated-caption", "retrieved-captions", "support-captions",
            "caption-timeline", "timeline-plot", "classify-button", "class-names", "tune-button", "stop-button",
            "tune-progress", "comparison-plot", "tune-report", "prompts-download", "prompts-upload"} <= ids


def test_tune_progress_sits_under_the_tune_button_and_is_never_empty(service):
    demo = build_demo(service)
    by_id = {c["props"].get("elem_id"): c for c in demo.config["components"]}
    progress = by_id["tune-progress"]["props"]
    assert progress["value"] and progress["min_height"] >= 60
    assert by_id["stop-button"]["props"]["interactive"] is False  # enabled only while a run is going


def test_header_and_tabs_speak_to_a_browser_user(service):
    from pathlib import Path

    demo = build_demo(service)
    shown = " ".join(str(c["props"].get("value")) for c in demo.config["components"]
                     if c.get("type") in ("html", "markdown"))
    assert str(Path.home()) + "/" not in shown and "--profile" not in shown and "--set" not in shown
    if not service.clap.is_untrained:  # the demo bundle's small LLM captions in well under a second on a CPU
        assert "No CUDA" not in shown
    tab_labels = [c["props"].get("label") for c in demo.config["components"] if c.get("type") == "tabitem"]
    assert tab_labels[:2] == ["Caption", "Classify"] and "Configuration" in tab_labels
    assert "Settings" not in tab_labels  # Gradio's footer has a "Settings" of its own


def test_untrained_weights_are_labelled(service):
    from app.ui import display_name

    demo = build_demo(service)
    shown = " ".join(str(c["props"].get("value")) for c in demo.config["components"] if c.get("type") == "html")
    if not service.clap.is_untrained:  # the demo bundle: no warning, but what the model knows
        assert "untrained-banner" not in shown and "What this model knows" in shown
        assert "38 sound classes" in shown and "siren" in shown and "it knows nothing else" in shown
        return
    assert "untrained-banner" in shown
    assert f"The CLAP <code>{display_name(service.clap.name)}</code> has random weights" in shown
    assert f"the LLM <code>{display_name(service.captioner.llm.name)}</code> has random weights" in shown
    assert "the DRCap mapping network is untrained" in shown and str(service.clap.name) not in shown


def test_retrieve_returns_the_engines_captions(client, service, wav):
    info, table, windows, plot = client.predict(handle_file(wav), 3, api_name="/retrieve")
    assert "2 channels averaged to mono" in info and f"resampled 44100 Hz -> {service.clap.sample_rate} Hz" in info
    expected = service.retrieve(service.load(wav), 3)
    assert [row[1] for row in table["data"]] == expected.clip.captions[0]
    np.testing.assert_allclose([row[2] for row in table["data"]], expected.clip.scores[0], atol=1e-4)
    assert [row[0] for row in table["data"]] == [1, 2, 3]
    assert windows["headers"] == ["window", "caption", "top labels"]
    assert [row[:2] for row in windows["data"]] == [["0–4 s", expected.per_window.captions[0][0]]]
    assert chart_values(plot) and plot["type"] == "altair"


def test_describe_shows_a_generated_caption_next_to_retrieved_ones(client, service, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, noise_clip(14.0, 48_000), 48_000)
    # Two arguments only: the generation settings and timeline labels have defaults (older clients keep working).
    info, generated, table, support, windows, plot = client.predict(handle_file(str(path)), 3, api_name="/describe")
    expected = service.caption(service.load(str(path)))
    assert generated == expected.clip.caption and generated
    assert [row[1] for row in table["data"]] == service.retrieve(service.load(str(path)), 3).clip.captions[0]
    assert "Captioning time: clap" in info and "generation" in info
    assert "Windows overlap" in info and "moved back to end at the clip's end (4–14 s)" in info
    assert windows["headers"] == ["window", "caption", "top labels"]
    assert [row[1] for row in windows["data"]] == [r.caption for r in expected.per_window]
    assert [row[0] for row in windows["data"]] == ["0–10 s", "4–14 s"]
    assert [row[0] for row in support["data"]] == [c for c, _ in expected.clip.support_top]
    assert {p["window"] for p in chart_values(plot)} == {"0–10 s", "4–14 s"}


def test_describe_takes_generation_settings_per_request(client, service, wav):
    import dataclasses

    before = dataclasses.replace(service.config.caption)
    info, generated, *_ = client.predict(handle_file(wav), 3, 2, 6, "dog\nrain", api_name="/describe")
    settings = dataclasses.replace(before, num_beams=2, max_new_tokens=6)
    assert generated == service.caption(service.load(wav), settings=settings).clip.caption
    assert "2 beams, ≤ 6 tokens" in info and service.config.caption == before


def test_classify_returns_scores_for_the_typed_classes(client, service, wav):
    info, label, per_window, plot, table = client.predict(handle_file(wav), "dog\nrain, siren",
                                                          "This is a sound of {}.", False, 0.5, api_name="/classify")
    scores = {c["label"]: c["confidence"] for c in label["confidences"]}
    expected = service.classify(service.load(wav), ["dog", "rain", "siren"]).as_dict()
    assert scores.keys() == expected.keys()
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)
    assert label["label"] == max(expected, key=expected.get)
    assert "3 classes, single-label" in info
    zero_shot = {row[0]: row[2] for row in table["data"] if row[1] == "zero-shot"}
    # The table shows scores rounded to 4 decimals; no tuned prompts in this session yet: zero-shot only.
    assert zero_shot == pytest.approx(expected, abs=5e-5)
    assert [v["class"] for v in chart_values(plot)] == ["dog", "rain", "siren"]
    assert per_window["headers"] == ["window", "top classes"] and len(per_window["data"]) == 1


def test_multi_label_with_no_class_above_the_threshold_shows_none(client, wav):
    info, label, *_ = client.predict(handle_file(wav), "dog, rain, siren", "This is a sound of {}.", True, 0.99,
                                     api_name="/classify")
    assert label["label"] == "none above threshold (0.99)" and "**none above threshold**" in info
    assert len(label["confidences"]) == 3


def test_an_upload_is_checked_when_it_arrives(client, tmp_path, wav):
    fake = tmp_path / "picture.wav"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    message = client.predict(handle_file(str(fake)), api_name="/check_caption_audio")
    assert message.startswith("❌") and "'picture.wav'" in message and str(tmp_path) not in message
    assert client.predict(handle_file(wav), api_name="/check_classify_audio").startswith("✅ **two_tones.wav**")


def test_bad_input_shows_a_clear_message(client, tmp_path, wav):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    with pytest.raises(AppError, match="Could not decode 'notes.wav'"):
        client.predict(handle_file(str(not_audio)), 3, api_name="/retrieve")
    with pytest.raises(AppError, match="Type at least one class name"):
        client.predict(handle_file(wav), " , ", "This is a sound of {}.", False, 0.5,
                       api_name="/classify")


def test_bad_template_and_empty_clip_messages(client, tmp_path):
    silent = tmp_path / "empty.wav"
    sf.write(silent, np.zeros((0,), dtype=np.float32), 16_000)
    with pytest.raises(AppError, match="no samples|no audio|empty"):
        client.predict(handle_file(str(silent)), 3, api_name="/retrieve")
    ok = tmp_path / "ok.wav"
    sf.write(ok, noise_clip(1.0, 16_000), 16_000)
    with pytest.raises(AppError, match="exactly one"):
        client.predict(handle_file(str(ok)), "dog", "no slot here", False, 0.5, api_name="/classify")


def test_errors_name_the_upload_not_its_server_path_and_templates_fail_early(client, tmp_path, wav):
    truncated = tmp_path / "truncated_header.wav"
    truncated.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")  # a header cut off after 16 bytes
    with pytest.raises(AppError) as caught:
        client.predict(handle_file(str(truncated)), 3, api_name="/retrieve")
    message = str(caught.value)
    assert "'truncated_header.wav'" in message and "/" not in message.replace("/retrieve", "")
    with pytest.raises(AppError, match=r"Template 'This is \{\} \{' has a brace without its pair"):
        client.predict(handle_file(wav), "dog", "This is {} {", False, 0.5, api_name="/classify")


def test_trained_weights_get_no_banner(service):
    import copy

    trained = copy.copy(service.clap)
    trained.is_untrained = False
    demo = build_demo(AudioScribe(service.config, trained, service.datastore, captioner=None))
    assert not [c for c in demo.config["components"] if "untrained-banner" in str(c["props"].get("value", ""))]


def test_many_classes_keep_the_window_table_readable(client, wav):
    names = [f"class {i}" for i in range(500)]
    info, label, per_window, plot, table = client.predict(handle_file(wav), "\n".join(names),
                                                          "This is a sound of {}.", False, 0.5, api_name="/classify")
    assert "500 classes" in info and "The plot shows the 12 best of the 500 classes" in info
    assert per_window["headers"] == ["window", "top classes"] and len(per_window["data"][0][1].split(" · ")) == 3
    assert len(label["confidences"]) == 10 and len(chart_values(plot)) == 12 and len(table["data"]) == 500


def test_app_script_help_and_bad_profile():
    import subprocess
    import sys

    from tests.helpers import PROJECT_ROOT

    shown = subprocess.run([sys.executable, "app.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and "--profile" in shown.stdout and "--set" in shown.stdout
    bad = subprocess.run([sys.executable, "app.py", "--profile", "nope"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("or give a path to a .toml file")
    assert "error: Unknown profile 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_tuned_prompts_stay_in_their_session(service, wav):
    demo = build_demo(service)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        status, report, files = alice.predict("dog, rain, siren", False, api_name="/tune_prompts")  # state hidden
        assert "Tuned 3 classes" in status and "this browser session only" in status
        assert report.startswith("**Tuning report**") and "| siren |" in report
        assert [f.rsplit("/", 1)[-1] for f in files] == ["prompts.safetensors", "prompts.json"]
        args = (handle_file(wav), "dog, rain, siren", "This is a sound of {}.", False, 0.5)
        *_, alice_plot, alice_view = alice.predict(*args, api_name="/classify")
        *_, bob_view = bob.predict(*args, api_name="/classify")
        assert {row[1] for row in alice_view["data"]} == {"zero-shot", "tuned prompts"}
        tuned = [row[2] for row in alice_view["data"] if row[1] == "tuned prompts"]
        assert len(tuned) == 3 and sum(tuned) == pytest.approx(1.0, abs=1e-4)
        assert {v["method"] for v in chart_values(alice_plot)} == {"zero-shot", "tuned prompts"}
        assert {row[1] for row in bob_view["data"]} == {"zero-shot"}  # another user never sees Alice's prompts
        *_, other_classes = alice.predict(handle_file(wav), "dog, cat", "This is a sound of {}.", False, 0.5,
                                          api_name="/classify")
        assert {row[1] for row in other_classes["data"]} == {"zero-shot"}
        # Bob uploads the file Alice downloaded: now his session compares too.
        status, report, class_text = bob.predict(handle_file(files[0]), api_name="/load_prompts")
        assert status.startswith("Loaded prompts for 3 classes") and class_text == "dog\nrain\nsiren"
        *_, bob_view = bob.predict(*args, api_name="/classify")
        assert {row[1] for row in bob_view["data"]} == {"zero-shot", "tuned prompts"}
        alice.close()
        bob.close()
    finally:
        demo.close()


def test_stop_when_idle_says_so_and_unknown_classes_are_warned_about(client):
    assert client.predict(api_name="/stop_tuning") == "Nothing to stop: no tuning run is going in this session."
    status, report, _ = client.predict("siren, zzqx, blorft", False, api_name="/tune_prompts")  # both datastores
    assert "mentions **zzqx**" in status and "mentions **blorft**" in status and "mentions **siren**" not in status


def test_uploaded_prompts_from_another_file_are_refused(client, tmp_path):
    fake = tmp_path / "prompts.safetensors"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(AppError, match="not a safetensors file of tuned prompts"):
        client.predict(handle_file(str(fake)), api_name="/load_prompts")
