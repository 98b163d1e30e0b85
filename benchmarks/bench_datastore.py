"""Benchmark the caption datastore on CPU: build rate, faiss search latency (flat and IVF) and end-to-end query time.

    python -m benchmarks.bench_datastore [--captions PATH] [--models tiny,full] [--queries N]
                                         [--full-subset N] [--e2e-repeats N] [--out benchmarks/RESULTS.md]

Two CLAP models, both randomly initialised and loaded through ``HFClapBackend.from_pretrained(dir, device="cpu")``:

* ``tiny``: ``engine.clap.tiny.build_tiny_clap`` (32-d), the offline profile's model. Its numbers are a floor.
* ``full``: ``transformers.ClapModel(ClapConfig())`` with the default config, i.e. the architecture of
  ``laion/clap-htsat-unfused`` (HTSAT audio tower + RoBERTa-base text tower, 512-d), seeded with
  ``torch.manual_seed(0)``. The real roberta-base tokenizer cannot be downloaded here, so a RoBERTa-style byte-level
  BPE tokenizer is trained on the benchmark captions (fewer tokens than roberta-base's 50,265; the model keeps the
  default 50,265-row embedding table, so its shape and parameter count equal the real checkpoint's). Compute per
  caption depends on the sequence length, which is reported, not on the vocabulary size.

Search cost depends only on the number of vectors N, their dimension D, k and the index, not on the weights, so the
D=512 search rows use 45,716 random unit vectors (the full model would need many minutes to embed every caption on a
small CPU); the D=32 rows use the tiny model's real caption embeddings. The full model's build rate is measured on a
subset and the full-set time is extrapolated (and labelled so).

Results go to stdout (markdown) and into this script's own section of ``--out``; other sections are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.clap.base import l2_normalize  # noqa: E402
from engine.clap.hf import HFClapBackend  # noqa: E402
from engine.clap.tiny import UNTRAINED_MARKER, build_tiny_clap, train_caption_tokenizer  # noqa: E402
from engine.config import DatastoreConfig  # noqa: E402
from engine.datastore import (APPROXIMATE_INDEXES, CODE_BITS, EXACT_CHUNK_SCORES, PREFILTER_DEPTH,  # noqa: E402
                              PREFILTER_MAX_QUERIES, TIE_TOLERANCE, CaptionDatastore, DatastoreManifest,
                              exact_search, read_captions, unique_captions)
from engine.threads import (EXACT_PARALLEL_MIN_WORK, FAISS_PARALLEL_MIN_QUERIES, faiss_threads,  # noqa: E402
                            faiss_threads_for)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_TRAIN_CSV = PROJECT_ROOT.parent / "shared" / "data" / "audiocaps" / "train.csv"
BUNDLED_TRAIN_TXT = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"
SECTION_TITLE = "## Caption datastore (benchmarks/bench_datastore.py)"
FILE_TITLE = "# AudioScribe benchmarks"
FILE_INTRO = "Each benchmark script writes (and on re-runs replaces) only its own section below."
BATCH = 16  # queries in the batched search measurement
PARTS = ("threads", "batch", "models", "large")
CLIP_S = 10.0  # the end-to-end query clip
FULL_DIM = 512


def log(message: str) -> None:
    print(f"[bench_datastore {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CpuShare:
    """How many cores *other* processes kept busy since ``start()``: /proc/stat busy time minus this process's."""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        own = time.process_time()
        return time.perf_counter(), busy, own

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = self._snapshot()

    def others(self) -> float:
        """Average number of cores used by other processes (0 = quiet machine)."""
        t1, busy1, own1 = self._snapshot()
        wall = max(t1 - self._t0, 1e-9)
        return max(0.0, ((busy1 - self._busy0) - (own1 - self._own0)) / wall)


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# models


def build_full_random_clap(directory: Path, training_captions: Sequence[str], seed: int = 0) -> dict:
    """``ClapModel(ClapConfig())`` with random weights + ``ClapFeatureExtractor()`` + a RoBERTa-style tokenizer."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    tokenizer = train_caption_tokenizer(training_captions, vocab_size=50_265, min_frequency=2)
    config = ClapConfig()  # default = laion/clap-htsat-unfused's architecture
    if len(tokenizer) > config.text_config.vocab_size:
        config = ClapConfig(text_config=dict(vocab_size=len(tokenizer)))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.text_config.pad_token_id, config.text_config.bos_token_id, config.text_config.eos_token_id)
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    model.save_pretrained(directory)
    ClapFeatureExtractor().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / UNTRAINED_MARKER).write_text(json.dumps(
        {"what": "benchmark-only: ClapModel(ClapConfig()) with random weights", "seed": seed}, indent=2))
    return {"tokenizer_vocab": len(tokenizer), "model_vocab": config.text_config.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}


def load_model(name: str, workdir: Path, captions: Sequence[str]) -> tuple[HFClapBackend, dict]:
    directory = workdir / name
    t0 = time.perf_counter()
    if name == "tiny":
        build_tiny_clap(directory, seed=0)
        facts: dict = {}
    else:
        directory.mkdir(parents=True)
        facts = build_full_random_clap(directory, captions, seed=0)
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    clap = HFClapBackend.from_pretrained(str(directory), device="cpu")
    facts.update(create_s=created, load_s=time.perf_counter() - t0,
                 params=sum(p.numel() for p in clap.model.parameters()), dim=clap.embedding_dim,
                 sample_rate=clap.sample_rate)
    return clap, facts


def mean_tokens(clap: HFClapBackend, captions: Sequence[str]) -> tuple[float, float]:
    """Mean tokens per caption (with <s>, </s>; truncated as the backend does) and mean padded length per batch, the
    batches formed as ``CaptionDatastore.build`` forms them (chunks in file order, each sorted by length in
    ``embed_text``)."""
    lengths = np.array([len(ids) for ids in clap.tokenizer(list(captions), truncation=True,
                                                           max_length=clap.max_text_tokens)["input_ids"]])
    chunk, size = DatastoreConfig().chunk_size, clap.text_batch_size
    padded = []
    for start in range(0, len(captions), chunk):
        order = sorted(range(start, min(start + chunk, len(captions))), key=lambda i: len(captions[i]))
        padded += [lengths[order[i:i + size]].max() for i in range(0, len(order), size)]
    return float(lengths.mean()), float(np.mean(padded))


# --------------------------------------------------------------------------------------------------------------------
# measurements


def timed(fn: Callable[[int], object], repeats: int, warmup: int) -> np.ndarray:
    """Milliseconds of ``fn(i)`` for i in range(repeats), after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def stats(ms: np.ndarray) -> dict:
    return {"median": float(np.median(ms)), "p95": float(np.percentile(ms, 95)), "n": int(len(ms))}


def measure_build(clap: HFClapBackend, captions: Sequence[str]) -> tuple[CaptionDatastore, dict]:
    clap.embed_text(list(captions[:8]))  # warm-up: first-call allocations, thread pools
    t0 = time.perf_counter()
    store = CaptionDatastore.build(captions, clap, DatastoreConfig(), source="bench", show_progress=False)
    wall = time.perf_counter() - t0
    return store, {"captions_in": len(captions), "unique": len(store), "wall_s": wall, "rate": len(store) / wall,
                   "index": store.manifest.index_type}


def time_flat_build(store: CaptionDatastore) -> float:
    """Seconds to build (and fill) the flat index over the store's embeddings; the index is discarded."""
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(store.embedding_dim)
    index.add(store.embeddings)
    return time.perf_counter() - t0


def ivf_twin(store: CaptionDatastore, kind: str | None = None) -> tuple[CaptionDatastore, float]:
    """The same captions and embeddings behind an approximate index (exact_max_size=0 forces it; default: the
    default ``approximate_index``); returns its build time."""
    manifest = dataclasses.replace(store.manifest, sources=list(store.manifest.sources))
    config = DatastoreConfig(exact_max_size=0, **({"approximate_index": kind} if kind else {}))
    t0 = time.perf_counter()
    ivf = CaptionDatastore(store.captions, store.caption_sources, store.embeddings, manifest, config)
    return ivf, time.perf_counter() - t0


