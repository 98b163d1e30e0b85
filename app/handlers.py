"""Event handlers: translate between Gradio values and the engine. No model code lives here.

Every handler turns the engine's typed errors into ``gr.Error`` so the user sees the message in the page, and
returns plain values (markdown strings, DataFrames, dicts) that Gradio renders.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from engine.audio import Audio
from engine.classifier import parse_class_names
from engine.errors import AudioScribeError
from engine.prompt_tuning import TunedPrompts
from engine.service import AudioScribe, top_caption_rows

CAPTION_COLUMNS = ["rank", "caption", "similarity"]
WINDOW_DESCRIBE_COLUMNS = ["window", "start_s", "end_s", "generated caption", "best retrieved caption", "similarity"]
MAX_WINDOW_COLUMNS = 10  # per-window table: the best classes only, so 500 class names stay readable
WINDOW_CAPTION_COLUMNS = ["window", "start_s", "end_s", "best caption", "similarity"]


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


def comparison_table(names: list[str], zero_shot: np.ndarray, tuned: np.ndarray | None) -> pd.DataFrame:
    """Rows for the bar plot: each class's zero-shot bar followed by its tuned bar (Gradio's BarPlot stacks bars that
    share an x value, so each bar gets its own label, in this order)."""
    rows = []
    for i, name in enumerate(names):
        rows.append((f"{name} · zero-shot", "zero-shot", float(zero_shot[i])))
        if tuned is not None:
            rows.append((f"{name} · tuned", "tuned prompts", float(tuned[i])))
    return pd.DataFrame(rows, columns=["class", "method", "score"])


def describe_audio(audio: Audio) -> str:
    """One line about what was loaded, including any conversion, so sample-rate handling is never silent."""
    conversion = []
    if audio.original_channels > 1:
        conversion.append(f"{audio.original_channels} channels averaged to mono")
    if audio.original_sample_rate != audio.sample_rate:
        conversion.append(f"resampled {audio.original_sample_rate} Hz -> {audio.sample_rate} Hz")
    done = "; ".join(conversion) if conversion else "no conversion needed"
    return f"**{audio.source}**: {audio.duration_s:.2f} s ({done})"


def _window_caption(captions, window) -> str:
    """The generated caption covering ``window``: its own, that of the merged segment holding it (long audio:
    caption.max_window_captions), or the whole clip's when the clip has one window."""
    if captions is None:
        return ""
    if not captions.per_window:
        return captions.clip.caption
    segment = next(i for i, s in enumerate(captions.windows) if s.start_s <= window.start_s and window.end_s <= s.end_s)
    return captions.per_window[segment].caption


