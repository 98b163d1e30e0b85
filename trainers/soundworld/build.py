"""The build: check packages, render the material cache, plan, render clips in parallel, write the manifest.

Layout of <out> (consumed by the demo-CLAP trainer and the benchmarks; keep the names):
  clips/<split>/<id>.flac   16 kHz mono 16-bit FLAC
  manifest.jsonl           one clip per line (see compose.plan_clip for the fields)
  classes.json             one entry per class: label, source, test_prompts, train_terms, provenance, license, band_hz
  build_info.json          seed, counts, timings, package versions, held-out pairs and attribute combinations
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from . import material
from .classes import BY_LABEL, SourceClass, content_stems, forbidden_stems, train_terms
from .compose import Holdout, available_classes, corpus_tasks, make_holdout, plan_clip
from .licenses import class_license
from .render import render_clip

DEFAULT_SIZES = {"train": 8000, "val": 600, "test": 600}
SMOKE_SIZES = {"train": 120, "val": 30, "test": 30}
Progress = Callable[[int, int], None]

_STATE: dict = {}  # worker globals (inherited through fork): bank, seed, out, smoke, classes, holdout


def _make_one(task: tuple) -> dict:
    """Plan, render and write one clip (planning is per-clip seeded, so any worker gives the same result)."""
    index, split, single = task
    st = _STATE
    clip = plan_clip(st["seed"], index, split, st["classes"], st["holdout"], st["smoke"],
                     BY_LABEL[single] if single else None)
    audio, provs = render_clip(st["seed"], clip, st["bank"], st["smoke"])
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    sf.write(str(st["out"] / clip["path"]), pcm, 16000, format="FLAC", subtype="PCM_16", compression_level=0.0)
    for ev, prov in zip(clip["events"], provs):
        ev["provenance"] = prov
        del ev["material"]
    del clip["index"]
    return clip


def _make_all(tasks: list[tuple], workers: int, progress: Progress | None) -> list[dict]:
    clips = []
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        it = pool.imap(_make_one, tasks, chunksize=8) if pool else map(_make_one, tasks)
        for k, clip in enumerate(it, 1):
            clips.append(clip)
            if progress:
                progress(k, len(tasks))
    finally:
        if pool:
            pool.close()
            pool.join()
    return clips


def check_corpus(clips: list[dict], holdout: Holdout) -> None:
    """Invariants every build must satisfy (the tests check them again on smoke builds)."""
    for clip in clips:
        assert 1.0 <= clip["duration_s"] <= 10.0, clip["id"]
        assert len(clip["captions_a"]) >= 3 and len(clip["captions_b"]) >= 3, clip["id"]
        if clip["split"] == "test":
            continue
        labels = clip["labels"]
        assert holdout.pair_ok(labels), f"{clip['id']}: held-out pair in {clip['split']}"
        for ev in clip["events"]:
            cls = BY_LABEL[ev["label"]]
            combo = tuple(ev["attributes"][a] for a in cls.attrs)
            assert combo not in holdout.combos[cls.label], f"{clip['id']}: held-out combination in {clip['split']}"
        forbidden = set().union(*(forbidden_stems(BY_LABEL[x]) for x in labels))
        for caption in clip["captions_a"] + clip["captions_b"]:
            assert not content_stems(caption) & forbidden, f"{clip['id']}: test-prompt word in {caption!r}"


def class_entry(cls: SourceClass, smoke: bool) -> dict:
    materials = [m for m in cls.materials if m.procedural or not smoke]
    provenance = [f"{m.kind}:{m.ref}" for m in materials]
    return {"label": cls.label, "source": cls.source, "test_prompts": list(cls.test_prompts),
            "train_terms": train_terms(cls), "attributes": list(cls.attrs), "provenance": provenance,
            "license": class_license(materials), "band_hz": list(cls.band_hz)}


def build(out: Path, seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
          smoke: bool = False, progress: Progress | None = None, workers: int | None = None, cache: Path | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Build the corpus into out and return it.

    smoke: procedural sources only (no Debian package needed); sizes default to SMOKE_SIZES then, else DEFAULT_SIZES.
    """
    out = Path(out)
    sizes = SMOKE_SIZES if smoke else DEFAULT_SIZES
    n_train = sizes["train"] if n_train is None else n_train
    n_val = sizes["val"] if n_val is None else n_val
    n_test = sizes["test"] if n_test is None else n_test
    timings, t0 = {}, time.perf_counter()
    bank = None
    if not smoke:
        material.ensure_packages(log)
        bank = material.MaterialCache(Path(cache) if cache else out / ".cache").load_or_render(log)
    timings["material_s"] = round(time.perf_counter() - t0, 2)
    classes = available_classes(smoke)
    holdout = make_holdout(classes, seed)
    for split in ("train", "val", "test"):
        folder = out / "clips" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.flac"):
            stale.unlink()
    t1 = time.perf_counter()
    _STATE.update(bank=bank, seed=seed, out=out, smoke=smoke, classes=classes, holdout=holdout)
    workers = workers or min(2, os.cpu_count() or 1)
    tasks = corpus_tasks(n_train, n_val, n_test, classes)
    clips = _make_all(tasks, workers if len(tasks) > 40 else 1, progress)
    timings["render_s"] = round(time.perf_counter() - t1, 2)
    check_corpus(clips, holdout)
    _write_outputs(out, clips, holdout, seed, smoke, timings, t0)
    return out


def _write_outputs(out: Path, clips: list[dict], holdout: Holdout, seed: int, smoke: bool, timings: dict,
                   t0: float) -> None:
    with open(out / "manifest.jsonl", "w") as fh:
        for clip in clips:
            fh.write(json.dumps(clip, ensure_ascii=False) + "\n")
    classes = [class_entry(c, smoke) for c in available_classes(smoke)]
    (out / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n")
    counts = {s: sum(c["split"] == s for c in clips) for s in ("train", "val", "test")}
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    info = {"seed": seed, "smoke": smoke, "counts": counts, "n_classes": len(classes),
            "hours": round(sum(c["duration_s"] for c in clips) / 3600, 3), "timings": timings,
            "packages": {} if smoke else material.package_versions(),
            "python": {"numpy": np.__version__, "soundfile": sf.__version__, "python": platform.python_version()},
            "holdout": holdout.to_json()}
    # timings differ between runs; keep them out of the manifest so that it is byte-identical per seed
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")


def load_manifest(out: Path) -> list[dict]:
    """The manifest as a list of clip dicts."""
    with open(Path(out) / "manifest.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_classes(out: Path) -> list[dict]:
    """classes.json as a list of dicts."""
    return json.loads((Path(out) / "classes.json").read_text())