def other_recalls(store: CaptionDatastore, pool: np.ndarray, k: int) -> dict[str, float]:
    """Recall@k against exact search of the approximate indexes other than the default, on the same vectors."""
    _, exact = store.index.search(pool, k)
    out = {}
    for kind in APPROXIMATE_INDEXES:
        if kind != DatastoreConfig().approximate_index:
            twin, _ = ivf_twin(store, kind)
            out[kind] = recall_at(twin.search(pool, k).indices, exact)
    return out


SEARCH_KINDS = ("faiss_flat", "exact", "approx")  # faiss's flat index (the store's search before), the store's
# exact search now (a torch matrix product), the store's approximate index (its own search, re-ranking included)


def measure_search(flat: CaptionDatastore, ivf: CaptionDatastore, pool: np.ndarray, repeats: int, k: int) -> dict:
    """1 query and BATCH queries per call for each of SEARCH_KINDS, plus the approximate index's recall@k vs flat."""
    assert len(pool) >= repeats * BATCH
    calls = {"faiss_flat": lambda q: flat.index.search(q, k), "exact": lambda q: flat.search(q, k),
             "approx": lambda q: ivf.search(q, k)}
    result = {}
    for name, call in calls.items():
        single = timed(lambda i: call(pool[i:i + 1]), repeats, warmup=10)
        batch = timed(lambda i: call(pool[i * BATCH:(i + 1) * BATCH]), repeats, warmup=3)
        result[name] = {"single": stats(single), "batch": stats(batch)}
    # faiss scans the database once per query below distance_compute_blas_threshold queries, and with one matrix
    # product above it; time the batch with the BLAS kernel forced, for comparison.
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        blas = timed(lambda i: flat.index.search(pool[i * BATCH:(i + 1) * BATCH], k), repeats, warmup=3)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold
    result["flat_blas"] = {"batch": stats(blas)}
    _, exact = flat.index.search(pool, k)
    result["exact_equal"] = bool(np.array_equal(flat.search(pool, k).indices, exact))
    approx = ivf.search(pool, k).indices
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    result["recall"] = hits / exact.size
    result["recall_queries"] = len(pool)
    result["approx_kind"] = ivf.manifest.index_type
    result["nlist"] = int(ivf.index.nlist)
    result["nprobe"] = int(ivf.index.nprobe)
    result["n"], result["dim"] = flat.index.ntotal, flat.index.d
    return result


def measure_end_to_end(clap: HFClapBackend, store: CaptionDatastore, repeats: int, k: int) -> dict:
    """One 10-s clip: ``clap.embed_audio`` then ``store.search`` (its exact search + caption lookup)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(CLIP_S * clap.sample_rate)) / clap.sample_rate
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    embed_ms, search_ms, total_ms, feature_ms = [], [], [], []
    for i in range(repeats + 2):  # the first two are warm-up
        t0 = time.perf_counter()  # the mel features alone, as the backend computes them (not part of the total)
        clap._input_features([clip])
        features = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedding = clap.embed_audio([clip])
        t1 = time.perf_counter()
        result = store.search(embedding, k)
        t2 = time.perf_counter()
        assert len(result.captions[0]) == k
        if i >= 2:
            embed_ms.append((t1 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
            feature_ms.append(features * 1e3)
    return {"embed": stats(np.array(embed_ms)), "features": stats(np.array(feature_ms)), "search": stats(np.array(search_ms)),
            "total": stats(np.array(total_ms)), "n": store.index.ntotal, "dim": store.index.d,
            "index": store.manifest.index_type}


def random_store(captions: list[str], dim: int, clap: HFClapBackend | None, seed: int = 1) -> CaptionDatastore:
    """A flat datastore of the real captions paired with random unit vectors of ``dim`` (search cost only)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(captions), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    manifest = DatastoreManifest(clap_name=clap.name if clap else "random", embedding_dim=dim, size=len(captions),
                                 clap_fingerprint=clap.fingerprint if clap else "random")
    return CaptionDatastore(list(captions), ["random"] * len(captions), vectors, manifest, DatastoreConfig())


def random_queries(count: int, dim: int, seed: int = 2) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def heldout_captions(train_path: Path, train_unique: Sequence[str]) -> tuple[list[str], str]:
    """AudioCaps val/test captions that are not training captions (sibling CSVs), if there are any."""
    seen, out, used = set(train_unique), [], []
    for name in ("val.csv", "test.csv"):
        path = train_path.with_name(name)
        if path.is_file() and path != train_path:
            out += unique_captions(read_captions(path), already=seen | set(out))
            used.append(name)
    return out, "+".join(used)


def query_pool_tiny(clap: HFClapBackend, store: CaptionDatastore, heldout: list[str], count: int,
                    source: str) -> tuple[np.ndarray, str]:
    """Text embeddings of held-out captions (in-distribution queries), cycled if there are too few."""
    if heldout:
        rng = np.random.default_rng(3)
        picked = [heldout[i] for i in rng.permutation(len(heldout))[:count]]
        vectors = clap.embed_text(picked).numpy()
        what = f"tiny-CLAP text embeddings of {len(picked)} held-out AudioCaps captions ({source})"
    else:  # no held-out captions: datastore rows plus noise
        rng = np.random.default_rng(3)
        rows = store.embeddings[rng.integers(0, len(store), count)]
        noisy = torch.from_numpy(rows + 0.1 * rng.standard_normal(rows.shape).astype(np.float32))
        vectors = l2_normalize(noisy).numpy()
        what = f"{count} datastore embeddings + Gaussian noise (sigma 0.1 per coordinate), renormalised"
    if len(vectors) < count:
        vectors = np.resize(vectors, (count, vectors.shape[1]))
    return np.ascontiguousarray(vectors[:count], dtype=np.float32), what


# --------------------------------------------------------------------------------------------------------------------
# thread settings: one child process per setting (OpenMP reads its environment once, when torch / faiss load)

THREAD_N, THREAD_DIM = 45_716, FULL_DIM  # the AudioCaps store's size at the laion CLAP's width
THREAD_CASES = {  # key: (label, environment, faiss OpenMP threads (0 = default), search)
    "faiss": ("faiss flat index, default threads (the store's search before)", {}, 0, "faiss"),
    "faiss_1": ("faiss flat index, `faiss.omp_set_num_threads(1)`", {}, 1, "faiss"),
    "faiss_passive": ("faiss flat index, `OMP_WAIT_POLICY=PASSIVE`", {"OMP_WAIT_POLICY": "PASSIVE"}, 0, "faiss"),
    "faiss_spin": ("faiss flat index, `GOMP_SPINCOUNT=10000`", {"GOMP_SPINCOUNT": "10000"}, 0, "faiss"),
    "numpy": ("numpy matrix-vector product + argpartition (numpy's OpenBLAS threads)", {}, 0, "numpy"),
    "engine": ("**store.search now: 8-bit codes on one thread, candidates re-scored exactly**", {}, 0, "engine"),
    "engine_passive": ("store.search now, `OMP_WAIT_POLICY=PASSIVE`", {"OMP_WAIT_POLICY": "PASSIVE"}, 0, "engine"),
}
THREAD_PAUSE_S = 0.05  # "idle": this long after the last OpenMP work, every spinning thread has gone to sleep


