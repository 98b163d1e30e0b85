"""Datastore search paths: exact search as one matrix product equals faiss's flat search (captions, scores, order,
ties); the approximate index above exact_max_size keeps recall@5 >= 0.95 on CLAP-like vectors, saves and loads;
stores saved before it (IVF) still load; faiss thread counts are set per search and restored."""
from __future__ import annotations

import json
import threading

import faiss
import numpy as np
import pytest

from engine.config import DatastoreConfig
from engine.datastore import CaptionDatastore, DatastoreManifest, current_files, exact_search
from engine.threads import FAISS_PARALLEL_MIN_QUERIES, faiss_threads, faiss_threads_for


def unit(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def make_store(vectors: np.ndarray, config: DatastoreConfig | None = None) -> CaptionDatastore:
    n, dim = vectors.shape
    manifest = DatastoreManifest(clap_name="test", clap_fingerprint="f" * 16, embedding_dim=dim, size=n)
    return CaptionDatastore([f"caption {i}" for i in range(n)], ["test"] * n, vectors, manifest, config)


def faiss_flat(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(queries, k)


def assert_same_as_faiss(store: CaptionDatastore, queries: np.ndarray, k: int) -> None:
    found = store.search(queries, k)
    scores, indices = faiss_flat(store.embeddings, queries, min(k, len(store)))
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_allclose(found.scores, scores, rtol=0, atol=1e-6)
    assert found.captions == [[store.captions[i] for i in row] for row in indices]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """5,000 random unit vectors of 64 dims, 300 of them copies of 30 rows (exact duplicates: tied scores)."""
    rng = np.random.default_rng(0)
    data = unit(rng.standard_normal((5000, 64)))
    originals = rng.choice(5000, 30, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(5000), originals), 300, replace=False)
    data[copies] = data[np.resize(originals, 300)]
    return data


# --- exact search ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["matrix product", "codes", "by size"])
def exact_path(request, monkeypatch) -> str:
    """Exact search always through the torch matrix product, always through 8-bit codes + exact re-scoring, or as
    the engine picks by size and query count (small searches are faiss's one-thread scan)."""
    if request.param != "by size":
        monkeypatch.setattr("engine.datastore.EXACT_PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr("engine.datastore.PREFILTER_MAX_QUERIES", 10**9 if request.param == "codes" else 0)
    return request.param


@pytest.mark.parametrize("count", [1, 2, 8, 64, 300])
@pytest.mark.parametrize("k", [1, 5, 100])
def test_exact_search_equals_faiss_flat(vectors, count, k, exact_path):
    store = make_store(vectors)
    assert store.manifest.index_type == "flat"
    rng = np.random.default_rng(count * 1000 + k)
    queries = unit(rng.standard_normal((count, 64)))
    queries[::3] = vectors[rng.choice(len(vectors), len(queries[::3]))]  # datastore rows: duplicates tie at the top
    assert_same_as_faiss(store, queries, k)


def test_exact_ties_are_ordered_as_faiss_orders_them(exact_path):
    """Many copies of one vector and near-copies of it: every order among equal scores is faiss's own."""
    rng = np.random.default_rng(1)
    data = unit(rng.standard_normal((2000, 32)))
    data[rng.choice(2000, 40, replace=False)] = data[7]
    data[rng.choice(2000, 10, replace=False)] = unit(data[7:8] + 1e-7 * rng.standard_normal((1, 32)))
    store = make_store(data)
    for k in (1, 3, 10, 45, 60):
        for queries in (data[7:8], data[[7, 7, 8]], unit(data[7:8] + 0.01 * rng.standard_normal((5, 32)))):
            assert_same_as_faiss(store, queries, k)
    _, _, near_ties = exact_search(data, data[[7, 8]], 5)
    assert near_ties.tolist() == [True, False]


def test_k_above_the_store_size_and_no_queries(vectors, exact_path):
    small = make_store(vectors[:7].copy())
    queries = vectors[100:103]
    found = small.search(queries, 50)
    assert found.scores.shape == (3, 7) and all(sorted(row) == list(range(7)) for row in found.indices.tolist())
    assert_same_as_faiss(small, queries, 50)
    empty = small.search(np.zeros((0, 64), dtype=np.float32), 5)
    assert empty.captions == [] and empty.scores.shape == (0, 5) and empty.indices.shape == (0, 5)


def test_exact_search_in_small_chunks_gives_the_same_result(vectors):
    queries = unit(np.random.default_rng(2).standard_normal((50, 64)))
    whole = exact_search(vectors, queries, 5)
    chunked = exact_search(vectors, queries, 5, chunk_scores=3 * len(vectors))  # 3 queries per matrix product
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_array_equal(whole[2], chunked[2])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=0, atol=1e-6)  # BLAS sums a batch in its own order


def test_torch_queries_and_added_rows_are_searched_exactly(vectors, exact_path):
    import torch

    store = make_store(vectors[:3000].copy())
    store.embeddings = np.concatenate([store.embeddings, vectors[3000:]])  # as add() grows it
    store.index.add(vectors[3000:])
    store.captions.extend(f"caption {i}" for i in range(3000, 5000))
    queries = unit(np.random.default_rng(3).standard_normal((4, 64)))
    assert_same_as_faiss(store, queries, 5)
    np.testing.assert_array_equal(store.search(torch.from_numpy(queries), 5).indices, store.search(queries, 5).indices)


# --- thread settings -------------------------------------------------------------------------------------------------


def test_faiss_threads_are_set_for_the_search_and_restored():
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    assert faiss_threads_for(1) == 1 and faiss_threads_for(FAISS_PARALLEL_MIN_QUERIES - 1) == 1
    assert faiss_threads_for(FAISS_PARALLEL_MIN_QUERIES) >= 1


def test_a_thread_count_set_in_one_thread_does_not_reach_another():
    """Why the engine sets faiss's thread count around each search: libgomp keeps it per thread."""
    seen = []
    with faiss_threads(1):
        worker = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
        worker.start()
        worker.join()
    assert seen == [faiss.omp_get_max_threads()]


# --- the approximate index above exact_max_size ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clap_like() -> tuple[np.ndarray, np.ndarray]:
    """30,000 x 256 CLAP-like vectors grown from 15,000 real demo-CLAP caption embeddings (the benchmark's
    generator), and 300 held-out real caption embeddings (not among the 15,000) as queries, mapped the same way."""
    from benchmarks.bench_datastore import DEMO_STORE, clap_like_vectors, lift

    real = CaptionDatastore.load(DEMO_STORE).embeddings  # [45716, 128]
    vectors, basis = clap_like_vectors(real[:15_000], 30_000, 256, seed=0, clusters=256)
    return vectors, lift(real[40_000:40_300], basis)


@pytest.mark.parametrize("kind, code_bytes", [("ivf_sq8", 256), ("ivf_sq4", 128)])
def test_the_approximate_index_finds_the_exact_top_5(clap_like, kind, code_bytes):
    vectors, queries = clap_like
    store = make_store(vectors, DatastoreConfig(exact_max_size=1000, approximate_index=kind))  # forces it
    assert store.manifest.index_type == kind
    assert store.manifest.index_params == {"nlist": int(2 * 30_000 ** 0.5), "code_bytes": code_bytes,
                                           "build_s": store.manifest.index_params["build_s"]}
    assert isinstance(store.index, faiss.IndexIVFScalarQuantizer) and store.index.nprobe == DatastoreConfig().ivf_nprobe
    _, truth = faiss_flat(vectors, queries, 5)
    found = store.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.indices.tolist(), truth.tolist())])
    assert recall >= 0.95, f"recall@5 {recall:.3f}"
    # Re-ranked scores are the exact inner products of the returned rows, best first.
    np.testing.assert_allclose(found.scores, np.einsum("qd,qkd->qk", queries, vectors[found.indices]), atol=1e-6)
    assert np.all(np.diff(found.scores, axis=1) <= 0)
    assert found.captions[0] == [f"caption {i}" for i in found.indices[0]]


