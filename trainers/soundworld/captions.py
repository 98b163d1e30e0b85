"""Captions in two styles, generated from what was rendered (classes, attributes, order, background).

Style A is short and AudioCaps-like ("A siren blares while rain falls"); it keeps to each class's core nouns and
verbs so that a caption decoder can learn it. Style B is longer and Clotho-like and draws on the whole phrase bank,
scene details and remarks about loudness, distance and background, which is where paraphrase diversity for the text
tower comes from. Attribute words are only used for attribute values the event really has, and "followed by"
templates name the events in the order they sound (or say "after" when they reverse it).
"""
from __future__ import annotations

import re

import numpy as np

from .classes import BY_LABEL, DEFAULT_WORDS, SourceClass, Words, content_stems, forbidden_stems, stem

N_CAPTIONS = 5
_DOUBLE = re.compile(r"^[^aeiou]*[aeiou][^aeiouwxy]$")
_FREE = ("in ", "at ", "from ", "on ", "close ", "far ", "right ", "up ", "nearby")  # adverbials usable after a noun


# --------------------------------------------------------------------------------------------------------------------
# morphology


def inflect(spec: str) -> tuple[str, str, str]:
    """(3rd-person singular, plural, -ing form) of a verb phrase; 'base|sg|ing' overrides irregular cases."""
    if "|" in spec:
        base, sg, ing = spec.split("|")
        return sg, base, ing
    words = spec.split()
    if words[0] == "be":
        rest = " ".join(words[1:])
        return f"is {rest}", f"are {rest}", f"being {rest}"
    if words[0] == "keep" and len(words) > 1:
        return f"keeps {' '.join(words[1:])}", spec, " ".join(words[1:])
    if len(words) == 3 and words[1] == "and":
        sg1, _, ing1 = inflect(words[0])
        sg2, _, ing2 = inflect(words[2])
        return f"{sg1} and {sg2}", spec, f"{ing1} and {ing2}"
    head, rest = words[0], (" " + " ".join(words[1:])) if len(words) > 1 else ""
    return _third(head) + rest, spec, _gerund(head) + rest


def _third(verb: str) -> str:
    if verb == "have":
        return "has"
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _gerund(verb: str) -> str:
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "oe", "ye")) and len(verb) > 2:
        return verb[:-1] + "ing"
    if len(verb) <= 4 and _DOUBLE.match(verb):
        return verb + verb[-1] + "ing"
    return verb + "ing"


def _with_adjectives(noun: str, adjs: list[str]) -> str:
    """Insert adjectives after the article, fixing a/an: ('a siren', ['old']) -> 'an old siren'."""
    if not adjs:
        return noun
    words = noun.split(" ", 1)
    adj = " ".join(adjs)
    if words[0] in ("a", "an") and len(words) == 2:
        return f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {words[1]}"
    if words[0] == "the" and len(words) == 2:
        return f"the {adj} {words[1]}"
    return f"{adj} {noun}"


def _join_adverbials(advs: list[str]) -> str:
    """Adverbials after the verb; runs of '-ly' adverbs are coordinated later by _tidy."""
    return "".join(" " + adv for adv in advs)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------------------------------------------------
# one event as text


def _words(cls: SourceClass, attr: str, value: str) -> Words:
    return cls.words.get((attr, value), DEFAULT_WORDS[(attr, value)])


