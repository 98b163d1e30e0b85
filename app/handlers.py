"""Event handlers: translate between Gradio values and the engine. No model code and no layout lives here.

Every handler turns the engine's typed errors into ``gr.Error`` so the user sees the message in the page (and an API
client gets it as the error), and returns plain values (markdown strings, DataFrames, dicts, chart specs) that the
tabs in app/tabs render. One handler class per tab; they share one :class:`AudioScribe`.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from app.charts import TUNED, ZERO_SHOT, comparison_chart, timeline_chart
from app.tuning_report import tuning_report
from engine.audio import Audio, Window
from engine.captioner import ClipCaptions, Domain
from engine.clap.base import WindowEmbeddings
from engine.classifier import Classification, parse_class_names
from engine.config import CaptionConfig
from engine.errors import AudioScribeError, ClassifierInputError
from engine.prompt_tuning import META_FILE, PROMPTS_FILE, TunedPrompts, TuningCancelled, format_duration
from engine.service import AudioScribe, top_caption_rows

CAPTION_COLUMNS = ["rank", "caption", "similarity"]
SUPPORT_COLUMNS = ["support caption", "weight"]
TIMELINE_COLUMNS = ["window", "caption", "top labels"]
WINDOW_CLASS_COLUMNS = ["window", "top classes"]
COMPARISON_COLUMNS = ["class", "method", "score"]
DEFAULT_CLASSES = "dog barking\nrain\nsiren\nspeech\nmusic\ncar engine\nbirds chirping\napplause"
NONE_ABOVE = "none above threshold"
MAX_LABEL_CLASSES = 10  # the score list shows the best 10 of any number of classes
MAX_PLOT_CLASSES = 12  # the comparison plot: the best 12 (by either method), still in class order
TOP_PER_WINDOW = 3  # classes named per window in the tables
TIMELINE_CLASSES = 5  # lines in the timeline plot
BEAMS_RANGE, NEW_TOKENS_RANGE = (1, 8), (5, 100)  # per-request generation settings a user may choose


def user_errors(fn: Callable) -> Callable:
    """Show AudioScribe's own errors (bad audio, bad class names, ...) as a message in the page."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:  # the file's name only: a server path means nothing to a browser user
            raise gr.Error(f"File not found: {Path(e.filename).name if e.filename else 'the upload'}") from e
        except AudioScribeError as e:
            raise gr.Error(str(e)) from e
    return wrapper


def default_class_names(service: AudioScribe) -> str:
    """All of the CLAP's own classes when it lists them (the demo bundle: any example clip then has its class in
    the list), else everyday sound classes."""
    known = service.clap.known_classes
    return "\n".join(known) if known else DEFAULT_CLASSES


def describe_audio(audio: Audio) -> str:
    """One line about what was loaded, including any conversion, so sample-rate handling is never silent."""
    conversion = []
    if audio.original_channels > 1:
        conversion.append(f"{audio.original_channels} channels averaged to mono")
    if audio.original_sample_rate != audio.sample_rate:
        conversion.append(f"resampled {audio.original_sample_rate} Hz -> {audio.sample_rate} Hz")
    done = "; ".join(conversion) if conversion else "no conversion needed"
    return f"**{audio.source}**: {audio.duration_s:.2f} s ({done})"


def seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def span(window: Window) -> str:
    """'4–14 s': how a window is named in tables and notes."""
    return f"{seconds(window.start_s)}–{seconds(window.end_s)} s"


def window_note(windows: Sequence[Window], hop_s: float) -> str:
    """Why windows overlap, in one line: the model hears a fixed length at a time, so the last window of a clip that
    is not a whole number of hops long is moved back to end at the clip's end (audio.last_window = "shift")."""
    overlapping = [(a, b) for a, b in zip(windows, windows[1:]) if b.start_s < a.end_s - 1e-6]
    if not overlapping:
        return ""
    length = seconds(windows[0].end_s - windows[0].start_s)
    if overlapping == [(windows[-2], windows[-1])] and windows[-1].start_s - windows[-2].start_s < hop_s - 1e-6:
        heard_twice = seconds(windows[-2].end_s - windows[-1].start_s)
        return (f"Windows overlap: the model hears {length} s at a time, so the last window is moved back to end "
                f"at the clip's end ({span(windows[-1])}) rather than cut short; {heard_twice} s are in both.")
    return f"Windows overlap: a {length}-s window starts every {seconds(hop_s)} s."


