"""Exports of an annotation store's decisions: tables, datasets, Label Studio tasks and the files the trainers read.

By default an export takes each clip's current decision (the latest, overall) when it is an accept or an edit; skips
and flags are left out unless asked for (:class:`Selection`). Formats:

- ``csv`` / ``jsonl``: every field, one row per clip (per decision with ``latest_only=False``);
- ``audiofolder``: a Hugging Face AudioFolder dataset, the audio under ``audio/`` (hard-linked, or copied across
  file systems) and ``metadata.csv`` whose first column is ``file_name`` (relative to metadata.csv);
- ``label_studio``: a JSON list of tasks ``{data, predictions, annotations}`` (the models' suggestions as
  predictions, the annotators' decisions as annotations) and the labeling config (XML) that matches them;
- ``audiocaps``: an AudioCaps-style caption CSV (``audiocap_id, file_name, start_time, caption``) that
  ``python -m trainers.build_datastore`` and ``trainers.train_drcap`` read through its ``caption`` column;
- ``tune_prompts``: the labelled CSV (``source``, ``labels`` ";"-separated) that ``python -m trainers.tune_prompts
  --eval`` reads, and a classes file for ``--classes-file``.

Every file is written atomically (engine/atomic.py): a reader or a crash sees the previous export or the new one.
The audiofolder is replaced as a whole (``commit_directory``: the folder becomes a symlink to a complete version).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from xml.sax.saxutils import quoteattr

import pandas as pd

from engine.annotations import KEPT_STATUSES, AnnotationStore, Clip, Decision, _name_some
from engine.atomic import atomic_write, atomic_write_text, commit_directory, writer_lock
from engine.datastore import normalize_caption
from engine.errors import ConfigError, DatastoreError

FORMATS = ("csv", "jsonl", "audiofolder", "label_studio", "audiocaps", "tune_prompts")
DEFAULT_NAMES = {"csv": "annotations.csv", "jsonl": "annotations.jsonl", "audiofolder": "audiofolder",
                 "label_studio": "label_studio.json", "audiocaps": "captions_audiocaps.csv",
                 "tune_prompts": "labels_tune_prompts.csv"}
# Label Studio control and object names: the exported results and the labeling config must agree on them.
LS_AUDIO, LS_CAPTION, LS_LABELS, LS_RETRIEVED = "audio", "caption", "labels", "retrieved"


@dataclass(frozen=True)
class Selection:
    """Which decisions an export takes."""

    statuses: tuple[str, ...] = KEPT_STATUSES  # add "skip"/"flag" to export those too
    latest_only: bool = True  # each clip's current decision; False: every decision row
    annotator: str | None = None  # one annotator's decisions (their latest per clip); None: everyone's


@dataclass(frozen=True)
class ExportRow:
    """One exported decision and the clip it is about."""

    clip: Clip
    decision: Decision


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    format: str
    paths: list[Path] = field(default_factory=list)
    rows: int = 0


# --------------------------------------------------------------------------------------------------------------------
# selection


def select_rows(store: AnnotationStore, selection: Selection = Selection()) -> list[ExportRow]:
    """The decisions ``selection`` takes, in queue order; DatastoreError when there are none."""
    clips = {clip.clip_id: clip for clip in store.clips()}
    decisions = store.decisions(latest_only=selection.latest_only, annotator=selection.annotator,
                                statuses=selection.statuses)
    if not decisions:
        who = f" by {selection.annotator}" if selection.annotator else ""
        raise DatastoreError(f"Nothing to export from queue {store.name!r}: no clip is {_statuses(selection)} "
                             f"yet{who}. Accept or edit clips first (skipped and flagged ones are exported only "
                             "when asked).")
    return [ExportRow(clips[d.clip_id], d) for d in decisions]


def _statuses(selection: Selection) -> str:
    names = {"accept": "accepted", "edit": "edited", "skip": "skipped", "flag": "flagged"}
    return " or ".join(names.get(s, s) for s in selection.statuses)


def row_record(row: ExportRow) -> dict:
    """Every field of an exported decision, nested (the JSONL layout)."""
    clip, d = row.clip, row.decision
    return {"decision_id": d.id, "clip_id": clip.clip_id, "position": clip.position, "file_name": clip.name,
            "path": clip.path, "duration_s": clip.duration_s, "status": d.status, "caption": d.caption,
            "labels": list(d.labels), "annotator": d.annotator, "started_at": d.started_at,
            "decided_at": d.decided_at, "seconds_spent": d.seconds_spent, "note": d.note,
            "suggestion": d.suggestion.to_dict(), "models": d.models.to_dict()}


def flat_record(row: ExportRow) -> dict:
    """Every field of an exported decision, one column each (the CSV layout): labels ";"-separated, retrieved
    captions and label scores as JSON, model versions one column per field."""
    record = row_record(row)
    suggestion, models = record.pop("suggestion"), record.pop("models")
    record["labels"] = ";".join(record["labels"])
    record.update({"suggested_caption": suggestion["caption"],
                   "retrieved_captions": json.dumps(suggestion["retrieved"], ensure_ascii=False),
                   "suggested_labels": ";".join(suggestion["labels"]),
                   "label_scores": json.dumps(suggestion["scores"], ensure_ascii=False),
                   "label_source": suggestion["label_source"]})
    record.update(models)
    return record


# --------------------------------------------------------------------------------------------------------------------
# formats


def export_csv(store: AnnotationStore, path: str | os.PathLike, selection: Selection = Selection()) -> ExportResult:
    """Every field of each selected decision, one row each."""
    rows = select_rows(store, selection)
    path = _write_table(Path(path), pd.DataFrame([flat_record(r) for r in rows]))
    return ExportResult("csv", [path], len(rows))


def export_jsonl(store: AnnotationStore, path: str | os.PathLike,
                 selection: Selection = Selection()) -> ExportResult:
    """Every field of each selected decision, one JSON object a line (suggestion and models nested)."""
    rows = select_rows(store, selection)
    text = "".join(json.dumps(row_record(r), ensure_ascii=False) + "\n" for r in rows)
    return ExportResult("jsonl", [_write_text(Path(path), text)], len(rows))


def export_audiofolder(store: AnnotationStore, folder: str | os.PathLike, selection: Selection = Selection(),
                       link: bool = True) -> ExportResult:
    """A Hugging Face AudioFolder dataset: ``audio/...`` plus ``metadata.csv`` (``file_name`` first, then caption,
    labels ";"-separated, and the decision's other fields). One row per clip: a clip's latest selected decision
    (AudioFolder matches metadata to files by name). ``link``: hard-link the audio when possible."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and not (folder / "metadata.csv").is_file() \
            and any(folder.iterdir()):  # commit_directory replaces the folder as a whole: never a user's own folder
        raise ConfigError(f"{folder} is a folder that is not an earlier audiofolder export; export to a new folder")
    rows = _one_per_clip(select_rows(store, selection))
    _check_audio_exists(rows)
    names = _dataset_names([row.clip for row in rows])
    table = pd.DataFrame([{"file_name": names[r.clip.clip_id], **_without(flat_record(r), "file_name", "path")}
                          for r in rows])

    def write(staging: Path) -> None:
        for row in rows:
            _place(Path(row.clip.path), staging / names[row.clip.clip_id], link)
        table.to_csv(staging / "metadata.csv", index=False)

    target = commit_directory(folder, write)
    return ExportResult("audiofolder", [target, target / "metadata.csv"], len(rows))


def export_label_studio(store: AnnotationStore, path: str | os.PathLike, selection: Selection = Selection(),
                        audio_url: Callable[[Clip], str] | None = None,
                        annotator_emails: dict[str, str] | None = None) -> ExportResult:
    """Label Studio tasks (JSON list) and the matching labeling config (``<path stem>.xml``).

    Each clip is one task: ``data.audio`` (``audio_url(clip)``, default the file's absolute path: give a function
    that returns a URL Label Studio can fetch, e.g. ``/data/local-files/?d=...``), the models' suggestion as one
    prediction (``model_version`` names the models), each selected decision as an annotation (a textarea result for
    the caption, a choices result for the labels; a skip is ``was_cancelled``). ``completed_by`` is written only
    for annotators in ``annotator_emails`` (Label Studio refuses unknown users); annotator names, statuses and
    notes are kept in each task's ``meta``."""
    rows = select_rows(store, selection)
    choices = sorted({label for r in rows for label in (*r.decision.labels, *r.decision.suggestion.labels)},
                     key=str.casefold)
    tasks = [_ls_task(clip_rows, audio_url or (lambda clip: clip.path), annotator_emails or {}, bool(choices))
             for clip_rows in _by_clip(rows)]
    path = Path(path)
    tasks_path = _write_text(path, json.dumps(tasks, indent=2, ensure_ascii=False))
    config_path = _write_text(path.with_suffix(".xml"), label_studio_config(choices))
    return ExportResult("label_studio", [tasks_path, config_path], len(rows))


def export_audiocaps(store: AnnotationStore, path: str | os.PathLike,
                     selection: Selection = Selection()) -> ExportResult:
    """An AudioCaps-style caption CSV: ``audiocap_id`` (the decision id), ``file_name``, ``start_time`` (0),
    ``caption`` (whitespace collapsed), and ``source`` (the audio's absolute path). Feeds
    ``trainers.build_datastore`` and ``trainers.train_drcap`` (both read the ``caption`` column)."""
    rows = [r for r in select_rows(store, selection) if normalize_caption(r.decision.caption)]
    if not rows:
        raise DatastoreError(f"Nothing to export from queue {store.name!r}: no selected decision has a caption")
    table = pd.DataFrame([{"audiocap_id": r.decision.id, "file_name": r.clip.name, "start_time": 0,
                           "caption": normalize_caption(r.decision.caption), "source": r.clip.path} for r in rows])
    return ExportResult("audiocaps", [_write_table(Path(path), table)], len(rows))


def export_tune_prompts(store: AnnotationStore, path: str | os.PathLike,
                        selection: Selection = Selection()) -> ExportResult:
    """The labelled CSV ``trainers.tune_prompts`` reads (``--eval``): ``source`` (absolute path) and ``labels``
    (";"-separated), one row per decision that has labels; plus ``<path stem>.classes.txt`` (one class a line, for
    ``--classes-file``)."""
    rows = [r for r in select_rows(store, selection) if r.decision.labels]
    if not rows:
        raise DatastoreError(f"Nothing to export from queue {store.name!r}: no selected decision has labels")
    table = pd.DataFrame([{"source": r.clip.path, "labels": ";".join(r.decision.labels)} for r in rows])
    classes = sorted({label for r in rows for label in r.decision.labels}, key=str.casefold)
    path = Path(path)
    return ExportResult("tune_prompts", [_write_table(path, table), _write_text(
        path.with_suffix(".classes.txt"), "".join(f"{c}\n" for c in classes))], len(rows))


_EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    "csv": export_csv, "jsonl": export_jsonl, "audiofolder": export_audiofolder,
    "label_studio": export_label_studio, "audiocaps": export_audiocaps, "tune_prompts": export_tune_prompts}


