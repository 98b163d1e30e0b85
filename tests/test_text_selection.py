"""Caption selection for audio-free prompt tuning: word-boundary class patterns, top-up, labels, AFPT corpora."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine.text_selection import (AFPT_CLASS_NAMES, TextSelectionError, class_name_pattern, load_labelled_captions,
                                   select_texts)
from tests.helpers import SHARED_DATA, SHIPPED_CAPTIONS, small_caption_set

AFPT = SHARED_DATA / "afpt"
# Everyday sound words that are frequent in AudioCaps (each occurs in 700+ shipped captions)
EVERYDAY = ["dog", "cat", "siren", "rain", "bird", "engine", "train", "bell", "water", "wind"]


def matches(name: str, text: str) -> bool:
    return class_name_pattern(name).search(text) is not None


@pytest.fixture(scope="module")
def audiocaps() -> list[str]:
    return SHIPPED_CAPTIONS.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def everyday_selection(audiocaps):
    return select_texts(EVERYDAY, audiocaps, min_per_class=0, max_per_class=None)


def afpt_file(name: str):
    path = AFPT / name
    if not path.is_file():
        pytest.skip(f"{path} is not beside the checkout")
    return path


# --------------------------------------------------------------------------------------------------------------------
# patterns


@pytest.mark.parametrize("name, text", [
    ("cat", "a location with people talking"),
    ("cat", "two people communicate over a radio"),
    ("cat", "organ music in a cathedral"),
    ("tap", "tape rewinding"),
    ("tap", "a box is taped shut"),
    ("yell", "yellow bus drives by"),
    ("rain", "a brain scan machine beeps"),
    ("rain", "a train passes"),
    ("rain", "water goes down the drain"),
    ("can opening", "pecan shells crack open"),
    ("can", "pecan shells crack"),
    ("can opening", "a trashcan opening and closing"),
    ("dog", "a hotdog vendor shouts"),
    ("train", "a dog training class"),
    ("wind", "someone is winding a clock"),
    ("crow", "a rooster crowing"),
    ("bell", "a doorbell rings"),
])
def test_substring_false_positives_are_rejected(name, text):
    assert not matches(name, text)


@pytest.mark.parametrize("name, text", [
    ("dog", "dogs barking"), ("dog", "A DOG barks"), ("dog", "the dog's bowl"), ("cat", "two cats fight"),
    ("siren", "sirens wail"), ("bark", "a dog barks"), ("bark", "barking"), ("bark", "it barked"),
    ("ring", "a phone is ringing"), ("ring", "it rings"), ("pour", "pouring water"), ("sneeze", "someone sneezing"),
    ("sneeze", "he sneezed"), ("sneezing", "a loud sneeze"), ("clap", "people clapping"), ("clap", "they clapped"),
    ("tap", "tapping on a table"), ("baby", "babies cry"), ("crying baby", "two crying babies"),
    ("knife", "knives clatter"), ("glass", "glasses clink"), ("mouse", "mice squeak"), ("cry", "a baby cries"),
    ("cry", "she cried"), ("crickets", "a cricket chirps"), ("hiss", "steam hisses"), ("buzz", "bees buzzing"),
    ("car horn", "a car horn honks"), ("car horn", "a car-horn honks"), ("car horn", "car  horns"),
    ("car horn", "a car's horn"), ("car horn", "a carhorn"), ("tooth brush", "a toothbrush"),
    ("dog bark", "dogs barking"), ("clock tick", "a clock ticking"), ("hi-hat", "hi hat and snare"),
    ("hi-hat", "hihat"), ("chirp, tweet", "birds tweeting"), ("frying (food)", "bacon frying"),
    ("brushing teeth", "someone brushing-teeth"), ("mouse click", "mouse clicks"), ("engine idling", "an engine idles"),
])
def test_inflections_and_spellings_are_accepted(name, text):
    assert matches(name, text)


def test_every_afpt_class_name_compiles():
    assert [len(AFPT_CLASS_NAMES[k]) for k in ("esc50", "urbansound8k", "dcase2019", "fsdkaggle2019")] == \
        [50, 10, 10, 80]
    for key in ("esc50", "fsdkaggle2019"):  # alphabetical, as the corpora's indices assume
        assert AFPT_CLASS_NAMES[key] == sorted(AFPT_CLASS_NAMES[key])
    for names in AFPT_CLASS_NAMES.values():
        assert len({n.lower() for n in names}) == len(names)
        for name in names:
            class_name_pattern(name)


def test_indexed_matching_equals_searching_every_caption(audiocaps):
    from engine.text_selection import _match_corpus
    names = AFPT_CLASS_NAMES["fsdkaggle2019"] + ["tooth brush", "dentist's drill", "mouse", "dog bark", "car horn"]
    captions = audiocaps[:5000] + ["a toothbrush", "A dentist's drill whirs", "mice squeak", "Dogs-barking", "carhorns"]
    assert _match_corpus(names, captions) == [
        [i for i, c in enumerate(captions) if class_name_pattern(n).search(c)] for n in names]


# --------------------------------------------------------------------------------------------------------------------
# AudioCaps


def test_audiocaps_matches_are_whole_words(audiocaps, everyday_selection):
    sel = everyday_selection
    assert set(sel.sources) == {"match"}
    for c, name in enumerate(EVERYDAY):
        loose = re.compile(rf"(?<![a-z]){name}[a-z]{{0,4}}(?![a-z])", re.I)  # the word plus a short ending
        strict = re.compile(rf"\b{name}s?\b", re.I)  # the word or its plural, exactly
        mine = {t for t, row in zip(sel.texts, sel.labels) if row[c]}
        assert all(loose.search(t) for t in mine), name
        assert {t for t in audiocaps if strict.search(t)} <= mine, name  # nothing plain is missed
        assert sel.report[c].available == len(mine) >= 500, name
    # substring matching would have taken captions that only contain the letters
    cat = {t for t, row in zip(sel.texts, sel.labels) if row[EVERYDAY.index("cat")]}
    substring = {t for t in audiocaps if "cat" in t.lower()}
    assert len(substring - cat) > 50
    assert any("location" in t.lower() for t in substring - cat)


def test_cap_determinism_and_consistent_report(audiocaps):
    sel = select_texts(EVERYDAY, audiocaps, min_per_class=16, max_per_class=50, seed=3)
    again = select_texts(EVERYDAY, audiocaps, min_per_class=16, max_per_class=50, seed=3)
    other = select_texts(EVERYDAY, audiocaps, min_per_class=16, max_per_class=50, seed=4)
    assert sel.texts == again.texts and np.array_equal(sel.labels, again.labels)
    assert sel.texts != other.texts
    corpus_order = {t: i for i, t in enumerate(audiocaps)}
    assert [corpus_order[t] for t in sel.texts] == sorted(corpus_order[t] for t in sel.texts)
    for c, r in enumerate(sel.report):
        assert r.name == EVERYDAY[c]
        assert (r.matched, r.topped_up, r.described, r.total) == (50, 0, 0, 50)
        assert r.available > 50 and r.labelled == int(sel.labels[:, c].sum()) >= r.matched
        assert len(r.examples) == 3 and all(matches(r.name, e) for e in r.examples)
    assert len(sel.texts) == len(set(sel.texts)) == len(sel.labels) == len(sel.single_label) == len(sel.sources)
    assert len(sel.texts) <= 50 * len(EVERYDAY)
    counts = sel.labels.sum(axis=1)
    assert counts.min() >= 1
    assert np.array_equal(sel.single_label == -1, counts != 1)
    one = counts == 1
    assert np.array_equal(sel.single_label[one], sel.labels[one].argmax(axis=1))
    table = sel.format_report()
    assert all(name in table for name in EVERYDAY) and len(table.splitlines()) == len(EVERYDAY) + 3


def test_multi_label_captions():
    captions = ["A dog barks at a cat", "A dog barks", "A cat meows", "Rain falls", "A dog barks"]
    sel = select_texts(["dog", "cat"], captions, min_per_class=0)
    assert sel.texts == ["A dog barks at a cat", "A dog barks", "A cat meows"]  # duplicates and non-matches gone
    assert sel.labels.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert sel.single_label.tolist() == [-1, 0, 1]
    assert [(r.matched, r.labelled) for r in sel.report] == [(2, 2), (2, 2)]


def test_descriptions_are_always_included():
    captions = [f"a dog barks {i}" for i in range(10)]
    sel = select_texts(["dog", "cat"], captions, min_per_class=2, max_per_class=5,
                       descriptions={"Cat": ["a cat purrs", "a cat hisses at a dog", "  a cat   purrs "],
                                     "dog": ["a dog barks 0"]})
    dog, cat = sel.report
    assert (dog.matched, dog.described, dog.total) == (5, 1, 6)
    assert (cat.matched, cat.topped_up, cat.described, cat.total) == (0, 0, 2, 2)  # repeats dropped
    described = [t for t, s in zip(sel.texts, sel.sources) if s == "description"]
    assert "a cat purrs" in described and "a cat hisses at a dog" in described
    row = sel.texts.index("a cat hisses at a dog")
    assert sel.labels[row].tolist() == [1, 1] and sel.single_label[row] == -1
    assert sel.texts.count("a dog barks 0") == 1  # a description equal to a chosen caption is kept once
    assert len(sel.texts) == 5 + 2 + ("a dog barks 0" not in sel.texts[:5])


# --------------------------------------------------------------------------------------------------------------------
# top-up with CLAP


@pytest.fixture(scope="module")
def small_set():
    captions = small_caption_set(400)
    assert not any(class_name_pattern("toothbrush").search(c) for c in captions)
    return captions


def test_rare_class_is_topped_up_with_nearest_captions(tiny_clap, small_set):
    names = ["dog", "toothbrush"]
    embeddings = tiny_clap.embed_text(small_set).numpy()
    sel = select_texts(names, small_set, clap=tiny_clap, caption_embeddings=embeddings, min_per_class=16)
    dog, brush = sel.report
    assert brush.available == brush.matched == 0 and brush.topped_up == brush.total == 16
    rows = np.flatnonzero(sel.labels[:, 1])
    assert len(rows) == 16
    assert all(sel.sources[i] == "nearest" for i in rows)
    assert all(sel.labels[i].tolist() == [0, 1] and sel.single_label[i] == 1 for i in rows)
    nearest = {sel.texts[i] for i in rows}
    assert not any(matches("dog", t) for t in nearest)  # a caption about a dog would contradict the label
    # they are the 16 captions nearest to the class prompt among those that mention no class
    prompt = tiny_clap.embed_text(["This is a sound of toothbrush."]).numpy()[0]
    candidates = [i for i, c in enumerate(small_set) if not matches("dog", c)]
    scores = embeddings[candidates] @ (prompt / np.linalg.norm(prompt))
    assert nearest == {small_set[candidates[k]] for k in np.argsort(-scores)[:16]}
    assert dog.topped_up == max(0, 16 - dog.matched)
    # embedding the captions here gives the same selection
    lazy = select_texts(names, small_set, clap=tiny_clap, min_per_class=16)
    assert lazy.texts == sel.texts and np.array_equal(lazy.labels, sel.labels)


def test_datastore_can_be_passed_as_captions(tiny_clap, small_set):
    from engine.datastore import CaptionDatastore
    store = CaptionDatastore.build(small_set, tiny_clap, show_progress=False)
    from_store = select_texts(["dog", "toothbrush"], store, clap=tiny_clap, min_per_class=16)
    direct = select_texts(["dog", "toothbrush"], store.captions, clap=tiny_clap, caption_embeddings=store.embeddings,
                          min_per_class=16)
    assert from_store.texts == direct.texts


def test_topping_up_without_clap_says_so(small_set):
    with pytest.raises(ValueError, match="clap"):
        select_texts(["dog", "toothbrush"], small_set, min_per_class=16)
    assert select_texts(["dog", "toothbrush"], small_set, min_per_class=0).report[1].total == 0
    enough = select_texts(["toothbrush"], small_set, min_per_class=2,
                          descriptions={"toothbrush": ["someone brushes their teeth", "an electric toothbrush hums"]})
    assert enough.sources == ["description", "description"] and enough.labels.tolist() == [[1], [1]]


@pytest.mark.parametrize("names, message", [
    ([], "No class names"), (["dog", ""], "non-empty"), (["dog", "   "], "non-empty"),
    (["Dog", "cat", "dog"], "Duplicate"), ("dog", "list"), (["()"], "no words"),
])
def test_bad_class_names(names, message):
    with pytest.raises(ValueError, match=message):
        select_texts(names, ["a dog barks"], min_per_class=0)


def test_bad_options():
    with pytest.raises(ValueError, match="not one of the classes"):
        select_texts(["dog"], ["a dog barks"], min_per_class=0, descriptions={"cat": ["a cat"]})
    with pytest.raises(ValueError, match="max_per_class"):
        select_texts(["dog"], ["a dog barks"], min_per_class=16, max_per_class=8)
    with pytest.raises(ValueError, match="caption_embeddings"):
        select_texts(["dog"], ["a dog barks"], min_per_class=0, caption_embeddings=np.zeros((2, 4)))
    with pytest.raises(TextSelectionError, match="template"):
        select_texts(["dog"], ["a dog barks"], min_per_class=0, templates=("no slot",))


# --------------------------------------------------------------------------------------------------------------------
# labelled caption files and the AFPT reference corpora


def test_load_afpt_corpora():
    texts, labels, names = load_labelled_captions(afpt_file("cap_esc.csv"), "esc50")
    assert len(texts) == 6177 and labels.shape == (6177, 50) and names == AFPT_CLASS_NAMES["esc50"]
    assert (labels.sum(axis=1) == 1).all()
    assert texts[0] == "Distant airplane sound in a forest." and labels[0, names.index("airplane")] == 1
    texts, labels, names = load_labelled_captions(afpt_file("cap_fsd19.csv"), AFPT_CLASS_NAMES["fsdkaggle2019"])
    per_row = labels.sum(axis=1)
    assert labels.shape == (9515, 80)
    assert [(per_row == 1).sum(), (per_row == 2).sum(), (per_row >= 3).sum()] == [8119, 1139, 257]
    assert labels[0, names.index("chirp, tweet")] == labels[0, names.index("cricket")] == 1
    _, labels, _ = load_labelled_captions(afpt_file("cap_dcase19.csv"), "dcase2019")
    assert np.bincount(labels.sum(axis=1).astype(int)).tolist() == [0, 1791, 125, 3]
    with pytest.raises(ValueError, match="class_names"):
        load_labelled_captions(afpt_file("cap_urbansound8k.csv"))
    with pytest.raises(ValueError, match="outside"):
        load_labelled_captions(afpt_file("cap_esc.csv"), ["dog", "cat"])


def test_load_user_labelled_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('caption,labels\n"A dog barks, a cat meows",dog; cat\nA siren wails,Siren\n,dog\nRain,rain\n',
                    encoding="utf-8")
    texts, labels, names = load_labelled_captions(path)
    assert texts == ["A dog barks, a cat meows", "A siren wails", "Rain"]
    assert names == ["dog", "cat", "Siren", "rain"]
    assert labels.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    texts, labels, names = load_labelled_captions(path, ["rain", "siren", "cat", "dog"])
    assert labels.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="not one of the class names"):
        load_labelled_captions(path, ["dog", "cat", "siren"])
    bad = tmp_path / "bad.csv"
    bad.write_text("caption,whatever\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="label"):
        load_labelled_captions(bad)


def test_patterns_against_afpt_substring_labels():
    """cap_esc.csv was labelled by substring matching: our patterns reject its false positives and keep the rest."""
    texts, labels, names = load_labelled_captions(afpt_file("cap_esc.csv"), "esc50")

    def split(name):
        c = names.index(name)
        rows = [t for t, row in zip(texts, labels) if row[c]]
        kept = [t for t in rows if matches(name, t)]
        return rows, kept, [t for t in rows if not matches(name, t)]

    rates = {}
    for name in ("cat", "can opening", "mouse click", "rain", "dog"):
        rows, kept, rejected = split(name)
        rates[name] = len(kept) / len(rows)
        first = name.split()[0]
        assert all(re.search(rf"\b{first}", t, re.I) for t in kept), name  # what we keep really names the class
    print("accepted share of AFPT's captions:", {k: round(v, 2) for k, v in rates.items()})

    rows, kept, rejected = split("cat")
    inside_words = [t for t in rows if re.search(r"location|communicat|cathedral|notificat", t, re.I)
                    and not re.search(r"\bcats?\b", t, re.I)]
    assert len(inside_words) >= 20 and set(inside_words) <= set(rejected)
    assert 0.3 < rates["cat"] < 0.7  # about half of AFPT's "cat" captions are not about cats

    rows, kept, rejected = split("rain")  # terrain, drain, grainy
    assert [t for t in rows if re.search(r"[a-z]rain", t, re.I) and not re.search(r"\brain", t, re.I)] != []
    assert all(t in rejected for t in rows if not re.search(r"\brain", t, re.I))

    rows, kept, rejected = split("can opening")
    assert any("pecan" in t.lower() for t in rejected) and any("trashcan" in t.lower() for t in rejected)

    assert rates["dog"] > 0.9
