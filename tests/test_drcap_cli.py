"""DRCap command-line tools end to end with tiny models: preprocessing, batch captioning (resumable), evaluation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from engine.datastore import current_files, read_jsonl_records
from tests.helpers import noise_clip, small_caption_set
from trainers import batch_caption, evaluate_captions, preprocess_drcap


def model_flags(tiny_clap_dir, tiny_llama_dir, cache) -> list[str]:
    return ["--profile", "tiny", "--set", f"clap.model={tiny_clap_dir}", "--set", "clap.device=cpu",
            "--set", f"llm.model={tiny_llama_dir}",
            "--set", "caption.num_beams=1", "--set", "caption.max_new_tokens=6", "--set", f"cache_dir={cache}"]


def test_preprocess_writes_rag_jsonl_support_and_datastore(tmp_path, tiny_clap_dir, tiny_llama_dir, tiny_clap,
                                                           capsys):
    captions = small_caption_set(200)
    pd.DataFrame({"audiocap_id": range(200), "caption": captions}).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "val.txt").write_text("\n".join(captions[:20]) + "\n")
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", noise_clip(3.0, 16_000), 16_000)
    code = preprocess_drcap.main(["--train", str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.txt"),
                                  "--test-audio", str(tmp_path / "audio"), "--out", str(tmp_path / "prep"),
                                  "--band-low", "0.6", "--band-high", "0.95", "--quiet",
                                  *model_flags(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = read_jsonl_records(tmp_path / "prep" / "train_rag.jsonl")
    assert len(train) == 200 and train[0]["key"] == "0" and train[0]["target"] == captions[0]
    assert sum(summary["train"]["with_n_similar"]) == 200
    store_embeddings = np.load(current_files(tmp_path / "prep" / "datastore") / "embeddings.npy")
    store_captions = pd.read_csv(current_files(tmp_path / "prep" / "datastore") / "captions.csv",
                                 keep_default_na=False)["caption"]
    for record in train[:20]:  # every similar caption is in the band, and not the caption itself
        query = tiny_clap.embed_text([record["text"]]).numpy()[0]
        for similar in record["similar_captions"]:
            cosine = float(store_embeddings[list(store_captions).index(similar)] @ query)
            assert 0.6 < cosine < 0.95 and similar != record["target"]
    support = torch.load(tmp_path / "prep" / "text_embedding_support.pt", weights_only=True)
    assert support.shape == (200, 32) and support.dtype == torch.float32
    torch.testing.assert_close(support.norm(dim=1), torch.ones(200))
    test = read_jsonl_records(tmp_path / "prep" / "test_rag.jsonl")
    assert test[0]["key"] == "a.wav" and len(test[0]["similar_captions"]) == 3


def test_batch_caption_is_resumable_and_records_errors(tmp_path, tiny_clap_dir, tiny_llama_dir, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, seconds in enumerate([2.0, 12.0, 4.0]):
        sf.write(folder / f"clip{i}.wav", noise_clip(seconds, 32_000, seed=i), 32_000)
    (folder / "broken.wav").write_bytes(b"not audio at all")
    (tmp_path / "captions.txt").write_text("\n".join(small_caption_set(100)) + "\n")
    flags = [str(folder), "--out", str(tmp_path / "out.jsonl"), "--quiet", "--batch-size", "2",
             "--set", f"datastore.sources={tmp_path / 'captions.txt'}",
             *model_flags(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")]
    assert batch_caption.main(flags) == 1  # one file failed
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {**summary, "inputs": 4, "captioned": 3, "errors": 1}
    records = {r["key"]: r for r in read_jsonl_records(tmp_path / "out.jsonl")}
    assert "Could not decode 'broken.wav'" in records["broken.wav"]["error"]
    assert len(records["clip1.wav"]["windows"]) == 2 and records["clip0.wav"]["windows"] == []
    assert len(records["clip0.wav"]["retrieved"]) == 3 and set(records["clip0.wav"]["timings_ms"]) == {
        "clap", "retrieval", "projection", "generation"}
    # An interrupted run: drop the last good line and cut another in half; the rerun fills in only those.
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    good = [line for line in lines if '"caption"' in line]
    (tmp_path / "out.jsonl").write_text(good[0] + "\n" + good[1][:40])  # no final newline: cut mid-write
    batch_caption.main(flags)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_already_done"] == 1 and summary["captioned"] == 2
    rows = read_jsonl_records(tmp_path / "out.jsonl")  # every line valid again: the half line was cut
    finished = {r["key"] for r in rows if r.get("caption")}
    assert finished == {"clip0.wav", "clip1.wav", "clip2.wav"}
    # ... and the results can be scored directly (references from a CSV keyed like the outputs).
    refs = pd.DataFrame({"key": ["clip0.wav", "clip1.wav", "clip2.wav"] * 2, "caption": ["a b c"] * 6})
    refs.to_csv(tmp_path / "refs.csv", index=False)
    good_only = tmp_path / "good.jsonl"
    good_only.write_text("".join(json.dumps(r) + "\n" for r in _valid_lines(tmp_path / "out.jsonl")
                                 if r.get("caption")))
    assert evaluate_captions.main([str(good_only), "--references", str(tmp_path / "refs.csv"),
                                   "--out", str(tmp_path / "m.json")]) == 0
    assert "cider_d" in json.loads((tmp_path / "m.json").read_text())["scores"]


def _valid_lines(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
