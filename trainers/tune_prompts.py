"""Audio-free prompt tuning from the command line: tune CLAP prompts for class names from text alone, and evaluate
zero-shot (template) against tuned prompts on labelled audio.

    python -m trainers.tune_prompts --classes "dog, rain, siren" --out prompts/ --eval clips/   # clips/<class>/*.wav
    python -m trainers.tune_prompts --corpus ../shared/data/afpt/cap_esc.csv --label-set esc50 \\
        --eval esc50.csv --seeds 0,1,2 --profile laion

Training texts: captions from the profile's datastore that mention each class (word-boundary matches, topped up by
CLAP similarity), or a labelled caption corpus (--corpus; the AFPT corpora with --label-set, or a CSV with
`caption` and `label`/`labels` columns). Evaluation audio: a folder with one sub-folder per class, or a CSV with a
`source`/`path` column and `label` or `labels` (";"-separated for several). Single-label data is scored by accuracy,
multi-label data (--multi-label) by macro mAP. Figures are from the last epoch (no selection on the test set).
--preset reference reproduces the AFPT code's numbers (its padding, masking and embedding choices); see README.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.classifier import build_zero_shot_classifier, parse_class_names
from engine.config import TUNING_PRESETS, load_config
from engine.errors import AudioScribeError, ClassifierInputError
from engine.metrics import accuracy, macro_map
from engine.prompt_tuning import (
    PromptedClassifier,
    TrainingTexts,
    TunedPrompts,
    training_inputs,
    training_texts,
    tune,
)
from engine.service import AudioScribe
from trainers.inputs import AUDIO_EXTENSIONS

log = logging.getLogger("tune_prompts")


# --------------------------------------------------------------------------------------------------------------------
# labelled audio


def labelled_audio(path: Path, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(audio paths, labels [N, C] multi-hot) from a folder of class sub-folders or a CSV."""
    index = {name.casefold(): i for i, name in enumerate(class_names)}
    sources, rows = [], []
    if path.is_dir():
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            if folder.name.casefold() not in index:
                log.warning("Skipping %s: not one of the class names", folder)
                continue
            for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
                sources.append(str(file))
                rows.append([index[folder.name.casefold()]])
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        column = next((c for c in ("source", "path", "filename", "file") if c in table.columns), None)
        label_column = next((c for c in ("labels", "label", "category", "class") if c in table.columns), None)
        if column is None or label_column is None:
            raise ClassifierInputError(f"{path} needs a source/path column and a label/labels column")
        for source, label in zip(table[column], table[label_column]):
            names = [n.strip().replace("_", " ") for n in label.split(";") if n.strip()]
            unknown = [n for n in names if n.casefold() not in index]
            if unknown:
                raise ClassifierInputError(f"{path}: label(s) {unknown} are not among the class names")
            resolved = Path(source) if Path(source).is_absolute() else path.parent / source
            sources.append(str(resolved))
            rows.append([index[n.casefold()] for n in names])
    if not sources:
        raise ClassifierInputError(f"No labelled audio found in {path}")
    labels = np.zeros((len(sources), len(class_names)), dtype=np.float32)
    for r, classes in enumerate(rows):
        labels[r, classes] = 1
    return sources, labels


