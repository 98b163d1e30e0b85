"""soundworld: a generated sound corpus (real Debian recordings + procedural synthesis) with two caption styles.

    python -m trainers.soundworld build --out data/soundworld [--seed 0] [--train N --val N --test N] [--smoke]

Python API: build(out, seed, n_train, n_val, n_test, smoke, progress) -> Path, load_manifest(out), load_classes(out).
See build.py for the output layout and SOURCES.md for where every sound comes from and under which license.
"""
from __future__ import annotations

from .build import DEFAULT_SIZES, SMOKE_SIZES, build, check_corpus, load_classes, load_manifest

__all__ = ["build", "load_manifest", "load_classes", "check_corpus", "DEFAULT_SIZES", "SMOKE_SIZES"]
