"""Caption many audio files with DRCap: a folder, CSV or jsonl of audio in; jsonl or CSV out.

    python -m trainers.batch_caption clips/ --out captions.jsonl [--profile drcap] [--set caption.num_beams=4]

Each result is written (and flushed) as soon as its batch is done, so an interrupted run loses at most one batch;
run the same command again and it continues where it stopped (files already captioned are skipped; files that
failed are tried again). A file that cannot be decoded gets an `error` field instead of stopping the run.
Output fields: key, source, caption, retrieved [[caption, cosine]], support_top [[caption, weight]], windows
[{start_s, end_s, caption}] (long audio), duration_s, timings_ms, and any fields of the input list (e.g. target).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from engine.config import load_config
from engine.errors import AudioScribeError
from engine.service import AudioScribe
from trainers.inputs import list_audio

log = logging.getLogger("batch_caption")
CSV_FIELDS = ["key", "source", "caption", "retrieved", "windows", "duration_s", "error"]


def done_keys(out: Path) -> set[str]:
    """Keys already captioned (without error) in an existing output file."""
    if not out.is_file():
        return set()
    if out.suffix.lower() == ".csv":
        with open(out, newline="", encoding="utf-8") as f:
            return {row["key"] for row in csv.DictReader(f) if row.get("caption") and not row.get("error")}
    keys = set()
    with open(out, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption: caption it again
                    continue
                if "caption" in record and not record.get("error"):
                    keys.add(record["key"])
    return keys


def caption_items(scribe: AudioScribe, items: Sequence[dict], batch_size: int) -> Iterator[dict]:
    """Result records, one per item, in order; decoding errors become records with an ``error`` field."""
    for start in range(0, len(items), batch_size):
        batch, loaded = items[start:start + batch_size], []
        for item in batch:
            try:
                loaded.append((item, scribe.load(item["source"])))
            except (AudioScribeError, OSError) as e:
                yield {**item, "error": f"{type(e).__name__}: {e}"}
        if not loaded:
            continue
        results = scribe.captioner.caption_clips([audio for _, audio in loaded])
        for (item, audio), result in zip(loaded, results):
            yield {**item, "caption": result.clip.caption,
                   "retrieved": [[c, round(s, 4)] for c, s in result.clip.retrieved],
                   "support_top": [[c, round(w, 4)] for c, w in result.clip.support_top],
                   "windows": [{"start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3), "caption": r.caption}
                               for w, r in zip(result.windows, result.per_window)],
                   "duration_s": round(audio.duration_s, 3),
                   "timings_ms": {k: round(v / len(loaded), 1) for k, v in result.timings_ms.items()}}


class ResultWriter:
    """Appends records to jsonl or CSV, flushing each one."""

    def __init__(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(out)
        self.csv = out.suffix.lower() == ".csv"
        new = not out.is_file() or out.stat().st_size == 0
        self.file = open(out, "a", encoding="utf-8", newline="" if self.csv else None)
        if self.csv:
            self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, record: dict) -> None:
        if self.csv:
            row = {**record, "retrieved": " | ".join(c for c, _ in record.get("retrieved", [])),
                   "windows": json.dumps(record.get("windows", []), ensure_ascii=False)}
            self.writer.writerow(row)
        else:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _drop_partial_last_line(path: Path) -> None:
    """An interrupted write can leave half a line at the end; cut it so appended records start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def run(inputs: Path, out: Path, scribe: AudioScribe, batch_size: int, show_progress: bool = True) -> dict:
    if scribe.captioner is None:
        raise AudioScribeError("Captioning is off in this profile (caption.enabled = false)")
    items = list_audio(inputs)
    finished = done_keys(out)
    todo = [item for item in items if item["key"] not in finished]
    writer = ResultWriter(out)
    errors = 0
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), desc="Captioning", unit="file",
                  disable=not show_progress) as bar:
            for record in caption_items(scribe, todo, batch_size):
                writer.write(record)
                errors += "error" in record
                bar.update(1)
    finally:
        writer.close()
    return {"inputs": len(items), "skipped_already_done": len(items) - len(todo), "captioned": len(todo) - errors,
            "errors": errors, "out": str(out)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainers.batch_caption", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, help="a folder of audio, or a CSV/jsonl listing audio files")
    parser.add_argument("--out", required=True, type=Path, help="results file: .jsonl or .csv")
    parser.add_argument("--profile", help="profile (default: offline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--batch-size", type=int, help="clips per batch (default: caption.batch_size)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = load_config(args.profile, args.overrides)
        scribe = AudioScribe.from_config(config, show_progress=not args.quiet)
        summary = run(args.inputs, args.out, scribe, args.batch_size or config.caption.batch_size,
                      show_progress=not args.quiet)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
