"""Caption many audio files with DRCap: a folder, CSV or jsonl of audio in; jsonl or CSV out.

    python -m trainers.batch_caption clips/ --out captions.jsonl [--profile drcap] [--set caption.num_beams=4]

Each result is written (and flushed) as soon as its batch is done, so an interrupted run loses at most one batch;
run the same command again and it continues where it stopped (files already captioned are skipped; files that
failed are tried again). A file that cannot be decoded gets an `error` field instead of stopping the run.
Output fields: key, source, caption, retrieved [[caption, cosine]], support_top [[caption, weight]], windows
[{start_s, end_s, caption}] (long audio), duration_s, timings_ms, and any fields of the input list (e.g. target).

Several GPUs: the same command under `torchrun --nproc_per_node N` (or `accelerate launch --num_processes N`). Each
rank captions every N-th file still to do on its own GPU and appends to its own part file (OUT.parts/rank-R.jsonl);
when all are done rank 0 merges the parts into OUT in input order and removes them. An interrupted run, restarted
with any number of ranks (or none), skips what OUT and the part files already hold.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.atomic import atomic_write, atomic_write_text
from engine.config import load_config
from engine.distributed import RankInfo, barrier, gather_objects, process_group, shard
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
    return {record["key"] for record in read_results(out) if _succeeded(record)}


def read_results(path: Path) -> list[dict]:
    """The records of a jsonl results file; a line cut by an interruption is left out (its file is redone)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def _succeeded(record: dict) -> bool:
    return "caption" in record and not record.get("error")


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

    def __init__(self, out: Path, like: Path | None = None) -> None:
        """Appends to ``out`` in the format ``like``'s suffix says (default: ``out``'s)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(out)
        self.csv = (like or out).suffix.lower() == ".csv"
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


def run(inputs: Path, out: Path, scribe: AudioScribe, batch_size: int, show_progress: bool = True,
        info: RankInfo | None = None) -> dict:
    """Caption every file of ``inputs`` not yet in ``out``; with ``info`` of several ranks, this rank's share (the
    process group must be up: :func:`engine.distributed.process_group`)."""
    if scribe.captioner is None:
        raise AudioScribeError("Captioning is off in this profile (caption.enabled = false)")
    info = info or RankInfo()
    items = list_audio(inputs)
    if not info.distributed:
        merge_parts(out, items)  # what an interrupted multi-rank run left in part files
        finished = done_keys(out)
        todo = [item for item in items if item["key"] not in finished]
        counts = _caption_into(out, todo, scribe, batch_size, show_progress, len(items))
        return {"inputs": len(items), "skipped_already_done": len(items) - len(todo), **counts, "out": str(out)}
    if info.is_main:
        _finish_committed_merge(out)
    barrier()
    finished = done_keys(out) | {r["key"] for part in part_files(out) for r in read_results(part) if _succeeded(r)}
    barrier()  # every rank has read the same finished set before any rank appends to its part file
    todo = [item for item in items if item["key"] not in finished]
    mine = shard(todo, info)
    counts = _caption_into(part_file(out, info.rank), mine, scribe, batch_size, show_progress and info.is_main,
                           len(mine), desc=f"Captioning (rank {info.rank} of {info.world_size})")
    barrier()  # every part is complete
    per_rank = [{"rank": r, **c} for r, c in enumerate(gather_objects(counts))]
    if info.is_main:
        merge_parts(out, items)
    return {"inputs": len(items), "skipped_already_done": len(items) - len(todo),
            "captioned": sum(c["captioned"] for c in per_rank), "errors": sum(c["errors"] for c in per_rank),
            "out": str(out), "ranks": per_rank}


def _caption_into(path: Path, todo: Sequence[dict], scribe: AudioScribe, batch_size: int, show_progress: bool,
                  total: int, desc: str = "Captioning") -> dict:
    """Caption ``todo`` appending each record to ``path``; {"captioned", "errors"}."""
    writer = ResultWriter(path)
    errors = 0
    try:
        with tqdm(total=total, initial=total - len(todo), desc=desc, unit="file", disable=not show_progress) as bar:
            for record in caption_items(scribe, todo, batch_size):
                writer.write(record)
                errors += "error" in record
                bar.update(1)
    finally:
        writer.close()
    return {"captioned": len(todo) - errors, "errors": errors}


# --------------------------------------------------------------------------------------------------------------------
# part files of a multi-rank run

_MERGED = "merged.json"  # written just before the merged output replaces OUT: {"sha256" of that output}


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_file(out: Path, rank: int) -> Path:
    """Rank ``rank``'s results, jsonl whatever OUT's format (CSV would lose fields the merge needs)."""
    return parts_dir(out) / f"rank-{rank:05d}.jsonl"


def part_files(out: Path) -> list[Path]:
    folder = parts_dir(out)
    return sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []


def merge_parts(out: Path, items: Sequence[dict]) -> int:
    """Append the part files' records to ``out`` in input order (one per file: its caption, else its error), then
    remove the parts; returns how many records were added.

    ``out`` is replaced atomically (a copy with the records appended). A merge killed after that replacement but
    before the parts are gone is recognised by the next run (:func:`_finish_committed_merge`) and not repeated."""
    if _finish_committed_merge(out):
        return 0
    records = _one_record_per_key([r for part in part_files(out) for r in read_results(part)], items)
    if records:
        def write(tmp: Path) -> None:
            if out.is_file():
                shutil.copyfile(out, tmp)
            writer = ResultWriter(tmp, like=out)
            for record in records:
                writer.write(record)
            writer.close()
            atomic_write_text(parts_dir(out) / _MERGED, json.dumps({"sha256": _sha256(tmp)}))

        atomic_write(out, write)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return len(records)


def _one_record_per_key(records: Sequence[dict], items: Sequence[dict]) -> list[dict]:
    """The success for each key (else its first error), ordered as ``items`` (keys not among them last)."""
    chosen: dict[str, dict] = {}
    for record in records:
        key = record.get("key")
        if key is not None and (key not in chosen or (_succeeded(record) and not _succeeded(chosen[key]))):
            chosen[key] = record
    position = {}
    for i, item in enumerate(items):
        position.setdefault(item["key"], i)
    return sorted(chosen.values(), key=lambda r: position.get(r["key"], len(items)))


def _finish_committed_merge(out: Path) -> bool:
    """True (and the parts removed) when the parts are already merged into ``out``: a merge was killed between
    replacing ``out`` and removing them."""
    marker = parts_dir(out) / _MERGED
    if not marker.is_file() or not out.is_file():
        return False
    try:
        merged = json.loads(marker.read_text(encoding="utf-8")).get("sha256")
    except (json.JSONDecodeError, AttributeError):
        return False
    if merged != _sha256(out):
        return False
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        with process_group() as info:
            scribe = _load_rank_zero_first(config, info, show_progress=not args.quiet)
            summary = run(args.inputs, args.out, scribe, args.batch_size or config.caption.batch_size,
                          show_progress=not args.quiet, info=info)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_main:
        print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


def _load_rank_zero_first(config, info: RankInfo, show_progress: bool) -> AudioScribe:
    """Rank 0 loads first, so a datastore that must be built is built once and cached, and the others open it."""
    if not info.is_main:
        barrier()
    # Without a checkpoint the mapping network is randomly initialised: seeded, it is the same on every rank and in
    # a resumed run, so those captions do not depend on how the work was split.
    torch.manual_seed(0)
    scribe = AudioScribe.from_config(config, show_progress=show_progress and info.is_main)
    if info.is_main:
        barrier()
    return scribe


if __name__ == "__main__":
    sys.exit(main())