def test_an_approximate_store_round_trips(clap_like, tmp_path):
    vectors, queries = clap_like
    config = DatastoreConfig(exact_max_size=1000)
    store = make_store(vectors[:8000].copy(), config)
    store.save(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["index_type"] == "ivf_sq8" and manifest["index_params"]["nlist"] == store.index.nlist
    loaded = CaptionDatastore.load(tmp_path / "ds", config=DatastoreConfig(ivf_nprobe=16))
    assert loaded.manifest.index_type == "ivf_sq8" and isinstance(loaded.index, faiss.IndexIVFScalarQuantizer)
    assert loaded.index.nprobe == 16  # search settings come from the loading config
    loaded.index.nprobe = store.index.nprobe
    before, after = store.search(queries, 5), loaded.search(queries, 5)
    np.testing.assert_array_equal(after.indices, before.indices)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert (current_files(tmp_path / "ds") / "index.faiss").stat().st_size < 0.3 * vectors[:8000].nbytes  # 8 of 32 bits


def test_an_ivf_store_saved_before_loads_and_searches_as_before(clap_like, tmp_path):
    """The files an IVF store got before the coded indexes: an IndexIVFFlat and a manifest without index_params."""
    vectors, queries = clap_like
    old = make_store(vectors[:8000].copy(), DatastoreConfig(exact_max_size=1000, approximate_index="ivf"))
    assert isinstance(old.index, faiss.IndexIVFFlat)
    old.save(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    del manifest["index_params"]
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    loaded = CaptionDatastore.load(tmp_path / "ds", config=DatastoreConfig())  # today's defaults: ivf_sq8 for new
    assert loaded.manifest.index_type == "ivf" and isinstance(loaded.index, faiss.IndexIVFFlat)
    expected = old.index.search(queries, 5)  # what an IVF store's search returned: faiss's own result
    found = loaded.search(queries, 5)
    np.testing.assert_array_equal(found.indices, expected[1])
    np.testing.assert_array_equal(found.scores, expected[0])


def test_an_unknown_approximate_index_is_refused(vectors):
    from engine.errors import DatastoreError

    with pytest.raises(DatastoreError, match="approximate_index must be one of ivf_sq8, ivf_sq4, ivf, got 'hnsw'"):
        make_store(vectors[:2000].copy(), DatastoreConfig(exact_max_size=100, approximate_index="hnsw"))


def test_exact_search_paths_by_size_and_query_count(vectors, monkeypatch):
    """Small work: faiss's one-thread scan; a few queries: the codes; many: one matrix product."""
    import engine.datastore as datastore

    products, coded = [], []
    product, prefiltered = datastore.exact_search, CaptionDatastore._search_prefiltered
    monkeypatch.setattr(datastore, "exact_search", lambda *a, **kw: products.append(len(a[1])) or product(*a, **kw))
    monkeypatch.setattr(CaptionDatastore, "_search_prefiltered",
                        lambda self, m, k: coded.append(len(m)) or prefiltered(self, m, k))
    store = make_store(vectors)  # 5,000 x 64: one query is 320,000 multiply-adds
    store.search(vectors[:1], 5)
    assert products == coded == []
    monkeypatch.setattr(datastore, "EXACT_PARALLEL_MIN_WORK", 1000)
    queries = unit(np.random.default_rng(7).standard_normal((datastore.PREFILTER_MAX_QUERIES, 64)))
    store.search(queries[:3], 5)
    assert coded == [3] and products == []  # random 64-d vectors: the codes settle every row
    store.search(queries, 5)
    assert coded == [3] and products == [len(queries)]


def test_rows_the_codes_cannot_settle_go_to_the_matrix_product(monkeypatch):
    """Rows crowded closer than the codes' error: the bound proves nothing, the matrix product decides, and the
    result is still faiss's."""
    import engine.datastore as datastore

    monkeypatch.setattr(datastore, "EXACT_PARALLEL_MIN_WORK", 0)
    rng = np.random.default_rng(8)
    centre = unit(rng.standard_normal((1, 48)))
    crowded = unit(centre + 1e-3 * rng.standard_normal((3000, 48)))  # every cosine above 0.999
    store = make_store(crowded)
    queries = unit(centre + 1e-3 * rng.standard_normal((4, 48)))
    _, _, _, unproven = store._search_prefiltered(queries, 5)
    assert unproven.all()
    assert_same_as_faiss(store, queries, 5)
