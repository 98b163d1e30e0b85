"""Benchmark audio-free prompt tuning on the CPU: how long a run takes per preset, what bf16 autocast and the
one-pass class encoding buy, how good the run-time estimate is, and what the ``quick`` preset costs in accuracy.

    python -m benchmarks.bench_prompt_tuning [--parts steps,runs,accuracy] [--classes 10,50] [--seeds 0,1,2]
                                             [--timed-steps 3] [--repeats 5] [--out benchmarks/RESULTS.md]

Three parts, each on the engine's own code path (``select_texts`` -> ``training_texts`` -> ``tune``):

1. ``steps``: one training step (class-prompt encoding forward and backward + the loss) on a LAION-sized text tower
   (``ClapModel(ClapConfig())`` = laion/clap-htsat-unfused's shapes, random weights; ``bench_datastore``'s model) for
   10 classes, per preset's prompt length, float32 vs bf16 autocast, one encoder pass for coarse and fine (now) vs
   two (before). Interleaved rounds after a warm-up; medians of wall and CPU time.
2. ``runs``: whole runs on the same model per preset and class count, training texts selected from the shipped
   AudioCaps captions as the app does. ``quick`` at 10 classes is measured end to end (the target: <= 10 min on
   2 cores), with the estimate the progress line gave after its first step; the others are stopped after
   1 + ``--timed-steps`` steps and extrapolated (said so).
3. ``accuracy``: the demo bundle's trained CLAP (``assets/demo``) on its held-out test clips: prompts tuned on the
   first 10 of its classes with each preset (``--seeds``), top-1 on the clips of those classes and of the next 10
   (unseen), against the zero-shot template; tuning time per seed from the same runs.

Results go to stdout (markdown) and into this script's own section of ``--out``; other sections are kept.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import benchmarks.bench_datastore as bench_datastore  # sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM first
from benchmarks.bench_datastore import CpuShare, load_model, machine_facts, run_command, seed_everything

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.config import PromptTuningConfig  # noqa: E402
from engine.datastore import read_captions  # noqa: E402
from engine.prompt_tuning import (  # noqa: E402
    TrainingTexts,
    TuningCancelled,
    _autocast,
    _step_loss,
    compute_dtype,
    format_duration,
    plan_tuning,
    prompted_class_embeddings,
    softmax_pool,
    training_inputs,
    training_texts,
    tune,
)
from engine.text_selection import select_texts  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"
DEMO_CORPUS = PROJECT_ROOT / "data" / "bundle_work" / "soundworld"
SECTION_TITLE = "## Prompt tuning (benchmarks/bench_prompt_tuning.py)"
TEMPLATES = ("This is a sound of {}.",)  # ClassifyConfig's default: what select_tuning_texts tops up with
RUN_PRESETS = ("quick", "default", "reference")
ACCURACY_PRESETS = {"quick": {}, "quick, float32": {"mixed_precision": "no"}, "default": {}}

# 50 distinct sound words that AudioCaps captions use (all occur in assets/captions/audiocaps_train.txt). The first
# ten are the 10-class set. "owl" and "violin" have fewer than 16 matching captions, so 50 classes exercise the
# CLAP top-up.
CLASS_NAMES = [
    "dog", "cat", "siren", "rain", "bird", "engine", "train", "bell", "water", "wind",
    "thunder", "car", "horn", "baby", "music", "bus", "truck", "motorcycle", "helicopter", "airplane",
    "boat", "duck", "chicken", "rooster", "cow", "sheep", "pig", "horse", "frog", "insect",
    "bee", "clock", "alarm", "phone", "door", "footsteps", "applause", "cough", "sneeze", "snore",
    "typing", "toilet", "drill", "explosion", "fireworks", "whistle", "crowd", "waves", "owl", "violin",
]


def log(message: str) -> None:
    print(f"[bench_prompt_tuning {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


# --------------------------------------------------------------------------------------------------------------------
# 1. one training step


def two_pass_loss(tower, class_ids, coarse, fine, features, index, labels, tau, config) -> torch.Tensor:
    """The step as it was before the one-pass encoding: coarse and fine class prompts in two encoder calls."""
    with _autocast(tower, config):
        t = prompted_class_embeddings(tower, class_ids.input_ids, class_ids.attention_mask, coarse)
        f = prompted_class_embeddings(tower, class_ids.input_ids, class_ids.attention_mask, fine)
    t, f = F.normalize(t.float(), dim=-1), F.normalize(f.float(), dim=-1)
    coarse_cos = features.sentence[index] @ t.T
    fine_cos = softmax_pool(features.tokens[index].float() @ f.T, features.mask[index], config.token_temperature)
    target = labels.argmax(dim=1)
    return F.cross_entropy(tau * coarse_cos, target) + F.cross_entropy(tau * fine_cos, target)


def measure_steps(clap, names: list[str], captions: list[str], repeats: int) -> list[dict]:
    """Wall and CPU seconds of one step (loss, gradients of the prompts, AdamW), per variant, interleaved."""
    tower = clap.text_tower()
    view = tower.private_view(training=True)
    batch = 24
    rng = np.random.default_rng(0)
    texts = [captions[i] for i in rng.choice(len(captions), batch, replace=False)]
    labels = torch.from_numpy(np.eye(len(names), dtype=np.float32)[rng.integers(0, len(names), batch)])
    index = torch.arange(batch)
    tau = min(clap.logit_scale, 100.0)
    variants = []
    for preset in ("default", "quick"):
        for precision in ("no", "bf16"):
            config = PromptTuningConfig.from_preset(preset, mixed_precision=precision)
            inputs = training_inputs(tower, texts, names, config)
            for passes in (2, 1):
                variants.append({"preset": preset, "prompt_len": config.prompt_len, "precision": precision,
                                 "passes": passes, "config": config, "inputs": inputs, "wall": [], "cpu": []})

    def step(v: dict) -> None:
        config, (features, class_ids) = v["config"], v["inputs"]
        generator = torch.Generator().manual_seed(0)
        coarse, fine = (torch.nn.Parameter(torch.randn(config.prompt_len, tower.hidden_size, generator=generator)
                                           * config.init_std) for _ in range(2))
        optimizer = torch.optim.AdamW([coarse, fine], lr=config.lr)
        loss_fn = _step_loss if v["passes"] == 1 else two_pass_loss
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(view, class_ids, coarse, fine, features, index, labels, tau, config)
        coarse.grad, fine.grad = torch.autograd.grad(loss, [coarse, fine])
        optimizer.step()
        v["wall"].append(time.perf_counter() - wall)
        v["cpu"].append(time.process_time() - cpu)

    for v in variants:  # warm-up (first-call allocations, oneDNN kernels per dtype)
        step(v)
        v["wall"].clear(), v["cpu"].clear()
    for r in range(repeats):
        for v in variants:
            step(v)
        log(f"steps: round {r + 1}/{repeats} done")
    rows = []
    for v in variants:
        rows.append({k: v[k] for k in ("preset", "prompt_len", "precision", "passes")} |
                    {"wall_s": median(v["wall"]), "cpu_s": median(v["cpu"]), "wall_min": min(v["wall"]),
                     "cpu_min": min(v["cpu"]), "wall_all": v["wall"],
                     "positions": 2 * len(names) * (1 + v["config"].prompt_len + int(v["inputs"][1].input_ids
                                                                                     .shape[1]) - 1)})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# 2. whole runs


class Recorder:
    """tune()'s progress lines with their times; stops the run after ``stop_after`` steps (None = never)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.lines, self.steps = stop_after, [], 0

    def progress(self, fraction: float, message: str) -> None:
        self.lines.append((time.perf_counter(), fraction, message))
        self.steps += fraction > 0

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.steps >= self.stop_after

    def step_lines(self) -> list[tuple[float, float, str]]:
        return [line for line in self.lines if line[1] > 0]


