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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_datastore import machine_facts, write_section
from engine.config import PROJECT_ROOT, load_config
from engine.datastore import CaptionDatastore
from engine.drcap import project_onto_support
from engine.metrics import bleu, cider_d, normalize_caption
from engine.service import AudioScribe

BUNDLE = PROJECT_ROOT / "assets" / "demo"
CORPUS = PROJECT_ROOT / "data" / "bundle_work" / "soundworld"
TEMPLATE = "This is a sound of {}."


# --------------------------------------------------------------------------------------------------------------------
# the test split


def test_rows(corpus: Path, limit: int) -> list[dict]:
    from trainers.soundworld import load_manifest

    rows = [r for r in load_manifest(corpus) if r["split"] == "test"]
    if limit and len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).astype(int)]
    return rows


def embed_rows(scribe: AudioScribe, corpus: Path, rows: list[dict]) -> torch.Tensor:
    audios = [scribe.load(corpus / r["path"]) for r in rows]
    return scribe.clap.embed_audio(audios)  # [N, D]


# --------------------------------------------------------------------------------------------------------------------
# classification


def zero_shot(scribe: AudioScribe, embeddings: torch.Tensor, labels: list[str], classes: list[dict]) -> dict:
    """Top-1 of single-source clips with (a) the class labels, (b) each class's unlike-phrased test prompts
    averaged, (c) one test prompt per class at a time (mean over the prompt index)."""
    names = [c["label"] for c in classes]
    truth = torch.tensor([names.index(y) for y in labels])

    def top1(class_texts: list[list[str]]) -> float:
        text = torch.stack([torch.nn.functional.normalize(scribe.clap.embed_text(
            [TEMPLATE.format(t) for t in texts]).mean(0), dim=0) for texts in class_texts])
        return float(((embeddings @ text.T).argmax(1) == truth).float().mean())

    prompts = [c["test_prompts"] for c in classes]
    per_index = [top1([[p[i % len(p)]] for p in prompts]) for i in range(max(len(p) for p in prompts))]
    return {"labels": top1([[n] for n in names]), "test_prompts_ensemble": top1(prompts),
            "test_prompts_single_mean": float(np.mean(per_index)), "test_prompts_single_min": float(min(per_index)),
            "clips": len(labels), "classes": len(names)}


def tuning_gains(scribe: AudioScribe, corpus: Path, rows: list[dict], classes: list[str], seeds: Sequence[int],
                 preset: str) -> dict:
    """tune_prompts.run on the test clips: all classes tuned, and base-to-new (first half tuned)."""
    from trainers.tune_prompts import run

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "eval.csv"
        lines = ["source,label"] + [f"{corpus / r['path']},{r['labels'][0]}" for r in rows]
        csv.write_text("\n".join(lines) + "\n")
        tuned = AudioScribe(replace(scribe.config, tuning=_preset(scribe, preset)), scribe.clap, scribe.datastore)
        all_classes = run(tuned, classes, None, csv, seeds, False, False, None, False)
        b2n = run(tuned, classes, None, csv, seeds, False, True, None, False)
    return {"all": all_classes["summary"], "base_to_new": b2n["summary"]}


def _preset(scribe: AudioScribe, preset: str):
    config = load_config(str(PROJECT_ROOT / "assets" / "profiles" / f"{scribe.config.profile}.toml"),
                         [f"tuning.preset={preset}"])
    return config.tuning


# --------------------------------------------------------------------------------------------------------------------
# captioning


def caption(scribe: AudioScribe, embeddings: torch.Tensor, store: CaptionDatastore, *, projection: bool,
            retrieval: bool, batch_size: int = 16) -> list[str]:
    """DRCap captions with the store as datastore and support; PD and retrieval switchable (ablations)."""
    captioner = scribe.captioner
    cfg = captioner.config
    out: list[str] = []
    for start in range(0, len(embeddings), batch_size):
        chunk = embeddings[start:start + batch_size]
        similar = store.search(chunk, cfg.rag_k).captions if retrieval else [[] for _ in range(len(chunk))]
        mapped = project_onto_support(chunk, store.support, captioner.temperature)[0] if projection else chunk
        out.extend(captioner.model.generate(mapped, similar, num_beams=cfg.num_beams,
                                            max_new_tokens=cfg.max_new_tokens))
    return out


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
    cands = [normalize_caption(c) for c in candidates]
    refs = [[normalize_caption(r) for r in rs] for rs in references]
    return {"CIDEr-D": cider_d(cands, refs)[0], "BLEU-4": bleu(cands, refs)[0][3],
            "examples": [{"caption": c, "references": r[:2]} for c, r in zip(candidates[:3], references[:3])]}