def export(store: AnnotationStore, fmt: str, out_dir: str | os.PathLike, selection: Selection = Selection(),
           **options) -> ExportResult:
    """Export in format ``fmt`` (one of :data:`FORMATS`) under ``out_dir`` with its default name
    (:data:`DEFAULT_NAMES`); ``options`` go to the format's exporter."""
    if fmt not in _EXPORTERS:
        raise ConfigError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _EXPORTERS[fmt](store, out_dir / DEFAULT_NAMES[fmt], selection, **options)


# --------------------------------------------------------------------------------------------------------------------
# Label Studio


def label_studio_config(choices: Sequence[str]) -> str:
    """The labeling config the exported tasks fit: the audio, the retrieved captions, a caption textarea and (when
    there are labels) multi-choice labels."""
    lines = ["<View>", f'  <Audio name="{LS_AUDIO}" value="${LS_AUDIO}"/>',
             '  <Header value="Retrieved captions (suggestions)"/>',
             f'  <Text name="{LS_RETRIEVED}" value="${LS_RETRIEVED}"/>', '  <Header value="Caption"/>',
             f'  <TextArea name="{LS_CAPTION}" toName="{LS_AUDIO}" editable="true" maxSubmissions="1" rows="2"/>']
    if choices:
        lines += [f'  <Choices name="{LS_LABELS}" toName="{LS_AUDIO}" choice="multiple">',
                  *(f"    <Choice value={quoteattr(c)}/>" for c in choices), "  </Choices>"]
    return "\n".join([*lines, "</View>", ""])


