"""Turn one planned event (class + attributes + length) into audio, and mix events into a clip.

Recorded material comes from the in-memory bank (see material.py); procedural classes are synthesised on the fly.
Attributes are rendered here and nowhere else, so what the captions claim is exactly what this module does:
loudness and distance set the level (absolute dBFS, so a quiet clip stays quiet), distance also low-passes and adds
reverb, speed sets event rate / tempo / speaking rate, pitch sets the note register / synthesis frequency / voice.
"""
from __future__ import annotations

import numpy as np

from . import synth
from .classes import BY_LABEL, Material, SourceClass
from .dsp import SR, colored_noise, envelope, fft_convolve, filt, level_db, reverb_ir, set_level
from .material import Bank, INSTRUMENT_RANGES

LEVEL_DB = {"loud": (-19.0, -16.0), "quiet": (-36.0, -32.0), None: (-27.0, -24.0)}
FAR_EXTRA_DB = -6.0
BACKGROUND_DB = (-54.0, -46.0)
BACKGROUND_BELOW_DB = (14.0, 20.0)
PEAK = 0.89  # -1 dBFS: clips are only ever scaled down, to avoid clipping, never up


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _fill(rng: np.random.Generator, snippets: list, n: int, gap: tuple[float, float], xfade: float = 0.0
          ) -> tuple[np.ndarray, list[str]]:
    """Concatenate random snippets (with gaps, or cross-faded when gap is negative) until n samples are filled."""
    out, provs = np.zeros(n, np.float32), []
    pos = int(rng.uniform(0, 0.25) * SR) if gap[1] > 0 else 0
    while pos < n:
        audio, prov, _ = snippets[int(rng.integers(len(snippets)))]
        if not provs and xfade > 0 and audio.size > n:  # long continuous recording: start at a random offset
            off = int(rng.integers(0, audio.size - n + 1))
            audio = audio[off:]
        seg = audio[: n - pos] * envelope(min(audio.size, n - pos), xfade or 0.005, xfade or 0.02)
        out[pos: pos + seg.size] += seg
        provs.append(prov)
        pos += max(audio.size + int(rng.uniform(*gap) * SR), SR // 10)
    return out, provs


def _dedupe(provs: list[str], limit: int = 4) -> str:
    uniq = list(dict.fromkeys(provs))
    more = f" (+{len(uniq) - limit} more)" if len(uniq) > limit else ""
    return "; ".join(uniq[:limit]) + more


def _scale(rng: np.random.Generator, lo: int, hi: int) -> list[int]:
    """A random major or minor pentatonic/diatonic scale, as MIDI notes between lo and hi."""
    root = int(rng.integers(0, 12))
    steps = [[0, 2, 4, 7, 9], [0, 3, 5, 7, 10], [0, 2, 4, 5, 7, 9, 11], [0, 2, 3, 5, 7, 8, 10]][int(rng.integers(4))]
    return [n for n in range(lo, hi + 1) if (n - root) % 12 in steps]


# --------------------------------------------------------------------------------------------------------------------
# per material kind


def _melody(rng, bank: Bank, program: int, n: int, speed, pitch) -> tuple[np.ndarray, str]:
    """A random-walk melody (with occasional chords for piano, guitar, organ) from single rendered notes."""
    notes = bank[f"gm:{program}"]
    by_note: dict[int, list] = {}
    for snip in notes:
        by_note.setdefault(snip[2]["note"], []).append(snip)
    lo, hi = INSTRUMENT_RANGES[program]
    mid = (lo + hi) // 2
    lo, hi = {"low": (lo, mid + 2), "high": (mid - 2, hi)}.get(pitch, (lo + 6, hi - 6))
    scale = [k for k in _scale(rng, lo, hi) if k in by_note] or sorted(by_note)
    step = {"fast": (0.13, 0.2), "slow": (0.45, 0.75)}.get(speed, (0.25, 0.4))
    beat = rng.uniform(*step)
    sustained = program in (40, 73, 56, 19)
    out = np.zeros(n, np.float32)
    idx, t = int(rng.integers(len(scale))), 0.0
    while t < n / SR - 0.05:
        length = beat * (2 if rng.random() < 0.2 else 1)
        chord = [0] + ([2, 4] if program in (0, 24, 19) and rng.random() < 0.25 else [])
        for offset in chord:
            audio = by_note[scale[min(idx + offset, len(scale) - 1)]]
            audio = audio[int(rng.integers(len(audio)))][0]
            keep = min(audio.size, int((length + 0.08 if sustained else 1.6) * SR))
            seg = audio[:keep] * envelope(keep, 0.003, 0.06) * (0.7 if offset else 1.0)
            a = int(t * SR)
            out[a: a + seg.size] += seg[: max(n - a, 0)]
        t += length
        idx = int(np.clip(idx + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), 0, len(scale) - 1))
    return out, f"fluid-soundfont-gm, FluidR3_GM program {program + 1}, melody of rendered notes {lo}-{hi}"


