"""Audio-captioning metrics, offline: BLEU-1..4, ROUGE-L, CIDEr-D and vocabulary size; METEOR, SPICE and SPIDEr when
Java and their jars are available.

The definitions follow coco-caption (``pycocoevalcap``: ``bleu_scorer.py``, ``rouge.py``, ``cider_scorer.py``,
``meteor.py``, ``spice.py``) as re-implemented by aac-metrics (``aac_metrics.functional``), the de-facto reference of
automated audio captioning (DCASE, DRCap). Every score is computed on the output of :func:`normalize_caption`, which
stands in for coco's Java PTB tokenizer (see :data:`NORMALISATION` for how it differs).

    scores = evaluate_captions(["a man is speaking", "rain falls"],
                               [["a man speaks.", "someone speaks."], ["rain is falling hard on a surface"]])

:func:`score_captions` returns the same corpus scores plus per-item scores and, for METEOR/SPICE/SPIDEr, the reason
a metric could not be computed (such a metric is left out of the scores, never reported as 0).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import AudioScribeError

log = logging.getLogger(__name__)

OFFLINE_METRICS = ("bleu", "rouge_l", "cider_d", "vocab")
JAVA_METRICS = ("meteor", "spice", "spider")
ALL_METRICS = OFFLINE_METRICS + JAVA_METRICS
DEFAULT_METRICS = ("bleu", "rouge_l", "cider_d", "meteor", "spice", "spider", "vocab")
JARS_ENV = "AUDIOSCRIBE_METRICS_JARS"
METEOR_JAR = "meteor-1.5.jar"
SPICE_JAR = "spice-1.0.jar"

NORMALISATION = (
    "audioscribe-ptb-approx-v1: NFKC, curly quotes to ASCII, lower-case; punctuation and symbols removed except a "
    "hyphen between letters/digits (high-pitched) and '.' or ',' between digits (3.5, 1,000); clitics split off as "
    "the PTB tokenizer does (it's -> it 's, don't -> do n't), other apostrophes kept inside a word and stripped at "
    "its ends; split on whitespace. Known differences from coco's Java PTBTokenizer + punctuation filter: PTB keeps "
    "symbol tokens (&, %, $, /, #) and abbreviation periods (mr., e.g.), which this drops, and splits "
    "gonna/cannot/wanna, which this leaves whole.")

_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'",
                              "\u201c": '"', "\u201d": '"', "\u2010": "-", "\u2011": "-"})
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9  # coco bleu_scorer.py's guards against 0/0, kept for identical values


class MetricInputError(AudioScribeError, ValueError):
    """Candidates and references cannot be scored as given (lengths differ, no references, too few items)."""


class MetricUnavailable(AudioScribeError, RuntimeError):
    """An external metric (METEOR, SPICE) cannot run here; the message is the reason."""


@dataclass
class CaptionEvaluation:
    """Corpus scores, per-item scores and the metrics that could not be computed (metric -> reason)."""

    scores: dict[str, float] = field(default_factory=dict)
    per_item: dict[str, list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    normalisation: str = NORMALISATION


# --------------------------------------------------------------------------------------------------------------------
# normalisation


def normalize_caption(text: str) -> list[str]:
    """Tokens of a caption as AAC evaluation sees them after PTB tokenisation and punctuation removal.

    Approximates coco-caption's ``PTBTokenizer`` (Stanford CoreNLP, ``-lowerCase``) followed by the removal of the
    tokens in its ``PUNCTUATIONS`` list, which aac-metrics' ``preprocess_mono_sents`` reproduces; see
    :data:`NORMALISATION` for the differences.
    """
    text = unicodedata.normalize("NFKC", text).translate(_FOLD).lower()
    return [token for word in _strip_punctuation(text).split() for token in _split_word(word)]


def _strip_punctuation(text: str) -> str:
    chars = list(text)
    for i, char in enumerate(chars):
        if char == "'" or not _is_punctuation(char):
            continue
        before, after = text[i - 1] if i else " ", text[i + 1] if i + 1 < len(text) else " "
        inner_hyphen = char == "-" and before.isalnum() and after.isalnum()
        inner_number = char in ".," and before.isdigit() and after.isdigit()
        if not (inner_hyphen or inner_number):
            chars[i] = " "
    return "".join(chars)


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"  # P*: punctuation (incl. '_'), S*: symbols


def _split_word(word: str) -> list[str]:
    word = word.strip("'")
    if word.endswith("n't") and len(word) > 3:
        return [word[:-3], "n't"]
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [word[:-len(clitic)], clitic]
    return [word] if word else []


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram (coco's ``precook``)."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _check_inputs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str) or any(isinstance(refs, str) for refs in references):
        raise MetricInputError("candidates must be a list of strings and references a list of lists of strings")
    if len(candidates) != len(references):
        raise MetricInputError(f"{len(candidates)} candidates but {len(references)} reference lists; "
                               "give one list of references per candidate")
    if not candidates:
        raise MetricInputError("nothing to evaluate: no candidates")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise MetricInputError(f"{len(empty)} candidates have no reference (first at index {empty[0]})")


# --------------------------------------------------------------------------------------------------------------------
# offline metrics (inputs: token lists)


def bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions, as coco-caption's ``BleuScorer`` with ``option='closest'``.

    For each candidate, k-gram counts are clipped by their maximum count in any one reference; the effective reference
    length is the reference length closest to the candidate's (the shorter one on a tie). Clipped matches, k-gram
    totals and lengths are summed over the corpus; BLEU-k = (prod_{j<=k} p_j)^(1/k) times the brevity penalty
    exp(1 - r/c) when c < r. Like coco, p_j = (matches + 1e-15) / (total + 1e-9), so a corpus with no k-gram match
    scores a tiny positive number, not 0.
    """
    matches, totals, cand_len, ref_len = [0] * n, [0] * n, 0, 0
    for cand, refs in zip(candidates, references):
        counts = _ngrams(cand, n)
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)  # element-wise max of the counts
        for gram, count in counts.items():
            matches[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            totals[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]
    return _bleu_from_counts(matches, totals, cand_len, ref_len)


def _bleu_from_counts(matches: list[int], totals: list[int], cand_len: int, ref_len: int) -> list[float]:
    ratio = (cand_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k, (match, total) in enumerate(zip(matches, totals), start=1):
        product *= (match + _BLEU_TINY) / (total + _BLEU_SMALL)
        scores.append(product ** (1 / k) * penalty)
    return scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a) * len(b)))."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            beta: float = 1.2) -> list[float]:
    """ROUGE-L of each tokenised candidate, as coco-caption's ``Rouge.calc_score`` (aac-metrics ``rouge_l``).

    With l_i the LCS length against reference i: P = max_i l_i / |cand|, R = max_i l_i / |ref_i| (maxima taken
    separately), F = (1 + beta^2) P R / (R + beta^2 P), 0 when P or R is 0. An empty candidate scores 0 (as
    aac-metrics; coco divides by zero), as does recall against an empty reference. The corpus score is the mean.
    """
    return [_rouge_l_item(cand, refs, beta) for cand, refs in zip(candidates, references)]


