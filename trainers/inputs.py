"""Listing the audio a command-line tool should process: a folder, a CSV or a DRCap jsonl."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from engine.datastore import read_jsonl_records
from engine.errors import AudioScribeError

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".mp4", ".webm", ".aac", ".aiff", ".aif",
                    ".mkv", ".wma"}
_PATH_COLUMNS = ("source", "path", "audio", "file", "filename")


def list_audio(path: str | os.PathLike) -> list[dict]:
    """``[{key, source, ...}]`` in a stable order.

    - a folder: every audio file below it (by extension), sorted; key = path relative to the folder;
    - a CSV: a path column (source/path/audio/file/filename), relative paths taken from the CSV's folder;
      key = the ``key`` column or the path; other columns are kept (e.g. references);
    - a jsonl (DRCap test layout): ``source`` per line, ``key`` kept when present.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return [{"key": str(p.relative_to(path)), "source": str(p)} for p in files]
    if not path.is_file():
        raise AudioScribeError(f"{path} is neither a folder of audio nor a CSV/jsonl list of audio files")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = read_jsonl_records(path, required=("source",))
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                            keep_default_na=False)
        column = next((c for c in _PATH_COLUMNS if c in table.columns), None)
        if column is None:
            raise AudioScribeError(f"{path} needs a column with audio paths, one of {', '.join(_PATH_COLUMNS)} "
                                   f"(columns: {', '.join(table.columns)})")
        records = [{**row, "source": row[column]} for row in table.to_dict("records")]
    else:
        raise AudioScribeError(f"Don't know how to list audio from {path.name}: give a folder, a .csv or a .jsonl")
    for record in records:
        source = Path(record["source"]).expanduser()
        record["source"] = str(source if source.is_absolute() else path.parent / source)
        record["key"] = str(record.get("key") or record["source"])
    return records