def forward_net() -> tuple[torch.nn.Module, torch.Tensor]:
    """A torch forward standing in for an audio tower: 3 conv blocks over a [1, 1, 64, 400] log-mel-sized input."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for cin, cout in ((1, 32), (32, 64), (64, 128)):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*layers).eval(), torch.randn(1, 1, 64, 400)


def thread_case_child(key: str, repeats: int) -> dict:
    """Run in a child started with the case's environment: one-query search latency when idle and right after a
    torch forward, and the forward's time when idle and right after a search. Milliseconds, medians."""
    _, _, faiss_count, search = THREAD_CASES[key]
    if faiss_count:
        faiss.omp_set_num_threads(faiss_count)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((THREAD_N, THREAD_DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = random_queries(repeats + 5, THREAD_DIM)
    manifest = DatastoreManifest(clap_name="random", clap_fingerprint="random", embedding_dim=THREAD_DIM,
                                 size=THREAD_N)
    store = CaptionDatastore([str(i) for i in range(THREAD_N)], [""] * THREAD_N, vectors, manifest)
    store._codes()  # built on the first exact search: not part of a query's time
    calls = {"faiss": lambda q: store.index.search(q, 5), "engine": lambda q: store.search(q, 5),
             "numpy": lambda q: np.argpartition(-(q @ vectors.T), 5, axis=1)[:, :5]}
    call = calls[search]
    net, mel = forward_net()

    def forward() -> None:
        with torch.inference_mode():
            net(mel)

    for i in range(5):  # warm-up: thread pools, first-call allocations
        forward()
        call(queries[i:i + 1])
    times: dict[str, list[float]] = {"search_idle": [], "search_after_forward": [], "forward_idle": [],
                                     "forward_after_search": []}
    for i in range(repeats):
        q = queries[5 + i:6 + i]
        time.sleep(THREAD_PAUSE_S)
        t0 = time.perf_counter()
        call(q)
        times["search_idle"].append(time.perf_counter() - t0)
        time.sleep(THREAD_PAUSE_S)
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        call(q)  # right after the forward: torch's threads still spin
        t2 = time.perf_counter()
        forward()  # right after the search: faiss's (or numpy's) threads still spin
        t3 = time.perf_counter()
        times["forward_idle"].append(t1 - t0)
        times["search_after_forward"].append(t2 - t1)
        times["forward_after_search"].append(t3 - t2)
    return {name: float(np.median(values) * 1e3) for name, values in times.items()}


def measure_thread_settings(repeats: int) -> dict:
    """Each THREAD_CASES setting in its own child process (the environment must be set before torch loads)."""
    results = {}
    for key, (label, env, _, _) in THREAD_CASES.items():
        log(f"threads: {key}")
        share = CpuShare()
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_datastore", "--thread-case", key,
                               "--thread-repeats", str(repeats)], cwd=PROJECT_ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"thread case {key} failed:\n{done.stderr[-3000:]}")
        results[key] = {**json.loads(done.stdout.strip().splitlines()[-1]), "others_cores": share.others()}
    return {"cases": results, "repeats": repeats, "n": THREAD_N, "dim": THREAD_DIM}


# --------------------------------------------------------------------------------------------------------------------
# batched queries

BATCH_SIZES = (1, 8, 64, 512)


def measure_batched(repeats: int, k: int) -> dict:
    """Q queries per call over 45,716 x 512: faiss's flat index (default threads, and 1 thread) against the store's
    exact search (one torch matrix product per call); results compared row for row."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((THREAD_N, THREAD_DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    manifest = DatastoreManifest(clap_name="random", clap_fingerprint="random", embedding_dim=THREAD_DIM,
                                 size=THREAD_N)
    store = CaptionDatastore([str(i) for i in range(THREAD_N)], [""] * THREAD_N, vectors, manifest)
    store._codes()  # built on the first exact search: not part of a query's time
    pool = random_queries(max(BATCH_SIZES) * 3, THREAD_DIM, seed=4)
    rows = []
    for count in BATCH_SIZES:
        times = max(3, min(repeats, 4096 // count))  # enough calls for a median, bounded for the slow ones

        def batch(i: int) -> np.ndarray:
            start = (i * count) % (len(pool) - count + 1)
            return pool[start:start + count]

        def faiss_one_thread(q: np.ndarray):
            with faiss_threads(1):
                return store.index.search(q, k)

        row = {"q": count, "repeats": times}
        for name, call in (("faiss", lambda q: store.index.search(q, k)), ("faiss_1", faiss_one_thread),
                           ("codes", lambda q: store._search_prefiltered(q, k)),
                           ("product", lambda q: exact_search(vectors, q, k)),
                           ("engine", lambda q: store.search(q, k))):
            row[name] = stats(timed(lambda i: call(batch(i)), times, warmup=2))
        _, reference = store.index.search(batch(0), k)
        row["equal"] = bool(np.array_equal(store.search(batch(0), k).indices, reference))
        rows.append(row)
        log(f"batch Q={count}: faiss {row['faiss']['median']:.2f} ms, engine {row['engine']['median']:.2f} ms, "
            f"equal {row['equal']}")
    return {"rows": rows, "n": THREAD_N, "dim": THREAD_DIM, "sizes": measure_store_sizes(repeats, k)}


STORE_SIZES = ((3_000, 32), (45_716, 32), (45_716, 128), (45_716, 512), (200_000, 512))  # (N, D): the exact range


def measure_store_sizes(repeats: int, k: int) -> list[dict]:
    """One query over exact stores of several sizes: faiss's flat scan on one thread, the torch matrix product
    (``exact_search``) and ``store.search``, which picks between them by EXACT_PARALLEL_MIN_WORK."""
    rows = []
    for n, dim in STORE_SIZES:
        vectors = np.random.default_rng(5).standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        manifest = DatastoreManifest(clap_name="random", clap_fingerprint="random", embedding_dim=dim, size=n)
        store = CaptionDatastore([str(i) for i in range(n)], [""] * n, vectors, manifest)
        pool = random_queries(repeats, dim, seed=6)
        store._codes()  # built on first use (once per store): not part of a query's time

        def scan(q: np.ndarray):
            with faiss_threads(1):
                return store.index.search(q, k)

        row = {"n": n, "dim": dim, "work": n * dim}
        for name, call in (("faiss_1", scan), ("codes", lambda q: store._search_prefiltered(q, k)),
                           ("product", lambda q: exact_search(vectors, q, k)), ("store", lambda q: store.search(q, k))):
            row[name] = stats(timed(lambda i: call(pool[i:i + 1]), repeats, warmup=3))
        rows.append(row)
        log(f"size {n:,} x {dim}: one thread {row['faiss_1']['median']:.2f} ms, product "
            f"{row['product']['median']:.2f} ms, store {row['store']['median']:.2f} ms")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# a large store: CLAP-like vectors built from real CLAP caption embeddings

DEMO_STORE = PROJECT_ROOT / "assets" / "demo" / "stores" / "audiocaps"
DEMO_CLAP = PROJECT_ROOT / "assets" / "demo" / "clap"
SOUNDWORLD = PROJECT_ROOT / "data" / "soundworld"
BUNDLED_AUDIO = (PROJECT_ROOT / "assets" / "examples", PROJECT_ROOT / "tests" / "data" / "heldout")
SYNTH = {"clusters": 1024, "mix": 0.5, "noise": 0.25}  # clap_like_vectors' settings for the large store


def clap_like_vectors(real: np.ndarray, count: int, dim: int, seed: int = 0, clusters: int = 1024,
                      mix: float = 0.5, noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """[count, dim] unit vectors with the cluster structure of ``real`` [M, d] (real CLAP caption embeddings).

    1. A random orthonormal map ``basis`` [dim, d] (QR of a seeded Gaussian matrix) carries the real vectors into
       ``dim`` dimensions; cosines between them are unchanged.
    2. The first min(M, count) rows are real vectors (in order).
    3. Every further row starts from a real vector a (uniform), moves towards b, another real vector of a's cluster
       (spherical k-means with ``clusters`` centres on the real vectors), by u ~ U(0, mix) of the way, adds Gaussian
       noise of expected norm ``noise`` spread over all ``dim`` dimensions (so the set is not confined to the real
       vectors' d-dimensional subspace), and is renormalised: a + u (b - a) + noise.

    Returns the vectors and ``basis``; queries go through the same ``lift(queries, basis)``.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, real.shape[1])))[0].astype(np.float32)  # [dim, d]
    out = np.empty((count, dim), dtype=np.float32)
    kept = min(len(real), count)
    out[:kept] = lift(real[:kept], basis)
    if count > kept:
        kmeans = faiss.Kmeans(real.shape[1], min(clusters, len(real)), niter=10, seed=seed, spherical=True)
        kmeans.train(real)
        cluster = kmeans.index.search(real, 1)[1][:, 0]
        by_cluster = np.argsort(cluster, kind="stable")  # real rows grouped by cluster
        first = np.searchsorted(cluster[by_cluster], np.arange(kmeans.k))
        sizes = np.bincount(cluster, minlength=kmeans.k)
        for start in range(kept, count, 65536):
            size = min(count, start + 65536) - start
            a = rng.integers(0, len(real), size)
            c = cluster[a]
            b = by_cluster[first[c] + (rng.random(size) * sizes[c]).astype(np.int64)]
            u = rng.uniform(0, mix, (size, 1)).astype(np.float32)
            rows = (real[a] + u * (real[b] - real[a])) @ basis.T
            rows += rng.standard_normal((size, dim), dtype=np.float32) * np.float32(noise / math.sqrt(dim))
            out[start:start + size] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out, basis


