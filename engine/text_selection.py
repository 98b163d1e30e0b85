"""Choose the captions that stand in for audio in audio-free prompt tuning (audio_free_prompt_tuning.md §1.4).

AFPT trains prompts on (caption, class) pairs: real audio captions that mention a class. The original corpora were
selected by plain substring matching, which lets "cat" match "location", "tap" match "tape", "yell" match "yellow"
and "can" match "pecan". This module selects captions with word-boundary patterns instead, tops up rare classes with
the captions nearest to the class in CLAP text space, and labels each text with every class it mentions.

Class-name patterns (:func:`class_name_pattern`), case-insensitive, never inside a longer word:

- A name is split into alternatives at commas ("chirp, tweet" -> "chirp" | "tweet", the AudioSet/FSD convention);
  parenthesised qualifiers are dropped ("frying (food)" -> "frying"); words are split at spaces, hyphens and
  underscores.
- The last word of each alternative matches its inflections from a small suffix set: -s/-es (plural, 3rd person),
  -ing, -ed; with y -> ies/ied, f/fe -> ves, e-dropping before -ing/-ed ("sneeze" -> "sneezing", "sneezed"),
  consonant doubling for one-syllable consonant-vowel-consonant words ("clap" -> "clapping", "clapped"; the
  undoubled "taping"/"taped" are not generated for "tap"), and a few irregular plurals (mouse/mice, tooth/teeth,
  child/children, man/men, woman/women, foot/feet, goose/geese, person/people). A name written inflected is reduced
  first, so "sneezing" also matches "sneeze" and "crickets" also matches "cricket". Verb forms are generated for the
  last word of every name (so "dog bark" matches "dog barking"), not only single-word names.
- Derived forms that usually mean something else are never generated (:data:`EXCLUDED_FORMS`: "training" for
  "train", "winding" for "wind", "crowing" for "crow", "firing"/"fired" for "fire", "dogged" for "dog"); the
  name itself is always matched as written.
- Other words of a multi-word name match as written or with a plural/possessive ending ("dogs barking",
  "car's horn"), separated by any run of spaces/hyphens ("car horn", "car-horn", "car  horn"), or joined into one
  word ("toothbrush" for "tooth brush", "hihat" for "hi-hat"). Word order is fixed: "baby crying" does not match
  "crying baby".
- Not matched: compounds that merely contain the name ("rainfall", "doorbell", "songbird"), synonyms ("hound" for
  "dog") and paraphrases; topping up by CLAP similarity is what finds those.

Selection (:func:`select_texts`), per class: the matching captions (deduplicated, corpus order; a seeded sample
kept in corpus order when more than ``max_per_class`` match); if fewer than ``min_per_class`` (counting the user's
descriptions), the captions nearest to the class prompt by CLAP text similarity; then the user's descriptions, always
included. Labels are multi-hot: a text is labelled with every class whose pattern it matches.
"""
from __future__ import annotations

import ast
import bisect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.errors import AudioScribeError

SOURCES = ("match", "nearest", "description")

# Derived forms never generated because they usually name something else (the name itself is always matched).
EXCLUDED_FORMS = frozenset({
    "training", "trained", "trainings",  # train: coaching
    "winding", "windings", "winded",  # wind: turning a key
    "crowing", "crowed",  # crow: what roosters do
    "firing", "fired",  # fire: guns
    "dogged",  # dog: persistent
})

_IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "child": "children", "man": "men", "woman": "women",
                      "foot": "feet", "tooth": "teeth", "person": "people"}
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in _IRREGULAR_PLURALS.items()}
_VOWELS = "aeiouy"
_SEPARATOR = r"[\s\-_]+"  # between words of a name: any run of whitespace, hyphens or underscores
_POSSESSIVE = r"(?:'s|s')?"
_WORD = re.compile(r"\w+")


class TextSelectionError(AudioScribeError, ValueError):
    """The class names, captions or options of a text selection are unusable."""


# --------------------------------------------------------------------------------------------------------------------
# class-name patterns