def _rouge_l_item(cand: Sequence[str], refs: Sequence[Sequence[str]], beta: float) -> float:
    if not cand:
        return 0.0
    lcs = [lcs_length(ref, cand) for ref in refs]
    precision = max(lcs) / len(cand)
    recall = max(common / len(ref) if ref else 0.0 for common, ref in zip(lcs, refs))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each tokenised candidate, as coco-caption's ``CiderScorer`` (aac-metrics ``cider_d``).

    Document frequencies df(g) count the items whose references (any of them) contain the n-gram g; with N items,
    a sentence's vector for each k = 1..n holds tf(g) * (log N - log max(1, df(g))). Against each reference, the
    k-gram similarity is sum_g min(v_cand(g), v_ref(g)) * v_ref(g) / (|v_cand| |v_ref|) (0 when a norm is 0) times
    exp(-delta^2 / (2 sigma^2)), delta being the difference of the two sentences' *bigram* counts (coco's "length";
    it equals the word-length difference unless one sentence is empty). The item score is 10 times the
    mean over k of the sum over references divided by the number of references; the corpus score is the mean.
    The IDF comes from the evaluated corpus itself, so fewer than 2 items raise :class:`MetricInputError` (as
    aac-metrics: log N would be 0).
    """
    if len(candidates) < 2:
        raise MetricInputError(f"CIDEr-D needs at least 2 candidates, found {len(candidates)}: its IDF is computed "
                               "from the references of the evaluated corpus (leave out cider_d to score fewer)")
    cooked_refs = [[_ngrams(ref, n) for ref in refs] for refs in references]
    df = Counter(gram for refs in cooked_refs for gram in set().union(*refs))
    log_n = math.log(len(candidates))
    scores = []
    for cand, refs in zip(candidates, cooked_refs):
        cand_vec = _tfidf(_ngrams(cand, n), df, log_n, n)
        total = [0.0] * n
        for ref in refs:
            for k, value in enumerate(_cider_similarity(cand_vec, _tfidf(ref, df, log_n, n), sigma)):
                total[k] += value
        scores.append(10.0 * sum(total) / n / len(refs))
    return scores


@dataclass
class _TfIdf:
    vectors: list[dict[tuple[str, ...], float]]
    norms: list[float]
    length: int  # number of bigrams, coco's "length"


def _tfidf(counts: Counter, df: Counter, log_n: float, n: int) -> _TfIdf:
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vectors[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return _TfIdf(vectors, norms, length)


def _cider_similarity(cand: _TfIdf, ref: _TfIdf, sigma: float) -> list[float]:
    penalty = math.exp(-((cand.length - ref.length) ** 2) / (2 * sigma ** 2))
    values = []
    for cand_vec, ref_vec, cand_norm, ref_norm in zip(cand.vectors, ref.vectors, cand.norms, ref.norms):
        dot = sum(min(v, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, v in cand_vec.items())
        if cand_norm != 0 and ref_norm != 0:
            dot /= cand_norm * ref_norm
        values.append(dot * penalty)
    return values


def vocab_size(candidates: Iterable[Sequence[str]]) -> int:
    """Number of distinct tokens over all tokenised candidates (aac-metrics ``vocab``'s ``vocab.cands``)."""
    return len({token for cand in candidates for token in cand})


# --------------------------------------------------------------------------------------------------------------------
# METEOR and SPICE: Java programs run as coco-caption runs them


def find_jar(name: str) -> Path:
    """The jar ``name`` in ``$AUDIOSCRIBE_METRICS_JARS`` (or its ``meteor/``, ``spice/`` sub-folder) with Java on PATH.

    Raises :class:`MetricUnavailable` saying what is missing. SPICE also needs its ``lib/`` folder next to the jar.
    """
    if shutil.which("java") is None:
        raise MetricUnavailable("Java is not installed (no 'java' on PATH)")
    folder = os.environ.get(JARS_ENV)
    if not folder:
        raise MetricUnavailable(f"${JARS_ENV} is not set (a folder holding {METEOR_JAR} and {SPICE_JAR} + lib/)")
    sub = name.split("-")[0]
    for path in (Path(folder) / name, Path(folder) / sub / name):
        if path.is_file():
            if name == SPICE_JAR and not (path.parent / "lib").is_dir():
                raise MetricUnavailable(f"{path.parent / 'lib'} is missing (SPICE's Stanford CoreNLP jars)")
            return path
    raise MetricUnavailable(f"{name} not found in {folder} (nor in {Path(folder) / sub})")


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]], jar: Path) -> tuple[float, list[float]]:
    """Corpus and per-item METEOR 1.5 through ``-stdio``, as coco-caption's ``Meteor.compute_score``.

    Each item is sent as ``SCORE ||| ref_1 ||| ... ||| candidate`` and answered with its statistics; one
    ``EVAL ||| stats_1 ||| ...`` line then returns each item's score and the corpus score (not their mean).
    """
    command = ["java", "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    process = subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        stats = [_ask(process, " ||| ".join(["SCORE", *refs, cand.replace("|||", "")]))
                 for cand, refs in zip(candidates, references)]
        _send(process, " ||| ".join(["EVAL", *stats]))
        items = [float(_read(process)) for _ in stats]
        return float(_read(process)), items
    finally:
        _stop(process)


