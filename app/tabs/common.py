"""What the tabs share: queue settings for heavy and light events, the example clips, a label with a headline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.label import LabelData

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"

# Model work (describe, retrieve, classify, tune, build a domain) shares one queue: at most HEAVY_LIMIT such events
# run at once on the machine, whichever tab they come from. Two, so that one user's tuning run (minutes) never blocks
# every other user's classification. A group's limit is the smallest any of its events gives, so every heavy event
# passes these same settings.
HEAVY_LIMIT = 2
HEAVY: dict[str, Any] = {"concurrency_id": "heavy", "concurrency_limit": HEAVY_LIMIT}
# Light events (checking an upload, Stop, button states) never wait behind model work: no limit, own group.
LIGHT: dict[str, Any] = {"concurrency_id": "light", "concurrency_limit": None, "show_progress": "hidden"}
# UI-only steps (enabling and disabling buttons): not part of the API.
UI_ONLY: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}


def display_name(name: str) -> str:
    """A model's name for the page: a hub id as it is; a local folder by its last two parts, never its full path
    (which tells a browser user nothing and shows the server's home folder)."""
    path = Path(name).expanduser()
    if not (path.is_absolute() or name.startswith(("~", ".")) or path.exists()):
        return name
    return "/".join(path.parts[-2:])


def example_clips() -> list[list[str]]:
    """The shipped example clips (assets/examples; their sources and licenses are in its README)."""
    return [[str(p)] for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix in (".wav", ".ogg", ".flac")]


def headline_label(**kwargs: Any) -> gr.Label:
    """A ``gr.Label`` whose headline comes with the scores (``{"label": ..., "confidences": [...]}``) instead of
    always being the top class: a multi-label result with no class above the threshold predicts nothing, and must
    not show its best class as if it were predicted.

    The instance's postprocess is wrapped rather than gr.Label subclassed: Gradio writes a .pyi stub beside the
    source of every Component subclass it sees defined, which would litter the source tree at import."""
    label = gr.Label(**kwargs)
    plain = label.postprocess

    def postprocess(value: Any) -> LabelData | dict | None:
        if isinstance(value, dict) and isinstance(value.get("confidences"), list):
            return LabelData(**value)
        return plain(value)

    label.postprocess = postprocess  # type: ignore[method-assign]
    return label


__all__ = ["display_name", "HEAVY", "HEAVY_LIMIT", "LIGHT", "UI_ONLY", "headline_label", "example_clips"]
