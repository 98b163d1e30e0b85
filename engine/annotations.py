"""Annotation queues and a durable store of the annotators' decisions.

A *queue* is an ordered list of clips: the audio files below a folder, the rows of a CSV/JSONL list, or uploaded
files (copied into the store's own ``media/`` folder, since Gradio deletes its uploads after a TTL). Every clip has a
stable id, so the same queue opened twice maps to the same ids: the SHA-1 of the resolved path for files on the
server, the SHA-1 of the content for uploads.

A store is one SQLite file per queue, ``<root>/<queue name>/annotations.sqlite``, in WAL mode with
``synchronous=FULL``: :meth:`AnnotationStore.record` returns after COMMIT, when the decision is on disk, so an
acknowledged decision survives SIGKILL and power loss, and a killed writer never corrupts earlier ones (SQLite's
journal, not ours). Decisions are append-only (triggers refuse UPDATE and DELETE): a clip's current decision is its
latest row, per annotator or overall, so two sessions annotating one queue never overwrite each other.

What the models suggested (generated and retrieved captions, zero-shot or tuned label scores) and the versions of the
models behind the suggestion are kept beside, never mixed with, what the annotator decided.

One store object may be shared by threads (one connection behind a lock); several objects or processes may open the
same file at once (SQLite's locking, with a busy timeout).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import soundfile as sf

from engine.atomic import atomic_write, fsync_dir
from engine.errors import AudioError, ConfigError, DatastoreError, UndecodableAudioError

STATUSES = ("accept", "edit", "skip", "flag")
KEPT_STATUSES = ("accept", "edit")  # what exports take unless asked for more
DB_FILE = "annotations.sqlite"
MEDIA_DIR = "media"
DEFAULT_ANNOTATOR = "anonymous"  # Gradio's request.username is None when auth is off
SCHEMA_VERSION = 1
PATH_COLUMNS = ("path", "source", "file_name", "filename", "file", "audio")
# What engine/audio.py decodes: libsndfile's formats, plus the containers it hands to FFmpeg (the same list as
# trainers/inputs.py, plus a few more audio-only ones). Video-only or ambiguous suffixes (.ts, .avi) are left out.
AUDIO_SUFFIXES = frozenset({
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64",
    ".m4a", ".m4b", ".aac", ".mp4", ".webm", ".mkv", ".mka", ".wma", ".amr", ".ac3", ".wv",
})
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LABEL_FORBIDDEN = re.compile(r"[;,\n\r]")  # ";" separates labels in the CSVs, "," class names in a classes file
_MAX_NAMED = 10  # paths named in one error message


# --------------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class QueueItem:
    """A clip to annotate, before it is in a store."""

    clip_id: str
    path: str  # absolute
    name: str  # shown to the annotator and used in exports: path relative to the folder/list, or upload file name
    caption: str = ""  # prefill from a list file
    labels: tuple[str, ...] = ()  # prefill from a list file
    duration_s: float | None = None  # probed when the clip is added, when not known


@dataclass(frozen=True)
class Clip:
    """A clip in a store: where it is in the queue and what the list prefilled."""

    clip_id: str
    path: str
    name: str
    position: int  # 0-based order in the queue
    duration_s: float | None
    added_at: str
    caption: str = ""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suggestion:
    """What the models proposed for a clip; kept apart from what the annotator decided."""

    caption: str = ""  # generated caption
    retrieved: tuple[str, ...] = ()  # retrieved datastore captions, most similar first
    labels: tuple[str, ...] = ()  # suggested labels as shown to the annotator
    scores: Mapping[str, float] = field(default_factory=dict)  # label -> score
    label_source: str = ""  # "zero-shot" or "tuned"

    @classmethod
    def from_dict(cls, value: Mapping | None) -> Suggestion:
        value = value or {}
        return cls(caption=str(value.get("caption") or ""), retrieved=tuple(value.get("retrieved") or ()),
                   labels=tuple(value.get("labels") or ()),
                   scores={str(k): float(v) for k, v in (value.get("scores") or {}).items()},
                   label_source=str(value.get("label_source") or ""))

    def to_dict(self) -> dict:
        return {"caption": self.caption, "retrieved": list(self.retrieved), "labels": list(self.labels),
                "scores": dict(self.scores), "label_source": self.label_source}

    def is_empty(self) -> bool:
        return not (self.caption or self.retrieved or self.labels or self.scores)


@dataclass(frozen=True)
class ModelVersions:
    """Which models, datastore and prompts produced a suggestion (so a decision can be traced to them)."""

    clap_name: str = ""
    clap_fingerprint: str = ""
    datastore_version: str = ""  # manifest "data" version, e.g. v-000003
    datastore_size: int | None = None  # captions in the datastore
    llm: str = ""
    decoder: str = ""  # DRCap checkpoint or decoding settings
    prompt_key: str = ""  # TunedPrompts.content_key() of the tuned prompts, "" for zero-shot

    @classmethod
    def from_dict(cls, value: Mapping | None) -> ModelVersions:
        known = {f.name for f in fields(cls)}  # tolerate keys written by a later version
        return cls(**{k: v for k, v in (value or {}).items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line naming the versions, e.g. for Label Studio's ``model_version``."""
        parts = [f"clap={self.clap_name}" + (f"@{self.clap_fingerprint[:12]}" if self.clap_fingerprint else "")
                 if self.clap_name or self.clap_fingerprint else "",
                 f"datastore={self.datastore_version}" + (f"({self.datastore_size})" if self.datastore_size else "")
                 if self.datastore_version or self.datastore_size else "",
                 f"llm={self.llm}" if self.llm else "", f"decoder={self.decoder}" if self.decoder else "",
                 f"prompts={self.prompt_key[:12]}" if self.prompt_key else ""]
        return "; ".join(p for p in parts if p) or "unknown"