def embed_eval_audio(scribe: AudioScribe, sources: Sequence[str], show_progress: bool
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(clip embedding [D], frames [T, D]) per file, computed once and reused for every classifier."""
    out = []
    for source in tqdm(sources, desc="Embedding evaluation audio", disable=not show_progress):
        audio = scribe.load(source)
        clip = scribe.clap.embed_windows([audio])[0].pooled
        _, frames = scribe.clap.embed_frames(audio)
        out.append((clip, torch.cat(frames)))
    return out


def score(classifier, embedded, multi_label: bool, tuned: bool) -> np.ndarray:
    """[N, C] scores: zero-shot (softmax or sigmoid of the template classifier) or tuned (combined)."""
    if tuned:
        return np.stack([classifier.scores(clip, frames)["combined"] for clip, frames in embedded])
    clips = torch.stack([clip for clip, _ in embedded])
    return classifier.scores(clips, multi_label=multi_label).numpy()


def metric(scores: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    return macro_map(scores, labels) if multi_label else accuracy(scores, labels.argmax(1))


# --------------------------------------------------------------------------------------------------------------------
# training texts


def corpus_texts(path: Path, label_set: str | None, class_names: Sequence[str] | None
                 ) -> tuple[list[str], np.ndarray, list[str]]:
    from engine.text_selection import AFPT_CLASS_NAMES, load_labelled_captions

    names = AFPT_CLASS_NAMES[label_set] if label_set else class_names
    texts, labels, names = load_labelled_captions(path, names)
    return texts, labels, list(names)


@dataclass
class EvalAudio:
    """Labelled evaluation audio, embedded once and reused by every seed (and every preset a benchmark compares)."""

    labels: np.ndarray  # [N, C] multi-hot over the class names
    embedded: list[tuple[torch.Tensor, torch.Tensor]]  # (clip [D], frames [T, D]) per file


def eval_audio(scribe: AudioScribe, path: Path, class_names: Sequence[str], show_progress: bool) -> EvalAudio:
    sources, labels = labelled_audio(path, class_names)
    return EvalAudio(labels, embed_eval_audio(scribe, sources, show_progress))


def run(scribe: AudioScribe, class_names: list[str], texts: TrainingTexts | None, evaluation: Path | EvalAudio | None,
        seeds: Sequence[int], multi_label: bool, base_to_new: bool, out: Path | None, show_progress: bool) -> dict:
    """Tune for each seed (and evaluate when given labelled audio: a path, or audio already embedded). What does
    not depend on the seed is computed once: the training texts' caption features, the evaluation audio's
    embeddings and the zero-shot scores."""
    config = replace(scribe.config.tuning, multi_label=multi_label)
    templates = scribe.config.classify.templates
    if isinstance(evaluation, Path):
        evaluation = eval_audio(scribe, evaluation, class_names, show_progress)
    split = len(class_names) // 2 if base_to_new else len(class_names)
    base = class_names[:split]
    results: dict = {"classes": class_names, "base": base, "new": class_names[split:], "seeds": [], "metric":
                     "macro mAP" if multi_label else "accuracy", "templates": templates, "preset": config.preset}
    data = texts if texts is not None else training_texts(scribe.select_tuning_texts(base), multi_label)
    if texts is not None and base_to_new:  # keep only the base classes' texts
        keep = data.labels[:, :split].sum(1) > 0
        data = TrainingTexts([t for t, k in zip(data.texts, keep) if k], data.labels[keep][:, :split])
    inputs = training_inputs(scribe.clap.text_tower(), data.texts, base, config) if len(seeds) > 1 else None
    zero_shot: dict[str, float] = {}  # per group, filled by the first seed's evaluation
    for seed in seeds:
        prompts = tune(scribe.clap, base, data, replace(config, seed=seed),
                       progress=_bar(show_progress, f"Tuning (seed {seed})"), inputs=inputs)
        row = {"seed": seed, "seconds": prompts.report["seconds"], "final_loss": prompts.report["epoch_losses"][-1],
               "steps": prompts.report["steps"]}
        if out is not None:
            prompts.save(out / f"seed{seed}")
        if evaluation is not None:
            row.update(evaluate_split(scribe, prompts, class_names, split, evaluation, multi_label, templates,
                                      zero_shot))
        results["seeds"].append(row)
    results["summary"] = summarise(results["seeds"])
    return results


def evaluate_split(scribe, prompts: TunedPrompts, class_names, split, evaluation: EvalAudio, multi_label, templates,
                   zero_shot: dict[str, float] | None = None) -> dict:
    """Zero-shot vs tuned on all classes; with a base/new split also on each half (prompts are shared, so new class
    names get the prompts learned on the base classes). ``zero_shot`` caches the zero-shot metric per group (it does
    not depend on the prompts)."""
    row, zero_shot = {}, {} if zero_shot is None else zero_shot
    labels = evaluation.labels
    groups = {"all": list(range(len(class_names)))}
    if split < len(class_names):
        groups = {"base": list(range(split)), "new": list(range(split, len(class_names)))}
    for group, columns in groups.items():
        names = [class_names[c] for c in columns]
        rows = labels[:, columns].sum(1) > 0  # clips of these classes
        subset = [e for e, keep in zip(evaluation.embedded, rows) if keep]
        group_labels = labels[rows][:, columns]
        if group not in zero_shot:
            template = build_zero_shot_classifier(scribe.clap, names, templates)
            zero_shot[group] = metric(score(template, subset, multi_label, False), group_labels, multi_label)
        tuned = PromptedClassifier(scribe.clap, replace(prompts, class_names=names))
        row[f"{group}_zero_shot"] = zero_shot[group]
        row[f"{group}_tuned"] = metric(score(tuned, subset, multi_label, True), group_labels, multi_label)
    if "new" in groups:
        row["harmonic_tuned"] = _harmonic(row["base_tuned"], row["new_tuned"])
        row["harmonic_zero_shot"] = _harmonic(row["base_zero_shot"], row["new_zero_shot"])
    return row


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "seed"] if rows else []
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in keys}


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _bar(show: bool, description: str):
    if not show:
        return None
    bar = tqdm(total=1000, desc=description)

    def update(fraction: float, message: str) -> None:
        bar.n = int(1000 * fraction)
        bar.set_postfix_str(message)
        bar.refresh()
        if fraction >= 1:
            bar.close()
    return update


def format_table(results: dict) -> str:
    lines = [f"metric: {results['metric']} (last epoch, mean ± std over seeds {[r['seed'] for r in results['seeds']]})"]
    for key, value in results["summary"].items():
        lines.append(f"  {key:<22} {value['mean']:.4f} ± {value['std']:.4f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainers.tune_prompts", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", help="class names, comma-separated (or one per line in --classes-file)")
    parser.add_argument("--classes-file", type=Path)
    parser.add_argument("--corpus", type=Path, help="labelled caption corpus to train on instead of the datastore")
    parser.add_argument("--label-set", choices=["esc50", "urbansound8k", "dcase2019", "fsdkaggle2019"],
                        help="class names of an AFPT corpus (its labels are indices)")
    parser.add_argument("--eval", type=Path, help="labelled audio: folder of class folders, or CSV")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--multi-label", action="store_true", help="ranking loss, raw cosines, macro mAP")
    parser.add_argument("--base-to-new", action="store_true",
                        help="tune on the first half of the classes, evaluate base and new halves separately")
    parser.add_argument("--out", type=Path, help="save the tuned prompts (one folder per seed) and results.json")
    parser.add_argument("--profile", help="profile naming the CLAP and the datastore (default: offline)")
    parser.add_argument("--preset", choices=list(TUNING_PRESETS),
                        help="tuning preset: 'reference' reproduces the AFPT code's numbers (same as --set "
                             "tuning.preset=...; explicit --set tuning.* values still win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="e.g. --set tuning.epochs=5 --set tuning.prompt_len=16")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        preset = [f"tuning.preset={args.preset}"] if args.preset else []  # load_config applies it before the rest
        config = load_config(args.profile, [*preset, *args.overrides, "caption.enabled=false"])
        scribe = AudioScribe.from_config(config, show_progress=not args.quiet)
        texts = None
        if args.corpus:
            corpus, labels, names = corpus_texts(args.corpus, args.label_set, _class_list(args) or None)
            texts = training_texts(_Selection(corpus, labels), args.multi_label)
        else:
            names = _class_list(args)
        if not names:
            raise ClassifierInputError("Give class names (--classes, --classes-file or --corpus with --label-set)")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        results = run(scribe, names, texts, args.eval, seeds, args.multi_label, args.base_to_new, args.out,
                      show_progress=not args.quiet)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


class _Selection:
    """The two fields of a text selection that training_texts reads."""

    def __init__(self, texts: list[str], labels: np.ndarray) -> None:
        self.texts, self.labels = texts, labels


def _class_list(args: argparse.Namespace) -> list[str]:
    if args.classes_file:
        return parse_class_names(args.classes_file.read_text(encoding="utf-8"))
    return parse_class_names(args.classes or "")


if __name__ == "__main__":
    sys.exit(main())
