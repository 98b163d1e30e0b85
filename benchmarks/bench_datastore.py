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
import os
import platform
import random
import shlex
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
from engine.datastore import CaptionDatastore, DatastoreManifest, read_captions, unique_captions  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_TRAIN_CSV = PROJECT_ROOT.parent / "shared" / "data" / "audiocaps" / "train.csv"
BUNDLED_TRAIN_TXT = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"
SECTION_TITLE = "## Caption datastore (benchmarks/bench_datastore.py)"
FILE_TITLE = "# AudioScribe benchmarks"
FILE_INTRO = "Each benchmark script writes (and on re-runs replaces) only its own section below."
BATCH = 16  # queries in the batched search measurement
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
    """Mean tokens per caption (with <s>, </s>; truncated as the backend does) and mean padded length per batch."""
    lengths = np.array([len(ids) for ids in clap.tokenizer(list(captions), truncation=True,
                                                           max_length=clap.max_text_tokens)["input_ids"]])
    size = clap.text_batch_size
    padded = [lengths[i:i + size].max() for i in range(0, len(lengths), size)]
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


def ivf_twin(store: CaptionDatastore) -> tuple[CaptionDatastore, float]:
    """The same captions and embeddings behind an IVF index (exact_max_size=0 forces IVF); returns its build time."""
    manifest = dataclasses.replace(store.manifest, sources=list(store.manifest.sources))
    t0 = time.perf_counter()
    ivf = CaptionDatastore(store.captions, store.caption_sources, store.embeddings, manifest,
                           DatastoreConfig(exact_max_size=0))
    return ivf, time.perf_counter() - t0


def measure_search(flat: CaptionDatastore, ivf: CaptionDatastore, pool: np.ndarray, repeats: int, k: int) -> dict:
    """faiss ``index.search`` only: 1 query and BATCH queries per call, flat and IVF, plus IVF recall@k vs flat."""
    assert len(pool) >= repeats * BATCH
    result = {}
    for name, store in (("flat", flat), ("ivf", ivf)):
        index = store.index
        single = timed(lambda i: index.search(pool[i:i + 1], k), repeats, warmup=10)
        batch = timed(lambda i: index.search(pool[i * BATCH:(i + 1) * BATCH], k), repeats, warmup=3)
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
    _, approx = ivf.index.search(pool, k)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    result["recall"] = hits / exact.size
    result["recall_queries"] = len(pool)
    result["nlist"] = int(ivf.index.nlist)
    result["nprobe"] = int(ivf.index.nprobe)
    result["n"], result["dim"] = flat.index.ntotal, flat.index.d
    return result