def describe(rng: np.random.Generator, event: dict, style: str, n_events: int = 1) -> dict[str, str]:
    """Forms of one event: S (clause), P (progressive clause), G (gerund phrase), N (noun phrase), D (detail).

    Style A mentions up to two attributes of a single event and at most one per event in mixtures, which keeps it
    short like AudioCaps; style B mentions most of them.
    """
    cls = BY_LABEL[event["label"]]
    core = style == "A"
    group = cls.groups[0] if core and rng.random() < 0.8 else cls.groups[int(rng.integers(len(cls.groups)))]
    subjects = group.subjects[:2] if core else group.subjects
    verbs = group.verbs[:3] if core else group.verbs
    subject = subjects[int(rng.integers(len(subjects)))]
    plural = subject.endswith("+")
    subject = subject.rstrip("+")
    clash = {stem(w) for w in re.findall(r"[a-z]+", subject)}  # no "a notification sound sounds"
    verbs = [v for v in verbs if stem(v.split()[0]) not in clash] or verbs
    verb = verbs[int(rng.integers(len(verbs)))]
    sg, pl, ing = inflect(verb)
    adjs, advs, free = [], [], True
    mention_p = (0.45 if n_events == 1 else 0.3) if core else 0.85
    limit = (2 if n_events == 1 else 1) if core else 4
    for attr in ("loudness", "distance", "speed", "pitch"):
        value = event["attributes"].get(attr)
        if value is None or rng.random() > mention_p or len(adjs) + len(advs) >= limit:
            continue
        words = _words(cls, attr, value)
        if group.adj_ok and words.adj and len(adjs) < 2 and (not words.adv or rng.random() < 0.55):
            adjs.append(words.adj[int(rng.integers(len(words.adj)))])
        elif words.adv:
            adv = words.adv[int(rng.integers(len(words.adv)))]
            advs.append(adv)
            free = free and adv.startswith(_FREE)
    head = _with_adjectives(subject, adjs)
    tail = _join_adverbials(advs)
    forms = {"S": f"{head} {pl if plural else sg}{tail}", "G": f"{head} {ing}{tail}",
             "P": f"{head} {'are' if plural else 'is'} {ing}{tail}"}
    nominals = cls.nominals[:2] if core else cls.nominals
    nominal = nominals[int(rng.integers(len(nominals)))]
    use_nominal = free and (group.adj_ok or not adjs) and rng.random() < 0.5
    forms["N"] = (_with_adjectives(nominal, adjs if group.adj_ok else []) + tail) if use_nominal else forms["G"]
    detail = cls.details[int(rng.integers(len(cls.details)))] if cls.details and rng.random() < 0.6 else ""
    forms["D"] = f" {detail}" if detail and detail not in forms["S"] else ""  # never 'ticks steadily ... steadily'
    return forms


# --------------------------------------------------------------------------------------------------------------------
# templates: {S1} clause, {P1} progressive clause, {G1} gerund phrase, {N1} noun phrase, {D1} detail, {BG} background

A_TEMPLATES = {
    (1, None): ["{S1}", "{S1}", "{G1}", "{S1}", "{N1}"],
    (2, "while"): ["{S1} while {S2}", "{S1} as {S2}", "{S1} and {S2}", "{G1} while {S2}", "{S2} while {S1}",
                   "{G1} and {G2}", "{S1} with {N2} in the background|bg2"],
    (2, "followed by"): ["{S1} followed by {G2}", "{S1} followed by {N2}", "{S1}, then {S2}", "{S1} and then {S2}",
                         "{S1} before {S2}", "{G1} followed by {G2}", "{S2} after {S1}"],
    (3, "while"): ["{S1} while {S2} and {S3}", "{S1} and {S2} as {S3}", "{G1}, {G2} and {G3}",
                   "{S1} as {S2} and {S3}"],
    (3, "followed by"): ["{S1}, then {S2}, followed by {N3}", "{S1}, {S2}, and then {S3}",
                         "{S1} followed by {G2} and then {G3}", "{G1} followed by {G2}, then {G3}"],
}
B_TEMPLATES = {
    (1, None): ["{S1}{D1}{BG}.", "{P1}{D1}{BG}.", "In this recording, {S1}{D1}{BG}.", "One can hear {N1}{D1}{BG}.",
                "The recording captures {N1}{D1}{BG}.", "Throughout the clip, {P1}{D1}{BG}.",
                "The sound of {N1} can be heard{D1} from start to finish{BG}.", "We hear {N1}{D1}{BG}.",
                "This is a recording of {N1}{D1}{BG}.", "The clip is filled with {N1}{D1}{BG}.",
                "For the whole recording, {S1}{D1}{BG}.", "{N1} can be heard{D1}{BG}."],
    (2, "while"): ["{P1}{D1} while {S2}{D2}{BG}.", "While {S2}{D2}, {P1}{BG}.", "{S1}{D1}, and at the same time {S2}.",
                   "{P1}{D1}; meanwhile, {S2}{D2}{BG}.", "The sound of {N1} can be heard{D1}, along with {N2}{BG}.",
                   "{S1}{D1}, while in the background {S2}{BG}.|bg2", "As {S1}{D1}, {P2}{D2}{BG}.",
                   "{N1} and {N2} can be heard at the same time{BG}.", "We hear {N1}{D1} while {S2}{BG}.",
                   "{P1}{D1}, and for part of the time {S2}{D2}.|part2",
                   "Over the sound of {N1}, {S2}{D2}{BG}."],
    (2, "followed by"): ["First {S1}{D1}, and then {S2}{D2}{BG}.", "At the beginning {P1}{D1}; after that, {S2}{BG}.",
                         "{S1}{D1}. A moment later, {S2}{D2}.", "{S1}{D1} before {S2}{BG}.",
                         "{S1}{D1}, and once it stops, {S2}{D2}.", "After {S1}{D1}, {S2}{BG}.",
                         "{S2}{D2} after {S1}.", "The clip starts with {N1}{D1}, followed by {N2}{BG}.",
                         "{N1} comes first{D1}; then {S2}{D2}{BG}.", "At first {S1}; when it ends, {S2}{D2}{BG}."],
    (3, "while"): ["{P1}{D1} while {S2} and {S3}{BG}.", "At the same time {S1}, {S2}{D2} and {S3}{D3}.",
                   "{S1}{D1}; meanwhile {S2}, and {S3}{D3}{BG}.", "One can hear {N1}{D1}, {N2} and {N3} together.",
                   "While {S1}{D1}, {S2} and {S3}{BG}.", "{N1}, {N2} and {N3} all sound at once{BG}."],
    (3, "followed by"): ["First {S1}{D1}, then {S2}{D2}, and finally {S3}{D3}.",
                         "{S1}{D1}. After that {S2}, and at the end {S3}{D3}{BG}.",
                         "At the start {P1}{D1}; later {S2}, followed by {N3}.",
                         "{S1}{D1} before {S2}, and then {S3}{BG}.",
                         "The clip begins with {N1}{D1}, then {N2}, and ends with {N3}{BG}."],
}
BACKGROUND_PHRASES = {  # no attribute words here: "faint" or "distant" would read as a claim about the events
    "room tone": [", with room tone underneath", " against a steady room rumble"],
    "hiss": [", with a hiss in the background", " over a steady hiss"],
    "hum": [", with an electrical hum in the background", " over a mains hum"],
    "distant traffic": [", with traffic in the background", " over the rumble of traffic"],
}
REMARKS = {
    ("distance", "far"): ["The sound is muffled and echoing, as if it came from far away.",
                          "It sounds distant and reverberant."],
    ("distance", "near"): ["It sounds close and clear.", "The source seems to be right next to the listener."],
    ("loudness", "loud"): ["The sound is quite loud.", "It is loud and prominent."],
    ("loudness", "quiet"): ["The sound is faint and easy to miss.", "It is quiet throughout."],
}


