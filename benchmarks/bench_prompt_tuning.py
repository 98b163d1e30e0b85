"""Benchmark audio-free prompt tuning on CPU: text selection, caption features, tuning and tuned classification.

    python -m benchmarks.bench_prompt_tuning [--models tiny,full] [--classes 10,50] [--full-steps N]
                                             [--full-texts N] [--out benchmarks/RESULTS.md]

Everything runs with the default :class:`engine.config.PromptTuningConfig` (prompt_len 32, 10 epochs, batch 24,
16..128 texts per class, single-label), on the CPU, the way ``AudioScribe.tune_prompts`` does it:
``select_texts`` over the shipped AudioCaps captions -> ``training_texts`` -> ``tune`` -> ``PromptedClassifier``.

The two models are the ones ``benchmarks/bench_datastore.py`` builds (its ``load_model`` is reused):

* ``tiny``: ``engine.clap.tiny.build_tiny_clap`` (32-d, random). The whole default run is measured.
* ``full``: ``ClapModel(ClapConfig())`` with random weights = laion/clap-htsat-unfused's layer shapes (HTSAT +
  RoBERTa-base, 153 M parameters) and a locally trained RoBERTa-style tokenizer. A whole run takes hours on a small
  CPU, so ``tune`` is stopped (through its own ``should_stop`` callback) after 1 warm-up + ``--full-steps`` optimizer
  steps, on a subset of the training texts, and the whole run is extrapolated (and labelled so).

Phases are timed from inside ``tune`` via its callbacks: ``progress(0, "Embedding ...")`` marks the start of the
caption features, the first ``should_stop()`` the start of the first step, and each later ``progress`` the end of a
step. Results go to stdout (markdown) and into this script's own section of ``--out``; other sections are kept.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import benchmarks.bench_datastore as bench_datastore  # sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM first
from benchmarks.bench_datastore import CpuShare, load_model, machine_facts, seed_everything

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.audio import load_audio  # noqa: E402
from engine.config import PromptTuningConfig  # noqa: E402
from engine.datastore import embed_captions, read_captions  # noqa: E402
from engine.prompt_tuning import (  # noqa: E402
    PromptedClassifier,
    TrainingTexts,
    TunedPrompts,
    TuningCancelled,
    training_texts,
    tune,
)
from engine.text_selection import select_texts  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"
SECTION_TITLE = "## Prompt tuning (benchmarks/bench_prompt_tuning.py)"
TEMPLATES = ("This is a sound of {}.",)  # ClassifyConfig's default: what select_tuning_texts tops up with
CLIP_S = 10.0

# 50 distinct sound words that AudioCaps captions use (all occur in assets/captions/audiocaps_train.txt). The first
# ten are the 10-class set. Every class but the last two has >= 16 matching captions; "owl" (10) and "violin" (8)
# have fewer, so the 50-class selection also exercises the CLAP top-up.
CLASS_NAMES = [
    "dog", "cat", "siren", "rain", "bird", "engine", "train", "bell", "water", "wind",
    "thunder", "car", "horn", "baby", "music", "bus", "truck", "motorcycle", "helicopter", "airplane",
    "boat", "duck", "chicken", "rooster", "cow", "sheep", "pig", "horse", "frog", "insect",
    "bee", "clock", "alarm", "phone", "door", "footsteps", "applause", "cough", "sneeze", "snore",
    "typing", "toilet", "drill", "explosion", "fireworks", "whistle", "crowd", "waves", "owl", "violin",
]


def log(message: str) -> None:
    print(f"[bench_prompt_tuning {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# timing tune() from its callbacks


class TuneClock:
    """Timestamps from ``tune``'s ``progress`` / ``should_stop`` callbacks; stops after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.embed_start: float | None = None
        self.step_starts: list[float] = []
        self.step_ends: list[float] = []

    def progress(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if message.startswith("Embedding"):
            self.embed_start = now
        else:
            self.step_ends.append(now)

    def should_stop(self) -> bool:
        if self.stop_after is not None and len(self.step_ends) >= self.stop_after:
            return True
        self.step_starts.append(time.perf_counter())
        return False

    @property
    def features_s(self) -> float:
        """Caption features (+ class tokenisation, negligible): "Embedding" report to the first step's start."""
        return self.step_starts[0] - self.embed_start

    def step_seconds(self) -> np.ndarray:
        return np.array(self.step_ends) - np.array(self.step_starts[:len(self.step_ends)])

    @property
    def loop_s(self) -> float:
        return self.step_ends[-1] - self.step_starts[0]


def token_lengths(clap, texts: Sequence[str], max_tokens: int) -> np.ndarray:
    return np.array([len(ids) for ids in clap.tokenizer(list(texts), truncation=True,
                                                        max_length=max_tokens)["input_ids"]])


def subset_for_timing(data: TrainingTexts, lengths: np.ndarray, size: int, seed: int = 0) -> TrainingTexts:
    """``size`` texts: one per class, the longest text of the set (so the subset pads to the same length as the
    whole set in ``caption_features``, which pads to the longest caption), the rest at random."""
    rng = np.random.default_rng(seed)
    keep = {int(np.argmax(lengths))}
    for c in range(data.labels.shape[1]):
        keep.add(int(rng.choice(np.flatnonzero(data.labels[:, c] == 1))))
    rest = [i for i in rng.permutation(len(data.texts)) if i not in keep]
    keep |= set(int(i) for i in rest[:max(0, size - len(keep))])
    rows = sorted(keep)
    return TrainingTexts([data.texts[i] for i in rows], data.labels[rows])


# --------------------------------------------------------------------------------------------------------------------
# measurements


def measure_selection(clap, names: list[str], captions: list[str], embeddings: np.ndarray,
                      config: PromptTuningConfig) -> tuple[object, dict]:
    """``select_texts`` exactly as ``AudioScribe.select_tuning_texts`` calls it (datastore captions + embeddings)."""
    t0 = time.perf_counter()
    selection = select_texts(names, captions, clap=clap, caption_embeddings=embeddings,
                             min_per_class=config.min_texts_per_class, max_per_class=config.max_texts_per_class,
                             templates=TEMPLATES, seed=config.seed)
    wall = time.perf_counter() - t0
    sources = np.array(selection.sources)
    return selection, {"select_s": wall, "selected": len(selection.texts),
                       "matched": int((sources == "match").sum()), "topped": int((sources == "nearest").sum()),
                       "short_classes": [r.name for r in selection.report if r.topped_up]}


def measure_classify(clap, prompts: TunedPrompts, repeats: int) -> dict:
    """Build ``PromptedClassifier`` (coarse + fine class embeddings) and classify one 10-s clip; medians."""
    rng = np.random.default_rng(0)
    t = np.arange(int(CLIP_S * clap.sample_rate)) / clap.sample_rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    audio = load_audio((clap.sample_rate, wave), clap.sample_rate)
    build, classify, windows, frames = [], [], [], []
    for i in range(repeats + 1):  # the first is warm-up
        t0 = time.perf_counter()
        classifier = PromptedClassifier(clap, prompts)
        t1 = time.perf_counter()
        result = classifier.classify(audio)
        t2 = time.perf_counter()
        assert result.scores["combined"].shape == (len(prompts.class_names),)
        if i:
            build.append((t1 - t0) * 1e3)
            classify.append((t2 - t1) * 1e3)
    for i in range(2):  # the two audio passes classify() makes, timed on their own once (after a warm-up)
        t0 = time.perf_counter()
        clap.embed_windows([audio])
        t1 = time.perf_counter()
        clap.embed_frames(audio)
        t2 = time.perf_counter()
        if i:
            windows.append((t1 - t0) * 1e3)
            frames.append((t2 - t1) * 1e3)
    return {"build_ms": float(np.median(build)), "classify_ms": float(np.median(classify)),
            "embed_windows_ms": windows[0], "embed_frames_ms": frames[0], "repeats": repeats,
            "windows": len(result.windows)}


def run_tiny(clap, names: list[str], captions: list[str], embeddings: np.ndarray, config: PromptTuningConfig,
             repeats: int) -> dict:
    selection, r = measure_selection(clap, names, captions, embeddings, config)
    data = training_texts(selection, config.multi_label)
    lengths = token_lengths(clap, data.texts, config.caption_max_tokens)
    r.update(texts=len(data.texts), tokens_mean=float(lengths.mean()), tokens_max=int(lengths.max()))
    log(f"tiny/{len(names)}: selected {r['selected']} in {r['select_s']:.2f} s; {len(data.texts)} single-label "
        "texts; tuning (whole default run)")
    clock = TuneClock()
    t0 = time.perf_counter()
    prompts = tune(clap, names, data, config, progress=clock.progress, should_stop=clock.should_stop)
    r["tune_s"] = time.perf_counter() - t0
    steps = clock.step_seconds()
    r.update(features_s=clock.features_s, features_texts=len(data.texts), features_extrapolated=False,
             loop_s=clock.loop_s, steps=len(steps), steps_per_epoch=math.ceil(len(data.texts) / config.batch_size),
             step_s=float(np.median(steps)), tune_extrapolated=False,
             final_loss=prompts.report["epoch_losses"][-1], first_loss=prompts.report["epoch_losses"][0])
    log(f"tiny/{len(names)}: tune {r['tune_s']:.1f} s ({r['steps']} steps, {r['step_s'] * 1e3:.1f} ms/step, "
        f"features {r['features_s']:.2f} s); classifying")
    r["classify"] = measure_classify(clap, prompts, repeats)
    r["prompts_what"] = "the tuned prompts"
    return r


def run_full(clap, names: list[str], captions: list[str], embeddings: np.ndarray, config: PromptTuningConfig,
             steps: int, subset: int, repeats: int) -> dict:
    selection, r = measure_selection(clap, names, captions, embeddings, config)
    data = training_texts(selection, config.multi_label)
    lengths = token_lengths(clap, data.texts, config.caption_max_tokens)
    r.update(texts=len(data.texts), tokens_mean=float(lengths.mean()), tokens_max=int(lengths.max()))
    timing = data if subset <= 0 or subset >= len(data.texts) else subset_for_timing(data, lengths, subset)
    log(f"full/{len(names)}: selected {r['selected']} in {r['select_s']:.2f} s; {len(data.texts)} single-label "
        f"texts; tune on {len(timing.texts)} of them, stopped after 1 + {steps} steps")
    clock = TuneClock(stop_after=1 + steps)
    t0 = time.perf_counter()
    try:
        tune(clap, names, timing, config, progress=clock.progress, should_stop=clock.should_stop)
        raise RuntimeError("tune finished before the step limit; use a larger --full-texts")
    except TuningCancelled:
        pass
    measured = time.perf_counter() - t0
    step_times = clock.step_seconds()
    timed_steps = step_times[1:]  # the first step is warm-up
    steps_per_epoch = math.ceil(len(data.texts) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    features = clock.features_s * len(data.texts) / len(timing.texts)
    r.update(features_s=features, features_measured_s=clock.features_s, features_texts=len(timing.texts),
             features_extrapolated=len(timing.texts) < len(data.texts), steps=total_steps,
             steps_per_epoch=steps_per_epoch, step_s=float(np.mean(timed_steps)),
             step_times=[float(s) for s in step_times], measured_s=measured, tune_extrapolated=True)
    r["loop_s"] = total_steps * r["step_s"]
    r["tune_s"] = features + r["loop_s"]
    log(f"full/{len(names)}: {r['step_s']:.2f} s/step (warm-up {step_times[0]:.2f} s), features "
        f"{clock.features_s:.1f} s for {len(timing.texts)} texts -> whole run ≈ {r['tune_s'] / 3600:.1f} h "
        "(extrapolated); classifying")
    # Classification cost does not depend on the prompt values: prompts of the tuned shape at their initial scale.
    generator = torch.Generator().manual_seed(config.seed)
    hidden = clap.text_tower().hidden_size
    prompts = TunedPrompts(names, torch.randn(config.prompt_len, hidden, generator=generator) * config.init_std,
                           torch.randn(config.prompt_len, hidden, generator=generator) * config.init_std, config,
                           clap.name, clap.fingerprint)
    r["classify"] = measure_classify(clap, prompts, repeats)
    r["prompts_what"] = "untuned prompts of the tuned shape (timing does not depend on their values)"
    return r


# --------------------------------------------------------------------------------------------------------------------
# report


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds:,.0f} s ≈ {seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds:,.0f} s ≈ {seconds / 60:.0f} min"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def render(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    lines = [SECTION_TITLE, ""]
    lines += [f"Command: `{res['command']}`  ", f"Date: {res['date']}  ", f"Runtime: {res['runtime_s']:.0f} s  ",
              f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads "
              f"{m['torch_threads']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
              f"numpy {m['numpy']} ({m['platform']})  ",
              f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f}  ",
              "Other processes' CPU use during the run (from /proc/stat minus this process; 0 = quiet, 2 = both "
              f"cores busy): {res['others_cores']:.2f} cores on average"
              + "".join(f"; {k}: {v:.2f}" for k, v in res["others_by_model"].items()), "",
              "> **Timings are approximate.** A shared 2-core CPU machine on which other processes may have been "
              "running (see the line above); treat differences under ~30% as noise. CPU only, float32. No GPU was "
              "lent to this run; on a machine with one the same script would be run there and its numbers added.",
              "",
              f"Config: default `PromptTuningConfig` (prompt_len {cfg['prompt_len']}, epochs {cfg['epochs']}, batch "
              f"{cfg['batch_size']}, lr {cfg['lr']}, texts per class {cfg['min_texts_per_class']}.."
              f"{cfg['max_texts_per_class']}, caption_max_tokens {cfg['caption_max_tokens']}, single-label, "
              "dropout on). Captions: the "
              f"{res['captions']:,} shipped AudioCaps training captions (`{res['captions_path']}`). Classes: the first "
              f"N of {', '.join(CLASS_NAMES[:12])}, ... (50 common AudioCaps sound words; full list in the script).",
              ""]
    lines += ["### Models", "", "| model | what | params | D | caption embeddings given to `select_texts` |",
              "|---|---|---:|---:|---|"]
    for name, mr in res["models"].items():
        f = mr["facts"]
        what = ("`build_tiny_clap` (random, 32-d; the offline profile's model)" if name == "tiny" else
                "`ClapModel(ClapConfig())` = laion/clap-htsat-unfused architecture (HTSAT + RoBERTa-base), random "
                f"weights (seed 0); RoBERTa-style BPE tokenizer trained on the captions ({f['tokenizer_vocab']:,} "
                "tokens)")
        emb = (f"the model's own, embedded here in {mr['embed_s']:.1f} s (one-off; the app reuses the datastore's)"
               if name == "tiny" else
               f"random unit vectors, {res['captions']:,} x {f['dim']} (the app reuses the datastore's, computed once "
               "at datastore build; embedding all captions with this model takes tens of minutes on this CPU, "
               "see the datastore section). Selection cost does not depend on their values")
        lines.append(f"| {name} | {what} | {f['params'] / 1e6:.1f} M | {f['dim']} | {emb} |")
    lines.append("")

    lines += ["### Results", "",
              "Times in seconds unless marked; **≈ … (extrapolated)** = not measured end to end (see notes). "
              "Training texts = the single-label view of the selection (texts naming exactly one class).", "",
              "| model | classes | 1. select_texts (s) | selected (matched + topped up) | training texts | "
              "2. caption features | 3. tuning steps (epochs x steps/epoch) | s per step | 3. tuning loop | "
              "3. whole `tune()` | 4. build classifier (ms) | 4. classify 10-s clip (ms) |",
              "|---|---:|---:|---|---:|---|---|---:|---|---|---:|---:|"]
    for row in res["rows"]:
        ext = row["tune_extrapolated"]
        feat = fmt_s(row["features_s"])
        if row["features_extrapolated"]:
            feat = (f"**≈ {feat} (extrapolated)** from {fmt_s(row['features_measured_s'])} for "
                    f"{row['features_texts']:,} texts")
        loop = f"**≈ {fmt_s(row['loop_s'])} (extrapolated)**" if ext else fmt_s(row["loop_s"])
        whole = f"**≈ {fmt_s(row['tune_s'])} (extrapolated)**" if ext else fmt_s(row["tune_s"])
        step = f"{row['step_s']:.2f}" if row["step_s"] >= 0.1 else f"{row['step_s'] * 1e3:.1f} ms"
        if ext:
            step += f" (mean of {len(row['step_times']) - 1}; warm-up {row['step_times'][0]:.2f})"
        c = row["classify"]
        lines.append(
            f"| {row['model']} | {row['classes']} | {row['select_s']:.2f} | {row['selected']:,} ({row['matched']:,} + "
            f"{row['topped']}) | {row['texts']:,} | {feat} | {row['steps']:,} ({res['config']['epochs']} x "
            f"{row['steps_per_epoch']}){'; ' + str(len(row['step_times'])) + ' run' if ext else ''} | {step} | "
            f"{loop} | {whole} | {c['build_ms']:,.0f} | {c['classify_ms']:,.0f} |")
    lines.append("")
    lines += ["Details:", ""]
    for row in res["rows"]:
        c = row["classify"]
        extra = (f"epoch loss {row['first_loss']:.3f} -> {row['final_loss']:.3f}" if not row["tune_extrapolated"]
                 else f"step times {', '.join(f'{s:.2f}' for s in row['step_times'])} s (first = warm-up), "
                      f"{row['measured_s']:.0f} s measured in all")
        lines.append(
            f"- {row['model']}/{row['classes']}: training captions {row['tokens_mean']:.1f} tokens on average, "
            f"longest {row['tokens_max']} (`caption_features` pads every batch to the longest); "
            f"topped-up classes: {', '.join(row['short_classes']) or 'none'}; {extra}; classify "
            f"= `embed_windows` {c['embed_windows_ms']:,.0f} ms + `embed_frames` {c['embed_frames_ms']:,.0f} ms + "
            f"scoring; classifier built with {row['prompts_what']}; medians of {c['repeats']} after 1 warm-up; "
            f"other processes used {row['others_cores']:.2f} cores meanwhile.")
    lines.append("")
    lines += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def notes_for(res: dict) -> list[str]:
    cfg = PromptTuningConfig()
    notes = [
        "What is timed is the engine's own code path: `select_texts` with the arguments "
        "`AudioScribe.select_tuning_texts` passes, `training_texts(..., multi_label=False)`, `tune` (its phases "
        "timed through its `progress` / `should_stop` callbacks) and `PromptedClassifier` + `.classify`.",
        "**tiny** is a floor (two 32-wide layers): the whole default run is measured; it shows the pipeline's own "
        "overhead. **full** has random weights but the real checkpoint's layer shapes, so its compute, and hence "
        "its time, is what laion/clap-htsat-unfused costs on this CPU; its tuning was stopped after the measured "
        "steps and the whole run extrapolated as caption features x (all texts / timed texts) + steps x mean step "
        "time.",
        "Tuning dominates, and within it the optimizer steps: each step encodes all C class prompts twice "
        f"(coarse and fine; {cfg.prompt_len} prompt vectors + the class name's tokens each) forward and backward "
        "through the whole text tower. Cost per step therefore grows with C, and the number of steps "
        f"(epochs x ceil(texts / {cfg.batch_size})) grows with C too (up to {cfg.max_texts_per_class} texts per "
        "class), so a whole run grows roughly with C squared: 50 classes cost far more than 5x 10 classes.",
        "Text selection (word-boundary regexes over the 45,716 captions, plus a CLAP top-up for classes with fewer "
        f"than {cfg.min_texts_per_class} matches) takes a second or less. Caption features are a one-off forward "
        "pass per training text without gradients: seconds with tiny, minutes with the full model, because "
        "`caption_features` pads every batch of 64 to the longest caption of the whole set (see details), unlike "
        "`embed_text`, which batches captions of similar length.",
        "Classifying with tuned prompts runs the audio tower twice per window (`embed_windows` for the clip "
        "embedding and `embed_frames` for the frames), so it costs about two zero-shot audio embeddings; building "
        "the classifier (2 x C prompted class embeddings, no gradients) costs seconds with the full model and is "
        "paid on every call today: `AudioScribe.classify_tuned` (used by the app) builds a new `PromptedClassifier` "
        "per clip, so a tuned classification costs build + classify from the table; caching the class embeddings "
        "per prompt set would leave only the classify column.",
        "Settings that shorten a run, roughly in proportion: `tuning.epochs` (linear), `tuning.max_texts_per_class` "
        "(fewer texts = fewer steps per epoch; only classes with more matches than the cap are affected), "
        f"`tuning.prompt_len` (each class sequence is 1 + prompt_len + the name's tokens, ~{cfg.prompt_len + 3} "
        f"positions at the default {cfg.prompt_len}, so 8 or 16 cut the step cost substantially, at some cost in "
        "accuracy) and fewer classes per run. A GPU should make each step a small fraction of the CPU time; no GPU "
        "was lent to this session, so none is measured here (the script runs unchanged where one is).",
    ]
    full = {row["classes"]: row for row in res["rows"] if row["model"] == "full"}
    if full:
        expect = "; ".join(f"{c} classes ≈ {fmt_s(r['tune_s'])} ({r['steps']:,} steps of ~{r['step_s']:.0f} s)"
                           for c, r in sorted(full.items()))
        notes.append("What a CPU user should expect with a real CLAP (laion/clap-htsat-unfused size) and the "
                     f"default settings, on a 2-core machine like this one: {expect}, extrapolated from the measured "
                     "steps; selection and classification are negligible next to that. The first step is several "
                     "times slower than the rest (warm-up: allocations and the first backward pass).")
        fastest = "; ".join(f"{c} classes ≈ {fmt_s(r['features_s'] + r['steps'] * min(r['step_times'][1:]))}"
                            for c, r in sorted(full.items()))
        notes.append("Contention from other processes inflates step times (the timed steps above vary a lot); with "
                     f"the fastest timed step instead of the mean, the whole runs would be: {fastest}. Treat the "
                     "extrapolations as ranges between the two.")
    return notes


