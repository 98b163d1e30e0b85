"""Classify: zero-shot scores for typed class names, prompt tuning for them (per browser session, with progress and
Stop), zero-shot vs tuned scores side by side, and tuned prompts downloaded or uploaded as a .safetensors file."""
from __future__ import annotations

import gradio as gr

from app.gpu import gpu
from app.handlers import COMPARISON_COLUMNS, WINDOW_CLASS_COLUMNS, ClassifyHandlers, default_class_names
from app.tabs.common import HEAVY, LIGHT, UI_ONLY, example_clips, headline_label

TUNE_HELP = ("*Tune prompts* learns prompt vectors for the class names above from datastore captions that mention "
             "them (no audio needed); *Classify* then shows tuned next to zero-shot scores. The progress line gives "
             "the number of steps at once and, from the first step on, the time spent and an estimate of the time "
             "left (a run grows with the square of the class count). Tuned prompts stay in this browser session: "
             "download them to keep them, upload them to use them again.")
NOT_TUNED = "No prompts tuned in this session yet."
# (label, TUNING_PRESETS name): what each costs is in benchmarks/RESULTS.md, "Prompt tuning"
PRESET_CHOICES = [("Quick", "quick"), ("Default", "default"), ("Paper's code", "reference")]
PRESET_HELP = ("Quick: 8 prompt vectors, ≤ 32 captions per class, ≤ 6 epochs, stops when the loss stops falling "
               "(seconds to minutes on a CPU). Default: 32 vectors, ≤ 128 captions, 10 epochs. Paper's code: the "
               "AFPT code's settings, float32 (slowest).")


def build_classify_tab(handlers: ClassifyHandlers, domain: gr.State) -> gr.State:
    """The Classify tab's components and events, inside the current Blocks (call within ``gr.Tab``). ``domain`` is
    the session's active domain; returns the session's tuned prompts (the Annotate tab scores labels with them)."""
    cfg = handlers.service.config
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio",
                             elem_id="classify-audio")
            audio_check = gr.Markdown(label="Upload check", elem_id="classify-audio-check")
            class_names = gr.Textbox(default_class_names(handlers.service), lines=8, max_lines=12, label="Class names",
                                     info="One per line or comma-separated", elem_id="class-names")
            templates = gr.Textbox("\n".join(cfg.classify.templates), lines=2, label="Prompt templates",
                                   info="One per line, {} marks the class name; several are averaged",
                                   elem_id="prompt-templates")
            with gr.Row():
                multi_label = gr.Checkbox(cfg.classify.multi_label, label="Multi-label (sigmoid)",
                                          elem_id="multi-label")
                threshold = gr.Slider(0.01, 0.99, value=cfg.classify.threshold, step=0.01,
                                      label="Multi-label threshold", elem_id="threshold")
            classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
            with gr.Group():
                preset = gr.Radio(PRESET_CHOICES, value=cfg.tuning.preset, label="Tuning preset", info=PRESET_HELP,
                                  elem_id="tune-preset")
                with gr.Row():
                    tune_button = gr.Button("Tune prompts", elem_id="tune-button")
                    stop_button = gr.Button("Stop tuning", variant="stop", interactive=False, elem_id="stop-button")
                # Right under the buttons and never empty: tuning progress shows here from the first run on.
                tune_status = gr.Markdown(NOT_TUNED, label="Tuning status", min_height=72, padding=True,
                                          elem_id="tune-progress")
            gr.Markdown(TUNE_HELP)
            with gr.Row():
                prompt_files = gr.File(label="Tuned prompts (download)", file_count="multiple", interactive=False,
                                       elem_id="prompts-download")
                upload = gr.UploadButton("Upload tuned prompts (.safetensors)", file_types=[".safetensors"],
                                         size="md", elem_id="prompts-upload")
            gr.Examples(example_clips(), inputs=[audio], label="Example clips")
        with gr.Column():
            info = gr.Markdown(label="Audio and decision", elem_id="classify-info", min_height=40)
            scores = headline_label(label="Zero-shot scores (whole clip)", elem_id="classify-scores")
            plot = gr.Plot(label="Zero-shot vs tuned prompts", elem_id="comparison-plot")
            with gr.Accordion("Scores as a table", open=False):
                table = gr.Dataframe(headers=COMPARISON_COLUMNS, label="Zero-shot and tuned scores per class",
                                     interactive=False, elem_id="comparison-table")
            windows = gr.Dataframe(headers=WINDOW_CLASS_COLUMNS, label="Top classes per window", interactive=False,
                                   wrap=True, column_widths=["22%", "78%"], elem_id="classify-windows")
    with gr.Row():
        report = gr.Markdown(label="Tuning report", elem_id="tune-report")
    tuned = gr.State(None)  # per browser session: other users never see these prompts

    audio.change(handlers.check_audio, [audio], [audio_check], api_name="check_classify_audio",
                 api_description="Decode an audio file and say what it is or why it cannot be used (light)", **LIGHT)
    classify_button.click(gpu(handlers.classify),
                          [audio, class_names, templates, multi_label, threshold, tuned, domain],
                          [info, scores, windows, plot, table], api_name="classify",
                          api_description="Zero-shot scores of a clip for the class names (and, with prompts tuned "
                                          "in this session for the same names, tuned scores beside them)",
                          show_progress_on=[info], **HEAVY)
    _wire_tuning(handlers, (class_names, multi_label, tuned, domain, preset), (tune_button, stop_button, upload),
                 (tune_status, report, prompt_files))
    return tuned


