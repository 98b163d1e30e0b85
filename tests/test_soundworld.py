"""soundworld corpus generator: smoke builds only (procedural sources, no Debian package needed), a few seconds.

Checks what the downstream CLAP / caption trainers rely on: determinism, manifest layout, captions that agree with
the rendered audio (class band, loudness, distance, order), held-out combinations and test prompts kept out of
training.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from trainers.soundworld import build, load_classes, load_manifest
from trainers.soundworld.__main__ import main as cli_main
from trainers.soundworld.captions import inflect
from trainers.soundworld.classes import (ATTRIBUTE_STEMS, BY_LABEL, CLASSES, DEFAULT_WORDS, VALUES, content_stems, forbidden_stems,
                                         train_terms)
from trainers.soundworld.compose import available_classes
from trainers.soundworld.dsp import SR, band_fraction, frame_rms, level_db
from trainers.soundworld.material import midi_bytes
from trainers.soundworld.render import render_clip

SMALL = dict(n_train=24, n_val=6, n_test=28, smoke=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The default smoke build (120/30/30), seed 0."""
    return build(tmp_path_factory.mktemp("sw") / "smoke", seed=0, smoke=True, log=lambda _: None)


@pytest.fixture(scope="module")
def manifest(corpus) -> list[dict]:
    return load_manifest(corpus)


def _digest(out: Path) -> dict[str, str]:
    files = sorted(out.glob("clips/*/*.flac")) + [out / "manifest.jsonl", out / "classes.json"]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _audio(out: Path, clip: dict) -> np.ndarray:
    audio, sr = sf.read(str(out / clip["path"]), dtype="float32")
    assert sr == SR and audio.ndim == 1
    return audio


def _span(audio: np.ndarray, event: dict) -> np.ndarray:
    return audio[int(event["start_s"] * SR): int(event["end_s"] * SR)]


# --------------------------------------------------------------------------------------------------------------------
# determinism and layout


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = _digest(build(tmp_path / "a", seed=3, workers=1, log=lambda _: None, **SMALL))
    b = _digest(build(tmp_path / "b", seed=3, workers=2, log=lambda _: None, **SMALL))
    c = _digest(build(tmp_path / "c", seed=4, workers=1, log=lambda _: None, **SMALL))
    assert a == b, "same seed must give the same bytes, whatever the number of workers"
    assert a["manifest.jsonl"] != c["manifest.jsonl"]
    assert len(set(a.values()) & set(c.values())) <= 1  # only classes.json may coincide


def test_manifest_fields_and_files(corpus, manifest):
    counts = {s: sum(c["split"] == s for c in manifest) for s in ("train", "val", "test")}
    assert counts == {"train": 120, "val": 30, "test": 30}
    assert len({c["id"] for c in manifest}) == len(manifest)
    for clip in manifest:
        assert set(clip) >= {"id", "split", "path", "duration_s", "sample_rate", "events", "relation", "background",
                             "labels", "captions_a", "captions_b"}
        assert clip["path"] == f"clips/{clip['split']}/{clip['id']}.flac"
        assert clip["sample_rate"] == 16000 and 1.0 <= clip["duration_s"] <= 10.0
        info = sf.info(str(corpus / clip["path"]))
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("FLAC", "PCM_16", 1, 16000)
        assert abs(info.frames - clip["duration_s"] * SR) <= 1
        assert clip["labels"] == list(dict.fromkeys(e["label"] for e in clip["events"]))
        assert len(clip["labels"]) == len(clip["events"]) in (1, 2, 3)
        assert (clip["relation"] is None) == (len(clip["events"]) == 1)
        assert clip["relation"] in (None, "while", "followed by")
        assert clip["background"] is None or set(clip["background"]) == {"kind", "provenance"}
        for ev in clip["events"]:
            cls = BY_LABEL[ev["label"]]
            assert ev["source"] == cls.source and ev["provenance"].startswith("procedural")
            assert set(ev["attributes"]) == {"loudness", "distance", "speed", "pitch"}
            for attr, value in ev["attributes"].items():
                assert (value in VALUES[attr]) if attr in cls.attrs else value is None
            assert 0.0 <= ev["start_s"] < ev["end_s"] <= clip["duration_s"]
        peak = np.abs(_audio(corpus, clip)).max()
        assert 0.0 < peak <= 0.9


def test_classes_json(corpus):
    classes = load_classes(corpus)
    assert [c["label"] for c in classes] == [c.label for c in available_classes(smoke=True)]
    for entry in classes:
        assert set(entry) >= {"label", "source", "test_prompts", "train_terms", "provenance", "license", "band_hz"}
        assert entry["test_prompts"] and entry["train_terms"] and entry["license"].startswith("procedural")
        assert 0 <= entry["band_hz"][0] < entry["band_hz"][1] <= 8000
    assert len(CLASSES) >= 30 and len(classes) >= 20


