"""The Gradio Blocks page: header, banners and the tabs (each built by its module in app/tabs). Loads nothing.

Everything shown here is for a browser user: model names without server paths, no command-line options.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from app.handlers import Handlers
from app.handlers import default_class_names
from app.tabs.adapt import build_adapt_tab
from app.tabs.annotate import KEYBOARD_JS, AnnotateHandlers, build_annotate_tab, build_export_tab
from app.tabs.caption import build_caption_tab
from app.tabs.classify import build_classify_tab
from app.tabs.common import display_name
from engine.config import config_to_dict
from engine.service import AudioScribe

UNTRAINED_BANNER = (
    '<div id="untrained-banner" role="alert" style="background:#fff4e5;border:2px solid #f59e0b;border-radius:8px;'
    'padding:10px 14px;color:#7c2d12">⚠️ <b>Untrained weights.</b> {parts}. Every number and caption below is '
    "computed for real, but on untrained weights it means nothing: this server runs test models.</div>"
)

KNOWS_NOTE = (
    '<div id="model-knows" role="note" style="background:#eef6ff;border:1px solid #60a5fa;border-radius:8px;'
    'padding:10px 14px;color:#1e3a8a">ℹ️ <b>What this model knows.</b> The CLAP is {about}. Sounds outside its '
    "corpus get the nearest thing it knows, with confidence it has not earned. Real-world audio needs a server "
    "running a general CLAP (LAION-CLAP or DRCap).</div>"
)


def display_profile(profile: str) -> str:
    """A shipped profile's name, or a profile file's stem."""
    return Path(profile).stem if profile.endswith(".toml") else profile


def untrained_parts(service: AudioScribe) -> list[str]:
    """Which loaded models have random weights, in words for the banner."""
    parts = []
    if service.clap.is_untrained:
        parts.append(f"The CLAP <code>{html.escape(display_name(service.clap.name))}</code> has random weights")
    captioner = service.captioner
    if captioner is not None and captioner.llm.is_untrained:
        parts.append(f"the LLM <code>{html.escape(display_name(captioner.llm.name))}</code> has random weights")
    if captioner is not None and not captioner.trained:
        parts.append("the DRCap mapping network is untrained")
    return parts


def header_markdown(service: AudioScribe) -> str:
    """Title and what is loaded, in words a browser user can use."""
    s = service.status()
    store = f"{s['datastore_size']:,} captions" if s["datastore_size"] else "none"
    device = "GPU" if str(s["device"]).startswith("cuda") else "CPU"
    captioner = "off" if service.captioner is None else "DRCap" + (" (untrained)" if s["captioner_untrained"] else "")
    return (f"# AudioScribe\nZero-shot audio captioning and classification with CLAP. Profile "
            f"**{display_profile(str(s['profile']))}** · CLAP `{display_name(str(s['clap']))}` "
            f"({s['embedding_dim']}-d, {s['sample_rate']:,} Hz, on {device}) · caption datastore: {store} · "
            f"captioner: {captioner}")


def notices(service: AudioScribe) -> list[str]:
    """Load-time notices worth a browser user's attention; the LLM's is empty when captioning is fast (the engine
    says nothing about a small LLM on a CPU)."""
    captioner = service.captioner
    return [captioner.llm.notice] if captioner is not None and captioner.llm.notice else []


def public_config(service: AudioScribe) -> str:
    """The active configuration as JSON, with the server's home folder written as ~."""
    text = json.dumps(config_to_dict(service.config), indent=2)
    home = str(Path.home())
    return text.replace(json.dumps(home)[1:-1], "~") if home not in ("/", "") else text


def build_header(service: AudioScribe) -> None:
    gr.Markdown(header_markdown(service), elem_id="app-header")
    parts = untrained_parts(service)
    if parts:
        gr.HTML(UNTRAINED_BANNER.format(parts="; ".join(parts)))
    if service.clap.about:
        gr.HTML(KNOWS_NOTE.format(about=html.escape(service.clap.about)))
    for notice in notices(service):
        gr.Markdown(f"ℹ️ {notice}", elem_id="llm-notice")


def readiness_markdown(service: AudioScribe) -> str:
    """What is still loading in the background (a datastore being built), or nothing once all is ready."""
    state = service.readiness
    if state.state == "building":
        return f"⏳ **Still loading:** {state.describe()}. Retrieval and captioning say so until they are ready."
    if state.state == "failed":
        return f"❌ **{state.message}**"
    return ""


def service_status(service: AudioScribe) -> dict:
    """The engine's status for API clients, without server paths."""
    status = service.status()
    for key in ("clap",):
        status[key] = display_name(str(status[key]))
    return status


def build_readiness(service: AudioScribe) -> None:
    """A status line polled every 2 s while something loads in the background; it stops when all is ready."""
    status = gr.Markdown(readiness_markdown(service), elem_id="readiness")
    if service.readiness.state != "building":
        return
    timer = gr.Timer(2.0)

    def poll() -> tuple:
        text = readiness_markdown(service)
        return text, gr.Timer(active=service.readiness.state == "building")

    timer.tick(poll, None, [status, timer], api_visibility="private", queue=False)


def build_demo(service: AudioScribe) -> gr.Blocks:
    """The app for one loaded engine (shared by all users; per-user data lives in gr.State)."""
    handlers = Handlers(service)
    ttl = service.config.server.upload_ttl_s  # Gradio's upload cache: files older than ttl go, checked hourly
    with gr.Blocks(title="AudioScribe", delete_cache=(min(3600, ttl), ttl)) as demo:
        build_header(service)
        domain = gr.State(None)  # this session's active domain (Adapt tab); None = the app's own captions
        annotations = AnnotateHandlers(service)
        with gr.Tab("Caption", id="caption"):
            build_caption_tab(handlers.caption, domain)
        with gr.Tab("Classify", id="classify"):
            tuned = build_classify_tab(handlers.classify, domain)
        with gr.Tab("Annotate", id="annotate"):
            build_annotate_tab(service, annotations, default_class_names(service), tuned, domain)
        with gr.Tab("Export", id="export"):
            build_export_tab(annotations)
        with gr.Tab("Adapt", id="adapt"):
            build_adapt_tab(service, domain, annotations)
        # Not "Settings": Gradio's footer has a Settings link of its own.
        with gr.Tab("Configuration", id="configuration"):
            gr.Markdown("The server's active configuration (read-only).")
            gr.Code(public_config(service), language="json", label="Configuration", elem_id="configuration")
        build_readiness(service)
        def status() -> dict:
            return service_status(service)

        gr.api(status, api_name="status",
               api_description="What the server runs and whether it is ready (readiness: building, ready or failed)")
        demo.load(None, None, None, js=KEYBOARD_JS, api_visibility="private")  # the Annotate tab's shortcuts
    return demo


__all__ = ["build_demo", "display_name", "header_markdown", "untrained_parts"]