def _ls_task(rows: list[ExportRow], audio_url: Callable[[Clip], str], emails: dict[str, str],
             with_labels: bool) -> dict:
    clip, latest = rows[0].clip, rows[-1].decision
    suggestion = latest.suggestion
    task = {"data": {LS_AUDIO: audio_url(clip), LS_RETRIEVED: "\n".join(suggestion.retrieved),
                     "clip_id": clip.clip_id, "file_name": clip.name},
            "meta": {"decisions": [{"decision_id": r.decision.id, "annotator": r.decision.annotator,
                                    "status": r.decision.status, "note": r.decision.note} for r in rows]},
            "annotations": [_ls_annotation(r.decision, emails, with_labels) for r in rows],
            "predictions": []}
    if not suggestion.is_empty():
        prediction = {"model_version": latest.models.describe(),
                      "result": _ls_result(suggestion.caption, suggestion.labels, clip.clip_id, "p", with_labels)}
        if suggestion.scores:
            prediction["score"] = max(suggestion.scores.values())
        task["predictions"].append(prediction)
    return task


def _ls_annotation(decision: Decision, emails: dict[str, str], with_labels: bool) -> dict:
    annotation = {"result": _ls_result(decision.caption, decision.labels, decision.clip_id, f"a{decision.id}",
                                       with_labels),
                  "was_cancelled": decision.status == "skip", "ground_truth": False,
                  "created_at": decision.decided_at, "lead_time": decision.seconds_spent or 0.0}
    if decision.annotator in emails:
        annotation["completed_by"] = {"email": emails[decision.annotator]}
    return annotation