def _wire_tuning(handlers: ClassifyHandlers, inputs: tuple, buttons: tuple, outputs: tuple) -> None:
    """Tune: disable Tune and enable Stop, run (progress under the buttons), then the other way round, whatever
    the outcome. Stop and Upload never wait behind model work."""
    class_names, multi_label, tuned, domain, preset = inputs
    tune_button, stop_button, upload = buttons
    tune_status, report, prompt_files = outputs

    def started(request: gr.Request) -> tuple:
        handlers.tuning_requested(request)
        return gr.Button(interactive=False), gr.Button(interactive=True, value="Stop tuning")

    def finished() -> tuple:
        return gr.Button(interactive=True), gr.Button(interactive=False, value="Stop tuning")

    def stopped(request: gr.Request) -> gr.Button:  # "Stopping…" only while a run is really stopping
        return gr.Button(interactive=False, value="Stopping…" if handlers.stopping(request) else "Stop tuning")

    run = tune_button.click(started, None, [tune_button, stop_button], api_name="tune_started", **UI_ONLY)
    run = run.then(gpu(handlers.tune), [class_names, multi_label, tuned, domain, preset],
                   [tune_status, report, tuned, prompt_files],
                   api_name="tune_prompts",
                   api_description="Tune prompts for the class names on datastore captions (for this session "
                                   "only) with a preset (quick, default or reference); returns the status (with a warning per class no caption mentions), the "
                                   "per-class report and the prompt files. Stopped: says after how many steps",
                   show_progress_on=[tune_status], **HEAVY)
    run.then(finished, None, [tune_button, stop_button], api_name="tune_finished", **UI_ONLY)
    stop = stop_button.click(handlers.stop_tuning, None, [tune_status], api_name="stop_tuning",
                             api_description="Stop this session's tuning run after its current step (the previous "
                                             "prompts stay); says so, or that no run is going", **LIGHT)
    stop.then(stopped, None, [stop_button], api_name="stop_requested", **UI_ONLY)
    upload.upload(handlers.load_prompts, [upload], [tune_status, report, tuned, class_names],
                  api_name="load_prompts",
                  api_description="Use uploaded tuned prompts (a prompts.safetensors downloaded from this app) in "
                                  "this session; refused with a message for another CLAP's prompts or another file",
                  show_progress_on=[tune_status], concurrency_id="light", concurrency_limit=None)


__all__ = ["build_classify_tab"]
