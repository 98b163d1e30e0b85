"""Command line: python -m trainers.soundworld build --out data/soundworld [--seed 0] [--smoke] ...

Run with --help for every option.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .build import DEFAULT_SIZES, SMOKE_SIZES, build


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainers.soundworld",
                                     description="Generate the soundworld sound corpus (audio, manifest, captions).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a corpus into --out",
                       epilog="Default sizes 8000/600/600 (--smoke: 120/30/30, procedural sources only, no Debian "
                              "package needed). Re-running with the same seed gives byte-identical output.")
    b.add_argument("--out", type=Path, default=Path("data/soundworld"), help="output folder (default data/soundworld)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train", type=int, help="training clips")
    b.add_argument("--val", type=int, help="validation clips")
    b.add_argument("--test", type=int, help="test clips (half single-source, half held-out class pairs)")
    b.add_argument("--smoke", action="store_true", help="CI-sized build from procedural sources only")
    b.add_argument("--workers", type=int, help="rendering processes (default: up to 2)")
    b.add_argument("--cache", type=Path, help="material cache folder (default <out>/.cache)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else DEFAULT_SIZES
    n = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()}
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % 250 == 0):
            print(f"\rrendered {done}/{total} clips ({time.perf_counter() - start:.0f} s)", end="",
                  file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)

    out = build(args.out, seed=args.seed, n_train=n["train"], n_val=n["val"], n_test=n["test"], smoke=args.smoke,
                progress=progress, workers=args.workers, cache=args.cache, log=log)
    info = json.loads((out / "build_info.json").read_text())
    log(f"wrote {sum(info['counts'].values())} clips ({info['hours']} h, {info['n_classes']} classes) to {out} "
        f"in {info['timings']['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
