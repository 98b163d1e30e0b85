"""Plan the corpus: which classes, attributes, timings and background each clip gets, and which split it is in.

Planning is cheap and happens in one process from ``numpy.random.default_rng([seed, ...])`` streams, so the manifest
is identical for a seed however many workers render the audio. The test split holds out (1) whole class pairs and
(2) per class one or two full attribute combinations: neither ever occurs in train or validation.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .captions import caption_clip
from .classes import ATTRIBUTES, BY_LABEL, CLASSES, VALUES, SourceClass

HELD_PAIR_FRACTION = 0.08
EVENT_COUNT_P = {1: 0.35, 2: 0.45, 3: 0.20}
TEST_SINGLE_FRACTION = 0.5
BACKGROUND_P = 0.5
BACKGROUND_KINDS = ("room tone", "hiss", "hum", "distant traffic")


def available_classes(smoke: bool) -> list[SourceClass]:
    """All classes, or in smoke mode those with a procedural renderer (limited to it)."""
    if not smoke:
        return list(CLASSES)
    return [c for c in CLASSES if any(m.procedural for m in c.materials)]


def attribute_combos(cls: SourceClass) -> list[tuple]:
    """All value tuples of the class's attributes, in ATTRIBUTES order restricted to cls.attrs."""
    return list(itertools.product(*(VALUES[a] for a in cls.attrs)))


def combo_dict(cls: SourceClass, combo: tuple) -> dict:
    values = dict(zip(cls.attrs, combo))
    return {a: values.get(a) for a in ATTRIBUTES}


@dataclass
class Holdout:
    pairs: set[frozenset]
    combos: dict[str, set[tuple]]

    def pair_ok(self, labels: list[str]) -> bool:
        return not any(frozenset(p) in self.pairs for p in itertools.combinations(labels, 2))

    def to_json(self) -> dict:
        """Held-out pairs and, per class, held-out attribute combinations as {attribute: value} dicts."""
        return {"pairs": sorted(sorted(p) for p in self.pairs),
                "combos": {label: [dict(zip(BY_LABEL[label].attrs, c)) for c in sorted(v)]
                           for label, v in sorted(self.combos.items())}}


def make_holdout(classes: list[SourceClass], seed: int) -> Holdout:
    """Held-out class pairs (about 8 %) and 1-2 attribute combinations per class (2 when it has 8+ combos)."""
    rng = np.random.default_rng([seed, 1])
    pairs = list(itertools.combinations(sorted(c.label for c in classes), 2))
    k = max(1, int(round(HELD_PAIR_FRACTION * len(pairs))))
    held = {frozenset(pairs[i]) for i in rng.choice(len(pairs), k, replace=False)}
    combos = {}
    for cls in classes:
        options = attribute_combos(cls)
        first = options[int(rng.integers(len(options)))]
        chosen = {first}
        if len(options) >= 8:  # also hold out its complement, so every single value still occurs in training
            chosen.add(tuple(VALUES[a][1 - VALUES[a].index(v)] for a, v in zip(cls.attrs, first)))
        combos[cls.label] = chosen
    return Holdout(held, combos)


# --------------------------------------------------------------------------------------------------------------------
# timing


def _material(rng: np.random.Generator, cls: SourceClass, smoke: bool) -> int:
    idx = [i for i, m in enumerate(cls.materials) if m.procedural or not smoke]
    weights = np.array([cls.materials[i].weight for i in idx])
    return int(idx[rng.choice(len(idx), p=weights / weights.sum())])


def _timeline(rng: np.random.Generator, classes: list[SourceClass], relation: str | None) -> tuple[float, list]:
    """Clip duration and (start, end) per event, in seconds (0.01 s grid)."""
    r = lambda x: round(float(x), 2)  # noqa: E731
    if relation is None:
        cls = classes[0]
        hi = min(10.0, cls.dur[1] + 1.0)
        dur = r(rng.uniform(max(1.0, min(cls.dur[0], hi - 0.5)), hi))
        start, end = r(rng.uniform(0, min(0.3, dur * 0.1))), r(dur - rng.uniform(0, min(0.3, dur * 0.1)))
        return dur, [(start, end)]
    if relation == "while":
        dur = r(rng.uniform(3.0 + len(classes), 10.0))
        spans = [(r(rng.uniform(0, 0.3)), r(dur - rng.uniform(0, 0.3)))]
        for cls in classes[1:]:
            length = min(rng.uniform(0.35, 0.8) * dur, cls.dur[1])
            start = rng.uniform(0.1 * dur, dur - length)
            spans.append((r(start), r(start + length)))
        return dur, spans
    lengths = [rng.uniform(max(0.8, c.dur[0]), min(c.dur[1], 4.5)) for c in classes]
    gaps = [rng.uniform(0.1, 0.5) for _ in classes[1:]]
    t, spans = rng.uniform(0.0, 0.3), []
    for k, length in enumerate(lengths):
        spans.append((r(t), r(t + length)))
        t += length + (gaps[k] if k < len(gaps) else 0.0)
    dur = r(min(10.0, t + rng.uniform(0.0, 0.4)))
    return dur, [(a, min(b, dur)) for a, b in spans]


