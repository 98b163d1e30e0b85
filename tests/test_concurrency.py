"""Sessions share one engine: what one session does (tuning prompts) must never change another session's results.

Driven through gradio_client against a launched server, as two browser users would: Tune and Classify are separate
events that the server runs at the same time.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import soundfile as sf
import torch
from gradio_client import Client, handle_file

from app.ui import build_demo
from engine.prompt_tuning import PromptedClassifier
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config

CLASSES = "dog, rain, car, bird, water, music, engine, speech"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_clap_dir) -> AudioScribe:
    root = tmp_path_factory.mktemp("concurrency")
    config = tiny_app_config(root, tiny_clap_dir, None, captions=2000)
    t = config.tuning
    # Long enough that several classifications happen during one run; dropout on, as AFPT tunes (the tiny CLAP has
    # dropout 0.1, so a tower left in train mode would change every score).
    t.prompt_len, t.epochs, t.min_texts_per_class, t.max_texts_per_class, t.train_dropout = 4, 400, 4, 12, True
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture(scope="module")
def server(service):
    demo = build_demo(service)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(path, noise_clip(12.0, 48_000, seed=3), 48_000)
    return str(path)


def scores(result) -> dict[str, float]:
    """{class: zero-shot score} from /classify's outputs (the comparison table holds every class's score)."""
    *_, comparison = result
    return {row[0]: row[2] for row in comparison["data"]}


def test_tuning_in_one_session_never_changes_another_sessions_scores(service, server, wav):
    alice, bob = Client(server, verbose=False), Client(server, verbose=False)
    args = (handle_file(wav), CLASSES, "This is a sound of {}.", False, 0.5)
    try:
        idle = scores(alice.predict(*args, api_name="/classify"))
        prompts = service.tune_prompts([c.strip() for c in CLASSES.split(",")][:3])  # tuned before Bob's run
        job = bob.submit(CLASSES, False, api_name="/tune_prompts")
        during, built_during = [], None
        while not job.done():
            result = scores(alice.predict(*args, api_name="/classify"))
            if built_during is None:  # a tuned classifier first built (and cached) while Bob's run is going
                service._classifiers.clear()
                built_during = service._prompted_classifier(prompts)
            if not job.done():  # the whole classification happened while Bob's tuning ran
                during.append(result)
            if len(during) >= 6:
                bob.predict(api_name="/stop_tuning")
                break
        deadline = time.monotonic() + 120
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        alice.close()
        bob.close()
    assert len(during) >= 3, "tuning finished before any classification could overlap it"
    for result in during:
        assert result.keys() == idle.keys()
        np.testing.assert_allclose(list(result.values()), list(idle.values()), rtol=0, atol=1e-6)
    after = PromptedClassifier(service.clap, prompts)
    torch.testing.assert_close(built_during.coarse, after.coarse, rtol=0, atol=1e-6)
    torch.testing.assert_close(built_during.fine, after.fine, rtol=0, atol=1e-6)
