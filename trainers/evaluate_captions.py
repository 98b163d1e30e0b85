"""Score predicted captions against reference captions (BLEU-1..4, ROUGE-L, CIDEr-D, vocabulary; METEOR, SPICE and
SPIDEr when Java and their jars are in $AUDIOSCRIBE_METRICS_JARS).

    python -m trainers.evaluate_captions predictions.jsonl --references ../shared/data/audiocaps/test.csv
    python -m trainers.evaluate_captions preds.csv --references refs.jsonl --out metrics.json --metrics bleu,cider_d

Prints a table (metric, value) and, with --out, writes JSON with the scores, per-item scores, counts, the text
normalisation used and the metrics that could not be computed with the reason. Run with --help for every option.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.errors import AudioScribeError
from engine.metrics import ALL_METRICS, DEFAULT_METRICS, CaptionEvaluation, score_captions

AUTO_KEY_COLUMNS = ("key", "youtube_id", "file_name")


class CaptionFileError(AudioScribeError, ValueError):
    """A predictions or references file cannot be read, or its keys do not match."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.evaluate_captions", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Predictions: .jsonl with fields 'key' and 'caption' (and optionally 'references', a list, used when "
               "--references is not given), or .csv/.tsv with columns key,caption.\n"
               "References: .jsonl with 'key' and 'references' (a list) or 'target' (one caption a line, lines with "
               "the same key are grouped), or .csv/.tsv in the AudioCaps layout (audiocap_id,youtube_id,start_time,"
               "caption: rows grouped by youtube_id) or the Clotho layout (file_name,caption_1..caption_5).\n"
               "Keys must match on both sides; any mismatch is an error unless --allow-missing is given.")
    parser.add_argument("predictions", type=Path, help="predicted captions (.jsonl, .csv, .tsv)")
    parser.add_argument("--references", type=Path,
                        help="reference captions (.jsonl, .csv, .tsv); default: the 'references' field of PREDICTIONS")
    parser.add_argument("--out", type=Path, help="JSON file to write the report to")
    parser.add_argument("--metrics", type=_metric_list, default=list(DEFAULT_METRICS),
                        help=f"comma-separated, from {','.join(ALL_METRICS)} (default: all)")
    parser.add_argument("--key-column", help=f"key column/field of both files (default: the first of "
                        f"{', '.join(AUTO_KEY_COLUMNS)} present)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate the keys present on both sides instead of failing on a mismatch")
    return parser.parse_args(argv)


def _metric_list(text: str) -> list[str]:
    names = [name.strip().lower().replace("-", "_") for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {','.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(ALL_METRICS)}")
    return names


# --------------------------------------------------------------------------------------------------------------------
# reading


def read_rows(path: Path) -> list[dict]:
    """Records of a .jsonl file (one JSON object a line) or rows of a .csv/.tsv file with a header."""
    if not path.is_file():
        raise CaptionFileError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_json_line(line, path, number) for number, line in
                enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise CaptionFileError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv or .tsv)")


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise CaptionFileError(f"{path}:{number}: expected a JSON object")
    return record


def key_column(rows: list[dict], path: Path, wanted: str | None) -> str:
    """The key column: ``wanted`` if given, else the first of key, youtube_id, file_name present in the first row."""
    columns = list(rows[0]) if rows else []
    for name in [wanted] if wanted else AUTO_KEY_COLUMNS:
        if name in columns:
            return name
    asked = f"no {wanted!r} column" if wanted else f"no key column ({', '.join(AUTO_KEY_COLUMNS)})"
    raise CaptionFileError(f"{path}: {asked}; columns are {', '.join(map(str, columns)) or '(none)'}"
                           + ("" if wanted else "; choose one with --key-column"))