LEFT = re.compile(r"≈ (?:(\d+) h (\d+) min|(\d+) min (\d+) s|(\d+) s) left")


def seconds_left(message: str) -> float:
    """The remaining time a progress line states (format_duration's forms)."""
    h, hm, m, ms, s = LEFT.search(message).groups()
    if h is not None:
        return 3600 * int(h) + 60 * int(hm)
    return 60 * int(m) + int(ms) if m is not None else float(s)


def subset_for_timing(data: TrainingTexts, size: int, seed: int = 0) -> TrainingTexts:
    """``size`` texts with every class present (a random sample otherwise), for stopped runs of large sets."""
    if size <= 0 or size >= len(data.texts):
        return data
    rng = np.random.default_rng(seed)
    keep = {int(rng.choice(np.flatnonzero(data.labels[:, c] == 1))) for c in range(data.labels.shape[1])}
    rest = [int(i) for i in rng.permutation(len(data.texts)) if int(i) not in keep]
    rows = sorted(keep | set(rest[:max(0, size - len(keep))]))
    return TrainingTexts([data.texts[i] for i in rows], data.labels[rows])


def measure_run(clap, names: list[str], captions: list[str], embeddings: np.ndarray, preset: str, whole: bool,
                timed_steps: int, subset: int) -> dict:
    config = PromptTuningConfig.from_preset(preset)
    t0 = time.perf_counter()
    selection = select_texts(names, captions, clap=clap, caption_embeddings=embeddings,
                             min_per_class=config.min_texts_per_class, max_per_class=config.max_texts_per_class,
                             templates=TEMPLATES, seed=config.seed)
    select_s = time.perf_counter() - t0
    data = training_texts(selection, config.multi_label)
    plan = plan_tuning(len(names), len(data.texts), config)
    row = {"preset": preset, "classes": len(names), "texts": len(data.texts), "steps_planned": plan.steps,
           "steps_per_epoch": plan.steps_per_epoch, "epochs": config.epochs, "select_s": select_s, "whole": whole,
           "prompt_len": config.prompt_len, "dtype": str(compute_dtype(clap.text_tower(), config))[6:],
           "patience": config.patience}
    share = CpuShare()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if whole:
        recorder = Recorder()
        prompts = tune(clap, names, data, config, progress=recorder.progress)
        wall = time.perf_counter() - t0
        r = prompts.report
        lines = recorder.step_lines()
        estimates = []  # (fraction of the run's time, estimated total / actual total) at a few points
        for k in sorted({0, len(lines) // 10, len(lines) // 2}):
            at, _, message = lines[k]
            estimates.append({"step": k + 1, "elapsed_s": at - t0, "estimate_s": at - t0 + seconds_left(message)})
        step_mean = (lines[-1][0] - lines[0][0]) / max(1, len(lines) - 1) if len(lines) > 1 else r["step_seconds"]
        row.update(seconds=wall, features_s=r["features_seconds"], steps=r["steps"], step_s=r["step_seconds"],
                   planned_s=wall + (plan.steps - r["steps"]) * step_mean,  # had no early stop ended it
                   stopped_early=r["stopped_early"], epochs_run=len(r["epoch_losses"]), estimates=estimates,
                   first_estimate_s=r["estimated_seconds"], losses=r["epoch_losses"],
                   cpu_s=time.process_time() - cpu0)
    else:
        timing = subset_for_timing(data, subset)
        recorder = Recorder(stop_after=1 + timed_steps)
        try:
            tune(clap, names, timing, config, progress=recorder.progress, should_stop=recorder.should_stop)
            raise RuntimeError("tune finished before the step limit; use a larger --subset")
        except TuningCancelled:
            pass
        lines = recorder.lines
        embedded_at = next(t for t, f, m in lines if m.endswith("timing the first step for an estimate…"))
        steps = [line[0] for line in lines if line[1] > 0]
        step_times = np.diff([embedded_at, *steps])
        features = (embedded_at - t0) * len(data.texts) / len(timing.texts)
        step_s = float(np.mean(step_times[1:]))  # the first step carries warm-up
        row.update(features_s=features, features_timed_texts=len(timing.texts), step_s=step_s,
                   step_times=[float(s) for s in step_times], seconds=features + plan.steps * step_s,
                   cpu_s=time.process_time() - cpu0)
    row["others_cores"] = share.others()
    log(f"runs: {preset}/{len(names)}: {row['texts']} texts, {plan.steps} steps planned, "
        f"{row['step_s']:.2f} s/step -> {format_duration(row['seconds'])}"
        f"{'' if whole else ' (extrapolated)'}; other processes {row['others_cores']:.2f} cores")
    return row


# --------------------------------------------------------------------------------------------------------------------
# 3. accuracy on the demo bundle


def measure_accuracy(presets: dict[str, dict], seeds: Sequence[int], corpus: Path, class_count: int) -> dict:
    from engine.config import load_config
    from engine.service import AudioScribe
    from trainers.demo_eval import test_rows
    from trainers.soundworld import load_classes
    from trainers.tune_prompts import EvalAudio, embed_eval_audio, run

    classes = [c["label"] for c in load_classes(corpus)][:class_count]
    scribe = AudioScribe.from_config(load_config(), show_progress=False)  # the offline profile: the demo bundle
    rows = [r for r in test_rows(corpus, 0) if len(r["labels"]) == 1 and r["labels"][0] in classes]
    labels = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for i, r in enumerate(rows):
        labels[i, classes.index(r["labels"][0])] = 1
    t0 = time.perf_counter()
    evaluation = EvalAudio(labels, embed_eval_audio(scribe, [str(corpus / r["path"]) for r in rows], False))
    log(f"accuracy: {len(rows)} test clips embedded in {time.perf_counter() - t0:.0f} s")
    half = len(classes) // 2
    out = {"clips": len(rows), "classes": len(classes), "clap": scribe.clap.name, "presets": {},
           "group_clips": [int(labels[:, :half].sum()), int(labels[:, half:].sum())]}
    for name, overrides in presets.items():
        preset = name.split(",")[0]
        config = PromptTuningConfig.from_preset(preset, **overrides)
        tuned = AudioScribe(replace(scribe.config, tuning=config), scribe.clap, scribe.datastore)
        share = CpuShare()
        t0 = time.perf_counter()
        result = run(tuned, classes, None, evaluation, seeds, False, True, None, False)
        summary = result["summary"]
        out["presets"][name] = {"summary": summary, "seeds": result["seeds"], "wall_s": time.perf_counter() - t0,
                                "others_cores": share.others(), "config": asdict(config),
                                "dtype": str(compute_dtype(scribe.clap.text_tower(), config))[6:]}
        log(f"accuracy: {name}: tuned classes {summary['base_tuned']['mean']:.3f}, unseen "
            f"{summary['new_tuned']['mean']:.3f}, {summary['seconds']['mean']:.1f} s per seed")
    return out


# --------------------------------------------------------------------------------------------------------------------
# report


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def render_steps(rows: list[dict], repeats: int) -> list[str]:
    base = {r["preset"]: r for r in rows if r["precision"] == "no" and r["passes"] == 2}
    lines = ["### 1. One training step, LAION-sized text tower, 10 classes", "",
             f"{repeats} interleaved rounds after a warm-up: median and fastest (min) of each. CPU = process CPU "
             "seconds (both threads): the work done, less disturbed by other processes than the wall clock; the "
             "speed-ups are ratios of the fastest CPU times. \"before\" = float32 and two encoder passes (coarse, "
             "fine), the code before this change.", "",
             "| preset (prompt_len) | autocast | encoder passes | class positions per step | wall median / min (s) | "
             "CPU median / min (s) | speed-up vs before (CPU min) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = base[r["preset"]]["cpu_min"] / r["cpu_min"]
        lines.append(f"| {r['preset']} ({r['prompt_len']}) | {'bf16' if r['precision'] == 'bf16' else 'none'} | "
                     f"{r['passes']} | {r['positions']} | {r['wall_s']:.2f} / {r['wall_min']:.2f} | "
                     f"{r['cpu_s']:.2f} / {r['cpu_min']:.2f} | {ratio:.2f}x |")
    return lines + [""]


def render_runs(rows: list[dict]) -> list[str]:
    lines = ["### 2. Whole runs, LAION-sized CLAP (random weights), AudioCaps captions", "",
             "**≈ … (extrapolated)** = caption features timed on a subset and scaled by the text count, plus the "
             "planned steps times the mean of the timed steps after the first; otherwise measured end to end "
             "(`tune()`, wall clock). CPU s = process CPU seconds of the measured part.", "",
             "| preset | classes | training texts | prompt_len | compute | steps (epochs x per epoch) | s per step | "
             "caption features | whole run | other processes (cores) |",
             "|---|---:|---:|---:|---|---|---:|---|---|---:|"]
    for r in rows:
        steps = f"{r['steps_planned']:,} ({r['epochs']} x {r['steps_per_epoch']})"
        if r["whole"]:
            steps = f"{r['steps']:,} of {steps}" + (f"; early stop after epoch {r['epochs_run']}"
                                                    if r["stopped_early"] else "")
            whole = f"**{format_duration(r['seconds'])}** measured ({r['cpu_s']:,.0f} CPU s)"
            features = format_duration(r["features_s"])
        else:
            whole = f"**≈ {format_duration(r['seconds'])} (extrapolated)**"
            features = (f"≈ {format_duration(r['features_s'])} (from {r['features_timed_texts']:,} texts)"
                        if r["features_timed_texts"] < r["texts"] else format_duration(r["features_s"]))
        lines.append(f"| {r['preset']} | {r['classes']} | {r['texts']:,} | {r['prompt_len']} | {r['dtype']} | "
                     f"{steps} | {r['step_s']:.2f} | {features} | {whole} | {r['others_cores']:.2f} |")
    lines.append("")
    for r in rows:
        if r["whole"]:
            target = r["planned_s"]  # the estimate is for every planned step; an early stop ends sooner
            points = "; ".join(f"after step {e['step']} ({format_duration(e['elapsed_s'])} in): "
                               f"{format_duration(e['estimate_s'])} ({e['estimate_s'] / target:.2f}x)"
                               for e in r["estimates"])
            planned = (f"; all {r['steps_planned']} planned steps at the run's mean step time would have taken "
                       f"{format_duration(target)}, the figure the estimates are compared with" if r["stopped_early"]
                       else "")
            lines.append(f"- Run-time estimate shown by the progress line, {r['preset']}/{r['classes']}: {points}. "
                         f"Actual {format_duration(r['seconds'])}{planned}. Epoch losses "
                         f"{', '.join(f'{x:.3f}' for x in r['losses'])}.")
        else:
            times = ", ".join(f"{s:.2f}" for s in r["step_times"])
            lines.append(f"- {r['preset']}/{r['classes']}: timed steps {times} s (first = warm-up).")
    return lines + [""]


def render_accuracy(acc: dict, seeds: Sequence[int]) -> list[str]:
    lines = ["### 3. Accuracy cost of `quick`: the demo bundle's trained CLAP on its held-out test clips", "",
             f"{acc['clips']} single-source test clips of the corpus' first {acc['classes']} classes (nothing in "
             f"them was trained on). Prompts tuned on the first {acc['classes'] // 2} classes (datastore captions, "
             "as the app selects them), top-1 among those classes on their clips and, with the same prompts, among "
             f"the other classes on theirs (unseen): {acc['group_clips'][0]} and {acc['group_clips'][1]} clips, "
             f"so one clip is {100 / acc['group_clips'][0]:.1f} points; mean ± std over seeds "
             f"{list(seeds)}; last epoch. Tuning time per seed (caption features computed once per preset and "
             "shared by the seeds; demo CLAP text tower: MiniLM-L6, far smaller than LAION's RoBERTa).", "",
             "| preset | compute | prompt_len / texts per class / epochs (patience) | tuned classes: zero-shot → "
             "tuned | unseen classes: zero-shot → tuned | steps run | s per seed | other processes (cores) |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for name, p in acc["presets"].items():
        s, c = p["summary"], p["config"]
        tuned, unseen = (f"{pct(s[g + '_zero_shot']['mean'])} → **{pct(s[g + '_tuned']['mean'])} ± "
                         f"{pct(s[g + '_tuned']['std'])}**" for g in ("base", "new"))
        lines.append(
            f"| {name} | {p['dtype']} | {c['prompt_len']} / {c['max_texts_per_class']} / {c['epochs']} "
            f"({c['patience'] or 'off'}) | {tuned} | {unseen} | {s['steps']['mean']:.0f} | "
            f"{s['seconds']['mean']:.1f} | {p['others_cores']:.2f} |")
    return lines + [""]


def render(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION_TITLE, "", f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Runtime: {res['runtime_s']:.0f} s  ",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads "
             f"{m['torch_threads']}; native bf16 (AMX / AVX512-BF16): {res['native_bf16']}; Python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}  ",
             f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f}; other "
             f"processes' CPU use over the run (/proc/stat minus this process; 2 = both cores busy): "
             f"{res['others_cores']:.2f} cores on average", "",
             "> **Timings are approximate.** A shared 2-core machine on which other processes were running (see the "
             "load above and the per-row columns): wall-clock times are what a user of this machine would have "
             "waited, and are longer than on an idle machine; ratios within one table (interleaved) are the "
             "firmer figures. No GPU was lent to this run.", ""]
    if "steps" in res:
        lines += render_steps(res["steps"], res["repeats"])
    if "runs" in res:
        lines += render_runs(res["runs"])
    if "accuracy" in res:
        lines += render_accuracy(res["accuracy"], res["seeds"])
    lines += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def notes_for(res: dict) -> list[str]:
    notes = [
        "A step encodes every class prompt (1 + prompt_len + the name's tokens) through the text tower, forward "
        "and backward; caption features are computed once per run, without gradients, and every epoch reuses them. "
        "So a step costs ~C x (prompt_len + name tokens) and a run ~epochs x ceil(texts / batch) steps, with "
        "texts growing with C: a run grows with about C².",
        "`tuning.mixed_precision = \"auto\"` autocasts the class-prompt encoding to bf16 on a CPU with native bf16 "
        "(AMX or AVX512-BF16) and keeps float32 elsewhere; on CUDA it follows the model's dtype (an fp16 CLAP tunes "
        "in fp16 with loss scaling). Caption features, cosines (scaled by τ up to 100) and the prompts stay float32.",
        "The progress line's estimate is the remaining steps times the measured cost per step (the first step "
        "alone, then the mean of the latest 20 after it); with `patience` set it is an upper bound, since an early "
        "stop ends the run sooner. The first step carries warm-up (first-call allocations, oneDNN kernel choice), "
        "so the first estimate runs high.",
    ]
    if any(r["whole"] and r["stopped_early"] for r in res.get("runs", [])):
        notes.append("The LAION-sized CLAP has random weights: its text tower cannot tell the classes apart, so the "
                     "loss does not fall (it stays near 2 ln C) and `quick`'s early stop ends the run after "
                     "patience + 1 epochs. With a trained CLAP the loss falls and the run goes on, at most to its "
                     "planned steps: the figure its estimates are compared with above is that upper bound.")
    if "accuracy" in res:
        notes.append("On the demo bundle, tuning on its own datastore captions lowers top-1 on the tuned classes "
                     "below the zero-shot template (the bundle's CLAP already knows its corpus' class labels) with "
                     "every preset alike; the comparison that matters here is `quick` against `default`.")
    return notes


def write_own_section(path: Path, section: str) -> None:
    bench_datastore.write_section(path, section, title=SECTION_TITLE)


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_prompt_tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="steps,runs,accuracy", help="comma-separated subset of steps,runs,accuracy")
    p.add_argument("--classes", default="10,50", help=f"class counts for the runs (1..{len(CLASS_NAMES)})")
    p.add_argument("--presets", default=",".join(RUN_PRESETS), help="presets for the runs")
    p.add_argument("--whole", default="quick/10", help="runs measured end to end (preset/classes, comma-separated); "
                                                       "the others are extrapolated")
    p.add_argument("--timed-steps", type=int, default=3, help="timed steps of an extrapolated run (after 1 warm-up)")
    p.add_argument("--subset", type=int, default=240, help="texts an extrapolated run embeds (scaled to all)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the step variants")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the accuracy part")
    p.add_argument("--corpus", type=Path, default=DEMO_CORPUS, help="the demo bundle's sound corpus (test split)")
    p.add_argument("--accuracy-classes", type=int, default=20,
                   help="the corpus' first N classes: prompts tuned on the first half, tested on both halves")
    p.add_argument("--captions", type=Path, default=CAPTIONS, help="caption file (default: the shipped AudioCaps)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "RESULTS.md",
                   help="markdown file to write this script's section into ('-' = do not write)")
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.part_list or set(args.part_list) - {"steps", "runs", "accuracy"}:
        p.error(f"--parts takes steps, runs and/or accuracy, got {args.parts!r}")
    try:
        args.class_counts = [int(c) for c in args.classes.split(",") if c.strip()]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--classes and --seeds take comma-separated integers")
    if any(not 1 <= c <= len(CLASS_NAMES) for c in args.class_counts):
        p.error(f"--classes must be between 1 and {len(CLASS_NAMES)}")
    args.preset_list = [x.strip() for x in args.presets.split(",") if x.strip()]
    args.whole_set = {x.strip() for x in args.whole.split(",") if x.strip()}
    if args.timed_steps < 1 or args.repeats < 1 or not args.seed_list:
        p.error("--timed-steps and --repeats must be at least 1, --seeds not empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from engine.prompt_tuning import cpu_has_native_bf16

    started = time.perf_counter()
    whole_run = CpuShare()
    args = parse_args(argv)
    command = run_command("benchmarks.bench_prompt_tuning", argv)
    import transformers
    transformers.logging.set_verbosity_error()
    res: dict = {"command": command, "machine": machine_facts(), "load_start": os.getloadavg()[0],
                 "native_bf16": cpu_has_native_bf16(), "repeats": args.repeats, "seeds": args.seed_list,
                 "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
    captions = read_captions(args.captions)
    if {"steps", "runs"} & set(args.part_list):
        with tempfile.TemporaryDirectory(prefix="bench-prompt-tuning-") as tmp:
            seed_everything(0)
            log("creating the LAION-sized CLAP (random weights)")
            clap, _ = load_model("full", Path(tmp), captions)
            if "steps" in args.part_list:
                res["steps"] = measure_steps(clap, CLASS_NAMES[:10], captions, args.repeats)
            if "runs" in args.part_list:
                # Selection cost does not depend on the caption embeddings' values; the app reuses its datastore's.
                rng = np.random.default_rng(1)
                embeddings = rng.standard_normal((len(captions), clap.embedding_dim)).astype(np.float32)
                embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
                res["runs"] = []
                for count in args.class_counts:
                    for preset in args.preset_list:
                        seed_everything(0)
                        whole = f"{preset}/{count}" in args.whole_set
                        res["runs"].append(measure_run(clap, CLASS_NAMES[:count], captions, embeddings, preset,
                                                       whole, args.timed_steps, args.subset))
                        gc.collect()
            del clap
            gc.collect()
    if "accuracy" in args.part_list:
        res["accuracy"] = measure_accuracy(ACCURACY_PRESETS, args.seed_list, args.corpus, args.accuracy_classes)
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