def write_own_section(path: Path, section: str) -> None:
    """bench_datastore's ``write_section`` (insert or replace one section, keep the others) for this title."""
    params = inspect.signature(bench_datastore.write_section).parameters
    if "title" in params:
        bench_datastore.write_section(path, section, title=SECTION_TITLE)
        return
    saved = bench_datastore.SECTION_TITLE  # its helper reads the section title from its module
    bench_datastore.SECTION_TITLE = SECTION_TITLE
    try:
        bench_datastore.write_section(path, section)
    finally:
        bench_datastore.SECTION_TITLE = saved


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_prompt_tuning", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,full", help="comma-separated subset of tiny,full")
    p.add_argument("--classes", default="10,50", help=f"comma-separated class counts (1..{len(CLASS_NAMES)})")
    p.add_argument("--full-steps", type=int, default=3, help="timed optimizer steps for full (after 1 warm-up)")
    p.add_argument("--full-texts", type=int, default=240,
                   help="training texts full's caption features are computed on (extrapolated to all; 0 = all)")
    p.add_argument("--classify-repeats", type=int, default=3, help="timed classifications per row (after 1 warm-up)")
    p.add_argument("--captions", type=Path, default=CAPTIONS, help="caption file (default: the shipped AudioCaps)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "RESULTS.md",
                   help="markdown file to write this script's section into ('-' = do not write)")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(args.model_list) - {"tiny", "full"} or not args.model_list:
        p.error(f"--models takes tiny and/or full, got {args.models!r}")
    try:
        args.class_counts = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        p.error(f"--classes takes comma-separated integers, got {args.classes!r}")
    if not args.class_counts or any(not 1 <= c <= len(CLASS_NAMES) for c in args.class_counts):
        p.error(f"--classes must be between 1 and {len(CLASS_NAMES)}")
    if args.full_steps < 1 or args.classify_repeats < 1:
        p.error("--full-steps and --classify-repeats must be at least 1")
    needed = (args.full_steps + 1) * PromptTuningConfig().batch_size + 1
    if 0 < args.full_texts < needed:
        p.error(f"--full-texts must be 0 or at least {needed} (more than 1 + --full-steps batches)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import os

    started = time.perf_counter()
    whole_run = CpuShare()
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.bench_prompt_tuning" + (" " + shlex.join(argv_list) if argv_list else "")
    import transformers
    transformers.logging.set_verbosity_error()
    load_start = os.getloadavg()[0]
    config = PromptTuningConfig()
    captions = read_captions(args.captions)
    log(f"{args.captions}: {len(captions):,} captions; models {args.model_list}, classes {args.class_counts}")
    res: dict = {"command": command, "machine": machine_facts(), "config": asdict(config), "rows": [],
                 "models": {}, "others_by_model": {}, "captions": len(captions), "load_start": load_start,
                 "captions_path": os.path.relpath(args.captions, PROJECT_ROOT),
                 "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}

    with tempfile.TemporaryDirectory(prefix="bench-prompt-tuning-") as tmp:
        for name in args.model_list:
            seed_everything(0)
            share = CpuShare()
            log(f"{name}: creating and loading the model")
            clap, facts = load_model(name, Path(tmp), captions)
            model_res: dict = {"facts": facts}
            if name == "tiny":
                t0 = time.perf_counter()
                embeddings = embed_captions(clap, captions)
                model_res["embed_s"] = time.perf_counter() - t0
            else:
                rng = np.random.default_rng(1)
                embeddings = rng.standard_normal((len(captions), clap.embedding_dim)).astype(np.float32)
                embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
            res["models"][name] = model_res
            for count in args.class_counts:
                seed_everything(0)
                row_share = CpuShare()
                names = CLASS_NAMES[:count]
                if name == "tiny":
                    row = run_tiny(clap, names, captions, embeddings, config, args.classify_repeats)
                else:
                    row = run_full(clap, names, captions, embeddings, config, args.full_steps, args.full_texts,
                                   args.classify_repeats)
                row.update(model=name, classes=count, others_cores=row_share.others())
                log(f"{name}/{count}: other processes used {row['others_cores']:.2f} cores on average meanwhile")
                res["rows"].append(row)
                gc.collect()
            res["others_by_model"][name] = share.others()
            del clap, embeddings
            gc.collect()

    res["load_end"] = os.getloadavg()[0]
    res["others_cores"] = whole_run.others()
    res["runtime_s"] = time.perf_counter() - started
    res["notes"] = notes_for(res)
    section = render(res)
    print(section)
    if str(args.out) != "-":
        write_own_section(args.out, section)
        log(f"wrote {args.out}")
    log(f"done in {res['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