def _has_vowel(word: str) -> bool:
    return any(ch in _VOWELS for ch in word)


def _syllables(word: str) -> int:
    return len(re.findall(f"[{_VOWELS}]+", word))


def _is_short_cvc(word: str) -> bool:
    """One syllable ending consonant-vowel-consonant (not w/x/y): the final consonant doubles (tap -> tapping)."""
    return (len(word) >= 3 and word[-1] not in _VOWELS + "wx" and word[-2] in "aeiou"
            and word[-3] not in "aeiou" and _syllables(word) == 1)


def _plural_forms(word: str) -> set[str]:
    """Noun plurals (and 3rd-person verb forms): dog->dogs, glass->glasses, baby->babies, knife->knives."""
    forms = set()
    if word in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[word])
    if re.search(r"(s|x|z|ch|sh)$", word):
        forms.add(word + "es")
    elif re.search(f"[^{_VOWELS}]y$", word):
        forms.add(word[:-1] + "ies")
    else:
        forms.add(word + "s")
        if word.endswith("o"):
            forms.add(word + "es")
        if word.endswith("fe"):
            forms.add(word[:-2] + "ves")
        elif word.endswith("f"):
            forms.add(word[:-1] + "ves")
    return forms


def _verb_forms(word: str) -> set[str]:
    """-ing and -ed forms: bark->barking/barked, sneeze->sneezing/sneezed, clap->clapping/clapped, cry->cried."""
    if word.endswith("e") and not word.endswith("ee") and len(word) > 2:
        return {word[:-1] + "ing", word + "d"}
    if re.search(f"[^{_VOWELS}]y$", word):
        return {word + "ing", word[:-1] + "ied"}
    if _is_short_cvc(word):
        return {word + word[-1] + "ing", word + word[-1] + "ed"}
    forms = {word + "ing", word + "ed"}
    if re.search(f"[^{_VOWELS}][aeiou][^{_VOWELS}wx]$", word):  # longer CVC endings double only when stressed
        forms |= {word + word[-1] + "ing", word + word[-1] + "ed"}
    return forms


def _base_forms(word: str) -> set[str]:
    """Candidate uninflected forms of a word given inflected (crickets->cricket, sneezing->sneeze/sneez)."""
    bases = set()
    if word in _IRREGULAR_SINGULARS:
        bases.add(_IRREGULAR_SINGULARS[word])

    def stems(stem: str) -> set[str]:  # after removing -ing/-ed: undo consonant doubling or restore a dropped e
        if len(stem) < 3 or not _has_vowel(stem):
            return set()
        if stem[-1] == stem[-2] and stem[-1] not in _VOWELS:
            return {stem, stem[:-1]}  # yelling -> yell, clapping -> clap
        return {stem, stem + "e"}  # barking -> bark, sneezing -> sneeze

    if len(word) >= 5 and word.endswith("ing"):
        bases |= stems(word[:-3])
    elif len(word) >= 5 and word.endswith("ied"):
        bases.add(word[:-3] + "y")
    elif len(word) >= 5 and word.endswith("ed"):
        bases |= stems(word[:-2])
    elif len(word) >= 5 and word.endswith("ies"):
        bases.add(word[:-3] + "y")
    elif len(word) >= 4 and word.endswith("ves"):
        bases |= {word[:-3] + "f", word[:-3] + "fe", word[:-1]}
    elif len(word) >= 4 and re.search(r"(s|x|z|ch|sh)es$", word):
        bases.add(word[:-2])
    elif len(word) >= 4 and word.endswith("s") and not re.search(r"(ss|us|is)$", word):
        bases.add(word[:-1])
    return {b for b in bases if _has_vowel(b)}


def word_forms(word: str) -> list[str]:
    """The spellings the last word of a class name matches: the word, its base forms and their inflections."""
    word = word.lower()
    bases = _base_forms(word) or {word}
    forms = set(bases)
    for base in bases:
        forms |= _plural_forms(base) | _verb_forms(base)
    forms -= EXCLUDED_FORMS
    forms.add(word)
    return sorted(forms, key=lambda f: (-len(f), f))


