"""A caption datastore: unique captions, their CLAP text embeddings and a faiss inner-product index.

It serves audio-to-text retrieval (top-k captions for an audio embedding) and holds the unit-norm embedding matrix
that DRCap projects audio embeddings onto (its "support"). On disk it is a directory:

    manifest.json    which CLAP built it (name, fingerprint, embedding size), index type, sources, counts
    captions.csv     one row per caption: id, caption, source (row i <-> embedding row i)
    embeddings.npy   [N, D] float32, unit-norm
    index.faiss      the faiss index over embeddings.npy

Loading against a different CLAP is refused: cosine scores between two models' embeddings mean nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.clap.base import ClapBackend
from engine.config import DatastoreConfig
from engine.errors import DatastoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ProgressCallback = Callable[[int, int], None]  # (captions embedded so far, total)


# --------------------------------------------------------------------------------------------------------------------
# reading caption files


def read_captions(path: str | os.PathLike, csv_column: str = "caption", jsonl_field: str = "target") -> list[str]:
    """Captions from an AudioCaps-style CSV, a DRCap jsonl (``target`` field) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"Caption file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if csv_column not in table.columns:
            raise DatastoreError(f"{path} has no {csv_column!r} column (columns: {', '.join(table.columns)}); "
                                 "set datastore.csv_column / --csv-column")
        return table[csv_column].tolist()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, jsonl_field)
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    raise DatastoreError(f"Don't know how to read captions from {path.name}: use .csv/.tsv (column "
                         f"{csv_column!r}), .jsonl (field {jsonl_field!r}) or .txt (one caption per line)")


def _read_jsonl(path: Path, field_name: str) -> list[str]:
    return [record[field_name] for record in read_jsonl_records(path, required=(field_name,))]


def read_jsonl_records(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """Objects of a jsonl file (blank lines skipped); each must hold the ``required`` string fields."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatastoreError(f"{path}:{line_number} is not valid JSON: {e}") from e
            for name in required:
                if not isinstance(record, dict) or not isinstance(record.get(name), str):
                    raise DatastoreError(f"{path}:{line_number} has no string field {name!r} "
                                         "(set datastore.jsonl_field / --jsonl-field)")
            records.append(record)
    return records


def read_caption_records(path: str | os.PathLike, csv_column: str = "caption", jsonl_field: str = "target"
                         ) -> list[dict]:
    """DRCap-style records ``{key, target, text}`` from any caption file (jsonl keeps its other fields).

    Keys: jsonl ``key``, else CSV ``audiocap_id``/``key``/``youtube_id``, else ``<file stem>_<row>``.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = read_jsonl_records(path, required=(jsonl_field,))
        return [{**r, "key": str(r.get("key", f"{path.stem}_{i}")), "target": r[jsonl_field],
                 "text": r.get("text") or r[jsonl_field]} for i, r in enumerate(records)]
    captions = read_captions(path, csv_column, jsonl_field)
    keys = [f"{path.stem}_{i}" for i in range(len(captions))]
    if path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                            keep_default_na=False)
        key_column = next((c for c in ("key", "audiocap_id", "youtube_id") if c in table.columns), None)
        if key_column:
            keys = table[key_column].tolist()
    return [{"key": k, "target": normalize_caption(c), "text": normalize_caption(c)}
            for k, c in zip(keys, captions) if normalize_caption(c)]


def normalize_caption(caption: str) -> str:
    """Collapse runs of whitespace; captions that differ only in spacing are the same caption."""
    return " ".join(caption.split())