def _drums(rng, bank: Bank, n: int, speed) -> tuple[np.ndarray, str]:
    """A rock/pop groove on a 16th-note grid: kick, snare, hi-hat, with a fill now and then."""
    hits: dict[int, list] = {}
    for snip in bank["gm_drums:0"]:
        hits.setdefault(snip[2]["note"], []).append(snip[0])
    bpm = rng.uniform(140, 175) if speed == "fast" else rng.uniform(70, 95) if speed == "slow" else rng.uniform(100, 125)
    sixteenth = 60.0 / bpm / 4
    out = np.zeros(n, np.float32)
    open_hat = rng.random() < 0.3
    for k in range(int(n / SR / sixteenth) + 1):
        beat_pos, bar = k % 16, k // 16
        play = []
        if beat_pos in (0, 8) or (beat_pos == 10 and rng.random() < 0.4):
            play.append(36)
        if beat_pos in (4, 12):
            play.append(38)
        if beat_pos % 2 == 0:
            play.append(46 if open_hat and beat_pos % 4 == 2 else 42)
        if bar % 4 == 3 and beat_pos >= 12 and rng.random() < 0.7:
            play = [int(rng.choice([45, 48, 50, 38]))]
        if k == 0 and rng.random() < 0.5:
            play.append(49)
        for note in play:
            audio = hits[note][int(rng.integers(len(hits[note])))]
            a = int(k * sixteenth * SR)
            out[a: a + audio.size] += audio[: max(n - a, 0)] * rng.uniform(0.8, 1.0)
    return out, f"fluid-soundfont-gm, FluidR3_GM standard drum kit, groove at {bpm:.0f} bpm"


def _sfx(rng, bank: Bank, program: int, n: int, speed, pitch) -> tuple[np.ndarray, str]:
    """GM sound-effect programs: continuous ones tiled, gunshots placed at the requested rate, birds by pitch."""
    snips = bank[f"gm:{program}"]
    if program == 123 and pitch:  # bird tweet: note decides the register
        snips = [s for s in snips if (s[2]["note"] >= 74) == (pitch == "high")] or snips
    if program == 127:  # gunshot
        interval = {"fast": 0.25, "slow": 1.2}.get(speed, 0.7)
        count = int(rng.integers(3, 7)) if speed == "fast" else int(rng.integers(1, 4))
        out, provs, t = np.zeros(n, np.float32), [], rng.uniform(0.02, 0.2)
        for _ in range(count):
            if t > n / SR - 0.1:
                break
            audio, prov, _ = snips[int(rng.integers(len(snips)))]
            a = int(t * SR)
            out[a: a + audio.size] += audio[: n - a]
            provs.append(prov)
            t += interval * rng.uniform(0.8, 1.2)
        return out, _dedupe(provs)
    out, provs = _fill(rng, snips, n, (-0.25, -0.05), xfade=0.2)
    return out, _dedupe(provs)


def _bells(rng, bank: Bank, n: int) -> tuple[np.ndarray, str]:
    """Tubular bells: one to four strikes."""
    snips = bank["gm:14"]
    out, provs, t = np.zeros(n, np.float32), [], rng.uniform(0.0, 0.15)
    for _ in range(int(rng.integers(1, 5))):
        if t > n / SR - 0.2:
            break
        audio, prov, _ = snips[int(rng.integers(len(snips)))]
        a = int(t * SR)
        out[a: a + audio.size] += audio[: n - a]
        provs.append(prov)
        t += rng.uniform(0.4, 1.2)
    return out, _dedupe(provs)


def _speech(rng, bank: Bank, keys: list[str], n: int) -> tuple[np.ndarray, str]:
    snips = [s for key in keys for s in bank.get(key, [])]
    out, provs = _fill(rng, snips, n, (0.2, 0.7))
    return out, _dedupe(provs)


def _espeak_keys(group: str, speed, pitch) -> list[str]:
    speeds = [speed] if speed else ["fast", "slow", None]
    pitches = [pitch] if pitch else ["high", "low", None]
    return [f"espeak:{group}:{s}:{p}" for s in speeds for p in pitches]


def _crowd(rng, bank: Bank, n: int) -> tuple[np.ndarray, str]:
    """Many voices at once, staggered, in a reverberant room."""
    keys = sorted(k for k in bank if k.startswith(("espeak:female", "espeak:male", "espeak:child", "asterisk:")))
    out = np.zeros(n, np.float32)
    voices = int(rng.integers(6, 11))
    for _ in range(voices):
        voice, _ = _speech(rng, bank, [keys[int(rng.integers(len(keys)))]], n)
        out += voice * rng.uniform(0.3, 1.0)
    out = filt(out, 120, 5000)
    out += 0.5 * fft_convolve(out, reverb_ir(rng, 1.0))
    return out, f"{voices} layered voices from asterisk-core-sounds-en-wav and espeak-ng"