def _noun_forms(word: str) -> list[str]:
    """Spellings of a non-final word of a name: as written or plural (dogs barking), possessive added in the regex."""
    word = word.lower()
    return sorted({word} | _plural_forms(word), key=lambda f: (-len(f), f))


def name_alternatives(name: str) -> list[list[str]]:
    """The word lists a class name stands for: commas separate alternatives, parenthesised qualifiers are dropped."""
    if not isinstance(name, str):
        raise TextSelectionError(f"Class names must be strings, got {type(name).__name__}")
    text = re.sub(r"\([^)]*\)", " ", name.lower())
    alternatives = []
    for part in text.split(","):
        words = [w for w in re.split(r"[\s\-_]+", part) if re.search(r"\w", w)]
        words = [w.strip(".;:!?\"'") for w in words]
        words = [w for w in words if w]
        if words and words not in alternatives:
            alternatives.append(words)
    if not alternatives:
        raise TextSelectionError(f"Class name {name!r} has no words to match")
    return alternatives


def _alternation(forms: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(f) for f in forms) + ")"


@lru_cache(maxsize=1024)
def class_name_pattern(name: str) -> re.Pattern:
    """A case-insensitive regex that finds ``name`` (or a simple inflection of it) as whole words in a caption.

    See the module docstring for the rules; e.g. "dog" matches "dogs barking" but not "hotdog"; "cat" matches
    "two cats" but not "location"; "car horn" matches "car-horn", "car horns" and "carhorn".
    """
    pieces = []
    for words in name_alternatives(name):
        last = _alternation(word_forms(words[-1]))
        if len(words) == 1:
            pieces.append(last)
            continue
        spaced = "".join(_alternation(_noun_forms(w)) + _POSSESSIVE + _SEPARATOR for w in words[:-1])
        joined = "".join(re.escape(w) for w in words[:-1])
        pieces.append(spaced + last)
        pieces.append(joined + last)
    return re.compile(r"(?<!\w)(?:" + "|".join(pieces) + r")(?!\w)", re.IGNORECASE)


def matching_classes(text: str, patterns: Sequence[re.Pattern]) -> list[int]:
    """Indices of the patterns that occur in ``text``."""
    return [i for i, pattern in enumerate(patterns) if pattern.search(text)]


def _anchors(name: str) -> set[str]:
    """Lower-case prefixes one of which starts the first word of any match of ``name``'s pattern."""
    anchors = set()
    for words in name_alternatives(name):
        spellings = word_forms(words[0]) if len(words) == 1 else _noun_forms(words[0])  # joined ones start so too
        anchors |= {m.group() for m in map(_WORD.match, spellings) if m}
        if any(not _WORD.match(s) for s in spellings):
            anchors.add("")  # a spelling that starts with punctuation: every text is a candidate
    return anchors


def _match_corpus(names: Sequence[str], texts: list[str]) -> list[list[int]]:
    """Per class name, the sorted indices of the texts its pattern occurs in.

    A match starts a word, so a text can only match when one of its lower-cased words starts with one of the
    name's anchors: an index from word to texts narrows the candidates, and the pattern confirms each one.
    """
    rows_of: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        for word in set(_WORD.findall(text.lower())):
            rows_of.setdefault(word, []).append(i)
    vocabulary = sorted(rows_of)
    found = []
    for name in names:
        candidates: set[int] = set()
        for anchor in _anchors(name):
            j = bisect.bisect_left(vocabulary, anchor)
            while j < len(vocabulary) and vocabulary[j].startswith(anchor):
                candidates.update(rows_of[vocabulary[j]])
                j += 1
        pattern = class_name_pattern(name)
        found.append([i for i in sorted(candidates) if pattern.search(texts[i])])
    return found


# --------------------------------------------------------------------------------------------------------------------
# selection