def lift(vectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """[Q, d] -> [Q, dim] unit vectors through ``basis`` [dim, d] (cosines unchanged for unit inputs)."""
    rows = np.asarray(vectors, dtype=np.float32) @ basis.T
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def demo_queries(text_count: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Real demo-CLAP query embeddings [Q, 128]: held-out AudioCaps captions (val + test, not in train) through the
    text tower, and held-out clips through the audio tower (the app's audio-to-text case)."""
    from engine.audio import load_audio
    from engine.clap.demo import DemoClapBackend

    clap = DemoClapBackend.from_folder(DEMO_CLAP)
    train = set(unique_captions(read_captions(default_captions())))
    heldout, source = heldout_captions(default_captions(), sorted(train))
    picked = [heldout[i] for i in np.random.default_rng(3).permutation(len(heldout))[:text_count]]
    queries = {"text": clap.embed_text(picked).numpy()}
    what = {"text": f"{len(picked):,} held-out AudioCaps captions ({source}) through the demo CLAP's text tower"}
    manifest = SOUNDWORLD / "manifest.jsonl"
    if manifest.is_file():  # the demo CLAP's own corpus: its test split was never trained on
        clips = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        paths = [SOUNDWORLD / c["path"] for c in clips if c["split"] == "test"]
        what["audio"] = f"{len(paths):,} held-out soundworld test clips (data/soundworld) through its audio tower"
    else:
        paths = sorted(p for folder in BUNDLED_AUDIO for p in folder.glob("*.flac"))
        what["audio"] = f"{len(paths)} bundled example and held-out clips through its audio tower"
    queries["audio"] = clap.embed_audio([load_audio(p, clap.sample_rate) for p in paths]).numpy()
    return queries, what


def index_memory(index: faiss.Index) -> int:
    """Bytes an index holds beyond the store's own embeddings: IVF codes + ids + centroids, HNSW vectors + links."""
    if isinstance(index, faiss.IndexIVF):
        return index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4
    if isinstance(index, faiss.IndexHNSW):
        return index.ntotal * index.d * 4 + index.hnsw.neighbors.size() * 4 + index.ntotal * 12
    return index.ntotal * index.d * 4


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())) / truth.size


def measure_large(size: int, kinds: Sequence[str], probes: Sequence[int], efs: Sequence[int], text_queries: int,
                  repeats: int, k: int) -> dict:
    """Build a CLAP-like store of ``size`` x 512 and measure each index in ``kinds``: build time, memory, one-query
    p50/p95 and recall@k against exact search. The first IVF kind is built by the datastore (cells trained); later
    IVF kinds reuse a copy of its cells, so they differ only in what the cells hold; hnsw is faiss's HNSW32."""
    real = CaptionDatastore.load(DEMO_STORE).embeddings  # [45716, 128] demo-CLAP caption embeddings
    t0 = time.perf_counter()
    vectors, basis = clap_like_vectors(real, size, FULL_DIM, seed=0, **SYNTH)
    res: dict = {"size": size, "real": real.shape, "generate_s": time.perf_counter() - t0, "indexes": []}
    log(f"large: {size:,} CLAP-like vectors in {res['generate_s']:.0f} s; embedding demo queries")
    raw, res["queries_what"] = demo_queries(text_queries)
    queries = {name: lift(q, basis) for name, q in raw.items()}
    t0 = time.perf_counter()
    truth = {name: exact_search(vectors, q, k)[1] for name, q in queries.items()}
    res["truth_s"] = time.perf_counter() - t0
    res["structure"] = {name: structure(real, vectors, raw[name], q, k) for name, q in queries.items()}
    manifest = DatastoreManifest(clap_name="clap-like", clap_fingerprint="clap-like", embedding_dim=FULL_DIM,
                                 size=size)
    captions = [f"#{i}" for i in range(size)]
    timing_queries = queries["text"][:repeats]
    cells = None  # a copy of the first IVF index's trained cells
    for kind in kinds:
        log(f"large: building {kind}")
        t0 = time.perf_counter()
        shared = kind != "hnsw" and cells is not None
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(FULL_DIM, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 40
            index.add(vectors)
            store = None
        elif shared:  # the same cells: IndexIVF.train skips k-means for a trained quantizer of nlist centroids
            if kind == "ivf":
                index = faiss.IndexIVFFlat(cells, FULL_DIM, cells.ntotal, faiss.METRIC_INNER_PRODUCT)
            else:
                qt = {8: faiss.ScalarQuantizer.QT_8bit, 4: faiss.ScalarQuantizer.QT_4bit}[CODE_BITS[kind]]
                index = faiss.IndexIVFScalarQuantizer(cells, FULL_DIM, cells.ntotal, qt, faiss.METRIC_INNER_PRODUCT,
                                                      False)
                index.train(vectors[np.linspace(0, size - 1, 64 * cells.ntotal).astype(np.int64)])  # code ranges
            index.add(vectors)
            store = CaptionDatastore(captions, [""] * size, vectors, dataclasses.replace(manifest, index_type=kind),
                                     DatastoreConfig(exact_max_size=0), index=index)
        else:
            store = CaptionDatastore(captions, [""] * size, vectors, dataclasses.replace(manifest),
                                     DatastoreConfig(exact_max_size=0, approximate_index=kind))
            index = store.index
            cells = faiss.IndexFlatIP(FULL_DIM)  # a copy (the index owns its quantizer)
            cells.add(index.quantizer.reconstruct_n(0, index.nlist))
        build_s = time.perf_counter() - t0
        row = {"kind": kind, "build_s": build_s, "memory": index_memory(index), "shared_cells": shared,
               "nlist": int(index.nlist) if isinstance(index, faiss.IndexIVF) else None, "settings": []}
        log(f"large: {kind} built in {build_s:.0f} s, {row['memory'] / 2**20:.0f} MiB")
        for value in (efs if kind == "hnsw" else probes):
            if kind == "hnsw":
                index.hnsw.efSearch = value

                def search(q: np.ndarray) -> np.ndarray:
                    with faiss_threads(faiss_threads_for(len(q))):
                        return index.search(q, k)[1]
            else:
                index.nprobe = min(value, index.nlist)
                search = lambda q: store.search(q, k).indices  # noqa: E731 (the store's own path, re-ranking incl.)
            single = timed(lambda i: search(timing_queries[i:i + 1]), len(timing_queries), warmup=5)
            recall = {name: recall_at(search(q), truth[name]) for name, q in queries.items()}
            row["settings"].append({"value": value, "single": stats(single), "recall": recall})
            log(f"large: {kind} {'efSearch' if kind == 'hnsw' else 'nprobe'} {value}: p50 "
                f"{np.median(single):.2f} ms, recall " + ", ".join(f"{n} {r:.3f}" for n, r in recall.items()))
        res["indexes"].append(row)
        index = store = search = None  # free this index before the next one is built
        gc.collect()
    return res


def structure(real: np.ndarray, vectors: np.ndarray, raw: np.ndarray, lifted: np.ndarray, k: int) -> dict:
    """Mean cosine of the 1st and k-th neighbour of each query among the real vectors (128-d) and in the large set,
    and the share of queries with near-ties in each (exact search re-searches those with faiss)."""
    real_scores, _, real_ties = exact_search(real, np.ascontiguousarray(raw / np.linalg.norm(raw, axis=1,
                                                                                            keepdims=True)), k)
    large_scores, _, large_ties = exact_search(vectors, lifted, k)
    return {"real": (float(real_scores[:, 0].mean()), float(real_scores[:, -1].mean())),
            "large": (float(large_scores[:, 0].mean()), float(large_scores[:, -1].mean())),
            "near_ties": (float(real_ties.mean()), float(large_ties.mean()))}  # rows exact search hands to faiss


# --------------------------------------------------------------------------------------------------------------------
# report


def run_command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run: ``python -m <module>`` and the arguments it got."""
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python -m {module}" + (" " + shlex.join(args) if args else "")


def machine_facts() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tokenizers
    import transformers
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "blas_threshold": faiss.cvar.distance_compute_blas_threshold,
        "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__,
        "platform": platform.platform(),
    }


def fmt_ms(s: dict) -> str:
    def one(x: float) -> str:
        return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")
    return f"{one(s['median'])} / {one(s['p95'])}"


def render(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION_TITLE, ""]
    lines += [f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
              f"Runtime: {res['runtime_s']:.0f} s  ",
              f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads "
              f"{m['torch_threads']}, faiss OpenMP threads {m['faiss_threads']}; Python {m['python']}, torch "
              f"{m['torch']}, faiss {m['faiss']}, transformers {m['transformers']}, numpy {m['numpy']} "
              f"({m['platform']})  ",
              f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f}  ",
              "Other processes' CPU use during the run (from /proc/stat minus this process; 0 = quiet, 2 = both "
              f"cores busy): {res['others_cores']:.2f} cores on average"
              + "".join(f"; {n}: {r['others_cores']:.2f}" for n, r in res["models"].items()), "",
              "> **Timings are approximate.** They come from a shared 2-core CPU machine on which other processes "
              "(e.g. a test suite) may have been running at the same time (see the line above). torch and faiss both "
              "run 2 OpenMP threads here; while another process holds one of the 2 cores those threads wait on each "
              "other, and the same step can take several times (up to ~10x seen) as long as on a quiet machine. "
              "Treat differences under ~30% as noise, and large ones as possibly contention. All on CPU, float32, "
              "with the engine's thread settings (engine/threads.py) unless a row says otherwise.", ""]
    lines += render_threads(res) + render_batched(res)
    if res["models"]:
        lines += render_models(res)
    lines += render_large(res)
    lines += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def render_threads(res: dict) -> list[str]:
    t = res.get("threads")
    if not t:
        return []
    lines = [f"### 1. Thread settings: one exact query over {t['n']:,} x {t['dim']} (k=5)", "",
             f"Each row is its own process (environment set before torch and faiss load). Median ms over "
             f"{t['repeats']} rounds; each round: a search after {THREAD_PAUSE_S * 1e3:.0f} ms of quiet (idle), "
             "then a torch forward (3 conv blocks on a [1, 1, 64, 400] input, torch's default 2 threads), the same "
             "search right after it (torch's threads still spinning), and a second forward right after that search "
             "(the search's threads still spinning). Other processes' CPU use during this part: "
             f"{t['others_cores']:.2f} cores.", "",
             "| setting | search, idle (ms) | search right after a forward (ms) | forward, idle (ms) | forward right "
             "after the search (ms) |", "|---|---:|---:|---:|---:|"]
    for key, r in t["cases"].items():
        lines.append(f"| {THREAD_CASES[key][0]} | {r['search_idle']:.2f} | {r['search_after_forward']:.2f} | "
                     f"{r['forward_idle']:.1f} | {r['forward_after_search']:.1f} |")
    return lines + [""]


def render_batched(res: dict) -> list[str]:
    b = res.get("batch")
    if not b:
        return []
    lines = [f"### 2. Batched queries: Q queries per call over {b['n']:,} x {b['dim']} (k={res['args']['k']})", "",
             "Median ms per call (per query in brackets). Random unit vectors (search cost depends only on N, D, k). "
             "Codes: 8-bit codes of the embeddings scanned on one thread, the best "
             f"{PREFILTER_DEPTH} re-scored exactly (`_search_prefiltered`, timed alone); matrix product: one torch "
             "product for the whole call (`exact_search`); `store.search` takes the codes below "
             f"{PREFILTER_MAX_QUERIES} queries per call, the product from there. \"Same results\": the store's "
             "indices equal faiss flat's for the same queries, row for row. Other processes' CPU use during this "
             f"part: {b['others_cores']:.2f} cores.", "",
             "| Q | calls | faiss flat, default threads (before) | faiss flat, 1 thread | codes, 1 thread | torch matrix "
             "product | **store.search (now)** | speed-up vs before | same results |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in b["rows"]:
        cells = [f"{r[n]['median']:.2f} ({r[n]['median'] / r['q']:.3f})"
                 for n in ("faiss", "faiss_1", "codes", "product", "engine")]
        lines.append(f"| {r['q']} | {r['repeats']} | {' | '.join(cells)} | "
                     f"{r['faiss']['median'] / r['engine']['median']:.1f}x | {'yes' if r['equal'] else '**no**'} |")
    lines += ["", "One query over exact stores of other sizes (median / p95 ms): faiss's flat scan on one thread, the "
              "codes on one thread, the torch matrix product on torch's threads, and `store.search`, which takes the "
              f"one-thread flat scan below {EXACT_PARALLEL_MIN_WORK:,} multiply-adds per call "
              "(`EXACT_PARALLEL_MIN_WORK`, engine/threads.py) and the codes above.", "",
              "| N | D | multiply-adds | flat scan, 1 thread | codes, 1 thread | torch matrix product | store.search |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in b.get("sizes", []):
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['work']:,} | {fmt_ms(r['faiss_1'])} | {fmt_ms(r['codes'])} | "
                     f"{fmt_ms(r['product'])} | {fmt_ms(r['store'])} |")
    return lines + [""]


def render_large(res: dict) -> list[str]:
    g = res.get("large")
    if not g:
        return []
    k = res["args"]["k"]
    size = g["size"]
    lines = [f"### 6. A large store: {size:,} x {FULL_DIM} CLAP-like vectors (k={k})", "",
             f"Vectors: `clap_like_vectors` (this script) from the demo bundle's {g['real'][0]:,} real demo-CLAP "
             f"caption embeddings ({g['real'][1]}-d, `{DEMO_STORE.relative_to(PROJECT_ROOT)}`): a seeded random "
             f"orthonormal map into {FULL_DIM} dimensions (cosines unchanged); the real vectors themselves, then "
             f"each further vector = a real vector moved towards another real vector of its spherical k-means "
             f"cluster ({SYNTH['clusters']} clusters) by U(0, {SYNTH['mix']}) of the way, plus Gaussian noise of "
             f"norm ~{SYNTH['noise']} over all {FULL_DIM} dimensions, renormalised ({g['generate_s']:.0f} s). "
             f"Queries: {g['queries_what']['text']}; {g['queries_what']['audio']}; both mapped the same way. "
             f"Ground truth: exact search ({g['truth_s']:.0f} s for all queries). Other processes' CPU use during "
             f"this part: {g['others_cores']:.2f} cores.", "",
             f"Structure kept (mean cosine of a query's 1st / {k}th neighbour): "
             + "; ".join(f"{name} queries: real {s['real'][0]:.3f} / {s['real'][1]:.3f} among the "
                         f"{g['real'][0]:,} real vectors, {s['large'][0]:.3f} / {s['large'][1]:.3f} among the "
                         f"{size:,}" for name, s in g["structure"].items()) + ".", "",
             f"| index | cells | build (s) | index memory (MiB) | nprobe / efSearch | 1 query p50 / p95 (ms) | "
             f"recall@{k} text | recall@{k} audio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    depth = DatastoreConfig().rerank_depth
    what = {"ivf_sq8": f"**ivf_sq8: IVF, 8-bit codes, {depth} re-scored exactly (default)**",
            "ivf_sq4": f"ivf_sq4: IVF, 4-bit codes, {depth} re-scored exactly",
            "ivf": "ivf: IVF, full vectors (the index before)", "hnsw": "HNSW32 flat (faiss, efConstruction 40)"}
    for row in g["indexes"]:
        reuse = " (the cells above: added)" if row["kind"] == "ivf" else " (the cells above: codes trained, added)"
        build = f"{row['build_s']:.0f}" + (reuse if row["shared_cells"] else "")
        for setting in row["settings"]:
            r = setting["recall"]
            lines.append(f"| {what[row['kind']]} | {row['nlist'] or '-'} | {build} | {row['memory'] / 2**20:,.0f} | "
                         f"{setting['value']} | {fmt_ms(setting['single'])} | {r['text']:.3f} | {r['audio']:.3f} |")
    lines += ["", f"Index memory is what the index holds beside the store's own float32 embeddings "
              f"({size * FULL_DIM * 4 / 2**30:.1f} GiB, kept for exact scores and as DRCap's projection support): "
              "IVF codes + ids + centroids; ivf and HNSW keep a second float32 copy of every vector. Latency: "
              "`store.search` of one held-out caption query (IVF; caption lookup and re-ranking included) or faiss's "
              "`search` (HNSW), with the engine's thread settings.", ""]
    return lines


def render_models(res: dict) -> list[str]:
    a, m = res["args"], res["machine"]
    lines = [f"Captions: `{res['captions_path']}`: {res['captions_in']:,} rows, {res['unique']:,} unique after "
             "whitespace normalisation and exact-duplicate removal.", ""]
    models = res["models"]
    lines += ["### Models", "",
              "| model | what | params | D | text tokens/caption (mean; mean padded batch length) | create + save (s) "
              "| load (s) |", "|---|---|---:|---:|---|---:|---:|"]
    for name, r in models.items():
        f = r["facts"]
        what = ("`build_tiny_clap` (random, 32-d; the offline profile's model)" if name == "tiny" else
                "`ClapModel(ClapConfig())` = laion/clap-htsat-unfused architecture (HTSAT + RoBERTa-base), random "
                f"weights (seed 0); RoBERTa-style BPE tokenizer trained on the captions, {f['tokenizer_vocab']:,} "
                f"tokens vs roberta-base's 50,265 (model keeps the {f['model_vocab']:,}-row table)")
        lines.append(f"| {name} | {what} | {f['params'] / 1e6:.1f} M | {f['dim']} | {r['tokens'][0]:.1f}; "
                     f"{r['tokens'][1]:.1f} | {f['create_s']:.1f} | {f['load_s']:.1f} |")
    lines.append("")

    lines += ["### 3. Datastore build (`CaptionDatastore.build`, text embedding + flat index)", "",
              "| model | captions in | unique embedded | wall (s) | captions/s | time for all "
              f"{res['unique']:,} unique captions |", "|---|---:|---:|---:|---:|---|"]
    for name, r in models.items():
        b = r["build"]
        if b["unique"] == res["unique"]:
            whole = f"{b['wall_s']:.1f} s (measured)"
        else:
            est = res["unique"] / b["rate"]
            whole = f"**≈ {est:.0f} s ≈ {est / 60:.1f} min (extrapolated** from the first {b['unique']:,})"
        lines.append(f"| {name} | {b['captions_in']:,} | {b['unique']:,} | {b['wall_s']:.1f} | {b['rate']:.0f} | "
                     f"{whole} |")
    lines.append("")

    labels = {"faiss_flat": "faiss flat index (the store's search before)",
              "exact": "store.search, exact (now: codes for 1 query, one product for 16)",
              "approx": "store.search, approximate"}
    lines += [f"### 4. Search latency at the captions' size (k={a['k']})", "",
              f"Median / p95 in ms over {a['queries']} repeats after warm-up; the batch column searches {BATCH} "
              f"queries per call. Recall@{a['k']} is the approximate index's top-{a['k']} against the flat index's "
              f"over {res['search_rows'][0]['recall_queries'] if res['search_rows'] else 0:,} queries.", "",
              "| vectors | N | D | search | nlist / nprobe | index build (s) | 1 query (ms) | "
              f"{BATCH} queries (ms) | per query in batch (ms) | recall@{a['k']} vs flat |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in res["search_rows"]:
        for kind in SEARCH_KINDS:
            s = row[kind]
            per = s["batch"]["median"] / BATCH
            approx = kind == "approx"
            nl = f"{row['nlist']} / {row['nprobe']}" if approx else "-"
            rec = (f"{row['recall']:.3f}" if approx else "1 (reference)" if kind == "faiss_flat" else
                   "1 (same results)" if row["exact_equal"] else "**differs**")
            build = row["ivf_build_s"] if approx else row["flat_build_s"] if kind == "faiss_flat" else None
            build_s = f"{build:.2f}" if build is not None else "-"
            label = labels[kind] + (f" ({row['approx_kind']})" if approx else "")
            lines.append(f"| {row['label']} | {row['n']:,} | {row['dim']} | {label} | {nl} | {build_s} | "
                         f"{fmt_ms(s['single'])} | {fmt_ms(s['batch'])} | {per:.3f} | {rec} |")
            if kind == "faiss_flat":
                b = row["flat_blas"]["batch"]
                lines.append(f"| {row['label']} | {row['n']:,} | {row['dim']} | faiss flat, BLAS kernel forced¹ | - | "
                             f"- | - | {fmt_ms(b)} | {b['median'] / BATCH:.3f} | 1 (same results) |")
    lines.append("")
    lines.append(f"¹ `faiss.cvar.distance_compute_blas_threshold = 1` (this faiss build's default is "
                 f"{m['blas_threshold']:,}): below the threshold faiss scans all N vectors once per query; above it, "
                 "one matrix product serves the whole batch. Shown for comparison.")
    lines.append("")
    for row in res["search_rows"]:
        others = "; ".join(f"{kind} {r:.3f}" for kind, r in row.get("other_recalls", {}).items())
        lines.append(f"- {row['label']}: queries are {row['queries_what']}."
                     + (f" Recall@{a['k']} of the other approximate indexes on the same vectors and queries (nprobe "
                        f"{row['nprobe']}): {others}." if others else ""))
    lines.append("")

    lines += [f"### 5. End-to-end query: one {CLIP_S:.0f}-s clip (`embed_audio` + `CaptionDatastore.search`, "
              f"k={a['k']})", "",
              f"Median / p95 in ms over {a['e2e_repeats']} repeats after 2 warm-up queries.", "",
              "| model | datastore searched | audio embedding (ms) | of which mel features² (ms) | search incl. "
              "caption lookup (ms) | total (ms) |",
              "|---|---|---:|---:|---:|---:|"]
    for name, r in models.items():
        e = r["e2e"]
        lines.append(f"| {name} | {r['e2e_store']} ({e['n']:,} x {e['dim']}, {e['index']}) | {fmt_ms(e['embed'])} | "
                     f"{fmt_ms(e['features'])} | {fmt_ms(e['search'])} | {fmt_ms(e['total'])} |")
    lines.append("")
    lines.append("² `HFClapBackend._input_features` on the same clip, timed separately (the torch log-mel of "
                 "engine.clap.features, 10 s at 48 kHz); the rest of the audio embedding is the audio tower.")
    lines.append("")
    return lines


def notes_for(res: dict) -> list[str]:
    notes = []
    t = res.get("threads")
    if t:
        c = t["cases"]
        before, now = c["faiss"], c["engine"]
        notes.append(
            "Thread settings (table 1): one exact query went from "
            f"{before['search_idle']:.1f} ms idle / {before['search_after_forward']:.1f} ms right after a forward "
            f"(faiss flat, its default threads) to {now['search_idle']:.1f} / {now['search_after_forward']:.1f} ms "
            "(the engine now: 8-bit codes scanned on one thread, the best candidates re-scored exactly). On a "
            "2-core machine shared with other work, any 2-thread parallel region waits for a free core (see the "
            "torch product on the smallest stores in table 2), so small and single-query work stays on one thread; "
            "many queries share one torch matrix product, on the pool the forward just used. The settings, in "
            f"engine/threads.py and engine/datastore.py: the flat scan on one thread below "
            f"{EXACT_PARALLEL_MIN_WORK:,} multiply-adds per call; the codes below {PREFILTER_MAX_QUERIES} queries; "
            "the torch product above; other faiss searches (approximate indexes, near-tie rows) with 1 OpenMP "
            f"thread below {FAISS_PARALLEL_MIN_QUERIES} queries per call, all cores above. faiss's count is set "
            "around each search in the searching thread, because libgomp keeps it per thread (a setting made at "
            "start never reaches a server's worker threads; tested).")
        notes.append(
            "`OMP_WAIT_POLICY=PASSIVE` / `GOMP_SPINCOUNT` (threads sleep instead of spinning) are measured but not "
            "applied: they must be set before torch is imported and change every torch operation in the process "
            "(model forwards, decoding), whose cost on a quiet machine this benchmark does not measure; the engine "
            "leaves the environment alone. On a loaded machine spinning threads steal cores from the other pool, "
            "which is what the 'forward right after the search' column shows.")
    b = res.get("batch")
    if b:
        notes.append(
            "Exact results (table 2): every path returns faiss flat's indices, row for row (tested for Q = 0..300, "
            "k > N, duplicate vectors, crowded vectors); scores agree within 1e-6 (float32 sums in another order). "
            f"The codes' bound: a row outside the {PREFILTER_DEPTH} candidates scores at most the last candidate's "
            "code score + |q| x (the largest distance between a row and its decoded code); a query whose (k+1)-th "
            "exact score does not beat that goes to the matrix product. Rows with two of their top k+1 scores within "
            f"{TIE_TOLERANCE:g} of each other, whose order only faiss's own sums can decide, are re-searched with "
            "faiss. The codes (a quarter of the float32 matrix) are built on the first exact search. faiss's flat "
            f"index, below its BLAS threshold ({res['machine']['blas_threshold']:,} queries in this build), scans the "
            "whole matrix once per query; the matrix product reads it once per call (chunks of at most "
            f"{EXACT_CHUNK_SCORES:,} scores).")
    g = res.get("large")
    if g:
        ties = [f"{name} {s['near_ties'][0]:.1%}" for name, s in g["structure"].items()]
        notes.append("Near-ties needing that faiss re-search, among the real demo-store vectors: "
                     + ", ".join(ties) + " of queries.")
        notes.append(
            "The large store (table 6): the audio queries sit far from every caption embedding (CLAP's modality "
            "gap: see the mean cosines above), so their neighbours spread over more IVF cells than a caption's do "
            "and need more cells visited (nprobe) for the same recall. Default: "
            f"`approximate_index = \"{DatastoreConfig().approximate_index}\"`, nlist = min(2*sqrt(N), N/39), "
            f"`ivf_nprobe = {DatastoreConfig().ivf_nprobe}`, `rerank_depth = {DatastoreConfig().rerank_depth}`; "
            "the cells are trained by 10 k-means iterations on 64 points per cell (build time in the table).")
    notes += [
        "**tiny** numbers are a floor: a 32-d model with two small transformer layers per tower. Nothing "
        "real ships with it; it shows the overhead of the pipeline itself (tokenisation, mel features, search, "
        "Python).",
        "**full** has random weights but exactly the layer shapes of laion/clap-htsat-unfused, so its compute "
        "(and hence its time) is what the real checkpoint costs on this CPU. Its tokenizer has a smaller "
        "vocabulary than roberta-base's 50k, which does not change compute meaningfully: cost per caption follows "
        "the token count (reported above), and a tokenizer trained on the captions themselves cuts them into "
        "about as many or slightly fewer tokens than roberta-base would, so its build rate may be slightly "
        "optimistic.",
        "Search cost depends only on N, D, k and the index type, not on what the vectors mean; tables 1, 2 and the "
        "D=512 rows of table 4 therefore use random unit vectors. Random high-dimensional vectors have no "
        "cluster structure, the worst case for IVF recall (table 4's D=512 approximate row); table 6 measures "
        "recall on CLAP-like vectors instead.",
        "With the default `DatastoreConfig` (exact_max_size = 200,000) a 45,716-caption store is searched exactly, "
        "so table 4's exact rows are what the app does; the approximate rows show what a store above that size "
        "would use.",
        "In the end-to-end query the audio embedding dominates: for tiny a large part of it is the mel spectrogram "
        "(the same for every model), for full the HTSAT tower. The exact search is a small fraction of the total.",
        "p95 values are the most sensitive to other processes on the machine: isolated spikes (several times the "
        "median) are contention, not a property of the code. Compare medians.",
    ]
    full = res["models"].get("full")
    if full:
        b = full["build"]
        notes.append(f"The full model's build rate was measured on the first {b['unique']:,} unique captions "
                     f"(`--full-subset`); the whole-set time is a linear extrapolation from it (short and long "
                     "captions are spread evenly through the file, so it should be close).")
        notes.append("`CaptionDatastore.build` embeds captions in chunks of "
                     f"{DatastoreConfig().chunk_size:,} in file order; `embed_text` sorts each chunk by length into "
                     "batches of 256 (`clap.text_batch_size`), each padded to its longest caption: the full model's "
                     f"batches are {full['tokens'][1]:.1f} positions long on average for captions of "
                     f"{full['tokens'][0]:.1f} tokens ({full['tokens'][1] / full['tokens'][0]:.2f}x the tokens).")
    return notes


def write_section(path: Path, section: str, title: str | None = None) -> None:
    """Insert or replace the section headed ``title`` (default: this script's); leave other sections as they are."""
    title = title or SECTION_TITLE
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        start = text.find(title + "\n")
        if start >= 0:
            end = text.find("\n## ", start + len(title))
            text = text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    else:
        text = f"{FILE_TITLE}\n\n{FILE_INTRO}\n\n{section.rstrip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# main


def default_captions() -> Path:
    return SHARED_TRAIN_CSV if SHARED_TRAIN_CSV.is_file() else BUNDLED_TRAIN_TXT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_datastore", description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=Path, default=None,
                   help=f"caption file (default {SHARED_TRAIN_CSV} if it exists, else {BUNDLED_TRAIN_TXT})")
    p.add_argument("--models", default="tiny,full", help="comma-separated subset of tiny,full")
    p.add_argument("--queries", type=int, default=200, help="timed repeats per search measurement (N); the query "
                   f"pool and the recall set have N*{BATCH} queries")
    p.add_argument("--full-subset", type=int, default=2000,
                   help="unique captions the full model's build rate is measured on (0 = all)")
    p.add_argument("--e2e-repeats", type=int, default=20, help="timed end-to-end queries per model")
    p.add_argument("--k", type=int, default=DatastoreConfig().top_k, help="neighbours per query")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "RESULTS.md",
                   help="markdown file to write this script's section into ('-' = do not write)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (threads: thread settings, one child process "
                   "each; batch: Q queries per call; models: build, search and end-to-end per model; large: the "
                   "large CLAP-like store)")
    p.add_argument("--thread-repeats", type=int, default=40, help="timed rounds per thread setting")
    p.add_argument("--large-size", type=int, default=1_000_000, help="vectors in the large CLAP-like store")
    p.add_argument("--large-indexes", default="ivf_sq8,ivf_sq4,ivf",
                   help="indexes built over the large store: ivf_sq8, ivf_sq4, ivf (the first IVF one trains the "
                   "cells, the others reuse them), hnsw (faiss HNSW32, efConstruction 40)")
    p.add_argument("--large-nprobe", default="32,64,128", help="IVF cells visited per query, each measured")
    p.add_argument("--large-ef", default="64,128,256", help="HNSW efSearch values, each measured")
    p.add_argument("--large-text-queries", type=int, default=500, help="held-out caption queries (recall, latency)")
    p.add_argument("--large-repeats", type=int, default=200, help="timed one-query searches per setting")
    p.add_argument("--save-json", type=Path, default=None, help="also write the raw results to this JSON file")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: render the section from results saved by --save-json")
    p.add_argument("--thread-case", choices=sorted(THREAD_CASES), help=argparse.SUPPRESS)  # a child's own case
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - {"tiny", "full"}
    if unknown or not args.model_list:
        p.error(f"--models takes tiny and/or full, got {args.models!r}")
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(args.part_list) - set(PARTS) or not args.part_list:
        p.error(f"--parts takes a subset of {','.join(PARTS)}, got {args.parts!r}")
    args.large_kinds = [x.strip() for x in args.large_indexes.split(",") if x.strip()]
    if set(args.large_kinds) - {*APPROXIMATE_INDEXES, "hnsw"}:
        p.error(f"--large-indexes takes {', '.join(APPROXIMATE_INDEXES)} and/or hnsw, got {args.large_indexes!r}")
    try:
        args.probes = [int(x) for x in args.large_nprobe.split(",")]
        args.efs = [int(x) for x in args.large_ef.split(",")]
    except ValueError:
        p.error("--large-nprobe and --large-ef take comma-separated integers")
    if min([args.queries, args.e2e_repeats, args.k, args.thread_repeats, args.large_size, args.large_repeats,
            args.large_text_queries, *args.probes, *args.efs]) < 1:
        p.error("counts, sizes and search settings must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    whole_run = CpuShare()
    args = parse_args(argv)
    if args.thread_case:  # a child of measure_thread_settings: one JSON line on stdout
        print(json.dumps(thread_case_child(args.thread_case, args.thread_repeats)))
        return 0
    if args.from_json:
        return report(json.loads(args.from_json.read_text()), args)
    command = run_command("benchmarks.bench_datastore", argv)
    seed_everything(0)
    import transformers
    transformers.logging.set_verbosity_error()
    load_start = os.getloadavg()[0]

    captions_path = args.captions or default_captions()
    raw = read_captions(captions_path)
    unique = unique_captions(raw)
    heldout, heldout_source = heldout_captions(Path(captions_path), unique)
    log(f"{captions_path}: {len(raw):,} captions, {len(unique):,} unique; {len(heldout):,} held-out query captions")
    pool_size = args.queries * BATCH
    res: dict = {"args": {"queries": args.queries, "e2e_repeats": args.e2e_repeats, "k": args.k},
                 "command": command, "machine": machine_facts(), "captions_path": str(captions_path),
                 "captions_in": len(raw), "unique": len(unique), "models": {}, "search_rows": [],
                 "load_start": load_start, "parts": args.part_list,
                 "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}

    if "threads" in args.part_list:
        share = CpuShare()
        res["threads"] = measure_thread_settings(args.thread_repeats)
        res["threads"]["others_cores"] = share.others()
    if "batch" in args.part_list:
        share = CpuShare()
        res["batch"] = measure_batched(args.queries, args.k)
        res["batch"]["others_cores"] = share.others()

    with tempfile.TemporaryDirectory(prefix="bench-datastore-") as tmp:
        for name in args.model_list if "models" in args.part_list else []:
            seed_everything(0)
            share = CpuShare()
            log(f"{name}: creating and loading the model")
            clap, facts = load_model(name, Path(tmp), unique)
            log(f"{name}: {facts['params'] / 1e6:.1f} M params, {facts['dim']}-d, loaded in {facts['load_s']:.1f} s")
            subset = unique if name == "tiny" or args.full_subset <= 0 else unique[:args.full_subset]
            r: dict = {"facts": facts, "tokens": mean_tokens(clap, subset)}
            log(f"{name}: building a datastore of {len(subset):,} captions")
            store, r["build"] = measure_build(clap, subset)
            log(f"{name}: {r['build']['rate']:.0f} captions/s ({r['build']['wall_s']:.1f} s)")

            if len(store) == len(unique):  # real embeddings of every caption: search on them
                search_store, label = store, f"{name}-CLAP caption embeddings"
                pool, what = query_pool_tiny(clap, store, heldout, pool_size, heldout_source)
            else:  # search cost depends only on N and D: random unit vectors of this model's size
                search_store = random_store(unique, clap.embedding_dim, clap)
                label = f"random unit vectors, D={clap.embedding_dim} ({name})"
                pool, what = random_queries(pool_size, clap.embedding_dim), f"{pool_size:,} random unit vectors"
            flat_build = time_flat_build(search_store)
            log(f"{name}: search latency on {label} (N={len(search_store):,}, D={search_store.embedding_dim})")
            ivf, ivf_build = ivf_twin(search_store)
            row = measure_search(search_store, ivf, pool, args.queries, args.k)
            row.update(label=label, queries_what=what, ivf_build_s=ivf_build, flat_build_s=flat_build)
            row["other_recalls"] = other_recalls(search_store, pool, args.k)
            res["search_rows"].append(row)
            log(f"{name}: faiss flat 1q {row['faiss_flat']['single']['median']:.3f} ms, exact 1q "
                f"{row['exact']['single']['median']:.3f} ms, {row['approx_kind']} 1q "
                f"{row['approx']['single']['median']:.3f} ms, recall@{args.k} {row['recall']:.3f}")

            log(f"{name}: end-to-end queries")
            r["e2e"] = measure_end_to_end(clap, search_store, args.e2e_repeats, args.k)
            r["e2e_store"] = label
            log(f"{name}: end-to-end median {r['e2e']['total']['median']:.1f} ms")
            r["others_cores"] = share.others()
            log(f"{name}: other processes used {r['others_cores']:.2f} cores on average meanwhile")
            res["models"][name] = r
            del clap, store, search_store, ivf
            gc.collect()

    if "tiny" in res["models"] and FULL_DIM not in {row["dim"] for row in res["search_rows"]}:
        # "full" not run: still show search at D=512 (random unit vectors, no model needed)
        log("search latency on random 512-d unit vectors")
        store = random_store(unique, FULL_DIM, None)
        ivf, ivf_build = ivf_twin(store)
        row = measure_search(store, ivf, random_queries(pool_size, FULL_DIM), args.queries, args.k)
        row.update(label=f"random unit vectors, D={FULL_DIM}",
                   queries_what=f"{pool_size:,} random unit vectors", ivf_build_s=ivf_build,
                   flat_build_s=time_flat_build(store))
        res["search_rows"].append(row)

    if "large" in args.part_list:
        share = CpuShare()
        res["large"] = measure_large(args.large_size, args.large_kinds, args.probes, args.efs,
                                     args.large_text_queries, args.large_repeats, args.k)
        res["large"]["others_cores"] = share.others()

    res["load_end"] = os.getloadavg()[0]
    res["others_cores"] = whole_run.others()
    res["runtime_s"] = time.perf_counter() - started
    if args.save_json:
        args.save_json.write_text(json.dumps(res, indent=1, default=float))
    log(f"done in {res['runtime_s']:.0f} s")
    return report(res, args)


def report(res: dict, args: argparse.Namespace) -> int:
    """Print the markdown section and write it into ``args.out``."""
    res["notes"] = notes_for(res)
    section = render(res)
    print(section)
    if str(args.out) != "-":
        write_section(args.out, section)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