def window_lines(windows: Sequence[Window], hop_s: float, max_window_s: float) -> str:
    """'2 window(s) of up to 10 s', plus the overlap note when there is one."""
    note = window_note(windows, hop_s)
    return f" — {len(windows)} window(s) of up to {max_window_s:g} s" + (f"  \n{note}" if note else "")


def top_labels(names: Sequence[str], scores: np.ndarray, count: int = TOP_PER_WINDOW) -> str:
    """'siren 82% · dog 10% · rain 3%': the best classes of one window, compact enough for a narrow column."""
    best = np.argsort(-scores, kind="stable")[:count]
    return " · ".join(f"{names[i]} {100 * float(scores[i]):.0f}%" for i in best)


def window_caption(captions: ClipCaptions | None, window: Window) -> str:
    """The generated caption covering ``window``: its own, that of the merged segment holding it (long audio:
    caption.max_window_captions), or the whole clip's when the clip has one window."""
    if captions is None:
        return ""
    if not captions.per_window:
        return captions.clip.caption
    segment = next(i for i, s in enumerate(captions.windows) if s.start_s <= window.start_s and window.end_s <= s.end_s)
    return captions.per_window[segment].caption


def timeline(result: Classification, captions: Sequence[str]) -> tuple[pd.DataFrame, object]:
    """Per window: its caption and best labels (a table), and the best classes' scores over time (a plot)."""
    names, scores = result.class_names, result.window_scores
    table = pd.DataFrame([(span(w), captions[i], top_labels(names, scores[i])) for i, w in enumerate(result.windows)],
                         columns=TIMELINE_COLUMNS)
    best = np.argsort(-scores.max(axis=0), kind="stable")[:TIMELINE_CLASSES]
    classes = [names[c] for c in best]
    points = [{"time_s": round((w.start_s + w.end_s) / 2, 2), "window": span(w), "class": names[c],
               "score": round(float(scores[i, c]), 4), "caption": captions[i]}
              for i, w in enumerate(result.windows) for c in best]
    return table, timeline_chart(points, classes)


class ServiceHandlers:
    """What every tab's handlers share: the engine and loading an upload."""

    def __init__(self, service: AudioScribe) -> None:
        self.service = service

    def _load(self, audio_path: str | None) -> Audio:
        if not audio_path:
            raise gr.Error("Upload or record some audio first")
        return self.service.load(audio_path)

    def _window_lines(self, windows: Sequence[Window]) -> str:
        audio = self.service.config.audio
        return window_lines(windows, audio.hop_s, audio.window_s)

    def check_audio(self, audio_path: str | None) -> str:
        """Light, on upload: decode the file and say what it is, or why it cannot be used. Returns the message
        instead of raising, so a bad upload never covers earlier results with an error badge."""
        if not audio_path:
            return ""
        try:
            return "✅ " + describe_audio(self.service.load(audio_path))
        except FileNotFoundError as e:
            return f"❌ File not found: {Path(e.filename).name if e.filename else 'the upload'}"
        except AudioScribeError as e:
            return f"❌ {e}"


