"""Crash-safe writes: whatever moment a process is killed at, a reader finds the old version or the new one.

The mechanism is SQLite's and git's: write everything new beside the old, make it durable (fsync), then switch with
one atomic rename, then remove what is no longer named. Three shapes:

- :func:`atomic_write` one file: a temporary file in the same folder, fsync, ``os.replace``.
- :func:`commit_version` a folder of files (a datastore, an annotation store): each version is a complete
  sub-folder ``v-000007``; ``manifest.json`` names the current one and is replaced atomically, so the manifest is
  the commit record. Leftovers of a killed writer (staging folders, unnamed versions) are removed by the next writer.
- :func:`commit_directory` a folder that readers open by its own name (a training checkpoint ``last/``): it becomes
  a symlink to a complete hidden version folder, switched by replacing the symlink.

Writers of one target are serialised with an advisory lock (``flock``, released by the kernel if the writer dies).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

MANIFEST = "manifest.json"
_VERSION = re.compile(r"^v-(\d{6,})$")


# --------------------------------------------------------------------------------------------------------------------
# files


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (the contents of a version before it is committed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the content to a temporary file beside ``path``, make it durable, then rename it
    over ``path``. A reader (or a crash) sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def writer_lock(lock_file: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on ``lock_file`` (created) for the duration of the block; waits for other writers."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------------------------------------------------
# a folder of versions named by a manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a versioned (or flat, legacy) folder, or None when there is none. Raises ValueError when it
    is not a JSON object."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    return value


def data_folder(directory: str | os.PathLike, manifest: dict) -> Path:
    """Where the manifest's files are: its version folder, or the folder itself for a legacy flat layout."""
    version = manifest.get("data") or ""
    if version and not _VERSION.match(version):
        raise ValueError(f"{MANIFEST} names an invalid data folder {version!r}")
    return Path(directory) / version if version else Path(directory)


def commit_version(directory: str | os.PathLike, write: Callable[[Path], None], manifest: dict,
                   legacy_files: Sequence[str] = ()) -> str:
    """Write a new version of ``directory``: ``write(folder)`` fills a fresh staging folder; once it is durable it
    is renamed to ``v-NNNNNN`` and ``manifest`` (plus ``"data": "v-NNNNNN"``) replaces manifest.json atomically.
    Then the versions and leftovers no longer named are removed (and ``legacy_files``, a flat layout's files).
    Returns the new version's name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with writer_lock(directory / ".lock"):
        version = f"v-{_last_version(directory) + 1:06d}"
        staging = directory / f".staging-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        fsync_tree(staging)
        os.rename(staging, directory / version)
        fsync_dir(directory)
        atomic_write_text(directory / MANIFEST, json.dumps({**manifest, "data": version}, indent=2))
        remove_leftovers(directory, version, legacy_files)
    return version


def clean_leftovers(directory: str | os.PathLike, legacy_files: Sequence[str] = ()) -> None:
    """Remove what a killed writer left in a versioned folder (on the next start), if there is any, no writer holds
    the folder and it is writable. A clean or read-only folder is not touched."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
        keep = (manifest or {}).get("data") or ""
        if manifest is None or not _leftovers(directory, keep, legacy_files if keep else ()):
            return
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (OSError, ValueError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        manifest = read_manifest(directory) or {}  # re-read under the lock: a writer may have committed meanwhile
        keep = manifest.get("data") or ""
        remove_leftovers(directory, keep, legacy_files if keep else ())
    except (OSError, ValueError):
        pass  # a writer is at work (it cleans up itself), or the folder is read-only
    finally:
        os.close(fd)


def _leftovers(directory: Path, keep: str, legacy_files: Sequence[str]) -> list[Path]:
    """What :func:`remove_leftovers` would delete."""
    found = []
    for entry in directory.iterdir():
        name = entry.name
        if (_VERSION.match(name) and name != keep) or name.startswith(".staging-") or name in legacy_files or \
                (name.startswith(".") and ".tmp" in name and entry.is_file()):
            found.append(entry)
    return found


def remove_leftovers(directory: Path, keep: str, legacy_files: Sequence[str] = ()) -> None:
    """Delete versions other than ``keep``, staging folders and temporary files; with ``keep`` set, also the
    ``legacy_files`` of a flat layout that the version replaced."""
    for entry in _leftovers(directory, keep, legacy_files if keep else ()):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    fsync_dir(directory)


def _last_version(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.iterdir() for m in [_VERSION.match(p.name)] if m]
    staged = [int(m.group(1)) for p in directory.glob(".staging-v-*") for m in [_VERSION.match(p.name[9:])] if m]
    return max(numbers + staged, default=0)


# --------------------------------------------------------------------------------------------------------------------
# a folder opened by its own name


def commit_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace the folder ``target`` as a whole: ``write(folder)`` fills a staging folder; once durable it becomes
    the hidden version ``.<name>.v-NNNNNN`` and ``target`` a symlink to it, switched with one atomic rename. Readers
    that open ``target`` (resolve it once) see the old checkpoint or the new one. A real folder at ``target`` (an
    older layout) is replaced the same way, through a short rename."""
    target = Path(target)
    parent, name = target.parent, target.name
    parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(parent / f".{name}.lock"):
        number = 1 + max((int(m.group(1)) for p in parent.glob(f".{name}.*")
                          for m in [re.match(rf"^\.{re.escape(name)}\.(?:v|staging)-(\d+)$", p.name)] if m), default=0)
        staging = parent / f".{name}.staging-{number:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        fsync_tree(staging)
        version = parent / f".{name}.v-{number:06d}"
        os.rename(staging, version)
        link = parent / f".{name}.link-{number:06d}"
        link.unlink(missing_ok=True)
        os.symlink(version.name, link)
        if target.is_dir() and not target.is_symlink():  # the older layout: a real folder (kept until switched)
            os.rename(target, parent / f".{name}.old-{number:06d}")
        os.replace(link, target)
        fsync_dir(parent)
        for entry in parent.glob(f".{name}.*"):
            if entry != version and not entry.name.endswith(".lock"):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() \
                    else entry.unlink(missing_ok=True)
        fsync_dir(parent)
    return target


def recover_directory(target: str | os.PathLike) -> Path:
    """``target`` after a writer killed between its two renames of an older real folder: put the folder back."""
    target = Path(target)
    if not target.exists():
        olds = sorted(target.parent.glob(f".{target.name}.old-*"))
        if olds:
            os.rename(olds[-1], target)
    return target