def _send(process: subprocess.Popen, line: str) -> None:
    try:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    except BrokenPipeError:
        raise MetricUnavailable(f"METEOR stopped: {_stop(process)}") from None


def _read(process: subprocess.Popen) -> str:
    answer = process.stdout.readline()
    if not answer:
        raise MetricUnavailable(f"METEOR stopped: {_stop(process)}")
    return answer.strip()


def _stop(process: subprocess.Popen) -> str:
    """Kill the process, close its pipes (ignoring a broken stdin) and return the end of what it wrote to stderr."""
    process.kill()
    with contextlib.suppress(OSError):
        process.stdin.close()
    message = _tail(process.stderr.read()) if not process.stderr.closed else ""
    process.stdout.close()
    process.stderr.close()
    process.wait()
    return message


def _ask(process: subprocess.Popen, line: str) -> str:
    _send(process, line)
    return _read(process)


def spice(candidates: Sequence[str], references: Sequence[Sequence[str]], jar: Path,
          timeout: float = 1800.0) -> tuple[float, list[float]]:
    """Corpus (mean) and per-item SPICE F-scores through a JSON file, as coco-caption's ``Spice.compute_score``.

    SPICE 1.0 fails on Java > 13 (its bundled Stanford CoreNLP); the failure message becomes the reason the metric
    is unavailable.
    """
    with tempfile.TemporaryDirectory(prefix="audioscribe-spice-") as tmp:
        inputs, outputs = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inputs.write_text(json.dumps([{"image_id": i, "test": cand, "refs": list(refs)}
                                      for i, (cand, refs) in enumerate(zip(candidates, references))]))
        command = ["java", "-jar", "-Xmx8G", str(jar), str(inputs), "-out", str(outputs), "-subset", "-silent"]
        done = subprocess.run(command, cwd=jar.parent, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not outputs.is_file():
            raise MetricUnavailable(f"SPICE failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
        results = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(outputs.read_text())}
    items = [float(results[i]) if results.get(i) is not None else math.nan for i in range(len(candidates))]
    return sum(items) / len(items), items


def _tail(text: str, lines: int = 5) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "no message"


# --------------------------------------------------------------------------------------------------------------------
# evaluation


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   metrics: Iterable[str] = DEFAULT_METRICS) -> CaptionEvaluation:
    """Score candidate captions against their references; see :func:`evaluate_captions`.

    Returns corpus scores, per-item scores (``rouge_l``, ``cider_d``, and ``meteor``/``spice``/``spider`` when
    computed) and the reason each unavailable Java metric could not be computed. METEOR and SPICE, like every other
    metric, receive the normalised captions (coco passes them the PTB-tokenised ones).
    """
    wanted = _parse_metrics(metrics)
    _check_inputs(candidates, references)
    cands = [normalize_caption(c) for c in candidates]
    refs = [[normalize_caption(r) for r in item] for item in references]
    result = CaptionEvaluation()
    if "bleu" in wanted:
        result.scores.update({f"bleu_{k}": v for k, v in enumerate(bleu(cands, refs), start=1)})
    for name, function in (("rouge_l", rouge_l), ("cider_d", cider_d)):
        if name in wanted:
            result.per_item[name] = function(cands, refs)
            result.scores[name] = sum(result.per_item[name]) / len(cands)
    _add_java_metrics(result, wanted, [" ".join(c) for c in cands], [[" ".join(r) for r in item] for item in refs])
    if "vocab" in wanted:
        result.scores["vocab"] = float(vocab_size(cands))
    return result