def captioning(scribe: AudioScribe, embeddings: torch.Tensor, rows: list[dict], bundle: Path) -> dict:
    style_a = CaptionDatastore.load(bundle / "stores" / "style_a", scribe.clap)
    style_b = CaptionDatastore.load(bundle / "stores" / "style_b", scribe.clap)
    refs_a = [r["captions_a"] for r in rows]
    refs_b = [r["captions_b"] for r in rows]
    result = {}
    for name, projection, retrieval in (("full system", True, True), ("without projection decoding", False, True),
                                        ("without retrieval", True, False), ("without both", False, False)):
        result[name] = caption_scores(caption(scribe, embeddings, style_a, projection=projection,
                                              retrieval=retrieval), refs_a)
    result["style B refs, style-A support + datastore"] = caption_scores(
        caption(scribe, embeddings, style_a, projection=True, retrieval=True), refs_b)
    result["style B refs, swapped to style-B support + datastore"] = caption_scores(
        caption(scribe, embeddings, style_b, projection=True, retrieval=True), refs_b)
    return result


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
    zs, cap, t = results["zero_shot"], results["captioning"], results["timings"]
    lines = [f"Command: `python -m benchmarks.bench_demo_bundle{' --quick' if args.quick else ''}`  ",
             f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}  ", f"Runtime: {runtime:.0f} s  ", _machine(), "",
             f"Test split: {zs['clips']} single-source clips of {zs['classes']} classes for classification, "
             f"{results['caption_clips']} clips (1-3 sources) for captioning; nothing in it was trained on.", "",
             "| measure | target | result |", "|---|---|---|",
             f"| zero-shot source classification, top-1, prompts phrased unlike any training caption (each class's "
             f"test prompts averaged) | ≥ 85 % | **{100 * zs['test_prompts_ensemble']:.1f} %** (one prompt at a time: "
             f"mean {100 * zs['test_prompts_single_mean']:.1f} %, worst {100 * zs['test_prompts_single_min']:.1f} %; "
             f"with the class labels: {100 * zs['labels']:.1f} %) |"]
    for preset, gains in results.get("tuning", {}).items():
        a, b = gains["all"], gains["base_to_new"]
        lines.append(
            f"| audio-free prompt tuning vs zero-shot template, preset `{preset}`, mean ± std of {len(args.seeds)} "
            f"seeds | a gain | all classes tuned: {_pm(a, 'all_zero_shot')} → {_pm(a, 'all_tuned')}; base-to-new: "
            f"base {_pm(b, 'base_zero_shot')} → {_pm(b, 'base_tuned')}, new {_pm(b, 'new_zero_shot')} → "
            f"{_pm(b, 'new_tuned')} |")
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
    parser.add_argument("--quick", action="store_true", help="200 test clips, one seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    args.seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    from trainers.soundworld import load_classes

    classes = load_classes(args.corpus)
    scribe = AudioScribe.from_config(load_config(), show_progress=False)
    rows = test_rows(args.corpus, 200 if args.quick else 0)
    single = [r for r in rows if len(r["labels"]) == 1]
    embeddings = embed_rows(scribe, args.corpus, rows)
    single_emb = embeddings[[i for i, r in enumerate(rows) if len(r["labels"]) == 1]]
    results: dict = {"caption_clips": len(rows)}
    results["zero_shot"] = zero_shot(scribe, single_emb, [r["labels"][0] for r in single], classes)
    print(json.dumps(results["zero_shot"], indent=1), flush=True)
    results["captioning"] = captioning(scribe, embeddings, rows, args.bundle)
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
