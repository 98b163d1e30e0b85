"""Zero-shot classification: class-name parsing, template ensembles, scores against hand computations."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from engine.audio import Audio
from engine.clap.base import ClapBackend, l2_normalize
from engine.classifier import (
    DEFAULT_TEMPLATES,
    build_zero_shot_classifier,
    check_templates,
    classify_audio,
    parse_class_names,
)
from engine.config import AudioConfig
from engine.errors import ClassifierInputError
from tests.helpers import noise_clip


class LookupClap(ClapBackend):
    """A CLAP whose text vectors come from a table, so scores can be computed by hand."""

    name, sample_rate, embedding_dim, max_window_s, fingerprint = "lookup", 16_000, 2, 10.0, "lookup"
    device = torch.device("cpu")

    def __init__(self, table: dict[str, list[float]], logit_scale: float) -> None:
        super().__init__(AudioConfig(), batch_size=4, text_batch_size=2)
        self.table, self.logit_scale = table, logit_scale

    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        return l2_normalize(torch.tensor([self.table[t] for t in texts]))

    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        # Window "direction" from its mean level: deterministic and easy to reason about.
        return l2_normalize(torch.tensor([[1.0, float(w.mean())] for w in windows]))


@pytest.fixture
def lookup_clap() -> LookupClap:
    return LookupClap({"a dog": [1.0, 0.0], "a cat": [0.0, 1.0], "the dog": [1.0, 1.0], "the cat": [0.0, 1.0]},
                      logit_scale=10.0)


def test_parse_class_names_lines_commas_blanks_and_repeats():
    assert parse_class_names("dog\ncat, rain\n\n  Dog \n siren  wailing ,") == ["dog", "cat", "rain", "siren wailing"]
    assert parse_class_names("") == []


def test_templates_must_hold_exactly_one_slot():
    assert check_templates(["This is a sound of {}.", "  "]) == ["This is a sound of {}."]
    for bad in (["no slot"], ["{} and {}"], ["{name} barks"], []):
        with pytest.raises(ClassifierInputError):
            check_templates(bad)


def test_single_label_scores_equal_a_hand_computation(lookup_clap):
    classifier = build_zero_shot_classifier(lookup_clap, ["dog", "cat"], ["a {}", "the {}"])
    # dog: mean of (1,0) and (1,1)/sqrt2, renormalised; cat: (0,1) twice.
    dog = np.array([1 + 1 / np.sqrt(2), 1 / np.sqrt(2)])
    dog /= np.linalg.norm(dog)
    np.testing.assert_allclose(classifier.weights.numpy(), [dog, [0.0, 1.0]], atol=1e-6)
    audio = np.array([0.6, 0.8])  # unit norm
    logits = 10.0 * np.array([audio @ dog, audio @ np.array([0.0, 1.0])])
    expected = np.exp(logits) / np.exp(logits).sum()
    got = classifier.scores(torch.from_numpy(audio[None].astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    multi = classifier.scores(torch.from_numpy(audio[None].astype(np.float32)), multi_label=True, bias=-7.0)[0].numpy()
    np.testing.assert_allclose(multi, 1 / (1 + np.exp(-(logits - 7.0))), atol=1e-6)


def test_classify_audio_pools_windows_and_thresholds(lookup_clap):
    classifier = build_zero_shot_classifier(lookup_clap, ["dog", "cat"], ["a {}"])
    # 25 s at 16 kHz: windows [0,10) level 0, [10,20) level 1, [15,25) level 1 (shifted last window).
    waveform = np.concatenate([np.zeros(160_000), np.ones(240_000)]).astype(np.float32)
    audio = Audio(waveform=waveform, sample_rate=16_000, original_sample_rate=16_000, original_channels=1,
                  source="<array>")
    result = classify_audio(lookup_clap, classifier, audio, multi_label=True, threshold=0.9)
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]
    # window 0 points at (1,0) = dog; windows 1-2 at (1,1)/sqrt2, halfway between dog and cat
    np.testing.assert_allclose(result.window_scores[0], 1 / (1 + np.exp(-10.0 * np.array([1.0, 0.0]))), atol=1e-6)
    pooled = np.array([1.0, 0.0]) + 2 * np.array([1.0, 1.0]) / np.sqrt(2)
    pooled /= np.linalg.norm(pooled)
    np.testing.assert_allclose(result.cosine, pooled, atol=1e-6)
    np.testing.assert_allclose(result.scores, 1 / (1 + np.exp(-10.0 * pooled)), atol=1e-6)
    assert result.predicted() == ["dog", "cat"]  # both sigmoids are above 0.9 here, best first
    assert set(result.as_dict()) == {"dog", "cat"}


def test_tiny_clap_classifier_matches_its_own_embeddings(tiny_clap):
    names = ["dog barking", "rain", "siren"]
    templates = ["This is a sound of {}.", "A recording of {}."]
    classifier = build_zero_shot_classifier(tiny_clap, names, templates)
    by_hand = torch.stack([l2_normalize(tiny_clap.embed_text([t.format(n) for t in templates]).mean(0))
                           for n in names])
    torch.testing.assert_close(classifier.weights, by_hand)
    audio = tiny_clap.embed_audio([noise_clip(3.0)])
    expected = (tiny_clap.logit_scale * audio @ by_hand.T).softmax(-1)
    torch.testing.assert_close(classifier.scores(audio), expected)
    assert classifier.scores(audio).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_long_audio_gets_per_window_scores(tiny_clap):
    classifier = build_zero_shot_classifier(tiny_clap, ["dog", "cat", "rain"])
    audio = Audio(waveform=noise_clip(35.0), sample_rate=48_000, original_sample_rate=48_000, original_channels=1,
                  source="<array>")
    result = classify_audio(tiny_clap, classifier, audio)
    assert result.window_scores.shape == (4, 3)
    windows = tiny_clap.embed_windows([audio])[0]
    np.testing.assert_allclose(result.window_scores, classifier.scores(windows.embeddings).numpy(), atol=1e-6)
    np.testing.assert_allclose(result.window_scores.sum(axis=1), 1.0, atol=1e-5)
    assert result.predicted() == [classifier.class_names[int(np.argmax(result.scores))]]


def test_500_class_names_work_and_the_limit_is_enforced(tiny_clap):
    names = [f"sound number {i}" for i in range(500)]
    classifier = build_zero_shot_classifier(tiny_clap, names, DEFAULT_TEMPLATES)
    assert classifier.weights.shape == (500, 32)
    with pytest.raises(ClassifierInputError, match="501 class names given; the limit is 500"):
        build_zero_shot_classifier(tiny_clap, names + ["one more"], max_classes=500)


def test_empty_and_repeated_class_names_are_refused(tiny_clap):
    with pytest.raises(ClassifierInputError, match="at least one class name"):
        build_zero_shot_classifier(tiny_clap, ["", "  "])
    with pytest.raises(ClassifierInputError, match="distinct"):
        build_zero_shot_classifier(tiny_clap, ["Dog", "dog"])


def test_prompt_projection_mixes_support_captions(tiny_clap):
    from engine.classifier import project_prompts

    support = tiny_clap.embed_text(["a siren wails", "rain falls on a roof", "a dog barks"])
    prompts = tiny_clap.embed_text(["a siren wails", "emergency vehicle wail"])
    sharp = project_prompts(prompts, support, temperature=1e-4)
    torch.testing.assert_close(sharp[0], support[0], atol=1e-5, rtol=0)  # a support caption projects onto itself
    broad = project_prompts(prompts, support, temperature=100.0)
    torch.testing.assert_close(broad[1], support.mean(0), atol=1e-2, rtol=0)  # high τ: the support's mean
    plain = build_zero_shot_classifier(tiny_clap, ["siren", "rain"])
    projected = build_zero_shot_classifier(tiny_clap, ["siren", "rain"], support=support, support_temperature=0.05)
    expected = project_prompts(tiny_clap.embed_text(["This is a sound of siren.", "This is a sound of rain."]),
                               support, 0.05)
    torch.testing.assert_close(projected.weights, torch.nn.functional.normalize(expected, dim=1), atol=1e-5, rtol=0)
    assert not torch.allclose(projected.weights, plain.weights)