class CaptionHandlers(ServiceHandlers):
    """The Caption tab: retrieved and generated captions, the support behind them, a per-window timeline."""

    def generation_limits(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(beams, max new tokens) a request may ask for: the usual ranges, widened to the configured values."""
        cfg = self.service.config.caption
        return ((min(BEAMS_RANGE[0], cfg.num_beams), max(BEAMS_RANGE[1], cfg.num_beams)),
                (min(NEW_TOKENS_RANGE[0], cfg.max_new_tokens), max(NEW_TOKENS_RANGE[1], cfg.max_new_tokens)))

    def generation_settings(self, num_beams: float, max_new_tokens: float) -> CaptionConfig:
        """This request's generation settings: a copy of the configured ones (never changed for other users)."""
        values = {"Beams": int(num_beams), "Max new tokens": int(max_new_tokens)}
        for (name, value), (low, high) in zip(values.items(), self.generation_limits()):
            if not low <= value <= high:
                raise gr.Error(f"{name} must be {low}-{high}, got {value}")
        return replace(self.service.config.caption, num_beams=values["Beams"], max_new_tokens=values["Max new tokens"])

    def _labels(self, audio: Audio, label_text: str | None, domain: Domain | None,
                embedded: WindowEmbeddings) -> Classification:
        names = parse_class_names(label_text or "") or parse_class_names(default_class_names(self.service))
        return self.service.classify(audio, names, multi_label=False, domain=domain, embedded=embedded)

    @user_errors
    def retrieve(self, audio_path: str | None, k: float, label_text: str | None = None, domain: Domain | None = None
                 ) -> tuple[str, pd.DataFrame, pd.DataFrame, object]:
        """Audio -> (info line, top-k captions for the clip, timeline table of best retrieved captions, plot)."""
        audio = self._load(audio_path)
        embedded = self.service.embed(audio)  # the request's one audio-tower pass
        found = self.service.retrieve(audio, int(k), domain=domain, embedded=embedded)
        clip = pd.DataFrame(top_caption_rows(found.clip), columns=CAPTION_COLUMNS)
        table, plot = timeline(self._labels(audio, label_text, domain, embedded),
                               [c[0] for c in found.per_window.captions])
        info = (describe_audio(audio) + self._window_lines(found.windows)
                + "  \nTimeline captions: the best retrieved caption per window.")
        return info, clip, table, plot

    @user_errors
    def describe(self, audio_path: str | None, k: float, num_beams: float = 0, max_new_tokens: float = 0,
                 label_text: str | None = None, domain: Domain | None = None
                 ) -> tuple[str, str, pd.DataFrame, pd.DataFrame, pd.DataFrame, object]:
        """Audio -> (info line, generated caption, retrieved captions, support captions, timeline table, plot)."""
        cfg = self.service.config.caption
        settings = self.generation_settings(num_beams or cfg.num_beams, max_new_tokens or cfg.max_new_tokens)
        audio = self._load(audio_path)
        start = time.perf_counter()
        embedded = self.service.embed(audio)  # the request's one audio-tower pass
        clap_ms = 1000 * (time.perf_counter() - start)
        found = self.service.retrieve(audio, int(k), domain=domain, embedded=embedded)
        captions = (self.service.caption(audio, domain=domain, settings=settings, embedded=embedded)
                    if cfg.enabled else None)
        labels = self._labels(audio, label_text, domain, embedded)
        per_window = [window_caption(captions, w) or found.per_window.captions[i][0]
                      for i, w in enumerate(labels.windows)]
        table, plot = timeline(labels, per_window)
        clip = pd.DataFrame(top_caption_rows(found.clip), columns=CAPTION_COLUMNS)
        support = pd.DataFrame([(c, round(w, 4)) for c, w in captions.clip.support_top] if captions else [],
                               columns=SUPPORT_COLUMNS)
        info = describe_audio(audio) + self._window_lines(found.windows)
        if captions is None:
            info += "  \nCaptioning is off on this server: the timeline shows the best retrieved captions."
            return info, "Captioning is off on this server: retrieved captions only.", clip, support, table, plot
        timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in {"clap": clap_ms, **captions.timings_ms}.items())
        info += f"  \nCaptioning time: {timings} ({settings.num_beams} beams, ≤ {settings.max_new_tokens} tokens)"
        return info, captions.clip.caption or "(the model produced an empty caption)", clip, support, table, plot


