"""engine.metrics: BLEU, ROUGE-L, CIDEr-D, vocab against hand-computed and published values; normalisation; the
METEOR/SPICE availability logic (the Java programs themselves are not installed here)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from engine import metrics
from engine.metrics import (MetricInputError, bleu, cider_d, evaluate_captions, lcs_length, normalize_caption,
                            rouge_l, score_captions)

OFFLINE = ("bleu", "rouge_l", "cider_d", "vocab")


def toks(captions: list[str]) -> list[list[str]]:
    return [caption.split() for caption in captions]


@pytest.fixture(autouse=True)
def no_jars(monkeypatch):
    monkeypatch.delenv(metrics.JARS_ENV, raising=False)


# --------------------------------------------------------------------------------------------------------------------
# published values


# Source: Labbeti/aac-metrics README "Usage" and tests/test_doc_examples.py (asserted there with atol=1e-4):
# evaluate(...) gives bleu_1 = 0.4278; cider_d on the PTB-tokenised sentences gives 0.9614, per item [1.3641, 0.5587].
README_CANDIDATES = ["a man is speaking", "rain falls"]
README_REFERENCES = [
    ["a man speaks.", "someone speaks.", "a man is speaking while a bird is chirping in the background"],
    ["rain is falling hard on a surface"]]


def test_aac_metrics_readme_example():
    result = score_captions(README_CANDIDATES, README_REFERENCES, OFFLINE)
    assert result.scores["bleu_1"] == pytest.approx(0.4278, abs=1e-4)
    assert result.scores["cider_d"] == pytest.approx(0.9614, abs=1e-4)
    assert result.per_item["cider_d"] == pytest.approx([1.3641, 0.5587], abs=1e-4)
    # BLEU-1 by hand: 5 of 6 unigrams match; closest reference lengths 3 and 7 against candidate lengths 4 and 2
    assert result.scores["bleu_1"] == pytest.approx(5 / 6 * math.exp(1 - 10 / 6))
    assert result.scores["vocab"] == 6.0


# --------------------------------------------------------------------------------------------------------------------
# BLEU


def test_identical_caption_scores_one():
    scores = evaluate_captions(["a dog barks loudly", "rain falls on a roof"],
                               [["a dog barks loudly"], ["rain falls on a roof"]], OFFLINE)
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert scores[name] == pytest.approx(1.0, abs=1e-9), name
    assert scores["cider_d"] == pytest.approx(10.0)


def test_bleu_worked_example_clipping_and_corpus_brevity_penalty():
    candidates = toks(["the the the cat", "a dog barks"])
    references = [toks(["the cat is on the mat", "there is a cat on the mat here"]), toks(["a dog barks"])]
    # item 1 (length 4, closest reference length 6): 'the' x3 is clipped to 2 (its most in one reference), 'cat' 1;
    #   bigrams 'the the' x2 (0), 'the cat' (1); no trigram or 4-gram matches.
    # item 2 (length 3, reference 3): everything matches: 3/3, 2/2, 1/1, 0/0.
    matches = np.array([3 + 3, 1 + 2, 0 + 1, 0 + 0], dtype=float)
    totals = np.array([4 + 3, 3 + 2, 2 + 1, 1 + 0], dtype=float)
    cand_len, ref_len = 4 + 3, 6 + 3
    penalty = np.exp(1 - ref_len / cand_len)  # corpus-level, candidate shorter than references
    precisions = (matches + 1e-15) / (totals + 1e-9)  # coco's guards; they make BLEU-4 tiny instead of 0
    expected = np.cumprod(precisions) ** (1 / np.arange(1, 5)) * penalty
    # rel 1e-9: coco also guards the length ratio, (c + 1e-15) / (r + 1e-9), which the exact penalty above omits
    assert bleu(candidates, references) == pytest.approx(expected.tolist(), rel=1e-9)
    assert expected[0] == pytest.approx(6 / 7 * np.exp(-2 / 7))
    assert 0 < expected[3] < 1e-3


def test_bleu_references_are_clipped_by_max_not_sum_and_closest_length_wins():
    # 'dog' appears once in each reference: the clip is max(1, 1) = 1, not 2
    assert bleu(toks(["dog dog"]), [toks(["dog", "dog"])])[0] == pytest.approx(0.5 * 1, rel=1e-9)
    # candidate length 3; references of lengths 1 and 4: closest is 4 -> penalty exp(1 - 4/3)
    score = bleu(toks(["a b c"]), [toks(["a", "a b c d"])])[0]
    assert score == pytest.approx(math.exp(1 - 4 / 3), rel=1e-9)
    # a tie (lengths 2 and 4 around 3) takes the shorter one: no penalty
    assert bleu(toks(["a b c"]), [toks(["a b c d", "a b"])])[0] == pytest.approx(1.0, rel=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# ROUGE-L


def test_lcs_hand_examples():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # textbook example: 'bcba'
    assert lcs_length("a dog barks at a cat".split(), "the dog loudly barks at the cat".split()) == 4
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_example_and_multi_reference_maxima():
    beta2 = 1.2 ** 2
    cand = "a dog barks at a cat".split()
    p, r = 4 / 6, 4 / 7  # LCS 'dog barks at cat' = 4 with a 6-word candidate and a 7-word reference
    one = rouge_l([cand], [toks(["the dog loudly barks at the cat"])])[0]
    assert one == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))
    # coco takes max precision and max recall over references separately, then the F-score:
    # second reference 'a cat' has LCS 2 -> precision 2/6, recall 2/2
    two = rouge_l([cand], [toks(["the dog loudly barks at the cat", "a cat"])])[0]
    p_max, r_max = 4 / 6, 1.0
    assert two == pytest.approx((1 + beta2) * p_max * r_max / (r_max + beta2 * p_max))
    f_second = (1 + beta2) * (2 / 6) * 1.0 / (1.0 + beta2 * 2 / 6)
    assert two > max(one, f_second)  # not the best single-reference F-score


# --------------------------------------------------------------------------------------------------------------------
# CIDEr-D


CIDER_CANDIDATES = ["dog barks", "cat meows", "cat cat purrs"]
CIDER_REFERENCES = [["dog barks", "a dog"], ["cat meows loudly"], ["cat purrs", "a cat purrs"]]


def _hand_cider_d() -> np.ndarray:
    """CIDEr-D of the corpus above written out with dense tf vectors over a hand-listed vocabulary."""
    log3 = np.log(3.0)  # 3 items
    #         dog barks  a  cat meows loudly purrs
    df1 = np.array([1, 1, 2, 2, 1, 1, 1])  # 'a' in items 1 and 3, 'cat' in items 2 and 3
    #     dog_barks a_dog cat_meows meows_loudly cat_purrs a_cat cat_cat
    df2 = np.array([1, 1, 1, 1, 1, 1, 0])  # 'cat cat' is in no reference: df 0 counts as 1
    #     cat_meows_loudly a_cat_purrs cat_cat_purrs
    df3 = np.array([1, 1, 0])
    idf = [log3 - np.log(np.maximum(1, df)) for df in (df1, df2, df3)]

    def sentence(u, b, t):
        return [np.array(u, float) * idf[0], np.array(b, float) * idf[1], np.array(t, float) * idf[2]]

    items = [  # (candidate, its bigram count), [(reference, its bigram count), ...]
        ((sentence([1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0]), 1),
         [(sentence([1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0]), 1),
          (sentence([1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], [0, 0, 0]), 1)]),
        ((sentence([0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0]), 1),
         [(sentence([0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0], [1, 0, 0]), 2)]),
        ((sentence([0, 0, 0, 2, 0, 0, 1], [0, 0, 0, 0, 1, 0, 1], [0, 0, 1]), 2),
         [(sentence([0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0], [0, 0, 0]), 1),
          (sentence([0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 0], [0, 1, 0]), 2)]),
    ]
    scores = []
    for (cand, cand_len), refs in items:
        total = np.zeros(4)  # n = 1..4; there is no 4-gram anywhere, so the 4th similarity stays 0
        for ref, ref_len in refs:
            for k in range(3):
                norms = np.linalg.norm(cand[k]) * np.linalg.norm(ref[k])
                dot = np.sum(np.minimum(cand[k], ref[k]) * ref[k])  # clipped by the reference's tf-idf
                total[k] += (dot / norms if norms else 0.0) * np.exp(-(cand_len - ref_len) ** 2 / (2 * 6.0 ** 2))
        scores.append(10 * total.mean() / len(refs))
    return np.array(scores)


def test_cider_d_three_item_corpus_by_hand():
    expected = _hand_cider_d()
    got = cider_d(toks(CIDER_CANDIDATES), [toks(refs) for refs in CIDER_REFERENCES])
    assert got == pytest.approx(expected.tolist(), rel=1e-12)
    # item 1 once more in closed form: against 'dog barks' cosines 1 (unigrams) and 1 (bigrams); against 'a dog'
    # the unigram cosine is L^2 / (sqrt(2) L * sqrt(L^2 + M^2)) with L = log 3 (df 1) and M = log 3/2 ('a', df 2)
    big, small = math.log(3), math.log(1.5)
    cosine = big / (math.sqrt(2) * math.hypot(big, small))
    assert got[0] == pytest.approx(10 * ((1 + cosine) + (1 + 0)) / 4 / 2, rel=1e-12)
    assert evaluate_captions(CIDER_CANDIDATES, CIDER_REFERENCES, ["cider_d"])["cider_d"] == pytest.approx(
        expected.mean())


def test_cider_d_multi_reference_average():
    base = cider_d(toks(CIDER_CANDIDATES), [toks(refs) for refs in CIDER_REFERENCES])
    doubled = cider_d(toks(CIDER_CANDIDATES), [toks(refs + refs) for refs in CIDER_REFERENCES])
    assert doubled == pytest.approx(base)  # per-reference mean, and document frequencies count items not references
    extra = [refs + ["thunder rumbles far away"] for refs in CIDER_REFERENCES]
    assert cider_d(toks(CIDER_CANDIDATES), [toks(refs) for refs in extra])[1] < base[1]


def test_cider_d_needs_two_candidates():
    with pytest.raises(ValueError, match="at least 2 candidates"):
        evaluate_captions(["a dog barks"], [["a dog barks"]])
    scores = evaluate_captions(["a dog barks"], [["a dog barks"]], ["bleu", "rouge_l", "vocab"])
    assert scores["rouge_l"] == 1.0 and "cider_d" not in scores


# --------------------------------------------------------------------------------------------------------------------
# inputs and normalisation


def test_empty_candidate_scores_zero_without_error():
    result = score_captions(["", "?!", "a dog barks"], [["a dog"], ["rain"], ["a dog barks"]], OFFLINE)
    assert result.per_item["rouge_l"][:2] == [0.0, 0.0]
    assert result.per_item["cider_d"][:2] == [0.0, 0.0]
    assert all(math.isfinite(v) for v in result.scores.values())
    assert result.scores["vocab"] == 3.0


def test_normalisation_of_case_punctuation_and_unicode():
    assert normalize_caption("A Dog barks, LOUDLY!") == ["a", "dog", "barks", "loudly"]
    assert normalize_caption("It\u2019s a dog's bark, isn't it?") == ["it", "'s", "a", "dog", "'s", "bark", "is",
                                                                    "n't", "it"]
    assert normalize_caption("A high-pitched \u201cbeep\u201d \u2014 3.5 kHz... (loud) - dogs' barking") == [
        "a", "high-pitched", "beep", "3.5", "khz", "loud", "dogs", "barking"]
    assert normalize_caption("Caf\u00e9  na\u00efve\tO'Clock\n") == ["caf\u00e9", "na\u00efve", "o'clock"]
    assert normalize_caption("\uff21 dog") == ["a", "dog"]  # full-width letters fold (NFKC)
    assert normalize_caption("...") == []
    # punctuation and case do not change the scores
    assert evaluate_captions(["A DOG barks!", "Rain."], [["a dog barks"], ["rain"]], ["bleu", "rouge_l"]) == \
        evaluate_captions(["a dog barks", "rain"], [["a dog barks"], ["rain"]], ["bleu", "rouge_l"])


def test_input_errors():
    with pytest.raises(MetricInputError, match="2 candidates but 1 reference lists"):
        evaluate_captions(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="have no reference"):
        evaluate_captions(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_captions(["a", "b"], [["a"], ["b"]], ["bleu", "cider"])
    with pytest.raises(ValueError, match="no candidates"):
        evaluate_captions([], [])


# --------------------------------------------------------------------------------------------------------------------
# METEOR / SPICE / SPIDEr availability


def test_java_metrics_unavailable_without_jar_folder():
    result = score_captions(README_CANDIDATES, README_REFERENCES)
    assert {"meteor", "spice", "spider"}.isdisjoint(result.scores)  # never reported as 0
    assert set(result.unavailable) == {"meteor", "spice", "spider"}
    assert metrics.JARS_ENV in result.unavailable["meteor"]
    assert result.unavailable["spider"].startswith("needs SPICE")
    assert {"bleu_4", "rouge_l", "cider_d", "vocab"} <= set(result.scores)


def test_java_metrics_unavailable_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.JARS_ENV, str(tmp_path))
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    with pytest.raises(metrics.MetricUnavailable, match="meteor-1.5.jar not found"):
        metrics.find_jar(metrics.METEOR_JAR)
    (tmp_path / "spice").mkdir()
    (tmp_path / "spice" / metrics.SPICE_JAR).write_bytes(b"")
    with pytest.raises(metrics.MetricUnavailable, match="lib is missing"):
        metrics.find_jar(metrics.SPICE_JAR)
    (tmp_path / "spice" / "lib").mkdir()
    assert metrics.find_jar(metrics.SPICE_JAR) == tmp_path / "spice" / metrics.SPICE_JAR
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    result = score_captions(README_CANDIDATES, README_REFERENCES, ["meteor", "spice"])
    assert result.unavailable == {"meteor": "Java is not installed (no 'java' on PATH)",
                                  "spice": "Java is not installed (no 'java' on PATH)"}
    assert result.scores == {}


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_java_failure_message_becomes_the_reason(tmp_path, monkeypatch):
    """A jar that Java cannot run (here: not a jar at all) is reported with Java's own message."""
    monkeypatch.setenv(metrics.JARS_ENV, str(tmp_path))
    (tmp_path / metrics.METEOR_JAR).write_bytes(b"not a jar")
    (tmp_path / metrics.SPICE_JAR).write_bytes(b"not a jar")
    (tmp_path / "lib").mkdir()
    result = score_captions(README_CANDIDATES, README_REFERENCES, ["spider", "meteor"])
    assert result.unavailable["meteor"].startswith("METEOR stopped: ")
    assert result.unavailable["spice"].startswith("SPICE failed (exit 1): ")
    for reason in result.unavailable.values():
        assert "jarfile" in reason.lower()
    assert set(result.scores) == {"cider_d"}


def test_classification_metrics_by_hand():
    from engine.metrics import accuracy, average_precision, macro_map

    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(scores, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    # ranking by score: items 0 (pos), 2 (neg), 1 (pos): precisions at positives 1/1 and 2/3
    assert average_precision(np.array([0.9, 0.2, 0.6]), np.array([1, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    labels = np.array([[1, 0], [1, 1], [0, 0]])
    # class 1: ranking 1 (pos, 0.8), 2, 0 -> AP 1.0; class 0: as above
    assert macro_map(scores.T[[0, 1]].T, labels) == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