def unique_captions(captions: Iterable[str], already: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Normalised, non-empty captions with exact duplicates (and any in ``already``) removed; order kept."""
    seen = set(already)
    result = []
    for caption in captions:
        caption = normalize_caption(caption)
        if caption and caption not in seen:
            seen.add(caption)
            result.append(caption)
    return result


def band_neighbours(queries: np.ndarray, keys: np.ndarray, low: float = 0.75, high: float = 0.85, k: int = 3,
                    seed: int = 0, chunk_size: int = 1024) -> list[list[int]]:
    """For each query, up to ``k`` random rows of ``keys`` with ``low < cosine < high`` (DRCap's training retrieval).

    queries [Q, D] and keys [N, D] are unit-norm. The band's upper bound excludes the query's own caption and near
    copies. Sampling is seeded (DRCap's is not), and a single candidate is kept (DRCap drops it by accident).
    Similarities are computed ``chunk_size`` queries at a time, so memory stays at chunk_size x N.
    """
    rng = np.random.default_rng(seed)
    chosen: list[list[int]] = []
    for start in range(0, len(queries), chunk_size):
        sims = queries[start:start + chunk_size] @ keys.T  # [chunk, N]
        for row in sims:
            candidates = np.flatnonzero((row > low) & (row < high))
            chosen.append(rng.permutation(candidates)[:k].tolist())
    return chosen


# --------------------------------------------------------------------------------------------------------------------
# the datastore


@dataclass
class DatastoreManifest:
    clap_name: str
    clap_fingerprint: str
    embedding_dim: int
    size: int = 0
    index_type: str = "flat"
    sources: list[str] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    format_version: int = FORMAT_VERSION


@dataclass
class SearchResult:
    """Top-k captions per query, best first."""

    captions: list[list[str]]  # [Q][k]
    scores: np.ndarray  # [Q, k] cosine similarity
    indices: np.ndarray  # [Q, k] rows of the datastore


class CaptionDatastore:
    """Captions + unit-norm CLAP text embeddings + a faiss index. Build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, captions: list[str], sources: list[str], embeddings: np.ndarray, manifest: DatastoreManifest,
                 config: DatastoreConfig | None = None, index: faiss.Index | None = None) -> None:
        self.config = config or DatastoreConfig()
        self.captions = captions  # row i of embeddings
        self.caption_sources = sources  # where row i came from
        self.embeddings = embeddings  # [N, D] float32 unit-norm
        self.manifest = manifest
        self._positions = {c: i for i, c in enumerate(captions)}
        self.index = index if index is not None else self._build_index(embeddings)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def support(self) -> torch.Tensor:
        """[N, D] unit-norm caption embeddings: DRCap's projection support (shares memory with the store)."""
        return torch.from_numpy(self.embeddings)

    # --- building --------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, captions: Iterable[str], clap: ClapBackend, config: DatastoreConfig | None = None, *,
              source: str = "", show_progress: bool = True,
              progress: ProgressCallback | None = None) -> CaptionDatastore:
        """Embed unique captions in chunks and index them."""
        config = config or DatastoreConfig()
        unique = unique_captions(captions)
        if not unique:
            raise DatastoreError("No captions to build a datastore from (all empty?)")
        embeddings = embed_captions(clap, unique, config.chunk_size, show_progress, progress)
        now = _now()
        manifest = DatastoreManifest(clap_name=clap.name, clap_fingerprint=clap.fingerprint,
                                     embedding_dim=clap.embedding_dim, size=len(unique),
                                     sources=[source] if source else [], created=now, updated=now)
        store = cls(unique, [source] * len(unique), embeddings, manifest, config)
        log.info("Built datastore: %d unique captions (%s index)", len(store), store.manifest.index_type)
        return store

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], clap: ClapBackend,
                   config: DatastoreConfig | None = None, *, show_progress: bool = True,
                   progress: ProgressCallback | None = None) -> CaptionDatastore:
        """Build from caption files (duplicates across files are removed; the first file a caption is in wins)."""
        config = config or DatastoreConfig()
        if not paths:
            raise DatastoreError("No caption files given")
        store = None
        for path in paths:
            captions = read_captions(path, config.csv_column, config.jsonl_field)
            if store is None:
                store = cls.build(captions, clap, config, source=Path(path).name, show_progress=show_progress,
                                  progress=progress)
            else:
                store.add(captions, clap, source=Path(path).name, show_progress=show_progress, progress=progress)
        return store

    def add(self, captions: Iterable[str], clap: ClapBackend, *, source: str = "user", show_progress: bool = False,
            progress: ProgressCallback | None = None) -> int:
        """Embed and index captions not yet in the store; returns how many were new."""
        self.check_compatible(clap)
        new = unique_captions(captions, already=self._positions.keys())
        if not new:
            return 0
        vectors = embed_captions(clap, new, self.config.chunk_size, show_progress, progress)
        start = len(self.captions)
        self.captions.extend(new)
        self.caption_sources.extend([source] * len(new))
        self._positions.update((c, start + i) for i, c in enumerate(new))
        self.embeddings = np.concatenate([self.embeddings, vectors])
        if self.manifest.index_type == "flat" and len(self) > self.config.exact_max_size:
            self.index = self._build_index(self.embeddings)  # grew past the exact-search size: go approximate
        else:
            self.index.add(vectors)
        if source and source not in self.manifest.sources:
            self.manifest.sources.append(source)
        self.manifest.size = len(self)
        self.manifest.updated = _now()
        return len(new)

    def _build_index(self, embeddings: np.ndarray) -> faiss.Index:
        n, dim = embeddings.shape
        if n <= self.config.exact_max_size:
            index = faiss.IndexFlatIP(dim)
            self.manifest.index_type = "flat"
        else:
            # 4*sqrt(N) cells, but never so many that k-means gets fewer than 39 points per cell.
            nlist = self.config.ivf_nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on a deterministic, evenly spaced sample: faiss wants ~39-256 points per cell.
            sample = embeddings[np.linspace(0, n - 1, min(n, 256 * nlist)).astype(np.int64)]
            index.cp.seed = 1234
            index.train(sample)
            index.nprobe = min(self.config.ivf_nprobe, nlist)
            self.manifest.index_type = "ivf"
        index.add(embeddings)
        return index

    # --- querying --------------------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor | np.ndarray, k: int | None = None) -> SearchResult:
        """[Q, D] unit-norm query embeddings -> the k most similar captions for each, best first."""
        matrix = queries.detach().cpu().float().numpy() if isinstance(queries, torch.Tensor) else queries
        matrix = np.ascontiguousarray(np.atleast_2d(matrix), dtype=np.float32)
        if matrix.shape[1] != self.embedding_dim:
            raise DatastoreError(f"Query embeddings are {matrix.shape[1]}-d but this datastore holds "
                                 f"{self.embedding_dim}-d embeddings ({self.manifest.clap_name})")
        k = min(k or self.config.top_k, len(self))
        if k < 1:
            raise DatastoreError(f"k must be at least 1, got {k}")
        scores, indices = self.index.search(matrix, k)  # [Q, k] each; IVF pads short lists with -1
        captions = [[self.captions[i] for i in row if i >= 0] for row in indices]
        return SearchResult(captions=captions, scores=scores, indices=indices)

    # --- persistence -----------------------------------------------------------------------------------------------

    def check_compatible(self, clap: ClapBackend) -> None:
        """Refuse a CLAP other than the one that built this store."""
        m = self.manifest
        if clap.fingerprint != m.clap_fingerprint or clap.embedding_dim != m.embedding_dim:
            raise DatastoreError(
                f"This datastore was built with CLAP {m.clap_name!r} ({m.embedding_dim}-d, fingerprint "
                f"{m.clap_fingerprint}), but the loaded CLAP is {clap.name!r} ({clap.embedding_dim}-d, fingerprint "
                f"{clap.fingerprint}). Embeddings of different models cannot be compared: rebuild the datastore "
                f"with this CLAP (python -m trainers.build_datastore --clap {clap.name} ...) or load the CLAP it "
                "was built with.")

    def save(self, directory: str | os.PathLike, compact: bool = False) -> Path:
        """Write the store to ``directory`` (created; files are replaced one by one via temporary names).

        ``compact`` (for stores shipped in a repository): float16 embeddings and, for an exact index, no index file
        (an exact index is rebuilt from the embeddings on load in milliseconds). Half the size, a quarter with the
        index; cosines change by < 1e-3.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        one_source = len(set(self.caption_sources)) <= 1 and self.caption_sources[:1] == self.manifest.sources[:1]
        if compact and one_source:  # the caption column alone: ids are row numbers, the source is the manifest's
            table = pd.DataFrame({"caption": self.captions})
        else:
            table = pd.DataFrame({"id": range(len(self)), "caption": self.captions, "source": self.caption_sources})
        _atomic_write(directory / "captions.csv", lambda p: table.to_csv(p, index=False))
        stored = self.embeddings.astype(np.float16) if compact else self.embeddings
        _atomic_write(directory / "embeddings.npy", lambda p: _save_npy(p, stored))
        if compact and self.manifest.index_type == "flat":
            (directory / "index.faiss").unlink(missing_ok=True)
        else:
            _atomic_write(directory / "index.faiss", lambda p: faiss.write_index(self.index, str(p)))
        # The manifest goes last: a directory with a manifest is complete.
        _atomic_write(directory / "manifest.json",
                      lambda p: Path(p).write_text(json.dumps(asdict(self.manifest), indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, clap: ClapBackend | None = None,
             config: DatastoreConfig | None = None) -> CaptionDatastore:
        """Open a saved store; with ``clap`` given, refuse it unless that CLAP built the store."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise DatastoreError(f"{directory} is not a datastore (no manifest.json); build one with "
                                 "python -m trainers.build_datastore")
        try:
            raw = json.loads(manifest_path.read_text())
            manifest = DatastoreManifest(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise DatastoreError(f"{manifest_path} is malformed: {e}") from e
        if manifest.format_version != FORMAT_VERSION:
            raise DatastoreError(f"{directory} has datastore format {manifest.format_version}; this AudioScribe "
                                 f"reads format {FORMAT_VERSION}. Rebuild it.")
        table = pd.read_csv(directory / "captions.csv", dtype=str, keep_default_na=False)
        embeddings = np.load(directory / "embeddings.npy")
        if embeddings.dtype != np.float32:  # a compact store: float16 on disk, unit-norm float32 in memory
            embeddings = embeddings.astype(np.float32)
            embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        index_path = directory / "index.faiss"
        if index_path.is_file():
            index = faiss.read_index(str(index_path))
        elif manifest.index_type == "flat":  # compact stores ship no exact index: rebuilt below
            index = faiss.IndexFlatIP(embeddings.shape[1])
            index.add(np.ascontiguousarray(embeddings))
        else:
            raise DatastoreError(f"{directory} has no index.faiss; rebuild it")
        counts = {len(table), embeddings.shape[0], index.ntotal, manifest.size}
        if len(counts) != 1 or embeddings.shape[1] != manifest.embedding_dim:
            raise DatastoreError(f"{directory} is inconsistent (captions {len(table)}, embeddings "
                                 f"{embeddings.shape}, index {index.ntotal}, manifest {manifest.size}); rebuild it")
        if isinstance(index, faiss.IndexIVF) and config is not None:
            index.nprobe = min(config.ivf_nprobe, index.nlist)
        sources = table["source"].tolist() if "source" in table else [(manifest.sources or [""])[0]] * len(table)
        store = cls(table["caption"].tolist(), sources, embeddings, manifest, config, index=index)
        if clap is not None:
            store.check_compatible(clap)
        return store


def embed_captions(clap: ClapBackend, captions: Sequence[str], chunk_size: int = 2048, show_progress: bool = False,
                   progress: ProgressCallback | None = None) -> np.ndarray:
    """[N, D] float32 embeddings written chunk by chunk into one preallocated array (bounded peak memory)."""
    out = np.empty((len(captions), clap.embedding_dim), dtype=np.float32)
    with tqdm(total=len(captions), desc="Embedding captions", unit="cap", disable=not show_progress) as bar:
        for start in range(0, len(captions), chunk_size):
            chunk = captions[start:start + chunk_size]
            out[start:start + len(chunk)] = clap.embed_text(chunk).numpy()
            bar.update(len(chunk))
            if progress is not None:
                progress(start + len(chunk), len(captions))
    return out


def add_band_retrieval(records: list[dict], clap: ClapBackend, store: CaptionDatastore, low: float, high: float,
                       k: int, seed: int, show_progress: bool = False) -> list[dict]:
    """Records with ``similar_captions``: up to k datastore captions with low < cos(text, caption) < high (DRCap's
    training retrieval; the trainer and the preprocessing CLI share it)."""
    queries = embed_captions(clap, [r["text"] for r in records], show_progress=show_progress)
    chosen = band_neighbours(queries, store.embeddings, low, high, k, seed)
    return [{**r, "similar_captions": [store.captions[i] for i in rows]} for r, rows in zip(records, chosen)]


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the temporary name
        np.save(f, array)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
