"""Annotate and Export: a queue of clips (a server folder, a CSV/JSONL list or uploads), one clip at a time with the
models' suggestions kept apart from the annotator's decision, keyboard shortcuts, resume after a reload or a restart,
and exports of the accepted annotations.

Saving a decision is a light event (one SQLite commit, acknowledged when durable); computing the next clip's
suggestions is a heavy one that follows it, so saving never waits behind the models.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import pandas as pd

from app.gpu import gpu
from app.handlers import user_errors
from app.tabs.common import HEAVY, LIGHT, display_name
from engine.annotations import (
    AnnotationStore,
    Clip,
    Decision,
    ModelVersions,
    Suggestion,
    check_queue_name,
    list_queues,
    now_iso,
    open_store,
    queue_name_for,
)
from engine.captioner import Domain
from engine.classifier import parse_class_names
from engine.errors import ConfigError, DatastoreError
from engine.exports import FORMATS, Selection, export
from engine.prompt_tuning import TunedPrompts
from engine.service import AudioScribe

SHORTCUTS = ("**Keys** (outside text boxes): **Space** play/pause · **A** accept · **S** skip · **F** flag · "
             "**N**/→ next · **P**/← previous · **1–9** toggle a label · **E** edit the caption · "
             "**Ctrl+Enter** in the caption: accept")

# Installed once per page by demo.load(js=...): acts only while the Annotate tab is visible and never while typing.
KEYBOARD_JS = """
() => {
  if (window.__audioscribeKeys) return;
  window.__audioscribeKeys = true;
  const click = (selector) => { const el = document.querySelector(selector); if (el) el.click(); };
  const togglePlay = () => {
    const audio = document.querySelector('#annotate-audio audio');
    const button = document.querySelector('#annotate-audio button[aria-label="Play"], ' +
                                          '#annotate-audio button[aria-label="Pause"]');
    if (button) { button.click(); } else if (audio) { audio.paused ? audio.play() : audio.pause(); }
  };
  document.addEventListener('keydown', (e) => {
    const panel = document.querySelector('#annotate-panel');
    if (!panel || panel.offsetParent === null) return;
    const t = e.target;
    const typing = (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'checkbox')) ||
                   t.isContentEditable;
    if (typing) {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); click('#annotate-accept'); }
      if (e.key === 'Escape') t.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.toLowerCase();
    const actions = {a: '#annotate-accept', s: '#annotate-skip', f: '#annotate-flag', n: '#annotate-next',
                     arrowright: '#annotate-next', p: '#annotate-previous', arrowleft: '#annotate-previous'};
    if (actions[key]) { e.preventDefault(); click(actions[key]); return; }
    if (key === ' ') { e.preventDefault(); togglePlay(); return; }
    if (key === 'e') { e.preventDefault(); const box = document.querySelector('#annotate-caption textarea');
                       if (box) box.focus(); return; }
    if (/^[1-9]$/.test(key)) {
      const boxes = document.querySelectorAll('#annotate-labels input[type=checkbox]');
      const box = boxes[Number(key) - 1];
      if (box) { e.preventDefault(); box.click(); }
    }
  });
}
"""


@dataclass
class AnnotateState:
    """One browser session's place in a queue (gr.State): the queue, the clip shown and what was suggested for it."""

    queue: str = ""
    clip_id: str = ""
    started_at: str = ""
    suggestion: Suggestion = field(default_factory=Suggestion)
    models: ModelVersions = field(default_factory=ModelVersions)


def annotator_name(request: gr.Request | None, typed: str) -> str:
    """The logged-in user when the app runs with auth, else the name typed in the tab, else "anonymous"."""
    username = getattr(request, "username", None) if request is not None else None
    return username or " ".join((typed or "").split()) or "anonymous"


