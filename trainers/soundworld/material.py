"""Recorded source material from Debian packages, rendered once per build into a cache folder.

The cache holds every snippet the composer may draw from, resampled to 16 kHz mono float32 and levelled to -20 dB:
asterisk prompts, desktop theme sounds, espeak-ng utterances and FluidR3 GM notes (rendered with fluidsynth from MIDI
files written here). Clips are then composed from memory by numpy mixing, which is what keeps a full build fast.
The cache is keyed by the package versions and MATERIAL_VERSION, so a second build (any seed) reuses it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .dsp import SR, resample, set_level

MATERIAL_VERSION = 2
SF2 = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
THEME_DIR = Path("/usr/share/sounds")

# package -> (binary or file that proves it is usable, what it gives)
PACKAGES: dict[str, tuple[str, str]] = {
    "asterisk-core-sounds-en-wav": (str(ASTERISK_DIR), "recorded English speech prompts (woman)"),
    "fluid-soundfont-gm": (str(SF2), "FluidR3 General MIDI sound font (instruments, sound effects)"),
    "fluidsynth": ("/usr/bin/fluidsynth", "renders MIDI with the sound font"),
    "sound-theme-freedesktop": (str(THEME_DIR / "freedesktop"), "desktop sounds: bell, alarm clock, phone, camera"),
    "yaru-theme-sound": (str(THEME_DIR / "Yaru"), "desktop sounds: bell, chimes"),
    "espeak-ng": ("/usr/bin/espeak-ng", "synthetic speech in many voices and languages"),
}

Snippet = tuple[np.ndarray, str, dict]  # audio, provenance, tags (note, velocity, speed, pitch, ...)
Bank = dict[str, list[Snippet]]
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------------------
# Debian packages


def missing_packages() -> list[str]:
    """Packages whose files are not on this machine."""
    return [pkg for pkg, (path, _) in PACKAGES.items() if not os.path.exists(path)]


def ensure_packages(log: Log) -> None:
    """Install missing packages with apt-get when running as root, else stop with the exact command to run."""
    missing = missing_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit("soundworld needs Debian packages that are not installed. Run:\n  sudo apt-get update && "
                         f"sudo {' '.join(command)}\nor build with --smoke (procedural sources only).")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(command, env=env, check=True)
    still = missing_packages()
    if still:
        raise SystemExit(f"apt-get finished but these packages are still missing: {' '.join(still)}")


def package_versions() -> dict[str, str | None]:
    """Installed Debian versions of the material packages (None where absent)."""
    out = {}
    for pkg in PACKAGES:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        out[pkg] = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None
    return out


# --------------------------------------------------------------------------------------------------------------------
# MIDI (format 0, written by hand: no extra dependency)

TICKS_PER_SECOND = 960  # 480 ticks per quarter at 120 bpm


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def midi_bytes(notes: list[tuple[float, float, int, int]], program: int, channel: int = 0) -> bytes:
    """A one-track MIDI file: notes are (start_s, duration_s, note, velocity) on one channel with one program."""
    events: list[tuple[int, int, bytes]] = [(0, 0, bytes([0xC0 | channel, program]))]
    for start, dur, note, vel in notes:
        events.append((int(start * TICKS_PER_SECOND), 2, bytes([0x90 | channel, note, vel])))
        events.append((int((start + dur) * TICKS_PER_SECOND), 1, bytes([0x80 | channel, note, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track, last = bytearray(b"\x00\xff\x51\x03\x07\xa1\x20"), 0  # tempo 500000 us per quarter
    for tick, _, data in events:
        track += _vlq(tick - last) + data
        last = tick
    track += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def render_midi(notes: list[tuple[float, float, int, int]], program: int, channel: int, workdir: Path) -> np.ndarray:
    """Render notes with fluidsynth (no reverb/chorus: the composer adds its own room) to 16 kHz mono."""
    mid, wav = workdir / f"p{program}_c{channel}.mid", workdir / f"p{program}_c{channel}.wav"
    mid.write_bytes(midi_bytes(notes, program, channel))
    cmd = ["fluidsynth", "-ni", "-q", "-g", "0.5", "-R", "0", "-C", "0", "-r", str(SR), "-F", str(wav),
           str(SF2), str(mid)]
    subprocess.run(cmd, check=True, capture_output=True)
    audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), sr)


# note ranges: instruments (low/high register split at the middle), sound effects (fixed notes)
INSTRUMENT_RANGES = {0: (36, 96), 40: (55, 100), 24: (40, 84), 73: (60, 96), 56: (54, 86), 19: (36, 84), 13: (65, 108),
                     14: (60, 84)}
SFX_NOTES = {121: [55, 60, 65], 122: [48, 55, 60, 67], 123: [60, 64, 67, 70, 76, 80, 84, 88], 124: [60, 65, 70],
             125: [55, 60, 65], 126: [55, 60, 65], 127: [40, 48, 55, 60, 67]}
SFX_SECONDS = {121: 4.0, 122: 8.0, 123: 2.5, 124: 4.0, 125: 8.0, 126: 6.0, 127: 1.2}
DRUM_NOTES = [35, 36, 38, 40, 42, 44, 46, 49, 51, 45, 48, 50, 39]
SPACING = 0.5  # silence between rendered notes so that their tails never overlap


def _render_sequence(program: int, channel: int, specs: list[tuple[float, int, int, float]], workdir: Path,
                     source: str) -> list[Snippet]:
    """Render (hold_s, note, velocity, keep_s) notes in one fluidsynth call and slice them apart."""
    notes, t = [], 0.2
    for hold, note, vel, keep in specs:
        notes.append((t, hold, note, vel))
        t += keep + SPACING
    audio = render_midi(notes, program, channel, workdir)
    out = []
    for (start, _, note, vel), (_, _, _, keep) in zip(notes, specs):
        seg = _trim(audio[int(start * SR): int((start + keep) * SR)], -50.0)
        if seg.size < SR // 20 or np.abs(seg).max() < 1e-4:
            continue
        tags = {"note": note, "velocity": vel}
        out.append((seg, f"{source}, FluidR3_GM program {program + 1} note {note} velocity {vel}", tags))
    return out


def render_gm(workdir: Path) -> Bank:
    """All GM material: instrument notes (every semitone), sound-effect notes and drum-kit hits."""
    bank: Bank = {}
    for program, (lo, hi) in INSTRUMENT_RANGES.items():
        vels = (70, 110) if program in (0, 24, 13, 14) else (96,)
        hold = 2.5 if program == 14 else 1.6
        specs = [(hold, note, vel, hold + 0.6) for note in range(lo, hi + 1) for vel in vels]
        bank[f"gm:{program}"] = _render_sequence(program, 0, specs, workdir, "fluid-soundfont-gm")
    for program, notes in SFX_NOTES.items():
        dur = SFX_SECONDS[program]
        specs = [(dur, note, vel, dur + 0.3) for note in notes for vel in (80, 120)]
        bank[f"gm:{program}"] = _render_sequence(program, 0, specs, workdir, "fluid-soundfont-gm")
    specs = [(0.2, note, vel, 1.2) for note in DRUM_NOTES for vel in (60, 90, 120)]
    bank["gm_drums:0"] = _render_sequence(0, 9, specs, workdir, "fluid-soundfont-gm drum kit")
    return bank


# --------------------------------------------------------------------------------------------------------------------
# espeak-ng

SENTENCES_EN = [
    "Please leave your message after the tone.", "The train to the city leaves in ten minutes.",
    "I think we should take the other road today.", "Could you pass me the salt, please?",
    "The meeting has been moved to Thursday afternoon.", "It looks like it is going to rain again.",
    "Turn left at the next corner and keep going straight.", "We found a small cafe near the old bridge.",
    "My brother bought a new bicycle last week.", "The library closes at eight in the evening.",
    "Remember to water the plants before you go.", "She said the package would arrive tomorrow.",
    "This is the last call for passengers to Berlin.", "I have never seen so many stars in the sky.",
    "Let me know when you are ready to start.", "The soup needs a little more pepper.",
    "Our team won the game by two points.", "Please keep your tickets until the end of the journey.",
    "The children are playing in the garden behind the house.", "Welcome to the museum of natural history.",
    "He forgot his umbrella at the office again.", "Can you hear me now, or should I call back later?",
    "The price of coffee went up this year.", "We are going to the mountains for the weekend.",
    "The doctor will see you in a few minutes.", "Sorry, I did not catch your name.",
    "All systems are working normally at this time.", "The store has a big sale on shoes this week.",
    "Put the books on the shelf next to the window.", "I will be home late tonight, so do not wait for me.",
    "The bus was full, so we decided to walk.", "Thank you for calling, how can I help you today?",
    "Once upon a time there lived a clever little fox.", "Two plus two equals four, and three plus three is six.",
    "The weather tomorrow will be sunny with a light breeze.", "Please fasten your seat belts and stay seated.",
    "Where did you put the keys to the car?", "Today we will learn about the planets of the solar system.",
    "The concert starts at seven, so let us meet at six.", "Good morning everyone, and welcome back.",
]
SENTENCES_OTHER = {
    "de": ["Guten Morgen, wie geht es Ihnen heute?", "Der Zug nach Hamburg hat zehn Minuten Verspätung.",
           "Wir treffen uns morgen um drei Uhr am Bahnhof.", "Das Wetter ist heute sehr schön."],
    "fr": ["Bonjour, comment allez-vous aujourd'hui?", "Le train pour Paris part dans dix minutes.",
           "Nous allons au marché samedi matin.", "Il fait très beau aujourd'hui."],
    "es": ["Buenos días, ¿cómo está usted?", "El autobús sale a las ocho de la mañana.",
           "Vamos a la playa este fin de semana.", "Hoy hace mucho calor en la ciudad."],
    "it": ["Buongiorno, come sta oggi?", "Il treno per Roma parte tra dieci minuti.",
           "Andiamo al mare questo fine settimana.", "Oggi il tempo è molto bello."],
}
ESPEAK_VOICES = {
    "female": ["en-us+f1", "en-us+f2", "en+f3", "en+f4", "en-gb-x-rp+f2", "en-us+Andrea", "en+linda"],
    "male": ["en-us+m1", "en-us+m3", "en+m2", "en-gb+m4", "en-us+m7", "en-gb-scotland+m5", "en+Alex",
             "de+m3", "fr+m1", "es+m2", "it+m4"],
    "child": ["en-us+f5", "en+f4", "en-us+f2", "en+f1"],
    "whisper": ["en+whisper", "en-us+whisperf", "en-gb+whisper", "en-us+whisper"],
}
SPEED_WPM = {"fast": (205, 240), "slow": (115, 135), None: (150, 180)}
PITCH_VALUE = {"high": (68, 82), "low": (15, 28), None: (40, 55)}
ESPEAK_COMBOS = {"female": [(None, None)], "male": [(s, p) for s in ("fast", "slow") for p in ("high", "low")],
                 "child": [("fast", None), ("slow", None)], "whisper": [("fast", None), ("slow", None)]}
UTTERANCES_PER_COMBO = 24


def _espeak_jobs() -> list[tuple[str, str, str, int, int, str | None, str | None]]:
    """Deterministic list of (group, voice, sentence, wpm, pitch, speed, pitch_attr) to render."""
    rng = np.random.default_rng(1234)
    jobs = []
    for group, voices in ESPEAK_VOICES.items():
        for speed, pitch in ESPEAK_COMBOS[group]:
            count = UTTERANCES_PER_COMBO * (2 if group == "female" else 1)
            for k in range(count):
                voice = voices[k % len(voices)]
                lang = voice.split("+")[0][:2]
                pool = SENTENCES_OTHER.get(lang, SENTENCES_EN)
                sentence = pool[int(rng.integers(len(pool)))]
                wpm = int(rng.integers(*SPEED_WPM[speed]))
                pval = int(rng.integers(*PITCH_VALUE[pitch]))
                if group == "child":
                    pval = int(rng.integers(88, 100))
                jobs.append((group, voice, sentence, wpm, pval, speed, pitch))
    return jobs


def _espeak_one(job, workdir: Path) -> Snippet:
    group, voice, sentence, wpm, pval, speed, pitch = job
    name = hashlib.sha1(repr(job).encode()).hexdigest()[:16]
    wav = workdir / f"es_{name}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pval), "-w", str(wav), sentence],
                   check=True, capture_output=True)
    audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    prov = f"espeak-ng voice {voice} -s {wpm} -p {pval}: {sentence!r}"
    return _trim(resample(audio.mean(axis=1), sr)), prov, {"group": group, "speed": speed, "pitch": pitch,
                                                            "voice": voice}


def render_espeak(workdir: Path) -> Bank:
    """A few dozen utterances per voice group and speed/pitch combination."""
    jobs = _espeak_jobs()
    with ThreadPoolExecutor(2) as pool:
        snippets = list(pool.map(lambda j: _espeak_one(j, workdir), jobs))
    bank: Bank = {}
    for snip in snippets:
        tags = snip[2]
        bank.setdefault(f"espeak:{tags['group']}:{tags['speed']}:{tags['pitch']}", []).append(snip)
    return bank


# --------------------------------------------------------------------------------------------------------------------
# recorded files: asterisk prompts and desktop themes


def _trim(x: np.ndarray, threshold_db: float = -45.0) -> np.ndarray:
    """Cut leading/trailing silence (recordings and TTS output carry some)."""
    if x.size == 0:
        return x.copy()
    thr = np.abs(x).max() * 10 ** (threshold_db / 20)
    idx = np.flatnonzero(np.abs(x) > thr)
    if idx.size == 0:
        return x
    return x[max(idx[0] - 160, 0): idx[-1] + 800].copy()


PITCH_DOWN = {"alarm-clock-elapsed": 2.5}


def render_files() -> Bank:
    """Decode asterisk prompts (speech longer than 0.6 s) and the theme sounds the catalogue names."""
    bank: Bank = {"asterisk:en": []}
    for path in sorted(glob.glob(str(ASTERISK_DIR / "**" / "*.wav"), recursive=True)):
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        x = _trim(resample(audio.mean(axis=1), sr))
        if 0.6 <= x.size / SR <= 8.0:
            rel = os.path.relpath(path, ASTERISK_DIR)
            bank["asterisk:en"].append((x, f"asterisk-core-sounds-en-wav en/{rel} (Allison Smith)", {}))
    for path in sorted(glob.glob(str(THEME_DIR / "*" / "stereo" / "*.oga"))):
        theme, name = Path(path).parts[-3], Path(path).stem
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        pkg = "sound-theme-freedesktop" if theme == "freedesktop" else "yaru-theme-sound"
        prov = f"{pkg} stereo/{name}.oga"
        if name in PITCH_DOWN:  # its beeps sit at 8.2 kHz, the Nyquist limit of 16 kHz audio
            sr = int(sr / PITCH_DOWN[name])
            prov += f" (slowed down {PITCH_DOWN[name]}x)"
        bank[f"theme:{theme}/{name}"] = [(_trim(resample(audio.mean(axis=1), sr)), prov, {})]
    return bank


# --------------------------------------------------------------------------------------------------------------------
# cache


@dataclass
class MaterialCache:
    folder: Path

    def key(self) -> str:
        versions = json.dumps(package_versions(), sort_keys=True)
        return hashlib.sha1(f"{MATERIAL_VERSION}:{versions}".encode()).hexdigest()[:12]

    def load_or_render(self, log: Log) -> Bank:
        """The bank for this machine's packages, rendered on first use and then read back from disk."""
        folder = self.folder / self.key()
        if (folder / "index.json").is_file():
            log(f"material cache hit: {folder}")
            return _read_bank(folder)
        log("rendering source material (fluidsynth, espeak-ng, decoding recordings)")
        with tempfile.TemporaryDirectory(prefix="soundworld-") as tmp:
            bank = {**render_files(), **render_gm(Path(tmp)), **render_espeak(Path(tmp))}
        bank = {key: [(set_level(a, -20.0), p, t) for a, p, t in snips] for key, snips in bank.items() if snips}
        _write_bank(folder, bank)
        return _read_bank(folder)  # the stored (float16) samples, so a cache hit renders the very same clips


def _write_bank(folder: Path, bank: Bank) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {}
    for i, (key, snips) in enumerate(sorted(bank.items())):
        np.save(tmp / f"{i}.npy", np.concatenate([a for a, _, _ in snips]).astype(np.float16))
        index[key] = {"file": f"{i}.npy", "lengths": [len(a) for a, _, _ in snips],
                      "prov": [p for _, p, _ in snips], "tags": [t for _, _, t in snips]}
    (tmp / "index.json").write_text(json.dumps(index))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _read_bank(folder: Path) -> Bank:
    index = json.loads((folder / "index.json").read_text())
    bank = {}
    for key, entry in index.items():
        data = np.load(folder / entry["file"]).astype(np.float32)
        bounds = np.cumsum([0] + entry["lengths"])
        bank[key] = [(data[a:b], p, t) for a, b, p, t in zip(bounds[:-1], bounds[1:], entry["prov"], entry["tags"])]
    return bank
