"""Caption: generated and retrieved captions for a clip, the support captions behind the generated one, generation
settings per request, and long audio as a timeline (one caption and the top labels per window)."""
from __future__ import annotations

import gradio as gr

from app.gpu import gpu
from app.handlers import (
    CAPTION_COLUMNS,
    SUPPORT_COLUMNS,
    TIMELINE_COLUMNS,
    CaptionHandlers,
    default_class_names,
)
from app.tabs.common import HEAVY, LIGHT, example_clips


def build_caption_tab(handlers: CaptionHandlers, domain: gr.State) -> None:
    """The Caption tab's components and events, inside the current Blocks (call within ``gr.Tab``); ``domain`` is
    the session's active domain (Adapt tab), None for the app's own captions."""
    cfg = handlers.service.config
    beam_range, token_range = handlers.generation_limits()
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="caption-audio")
            audio_check = gr.Markdown(label="Upload check", elem_id="caption-audio-check")
            top_k = gr.Slider(1, 20, value=cfg.datastore.top_k, step=1, label="Captions to retrieve",
                              elem_id="caption-top-k")
            with gr.Accordion("Generation settings (this request only)", open=False, elem_id="generation-settings"):
                beams = gr.Slider(*beam_range, value=cfg.caption.num_beams, step=1, label="Beams",
                                  info="Beam search width: more beams, steadier captions, slower", elem_id="beams")
                max_tokens = gr.Slider(*token_range, value=cfg.caption.max_new_tokens, step=1,
                                       label="Max new tokens", info="Longest caption, in tokens",
                                       elem_id="max-new-tokens")
                labels = gr.Textbox(default_class_names(handlers.service), lines=4, label="Timeline labels",
                                    info="Classes scored per window in the timeline; one per line or comma-separated",
                                    elem_id="timeline-labels")
            with gr.Row():
                describe_button = gr.Button("Describe", variant="primary", elem_id="describe-button")
                retrieve_button = gr.Button("Retrieve only", elem_id="retrieve-button")
            gr.Examples(example_clips(), inputs=[audio], label="Example clips")
        with gr.Column():
            info = gr.Markdown(label="Audio and timing", elem_id="caption-info", min_height=40)
            generated = gr.Textbox(label="Generated caption (DRCap, whole clip)", interactive=False,
                                   elem_id="generated-caption")
            retrieved = gr.Dataframe(headers=CAPTION_COLUMNS, label="Retrieved captions (whole clip)",
                                     interactive=False, wrap=True, column_widths=["12%", "68%", "20%"],
                                     elem_id="retrieved-captions")
            support = gr.Dataframe(headers=SUPPORT_COLUMNS, label="Support captions that shaped the projection",
                                   interactive=False, wrap=True, column_widths=["80%", "20%"],
                                   elem_id="support-captions")
    # The timeline gets the full width below: per window a caption and labels, and the labels over time.
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Timeline** — one row per model window (a clip longer than a window gets several).")
            windows = gr.Dataframe(headers=TIMELINE_COLUMNS, label="Timeline: caption and top labels per window",
                                   interactive=False, wrap=True, column_widths=["14%", "54%", "32%"],
                                   elem_id="caption-timeline")
            plot = gr.Plot(label="Top labels over time", elem_id="timeline-plot")
    _wire(handlers, audio, audio_check, [top_k, beams, max_tokens, labels, domain], describe_button, retrieve_button,
          [info, generated, retrieved, support, windows, plot])


def _wire(handlers: CaptionHandlers, audio: gr.Audio, audio_check: gr.Markdown, settings: list, describe_button,
          retrieve_button, outputs: list) -> None:
    top_k, beams, max_tokens, labels, domain = settings
    info, generated, retrieved, support, windows, plot = outputs
    audio.change(handlers.check_audio, [audio], [audio_check], api_name="check_caption_audio",
                 api_description="Decode an audio file and say what it is (duration, conversion) or why it cannot "
                                 "be used; light, never waits behind model work", **LIGHT)
    # Progress and errors show on the info line only: an error never covers the earlier results below it.
    describe_button.click(gpu(handlers.describe), [audio, top_k, beams, max_tokens, labels, domain], outputs,
                          api_name="describe",
                          api_description="Caption a clip: generated caption (DRCap), top-k retrieved captions, the "
                                          "support captions behind the generation, and a per-window timeline of "
                                          "captions and top labels (table and plot)",
                          show_progress_on=[info], **HEAVY)
    retrieve_button.click(gpu(handlers.retrieve), [audio, top_k, labels, domain], [info, retrieved, windows, plot],
                          api_name="retrieve",
                          api_description="Retrieve the top-k datastore captions for a clip, and per window the best "
                                          "retrieved caption and top labels (no generation: fast)",
                          show_progress_on=[info], **HEAVY)


__all__ = ["build_caption_tab"]