def _theme(rng, bank: Bank, ref: str, n: int, cls: SourceClass) -> tuple[np.ndarray, str]:
    audio, prov, _ = bank[f"theme:{ref}"][0]
    if cls.kind == "short" or audio.size < n:  # repeat a short sound with gaps
        out, provs = _fill(rng, [(audio, prov, {})], n, (0.15, 0.8))
        return out, prov
    # start where the recording is sounding, so that a short crop of a pulsing alarm is never a silent gap
    frame = SR // 20
    rms = np.sqrt(np.mean(audio[: audio.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    starts = np.flatnonzero(rms > rms.max() * 0.1) * frame
    starts = starts[starts <= audio.size - n]
    off = int(starts[int(rng.integers(starts.size))]) if starts.size else 0
    return audio[off: off + n] * envelope(n, 0.02, 0.05), prov


def render_source(rng: np.random.Generator, cls: SourceClass, material: Material, attrs: dict, n: int,
                  bank: Bank | None) -> tuple[np.ndarray, str]:
    """Dry audio (n samples, arbitrary level) and provenance for one event."""
    speed, pitch = attrs.get("speed"), attrs.get("pitch")
    kind, ref = material.kind, material.ref
    if kind == "proc":
        return synth.GENERATORS[ref](rng, n, speed, pitch), f"procedural synthesis: soundworld.synth.{ref}"
    assert bank is not None, f"{cls.label}: {kind} material needs the Debian material bank"
    if kind == "gm":
        program = int(ref)
        if program == 14:
            return _bells(rng, bank, n)
        if program >= 120:
            return _sfx(rng, bank, program, n, speed, pitch)
        return _melody(rng, bank, program, n, speed, pitch)
    if kind == "gm_drums":
        return _drums(rng, bank, n, speed)
    if kind == "espeak":
        return _speech(rng, bank, _espeak_keys(ref, speed, pitch), n)
    if kind == "asterisk":
        return _speech(rng, bank, [f"asterisk:{ref}"], n)
    if kind == "crowd":
        return _crowd(rng, bank, n)
    if kind == "theme":
        return _theme(rng, bank, ref, n, cls)
    raise ValueError(f"unknown material kind {kind}")


# --------------------------------------------------------------------------------------------------------------------
# attributes and mixing


def apply_attributes(rng: np.random.Generator, x: np.ndarray, attrs: dict) -> np.ndarray:
    """Distance (low-pass + reverb + attenuation) and loudness (absolute level), then edge fades."""
    lo_db, hi_db = LEVEL_DB[attrs.get("loudness")]
    target = rng.uniform(lo_db, hi_db)
    if attrs.get("distance") == "far":
        x = filt(x, hi=rng.uniform(2500, 4500), order=1)  # air absorption: a gentle high-frequency loss
        x = 0.55 * x + 0.9 * fft_convolve(x, reverb_ir(rng, rng.uniform(0.8, 1.6), damp_hz=2500.0))
        target += FAR_EXTRA_DB
    elif attrs.get("distance") == "near" or rng.random() < 0.5:
        x = x + rng.uniform(0.0, 0.15) * fft_convolve(x, reverb_ir(rng, rng.uniform(0.2, 0.4)))
    x = x * envelope(x.size, 0.01, 0.05)
    return set_level(x, target) if np.any(x) else x


BACKGROUNDS = {
    "room tone": lambda rng, n: colored_noise(rng, n, 2.0, lo=30, hi=500),
    "hiss": lambda rng, n: colored_noise(rng, n, 0.0, lo=1000, hi=7000),
    "hum": lambda rng, n: sum(np.sin(2 * np.pi * f * k * np.arange(n) / SR + rng.uniform(0, 6)) / k
                              for k in (1, 2, 3, 5) for f in [rng.choice([50.0, 60.0])]).astype(np.float32),
    "distant traffic": lambda rng, n: colored_noise(rng, n, 1.5, lo=30, hi=900) * (
        1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.05, 0.15) * np.arange(n) / SR)).astype(np.float32),
}


def render_clip(seed: int, clip: dict, bank: Bank | None, smoke: bool) -> tuple[np.ndarray, list[str]]:
    """Mix a planned clip: events at their times, optional quiet background, peak-limited to -1 dBFS."""
    rng = np.random.default_rng([seed, 7, clip["index"]])
    n = int(round(clip["duration_s"] * SR))
    mix = np.zeros(n, np.float32)
    provs, levels = [], []
    for ev in clip["events"]:
        cls = BY_LABEL[ev["label"]]
        material = cls.materials[ev["material"]]
        a, b = int(round(ev["start_s"] * SR)), int(round(ev["end_s"] * SR))
        dry, prov = render_source(rng, cls, material, ev["attributes"], b - a, bank)
        wet = apply_attributes(rng, dry, ev["attributes"])
        mix[a:b] += wet
        provs.append(prov)
        levels.append(level_db(wet))
    if clip["background"]:  # well under the quietest event: a background must never mask what is captioned
        bg = BACKGROUNDS[clip["background"]["kind"]](rng, n)
        mix += set_level(bg, min(rng.uniform(*BACKGROUND_DB), min(levels) - rng.uniform(*BACKGROUND_BELOW_DB)))
    peak = float(np.abs(mix).max())
    if peak > PEAK:
        mix *= PEAK / peak
    return mix, provs


__all__ = ["render_clip", "render_source", "apply_attributes", "level_db", "BACKGROUNDS"]
