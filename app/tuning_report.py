"""The tuning report as Markdown: a summary, one warning per class that no caption mentions, a per-class table.

The engine's text selection formats its per-class counts as a fixed-width text table (``TextSelection.
format_report``, stored in ``TunedPrompts.report["selection"]``); a fixed-width table does not fit a browser column,
so its rows are read back here by the known class names. Prompts whose report lacks it (uploaded files of another
version) get the training-text counts alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.prompt_tuning import TunedPrompts

SELECTION_FIELDS = ("found", "matched", "nearest", "described", "total", "labelled")


@dataclass
class ClassCounts:
    """How one class's training texts were found (the columns of the engine's selection report)."""

    name: str
    found: int  # captions in the datastore that mention the class
    matched: int  # of those, used for training (after the per-class cap)
    nearest: int  # captions added by CLAP similarity because too few mention the class
    described: int
    total: int
    labelled: int


def selection_counts(report_text: str, names: list[str]) -> list[ClassCounts] | None:
    """Per-class counts read from ``TextSelection.format_report`` text (rows in class order after a header and a
    rule); None when the text does not have that shape."""
    lines = report_text.splitlines()[2:2 + len(names)]
    if len(lines) != len(names):
        return None
    counts = []
    for name, line in zip(names, lines):
        fields = line[len(name):].split()[:len(SELECTION_FIELDS)] if line.startswith(name) else []
        if len(fields) != len(SELECTION_FIELDS) or not all(f.isdigit() for f in fields):
            return None
        counts.append(ClassCounts(name, *map(int, fields)))
    return counts


def unmentioned_warnings(counts: list[ClassCounts]) -> list[str]:
    """One line per class that no caption mentions: its prompt learnt from whatever captions CLAP finds nearest to
    the name, which may be about another sound (a made-up name tunes 'successfully' on unrelated captions)."""
    return [f"⚠️ No caption in the datastore mentions **{c.name}**: its prompts were tuned on the {c.nearest} "
            "caption(s) nearest to the name by CLAP similarity, which may describe other sounds. Use a name the "
            "captions use." for c in counts if c.found == 0]


def summary(prompts: TunedPrompts) -> str:
    r = prompts.report
    losses = r.get("epoch_losses") or [float("nan")]
    return (f"Tuned {len(prompts.class_names)} classes in {r.get('seconds', 0):.1f} s ({r.get('steps', 0)} steps, "
            f"{r.get('texts', 0)} training captions; loss {losses[0]:.3f} → {losses[-1]:.3f}). These prompts stay "
            "in this browser session only: download them to keep them.")


def report_table(prompts: TunedPrompts, counts: list[ClassCounts] | None) -> str:
    """A titled Markdown table, one row per class: narrow numeric columns that fit a half-width column."""
    title = f"**Tuning report**: the training captions of each of the {len(prompts.class_names)} classes"
    if counts is None:
        per_class = prompts.report.get("texts_per_class") or [""] * len(prompts.class_names)
        rows = [f"| {_cell(n)} | {t} |" for n, t in zip(prompts.class_names, per_class)]
        return "\n".join([title, "", "| class | training texts |", "|---|--:|", *rows])
    rows = [f"| {_cell(c.name)} | {c.found} | {c.matched} | {c.nearest} | {c.labelled} |" for c in counts]
    header = "| class | captions mentioning it | used | added by CLAP similarity | training texts |"
    return "\n".join([title, "", header, "|---|--:|--:|--:|--:|", *rows])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def tuning_report(prompts: TunedPrompts) -> tuple[str, str]:
    """(status: summary and warnings, report: the per-class table) for prompts just tuned or loaded."""
    counts = selection_counts(str(prompts.report.get("selection", "")), prompts.class_names)
    status = "\n\n".join([summary(prompts), *unmentioned_warnings(counts or [])])
    return status, report_table(prompts, counts)


__all__ = ["ClassCounts", "report_table", "selection_counts", "summary", "tuning_report", "unmentioned_warnings"]
