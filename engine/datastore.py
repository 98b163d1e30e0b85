"""A caption datastore: unique captions, their CLAP text embeddings and a faiss inner-product index.

It serves audio-to-text retrieval (top-k captions for an audio embedding) and holds the unit-norm embedding matrix
that DRCap projects audio embeddings onto (its "support"). On disk it is a directory:

    manifest.json      which CLAP built it (name, fingerprint, embedding size), index type, sources, counts, and
                       which version folder holds the files (replaced atomically: the commit record)
    v-000003/
      captions.csv     one row per caption: id, caption, source (row i <-> embedding row i)
      embeddings.npy   [N, D] float32, unit-norm
      index.faiss      the faiss index over embeddings.npy

Every save writes a new version folder and then switches the manifest (engine/atomic.py), so a store killed while
saving still loads as before. Format-1 stores (files beside the manifest) load as they are.

Search (measured in benchmarks/RESULTS.md, "Caption datastore"): up to ``exact_max_size`` captions exactly, with
results equal to the flat faiss index's: a few queries through 8-bit codes on one thread, their best candidates
re-scored exactly; many through one torch matrix product (:func:`exact_search`). Above it through the manifest's
``index_type``: ``ivf_sq8`` / ``ivf_sq4`` (IVF cells of 8- or 4-bit codes, candidates re-scored exactly,
:func:`rerank`) or ``ivf`` (IVF cells of full vectors, the index of stores built before). Thread settings:
engine/threads.py.

Loading against a different CLAP is refused: cosine scores between two models' embeddings mean nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.atomic import MANIFEST, clean_leftovers, commit_version, data_folder, read_manifest
from engine.clap.base import ClapBackend
from engine.config import DatastoreConfig
from engine.errors import DatastoreError
from engine.threads import EXACT_PARALLEL_MIN_WORK, faiss_threads, faiss_threads_for

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: files in a version folder named by the manifest; 1: files beside the manifest
READABLE_FORMATS = (1, 2)
CAPTIONS_FILE, EMBEDDINGS_FILE, INDEX_FILE = "captions.csv", "embeddings.npy", "index.faiss"
DATA_FILES = (CAPTIONS_FILE, EMBEDDINGS_FILE, INDEX_FILE)
APPROXIMATE_INDEXES = ("ivf_sq8", "ivf_sq4", "ivf")  # index_type above exact_max_size (manifest; "flat" below)
CODE_BITS = {"ivf_sq8": 8, "ivf_sq4": 4}  # the coded indexes: bits per dimension
# Exact search: score gaps below this (times the query's norm) count as near-ties. The matrix product and faiss sum
# in different orders (they differ by ~1e-7 for unit vectors of 512 dims), so only faiss itself can order such rows
# as faiss would; they are rare and re-searched with faiss.
TIE_TOLERANCE = 1e-5
EXACT_CHUNK_SCORES = 1 << 24  # exact search holds at most this many float32 scores at once ([chunk, N], 64 MB)
# Exact search of fewer queries than this per call reads 8-bit codes on one thread and re-scores the best
# PREFILTER_DEPTH exactly (CaptionDatastore._search_prefiltered); more queries share one matrix product.
PREFILTER_MAX_QUERIES = 8
PREFILTER_DEPTH = 64
ProgressCallback = Callable[[int, int], None]  # (captions embedded so far, total)


# --------------------------------------------------------------------------------------------------------------------
# reading caption files


def read_captions(path: str | os.PathLike, csv_column: str = "caption", jsonl_field: str = "target",
                  max_mb: float | None = None) -> list[str]:
    """Captions from an AudioCaps-style CSV, a DRCap jsonl (``target`` field) or a text file (one per line); files
    over ``max_mb`` are refused before reading."""
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"Caption file {path} does not exist")
    size_mb = path.stat().st_size / 2**20
    if max_mb is not None and size_mb > max_mb:
        raise DatastoreError(f"Caption file {path.name} is {size_mb:,.0f} MB; the limit is {max_mb:g} MB "
                             "(datastore.max_caption_file_mb). Split it, or raise the limit with "
                             "--set datastore.max_caption_file_mb=...")
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
    data: str = ""  # the version folder holding the files ("" = beside the manifest: format 1)
    index_params: dict = field(default_factory=dict)  # how the index was built (cells, code bytes, seconds); {} = flat


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
        self._code_cache: tuple[np.ndarray, faiss.IndexScalarQuantizer, float] | None = None  # see _codes

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
            captions = read_captions(path, config.csv_column, config.jsonl_field, config.max_caption_file_mb)
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
        kind = "flat" if n <= self.config.exact_max_size else self.config.approximate_index
        started = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind in CODE_BITS:
            index = _train_ivf_sq(embeddings, CODE_BITS[kind], self.config.ivf_nlist)
        elif kind == "ivf":
            index = _train_ivf_flat(embeddings, self.config.ivf_nlist)
        else:
            raise DatastoreError(f"datastore.approximate_index must be one of {', '.join(APPROXIMATE_INDEXES)}, "
                                 f"got {kind!r}")
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self.config.ivf_nprobe, index.nlist)
        index.add(embeddings)
        self.manifest.index_type = kind
        self.manifest.index_params = _index_params(index)
        if kind != "flat":
            self.manifest.index_params["build_s"] = round(time.perf_counter() - started, 1)
            log.info("Built a %s index over %d vectors (%s)", kind, n, self.manifest.index_params)
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
        if self.manifest.index_type == "flat":
            scores, indices = self._search_exact(matrix, k)
        elif self.manifest.index_type in CODE_BITS:
            scores, indices = self._search_reranked(matrix, k)
        else:
            scores, indices = self._search_index(matrix, k)
        captions = [[self.captions[i] for i in row if i >= 0] for row in indices]
        return SearchResult(captions=captions, scores=scores, indices=indices)

    def _search_exact(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, D] -> scores, indices [Q, k] equal to the flat faiss index's. Small searches (engine/threads.py:
        EXACT_PARALLEL_MIN_WORK) are faiss's flat scan on one thread; a few queries go through 8-bit codes on one
        thread (:meth:`_search_prefiltered`); more share one torch matrix product (:func:`exact_search`). Rows with
        near-ties (whose order only faiss's own sums can decide) are re-searched with faiss."""
        if len(matrix) * len(self) * self.embedding_dim < EXACT_PARALLEL_MIN_WORK:
            with faiss_threads(1):
                return self.index.search(matrix, k)
        if len(matrix) < PREFILTER_MAX_QUERIES:
            scores, indices, near_ties, unproven = self._search_prefiltered(matrix, k)
            if unproven.any():  # the codes could not prove these rows' top k: the matrix product decides
                rows = np.flatnonzero(unproven)
                scores[rows], indices[rows], near_ties[rows] = exact_search(self.embeddings, matrix[rows], k)
        else:
            scores, indices, near_ties = exact_search(self.embeddings, matrix, k)
        if near_ties.any():
            rows = np.flatnonzero(near_ties)
            if len(rows) == 1 and len(matrix) > 1:
                # faiss sums a lone query in another order than a batch (they differ by ~3e-8, which can order exact
                # duplicates differently): search it in a batch of two, as it was asked, and keep the first row.
                rows = np.append(rows, (rows[0] + 1) % len(matrix))
            with faiss_threads(faiss_threads_for(len(rows))):
                found_scores, found_indices = self.index.search(matrix[rows], k)
            keep = near_ties[rows]
            scores[rows[keep]], indices[rows[keep]] = found_scores[keep], found_indices[keep]
        return scores, indices

    def _search_prefiltered(self, matrix: np.ndarray, k: int
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact top k of a few queries from one thread: 8-bit codes of the embeddings (a quarter of the bytes to
        read) pick PREFILTER_DEPTH candidates, which are scored exactly. A row outside the candidates scores at most
        the last candidate's code score + |q| * (largest code error): when the (k+1)-th exact score beats that bound,
        the top k+1 are proven to be among the candidates. Returns scores, indices [Q, k], near_ties [Q] (as
        :func:`exact_search`) and unproven [Q] (rows the bound could not settle)."""
        codes, max_error = self._codes()
        n = len(self)
        depth = min(n, max(PREFILTER_DEPTH, k + 1))
        with faiss_threads(1):
            approx, candidates = codes.search(matrix, depth)  # [Q, depth] code scores, best first
        exact = np.einsum("qd,qcd->qc", matrix, self.embeddings[candidates])  # [Q, depth]
        order = np.lexsort((candidates, -exact), axis=-1)
        exact, candidates = np.take_along_axis(exact, order, 1), np.take_along_axis(candidates, order, 1)
        count = min(k + 1, n)
        norms = np.linalg.norm(matrix, axis=1)
        if depth == n:  # every row is a candidate
            unproven = np.zeros(len(matrix), dtype=bool)
        else:  # 1e-4 * |q| covers float rounding in both scores
            unproven = exact[:, count - 1] <= approx[:, -1] + norms * (max_error + 1e-4)
        gaps = exact[:, :count - 1] - exact[:, 1:count]
        near_ties = (gaps < TIE_TOLERANCE * norms[:, None]).any(axis=1)
        return exact[:, :k].astype(np.float32), candidates[:, :k], near_ties, unproven

    def _codes(self) -> tuple[faiss.IndexScalarQuantizer, float]:
        """8-bit codes of the embeddings (one byte per dimension, each dimension's range trained on all rows) and
        the largest distance between a row and its decoded code. Built on first use and again when the embeddings
        are replaced (they are never changed in place)."""
        cached = self._code_cache
        if cached is None or cached[0] is not self.embeddings:
            embeddings = self.embeddings
            codes = faiss.IndexScalarQuantizer(self.embedding_dim, faiss.ScalarQuantizer.QT_8bit,
                                               faiss.METRIC_INNER_PRODUCT)
            codes.train(embeddings)
            codes.add(embeddings)
            max_error = 0.0
            for start in range(0, len(embeddings), 65536):  # decoded in blocks: no second full float copy
                block = embeddings[start:start + 65536]
                decoded = codes.reconstruct_n(start, len(block))
                max_error = max(max_error, float(np.linalg.norm(block - decoded, axis=1).max()))
            cached = self._code_cache = (embeddings, codes, max_error)
        return cached[1], cached[2]

    def _search_index(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The faiss index's own search (approximate indexes pad short result lists with -1)."""
        with faiss_threads(faiss_threads_for(len(matrix))):
            return self.index.search(matrix, k)  # [Q, k] each

    def _search_reranked(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's best ``rerank_depth`` candidates per query, scored exactly against the embeddings; top k."""
        depth = min(max(k, self.config.rerank_depth), len(self))
        _, candidates = self._search_index(matrix, depth)  # [Q, depth], -1 where the visited cells ran out
        return rerank(self.embeddings, matrix, candidates, k)

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
        """Write the store to ``directory`` as a new version, atomically (engine.atomic.commit_version): the files go
        into a fresh version folder and the manifest, replaced last in one rename, names it. Killed at any moment,
        the folder still holds the previous store (or none, for a first build); leftovers go on the next write.

        ``compact`` (for stores shipped in a repository): float16 embeddings and, for an exact index, no index file
        (an exact index is rebuilt from the embeddings on load in milliseconds). Half the size, a quarter with the
        index; cosines change by < 1e-3.
        """
        directory = Path(directory)
        one_source = len(set(self.caption_sources)) <= 1 and self.caption_sources[:1] == self.manifest.sources[:1]
        if compact and one_source:  # the caption column alone: ids are row numbers, the source is the manifest's
            table = pd.DataFrame({"caption": self.captions})
        else:
            table = pd.DataFrame({"id": range(len(self)), "caption": self.captions, "source": self.caption_sources})
        stored = self.embeddings.astype(np.float16) if compact else self.embeddings

        def write(folder: Path) -> None:
            table.to_csv(folder / CAPTIONS_FILE, index=False)
            _save_npy(folder / EMBEDDINGS_FILE, stored)
            if not (compact and self.manifest.index_type == "flat"):
                faiss.write_index(self.index, str(folder / INDEX_FILE))

        self.manifest.format_version = FORMAT_VERSION
        manifest = {k: v for k, v in asdict(self.manifest).items() if k != "data"}
        self.manifest.data = commit_version(directory, write, manifest, legacy_files=DATA_FILES)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, clap: ClapBackend | None = None,
             config: DatastoreConfig | None = None) -> CaptionDatastore:
        """Open a saved store; with ``clap`` given, refuse it unless that CLAP built the store.

        A writer may commit a new version while this reads; then the version read may vanish mid-way, and the
        newer one is read instead.
        """
        directory = Path(directory)
        for attempt in range(3):
            manifest = _read_store_manifest(directory)
            try:
                store = cls._load_version(directory, manifest, config)
                break
            except FileNotFoundError as e:
                if attempt < 2 and _read_store_manifest(directory) != manifest:
                    continue  # a writer switched versions while we read: read the new one
                raise DatastoreError(f"{directory} is missing {Path(e.filename or '').name or 'a file'} "
                                     f"(datastore version {manifest.data or 'flat'}); rebuild it") from e
        clean_leftovers(directory, DATA_FILES)
        if clap is not None:
            store.check_compatible(clap)
        return store

    @classmethod
    def _load_version(cls, directory: Path, manifest: DatastoreManifest, config: DatastoreConfig | None
                      ) -> CaptionDatastore:
        folder = data_folder(directory, asdict(manifest))
        table = _read_table(folder / CAPTIONS_FILE)
        embeddings = _read_embeddings(folder / EMBEDDINGS_FILE, manifest.embedding_dim)
        index_path = folder / INDEX_FILE
        if index_path.is_file():
            index = _read_index(index_path)
        elif manifest.index_type == "flat":  # compact stores ship no exact index: rebuilt here
            index = faiss.IndexFlatIP(embeddings.shape[1])
            index.add(np.ascontiguousarray(embeddings))
        else:
            raise DatastoreError(f"{folder} has no {INDEX_FILE}; rebuild the datastore")
        counts = {len(table), embeddings.shape[0], index.ntotal, manifest.size}
        if len(counts) != 1 or index.d != manifest.embedding_dim:
            raise DatastoreError(f"{directory} is inconsistent (captions {len(table)}, embeddings "
                                 f"{embeddings.shape}, index {index.ntotal}×{index.d}, manifest {manifest.size}); "
                                 "rebuild it")
        if isinstance(index, faiss.IndexIVF) and config is not None:
            index.nprobe = min(config.ivf_nprobe, index.nlist)
        sources = table["source"].tolist() if "source" in table else [(manifest.sources or [""])[0]] * len(table)
        return cls(table["caption"].tolist(), sources, embeddings, manifest, config, index=index)


def _train_ivf_flat(embeddings: np.ndarray, nlist: int = 0) -> faiss.IndexIVFFlat:
    """IVF cells of full vectors (the index stores a second copy of them): 4*sqrt(N) cells, at least 39 points each."""
    n, dim = embeddings.shape
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.train(_even_sample(embeddings, 256 * nlist))  # k-means wants ~39-256 points per cell
    return index


def _train_ivf_sq(embeddings: np.ndarray, bits: int, nlist: int = 0) -> faiss.IndexIVFScalarQuantizer:
    """IVF cells of scalar-quantised vectors, ``bits`` (8 or 4) per dimension (a quarter or an eighth of the float32
    row), in 2*sqrt(N) cells (at least 39 points each) trained by 10 k-means iterations on 64 points per cell.

    The codes only choose candidates; :meth:`CaptionDatastore._search_reranked` scores them exactly against the
    embeddings the store holds anyway (DRCap's support), so results carry exact cosines and the index keeps no
    second float copy of the vectors. Chosen against IVF-Flat, PQ fast-scan and HNSW on 1M CLAP-like vectors
    (benchmarks/RESULTS.md): with 50 re-scored candidates 8-bit codes lose no recall to full vectors, also where
    neighbours crowd (4-bit codes scan twice as fast but lose recall there: the tiny CLAP's embeddings); building
    takes minutes on 2 cores, where the ivf index's 4*sqrt(N) cells on 256 points each take most of an hour.
    """
    n, dim = embeddings.shape
    nlist = nlist or max(1, min(int(2 * math.sqrt(n)), n // 39))
    codes = {8: faiss.ScalarQuantizer.QT_8bit, 4: faiss.ScalarQuantizer.QT_4bit}[bits]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, codes, faiss.METRIC_INNER_PRODUCT,
                                          False)  # codes of the vectors themselves, not of residuals
    index.cp.seed = 1234
    index.cp.niter = 10
    index.train(_even_sample(embeddings, max(64 * nlist, 4096)))  # also each dimension's range, for the codes
    return index


def _index_params(index: faiss.Index) -> dict:
    """What the manifest records about an approximate index: its cells and, for coded vectors, bytes per code."""
    if not isinstance(index, faiss.IndexIVF):
        return {}
    params = {"nlist": int(index.nlist)}
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        params["code_bytes"] = int(index.code_size)  # per vector
    return params


def _even_sample(embeddings: np.ndarray, count: int) -> np.ndarray:
    """A deterministic, evenly spaced sample of at most ``count`` rows (k-means needs no more)."""
    n = len(embeddings)
    return np.ascontiguousarray(embeddings[np.linspace(0, n - 1, min(n, count)).astype(np.int64)])


def is_datastore(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a committed datastore (its manifest); a killed first build leaves none."""
    return (Path(directory) / MANIFEST).is_file()


def current_files(directory: str | os.PathLike) -> Path:
    """The folder holding the committed version's captions, embeddings and index (for tools that read them)."""
    return data_folder(directory, asdict(_read_store_manifest(Path(directory))))


def _read_store_manifest(directory: Path) -> DatastoreManifest:
    if not is_datastore(directory):
        raise DatastoreError(f"{directory} is not a datastore (no {MANIFEST}); build one with "
                             "python -m trainers.build_datastore")
    try:
        manifest = DatastoreManifest(**read_manifest(directory))
        data_folder(directory, asdict(manifest))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise DatastoreError(f"{directory / MANIFEST} is malformed: {e}") from e
    if manifest.format_version not in READABLE_FORMATS:
        raise DatastoreError(f"{directory} has datastore format {manifest.format_version}; this AudioScribe "
                             f"reads formats {', '.join(map(str, READABLE_FORMATS))}. Rebuild it.")
    return manifest


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DatastoreError(f"{path} is not a readable caption table ({type(e).__name__}: {e}); rebuild the "
                             "datastore") from e
    if "caption" not in table.columns:
        raise DatastoreError(f"{path} has no 'caption' column; rebuild the datastore")
    return table


def _read_embeddings(path: Path, dim: int) -> np.ndarray:
    """The [N, D] unit-norm float32 embedding matrix (float16 on disk in a compact store); never unpickles."""
    try:
        embeddings = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DatastoreError(f"{path} is not a readable .npy embedding matrix ({e}); rebuild the datastore") from e
    if embeddings.ndim != 2 or embeddings.shape[1] != dim or embeddings.dtype not in (np.float16, np.float32):
        raise DatastoreError(f"{path} holds a {embeddings.dtype} array of shape {embeddings.shape}; expected "
                             f"[N, {dim}] float32 (or float16); rebuild the datastore")
    if not np.isfinite(embeddings).all():
        raise DatastoreError(f"{path} holds NaN or infinite values; rebuild the datastore")
    if embeddings.dtype != np.float32:  # a compact store: float16 on disk, unit-norm float32 in memory
        embeddings = embeddings.astype(np.float32)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return embeddings


def _read_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:  # faiss reports a corrupt or truncated file as a RuntimeError with its C++ trace
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DatastoreError(f"{path} is not a readable faiss index ({first_line[:200]}); rebuild the "
                             "datastore") from e


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


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk_scores: int = EXACT_CHUNK_SCORES
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows of ``embeddings`` [N, D] by inner product with each of ``queries`` [Q, D] (float32, 1 <= k <= N).

    Scores are one torch matrix product per chunk of queries (at most ``chunk_scores`` scores at once), so a single
    query is a matrix-vector product and a batch reads the matrix once, on torch's own threads. Returns scores [Q, k]
    float32 and indices [Q, k] int64, best first, and near_ties [Q] bool: rows where two of the top k+1 scores lie
    within TIE_TOLERANCE * |query| of each other, whose order (and, at the k-th place, membership) float rounding
    can decide differently from faiss's.
    """
    n = len(embeddings)
    count = min(k + 1, n)  # one more than asked: a near-tie at the k-th place changes which rows are returned
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    near_ties = np.zeros(len(queries), dtype=bool)
    keys = torch.from_numpy(embeddings)  # [N, D], shares memory
    step = max(1, chunk_scores // max(n, 1))
    with torch.inference_mode():
        for start in range(0, len(queries), step):
            chunk = torch.from_numpy(queries[start:start + step])  # [c, D]
            top = torch.topk(chunk @ keys.T, count, dim=1)  # over [c, N] scores; values [c, count], best first
            values = top.values.numpy()
            gaps = values[:, :-1] - values[:, 1:]  # [c, count - 1], >= 0
            tolerance = TIE_TOLERANCE * np.linalg.norm(queries[start:start + step], axis=1)
            near_ties[start:start + step] = (gaps < tolerance[:, None]).any(axis=1)
            scores[start:start + step] = values[:, :k]
            indices[start:start + step] = top.indices.numpy()[:, :k]
    return scores, indices, near_ties


def rerank(embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, chunk: int = 64
           ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's ``candidates`` [Q, C] (rows of ``embeddings``; -1 = none) by exact inner product:
    scores [Q, k] float32 and indices [Q, k] int64, best first, equal scores in row order; as in faiss, -1 (score
    -FLT_MAX) pads rows with fewer than k candidates. ``chunk`` queries at a time bound the gathered [chunk, C, D]
    vectors."""
    scores = np.full((len(queries), k), np.finfo(np.float32).min, dtype=np.float32)
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), chunk):
        found = candidates[start:start + chunk]  # [c, C]
        valid = found >= 0
        exact = np.einsum("qd,qcd->qc", queries[start:start + chunk], embeddings[np.where(valid, found, 0)])
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(valid, found, len(embeddings)), -exact), axis=-1)[:, :k]  # score, then row
        best = np.take_along_axis(exact, order, axis=1)
        kept = np.isfinite(best)
        width = best.shape[1]
        scores[start:start + chunk, :width] = np.where(kept, best, np.finfo(np.float32).min)
        indices[start:start + chunk, :width] = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
    return scores, indices


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the temporary name
        np.save(f, array)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