class AnnotateHandlers:
    """Queue handling, decisions and exports. Stores are shared by all sessions (one per queue, thread-safe);
    everything about a session is in its AnnotateState."""

    def __init__(self, service: AudioScribe) -> None:
        self.service = service
        self.root = service.config.annotation_root()
        self._stores: dict[str, AnnotationStore] = {}

    def store(self, name: str) -> AnnotationStore:
        name = check_queue_name(name)
        if name not in self._stores:
            self._stores[name] = open_store(self.root, name)
        return self._stores[name]

    def queues(self) -> list[str]:
        return list_queues(self.root) if self.root.is_dir() else []

    # --- opening a queue -----------------------------------------------------------------------------------------

    @user_errors
    def open_queue(self, name: str, server_path: str, uploads: list[str] | None, annotator: str,
                   request: gr.Request) -> tuple:
        """Create or reopen a queue, add the server folder/list and the uploads, and show where this annotator
        resumes."""
        name = (name or "").strip() or queue_name_for(Path(server_path).name if server_path else "uploads")
        store = self.store(name)
        added = self._add(store, server_path, uploads or [])
        if len(store) == 0:
            raise DatastoreError("The queue is empty: give a folder of audio or a CSV/JSONL list on the server, or "
                                 "upload clips")
        who = annotator_name(request, annotator)
        clip = store.resume(who) or store.clips()[0]
        note = f"Queue **{store.name}**: {len(store)} clips ({added} new)."
        return (*self._show(store, clip, who), note, gr.Dropdown(choices=self.queues(), value=store.name))

    def _add(self, store: AnnotationStore, server_path: str, uploads: list[str]) -> int:
        added = 0
        if server_path and server_path.strip():
            if not self.service.config.annotate.server_paths:
                raise ConfigError("Opening server folders is off on this server (annotate.server_paths); upload "
                                  "the clips instead")
            path = Path(server_path.strip()).expanduser()
            added += store.add_folder(path) if path.is_dir() else store.add_list(path)
        if uploads:
            added += store.add_uploads(uploads)
        return added

    # --- showing a clip (light) and its suggestions (heavy) ------------------------------------------------------

    def _show(self, store: AnnotationStore, clip: Clip | None, who: str) -> tuple:
        """(audio, clip line, progress line, caption, labels value, note, state) for ``clip`` (None: all done)."""
        progress = store.progress(who)
        line = (f"{progress.decided} of {progress.total} decided by **{who}** · {progress.accepted} accepted · "
                f"{progress.edited} edited · {progress.skipped} skipped · {progress.flagged} flagged")
        if clip is None:
            return (None, "**All clips are decided.** Export them, or go back with Previous.", line, "", [], "",
                    AnnotateState(store.name))
        previous = store.latest_decision(clip.clip_id, who)
        caption = previous.caption if previous else clip.caption
        labels = list(previous.labels if previous else clip.labels)
        status = f" · your last decision: **{previous.status}**" if previous else ""
        header = f"**{clip.name}** · clip {clip.position + 1} of {len(store)}{status}"
        state = AnnotateState(store.name, clip.clip_id, now_iso())
        return clip.path, header, line, caption, labels, previous.note if previous else "", state

    @user_errors
    def suggest(self, state: AnnotateState, caption: str, labels: list[str], label_text: str,
                tuned: TunedPrompts | None, domain: Domain | None) -> tuple:
        """The models' suggestions for the clip shown; fills the caption and labels only where still empty."""
        if not state or not state.clip_id:
            return "", caption, gr.CheckboxGroup(value=labels), state
        clip = self.store(state.queue).clip(state.clip_id)
        names = parse_class_names(label_text or "")
        suggestion, models = self.service.suggest(self.service.load(clip.path), names, tuned=tuned, domain=domain,
                                                  labels=self.service.config.annotate.suggested_labels)
        state = replace(state, suggestion=suggestion, models=models)
        return (suggestion_markdown(suggestion, models), caption or suggestion.caption,
                gr.CheckboxGroup(choices=names, value=labels or list(suggestion.labels)), state)

    # --- decisions and navigation (light) ------------------------------------------------------------------------

    @user_errors
    def decide(self, status: str, caption: str, labels: list[str], note: str, state: AnnotateState,
               annotator: str, request: gr.Request) -> tuple:
        """Record the decision (returns once it is durable), then show the next clip this annotator has not
        decided."""
        if not state or not state.clip_id:
            raise gr.Error("Open a queue first")
        store, who = self.store(state.queue), annotator_name(request, annotator)
        caption = " ".join((caption or "").split())
        if status == "accept" and state.suggestion.caption and caption != state.suggestion.caption:
            status = "edit"  # the annotator changed the model's caption
        saved = store.record(Decision(state.clip_id, who, status, caption, tuple(labels or ()), state.suggestion,
                                      state.models, started_at=state.started_at, note=note or ""))
        next_clip = store.next_clip(who, after=state.clip_id, undecided_only=True)
        shown = self._show(store, next_clip, who)
        return (*shown, f"Saved: **{saved.status}** ({saved.seconds_spent or 0:.1f} s on this clip).")

    @user_errors
    def move(self, step: int, state: AnnotateState, annotator: str, request: gr.Request) -> tuple:
        if not state or not state.queue:
            raise gr.Error("Open a queue first")
        store, who = self.store(state.queue), annotator_name(request, annotator)
        clips = store.clips()
        index = next((i for i, c in enumerate(clips) if c.clip_id == state.clip_id), len(clips) if step < 0 else -1)
        target = clips[min(max(index + step, 0), len(clips) - 1)]
        return (*self._show(store, target, who), "")

    # --- export ------------------------------------------------------------------------------------------------------

    @user_errors
    def export(self, queue: str, formats: list[str], statuses: list[str]) -> tuple[list[str], pd.DataFrame]:
        """Write the chosen formats into a fresh folder; the audiofolder dataset is zipped for download."""
        if not queue:
            raise DatastoreError("Choose a queue to export")
        if not formats:
            raise ConfigError("Choose at least one export format")
        store = self.store(queue)
        out = Path(tempfile.mkdtemp(prefix=f"audioscribe-export-{store.name}-"))
        selection = Selection(statuses=tuple(statuses or ("accept", "edit")))
        files, rows = [], []
        for fmt in formats:
            result = export(store, fmt, out, selection)
            for path in result.paths:
                path = Path(path)
                if path.is_dir():
                    path = Path(shutil.make_archive(str(out / path.name), "zip", path.resolve()))
                files.append(str(path))
            rows.append((fmt, result.rows, ", ".join(Path(p).name for p in result.paths)))
        return files, pd.DataFrame(rows, columns=["format", "clips", "files"])