def read_predictions(path: Path, wanted_key: str | None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Caption by key, and the inline 'references' lists by key (empty when the file has none)."""
    rows = read_rows(path)
    if not rows:
        raise CaptionFileError(f"{path} holds no predictions")
    key = key_column(rows, path, wanted_key)
    captions: dict[str, str] = {}
    inline: dict[str, list[str]] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("caption"), str):
            raise CaptionFileError(f"{path}: row {number} has no 'caption' text (fields: {', '.join(map(str, row))})")
        name = str(row[key])
        if name in captions:
            raise CaptionFileError(f"{path}: key {name!r} has two predictions (rows with the same {key!r})")
        captions[name] = row["caption"]
        if "references" in row:
            inline[name] = _as_list(row["references"], path, number)
    return captions, inline


def read_references(path: Path, wanted_key: str | None) -> dict[str, list[str]]:
    """Reference captions by key; several rows with the same key (AudioCaps, DRCap 'target') are grouped."""
    rows = read_rows(path)
    if not rows:
        raise CaptionFileError(f"{path} holds no references")
    key = key_column(rows, path, wanted_key)
    references: dict[str, list[str]] = {}
    for number, row in enumerate(rows, start=1):
        references.setdefault(str(row[key]), []).extend(_row_references(row, path, number))
    return references


def _row_references(row: dict, path: Path, number: int) -> list[str]:
    if "references" in row:
        return _as_list(row["references"], path, number)
    for field in ("target", "caption"):
        if field in row:
            return _as_list(row[field], path, number)
    numbered = sorted((k for k in row if str(k).startswith("caption_") and str(k)[8:].isdigit()),
                      key=lambda k: int(k[8:]))
    if numbered:
        return [row[k] for k in numbered if row[k]]
    raise CaptionFileError(f"{path}: row {number} has no references, target, caption or caption_N field "
                           f"(fields: {', '.join(map(str, row))})")


def _as_list(value: object, path: Path, number: int) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise CaptionFileError(f"{path}: row {number}: references must be text or a list of texts")
    return values


# --------------------------------------------------------------------------------------------------------------------
# matching and scoring


def match_keys(predictions: dict[str, str], references: dict[str, list[str]], allow_missing: bool) -> dict:
    """Keys present on both sides (in predictions order) and those missing on either side.

    Raises :class:`CaptionFileError` on any mismatch unless ``allow_missing``, and when no key is common.
    """
    common = [key for key in predictions if key in references]
    no_refs = [key for key in predictions if key not in references]
    no_pred = [key for key in references if key not in predictions]
    if not common or ((no_refs or no_pred) and not allow_missing):
        problems = [f"{len(items)} {what} (e.g. {', '.join(map(repr, items[:3]))})"
                    for items, what in ((no_refs, "predictions have no references"),
                                        (no_pred, "reference keys have no prediction")) if items]
        hint = (f"pass --allow-missing to evaluate the {len(common)} keys found on both sides" if common
                else "no key matches: check --key-column and the key spelling of both files")
        raise CaptionFileError(f"{'; '.join(problems)}; {hint}")
    return {"keys": common, "predictions_without_references": no_refs, "references_without_prediction": no_pred}


def evaluate(args: argparse.Namespace) -> dict:
    """Read, match and score; the report written as JSON."""
    predictions, inline = read_predictions(args.predictions, args.key_column)
    if args.references is not None:
        references = read_references(args.references, args.key_column)
    elif inline:
        references = inline
    else:
        raise CaptionFileError(f"{args.predictions} has no 'references' field; give the references with --references")
    matched = match_keys(predictions, references, args.allow_missing)
    keys = matched["keys"]
    result = score_captions([predictions[k] for k in keys], [references[k] for k in keys], args.metrics)
    return _report(args, result, predictions, references, matched)


def _report(args: argparse.Namespace, result: CaptionEvaluation, predictions: dict, references: dict,
            matched: dict) -> dict:
    keys = matched["keys"]
    counts = {"evaluated": len(keys), "references_evaluated": sum(len(references[k]) for k in keys),
              "predictions": len(predictions), "reference_keys": len(references),
              "predictions_without_references": len(matched["predictions_without_references"]),
              "references_without_prediction": len(matched["references_without_prediction"])}
    per_item = {key: {name: _number(values[i]) for name, values in result.per_item.items()}
                for i, key in enumerate(keys)}
    return {"scores": {name: _number(value) for name, value in result.scores.items()},
            "unavailable": result.unavailable, "counts": counts,
            "normalisation": result.normalisation, "metrics": args.metrics,
            "predictions_file": str(args.predictions),
            "references_file": str(args.references) if args.references else "inline ('references' field)",
            "missing": {k: v for k, v in matched.items() if k != "keys"}, "per_item": per_item}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value  # SPICE gives NaN for items it could not parse; JSON has no NaN


def format_table(report: dict) -> str:
    """The scores as a two-column table, unavailable metrics with their reason."""
    rows = [(name, "nan" if value is None else f"{value:.0f}" if name == "vocab" else f"{value:.4f}")
            for name, value in report["scores"].items()]
    rows += [(name, f"unavailable: {reason}") for name, reason in report["unavailable"].items()]
    width = max(len("metric"), *(len(name) for name, _ in rows))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    counts = report["counts"]
    lines.append(f"({counts['evaluated']} items, {counts['references_evaluated']} references)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (AudioScribeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
