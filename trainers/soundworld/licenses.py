"""License of every kind of source material (see SOURCES.md and licenses/ for the full texts).

Recorded in classes.json per class and, through the provenance strings, per event in the manifest, so that anyone
redistributing a built corpus knows what attribution and share-alike terms apply.
"""
from __future__ import annotations

from .classes import Material

PROCEDURAL = "procedural (numpy synthesis in this repository; no third-party material)"
FREEDESKTOP = {  # per file, from /usr/share/doc/sound-theme-freedesktop/copyright
    "alarm-clock-elapsed": "CC-BY-SA-3.0 (Tim/corsica_s)",
    "bell": "CC-BY-3.0 (Dr. Richard Boulanger et al.)",
    "complete": "CC-BY-3.0 (Dr. Richard Boulanger et al.)",
    "camera-shutter": "CC-BY-SA-3.0 (freesound user horsthorstensen)",
    "device-added": "CC-BY-SA-3.0 (Ivica Bukvic)",
    "message": "CC-BY-SA-3.0 (Ivica Bukvic)",
    "message-new-instant": "GPL-2.0-or-later (Damien Sandras)",
    "phone-incoming-call": "GPL-2.0-or-later (Damien Sandras)",
    "phone-outgoing-busy": "GPL-2.0-or-later (Damien Sandras)",
    "phone-outgoing-calling": "GPL-2.0-or-later (Damien Sandras)",
    "service-login": "GPL-2.0-only (The Pidgin developers)",
}
YARU = "CC-BY-SA-4.0 (Mads Rosendahl, yaru-theme-sound)"
GM = "MIT (FluidR3_GM sound font, Frank Wen; fluid-soundfont-gm), rendered with fluidsynth (LGPL-2.1-or-later)"
ASTERISK = "CC-BY-SA-3.0 (Allison Smith / Digium; asterisk-core-sounds-en-wav)"
ESPEAK = "output of espeak-ng (GPL-3.0-or-later program and voice data)"


def material_license(m: Material) -> str:
    """License string of one material."""
    if m.kind == "proc":
        return PROCEDURAL
    if m.kind in ("gm", "gm_drums"):
        return GM
    if m.kind == "asterisk":
        return ASTERISK
    if m.kind == "espeak":
        return ESPEAK
    if m.kind == "crowd":
        return f"{ASTERISK}; {ESPEAK}"
    if m.kind == "theme":
        theme, name = m.ref.split("/")
        if theme == "Yaru":
            return YARU
        if name not in FREEDESKTOP:
            raise KeyError(f"no license recorded for freedesktop sound {name}")
        return f"{FREEDESKTOP[name]}; sound-theme-freedesktop"
    raise ValueError(m.kind)


def class_license(materials: list[Material]) -> str:
    """All distinct licenses of the materials a class is rendered from, joined with ' | '."""
    return " | ".join(dict.fromkeys(material_license(m) for m in materials))