def measure_end_to_end(clap: HFClapBackend, store: CaptionDatastore, repeats: int, k: int) -> dict:
    """One 10-s clip: ``clap.embed_audio`` then ``store.search`` (the datastore's own search: faiss + caption lookup)."""
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
# report


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
    a, m = res["args"], res["machine"]
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
              "default thread settings.", "",
              f"Captions: `{res['captions_path']}`: {res['captions_in']:,} rows, {res['unique']:,} unique after "
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

    lines += ["### 1. Datastore build (`CaptionDatastore.build`, text embedding + flat index)", "",
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

    lines += [f"### 2. Search latency (faiss `index.search` only, k={a['k']})", "",
              f"Median / p95 in ms over {a['queries']} repeats after warm-up; the batch row searches {BATCH} "
              f"queries per call. Recall@{a['k']} is IVF's top-{a['k']} against the flat index's over "
              f"{res['search_rows'][0]['recall_queries'] if res['search_rows'] else 0:,} queries.", "",
              "| vectors | N | D | index | nlist / nprobe | index build (s) | 1 query (ms) | "
              f"{BATCH} queries (ms) | per query in batch (ms) | recall@{a['k']} vs flat |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in res["search_rows"]:
        for kind in ("flat", "ivf"):
            s = row[kind]
            per = s["batch"]["median"] / BATCH
            nl = f"{row['nlist']} / {row['nprobe']}" if kind == "ivf" else "-"
            rec = f"{row['recall']:.3f}" if kind == "ivf" else "1 (reference)"
            build = row["ivf_build_s"] if kind == "ivf" else row["flat_build_s"]
            build_s = f"{build:.2f}" if build is not None else "-"
            lines.append(f"| {row['label']} | {row['n']:,} | {row['dim']} | {kind} | {nl} | {build_s} | "
                         f"{fmt_ms(s['single'])} | {fmt_ms(s['batch'])} | {per:.3f} | {rec} |")
            if kind == "flat":
                b = row["flat_blas"]["batch"]
                lines.append(f"| {row['label']} | {row['n']:,} | {row['dim']} | flat, BLAS kernel forced¹ | - | - | "
                             f"- | {fmt_ms(b)} | {b['median'] / BATCH:.3f} | 1 (same results) |")
    lines.append("")
    lines.append(f"¹ `faiss.cvar.distance_compute_blas_threshold = 1` (this faiss build's default is "
                 f"{m['blas_threshold']:,}): below the threshold faiss scans all N vectors once per query; above it, "
                 "one matrix product serves the whole batch. Not what the app does today; shown for comparison.")
    lines.append("")
    for row in res["search_rows"]:
        lines.append(f"- {row['label']}: queries are {row['queries_what']}.")
    lines.append("")

    lines += [f"### 3. End-to-end query: one {CLIP_S:.0f}-s clip (`embed_audio` + `CaptionDatastore.search`, "
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
    lines += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def notes_for(res: dict) -> list[str]:
    notes = [
        "**tiny** numbers are a floor: a 32-d model with two small transformer layers per tower. Nothing "
        "real ships with it; it shows the overhead of the pipeline itself (tokenisation, mel features, faiss, "
        "Python).",
        "**full** has random weights but exactly the layer shapes of laion/clap-htsat-unfused, so its compute "
        "(and hence its time) is what the real checkpoint costs on this CPU. Its tokenizer has a smaller "
        "vocabulary than roberta-base's 50k, which does not change compute meaningfully: cost per caption follows "
        "the token count (reported above), and a tokenizer trained on the captions themselves cuts them into "
        "about as many or slightly fewer tokens than roberta-base would, so its build rate may be slightly "
        "optimistic.",
        "The search cost depends only on N, D, k and the index type, not on what the vectors mean; the D=512 rows "
        "therefore use random unit vectors for the same number of captions. Random high-dimensional vectors have no "
        "cluster structure, which is the worst case for IVF recall; trained CLAP embeddings cluster and usually "
        "give higher recall at the same nprobe.",
        "With the default `DatastoreConfig` (exact_max_size = 200,000) a 45,716-caption store uses the exact flat "
        "index, so the flat rows are what the app does; the IVF rows show what a store above that size would do "
        f"(nlist = min(4*sqrt(N), N/39), nprobe = {DatastoreConfig().ivf_nprobe}).",
        "Batched queries amortise per-call overhead, so the per-query cost in a batch is lower than a single "
        "query's. Exact search over 45,716 x 512 float32 (94 MB) is bound by memory bandwidth: without the BLAS "
        "kernel each query of a batch streams the whole matrix again.",
        "In the end-to-end query the audio embedding dominates: for tiny a large part of it is the mel spectrogram "
        "(the same for every model), for full the HTSAT tower. The exact search is a small fraction of the total.",
        "The search inside the end-to-end query is slower than the isolated faiss search above. torch and faiss "
        "each ship their own OpenMP runtime with one thread per core; right after the audio tower, torch's idle "
        "threads still spin-wait and compete with faiss's threads for the 2 cores. (`OMP_WAIT_POLICY=PASSIVE` "
        "removes that penalty but slows the isolated search; not applied here.)",
        "p95 values are the most sensitive to other processes on the machine: isolated spikes (several times the "
        "median) are contention, not a property of the code. Compare medians.",
    ]
    full = res["models"].get("full")
    if full:
        b = full["build"]
        notes.append(f"The full model's build rate was measured on the first {b['unique']:,} unique captions "
                     f"(`--full-subset`); the whole-set time is a linear extrapolation from it (short and long "
                     "captions are spread evenly through the file, so it should be close).")
        notes.append("`CaptionDatastore.build` embeds captions in file order, in chunks of "
                     f"{DatastoreConfig().chunk_size:,} split into batches of 256 (`clap.text_batch_size`), each "
                     f"padded to its longest caption: the full model's batches are {full['tokens'][1]:.1f} positions "
                     f"long on average for captions of {full['tokens'][0]:.1f} tokens, so the text tower computes "
                     f"about {full['tokens'][1] / full['tokens'][0]:.1f}x more positions than there are tokens. "
                     "Embedding length-sorted batches could recover part of that (not measured here).")
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
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_datastore", description=__doc__.split("\n")[0])
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
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - {"tiny", "full"}
    if unknown or not args.model_list:
        p.error(f"--models takes tiny and/or full, got {args.models!r}")
    if args.queries < 1 or args.e2e_repeats < 1 or args.k < 1:
        p.error("--queries, --e2e-repeats and --k must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    whole_run = CpuShare()
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.bench_datastore" + (" " + shlex.join(argv_list) if argv_list else "")
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
                 "load_start": load_start,
                 "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}

    with tempfile.TemporaryDirectory(prefix="bench-datastore-") as tmp:
        for name in args.model_list:
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
            res["search_rows"].append(row)
            log(f"{name}: flat 1q {row['flat']['single']['median']:.3f} ms, ivf 1q "
                f"{row['ivf']['single']['median']:.3f} ms, recall@{args.k} {row['recall']:.3f}")

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

    res["load_end"] = os.getloadavg()[0]
    res["others_cores"] = whole_run.others()
    res["runtime_s"] = time.perf_counter() - started
    res["notes"] = notes_for(res)
    section = render(res)
    print(section)
    if str(args.out) != "-":
        write_section(args.out, section)
        log(f"wrote {args.out}")
    log(f"done in {res['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
