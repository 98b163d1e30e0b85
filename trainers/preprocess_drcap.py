"""DRCap preprocessing: retrieval-augmented jsonl for training, validation and test audio, and the support.

    python -m trainers.preprocess_drcap --train ../shared/data/audiocaps/train.csv \\
        --val ../shared/data/audiocaps/val.csv --out data/drcap_audiocaps [--test-audio clips/] [--profile laion]

Writes to --out:
    train_rag.jsonl, val_rag.jsonl   {key, target, text, similar_captions}: text-to-text retrieval in the band
                                     low < cos < high, up to k captions, seeded
    test_rag.jsonl                   {key, source, similar_captions}: audio-to-text top-k (with --test-audio)
    datastore/                       the caption datastore (--database, default the training captions)
    text_embedding_support.pt        DRCap-compatible support: [N, D] float32 unit-norm CLAP text embeddings of all
                                     training captions in file order (duplicates kept), as DRCap's preprocessing saves
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.clap import create_clap
from engine.config import AppConfig, load_config
from engine.datastore import (
    CaptionDatastore,
    add_band_retrieval,
    embed_captions,
    read_caption_records,
    read_captions,
)
from engine.errors import AudioScribeError
from engine.service import AudioScribe
from trainers.inputs import list_audio


def add_audio_retrieval(items: list[dict], scribe: AudioScribe, k: int, show_progress: bool = False) -> list[dict]:
    """Audio records with ``similar_captions``: the top-k datastore captions for the clip, most similar first."""
    out = []
    for item in tqdm(items, desc="Test audio", disable=not show_progress):
        found = scribe.retrieve(scribe.load(item["source"]), k).clip
        out.append({**item, "similar_captions": found.captions[0]})
    return out


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def save_support(path: Path, embeddings: np.ndarray) -> None:
    """The support as DRCap stores it: one [N, D] float32 tensor (loadable with torch.load(weights_only=True))."""
    torch.save(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), path)


def preprocess(config: AppConfig, train: Path, val: Path | None, database: Sequence[Path], out: Path,
               test_audio: Path | None, low: float, high: float, k: int, seed: int, show_progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    clap = create_clap(config)
    ds = config.datastore
    captions = [c for path in (database or [train]) for c in read_captions(path, ds.csv_column, ds.jsonl_field)]
    store = CaptionDatastore.build(captions, clap, ds, source=",".join(p.name for p in (database or [train])),
                                   show_progress=show_progress)
    store.save(out / "datastore")
    summary = {"datastore": len(store), "clap": clap.name, "band": [low, high], "k": k, "seed": seed}
    for name, path in (("train", train), ("val", val)):
        if path is None:
            continue
        records = read_caption_records(path, ds.csv_column, ds.jsonl_field)
        records = add_band_retrieval(records, clap, store, low, high, k, seed, show_progress)
        write_jsonl(out / f"{name}_rag.jsonl", records)
        counts = np.bincount([len(r["similar_captions"]) for r in records], minlength=k + 1)
        summary[name] = {"records": len(records), "with_n_similar": counts.tolist()}
        if name == "train":
            save_support(out / "text_embedding_support.pt",
                         embed_captions(clap, [r["text"] for r in records], show_progress=show_progress))
    if test_audio is not None:
        scribe = AudioScribe(config, clap, store)
        items = add_audio_retrieval(list_audio(test_audio), scribe, k, show_progress)
        write_jsonl(out / "test_rag.jsonl", items)
        summary["test"] = {"records": len(items)}
    (out / "preprocess_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainers.preprocess_drcap", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, type=Path, help="training captions (CSV, jsonl or txt)")
    parser.add_argument("--val", type=Path, help="validation captions")
    parser.add_argument("--database", type=Path, nargs="*", default=[], help="datastore captions (default: --train)")
    parser.add_argument("--test-audio", type=Path, help="folder, CSV or jsonl of test audio for audio-to-text retrieval")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--band-low", type=float, default=0.75)
    parser.add_argument("--band-high", type=float, default=0.85)
    parser.add_argument("--topn", type=int, default=3, help="captions per sample (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="profile whose CLAP embeds everything (default: offline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = load_config(args.profile, args.overrides)
        summary = preprocess(config, args.train, args.val, args.database, args.out, args.test_audio, args.band_low,
                             args.band_high, args.topn, args.seed, show_progress=not args.quiet)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
