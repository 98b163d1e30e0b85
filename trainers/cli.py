"""The command-line tail every trainer shares: one ``--field`` flag per training-config field, ``--profile`` and
``--set`` for the models, ``--quiet``; our own errors exit 2 with one line on stderr; the summary is JSON on stdout."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from engine.config import dataclass_to_argparse, fill_dataclass
from engine.errors import AudioScribeError


def trainer_parser(doc: str, prog: str, config_cls: type, uses_profile: bool = True) -> argparse.ArgumentParser:
    """A parser whose description and epilog come from the module docstring (first paragraph / the rest)."""
    head, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if uses_profile:
        parser.add_argument("--profile", help="profile naming the models (default: $AUDIOSCRIBE_PROFILE or the "
                                              "default profile)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                            help="model settings, e.g. --set llm.model=lmsys/vicuna-7b-v1.5")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    dataclass_to_argparse(parser.add_argument_group("training settings"), config_cls)
    return parser


def run_trainer(doc: str, prog: str, config_cls: type, run: Callable[[object, argparse.Namespace], dict],
                argv: Sequence[str] | None = None, uses_profile: bool = True) -> int:
    """Parse, build the config dataclass, call ``run(cfg, args)``, print its summary as JSON. Exit 2 on our errors."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = trainer_parser(doc, prog, config_cls, uses_profile).parse_args(argv)
    own = {"profile", "overrides", "quiet"}
    try:
        cfg = fill_dataclass(config_cls, {k: v for k, v in vars(args).items() if k not in own})
        summary = run(cfg, args)
    except AudioScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0
