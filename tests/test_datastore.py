"""Caption datastore: reading caption files, exact and approximate search against numpy, persistence, refusal."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from engine.config import DatastoreConfig
from engine.datastore import CaptionDatastore, current_files, read_captions, unique_captions
from engine.errors import DatastoreError
from tests.helpers import audiocaps_train_source, noise_clip, run_module_with_peak_rss, small_caption_set


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return small_caption_set(3000)


@pytest.fixture(scope="module")
def store(tiny_clap, captions) -> CaptionDatastore:
    return CaptionDatastore.build(captions, tiny_clap, DatastoreConfig(chunk_size=700), show_progress=False)


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ embeddings.T  # [Q, N]
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def queries(tiny_clap) -> np.ndarray:
    audio = tiny_clap.embed_audio([noise_clip(2.0, seed=s) for s in range(3)])
    text = tiny_clap.embed_text(["a dog barks", "rain and thunder", "a man speaks"])
    return torch.cat([audio, text]).numpy()


# --- reading ---------------------------------------------------------------------------------------------------------


def test_reads_csv_jsonl_and_txt(tmp_path):
    pd.DataFrame({"audiocap_id": [1, 2], "caption": ["A dog barks", "NA"]}).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"key": "x", "target": "Rain falls", "similar_captions": []}) + "\n\n"
        + json.dumps({"key": "y", "target": "Wind blows"}) + "\n")
    (tmp_path / "c.txt").write_text("first caption\n\nsecond, with a comma\n")
    assert read_captions(tmp_path / "a.csv") == ["A dog barks", "NA"]  # "NA" stays text, not a missing value
    assert read_captions(tmp_path / "b.jsonl") == ["Rain falls", "Wind blows"]
    assert read_captions(tmp_path / "c.txt") == ["first caption", "", "second, with a comma"]


def test_reading_errors_name_the_problem(tmp_path):
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DatastoreError, match="no 'caption' column .*columns: text"):
        read_captions(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"target": "ok"}\n{"caption": "no target"}\n')
    with pytest.raises(DatastoreError, match=r"b.jsonl:2 has no string field 'target'"):
        read_captions(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(DatastoreError, match="c.jsonl:1 is not valid JSON"):
        read_captions(tmp_path / "c.jsonl")
    (tmp_path / "d.xlsx").write_bytes(b"")
    with pytest.raises(DatastoreError, match="Don't know how to read captions from d.xlsx"):
        read_captions(tmp_path / "d.xlsx")
    with pytest.raises(DatastoreError, match="does not exist"):
        read_captions(tmp_path / "missing.csv")


def test_exact_duplicates_are_removed_keeping_order():
    assert unique_captions(["A dog", "A  dog ", "a dog", "", "  ", "Rain", "A dog"]) == ["A dog", "a dog", "Rain"]


# --- search ----------------------------------------------------------------------------------------------------------


def test_exact_search_equals_numpy_brute_force(store, tiny_clap):
    q = queries(tiny_clap)
    result = store.search(q, k=10)
    order, scores = brute_force(store.embeddings, q, 10)
    assert store.manifest.index_type == "flat"
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_allclose(result.scores, scores, rtol=0, atol=1e-5)
    assert result.captions[0] == [store.captions[i] for i in order[0]]


def test_store_holds_unit_norm_embeddings_of_its_captions(store, tiny_clap, captions):
    assert len(store) == len(unique_captions(captions))
    np.testing.assert_allclose(np.linalg.norm(store.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(store.embeddings[:5], tiny_clap.embed_text(store.captions[:5]).numpy(), atol=1e-5)
    assert store.support.shape == (len(store), 32) and store.support.dtype == torch.float32


def test_a_caption_finds_itself_first(store, tiny_clap):
    probe = store.captions[1234]
    result = store.search(tiny_clap.embed_text([probe]), k=3)
    assert result.captions[0][0] == probe and result.scores[0][0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_sq4", "ivf"])
def test_approximate_index_above_the_threshold(tiny_clap, captions, kind):
    config = DatastoreConfig(exact_max_size=1000, ivf_nprobe=8, approximate_index=kind)
    approx = CaptionDatastore.build(captions, tiny_clap, config, show_progress=False)
    assert approx.manifest.index_type == kind
    q = queries(tiny_clap)
    order, _ = brute_force(approx.embeddings, q, 5)
    result = approx.search(q, k=5)
    # Returned scores are true inner products of the returned captions, best first.
    for row in range(len(q)):
        expected = approx.embeddings[result.indices[row]] @ q[row]
        np.testing.assert_allclose(result.scores[row], expected, atol=1e-5)
        assert np.all(np.diff(result.scores[row]) <= 1e-6)
    recall = np.mean([len(set(result.indices[r]) & set(order[r])) / 5 for r in range(len(q))])
    assert recall >= 0.6, f"IVF recall@5 {recall} is too low for nprobe=8"
    # Visiting every cell (and, for coded vectors, re-scoring every candidate) makes the approximate index exact.
    approx.index.nprobe = approx.index.nlist
    approx.config.rerank_depth = len(approx)
    np.testing.assert_array_equal(approx.search(q, k=5).indices, order)


def test_k_is_clamped_and_wrong_dimensions_refused(tiny_clap):
    small = CaptionDatastore.build(["a", "b", "c"], tiny_clap, show_progress=False)
    assert len(small.search(tiny_clap.embed_text(["x"]), k=10).captions[0]) == 3
    with pytest.raises(DatastoreError, match="Query embeddings are 16-d but this datastore holds 32-d"):
        small.search(np.zeros((1, 16), dtype=np.float32), k=1)
    with pytest.raises(DatastoreError, match="No captions"):
        CaptionDatastore.build(["", "  "], tiny_clap, show_progress=False)


# --- growth and persistence ------------------------------------------------------------------------------------------


def test_incremental_add_skips_duplicates_and_is_searchable(tiny_clap, captions):
    grown = CaptionDatastore.build(captions[:500], tiny_clap, show_progress=False)
    added = grown.add(["A kazoo solo over a theremin", captions[0], "A kazoo solo over a theremin "], tiny_clap,
                      source="user")
    assert added == 1 and len(grown) == 501
    assert grown.caption_sources[-1] == "user" and "user" in grown.manifest.sources
    hit = grown.search(tiny_clap.embed_text(["A kazoo solo over a theremin"]), k=1)
    assert hit.captions[0][0] == "A kazoo solo over a theremin"
    order, _ = brute_force(grown.embeddings, queries(tiny_clap), 5)
    np.testing.assert_array_equal(grown.search(queries(tiny_clap), k=5).indices, order)


def test_growing_past_the_exact_size_switches_to_the_approximate_index(tiny_clap, captions):
    grown = CaptionDatastore.build(captions[:900], tiny_clap, DatastoreConfig(exact_max_size=1000), show_progress=False)
    assert grown.manifest.index_type == "flat"
    grown.add(captions[900:1500], tiny_clap)
    assert grown.manifest.index_type == "ivf_sq8" and grown.index.ntotal == len(grown) == 1500
    assert grown.manifest.index_params["nlist"] == grown.index.nlist
    grown.add(["A kazoo solo over a theremin"], tiny_clap)  # an approximate index grows in place
    assert grown.index.ntotal == 1501
    assert grown.search(tiny_clap.embed_text(["A kazoo solo over a theremin"]), 1).captions[0] == [
        "A kazoo solo over a theremin"]


def test_save_load_round_trip(store, tiny_clap, tmp_path):
    store.save(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", "manifest.json", "v-000001"]
    assert sorted(p.name for p in current_files(tmp_path / "ds").iterdir()) == [
        "captions.csv", "embeddings.npy", "index.faiss"]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["data"] == "v-000001" and manifest["format_version"] == 2
    assert manifest["clap_fingerprint"] == tiny_clap.fingerprint and manifest["embedding_dim"] == 32
    assert manifest["size"] == len(store)
    loaded = CaptionDatastore.load(tmp_path / "ds", tiny_clap)
    assert loaded.captions == store.captions
    np.testing.assert_array_equal(loaded.embeddings, store.embeddings)
    q = queries(tiny_clap)
    np.testing.assert_array_equal(loaded.search(q, 5).indices, store.search(q, 5).indices)
    loaded.add(["A brand new caption"], tiny_clap)
    loaded.save(tmp_path / "ds")
    assert CaptionDatastore.load(tmp_path / "ds", tiny_clap).captions[-1] == "A brand new caption"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", "manifest.json", "v-000002"]


def test_compact_save_halves_the_embeddings_and_rebuilds_the_exact_index(store, tiny_clap, tmp_path):
    store.save(tmp_path / "full")
    store.save(tmp_path / "compact", compact=True)
    assert not (current_files(tmp_path / "compact") / "index.faiss").exists()
    full_bytes = (current_files(tmp_path / "full") / "embeddings.npy").stat().st_size
    assert (current_files(tmp_path / "compact") / "embeddings.npy").stat().st_size < 0.55 * full_bytes
    loaded = CaptionDatastore.load(tmp_path / "compact", tiny_clap)
    assert loaded.embeddings.dtype == np.float32 and loaded.captions == store.captions
    assert loaded.caption_sources == store.caption_sources
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(loaded.embeddings, store.embeddings, atol=2e-3)
    q = queries(tiny_clap)
    np.testing.assert_allclose(loaded.search(q, 5).scores, store.search(q, 5).scores, atol=2e-3)
    named = CaptionDatastore.build(store.captions[:50], tiny_clap, source="caps.txt", show_progress=False)
    named.save(tmp_path / "named", compact=True)
    assert pd.read_csv(current_files(tmp_path / "named") / "captions.csv").columns.tolist() == ["caption"]
    reloaded = CaptionDatastore.load(tmp_path / "named", tiny_clap)
    assert reloaded.caption_sources == ["caps.txt"] * 50 and reloaded.captions == named.captions


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_sq4", "ivf"])
def test_ivf_round_trip(tiny_clap, captions, tmp_path, kind):
    config = DatastoreConfig(exact_max_size=1000, approximate_index=kind)
    approx = CaptionDatastore.build(captions, tiny_clap, config, show_progress=False)
    approx.save(tmp_path / "ivf")
    loaded = CaptionDatastore.load(tmp_path / "ivf", tiny_clap, config)
    assert loaded.manifest.index_type == kind
    q = queries(tiny_clap)
    np.testing.assert_array_equal(loaded.search(q, 5).indices, approx.search(q, 5).indices)


def test_loading_with_another_clap_is_refused(store, tiny_clap, other_clap, tmp_path):
    store.save(tmp_path / "ds")
    with pytest.raises(DatastoreError, match="built with CLAP .* but the loaded CLAP is .*rebuild the datastore"):
        CaptionDatastore.load(tmp_path / "ds", other_clap)
    with pytest.raises(DatastoreError, match="built with CLAP"):
        store.add(["x"], other_clap)


def test_broken_directories_are_refused(store, tiny_clap, tmp_path):
    with pytest.raises(DatastoreError, match="is not a datastore"):
        CaptionDatastore.load(tmp_path, tiny_clap)
    store.save(tmp_path / "ds")
    files = current_files(tmp_path / "ds")
    table = pd.read_csv(files / "captions.csv", keep_default_na=False)
    table.iloc[:-1].to_csv(files / "captions.csv", index=False)
    with pytest.raises(DatastoreError, match="is inconsistent"):
        CaptionDatastore.load(tmp_path / "ds", tiny_clap)
    (tmp_path / "ds" / "manifest.json").write_text("{")
    with pytest.raises(DatastoreError, match="malformed"):
        CaptionDatastore.load(tmp_path / "ds", tiny_clap)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "nan", "wrong_dim", "missing"])
def test_corrupt_embeddings_get_a_typed_error_naming_the_file(store, tiny_clap, tmp_path, damage):
    store.save(tmp_path / "ds")
    path = current_files(tmp_path / "ds") / "embeddings.npy"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "nan":
        np.save(path, np.full_like(store.embeddings, np.nan))
    elif damage == "wrong_dim":
        np.save(path, store.embeddings[:, :16].copy())
    else:
        path.unlink()
    with pytest.raises(DatastoreError, match=r"embeddings.npy .*rebuild"):
        CaptionDatastore.load(tmp_path / "ds", tiny_clap)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_dim"])
def test_a_corrupt_index_gets_a_typed_error_naming_the_file(store, tiny_clap, tmp_path, damage):
    import faiss

    store.save(tmp_path / "ds")
    path = current_files(tmp_path / "ds") / "index.faiss"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not an index at all" * 10)
    else:
        other = faiss.IndexFlatIP(16)
        other.add(np.zeros((len(store), 16), dtype=np.float32))
        faiss.write_index(other, str(path))
    with pytest.raises(DatastoreError, match=r"index.faiss is not a readable faiss index|is inconsistent"):
        CaptionDatastore.load(tmp_path / "ds", tiny_clap)


def test_leftovers_of_a_killed_save_go_on_the_next_load(store, tiny_clap, tmp_path):
    store.save(tmp_path / "ds")
    (tmp_path / "ds" / ".staging-v-000002").mkdir()
    (tmp_path / "ds" / ".staging-v-000002" / "captions.csv").write_text("caption\nhalf")
    (tmp_path / "ds" / "v-000003").mkdir()  # renamed but never named by the manifest
    (tmp_path / "ds" / ".manifest.json.tmp-123").write_text("{")
    assert CaptionDatastore.load(tmp_path / "ds", tiny_clap).captions == store.captions
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", "manifest.json", "v-000001"]
    store.save(tmp_path / "ds")
    assert CaptionDatastore.load(tmp_path / "ds").manifest.data == "v-000002"


def test_a_flat_format_1_store_loads_and_its_next_save_is_versioned(store, tiny_clap, tmp_path):
    store.save(tmp_path / "ds")
    files = current_files(tmp_path / "ds")
    for path in files.iterdir():  # the layout of stores written before versions: files beside the manifest
        path.rename(tmp_path / "ds" / path.name)
    files.rmdir()
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest.pop("data")
    manifest["format_version"] = 1
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    loaded = CaptionDatastore.load(tmp_path / "ds", tiny_clap)
    assert loaded.captions == store.captions
    loaded.save(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", "manifest.json", "v-000001"]
    assert CaptionDatastore.load(tmp_path / "ds", tiny_clap).captions == store.captions


def test_50k_audiocaps_captions_build_within_bounded_memory(tiny_clap_dir, tmp_path):
    """The whole AudioCaps training split through the command-line tool, in a child process whose peak RSS we read."""
    source = audiocaps_train_source()
    # The child's own peak (VmHWM), not getrusage: see run_module_with_peak_rss for why that could not fail.
    done, peak_mib = run_module_with_peak_rss(
        "trainers.build_datastore",
        ["--profile", "tiny", "--clap", str(tiny_clap_dir), "--device", "cpu", "--out", str(tmp_path / "audiocaps"),
         "--quiet", str(source)],
        scratch=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["captions"] == 45_716  # 49,838 rows, exact duplicates removed
    assert peak_mib < 3000, f"peak RSS {peak_mib:.0f} MiB"
    loaded = CaptionDatastore.load(tmp_path / "audiocaps")
    assert len(loaded) == 45_716 and loaded.embeddings.shape == (45_716, 32)
