"""Command line for the app: choose a profile and overrides, load the engine, build the demo, launch it."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import gradio as gr

from app.ui import build_demo
from engine.config import AppConfig, list_profiles, load_config
from engine.service import AudioScribe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py", description="AudioScribe: zero-shot audio captioning and classification in the browser.",
        epilog="Settings come from the profile, then AUDIOSCRIBE_<SECTION>__<FIELD> environment variables, then --set.")
    parser.add_argument("--profile", help=f"a shipped profile ({', '.join(list_profiles())}) or a .toml file; "
                        "default $AUDIOSCRIBE_PROFILE or 'offline'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting, e.g. --set clap.device=cpu (repeatable)")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", type=int, help="port (server.port)")
    parser.add_argument("--share", action="store_true", help="open a public gradio.live link (needs internet)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AppConfig:
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"server.host={args.host}")
    if args.port:
        overrides.append(f"server.port={args.port}")
    if args.share:
        overrides.append("server.share=true")
    return load_config(args.profile, overrides)


def create_demo(config: AppConfig) -> gr.Blocks:
    # A datastore that must first be built is built in the background: the page comes up at once and says so.
    return build_demo(AudioScribe.from_config(config, background=True))


def launch_kwargs(config: AppConfig) -> dict:
    """Arguments for ``demo.launch``; host and port are passed only when set, so GRADIO_SERVER_NAME/PORT apply."""
    kwargs = dict(share=config.server.share, max_file_size=f"{config.server.max_upload_mb}mb")
    if config.server.host:
        kwargs["server_name"] = config.server.host
    if config.server.port:
        kwargs["server_port"] = config.server.port
    return kwargs