def test_cli_smoke_build(tmp_path):
    out = tmp_path / "cli"
    assert cli_main(["build", "--out", str(out), "--smoke", "--train", "4", "--val", "2", "--test", "4",
                     "--quiet"]) == 0
    assert len(load_manifest(out)) == 10 and (out / "build_info.json").is_file()


# --------------------------------------------------------------------------------------------------------------------
# captions


def test_captions_count_style_and_class_terms(manifest):
    for clip in manifest:
        for key in ("captions_a", "captions_b"):
            caps = clip[key]
            assert len(caps) >= 3 and len(set(caps)) == len(caps)
        assert np.mean([len(c.split()) for c in clip["captions_a"]]) < np.mean([len(c.split())
                                                                               for c in clip["captions_b"]])
        assert all(c.endswith(".") for c in clip["captions_b"])
        for caption in clip["captions_a"] + clip["captions_b"]:
            words = content_stems(caption)
            for label in clip["labels"]:  # every event is named by one of its class's terms
                assert any(content_stems(t) <= words for t in train_terms(BY_LABEL[label])), (label, caption)


def _opposite_words(label: str, attr: str, value: str) -> list[str]:
    cls = BY_LABEL[label]
    other = [v for v in VALUES[attr] if v != value][0]
    words = cls.words.get((attr, other), DEFAULT_WORDS[(attr, other)])
    mine = cls.words.get((attr, value), DEFAULT_WORDS[(attr, value)])
    return [w for w in words.adj + words.adv if w not in mine.adj + mine.adv]


def test_single_event_captions_never_contradict_attributes(manifest):
    checked = 0
    for clip in manifest:
        if len(clip["events"]) != 1:
            continue
        ev = clip["events"][0]
        for attr, value in ev["attributes"].items():
            if value is None:
                continue
            for caption in clip["captions_a"] + clip["captions_b"]:
                for word in _opposite_words(ev["label"], attr, value):
                    assert not re.search(rf"\b{re.escape(word)}\b", caption, re.I), (ev["attributes"], caption)
                checked += 1
    assert checked > 100


def _noun_stems(cls) -> set[str]:
    """Stems of the subjects and noun phrases that name a class (verbs are shared too widely to locate a class)."""
    texts = [s.rstrip("+") for g in cls.groups for s in g.subjects] + list(cls.nominals)
    return {s for t in texts for s in content_stems(t)} - ATTRIBUTE_STEMS


def _reversed(caption: str) -> bool:
    """'Y after X' names the second event first ('After X, Y' and 'after that' keep the order)."""
    return bool(re.search(r"\bafter\b(?! that)", caption[1:], re.I)) and not caption.lower().startswith("after")


def test_followed_by_captions_follow_the_rendered_order(manifest):
    checked = 0
    for clip in manifest:
        if clip["relation"] != "followed by" or len(clip["events"]) != 2:
            continue
        first, second = (BY_LABEL[e["label"]] for e in clip["events"])
        terms = [_noun_stems(c) for c in (first, second)]
        unique = [terms[0] - terms[1], terms[1] - terms[0]]
        for caption in clip["captions_a"] + clip["captions_b"]:
            words = [w for w in re.findall(r"[A-Za-z'-]+", caption) if "-" not in w]  # hyphenated: attributes
            stems = [content_stems(w) for w in words]
            pos = [next((i for i, s in enumerate(stems) if s & u), None) for u in unique]
            if None in pos:
                continue
            assert (pos[0] > pos[1]) == _reversed(caption), caption
            checked += 1
    assert checked >= 10


def test_inflection():
    assert inflect("drip") == ("drips", "drip", "dripping")
    assert inflect("be played") == ("is played", "are played", "being played")
    assert inflect("keep ringing") == ("keeps ringing", "keep ringing", "ringing")
    assert inflect("pop and crackle") == ("pops and crackles", "pop and crackle", "popping and crackling")
    assert inflect("go off") == ("goes off", "go off", "going off")


# --------------------------------------------------------------------------------------------------------------------
# held-out data


def test_test_prompts_never_in_training_captions(manifest):
    for cls in CLASSES:  # catalogue level: no bank word of a class overlaps its test prompts
        assert not forbidden_stems(cls) & {s for t in train_terms(cls) for s in content_stems(t)}
    train_text = " ".join(c for clip in manifest if clip["split"] != "test" for c in clip["captions_a"] +
                          clip["captions_b"]).lower()
    for clip in manifest:
        if clip["split"] == "test":
            continue
        forbidden = set().union(*(forbidden_stems(BY_LABEL[label]) for label in clip["labels"]))
        for caption in clip["captions_a"] + clip["captions_b"]:
            assert not content_stems(caption) & forbidden, caption
    for cls in available_classes(smoke=True):
        for prompt in cls.test_prompts:
            assert prompt.lower() not in train_text