def _ls_result(caption: str, labels: Sequence[str], clip_id: str, tag: str, with_labels: bool) -> list[dict]:
    result = []
    if caption:
        result.append({"id": f"{clip_id[:8]}-{tag}-c", "from_name": LS_CAPTION, "to_name": LS_AUDIO,
                       "type": "textarea", "value": {"text": [caption]}})
    if labels and with_labels:
        result.append({"id": f"{clip_id[:8]}-{tag}-l", "from_name": LS_LABELS, "to_name": LS_AUDIO,
                       "type": "choices", "value": {"choices": list(labels)}})
    return result


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _by_clip(rows: list[ExportRow]) -> list[list[ExportRow]]:
    """Rows grouped by clip, in queue order (rows come sorted by position, then decision id)."""
    groups: dict[str, list[ExportRow]] = {}
    for row in rows:
        groups.setdefault(row.clip.clip_id, []).append(row)
    return list(groups.values())


def _one_per_clip(rows: list[ExportRow]) -> list[ExportRow]:
    return [group[-1] for group in _by_clip(rows)]


def _dataset_names(clips: list[Clip]) -> dict[str, str]:
    """A relative path under ``audio/`` per clip: its queue name when that is a safe, unique relative path, else
    prefixed with the clip id (two uploads with one file name, a list naming ``../x.wav``)."""
    names, taken = {}, set()
    for clip in clips:
        name = PurePosixPath(clip.name.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or not name.parts:
            name = PurePosixPath(Path(clip.path).name)
        candidate = f"audio/{name}"
        if candidate.casefold() in taken:
            candidate = f"audio/{clip.clip_id[:12]}-{name.name}"
        taken.add(candidate.casefold())
        names[clip.clip_id] = candidate
    return names


def _check_audio_exists(rows: list[ExportRow]) -> None:
    missing = [row.clip.path for row in rows if not Path(row.clip.path).is_file()]
    if missing:
        raise DatastoreError(f"{len(missing)} clip(s) of the queue are no longer on disk: {_name_some(missing)}")


def _place(source: Path, target: Path, link: bool) -> None:
    """Hard-link (no copy, same bytes) or copy ``source`` to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copyfile(source, target)


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _write_table(path: Path, table: pd.DataFrame) -> Path:
    return _locked_write(path, lambda tmp: table.to_csv(tmp, index=False))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path.parent / f".{path.name}.lock"):
        return atomic_write_text(path, text)


def _locked_write(path: Path, write: Callable[[Path], object]) -> Path:
    """atomic_write under a lock: its temporary name is per process, so two threads exporting to one path must
    not write it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path.parent / f".{path.name}.lock"):
        return atomic_write(path, write)
