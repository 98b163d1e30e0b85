"""What the demo bundle can do, measured on the held-out test split of its sound corpus.

    python -m benchmarks.bench_demo_bundle                      # the shipped bundle, the corpus in data/bundle_work
    python -m benchmarks.bench_demo_bundle --quick              # fewer clips and one seed (a few minutes)

Prints one table per measure and writes the "Demo bundle" section of benchmarks/RESULTS.md:
zero-shot source classification with prompts phrased unlike any training caption; audio-free prompt tuning vs the
zero-shot template (all classes, and base-to-new) under the default and the reference preset; DRCap captioning
against style-A references with its ablations; the style-B domain swap; app timings on this CPU; the rebuild time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.bench_datastore import machine_facts, write_section
from engine.config import PROJECT_ROOT, load_config
from engine.service import AudioScribe
from trainers.demo_eval import captioning, embed_rows, test_rows, tuning_gains, zero_shot

BUNDLE = PROJECT_ROOT / "assets" / "demo"
CORPUS = PROJECT_ROOT / "data" / "bundle_work" / "soundworld"


# --------------------------------------------------------------------------------------------------------------------
# timings


def app_start_seconds(cache_dir: str) -> float:
    """A fresh process: import, load the default profile's engine, build the UI (no launch)."""
    code = ("import time; t=time.perf_counter(); from app.main import create_demo; from engine.config import "
            "load_config; create_demo(load_config()); print(time.perf_counter()-t)")
    env = {**os.environ, "AUDIOSCRIBE_CACHE": cache_dir, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def timings(scribe: AudioScribe, corpus: Path, rows: list[dict], classes: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        first = app_start_seconds(cache)
        warm = app_start_seconds(cache)
    ten_s = next((r for r in rows if r["duration_s"] >= 9.0), rows[0])
    audio = scribe.load(corpus / ten_s["path"])
    scribe.caption(audio)  # warm-up
    started = time.perf_counter()
    scribe.caption(audio)
    scribe.retrieve(audio)
    describe = time.perf_counter() - started
    started = time.perf_counter()
    scribe.tune_prompts(classes[:10])
    tune = time.perf_counter() - started
    return {"app start, caches warm (s)": warm, "app start, very first (s)": first,
            f"describe one {ten_s['duration_s']:.1f}-s clip (s)": describe, "tune 10 classes (s)": tune}


# --------------------------------------------------------------------------------------------------------------------
# report


def fmt(x: float) -> str:
    return f"{x:.3f}"


def report(results: dict, args: argparse.Namespace, runtime: float) -> str:
    zs, plain, cap, t = results["zero_shot"], results["zero_shot_plain"], results["captioning"], results["timings"]
    lines = [f"Command: `python -m benchmarks.bench_demo_bundle{' --quick' if args.quick else ''}`  ",
             f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}  ", f"Runtime: {runtime:.0f} s  ", _machine(), "",
             f"Test split: {zs['clips']} single-source clips of {zs['classes']} classes for classification, "
             f"{results['caption_clips']} clips (1-3 sources) for captioning; nothing in it was trained on.", "",
             "| measure | target | result |", "|---|---|---|",
             f"| zero-shot source classification, top-1, prompts phrased unlike any training caption (each class's "
             f"test prompts averaged; prompt projection onto the style-A captions, the offline profile's setting) "
             f"| ≥ 85 % | **{100 * zs['test_prompts_ensemble']:.1f} %** (one prompt at a time: "
             f"mean {100 * zs['test_prompts_single_mean']:.1f} %, worst {100 * zs['test_prompts_single_min']:.1f} %; "
             f"with the class labels: {100 * zs['labels']:.1f} %) |",
             f"| the same without prompt projection (plain CLAP zero-shot) | - | "
             f"{100 * plain['test_prompts_ensemble']:.1f} % (one at a time: mean "
             f"{100 * plain['test_prompts_single_mean']:.1f} %, worst {100 * plain['test_prompts_single_min']:.1f} %;"
             f" class labels: {100 * plain['labels']:.1f} %) |"]
    for preset, b in results.get("tuning", {}).items():
        lines.append(
            f"| audio-free prompt tuning vs the zero-shot template (top-1), preset `{preset}`, mean ± std of "
            f"{len(args.seeds)} seeds; tuned on the first 19 classes, tested on them and on the 19 unseen ones | a gain "
            f"| classes tuned: {_pm(b, 'base_zero_shot')} → **{_pm(b, 'base_tuned')}**; unseen classes: "
            f"{_pm(b, 'new_zero_shot')} → **{_pm(b, 'new_tuned')}** |")
    full = cap["full system"]
    lines.append(f"| captioning, style-A references: CIDEr-D / BLEU-4 | ≥ 1.0 / ≥ 0.3 | **{fmt(full['CIDEr-D'])} / "
                 f"{fmt(full['BLEU-4'])}** |")
    ablations = "; ".join(f"{k}: {fmt(v['CIDEr-D'])} / {fmt(v['BLEU-4'])}" for k, v in cap.items()
                          if k.startswith("without"))
    lines.append(f"| ablation (CIDEr-D / BLEU-4) | each below the full system | {ablations} |")
    keep = cap["style B refs, style-A support + datastore"]["CIDEr-D"]
    swap = cap["style B refs, swapped to style-B support + datastore"]["CIDEr-D"]
    lines.append(f"| domain adaptation: style-B refs, decoder trained on style A; support + datastore swapped to "
                 f"style B | CIDEr-D higher than without the swap | {fmt(keep)} → **{fmt(swap)}** |")
    timing = "; ".join(f"{k}: {v:.2f}" for k, v in t.items())
    lines.append(f"| 2 CPU cores: app start warm / very first / describe 10-s clip / tune 10 classes | ≤ 20 s / ≤ 90 s "
                 f"/ ≤ 1 s / ≤ 60 s | {timing} |")
    if results.get("rebuild"):
        lines.append(f"| full rebuild of corpus + bundle from scratch, 2 CPU cores | ≤ 60 min | "
                     f"{results['rebuild']} |")
    lines += ["", "Caption examples (full system, style-A references):", ""]
    lines += [f"- `{e['caption']}` ← refs: {' / '.join(e['references'])}" for e in full["examples"]]
    return "\n".join(lines)


def _machine() -> str:
    m = machine_facts()
    return (f"Machine: {m['cpu']}, {m['usable_cores']} cores, torch threads {m['torch_threads']}; Python {m['python']}, "
            f"torch {m['torch']}, transformers {m['transformers']}. Shared machine: other processes may have been "
            "running, so timings are upper bounds.")


def _pm(summary: dict, key: str) -> str:
    value = summary[key]
    return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f} %"