def _background_event(events: list[dict], k: int) -> bool:
    """Event k may be called 'in the background' only if it is rendered quieter or farther than the first event."""
    a, b = events[0]["attributes"], events[k]["attributes"]
    quieter = a.get("loudness") == "loud" and b.get("loudness") == "quiet"
    farther = a.get("distance") == "near" and b.get("distance") == "far" and a.get("loudness") != "quiet"
    return quieter or farther


def _one(rng: np.random.Generator, clip: dict, style: str) -> str | None:
    events = clip["events"]
    key = (len(events), clip["relation"])
    pool = (A_TEMPLATES if style == "A" else B_TEMPLATES)[key]
    template = pool[int(rng.integers(len(pool)))]
    template, _, cond = template.partition("|")
    if cond == "bg2" and not _background_event(events, 1):
        return None
    if cond == "part2" and events[1]["end_s"] - events[1]["start_s"] > 0.7 * clip["duration_s"]:
        return None
    slots = {}
    for k, ev in enumerate(events, 1):
        for name, text in describe(rng, ev, style, len(events)).items():
            slots[f"{name}{k}"] = text
    bg = clip.get("background")
    slots["BG"] = ""
    if style == "B" and bg and rng.random() < 0.6:
        phrases = BACKGROUND_PHRASES[bg["kind"]]
        slots["BG"] = phrases[int(rng.integers(len(phrases)))]
    text = _cap(template.format(**slots))
    if style == "B" and len(events) == 1 and rng.random() < 0.35:
        remarks = [r for (attr, value), rs in REMARKS.items() if events[0]["attributes"].get(attr) == value for r in rs]
        if remarks:
            text += " " + remarks[int(rng.integers(len(remarks)))]
    return _tidy(text)


def _tidy(text: str) -> str:
    """Whitespace, and runs of '-ly' adverbs coordinated: 'loudly rapidly steadily' -> 'loudly, rapidly and steadily'."""
    text = re.sub(r"\s+", " ", text).replace(" ,", ",")

    def join(match: re.Match) -> str:
        words = match.group(0).split()
        return ", ".join(words[:-1]) + " and " + words[-1]

    return re.sub(r"\b\w+ly(?: \w+ly\b)+", join, text)


def caption_clip(rng: np.random.Generator, clip: dict, style: str, n: int = N_CAPTIONS) -> list[str]:
    """n distinct captions; none contains a test-prompt word of a class in the clip."""
    forbidden = set().union(*(forbidden_stems(BY_LABEL[e["label"]]) for e in clip["events"]))
    out: list[str] = []
    for _ in range(400):
        text = _one(rng, clip, style)
        if text and text not in out and not (content_stems(text) & forbidden):
            out.append(text)
            if len(out) == n:
                return out
    if len(out) < 3:
        raise RuntimeError(f"could not caption clip {clip.get('id')} in style {style}: {out}")
    return out