def test_held_out_combinations_only_in_test(corpus, manifest):
    import json
    holdout = json.loads((corpus / "build_info.json").read_text())["holdout"]
    pairs = {frozenset(p) for p in holdout["pairs"]}
    combos = {label: [tuple(sorted(c.items())) for c in cs] for label, cs in holdout["combos"].items()}
    assert pairs and all(combos.values())

    def held_combo(ev: dict) -> bool:
        attrs = tuple(sorted((a, v) for a, v in ev["attributes"].items() if a in BY_LABEL[ev["label"]].attrs))
        return attrs in combos[ev["label"]]

    for clip in manifest:
        clip_pairs = {frozenset((a, b)) for a in clip["labels"] for b in clip["labels"] if a != b}
        if clip["split"] != "test":
            assert not clip_pairs & pairs, clip["id"]
            assert not any(held_combo(ev) for ev in clip["events"]), clip["id"]
        elif len(clip["events"]) == 1:
            assert held_combo(clip["events"][0]), clip["id"]
        else:
            assert clip_pairs & pairs, clip["id"]
    singles = {c["labels"][0] for c in manifest if c["split"] == "test" and len(c["events"]) == 1}
    assert singles == {c.label for c in available_classes(smoke=True)[:15]}  # 15 single test clips in the smoke build


# --------------------------------------------------------------------------------------------------------------------
# audio agrees with labels and attributes


def test_single_source_clips_carry_energy_in_their_class_band(corpus, manifest):
    for clip in manifest:
        if len(clip["events"]) == 1:
            ev = clip["events"][0]
            lo, hi = BY_LABEL[ev["label"]].band_hz
            assert band_fraction(_span(_audio(corpus, clip), ev), lo, hi) > 0.6, (clip["id"], ev["label"])


def _clip(events: list[tuple], relation=None, duration=6.0) -> dict:
    evs = []
    for label, attrs, start, end in events:
        full = {a: None for a in VALUES}
        full.update({a: v for a, v in attrs.items() if a in BY_LABEL[label].attrs})
        material = next(i for i, m in enumerate(BY_LABEL[label].materials) if m.procedural)
        evs.append({"label": label, "attributes": full, "start_s": start, "end_s": end, "material": material})
    return {"index": 0, "duration_s": duration, "events": evs, "relation": relation, "background": None}


LOUD_NEAR = {"loudness": "loud", "distance": "near", "speed": "slow", "pitch": "high"}


def test_followed_by_energy_order():
    clip = _clip([("siren", LOUD_NEAR, 0.0, 3.0), ("thunder", LOUD_NEAR, 3.3, 6.0)], "followed by")
    audio, _ = render_clip(0, clip, None, True)
    siren_band = [band_fraction(audio[a:b], 400, 5000) * np.sum(audio[a:b] ** 2) for a, b in
                  ((0, 3 * SR), (int(3.3 * SR), 6 * SR))]
    thunder_band = [band_fraction(audio[a:b], 20, 300) * np.sum(audio[a:b] ** 2) for a, b in
                    ((0, 3 * SR), (int(3.3 * SR), 6 * SR))]
    assert siren_band[0] > 20 * siren_band[1]
    assert thunder_band[1] > 20 * thunder_band[0]
    env = frame_rms(audio)
    assert env[: 3 * 20].mean() > 10 * env[int(3.05 * 20): int(3.25 * 20)].mean()  # the gap between is quiet


@pytest.mark.parametrize("label", ["siren", "rain", "knocking", "dripping water", "clock ticking"])
def test_loudness_and_distance_are_rendered(label):
    levels, highs = {}, {}
    for loud in ("loud", "quiet"):
        for dist in ("near", "far"):
            audio, _ = render_clip(1, _clip([(label, {**LOUD_NEAR, "loudness": loud, "distance": dist}, 0.0, 4.0)],
                                            duration=4.0), None, True)
            levels[loud, dist] = level_db(audio)
            highs[loud, dist] = band_fraction(audio, 3000, 8000)
    for dist in ("near", "far"):
        assert levels["loud", dist] > levels["quiet", dist] + 10
    for loud in ("loud", "quiet"):
        assert levels[loud, "near"] > levels[loud, "far"] + 3
        if BY_LABEL[label].band_hz[1] > 4000:
            assert highs[loud, "near"] > highs[loud, "far"]


# --------------------------------------------------------------------------------------------------------------------
# Debian side without Debian: MIDI writer, package check


def test_midi_bytes_layout():
    data = midi_bytes([(0.0, 0.5, 60, 100), (0.5, 0.5, 64, 90)], program=40)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    assert int.from_bytes(data[18:22], "big") == len(data) - 22
    assert bytes([0xC0, 40]) in data and bytes([0x90, 60, 100]) in data and data.endswith(b"\xff\x2f\x00")
    long = midi_bytes([(2.0, 0.1, 60, 100)], program=0)
    assert b"\x8f\x00\x90" in long  # delta 1920 ticks = VLQ 0x8f 0x00


def test_missing_packages_are_named(monkeypatch):
    from trainers.soundworld import material
    monkeypatch.setattr(material, "PACKAGES", {"no-such-package": ("/nonexistent/path", "test")})
    monkeypatch.setattr(material.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match="apt-get install -y --no-install-recommends no-such-package"):
        material.ensure_packages(lambda _: None)