def rebuild_line(bundle: Path) -> str:
    info_path = bundle / "bundle.json"
    if not info_path.is_file():
        return ""
    info = json.loads(info_path.read_text())
    steps = info.get("timings_s", {})
    total = sum(steps.values())
    return f"{total / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in steps.items()) + ")"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_demo_bundle", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the soundworld build the bundle came from")
    parser.add_argument("--quick", action="store_true", help="100 clips captioned, one seed")
    parser.add_argument("--caption-clips", type=int, default=300, help="test clips captioned (evenly spaced)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    args.seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    from trainers.soundworld import load_classes

    classes = load_classes(args.corpus)
    scribe = AudioScribe.from_config(load_config(), show_progress=False)
    rows = test_rows(args.corpus, 0)
    single = [r for r in rows if len(r["labels"]) == 1]
    embeddings = embed_rows(scribe, args.corpus, rows)
    single_emb = embeddings[[i for i, r in enumerate(rows) if len(r["labels"]) == 1]]
    # Captioning: an even subset of the test clips (beam search on 2 cores is the slow part).
    keep = np.linspace(0, len(rows) - 1, min(len(rows), 100 if args.quick else args.caption_clips)).astype(int)
    results: dict = {"caption_clips": len(keep)}
    labels = [r["labels"][0] for r in single]
    results["zero_shot_plain"] = zero_shot(scribe, single_emb, labels, classes)
    results["zero_shot"] = zero_shot(scribe, single_emb, labels, classes, support=scribe.datastore.support,
                                     temperature=scribe.config.classify.prompt_temperature)
    print(json.dumps({k: results[k] for k in ("zero_shot_plain", "zero_shot")}, indent=1), flush=True)
    results["captioning"] = captioning(scribe, embeddings[keep], [rows[i] for i in keep], args.bundle)
    print(json.dumps({k: {m: v[m] for m in ("CIDEr-D", "BLEU-4")} for k, v in results["captioning"].items()},
                     indent=1), flush=True)
    if not args.skip_tuning:
        names = [c["label"] for c in classes]
        results["tuning"] = {p: tuning_gains(scribe, args.corpus, single, names, args.seeds, p)
                             for p in ("default", "reference")}
    results["timings"] = timings(scribe, args.corpus, rows, [c["label"] for c in classes])
    results["rebuild"] = rebuild_line(args.bundle)
    text = report(results, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        title = "## Demo bundle (benchmarks/bench_demo_bundle.py)"
        write_section(PROJECT_ROOT / "benchmarks" / "RESULTS.md", f"{title}\n\n{text}", title=title)
        (PROJECT_ROOT / "benchmarks" / "demo_bundle_results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