class Handlers:
    """The app's callbacks, bound to one shared :class:`AudioScribe`."""

    def __init__(self, service: AudioScribe) -> None:
        self.service = service
        self._stop_requests: set[str] = set()  # sessions that pressed Stop while tuning (control flags, no user data)

    def _load(self, audio_path: str | None) -> Audio:
        if not audio_path:
            raise gr.Error("Upload or record some audio first")
        return self.service.load(audio_path)

    @user_errors
    def retrieve(self, audio_path: str | None, k: float) -> tuple[str, pd.DataFrame, pd.DataFrame]:
        """Audio -> (info line, top-k captions for the clip, best caption per window)."""
        audio = self._load(audio_path)
        found = self.service.retrieve(audio, int(k))
        clip = pd.DataFrame(top_caption_rows(found.clip), columns=CAPTION_COLUMNS)
        windows = pd.DataFrame(
            [(w.index + 1, round(w.start_s, 2), round(w.end_s, 2), found.per_window.captions[i][0],
              round(float(found.per_window.scores[i][0]), 4)) for i, w in enumerate(found.windows)],
            columns=WINDOW_CAPTION_COLUMNS)
        info = describe_audio(audio) + f" — {len(found.windows)} window(s) of up to {self.service.config.audio.window_s:g} s"
        return info, clip, windows

    @user_errors
    def describe(self, audio_path: str | None, k: float) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
        """Audio -> (info line, generated caption, retrieved captions for the clip, per-window captions)."""
        audio = self._load(audio_path)
        found = self.service.retrieve(audio, int(k))
        captions = self.service.caption(audio) if self.service.captioner else None
        clip = pd.DataFrame(top_caption_rows(found.clip), columns=CAPTION_COLUMNS)
        rows = []
        for i, w in enumerate(found.windows):
            generated = _window_caption(captions, w)
            rows.append((w.index + 1, round(w.start_s, 2), round(w.end_s, 2), generated,
                         found.per_window.captions[i][0], round(float(found.per_window.scores[i][0]), 4)))
        windows = pd.DataFrame(rows, columns=WINDOW_DESCRIBE_COLUMNS)
        info = describe_audio(audio) + f" — {len(found.windows)} window(s) of up to {self.service.config.audio.window_s:g} s"
        if captions:
            timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in captions.timings_ms.items())
            info += f"  \nCaptioning time: {timings}"
            text = captions.clip.caption or "(the model produced an empty caption)"
        else:
            text = "Captioning is off in this profile (caption.enabled = false): retrieved captions only."
        return info, text, clip, windows

    @user_errors
    def tune(self, class_text: str, multi_label: bool, request: gr.Request,
             progress: gr.Progress = gr.Progress()) -> tuple[str, TunedPrompts]:
        """Tune prompts for the typed classes on datastore captions; the result goes to this session's state only."""
        names = parse_class_names(class_text or "")
        session = request.session_hash if request else ""
        self._stop_requests.discard(session)
        prompts = self.service.tune_prompts(
            names, multi_label=multi_label, progress=lambda fraction, message: progress(fraction, desc=message),
            should_stop=lambda: session in self._stop_requests)
        report = prompts.report
        text = (f"Tuned {len(names)} classes in {report['seconds']:.1f} s ({report['steps']} steps, "
                f"{report['texts']} training captions; loss {report['epoch_losses'][0]:.3f} → "
                f"{report['epoch_losses'][-1]:.3f}). These prompts stay in this browser session only.\n\n"
                f"```\n{report['selection']}\n```")
        return text, prompts

    def stop_tuning(self, request: gr.Request) -> str:
        self._stop_requests.add(request.session_hash if request else "")
        return "Stopping…"

    @user_errors
    def classify(self, audio_path: str | None, class_text: str, template_text: str, multi_label: bool,
                 threshold: float, tuned: TunedPrompts | None = None
                 ) -> tuple[str, dict[str, float], pd.DataFrame, pd.DataFrame]:
        """Audio + class names -> (info line, {class: score} for gr.Label, per-window scores, zero-shot vs tuned)."""
        audio = self._load(audio_path)
        names = parse_class_names(class_text or "")
        templates = [t for t in (template_text or "").splitlines() if t.strip()] or None
        result = self.service.classify(audio, names, templates, multi_label=multi_label, threshold=threshold)
        best = np.argsort(-result.scores, kind="stable")[:MAX_WINDOW_COLUMNS]  # columns: best clip-level classes
        per_window = pd.DataFrame(result.window_scores[:, best].astype(float).round(4),
                                  columns=[result.class_names[i] for i in best])
        per_window.insert(0, "end_s", [round(w.end_s, 2) for w in result.windows])
        per_window.insert(0, "start_s", [round(w.start_s, 2) for w in result.windows])
        mode = (f"multi-label, sigmoid ≥ {threshold:g}: {', '.join(result.predicted()) or 'none'}"
                if multi_label else f"single-label: **{result.predicted()[0]}**")
        info = describe_audio(audio) + f" — {len(names)} classes, {mode}"
        if len(names) > MAX_WINDOW_COLUMNS:
            info += f" (per-window table: the {MAX_WINDOW_COLUMNS} best classes)"
        tuned_scores = None
        if tuned is not None:
            if [n.casefold() for n in tuned.class_names] != [n.casefold() for n in names]:
                info += "  \nThe tuned prompts are for other class names: press *Tune prompts* again."
            else:
                tuned_scores = self.service.classify_tuned(audio, tuned).scores["combined"]
        comparison = comparison_table(names, result.scores, tuned_scores)
        return info, result.as_dict(), per_window, comparison
