"""The shipped demo bundle (assets/demo, the default profile) on held-out clips of its corpus (tests/data/heldout:
test-split clips chosen evenly, not by how well the bundle does on them)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.datastore import CaptionDatastore
from engine.metrics import cider_d, normalize_caption
from engine.prompt_tuning import PromptedClassifier
from engine.service import AudioScribe
from tests.helpers import PROJECT_ROOT
from trainers.demo_eval import caption

HELDOUT = PROJECT_ROOT / "tests" / "data" / "heldout"
BUNDLE = PROJECT_ROOT / "assets" / "demo"


@pytest.fixture(scope="module")
def scribe(tmp_path_factory) -> AudioScribe:
    config = load_config(None, [f"cache_dir={tmp_path_factory.mktemp('cache')}"], environ={})
    return AudioScribe.from_config(config, show_progress=False)


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return [json.loads(line) for line in (HELDOUT / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def embedded(scribe, heldout) -> torch.Tensor:
    return scribe.clap.embed_audio([scribe.load(HELDOUT / r["path"]) for r in heldout])


def test_default_profile_is_the_trained_bundle(scribe):
    assert scribe.config.profile == "offline" and scribe.config.clap.backend == "demo"
    assert not scribe.clap.is_untrained and len(scribe.clap.known_classes) == 38
    assert scribe.captioner is not None and scribe.captioner.trained and not scribe.captioner.is_untrained
    bundle_bytes = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert bundle_bytes <= 30 * 1024 * 1024


def test_heldout_clips_are_classified_correctly(scribe, heldout, embedded):
    names = list(scribe.clap.known_classes)
    single = [i for i, r in enumerate(heldout) if len(r["labels"]) == 1]
    result = [scribe.classify(scribe.load(HELDOUT / heldout[i]["path"]), names).predicted()[0] for i in single]
    truth = [heldout[i]["labels"][0] for i in single]
    correct = sum(p == t for p, t in zip(result, truth))
    assert correct >= len(single) - 1, list(zip(result, truth))


def test_heldout_captions_name_what_sounds(scribe, heldout, embedded):
    """The generated caption of a single-source clip uses a word its references use for that source."""
    single = [i for i, r in enumerate(heldout) if len(r["labels"]) == 1]
    captions = caption(scribe, embedded[single], scribe.datastore, projection=True, retrieval=True)
    hits = []
    for text, i in zip(captions, single):
        reference_words = {w for ref in heldout[i]["captions_a"] for w in normalize_caption(ref)} - STOP_WORDS
        hits.append(bool(set(normalize_caption(text)) & reference_words))
    assert sum(hits) >= len(single) - 2, list(zip(captions, [heldout[i]["labels"] for i in single]))


def test_prompt_tuning_does_not_lower_accuracy(scribe, heldout, embedded):
    single = [i for i, r in enumerate(heldout) if len(r["labels"]) == 1]
    names = sorted({heldout[i]["labels"][0] for i in single})
    tuning = replace(scribe.config.tuning, epochs=3, max_texts_per_class=48, seed=0)
    prompts = AudioScribe(replace(scribe.config, tuning=tuning), scribe.clap, scribe.datastore).tune_prompts(names)
    truth = np.array([names.index(heldout[i]["labels"][0]) for i in single])
    zero_shot = scribe.classifier(names).scores(embedded[single]).argmax(1).numpy()
    tuned_classifier = PromptedClassifier(scribe.clap, prompts)
    tuned = np.array([np.argmax(tuned_classifier.classify(scribe.load(HELDOUT / heldout[i]["path"]))
                                .scores["combined"]) for i in single])
    assert (tuned == truth).mean() >= (zero_shot == truth).mean()


def test_style_b_swap_moves_captions_toward_style_b(scribe, heldout, embedded):
    style_b = CaptionDatastore.load(BUNDLE / "stores" / "style_b", scribe.clap)
    as_a = caption(scribe, embedded, scribe.datastore, projection=True, retrieval=True)
    as_b = caption(scribe, embedded, style_b, projection=True, retrieval=True)
    refs_b = [[normalize_caption(c) for c in r["captions_b"]] for r in heldout]
    assert np.mean([len(c.split()) for c in as_b]) > np.mean([len(c.split()) for c in as_a])
    assert np.mean(cider_d([normalize_caption(c) for c in as_b], refs_b)) > \
        np.mean(cider_d([normalize_caption(c) for c in as_a], refs_b))


STOP_WORDS = {"a", "an", "the", "is", "are", "of", "in", "on", "and", "while", "with", "by", "then", "followed",
              "someone", "something", "sound", "sounds", "loudly", "quietly", "far", "away", "nearby", "distance",
              "close", "up", "from", "at", "as", "it", "being", "can", "be", "heard", "softly", "loud", "quiet"}