class ClassifyHandlers(ServiceHandlers):
    """The Classify tab: zero-shot scores, prompt tuning (per session, stoppable), tuned prompts in and out."""

    def __init__(self, service: AudioScribe) -> None:
        super().__init__(service)
        # Control flags per browser session (no user data): runs queued or going, and the ones asked to stop.
        self._running: set[str] = set()
        self._stop_requests: set[str] = set()
        self._exports = Path(tempfile.gettempdir()) / f"audioscribe-prompts-{os.getpid()}"

    @user_errors
    def classify(self, audio_path: str | None, class_text: str, template_text: str, multi_label: bool,
                 threshold: float, tuned: TunedPrompts | None = None, domain: Domain | None = None
                 ) -> tuple[str, dict, pd.DataFrame, object, pd.DataFrame]:
        """Audio + class names -> (info line, scores for the label, top classes per window, zero-shot vs tuned plot,
        the plot's numbers as a table)."""
        audio = self._load(audio_path)
        names = parse_class_names(class_text or "")
        templates = [t for t in (template_text or "").splitlines() if t.strip()] or None
        # One audio-tower pass serves zero-shot and tuned scores (frames only when tuned prompts will use them).
        embedded = self.service.embed(audio, frames=tuned is not None and tuned.is_for(names))
        result = self.service.classify(audio, names, templates, multi_label=multi_label, threshold=threshold,
                                       domain=domain, embedded=embedded)
        windows = pd.DataFrame([(span(w), top_labels(names, result.window_scores[i]))
                                for i, w in enumerate(result.windows)], columns=WINDOW_CLASS_COLUMNS)
        info = describe_audio(audio) + f" — {len(names)} classes, {self._decision(result)}"
        info += self._window_lines(result.windows)
        tuned_scores, note = self._tuned_scores(audio, names, tuned, embedded)
        rows = [(n, ZERO_SHOT, float(s)) for n, s in zip(names, result.scores)]
        if tuned_scores is not None:
            rows += [(n, TUNED, float(s)) for n, s in zip(names, tuned_scores)]
        plotted = self._plotted_classes(names, result.scores, tuned_scores)
        if len(plotted) < len(names):
            note += f"  \nThe plot shows the {len(plotted)} best of the {len(names)} classes."
        plot = comparison_chart([r for r in rows if r[0] in plotted], [n for n in names if n in plotted])
        table = pd.DataFrame([(n, m, round(v, 4)) for n, m, v in rows], columns=COMPARISON_COLUMNS)
        return info + note, self.label_value(result), windows, plot, table

    @staticmethod
    def _decision(result: Classification) -> str:
        if not result.multi_label:
            return f"single-label: **{result.predicted()[0]}**"
        chosen = ", ".join(result.predicted())
        return f"multi-label, sigmoid ≥ {result.threshold:g}: **{chosen or NONE_ABOVE}**"

    @staticmethod
    def label_value(result: Classification) -> dict:
        """Scores for the label component with an explicit headline: the predicted classes, or 'none above
        threshold' when a multi-label result has none (a plain gr.Label would show the top class as if predicted).
        The best MAX_LABEL_CLASSES classes, best first."""
        best = np.argsort(-result.scores, kind="stable")[:MAX_LABEL_CLASSES]
        chosen = result.predicted()
        headline = ", ".join(chosen) if chosen else f"{NONE_ABOVE} ({result.threshold:g})"
        return {"label": headline, "confidences": [{"label": result.class_names[i],
                                                    "confidence": float(result.scores[i])} for i in best]}

    def _tuned_scores(self, audio: Audio, names: list[str], tuned: TunedPrompts | None,
                      embedded: WindowEmbeddings) -> tuple[np.ndarray | None, str]:
        if tuned is None:
            return None, ""
        if not tuned.is_for(names):
            return None, "  \nThe tuned prompts are for other class names: press *Tune prompts* again."
        return self.service.classify_tuned(audio, tuned, embedded).scores["combined"], ""

    @staticmethod
    def _plotted_classes(names: list[str], zero_shot: np.ndarray, tuned: np.ndarray | None) -> set[str]:
        best = zero_shot if tuned is None else np.maximum(zero_shot, tuned)
        return {names[i] for i in np.argsort(-best, kind="stable")[:MAX_PLOT_CLASSES]}

    # --- prompt tuning -------------------------------------------------------------------------------------------

    @staticmethod
    def _session(request: gr.Request | None) -> str:
        return request.session_hash if request and request.session_hash else ""

    def tuning_requested(self, request: gr.Request) -> None:
        """The Tune button was pressed: from now on (even while the run waits in the queue) Stop stops it."""
        session = self._session(request)
        self._stop_requests.discard(session)
        self._running.add(session)

    @user_errors
    def tune(self, class_text: str, multi_label: bool, current: TunedPrompts | None = None,
             domain: Domain | None = None, preset: str | None = None, request: gr.Request = None,
             progress: gr.Progress = gr.Progress()) -> tuple:
        """Tune prompts for the typed classes on datastore captions -> (status, per-class report, prompts, files);
        ``preset`` names a tuning preset (None: the server's settings).

        Stopped by the user: the status says after how many steps and every other output keeps its value (the
        previous prompts stay in use); a stop is an outcome, not an error."""
        names = parse_class_names(class_text or "")
        session = self._session(request)
        self._running.add(session)
        steps = [0]

        def report(fraction: float, message: str) -> None:
            # The engine reports the plan (steps) first, then after every step its fraction done with the time
            # spent and the time left (from the measured cost per step); set-up lines report 0.
            steps[0] += fraction > 0
            progress(fraction, desc=message)

        report(0.0, f"Choosing training captions for {len(names)} classes…")
        try:
            prompts = self.service.tune_prompts(names, multi_label=multi_label, progress=report,
                                                should_stop=lambda: session in self._stop_requests, domain=domain,
                                                preset=preset or None)
        except TuningCancelled:
            kept = ("the previous prompts are kept" if current is not None
                    else "this session has no tuned prompts, so Classify shows zero-shot scores only")
            return f"Stopped after {steps[0]} steps; {kept}.", gr.skip(), gr.skip(), gr.skip()
        finally:
            self._running.discard(session)
            self._stop_requests.discard(session)
        status, table = tuning_report(prompts)
        return f"{status}\n\n{self.timing_note(prompts)}", table, prompts, self.export(prompts)

    @staticmethod
    def timing_note(prompts: TunedPrompts) -> str:
        """How long the run took against the estimate made after its first step, and whether it stopped early."""
        r = prompts.report
        note = (f"Run time {format_duration(r.get('seconds', 0))} (estimated after the first step: "
                f"{format_duration(r.get('estimated_seconds', 0))}; preset `{prompts.config.preset}`).")
        if r.get("stopped_early"):
            note += (f" Stopped early after {len(r.get('epoch_losses', []))} of {prompts.config.epochs} epochs: "
                     "the loss had stopped falling.")
        return note

    def stop_tuning(self, request: gr.Request = None) -> str:
        """Ask this session's tuning run to stop after its current step; says so, or that nothing is running."""
        session = self._session(request)
        if session not in self._running:
            return "Nothing to stop: no tuning run is going in this session."
        self._stop_requests.add(session)
        return "Stopping after the current step…"

    def stopping(self, request: gr.Request = None) -> bool:
        """True while this session's run has been asked to stop and has not yet."""
        return self._session(request) in self._stop_requests

    # --- tuned prompts as files ----------------------------------------------------------------------------------

    def export(self, prompts: TunedPrompts) -> list[str]:
        """prompts.safetensors (tensors + metadata in its header; what Upload reads) and prompts.json (a readable
        copy), in a folder of their own; folders older than the upload TTL are removed on the way."""
        self._prune_exports()
        folder = prompts.save(self._exports / uuid.uuid4().hex)
        return [str(folder / PROMPTS_FILE), str(folder / META_FILE)]

    def _prune_exports(self) -> None:
        cutoff = time.time() - self.service.config.server.upload_ttl_s
        for folder in self._exports.glob("*") if self._exports.is_dir() else []:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)

    @user_errors
    def load_prompts(self, path: str | None) -> tuple[str, str, TunedPrompts, str]:
        """An uploaded prompts.safetensors -> (status, report, prompts for this session, their class names)."""
        if not path:
            raise ClassifierInputError("Choose a prompts.safetensors file to upload")
        prompts = TunedPrompts.load(path, self.service.clap)  # ModelLoadError: another CLAP, not prompts, damaged
        status, table = tuning_report(prompts)
        loaded = (f"Loaded prompts for {len(prompts.class_names)} classes from {Path(path).name}; the class names "
                  "above are now theirs, so *Classify* compares zero-shot and tuned scores.")
        return f"{loaded}\n\n{status}", table, prompts, "\n".join(prompts.class_names)


class Handlers:
    """Every tab's handlers, bound to one shared :class:`AudioScribe`."""

    def __init__(self, service: AudioScribe) -> None:
        self.service = service
        self.caption = CaptionHandlers(service)
        self.classify = ClassifyHandlers(service)


__all__ = ["CaptionHandlers", "ClassifyHandlers", "Handlers", "ServiceHandlers", "default_class_names",
           "describe_audio", "user_errors", "window_note"]