def evaluate_captions(candidates: list[str], references: list[list[str]],
                      metrics: Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Corpus scores of candidate captions, each against its list of references.

    ``metrics`` names any of ``bleu`` (gives ``bleu_1``..``bleu_4``), ``rouge_l``, ``cider_d``, ``meteor``,
    ``spice``, ``spider`` (= (CIDEr-D + SPICE) / 2, needs both) and ``vocab`` (distinct candidate words). Captions are
    normalised with :func:`normalize_caption` first. METEOR/SPICE/SPIDEr are left out when Java or their jars are
    missing or they fail: :func:`score_captions` says why. Raises :class:`MetricInputError` (a ``ValueError``) on
    mismatched inputs, an item without references, or CIDEr-D with fewer than 2 candidates.
    """
    return score_captions(candidates, references, metrics).scores


def _parse_metrics(metrics: Iterable[str]) -> set[str]:
    wanted = {m.strip().lower().replace("-", "_") for m in ([metrics] if isinstance(metrics, str) else metrics)}
    wanted.discard("")
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise MetricInputError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_METRICS)}")
    if not wanted:
        raise MetricInputError(f"no metric asked for; choose from {', '.join(ALL_METRICS)}")
    return wanted | ({"cider_d", "spice"} if "spider" in wanted else set())


def _add_java_metrics(result: CaptionEvaluation, wanted: set[str], cands: list[str], refs: list[list[str]]) -> None:
    for name, function, jar in (("meteor", meteor, METEOR_JAR), ("spice", spice, SPICE_JAR)):
        if name not in wanted:
            continue
        try:
            result.scores[name], result.per_item[name] = function(cands, refs, find_jar(jar))
        except (MetricUnavailable, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            result.unavailable[name] = str(e) if isinstance(e, MetricUnavailable) else f"{type(e).__name__}: {e}"
            log.warning("%s unavailable: %s", name.upper(), result.unavailable[name])
    if "spider" in wanted:
        if "spice" in result.scores:
            result.per_item["spider"] = [(c + s) / 2 for c, s in zip(result.per_item["cider_d"],
                                                                     result.per_item["spice"])]
            result.scores["spider"] = (result.scores["cider_d"] + result.scores["spice"]) / 2
        else:
            result.unavailable["spider"] = f"needs SPICE, which is unavailable: {result.unavailable['spice']}"


# --------------------------------------------------------------------------------------------------------------------
# classification


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: scores [N, C], labels [N] class indices."""
    return float((np.asarray(scores).argmax(axis=1) == np.asarray(labels)).mean())


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: scores [N], positives [N] bool; the mean precision at each positive, ties broken by order
    (as sklearn's average_precision_score for untied scores). NaN when there is no positive."""
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = positives[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def macro_map(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of the AP: scores [N, C], labels [N, C] multi-hot."""
    values = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(values))