@dataclass(frozen=True)
class Decision:
    """One decision of one annotator on one clip. ``id``, ``decided_at`` (and ``seconds_spent`` when not given)
    are filled in by :meth:`AnnotationStore.record`."""

    clip_id: str
    annotator: str
    status: str  # accept | edit | skip | flag
    caption: str = ""
    labels: tuple[str, ...] = ()
    suggestion: Suggestion = field(default_factory=Suggestion)
    models: ModelVersions = field(default_factory=ModelVersions)
    started_at: str | None = None  # when the clip was shown (ISO 8601, UTC); see now_iso()
    note: str = ""
    seconds_spent: float | None = None  # default: decided_at - started_at
    id: int | None = None
    decided_at: str | None = None


@dataclass(frozen=True)
class Progress:
    """Where a queue stands: clips and their current decisions (latest per clip)."""

    total: int
    decided: int
    accepted: int
    edited: int
    skipped: int
    flagged: int

    @property
    def remaining(self) -> int:
        return self.total - self.decided


# --------------------------------------------------------------------------------------------------------------------
# queues


def queue_from_folder(folder: str | os.PathLike) -> list[QueueItem]:
    """Every audio file below ``folder`` (recursively, by suffix), sorted by relative path."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DatastoreError(f"{folder} is not a folder")
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DatastoreError(f"No audio files in {folder} (looked for {', '.join(sorted(AUDIO_SUFFIXES))})")
    return [QueueItem(path_id(p), str(p), p.relative_to(folder).as_posix()) for p in files]


def queue_from_list(list_file: str | os.PathLike) -> list[QueueItem]:
    """The clips a CSV/TSV/JSONL list names, in its order: column or field ``path``/``source``/``file_name`` (or
    ``filename``/``file``/``audio``), relative paths taken from the list's folder; optional ``caption`` and
    ``labels`` (";"-separated in a CSV, a list or a string in JSONL) prefill the decision."""
    list_file = Path(list_file).expanduser().resolve()
    if not list_file.is_file():
        raise DatastoreError(f"List file {list_file} does not exist")
    rows = _list_rows(list_file)
    items, missing = [], []
    for raw_path, caption, labels in rows:
        path = Path(raw_path).expanduser()
        path = (path if path.is_absolute() else list_file.parent / path).resolve()
        if not path.is_file():
            missing.append(raw_path)
            continue
        items.append(QueueItem(path_id(path), str(path), raw_path, caption, labels))
    if missing:
        raise DatastoreError(f"{len(missing)} file(s) listed in {list_file.name} do not exist: "
                             f"{_name_some(missing)} (relative paths are read from {list_file.parent})")
    if not items:
        raise DatastoreError(f"{list_file.name} lists no clips")
    return _unique(items)


def queue_from_uploads(paths: Sequence[str | os.PathLike], media_dir: str | os.PathLike) -> list[QueueItem]:
    """Copy uploaded files into ``media_dir`` (named by content hash, written atomically) so they outlive the
    upload cache. Every file is checked first: missing or undecodable ones are named together and nothing is
    copied."""
    sources = [Path(p) for p in paths]
    missing = [p.name for p in sources if not p.is_file()]
    if missing:
        raise DatastoreError(f"{len(missing)} uploaded file(s) are gone: {_name_some(missing)}; upload them again")
    durations, bad = {}, []
    for source in sources:
        try:
            durations[source] = _duration(source, decode=True)
        except AudioError as e:
            bad.append(f"{source.name} ({e})")
    if bad:
        raise UndecodableAudioError(f"{len(bad)} upload(s) are not audio this app can read: {_name_some(bad)}")
    return _unique([_store_upload(source, Path(media_dir), durations[source]) for source in sources])


def path_id(path: str | os.PathLike) -> str:
    """The stable id of a file on the server: SHA-1 of its resolved path."""
    return hashlib.sha1(str(Path(path).resolve()).encode("utf-8")).hexdigest()


def content_id(path: str | os.PathLike) -> str:
    """The stable id of an upload: SHA-1 of its bytes (the upload's own temporary path changes every time)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _list_rows(list_file: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(path, caption, labels) per row of a list file."""
    suffix = list_file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_rows(list_file, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(list_file)
    raise DatastoreError(f"Don't know how to read a clip list from {list_file.name}: use .csv, .tsv or .jsonl")


def _csv_rows(list_file: Path, sep: str) -> list[tuple[str, str, tuple[str, ...]]]:
    try:
        table = pd.read_csv(list_file, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatastoreError(f"{list_file.name} is not a readable CSV: {e}") from e
    column = next((c for c in PATH_COLUMNS if c in table.columns), None)
    if column is None:
        raise DatastoreError(f"{list_file.name} has no column with audio paths: it needs one of "
                             f"{', '.join(PATH_COLUMNS)} (columns found: {', '.join(map(str, table.columns))})")
    labels = next((c for c in ("labels", "label") if c in table.columns), None)
    return [(row[column].strip(), row.get("caption", "").strip(), _split_labels(row[labels] if labels else ""))
            for row in table.to_dict("records") if row[column].strip()]


def _jsonl_rows(list_file: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    from engine.datastore import read_jsonl_records  # imports torch and faiss: only when a JSONL list is read

    rows, bad, found = [], [], set()
    for number, record in enumerate(read_jsonl_records(list_file), 1):
        record = record if isinstance(record, dict) else {}
        found.update(record)
        key = next((k for k in PATH_COLUMNS if isinstance(record.get(k), str) and record[k].strip()), None)
        if key is None:
            bad.append(number)
            continue
        labels = record.get("labels", record.get("label", ""))
        labels = _split_labels(labels) if isinstance(labels, str) else _clean_labels(labels or ())
        rows.append((record[key].strip(), str(record.get("caption") or "").strip(), labels))
    if bad:
        raise DatastoreError(f"{list_file.name}: record(s) {_name_some([str(n) for n in bad])} have no path field, "
                             f"one of {', '.join(PATH_COLUMNS)} (fields found: {', '.join(sorted(found)) or 'none'})")
    return rows


def _store_upload(source: Path, media_dir: Path, duration_s: float | None) -> QueueItem:
    clip_id = content_id(source)
    media_dir.mkdir(parents=True, exist_ok=True)
    target = media_dir / f"{clip_id}{source.suffix.lower()}"
    if not target.is_file():  # same content, same name: already copied by an earlier upload
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return QueueItem(clip_id, str(target.resolve()), source.name, duration_s=duration_s)


def _duration(path: Path, decode: bool = False) -> float | None:
    """Seconds from the header (libsndfile); with ``decode``, files libsndfile can't read are decoded (FFmpeg) and
    their AudioError raised. Without, unknown durations are None."""
    try:
        return float(sf.info(str(path)).duration)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError):
        if not decode:
            return None
    from engine.audio import load_audio  # only for uploads libsndfile can't read

    return load_audio(path).duration_s


def _unique(items: Iterable[QueueItem]) -> list[QueueItem]:
    """First occurrence of each clip id (a list naming a file twice, the same upload twice)."""
    seen: dict[str, QueueItem] = {}
    for item in items:
        seen.setdefault(item.clip_id, item)
    return list(seen.values())


def _split_labels(text: str) -> tuple[str, ...]:
    return _clean_labels(text.split(";"))


def _clean_labels(labels: Iterable) -> tuple[str, ...]:
    """Stripped, non-empty, first occurrence (case-insensitive) kept, order kept."""
    out, seen = [], set()
    for label in labels:
        label = " ".join(str(label).split())
        if label and label.casefold() not in seen:
            seen.add(label.casefold())
            out.append(label)
    return tuple(out)


def _name_some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


# --------------------------------------------------------------------------------------------------------------------
# the store


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clips (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL UNIQUE,
    duration_s REAL,
    caption TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '[]',
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    clip_id TEXT NOT NULL REFERENCES clips(id),
    annotator TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accept', 'edit', 'skip', 'flag')),
    caption TEXT NOT NULL,
    labels TEXT NOT NULL,
    suggestion TEXT NOT NULL,
    models TEXT NOT NULL,
    started_at TEXT,
    decided_at TEXT NOT NULL,
    seconds_spent REAL,
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_clip ON decisions (clip_id, id);
CREATE INDEX IF NOT EXISTS decisions_by_annotator ON decisions (annotator, clip_id, id);
CREATE TRIGGER IF NOT EXISTS decisions_append_only_update BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'decisions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS decisions_append_only_delete BEFORE DELETE ON decisions
    BEGIN SELECT RAISE(ABORT, 'decisions are append-only'); END;
"""

# The latest decision per clip (overall, or of one annotator when the inner query is filtered); ids grow in commit
# order (writers are serialised), so the highest id is the latest whatever the clocks say.
_LATEST = "SELECT MAX(id) AS id FROM decisions {where} GROUP BY clip_id"


class AnnotationStore:
    """The decisions on one queue, in ``<directory>/annotations.sqlite`` (uploads in ``<directory>/media``)."""

    def __init__(self, directory: str | os.PathLike, *, check: bool = True) -> None:
        """Open (or create) the store in ``directory``. ``check`` runs SQLite's quick_check, so a damaged file is
        reported when it is opened rather than half-way through a session."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.db_path = self.directory / DB_FILE
        self._lock = threading.RLock()
        self._conn = _connect(self.db_path, check)

    @classmethod
    def open(cls, root: str | os.PathLike, name: str, *, check: bool = True) -> AnnotationStore:
        """The store of queue ``name`` under ``root`` (created when new)."""
        return cls(Path(root) / check_queue_name(name), check=check)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def media_dir(self) -> Path:
        return self.directory / MEDIA_DIR

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE for writes (takes the write lock at once: no deadlock on upgrade)."""
        with self._lock:
            try:
                self._conn.execute(f"BEGIN {mode}")
            except sqlite3.DatabaseError as e:
                raise _damaged(self.db_path, e) from e
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")  # with synchronous=FULL, durable once this returns
            except sqlite3.DatabaseError as e:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise _damaged(self.db_path, e) from e

    # --- clips ----------------------------------------------------------------------------------------------------

    def add_clips(self, items: Iterable[QueueItem]) -> int:
        """Append clips not yet in the queue (by id; re-adding a queue is a no-op). Returns how many were new."""
        items = _unique(items)
        known = self._known_ids([item.clip_id for item in items])
        new = [item for item in items if item.clip_id not in known]
        durations = [item.duration_s if item.duration_s is not None else _duration(Path(item.path)) for item in new]
        now = now_iso()
        with self._transaction("IMMEDIATE") as conn:
            start = conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM clips").fetchone()[0]
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO clips (id, path, name, position, duration_s, caption, labels, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(item.clip_id, item.path, item.name, start + i, duration, item.caption, json.dumps(item.labels),
                  now) for i, (item, duration) in enumerate(zip(new, durations))])
            return max(cursor.rowcount, 0)

    def add_folder(self, folder: str | os.PathLike) -> int:
        """Add every audio file below ``folder``; returns how many were new."""
        return self.add_clips(queue_from_folder(folder))

    def add_list(self, list_file: str | os.PathLike) -> int:
        """Add the clips a CSV/JSONL list names; returns how many were new."""
        return self.add_clips(queue_from_list(list_file))

    def add_uploads(self, paths: Sequence[str | os.PathLike]) -> int:
        """Copy uploads into the store's media folder and add them; returns how many were new."""
        return self.add_clips(queue_from_uploads(paths, self.media_dir))

    def clip(self, clip_id: str) -> Clip:
        """The clip with this id; DatastoreError when the queue has none."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM clips WHERE id = ?", (clip_id,)).fetchone()
        if row is None:
            raise DatastoreError(f"Queue {self.name!r} has no clip with id {clip_id!r}")
        return _clip(row)

    def clips(self) -> list[Clip]:
        """Every clip, in queue order."""
        with self._transaction() as conn:
            return [_clip(row) for row in conn.execute("SELECT * FROM clips ORDER BY position")]

    def __len__(self) -> int:
        with self._transaction() as conn:
            return conn.execute("SELECT COUNT(*) FROM clips").fetchone()[0]

    def _known_ids(self, ids: Sequence[str]) -> set[str]:
        with self._transaction() as conn:
            return {row[0] for row in conn.execute("SELECT id FROM clips")} & set(ids)

    # --- navigation -----------------------------------------------------------------------------------------------

    def first_undecided(self, annotator: str | None = None) -> Clip | None:
        """The first clip in queue order without a decision by ``annotator`` (by anyone when None)."""
        return self._undecided_after(-1, annotator)

    def resume(self, annotator: str) -> Clip | None:
        """Where ``annotator`` continues after a reload or restart: the first undecided clip after the one they
        decided last, else the first undecided from the start; None when they have decided every clip."""
        with self._transaction() as conn:
            row = conn.execute("SELECT c.position FROM decisions d JOIN clips c ON c.id = d.clip_id "
                               "WHERE d.annotator = ? ORDER BY d.id DESC LIMIT 1",
                               (_annotator(annotator),)).fetchone()
        after = self._undecided_after(row[0], annotator) if row else None
        return after or self.first_undecided(annotator)

    def next_clip(self, annotator: str, after: str | None = None, *, undecided_only: bool = False) -> Clip | None:
        """The clip after ``after`` (a clip id) in queue order, or with ``undecided_only`` the next one
        ``annotator`` has not decided; with ``after=None``, :meth:`resume`. None at the end of the queue."""
        if after is None:
            return self.resume(annotator)
        position = self.clip(after).position
        if undecided_only:
            return self._undecided_after(position, annotator)
        return self._neighbour("position > ? ORDER BY position", position)

    def previous_clip(self, before: str) -> Clip | None:
        """The clip before ``before`` (a clip id) in queue order; None at the start."""
        return self._neighbour("position < ? ORDER BY position DESC", self.clip(before).position)

    def _neighbour(self, condition: str, position: int) -> Clip | None:
        with self._transaction() as conn:
            row = conn.execute(f"SELECT * FROM clips WHERE {condition} LIMIT 1", (position,)).fetchone()
        return _clip(row) if row else None

    def _undecided_after(self, position: int, annotator: str | None) -> Clip | None:
        by = "AND d.annotator = ?" if annotator is not None else ""
        args = (position, _annotator(annotator)) if annotator is not None else (position,)
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT * FROM clips c WHERE c.position > ? AND NOT EXISTS "
                f"(SELECT 1 FROM decisions d WHERE d.clip_id = c.id {by}) ORDER BY c.position LIMIT 1",
                args).fetchone()
        return _clip(row) if row else None

    # --- decisions ------------------------------------------------------------------------------------------------

    def record(self, decision: Decision) -> Decision:
        """Append ``decision``; returns it with ``id``, ``decided_at`` and ``seconds_spent`` once it is committed
        (durable): that return is the acknowledgement. Invalid decisions raise ConfigError, unknown clips
        DatastoreError."""
        decision = validate_decision(decision)
        decided_at = now_iso()
        spent = decision.seconds_spent
        if spent is None and decision.started_at:
            spent = max(0.0, (_parse_time(decided_at) - _parse_time(decision.started_at)).total_seconds())
        with self._transaction("IMMEDIATE") as conn:
            if conn.execute("SELECT 1 FROM clips WHERE id = ?", (decision.clip_id,)).fetchone() is None:
                raise DatastoreError(f"Queue {self.name!r} has no clip with id {decision.clip_id!r}")
            cursor = conn.execute(
                "INSERT INTO decisions (clip_id, annotator, status, caption, labels, suggestion, models, "
                "started_at, decided_at, seconds_spent, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (decision.clip_id, decision.annotator, decision.status, decision.caption,
                 json.dumps(list(decision.labels)), json.dumps(decision.suggestion.to_dict()),
                 json.dumps(decision.models.to_dict()), decision.started_at, decided_at, spent, decision.note))
        return replace(decision, id=cursor.lastrowid, decided_at=decided_at, seconds_spent=spent)

    def latest_decision(self, clip_id: str, annotator: str | None = None) -> Decision | None:
        """The current decision on a clip: the latest of ``annotator``, or the latest overall when None."""
        by, args = ("", (clip_id,))
        if annotator is not None:
            by, args = "AND annotator = ?", (clip_id, _annotator(annotator))
        with self._transaction() as conn:
            row = conn.execute(f"SELECT * FROM decisions WHERE clip_id = ? {by} ORDER BY id DESC LIMIT 1",
                               args).fetchone()
        return _decision(row) if row else None

    def decisions(self, latest_only: bool = True, annotator: str | None = None,
                  statuses: Sequence[str] | None = None) -> list[Decision]:
        """Decisions in queue order (then in the order they were made). ``latest_only``: each clip's current
        decision (of ``annotator`` when given, else overall); otherwise every row. ``statuses`` filters after the
        latest is taken, so a clip accepted and then flagged counts as flagged."""
        if statuses is not None and not statuses:
            return []  # "IN ()" is not SQL
        conditions, args = [], []
        join = ""
        if latest_only:  # the inner query picks each clip's latest row (of the annotator when given)
            join = f"JOIN ({_LATEST.format(where='WHERE annotator = ?' if annotator is not None else '')}) " \
                   "latest ON latest.id = d.id"
            args += [_annotator(annotator)] if annotator is not None else []
        elif annotator is not None:
            conditions.append("d.annotator = ?")
            args.append(_annotator(annotator))
        if statuses is not None:
            wanted = [_status(s) for s in statuses]
            conditions.append(f"d.status IN ({', '.join('?' * len(wanted))})")
            args += wanted
        outer = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT d.* FROM decisions d {join} JOIN clips c ON c.id = d.clip_id {outer} "
                                f"ORDER BY c.position, d.id", args).fetchall()
        return [_decision(row) for row in rows]

    def annotators(self) -> list[str]:
        """Everyone who recorded a decision in this queue, sorted."""
        with self._transaction() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT annotator FROM decisions ORDER BY annotator")]

    def progress(self, annotator: str | None = None) -> Progress:
        """Counts of clips by current decision (of ``annotator``, or the latest overall when None)."""
        where, args = ("WHERE annotator = ?", (_annotator(annotator),)) if annotator is not None else ("", ())
        with self._transaction() as conn:
            total = conn.execute("SELECT COUNT(*) FROM clips").fetchone()[0]
            counts = dict(conn.execute(f"SELECT d.status, COUNT(*) FROM decisions d JOIN "
                                       f"({_LATEST.format(where=where)}) latest ON latest.id = d.id "
                                       f"GROUP BY d.status", args).fetchall())
        return Progress(total, sum(counts.values()), counts.get("accept", 0), counts.get("edit", 0),
                        counts.get("skip", 0), counts.get("flag", 0))

    def integrity_check(self) -> str:
        """SQLite's full integrity check: "ok" or the problems found."""
        with self._lock:
            return "\n".join(row[0] for row in self._conn.execute("PRAGMA integrity_check"))


def open_store(root: str | os.PathLike, name: str, *, check: bool = True) -> AnnotationStore:
    """The store of queue ``name`` under ``root`` (created when new)."""
    return AnnotationStore.open(root, name, check=check)


def list_queues(root: str | os.PathLike) -> list[str]:
    """Names of the queues (folders holding an annotation store) under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / DB_FILE).is_file() and _QUEUE_NAME.match(p.name))


def check_queue_name(name: str) -> str:
    """``name`` when it can name a queue folder (letters, digits, ``.``, ``_``, ``-``; up to 64; no leading dot)."""
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigError(f"Invalid queue name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
                          "a letter or digit")
    return name


def queue_name_for(text: str) -> str:
    """A valid queue name made from ``text`` (a folder or list file name, say)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(text)).stem).strip("-._")[:64]
    return name or "queue"


def now_iso() -> str:
    """The time now in UTC, ISO 8601 with a Z (what the store writes and Label Studio reads)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------------------------------
# validation


def validate_decision(decision: Decision) -> Decision:
    """``decision`` normalised (stripped caption, cleaned labels, default annotator); ConfigError when it cannot be
    recorded: unknown status, an accept or edit without a caption, labels holding ';' ',' or a line break."""
    status = _status(decision.status)
    caption = " ".join(str(decision.caption or "").split())
    if status in KEPT_STATUSES and not caption:
        raise ConfigError(f"An {status!r} decision needs a caption: type one, or skip or flag the clip")
    if isinstance(decision.labels, str):  # a string would be split into characters
        raise ConfigError(f"labels must be a list of label names, got the string {decision.labels!r}")
    raw_labels = [" ".join(str(label).split()) for label in decision.labels]
    bad = [label for label in raw_labels if _LABEL_FORBIDDEN.search(label)]
    if bad:
        raise ConfigError(f"Labels cannot contain ';', ',' or line breaks: {', '.join(map(repr, bad))}")
    if decision.started_at:
        _parse_time(decision.started_at)
    if decision.seconds_spent is not None and not decision.seconds_spent >= 0:
        raise ConfigError(f"seconds_spent must be >= 0, got {decision.seconds_spent!r}")
    suggestion, models = decision.suggestion, decision.models
    return replace(decision, status=status, caption=caption, labels=_clean_labels(raw_labels),
                   annotator=_annotator(decision.annotator), note=str(decision.note or ""),
                   suggestion=suggestion if isinstance(suggestion, Suggestion) else Suggestion.from_dict(suggestion),
                   models=models if isinstance(models, ModelVersions) else ModelVersions.from_dict(models))


def _status(status: str) -> str:
    value = str(status).strip().lower()
    if value not in STATUSES:
        raise ConfigError(f"Unknown decision status {status!r}: use one of {', '.join(STATUSES)}")
    return value


def _annotator(annotator: str | None) -> str:
    return " ".join(str(annotator or "").split()) or DEFAULT_ANNOTATOR


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"Not an ISO 8601 time: {text!r}") from e
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------------------------------
# SQLite


def _connect(path: Path, check: bool) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL (a COMMIT is on disk when it returns), schema in place."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if check:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:5]))
        _migrate(conn, path)
    except (sqlite3.DatabaseError, DatastoreError) as e:
        conn.close()
        raise _damaged(path, e) from e
    # The directory entries of a new store and of its -wal file (created on open), so they survive a power cut.
    fsync_dir(path.parent)
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise DatastoreError(f"{path} was written by a newer AudioScribe (store format {version}; this version "
                             f"reads up to {SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        # IF NOT EXISTS everywhere: two processes creating the same store at once both succeed.
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (now_iso(),))


def _damaged(path: Path, error: Exception) -> DatastoreError:
    if isinstance(error, DatastoreError):
        return error
    if isinstance(error, sqlite3.OperationalError):  # busy past the timeout, read-only, I/O: not the file's fault
        return DatastoreError(f"The annotation store {path} cannot be used right now ({error}); try again, and "
                              "check that the folder is writable and the disk is not full.")
    return DatastoreError(f"The annotation store {path} is damaged or not an annotation store ({error}). Move it "
                          "aside and reopen the queue, or restore it from a backup.")


def _clip(row: sqlite3.Row) -> Clip:
    return Clip(row["id"], row["path"], row["name"], row["position"], row["duration_s"], row["added_at"],
                row["caption"], tuple(json.loads(row["labels"])))


def _decision(row: sqlite3.Row) -> Decision:
    return Decision(clip_id=row["clip_id"], annotator=row["annotator"], status=row["status"],
                    caption=row["caption"], labels=tuple(json.loads(row["labels"])),
                    suggestion=Suggestion.from_dict(json.loads(row["suggestion"])),
                    models=ModelVersions.from_dict(json.loads(row["models"])), started_at=row["started_at"],
                    note=row["note"], seconds_spent=row["seconds_spent"], id=row["id"],
                    decided_at=row["decided_at"])
