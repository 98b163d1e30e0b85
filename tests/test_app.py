"""The Gradio app, driven through gradio_client against a launched server (as a remote user would)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.ui import build_demo
from engine.config import AppConfig, load_config
from engine.service import AudioScribe
from tests.helpers import noise_clip, small_caption_set


@pytest.fixture(scope="module", params=["tiny", "bundle"])
def service(request, tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    """The app on tiny random models, and on the shipped demo bundle (the default profile)."""
    root = tmp_path_factory.mktemp("app")
    if request.param == "bundle":
        config = load_config("offline", [f"cache_dir={root / 'cache'}"], environ={})
    else:
        captions = root / "captions.txt"
        captions.write_text("\n".join(small_caption_set(500)) + "\n")
        config = AppConfig(cache_dir=str(root / "cache"))
        config.clap.model, config.clap.device = str(tiny_clap_dir), "cpu"
        config.datastore.sources = [str(captions)]
        config.llm.model = str(tiny_llama_dir)
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


def test_every_event_has_an_api_name(service):
    demo = build_demo(service)
    names = {dep.get("api_name") for dep in demo.config["dependencies"]}
    assert {"describe", "retrieve", "classify"} <= names and None not in names


def test_untrained_weights_are_labelled(service):
    demo = build_demo(service)
    shown = " ".join(str(c["props"].get("value")) for c in demo.config["components"] if c.get("type") == "html")
    if not service.clap.is_untrained:  # the demo bundle: no warning, but what the model knows
        assert "untrained-banner" not in shown and "What this model knows" in shown
        assert "38 sound classes" in shown and "siren" in shown and "it knows nothing else" in shown
        return
    assert "untrained-banner" in shown
    assert f"The CLAP <code>{service.clap.name}</code> has random weights" in shown
    assert f"the LLM <code>{service.captioner.llm.name}</code> has random weights" in shown
    assert "the DRCap mapping network is untrained" in shown


def test_retrieve_returns_the_engines_captions(client, service, wav):
    info, table, windows = client.predict(handle_file(wav), 3, api_name="/retrieve")
    assert "2 channels averaged to mono" in info and f"resampled 44100 Hz -> {service.clap.sample_rate} Hz" in info
    expected = service.retrieve(service.load(wav), 3).clip
    assert [row[1] for row in table["data"]] == expected.captions[0]
    np.testing.assert_allclose([row[2] for row in table["data"]], expected.scores[0], atol=1e-4)
    assert [row[0] for row in table["data"]] == [1, 2, 3]
    assert len(windows["data"]) == 1 and windows["data"][0][1:3] == [0.0, 4.0]


def test_describe_shows_a_generated_caption_next_to_retrieved_ones(client, service, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, noise_clip(14.0, 48_000), 48_000)
    info, generated, table, windows = client.predict(handle_file(str(path)), 3, api_name="/describe")
    expected = service.caption(service.load(str(path)))
    assert generated == expected.clip.caption and generated
    assert [row[1] for row in table["data"]] == service.retrieve(service.load(str(path)), 3).clip.captions[0]
    assert "Captioning time: clap" in info and "generation" in info
    assert windows["headers"][3] == "generated caption"
    assert [row[3] for row in windows["data"]] == [r.caption for r in expected.per_window]
    assert [row[1:3] for row in windows["data"]] == [[0.0, 10.0], [4.0, 14.0]]


def test_classify_returns_scores_for_the_typed_classes(client, service, wav):
    info, label, per_window, comparison = client.predict(handle_file(wav), "dog\nrain, siren",
                                                         "This is a sound of {}.", False, 0.5, api_name="/classify")
    scores = {c["label"]: c["confidence"] for c in label["confidences"]}
    expected = service.classify(service.load(wav), ["dog", "rain", "siren"]).as_dict()
    assert scores.keys() == expected.keys()
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)
    assert label["label"] == max(expected, key=expected.get)
    assert "3 classes, single-label" in info
    zero_shot = {row[0].split(" · ")[0]: row[2] for row in comparison["data"] if row[1] == "zero-shot"}
    assert zero_shot == pytest.approx(expected, abs=1e-6)  # no tuned prompts in this session yet: zero-shot only
    best_first = sorted(expected, key=expected.get, reverse=True)
    assert per_window["headers"] == ["start_s", "end_s", *best_first]


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
    info, label, per_window, _ = client.predict(handle_file(wav), "\n".join(names), "This is a sound of {}.", False,
                                                0.5, api_name="/classify")
    assert "500 classes" in info and "the 10 best classes" in info
    assert len(per_window["headers"]) == 2 + 10 and len(label["confidences"]) == 10


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
        report = alice.predict("dog, rain, siren", False, api_name="/tune_prompts")  # the state output stays hidden
        assert "Tuned 3 classes" in report and "this browser session only" in report and "siren" in report
        args = (handle_file(wav), "dog, rain, siren", "This is a sound of {}.", False, 0.5)
        *_, alice_view = alice.predict(*args, api_name="/classify")
        *_, bob_view = bob.predict(*args, api_name="/classify")
        methods = {row[1] for row in alice_view["data"]}
        assert methods == {"zero-shot", "tuned prompts"}
        tuned = [row[2] for row in alice_view["data"] if row[1] == "tuned prompts"]
        assert len(tuned) == 3 and sum(tuned) == pytest.approx(1.0, abs=1e-4)
        assert {row[1] for row in bob_view["data"]} == {"zero-shot"}  # another user never sees Alice's prompts
        *_, other_classes = alice.predict(handle_file(wav), "dog, cat", "This is a sound of {}.", False, 0.5,
                                          api_name="/classify")
        assert {row[1] for row in other_classes["data"]} == {"zero-shot"}
        alice.close()
        bob.close()
    finally:
        demo.close()