def _order_for_while(rng: np.random.Generator, classes: list[SourceClass]) -> list[SourceClass]:
    """In 'while' clips the first event spans the clip, so prefer a continuous class there."""
    continuous = [c for c in classes if c.kind == "continuous"]
    if continuous:
        first = continuous[int(rng.integers(len(continuous)))]
        return [first] + [c for c in classes if c is not first]
    return classes


# --------------------------------------------------------------------------------------------------------------------
# clips


def _pick_classes(rng, classes: list[SourceClass], count: int, holdout: Holdout, need_pair: bool) -> list[SourceClass]:
    """count distinct classes; for test multi-event clips one held-out pair must be among them, else none."""
    by_label = {c.label: c for c in classes}
    for _ in range(1000):
        if need_pair:
            pair = sorted(sorted(p) for p in holdout.pairs)[int(rng.integers(len(holdout.pairs)))]
            labels = list(pair)
            rest = [c.label for c in classes if c.label not in labels]
            labels += [rest[i] for i in rng.choice(len(rest), count - 2, replace=False)]
            labels = [labels[i] for i in rng.permutation(len(labels))]
            return [by_label[x] for x in labels]
        labels = [classes[i].label for i in rng.choice(len(classes), count, replace=False)]
        if holdout.pair_ok(labels):
            return [by_label[x] for x in labels]
    raise RuntimeError("could not draw classes outside the held-out pairs")


def _attributes(rng, cls: SourceClass, holdout: Holdout, held: bool | None) -> dict:
    """held=True: one of the held-out combos; False: any other combo; None: any combo."""
    options = attribute_combos(cls)
    if held is True:
        options = sorted(holdout.combos[cls.label])
    elif held is False:
        options = [c for c in options if c not in holdout.combos[cls.label]]
    return combo_dict(cls, options[int(rng.integers(len(options)))])


def plan_clip(seed: int, index: int, split: str, classes: list[SourceClass], holdout: Holdout, smoke: bool,
              single_class: SourceClass | None = None) -> dict:
    """Everything about one clip except its audio: events, timings, attributes, background, captions."""
    rng = np.random.default_rng([seed, 2, index])
    if single_class is not None:
        chosen, relation = [single_class], None
        attrs = [_attributes(rng, single_class, holdout, True)]
    else:
        count = 1 if split != "test" else 2
        if split != "test":
            count = int(rng.choice(list(EVENT_COUNT_P), p=list(EVENT_COUNT_P.values())))
        elif rng.random() < 0.3:
            count = 3
        chosen = _pick_classes(rng, classes, count, holdout, need_pair=split == "test")
        relation = None if count == 1 else ("while" if rng.random() < 0.5 else "followed by")
        if relation == "while":
            chosen = _order_for_while(rng, chosen)
        attrs = [_attributes(rng, c, holdout, None if split == "test" else False) for c in chosen]
    dur, spans = _timeline(rng, chosen, relation)
    events = [{"source": c.source, "label": c.label, "attributes": a, "start_s": s, "end_s": e,
               "material": _material(rng, c, smoke), "provenance": None}
              for c, a, (s, e) in zip(chosen, attrs, spans)]
    background = None
    if rng.random() < BACKGROUND_P:
        kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        background = {"kind": kind, "provenance": f"procedural synthesis: soundworld.render.BACKGROUNDS[{kind!r}]"}
    clip = {"id": f"{split}_{index:06d}", "index": index, "split": split, "path": f"clips/{split}/{split}_{index:06d}.flac",
            "duration_s": dur, "sample_rate": 16000, "events": events, "relation": relation, "background": background,
            "labels": list(dict.fromkeys(c.label for c in chosen))}
    crng = np.random.default_rng([seed, 3, index])
    clip["captions_a"] = caption_clip(crng, clip, "A")
    clip["captions_b"] = caption_clip(crng, clip, "B")
    return clip


def corpus_tasks(n_train: int, n_val: int, n_test: int, classes: list[SourceClass]) -> list[tuple]:
    """(index, split, single-class label or None) for every clip, in manifest order (train, val, test).

    Half of the test clips are single-source clips cycling through every class (with held-out attribute
    combinations); the rest contain a held-out class pair.
    """
    tasks = [(k, "train", None) for k in range(n_train)]
    tasks += [(n_train + k, "val", None) for k in range(n_val)]
    n_single = int(round(n_test * TEST_SINGLE_FRACTION))
    tasks += [(n_train + n_val + k, "test", classes[k % len(classes)].label if k < n_single else None)
              for k in range(n_test)]
    return tasks


def plan_corpus(seed: int, n_train: int, n_val: int, n_test: int, smoke: bool) -> tuple[list[dict], Holdout]:
    """All clips of all splits in one process (the build plans inside its rendering workers instead)."""
    classes = available_classes(smoke)
    holdout = make_holdout(classes, seed)
    clips = [plan_clip(seed, index, split, classes, holdout, smoke, BY_LABEL[single] if single else None)
             for index, split, single in corpus_tasks(n_train, n_val, n_test, classes)]
    return clips, holdout