@dataclass
class ClassReport:
    """How one class's texts were found."""

    name: str
    matched: int  # captions chosen because they mention the class (after the max_per_class cap)
    topped_up: int  # captions chosen by CLAP similarity because too few mention the class
    described: int  # the user's descriptions
    total: int  # matched + topped_up + described
    examples: list[str] = field(default_factory=list)  # the first three of the class's texts
    available: int = 0  # captions in the corpus that mention the class (before the cap)
    labelled: int = 0  # texts labelled with the class; more than total when captions chosen for other classes
    #                    also mention it


@dataclass
class TextSelection:
    """Texts standing in for audio, with multi-hot labels, a single-label view and where each text came from."""

    texts: list[str]
    labels: np.ndarray  # [N, C] float32 multi-hot
    single_label: np.ndarray  # [N] int64: the class of a text labelled with exactly one class, else -1
    sources: list[str]  # per text: "match" | "nearest" | "description"
    report: list[ClassReport]
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def format_report(self, example_width: int = 60) -> str:
        """A small text table: one row per class with its counts and first example."""
        header = ("class", "found", "matched", "nearest", "described", "total", "labelled", "example")
        rows = []
        for r in self.report:
            example = r.examples[0] if r.examples else ""
            if len(example) > example_width:
                example = example[:example_width - 3] + "..."
            rows.append((r.name, str(r.available), str(r.matched), str(r.topped_up), str(r.described), str(r.total),
                         str(r.labelled), example))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths))
        multi = int((self.labels.sum(axis=1) > 1).sum()) if len(self.texts) else 0
        lines.append(f"{len(self.texts)} texts, {multi} with several classes (single-label view keeps "
                     f"{int((self.single_label >= 0).sum())})")
        return "\n".join(lines)


