"""Adapt: a new domain from captions alone (DRCap's adaptation). Upload caption files or take the captions accepted
in Annotate, build their datastore (the retrieval pool and the projection support), use it in this browser session,
and caption one clip before and after. A domain belongs to the session that built it unless saved under a name.
"""
from __future__ import annotations

from collections.abc import Sequence

import gradio as gr
import pandas as pd

from app.gpu import gpu
from app.handlers import user_errors
from app.tabs.annotate import AnnotateHandlers
from app.tabs.common import HEAVY, LIGHT
from engine.captioner import Domain
from engine.datastore import read_captions, unique_captions
from engine.errors import DatastoreError
from engine.service import AudioScribe

COMPARE_COLUMNS = ["captions from", "generated caption", "best retrieved caption"]


class AdaptHandlers:
    """Build, save, choose and compare domains; the active domain lives in the caller's session state."""

    def __init__(self, service: AudioScribe, annotations: AnnotateHandlers | None = None) -> None:
        self.service = service
        self.annotations = annotations

    @user_errors
    def build(self, files: Sequence[str] | None, queue: str | None, name: str,
              progress: gr.Progress = gr.Progress()) -> tuple[str, Domain]:
        """Caption files + the captions accepted (or edited) in an annotation queue -> a domain for this session."""
        captions = unique_captions([*self._read(files or []), *self._accepted(queue)])
        if not captions:
            raise DatastoreError("No captions to build a domain from: upload a .txt (one caption per line), a CSV "
                                 "with a 'caption' column or a JSONL with a 'target' field, or accept captions in "
                                 "Annotate first")
        progress(0, desc=f"Embedding {len(captions):,} captions")
        domain = self.service.build_domain(
            name, captions, progress=lambda done, total: progress(done / total, desc=f"Embedded {done:,}/{total:,}"))
        return self._describe(domain, "built for this browser session"), domain

    def _accepted(self, queue: str | None) -> list[str]:
        if not queue or self.annotations is None:
            return []
        decisions = self.annotations.store(queue).decisions(latest_only=True, statuses=("accept", "edit"))
        return [d.caption for d in decisions if d.caption]

    def _read(self, files: Sequence[str]) -> list[str]:
        ds = self.service.config.datastore
        captions: list[str] = []
        for path in files:
            captions += read_captions(path, ds.csv_column, ds.jsonl_field, ds.max_caption_file_mb)
        return captions

    @user_errors
    def save(self, domain: Domain | None) -> tuple[str, gr.Dropdown]:
        if domain is None:
            raise DatastoreError("Build a domain first")
        self.service.save_domain(domain)
        return (self._describe(domain, "saved: every session can now choose it"),
                gr.Dropdown(choices=self.service.domain_names(), value=domain.name))

    @user_errors
    def choose(self, name: str | None) -> tuple[str, Domain | None]:
        if not name:
            return self._describe(None, ""), None
        domain = self.service.load_domain(name)
        return self._describe(domain, "loaded from the saved domains"), domain

    def reset(self) -> tuple[str, None]:
        return self._describe(None, ""), None

    @user_errors
    def compare(self, audio_path: str | None, domain: Domain | None) -> pd.DataFrame:
        """The same clip captioned with the default captions and with the session's domain."""
        if not audio_path:
            raise gr.Error("Upload or record a clip to compare")
        if domain is None:
            raise DatastoreError("Build or choose a domain first: the comparison is default vs your domain")
        audio = self.service.load(audio_path)
        embedded = self.service.embed(audio)  # one audio pass for both domains: only the captions differ
        rows = []
        for label, chosen in (("default", None), (f"domain {domain.name}", domain)):
            found = self.service.retrieve(audio, 1, domain=chosen, embedded=embedded).clip.captions[0][0]
            generated = (self.service.caption(audio, domain=chosen, embedded=embedded).clip.caption
                         if self.service.captioner else "")
            rows.append((label, generated or "(captioning is off)", found))
        return pd.DataFrame(rows, columns=COMPARE_COLUMNS)

    def _describe(self, domain: Domain | None, how: str) -> str:
        if domain is None:
            return "Active domain: **the default** (the app's own datastore)."
        store = domain.datastore
        return (f"Active domain: **{domain.name}**, {len(store):,} captions, {how}. Captioning, retrieval and "
                "tuning in this browser session now use these captions.")


def build_adapt_tab(service: AudioScribe, domain: gr.State, annotations: AnnotateHandlers) -> None:
    """The Adapt tab; ``domain`` is the session's active domain (read by the other tabs' events)."""
    handlers = AdaptHandlers(service, annotations)
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Caption files (.txt, .csv, .jsonl)", file_count="multiple",
                            file_types=[".txt", ".csv", ".tsv", ".jsonl"], elem_id="adapt-files")
            queue = gr.Dropdown(annotations.queues(), label="And the captions accepted in this annotation queue",
                                allow_custom_value=True, elem_id="adapt-queue")
            name = gr.Textbox("my-domain", label="Domain name", elem_id="adapt-name")
            with gr.Row():
                build = gr.Button("Build domain", variant="primary", elem_id="adapt-build")
                save = gr.Button("Save for every session", elem_id="adapt-save")
            with gr.Row():
                saved = gr.Dropdown(service.domain_names(), label="Saved domains", elem_id="adapt-saved")
                reset = gr.Button("Use the default", elem_id="adapt-reset")
        with gr.Column():
            status = gr.Markdown(handlers._describe(None, ""), label="Active domain", elem_id="adapt-status")
            clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip to compare",
                            elem_id="adapt-audio")
            compare = gr.Button("Caption before and after", elem_id="adapt-compare")
            table = gr.Dataframe(headers=COMPARE_COLUMNS, label="Default vs domain", interactive=False, wrap=True,
                                 column_widths=["22%", "39%", "39%"], elem_id="adapt-compare-table")
    build.click(gpu(handlers.build), [files, queue, name], [status, domain], api_name="build_domain",
                api_description="Build a domain (datastore + projection support) for this session from caption "
                                "files and the captions accepted in an annotation queue",
                **HEAVY)
    save.click(handlers.save, [domain], [status, saved], api_name="save_domain",
               api_description="Save this session's domain under its name for every session", **LIGHT)
    saved.change(handlers.choose, [saved], [status, domain], api_name="choose_domain",
                 api_description="Use a saved domain in this session", **LIGHT)
    reset.click(handlers.reset, None, [status, domain], api_name="reset_domain",
                api_description="Go back to the app's default captions in this session", **LIGHT)
    compare.click(gpu(handlers.compare), [clip, domain], [table], api_name="compare_domain",
                  api_description="Caption a clip with the default captions and with this session's domain",
                  **HEAVY)


__all__ = ["AdaptHandlers", "build_adapt_tab"]
