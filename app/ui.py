"""The Gradio Blocks layout. ``build_demo`` wires components to :class:`app.handlers.Handlers`; it loads nothing."""
from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from app.handlers import CAPTION_COLUMNS, WINDOW_DESCRIBE_COLUMNS, Handlers
from engine.config import config_to_dict
from engine.service import AudioScribe

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
DEFAULT_CLASSES = "dog barking\nrain\nsiren\nspeech\nmusic\ncar engine\nbirds chirping\napplause"

UNTRAINED_BANNER = (
    '<div id="untrained-banner" role="alert" style="background:#fff4e5;border:2px solid #f59e0b;border-radius:8px;'
    'padding:10px 14px;color:#7c2d12">⚠️ <b>Untrained weights.</b> {parts}. Every number and caption below is '
    "computed for real, but on untrained weights it means nothing. The server was started with test models; the "
    "default profile serves the trained demo bundle.</div>"
)


def untrained_parts(service: AudioScribe) -> list[str]:
    """Which loaded models have random weights, in words for the banner."""
    parts = []
    if service.clap.is_untrained:
        parts.append(f"The CLAP <code>{html.escape(service.clap.name)}</code> has random weights")
    captioner = service.captioner
    if captioner is not None and captioner.llm.is_untrained:
        parts.append(f"the LLM <code>{html.escape(captioner.llm.name)}</code> has random weights")
    if captioner is not None and not captioner.trained:
        parts.append("the DRCap mapping network is untrained (no caption.checkpoint)")
    return parts


KNOWS_NOTE = (
    '<div id="model-knows" role="note" style="background:#eef6ff;border:1px solid #60a5fa;border-radius:8px;'
    'padding:10px 14px;color:#1e3a8a">ℹ️ <b>What this model knows.</b> The CLAP is {about}. Sounds outside its '
    "corpus get the nearest thing it knows, with confidence it has not earned. For real-world audio use a "
    "LAION-CLAP or DRCap checkpoint (README: Profiles).</div>"
)


def default_class_names(service: AudioScribe) -> str:
    """All of the CLAP's own classes when it lists them (the demo bundle: any example clip then has its class in
    the list), else everyday sound classes."""
    known = service.clap.known_classes
    return "\n".join(known) if known else DEFAULT_CLASSES


def header_markdown(service: AudioScribe) -> str:
    s = service.status()
    store = f"{s['datastore_size']:,} captions ({s['datastore_index']} index)" if s["datastore_size"] else "none"
    return (f"# AudioScribe\nZero-shot audio captioning and classification with CLAP. Profile **{s['profile']}** · "
            f"CLAP `{s['clap']}` ({s['embedding_dim']}-d, {s['sample_rate']} Hz, {s['device']}) · datastore: {store}")


def example_clips() -> list[list[str]]:
    """The shipped example clips (assets/examples; their sources and licenses are in its README)."""
    return [[str(p)] for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix in (".wav", ".ogg", ".flac")]


def build_demo(service: AudioScribe) -> gr.Blocks:
    """The app for one loaded engine (shared by all users; per-user data lives in gr.State)."""
    handlers = Handlers(service)
    cfg = service.config
    ttl = cfg.server.upload_ttl_s  # Gradio's upload cache: files older than ttl go, checked hourly (or every ttl)
    with gr.Blocks(title="AudioScribe", delete_cache=(min(3600, ttl), ttl)) as demo:
        gr.Markdown(header_markdown(service))
        parts = untrained_parts(service)
        if parts:
            gr.HTML(UNTRAINED_BANNER.format(parts="; ".join(parts)))
        if service.clap.about:
            gr.HTML(KNOWS_NOTE.format(about=html.escape(service.clap.about)))
        if service.captioner is not None and service.captioner.llm.notice:
            gr.Markdown(f"ℹ️ {service.captioner.llm.notice}")

        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    caption_audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio")
                    top_k = gr.Slider(1, 20, value=cfg.datastore.top_k, step=1, label="Captions to retrieve")
                    with gr.Row():
                        caption_button = gr.Button("Describe", variant="primary")
                        retrieve_button = gr.Button("Retrieve only")
                    gr.Examples(example_clips(), inputs=[caption_audio], label="Example clips")
                with gr.Column():
                    caption_info = gr.Markdown()
                    generated = gr.Textbox(label="Generated caption (DRCap, whole clip)", interactive=False)
                    caption_table = gr.Dataframe(headers=CAPTION_COLUMNS, label="Retrieved captions (whole clip)",
                                                 interactive=False, wrap=True)
                    window_table = gr.Dataframe(headers=WINDOW_DESCRIBE_COLUMNS, label="Per window",
                                                interactive=False, wrap=True)
            caption_button.click(handlers.describe, [caption_audio, top_k],
                                 [caption_info, generated, caption_table, window_table], api_name="describe")
            # Retrieval alone, for API clients that do not need the (slower) generated caption.
            retrieve_button.click(handlers.retrieve, [caption_audio, top_k], [caption_info, caption_table, window_table],
                                  api_name="retrieve")

        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    classify_audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio")
                    class_names = gr.Textbox(default_class_names(service), lines=8, label="Class names",
                                             info="One per line or comma-separated")
                    templates = gr.Textbox("\n".join(cfg.classify.templates), lines=2, label="Prompt templates",
                                           info="One per line, {} marks the class name; several are averaged")
                    with gr.Row():
                        multi_label = gr.Checkbox(cfg.classify.multi_label, label="Multi-label (sigmoid)")
                        threshold = gr.Slider(0.01, 0.99, value=cfg.classify.threshold, step=0.01,
                                              label="Multi-label threshold")
                    classify_button = gr.Button("Classify", variant="primary")
                    with gr.Row():
                        tune_button = gr.Button("Tune prompts")
                        stop_button = gr.Button("Stop tuning", variant="stop")
                    gr.Markdown("*Tune prompts* learns prompt vectors for the class names above from captions in "
                                "the datastore that mention them (no audio needed), then *Classify* shows tuned "
                                "next to zero-shot scores. The tuned prompts are kept for this browser session only.")
                    gr.Examples(example_clips(), inputs=[classify_audio], label="Example clips")
                with gr.Column():
                    classify_info = gr.Markdown()
                    scores = gr.Label(num_top_classes=10, label="Zero-shot scores (whole clip)")
                    comparison = gr.BarPlot(x="class", y="score", color="method", label="Zero-shot vs tuned prompts",
                                            y_lim=[0, 1], x_label_angle=-40, x_title="")
                    window_scores = gr.Dataframe(label="Zero-shot scores per window", interactive=False)
                    tune_report = gr.Markdown()
            tuned_prompts = gr.State(None)  # per browser session: other users never see these prompts
            classify_button.click(handlers.classify,
                                  [classify_audio, class_names, templates, multi_label, threshold, tuned_prompts],
                                  [classify_info, scores, window_scores, comparison], api_name="classify")
            tune_button.click(handlers.tune, [class_names, multi_label], [tune_report, tuned_prompts],
                                       api_name="tune_prompts")
            stop_button.click(handlers.stop_tuning, None, [tune_report], api_name="stop_tuning")

        with gr.Tab("Settings"):
            gr.Markdown("The active configuration (change it with `--profile`, `--set section.field=value` or "
                        "`AUDIOSCRIBE_SECTION__FIELD` environment variables).")
            gr.Code(json.dumps(config_to_dict(cfg), indent=2), language="json", label="Configuration")
    return demo
