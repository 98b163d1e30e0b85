"""Build a caption datastore directory from caption files.

    python -m trainers.build_datastore --out datastores/audiocaps ../shared/data/audiocaps/train.csv
    python -m trainers.build_datastore --profile laion --out my_store captions.txt more.jsonl

The datastore is embedded with the CLAP of the chosen profile (or --clap); the app and the captioner then load it
with that same CLAP only. Run with --help for every option.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.clap import create_clap
from engine.config import list_profiles, load_config
from engine.datastore import CaptionDatastore, is_datastore, read_captions
from engine.errors import AudioScribeError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.build_datastore", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Caption files: .csv/.tsv (AudioCaps layout, column 'caption'), .jsonl (DRCap layout, field "
               "'target'), .txt (one caption per line). Exact duplicates (after collapsing whitespace) are removed.\n"
               "Example: python -m trainers.build_datastore --profile laion --out stores/clotho clotho_captions.csv")
    parser.add_argument("captions", nargs="+", type=Path, help="caption files to index")
    parser.add_argument("--out", required=True, type=Path, help="datastore directory to write")
    parser.add_argument("--append", action="store_true",
                        help="add to the datastore already in --out instead of refusing to overwrite it")
    parser.add_argument("--profile", help=f"profile whose CLAP embeds the captions ({', '.join(list_profiles())}, "
                        "or a .toml path); default: $AUDIOSCRIBE_PROFILE or 'offline'")
    parser.add_argument("--clap", help="CLAP hub id or local folder (overrides the profile's clap.model)")
    parser.add_argument("--device", help="cpu, cuda, auto (overrides clap.device)")
    parser.add_argument("--csv-column", help="caption column of CSV files (default 'caption')")
    parser.add_argument("--jsonl-field", help="caption field of jsonl files (default 'target')")
    parser.add_argument("--chunk-size", type=int, help="captions embedded per chunk (default 2048)")
    parser.add_argument("--exact-max-size", type=int,
                        help="use an exact index up to this many captions, an approximate IVF index above")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="any other setting (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {"clap.model": args.clap, "clap.device": args.device, "datastore.csv_column": args.csv_column,
             "datastore.jsonl_field": args.jsonl_field, "datastore.chunk_size": args.chunk_size,
             "datastore.exact_max_size": args.exact_max_size}
    return list(args.overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]


def build(args: argparse.Namespace) -> dict:
    config = load_config(args.profile, _overrides(args))
    exists = is_datastore(args.out)
    if exists and not args.append:
        raise SystemExit(f"error: {args.out} already holds a datastore; pass --append to add to it, "
                         "or choose another --out")
    clap = create_clap(config)
    started = time.perf_counter()
    if exists:
        store = CaptionDatastore.load(args.out, clap, config.datastore)
        before = len(store)
        for path in args.captions:
            store.add(read_captions(path, config.datastore.csv_column, config.datastore.jsonl_field,
                                    config.datastore.max_caption_file_mb), clap,
                      source=path.name, show_progress=not args.quiet)
        added = len(store) - before
    else:
        store = CaptionDatastore.from_files(args.captions, clap, config.datastore, show_progress=not args.quiet)
        added = len(store)
    seconds = time.perf_counter() - started
    store.save(args.out)
    return {"out": str(args.out), "captions": len(store), "added": added, "index": store.manifest.index_type,
            "clap": clap.name, "clap_untrained": clap.is_untrained, "seconds": round(seconds, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = build(args)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
