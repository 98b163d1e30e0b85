"""Small helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AUDIOCAPS = SHARED_DATA / "audiocaps"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CAPTIONS = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"


def noise_clip(seconds: float, sample_rate: int = 48_000, seed: int = 0) -> np.ndarray:
    """Deterministic band-limited-ish noise with a tone, mono float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.1 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32)


def small_caption_set(count: int = 3000) -> list[str]:
    """The first ``count`` shipped AudioCaps training captions (unique): real text, quick to embed with the tiny CLAP."""
    return SHIPPED_CAPTIONS.read_text(encoding="utf-8").splitlines()[:count]


def audiocaps_train_source() -> Path:
    """The AudioCaps training CSV (49,838 rows) from the shared data folder, or the shipped unique captions when the
    shared folder is not beside the checkout."""
    csv = AUDIOCAPS / "train.csv"
    return csv if csv.is_file() else SHIPPED_CAPTIONS