def _normalize(text: str) -> str:
    return " ".join(text.split())


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Names as a list; ValueError (TextSelectionError) on none, empty or case-insensitive duplicates."""
    if isinstance(class_names, str):
        raise TextSelectionError("class_names must be a list of names, not a single string")
    names = list(class_names)
    if not names:
        raise TextSelectionError("No class names given: name at least one class")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise TextSelectionError(f"Class names must be non-empty strings, got {name!r}")
        key = _normalize(name).lower()
        if key in seen:
            raise TextSelectionError(f"Duplicate class name {name!r} (same as {seen[key]!r} ignoring case)")
        seen[key] = name
    return names


def select_texts(class_names: Sequence[str], captions, *, clap=None, caption_embeddings=None,
                 min_per_class: int = 16, max_per_class: int | None = 128,
                 descriptions: Mapping[str, Sequence[str]] | None = None,
                 templates: Sequence[str] = ("This is a sound of {}.",), seed: int = 0) -> TextSelection:
    """Training texts for prompt tuning on ``class_names``, chosen from ``captions``.

    ``captions`` is a list of strings or a :class:`~engine.datastore.CaptionDatastore` (its captions and
    embeddings are used). Per class, in class order:

    1. captions that match :func:`class_name_pattern` (whitespace-normalised, exact duplicates dropped, corpus
       order); when more than ``max_per_class`` match, a sample seeded by ``seed`` and the class index, kept in
       corpus order (``None``: no cap);
    2. when matches plus descriptions are fewer than ``min_per_class``, the captions nearest to the class prompt:
       each template is filled with the name, embedded with ``clap.embed_text``, averaged and renormalised, and
       compared by cosine with ``caption_embeddings`` ([len(captions), D] unit-norm, row i = captions[i]; embedded
       here, only for the candidates, when not given). Candidates are captions not yet chosen for any class that
       match no class pattern: a caption that mentions another class but not this one would get a contradictory
       label, and a caption that mentions this class was already taken in step 1;
    3. the user's ``descriptions[name]``, always included.

    Labels are multi-hot: every text is labelled with each class whose pattern it matches (so a caption chosen for
    "dog" that also mentions a cat is labelled dog and cat); a topped-up caption is labelled with the class it was
    chosen for; a description with its class plus any class it mentions. ``single_label`` is the class of texts
    with exactly one label, -1 for the others (multi-label texts are for the multi-label training mode).
    Texts are ordered: matched captions in corpus order, then topped-up captions by class and similarity, then
    descriptions. A text that occurs twice (a description equal to a chosen caption) is kept once with both labels.
    """
    names = check_class_names(class_names)
    if min_per_class < 0:
        raise TextSelectionError(f"min_per_class must be >= 0, got {min_per_class}")
    if max_per_class is not None and max_per_class < max(min_per_class, 1):
        raise TextSelectionError(f"max_per_class ({max_per_class}) must be at least min_per_class "
                                 f"({min_per_class}) and at least 1")
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise TextSelectionError("templates must be a non-empty list of strings with a '{}' for the class name")
    if hasattr(captions, "captions") and hasattr(captions, "embeddings"):  # a CaptionDatastore
        if caption_embeddings is None:
            caption_embeddings = captions.embeddings
        captions = captions.captions
    if isinstance(captions, str):
        raise TextSelectionError("captions must be a list of strings, not a single string")
    captions = list(captions)
    if caption_embeddings is not None:
        caption_embeddings = np.asarray(caption_embeddings.detach().cpu() if hasattr(caption_embeddings, "detach")
                                        else caption_embeddings, dtype=np.float32)
        if caption_embeddings.ndim != 2 or len(caption_embeddings) != len(captions):
            raise TextSelectionError(f"caption_embeddings must be [len(captions)={len(captions)}, D], got "
                                     f"{list(caption_embeddings.shape)}")
    described = _check_descriptions(descriptions, names)

    # unique, non-empty captions; `rows` maps each back to its row in captions / caption_embeddings
    unique: list[str] = []
    rows: list[int] = []
    seen: set[str] = set()
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            continue
        text = _normalize(caption)
        if text and text not in seen:
            seen.add(text)
            unique.append(text)
            rows.append(row)

    patterns = [class_name_pattern(name) for name in names]
    num_classes = len(names)
    matches = _match_corpus(names, unique)  # per class: unique-caption indices, corpus order
    mentions: list[list[int]] = [[] for _ in unique]  # per unique caption: the classes it mentions
    for c, found in enumerate(matches):
        for i in found:
            mentions[i].append(c)

    chosen_match: list[list[int]] = []
    for c, found in enumerate(matches):
        if max_per_class is not None and len(found) > max_per_class:
            rng = np.random.default_rng([seed, c])
            keep = np.sort(rng.choice(len(found), size=max_per_class, replace=False))
            found = [found[k] for k in keep]
        chosen_match.append(found)

    # top up
    chosen: set[int] = {i for found in chosen_match for i in found}
    topped: list[list[int]] = [[] for _ in names]
    short = [c for c in range(num_classes) if len(chosen_match[c]) + len(described[c]) < min_per_class]
    if short:
        if clap is None:
            lines = ", ".join(f"{names[c]!r} ({len(chosen_match[c]) + len(described[c])})" for c in short[:8])
            raise TextSelectionError(
                f"{len(short)} class(es) have fewer than min_per_class={min_per_class} matching captions and "
                f"descriptions: {lines}{' ...' if len(short) > 8 else ''}. Topping them up with the nearest "
                "captions needs a CLAP model (pass clap=...); or add descriptions, or set min_per_class=0")
        candidates = [i for i, classes in enumerate(mentions) if not classes]
        candidate_embeddings = _candidate_embeddings(clap, unique, rows, candidates, caption_embeddings)
        prompts = _class_prompt_embeddings(clap, [names[c] for c in short], templates)
        if len(candidates) and prompts.shape[1] != candidate_embeddings.shape[1]:
            raise TextSelectionError(f"caption_embeddings are {candidate_embeddings.shape[1]}-d but "
                                     f"{getattr(clap, 'name', 'the CLAP')} embeds {prompts.shape[1]}-d: they must "
                                     "come from the same CLAP")
        available = np.ones(len(candidates), dtype=bool)
        for prompt, c in zip(prompts, short):
            need = min_per_class - len(chosen_match[c]) - len(described[c])
            if not len(candidates):
                break
            scores = candidate_embeddings @ prompt
            order = np.argsort(-scores, kind="stable")
            picked = [k for k in order if available[k]][:need]
            available[picked] = False
            topped[c] = [candidates[k] for k in picked]
            chosen.update(topped[c])

    # assemble: matched captions in corpus order, then topped-up, then descriptions
    texts: list[str] = []
    label_sets: list[set[int]] = []
    sources: list[str] = []
    position: dict[str, int] = {}

    def add(text: str, classes: set[int], source: str) -> None:
        if text in position:
            label_sets[position[text]] |= classes
            return
        position[text] = len(texts)
        texts.append(text)
        label_sets.append(set(classes))
        sources.append(source)

    for i in sorted({i for found in chosen_match for i in found}):
        add(unique[i], set(mentions[i]), "match")
    for c in range(num_classes):
        for i in topped[c]:
            add(unique[i], {c}, "nearest")
    for c in range(num_classes):
        for text in described[c]:
            add(text, {c} | set(matching_classes(text, patterns)), "description")

    labels = np.zeros((len(texts), num_classes), dtype=np.float32)
    for row, classes in enumerate(label_sets):
        labels[row, sorted(classes)] = 1.0
    counts = labels.sum(axis=1)
    single = np.where(counts == 1, labels.argmax(axis=1), -1).astype(np.int64)

    report = []
    for c, name in enumerate(names):
        own = [unique[i] for i in chosen_match[c]] + [unique[i] for i in topped[c]] + described[c]
        report.append(ClassReport(name=name, matched=len(chosen_match[c]), topped_up=len(topped[c]),
                                  described=len(described[c]),
                                  total=len(chosen_match[c]) + len(topped[c]) + len(described[c]),
                                  examples=own[:3], available=len(matches[c]), labelled=int(labels[:, c].sum())))
    return TextSelection(texts=texts, labels=labels, single_label=single, sources=sources, report=report,
                         class_names=names)


def _check_descriptions(descriptions: Mapping[str, Sequence[str]] | None, names: list[str]) -> list[list[str]]:
    """Per class (in class order): its descriptions, whitespace-normalised, empty ones and repeats dropped."""
    per_class: list[list[str]] = [[] for _ in names]
    if not descriptions:
        return per_class
    index = {_normalize(n).lower(): c for c, n in enumerate(names)}
    for key, texts in descriptions.items():
        c = index.get(_normalize(str(key)).lower())
        if c is None:
            raise TextSelectionError(f"Descriptions given for {key!r}, which is not one of the classes "
                                     f"({', '.join(names)})")
        if isinstance(texts, str):
            texts = [texts]
        for text in texts:
            text = _normalize(str(text))
            if text and text not in per_class[c]:
                per_class[c].append(text)
    return per_class


def _candidate_embeddings(clap, unique: list[str], rows: list[int], candidates: list[int],
                          caption_embeddings: np.ndarray | None) -> np.ndarray:
    if caption_embeddings is not None:
        return caption_embeddings[[rows[i] for i in candidates]]
    if not candidates:
        return np.zeros((0, clap.embedding_dim), dtype=np.float32)
    from engine.datastore import embed_captions  # heavy imports (faiss) only when captions must be embedded
    return embed_captions(clap, [unique[i] for i in candidates])


def _class_prompt_embeddings(clap, names: list[str], templates: list[str]) -> np.ndarray:
    """[len(names), D]: per class, the mean of its template embeddings, renormalised."""
    texts = [t.format(name) for name in names for t in templates]
    embedded = np.asarray(clap.embed_text(texts), dtype=np.float32).reshape(len(names), len(templates), -1)
    mean = embedded.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------------------------
# labelled caption files

# Class lists of the AFPT text corpora (shared/data/afpt/README.md; Ming-er/Audio-Free-P-Tuning src/*_dataset.py).
AFPT_CLASS_NAMES: dict[str, list[str]] = {
    # ESC-50 categories, alphabetical (cap_esc.csv: class index 0-49)
    "esc50": [
        "airplane", "breathing", "brushing teeth", "can opening", "car horn", "cat", "chainsaw", "chirping birds",
        "church bells", "clapping", "clock alarm", "clock tick", "coughing", "cow", "crackling fire", "crickets",
        "crow", "crying baby", "dog", "door wood creaks", "door wood knock", "drinking sipping", "engine",
        "fireworks", "footsteps", "frog", "glass breaking", "hand saw", "helicopter", "hen", "insects",
        "keyboard typing", "laughing", "mouse click", "pig", "pouring water", "rain", "rooster", "sea waves",
        "sheep", "siren", "sneezing", "snoring", "thunderstorm", "toilet flush", "train", "vacuum cleaner",
        "washing machine", "water drops", "wind",
    ],
    # UrbanSound8K (cap_urbansound8k.csv: 0-9)
    "urbansound8k": [
        "air conditioner", "car horn", "children playing", "dog bark", "drilling", "engine idling", "gun shot",
        "jackhammer", "siren", "street music",
    ],
    # DCASE2019 task 4 (cap_dcase19.csv: lists of 0-9)
    "dcase2019": [
        "alarm bell ringing", "blender", "cat", "dishes", "dog", "electric shaver toothbrush", "frying",
        "running water", "speech", "vacuum cleaner",
    ],
    # FSDKaggle2019's 80 labels (vocabulary.csv) in alphabetical order, written as AFPT writes them: lower case,
    # "_and_" -> ", ", "_" -> " " (FSD19_Text.classes in AFPT's src/.ipynb_checkpoints/fsd19_dataset-checkpoint.py;
    # the same 80 labels as the Kaggle "Freesound Audio Tagging 2019" vocabulary). cap_fsd19.csv: lists of 0-79.
    "fsdkaggle2019": [
        "accelerating, revving, vroom", "accordion", "acoustic guitar", "applause", "bark", "bass drum",
        "bass guitar", "bathtub (filling or washing)", "bicycle bell", "burping, eructation", "bus", "buzz",
        "car passing by", "cheering", "chewing, mastication", "child speech, kid speaking", "chink, clink",
        "chirp, tweet", "church bell", "clapping", "computer keyboard", "crackle", "cricket", "crowd",
        "cupboard open or close", "cutlery, silverware", "dishes, pots, pans", "drawer open or close", "drip",
        "electric guitar", "fart", "female singing", "female speech, woman speaking", "fill (with liquid)",
        "finger snapping", "frying (food)", "gasp", "glockenspiel", "gong", "gurgling", "harmonica", "hi-hat",
        "hiss", "keys jangling", "knock", "male singing", "male speech, man speaking", "marimba, xylophone",
        "mechanical fan", "meow", "microwave oven", "motorcycle", "printer", "purr", "race car, auto racing",
        "raindrop", "run", "scissors", "screaming", "shatter", "sigh", "sink (filling or washing)", "skateboard",
        "slam", "sneeze", "squeak", "stream", "strum", "tap", "tick-tock", "toilet flush",
        "traffic noise, roadway noise", "trickle, dribble", "walk, footsteps", "water tap, faucet", "waves, surf",
        "whispering", "writing", "yell", "zipper (clothing)",
    ],
}

_CAPTION_COLUMNS = ("caption", "captions", "text")


def load_labelled_captions(path: str | os.PathLike, class_names: Sequence[str] | str | None = None
                           ) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, [N, C] float32 multi-hot labels, class names) from a labelled caption CSV/TSV.

    Two layouts:

    - AFPT corpora (``caption``, ``class``): ``class`` is an int or a list of ints such as ``"[17, 22]"``, indices
      into a class list that the file does not hold: pass ``class_names`` (a list, or a key of
      :data:`AFPT_CLASS_NAMES`: "esc50", "urbansound8k", "dcase2019", "fsdkaggle2019").
    - The user format (``caption`` or ``text``, plus ``label`` or ``labels``): class names, ``;``-separated for
      several. Names are matched to ``class_names`` ignoring case and spacing; without ``class_names`` the classes
      are the labels in order of first appearance.

    Rows with an empty caption are skipped; rows are otherwise kept as in the file (no deduplication).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TextSelectionError(f"Labelled caption file {path} does not exist")
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TextSelectionError(f"Could not read {path.name} as a CSV: {e}") from e
    columns = {c.strip().lower(): c for c in table.columns}
    caption_column = next((columns[c] for c in _CAPTION_COLUMNS if c in columns), None)
    if caption_column is None:
        raise TextSelectionError(f"{path.name} has no caption column (one of {', '.join(_CAPTION_COLUMNS)}); "
                                 f"columns: {', '.join(map(str, table.columns))}")
    if isinstance(class_names, str):
        key = class_names.lower().replace("-", "").replace("_", "")
        if key not in AFPT_CLASS_NAMES:
            raise TextSelectionError(f"Unknown class list {class_names!r}: use one of {', '.join(AFPT_CLASS_NAMES)}"
                                     " or pass the names")
        class_names = AFPT_CLASS_NAMES[key]
    names = check_class_names(class_names) if class_names is not None else None

    texts: list[str] = []
    rows: list[list[int]] = []
    if "class" in columns:
        if names is None:
            raise TextSelectionError(
                f"{path.name} labels captions with class indices; pass class_names (a list, or one of "
                f"{', '.join(repr(k) for k in AFPT_CLASS_NAMES)} for the AFPT corpora)")
        for line, (caption, value) in enumerate(zip(table[caption_column], table[columns["class"]]), 2):
            caption = _normalize(caption)
            if not caption:
                continue
            indices = _parse_indices(value, path.name, line)
            bad = [i for i in indices if not 0 <= i < len(names)]
            if bad:
                raise TextSelectionError(f"{path.name}:{line} has class index {bad[0]}, outside the "
                                         f"{len(names)} class names given")
            texts.append(caption)
            rows.append(indices)
    else:
        label_column = next((columns[c] for c in ("label", "labels") if c in columns), None)
        if label_column is None:
            raise TextSelectionError(f"{path.name} has no label column: add 'label' (class names, ';' between "
                                     "several) or use the AFPT layout ('class' indices)")
        order: list[str] = list(names) if names is not None else []
        index = {_normalize(n).lower(): i for i, n in enumerate(order)}
        for line, (caption, value) in enumerate(zip(table[caption_column], table[label_column]), 2):
            caption = _normalize(caption)
            if not caption:
                continue
            labels = [_normalize(v) for v in str(value).split(";") if _normalize(v)]
            if not labels:
                raise TextSelectionError(f"{path.name}:{line} has a caption but no label")
            indices = []
            for label in labels:
                key = label.lower()
                if key not in index:
                    if names is not None:
                        raise TextSelectionError(f"{path.name}:{line} has label {label!r}, which is not one of the "
                                                 f"class names given")
                    index[key] = len(order)
                    order.append(label)
                indices.append(index[key])
            texts.append(caption)
            rows.append(indices)
        names = order
    if not texts:
        raise TextSelectionError(f"{path.name} holds no labelled captions")
    labels = np.zeros((len(texts), len(names)), dtype=np.float32)
    for row, indices in enumerate(rows):
        labels[row, indices] = 1.0
    return texts, labels, list(names)


def _parse_indices(value: str, file_name: str, line: int) -> list[int]:
    value = str(value).strip()
    try:
        parsed = ast.literal_eval(value) if value else None
    except (ValueError, SyntaxError):
        parsed = None
    if isinstance(parsed, bool) or parsed is None:
        raise TextSelectionError(f"{file_name}:{line}: class {value!r} is not an index or a list of indices")
    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TextSelectionError(f"{file_name}:{line}: class {value!r} is not an index or a list of indices")
    return sorted(set(items))
