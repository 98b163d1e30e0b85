"""Thread settings for datastore search next to torch on a small CPU: the one place they are chosen.

torch (its own libgomp) and faiss (another libgomp, plus an OpenMP OpenBLAS) each keep a pool of one OpenMP thread
per core, and an idle OpenMP thread spin-waits for a while before it sleeps. On 2 cores the two pools fight: a faiss
search right after a torch forward shares the cores with torch's spinning threads, and faiss's own spinning team
slows the next torch forward. The settings below, chosen by ``python -m benchmarks.bench_datastore --threads``
(table and numbers in benchmarks/RESULTS.md, "Caption datastore"), avoid the second pool where it buys nothing:

* Exact (flat) search of a few queries runs on one thread: 8-bit codes of the embeddings are scanned and the best
  candidates re-scored exactly (``CaptionDatastore._search_prefiltered``; a quarter of the bytes of the float32
  scan). On a 2-core machine shared with other work a 2-thread region waits for a free core, which costs more than
  such a search. Small searches (below :data:`EXACT_PARALLEL_MIN_WORK` multiply-adds) are faiss's flat scan on one
  thread. Many queries share one torch matrix product (:func:`engine.datastore.exact_search`), on torch's pool,
  the one that just ran the forward, so no other pool wakes up.
* faiss searches (approximate indexes, and the rare exact-tie fallback) run with one OpenMP thread for batches below
  :data:`FAISS_PARALLEL_MIN_QUERIES`: faiss parallelises over queries, so a small batch gains nothing from a team,
  and a team's spinning threads would compete with torch. Large batches (training retrieval) use every core.
* libgomp keeps the thread count per calling thread: ``faiss.omp_set_num_threads`` in one thread does not reach a
  server's worker threads. So the count is set around each search, in the thread that searches
  (:func:`faiss_threads`), and restored afterwards.
* Environment variables (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) would have to be set before torch is imported and
  apply to torch's own work too; the benchmark measures them, but the engine sets none.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import faiss

FAISS_PARALLEL_MIN_QUERIES = 64  # from this many queries per call, faiss searches with every core
# Exact search below this many multiply-adds per call (queries x rows x dims) runs on one thread (faiss's flat scan):
# a parallel region costs a wake-up of the other threads, and on a busy machine a wait for a free core (~8 ms seen),
# far more than small work takes alone (~0.2 ns per multiply-add). Above it, torch's matrix product on its own pool.
EXACT_PARALLEL_MIN_WORK = 8_000_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def faiss_threads_for(queries: int) -> int:
    """faiss OpenMP threads for a search of ``queries`` queries: 1 below FAISS_PARALLEL_MIN_QUERIES, else all cores."""
    return 1 if queries < FAISS_PARALLEL_MIN_QUERIES else usable_cores()


@contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` faiss OpenMP threads in this thread; the previous count comes back afterwards."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, count))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