def suggestion_markdown(suggestion: Suggestion, models: ModelVersions) -> str:
    """The suggestions as the annotator sees them, apart from the decision fields."""
    lines = [f"**Generated caption:** {suggestion.caption or '—'}"]
    if suggestion.retrieved:
        lines.append("**Retrieved captions:** " + " · ".join(suggestion.retrieved))
    best = sorted(suggestion.scores.items(), key=lambda kv: kv[1], reverse=True)[:5]
    if best:
        scored = ", ".join(f"{name} {score:.2f}" for name, score in best)
        lines.append(f"**Labels ({suggestion.label_source}):** {scored}")
    shown = replace(models, clap_name=display_name(models.clap_name), llm=display_name(models.llm),
                    decoder=display_name(models.decoder))
    lines.append(f"<small>{shown.describe()}</small>")
    return "  \n".join(lines)


def build_annotate_tab(service: AudioScribe, handlers: AnnotateHandlers, label_text: str,
                       tuned: gr.State, domain: gr.State) -> None:
    """The Annotate tab (inside a gr.Tab)."""
    with gr.Column(elem_id="annotate-panel"):
        with gr.Accordion("Queue", open=True):
            with gr.Row():
                queue = gr.Dropdown(handlers.queues(), label="Queue (new name or an existing one)",
                                    allow_custom_value=True, elem_id="annotate-queue")
                server_path = gr.Textbox(label="Folder or CSV/JSONL list on the server", elem_id="annotate-path",
                                         visible=service.config.annotate.server_paths,
                                         placeholder="/data/clips or /data/list.csv (column path)")
                annotator = gr.Textbox(label="Annotator", placeholder="your name (the login name when auth is on)",
                                       elem_id="annotate-annotator")
            uploads = gr.File(label="Or upload clips", file_count="multiple", type="filepath",
                              elem_id="annotate-uploads")
            open_button = gr.Button("Open queue", variant="primary", elem_id="annotate-open")
            queue_note = gr.Markdown(label="Queue status", elem_id="annotate-queue-note")
        with gr.Row():
            with gr.Column(scale=3):
                clip_line = gr.Markdown("Open a queue to start.", label="Clip", elem_id="annotate-clip")
                audio = gr.Audio(type="filepath", label="Clip audio", interactive=False, elem_id="annotate-audio")
                suggestions = gr.Markdown(label="Suggestions (the models)", elem_id="annotate-suggestions")
            with gr.Column(scale=2):
                caption = gr.Textbox(label="Caption (your decision)", lines=2, elem_id="annotate-caption")
                labels = gr.CheckboxGroup(parse_class_names(label_text), label="Labels (your decision)",
                                          elem_id="annotate-labels")
                note = gr.Textbox(label="Note", elem_id="annotate-note")
                with gr.Row():
                    accept = gr.Button("Accept (A)", variant="primary", elem_id="annotate-accept")
                    skip = gr.Button("Skip (S)", elem_id="annotate-skip")
                    flag = gr.Button("Flag (F)", variant="stop", elem_id="annotate-flag")
                with gr.Row():
                    previous = gr.Button("← Previous (P)", elem_id="annotate-previous")
                    next_button = gr.Button("Next (N) →", elem_id="annotate-next")
                saved_note = gr.Markdown(label="Last saved decision", elem_id="annotate-saved")
                progress_line = gr.Markdown(label="Progress", elem_id="annotate-progress")
        with gr.Accordion("Label set", open=False):
            label_box = gr.Textbox(label_text, lines=4, label="Labels offered (one per line or comma-separated)",
                                   elem_id="annotate-label-set")
        gr.Markdown(SHORTCUTS)
    state = gr.State(AnnotateState())
    shown = [audio, clip_line, progress_line, caption, labels, note, state]
    # After every move the models' suggestions follow as a heavy event; one public endpoint, the rest UI-only.
    suggest = dict(fn=gpu(handlers.suggest), inputs=[state, caption, labels, label_box, tuned, domain],
                   outputs=[suggestions, caption, labels, state], **HEAVY)
    private = dict(suggest, api_visibility="private")
    open_button.click(handlers.open_queue, [queue, server_path, uploads, annotator], [*shown, queue_note, queue],
                      api_name="open_queue", api_description="Open or create an annotation queue and resume it",
                      **LIGHT).then(**suggest, api_name="suggest",
                                    api_description="The models' caption and label suggestions for the clip shown")
    for button, status in ((accept, "accept"), (skip, "skip"), (flag, "flag")):
        button.click(_decider(handlers, status), [caption, labels, note, state, annotator], [*shown, saved_note],
                     api_name=f"{status}_clip", api_description=f"Record '{status}' for the clip shown and move on",
                     **LIGHT).then(**private)
    for button, step in ((previous, -1), (next_button, 1)):
        button.click(_mover(handlers, step), [state, annotator], [*shown, saved_note],
                     api_name="previous_clip" if step < 0 else "next_clip",
                     api_description="Show the previous clip" if step < 0 else "Show the next clip",
                     **LIGHT).then(**private)
    label_box.change(lambda text: gr.CheckboxGroup(choices=parse_class_names(text or "") if text else []),
                     [label_box], [labels], api_visibility="private")


