"""One audio-tower pass per request: describe, retrieve, classify (zero-shot and tuned), annotation suggestions and
the domain comparison embed the clip once and share the result; the shared pass gives what separate passes gave."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch

from app.charts import TUNED, ZERO_SHOT
from app.handlers import Handlers
from app.tabs.adapt import AdaptHandlers
from engine.clap.drcap import DrcapClapBackend, build_tiny_drcap_clap
from engine.clap.msclap import MsClapBackend, build_tiny_msclap
from engine.service import AudioScribe
from tests.helpers import noise_clip, tiny_app_config

CLASSES = "dog\nrain\nsiren"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_clap_dir, tiny_llama_dir) -> AudioScribe:
    config = tiny_app_config(tmp_path_factory.mktemp("one-pass"), tiny_clap_dir, tiny_llama_dir, 200,
                             max_new_tokens=4)
    t = config.tuning
    t.prompt_len, t.epochs, t.min_texts_per_class, t.max_texts_per_class = 4, 1, 4, 8
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> str:
    """25 s at 16 kHz: three windows of the offline profile's 10-s window (several windows per pass)."""
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, noise_clip(25.0, 16_000, seed=3), 16_000)
    return str(path)


@pytest.fixture(scope="module")
def tuned(service):
    _, _, prompts, _ = Handlers(service).classify.tune(CLASSES, False, None, request=session("tuner"))
    return prompts


@contextlib.contextmanager
def audio_tower_calls(service: AudioScribe) -> Iterator[list[int]]:
    """Counts forward calls of the HF CLAP's audio tower (the HTSAT/encoder module itself, not our wrappers)."""
    calls = [0]
    handle = service.clap.model.audio_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def session(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(session_hash=name, username=None)


def test_every_request_runs_the_audio_tower_once(service, long_wav):
    handlers = Handlers(service)
    requests = {
        "describe": lambda: handlers.caption.describe(long_wav, 3, 1, 4, CLASSES),
        "retrieve": lambda: handlers.caption.retrieve(long_wav, 3, CLASSES),
        "classify": lambda: handlers.classify.classify(long_wav, CLASSES, "", False, 0.5),
    }
    for name, request in requests.items():
        with audio_tower_calls(service) as calls:
            request()
        # 3 windows fit one batch (clap.batch_size 16), so one pass is one forward call
        assert calls[0] == 1, f"{name} ran the audio tower {calls[0]} times"


def test_tuned_classify_and_suggestions_share_the_pass(service, long_wav, tuned):
    handlers = Handlers(service)
    with audio_tower_calls(service) as calls:
        *_, table = handlers.classify.classify(long_wav, CLASSES, "", False, 0.5, tuned)
    assert calls[0] == 1 and set(table["method"]) == {ZERO_SHOT, TUNED}
    audio = service.load(long_wav)
    for prompts in (None, tuned):
        with audio_tower_calls(service) as calls:
            suggestion, _ = service.suggest(audio, CLASSES.split(), tuned=prompts)
        assert calls[0] == 1 and suggestion.label_source == ("tuned" if prompts else "zero-shot")
    domain = service.build_domain("other", ["A violin plays", "Rain falls on a roof"])
    with audio_tower_calls(service) as calls:
        AdaptHandlers(service).compare(long_wav, domain)
    assert calls[0] == 1


def test_shared_pass_gives_the_results_of_separate_passes(service, long_wav, tuned):
    """What the request computes from one pass equals what each operation computes on its own."""
    audio = service.load(long_wav)
    embedded = service.embed(audio, frames=True)
    names = CLASSES.split()
    alone, shared = service.retrieve(audio, 3), service.retrieve(audio, 3, embedded=embedded)
    assert alone.clip.captions == shared.clip.captions and alone.per_window.captions == shared.per_window.captions
    np.testing.assert_array_equal(service.classify(audio, names).scores,
                                  service.classify(audio, names, embedded=embedded).scores)
    for key in ("coarse", "fine", "combined"):
        np.testing.assert_array_equal(service.classify_tuned(audio, tuned).scores[key],
                                      service.classify_tuned(audio, tuned, embedded).scores[key])
    assert service.caption(audio).clip.caption == service.caption(audio, embedded=embedded).clip.caption


def _check_one_pass_matches(clap, clips: list[np.ndarray]) -> None:
    """Window embeddings from the combined pass equal the plain pass's; frames equal embed_frames' per clip."""
    plain = clap.embed_windows(clips)
    combined = clap.embed_windows(clips, frames=True)
    for p, c, clip in zip(plain, combined, clips):
        assert p.frames is None and c.frames is not None and len(c.frames) == len(c.windows)
        torch.testing.assert_close(p.embeddings, c.embeddings, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.pooled, c.pooled, rtol=0, atol=1e-6)
        for frames in c.frames:
            assert frames.shape[1] == clap.embedding_dim
            torch.testing.assert_close(frames.norm(dim=1), torch.ones(len(frames)))


def test_combined_pass_matches_plain_pass_hf(tiny_clap):
    _check_one_pass_matches(tiny_clap, [noise_clip(3.0, tiny_clap.sample_rate), noise_clip(23.0, tiny_clap.sample_rate)])


def test_combined_pass_matches_plain_pass_drcap(tmp_path):
    checkpoint, tokenizer = build_tiny_drcap_clap(tmp_path / "drcap", seed=0)
    clap = DrcapClapBackend.from_checkpoint(checkpoint, tokenizer=str(tokenizer), device="cpu")
    clips = [noise_clip(2.0, clap.sample_rate), noise_clip(12.0, clap.sample_rate, seed=1)]
    _check_one_pass_matches(clap, clips)
    windows = [clips[0]]
    torch.testing.assert_close(clap._embed_window_and_frame_batch(windows)[1][0], clap.frame_embeddings(windows)[0])


def test_combined_pass_matches_plain_pass_msclap(tmp_path):
    checkpoint, tokenizer = build_tiny_msclap(tmp_path / "msclap", seed=0)
    clap = MsClapBackend.from_checkpoint(checkpoint, tokenizer=str(tokenizer), device="cpu")
    _check_one_pass_matches(clap, [noise_clip(1.5, clap.sample_rate), noise_clip(7.0, clap.sample_rate, seed=2)])