def _decider(handlers: AnnotateHandlers, status: str):
    def decide(caption: str, labels: list[str], note: str, state: AnnotateState, annotator: str,
               request: gr.Request) -> tuple:
        return handlers.decide(status, caption, labels, note, state, annotator, request)
    return decide


def _mover(handlers: AnnotateHandlers, step: int):
    def move(state: AnnotateState, annotator: str, request: gr.Request) -> tuple:
        return handlers.move(step, state, annotator, request)
    return move


def build_export_tab(handlers: AnnotateHandlers) -> None:
    """The Export tab (inside a gr.Tab)."""
    with gr.Row():
        with gr.Column():
            queue = gr.Dropdown(handlers.queues(), label="Queue", allow_custom_value=True, elem_id="export-queue")
            formats = gr.CheckboxGroup(list(FORMATS), value=["csv", "audiofolder"], label="Formats",
                                       elem_id="export-formats")
            statuses = gr.CheckboxGroup(["accept", "edit", "skip", "flag"], value=["accept", "edit"],
                                        label="Decisions to export", elem_id="export-statuses")
            refresh = gr.Button("Refresh queues", elem_id="export-refresh")
            go = gr.Button("Export", variant="primary", elem_id="export-button")
        with gr.Column():
            files = gr.File(label="Exported files", file_count="multiple", interactive=False, elem_id="export-files")
            summary = gr.Dataframe(label="Export summary", interactive=False, elem_id="export-summary")
    refresh.click(lambda: gr.Dropdown(choices=handlers.queues()), None, [queue], api_visibility="private")
    go.click(handlers.export, [queue, formats, statuses], [files, summary], api_name="export",
             api_description="Export a queue's decisions (csv, jsonl, audiofolder, label_studio, audiocaps, "
                             "tune_prompts)", **LIGHT)


__all__ = ["AnnotateHandlers", "AnnotateState", "KEYBOARD_JS", "build_annotate_tab", "build_export_tab"]
