"""Scale-out: each rank's device, mixed precision from the LLM's dtype, batch captioning sharded over ranks (resumable,
merged in input order) and DDP training, with 2 CPU processes on gloo."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from engine.clap.base import resolve_device
from engine.config import AppConfig, DrcapTrainConfig
from engine.datastore import read_jsonl_records
from engine.distributed import RankInfo, device_for_rank, rank_info, shard
from engine.errors import ConfigError
from engine.llm import _cuda_index
from tests.helpers import noise_clip, small_caption_set
from tests.test_drcap_cli import model_flags
from tests.test_train_drcap import models, tiny_run
from trainers import batch_caption, train_drcap
from trainers.train_drcap import mixed_precision_for

RANK1_OF_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


# --------------------------------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("device, env, gpus, expected", [
    ("auto", {}, 0, "cpu"),
    ("auto", {}, 2, "cuda"),
    ("cuda", {}, 2, "cuda"),
    ("auto", RANK1_OF_2, 2, "cuda:1"),  # under a launcher: this rank's own GPU, not cuda:0 for everyone
    ("cuda", RANK1_OF_2, 2, "cuda:1"),
    ("cuda:0", RANK1_OF_2, 2, "cuda:0"),  # explicit: as written
    ("cpu", RANK1_OF_2, 2, "cpu"),
    ("auto", RANK1_OF_2, 0, "cpu"),  # CPU ranks (gloo)
    ("auto", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 2, "cuda:1"),  # more ranks than GPUs: wrap
    ("auto", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, 1, "cuda:0"),  # one visible GPU per process
])
def test_device_for_rank(device, env, gpus, expected):
    assert device_for_rank(device, env, gpus) == torch.device(expected)


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "no usable CUDA"), ("cuda:1", 0, "no usable CUDA"), ("cuda:2", 2, "has 2 CUDA device"),
    ("gpu please", 1, "Unknown device"),
])
def test_device_for_rank_errors(device, gpus, message):
    with pytest.raises(ConfigError, match=message):
        device_for_rank(device, RANK1_OF_2, gpus)


def test_rank_info_from_the_launcher_environment():
    assert rank_info({}) == RankInfo(0, 1, 0) and not rank_info({}).distributed
    info = rank_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert info == RankInfo(3, 4, 1) and info.distributed and not info.is_main
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x"}):
        with pytest.raises(ConfigError):
            rank_info(bad)


def test_clap_and_llm_devices_follow_local_rank(monkeypatch):
    """resolve_device (every CLAP backend and load_llm) reads the launcher's environment; a quantized LLM is placed
    on the resolved GPU's index."""
    monkeypatch.setattr("engine.clap.base.cuda_device_count", lambda: 2)
    for name, value in RANK1_OF_2.items():
        monkeypatch.setenv(name, value)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert _cuda_index(resolve_device("auto")) == 1


def test_shard_takes_every_world_size_th_item():
    items = list(range(7))
    shares = [shard(items, RankInfo(r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


# --------------------------------------------------------------------------------------------------------------------
# mixed precision


@pytest.mark.parametrize("setting, dtype, device, trains_llm, expected", [
    ("auto", torch.bfloat16, "cuda", False, "bf16"),  # nf4 / bf16 LLM: bf16 autocast, no loss scaling
    ("auto", torch.float16, "cuda", False, "fp16"),  # fp16 LLM: fp16 autocast + GradScaler
    ("auto", torch.float32, "cuda", False, "no"),
    ("auto", torch.float32, "cpu", True, "no"),
    ("auto", torch.bfloat16, "cpu", True, "bf16"),
    ("fp16", torch.float32, "cuda", True, "fp16"),  # classic mixed precision over fp32 weights
    ("bf16", torch.float32, "cpu", False, "bf16"),
    ("no", torch.bfloat16, "cuda", False, "no"),
    ("bf16", torch.bfloat16, "cuda", True, "bf16"),
])
def test_mixed_precision_matches_the_llm_dtype(setting, dtype, device, trains_llm, expected):
    assert mixed_precision_for(setting, dtype, device, trains_llm) == expected


@pytest.mark.parametrize("setting, dtype, device, trains_llm, message", [
    ("fp16", torch.bfloat16, "cuda", False, "does not match the LLM's bf16"),  # the old default over a bf16 LLM
    ("bf16", torch.float16, "cuda", False, "does not match the LLM's fp16"),
    ("auto", torch.float16, "cpu", False, "needs a CUDA device"),
    ("fp16", torch.float32, "cpu", False, "needs a CUDA device"),
    ("auto", torch.float16, "cuda", True, "cannot unscale fp16 gradients"),
    ("fp8", torch.float32, "cuda", False, "must be auto, fp16, bf16 or no"),
])
def test_mixed_precision_mismatches_are_config_errors(setting, dtype, device, trains_llm, message):
    with pytest.raises(ConfigError, match=message):
        mixed_precision_for(setting, dtype, device, trains_llm)


# --------------------------------------------------------------------------------------------------------------------
# two gloo ranks (torch.multiprocessing spawn; each child imports this module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_as_rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(
        world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine


def _batch_caption_rank(rank: int, world_size: int, port: int, argv: list[str], report_dir: str) -> None:
    """One rank of ``python -m trainers.batch_caption``; records the files this rank decoded and what it printed."""
    _join_as_rank(rank, world_size, port)
    from engine.service import AudioScribe

    loaded: list[str] = []
    load = AudioScribe.load

    def spy(self, source):
        loaded.append(str(source))
        return load(self, source)

    AudioScribe.load = spy
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = batch_caption.main(argv)
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "loaded": loaded,
                                                                "printed": printed.getvalue()}))


def _comparable(record: dict) -> dict:
    """Everything but the timings (which differ run to run); cosines to 3 decimals (threads may change the last)."""
    out = {k: v for k, v in record.items() if k != "timings_ms"}
    for field in ("retrieved", "support_top"):
        if field in out:
            out[field] = [[c, round(s, 3)] for c, s in out[field]]
    return out


def test_batch_caption_on_two_ranks_resumes_and_merges_like_one_process(tmp_path, tiny_clap_dir, tiny_llama_dir,
                                                                         capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, seconds in enumerate([2.0, 3.0, 12.0, 2.0, 4.0]):
        sf.write(folder / f"clip{i}.wav", noise_clip(seconds, 16_000, seed=i), 16_000)
    (folder / "zz_broken.wav").write_bytes(b"not audio at all")
    (tmp_path / "captions.txt").write_text("\n".join(small_caption_set(100)) + "\n")

    def flags(out):
        return [str(folder), "--out", str(out), "--quiet", "--batch-size", "1",
                "--set", f"datastore.sources={tmp_path / 'captions.txt'}",
                *model_flags(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")]

    assert batch_caption.main(flags(tmp_path / "single.jsonl")) == 1  # one process: the reference
    capsys.readouterr()
    single = read_jsonl_records(tmp_path / "single.jsonl")
    assert [r["key"] for r in single] == ["clip0.wav", "clip1.wav", "clip2.wav", "clip3.wav", "clip4.wav",
                                          "zz_broken.wav"]
    # A two-rank run that was killed: clip0 was merged into the output earlier, rank 0 had finished clip3 and rank 1
    # clip1 and was cut in the middle of its next line.
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(single[0]) + "\n")
    parts = batch_caption.parts_dir(out)
    parts.mkdir()
    batch_caption.part_file(out, 0).write_text(json.dumps(single[3]) + "\n")
    batch_caption.part_file(out, 1).write_text(json.dumps(single[1]) + "\n" + json.dumps(single[2])[:50])

    reports = tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_batch_caption_rank, args=(2, _free_port(), flags(out), str(reports)), nprocs=2, join=True)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    names = [[Path(source).name for source in report["loaded"]] for report in ranks]
    # Finished files are not redone; what is left (clip2, clip4, zz_broken) is dealt out rank by rank.
    assert names == [["clip2.wav", "zz_broken.wav"], ["clip4.wav"]]
    assert [report["code"] for report in ranks] == [1, 1]  # both ranks report the run's error
    summary = json.loads(ranks[0]["printed"].strip().splitlines()[-1])
    assert ranks[1]["printed"] == ""  # rank 0 speaks for the run
    assert summary == {**summary, "inputs": 6, "skipped_already_done": 3, "captioned": 2, "errors": 1,
                       "ranks": [{"rank": 0, "captioned": 1, "errors": 1}, {"rank": 1, "captioned": 1, "errors": 0}]}
    merged = read_jsonl_records(out)
    assert [_comparable(r) for r in merged] == [_comparable(r) for r in single]  # same captions, same order
    assert merged[:2] == single[:2] and merged[3] == single[3]  # the earlier results kept as they were
    assert not parts.exists()


def test_a_merge_killed_after_replacing_the_output_is_not_repeated(tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    items = [{"key": k, "source": f"/a/{k}"} for k in ("a", "b", "c")]
    batch_caption.parts_dir(out).mkdir()
    batch_caption.part_file(out, 1).write_text(
        json.dumps({"key": "c", "source": "/a/c", "error": "DecodeError: no"}) + "\n"
        + json.dumps({"key": "b", "source": "/a/b", "caption": "a dog barks", "retrieved": [["dog", 0.5]]}) + "\n")
    batch_caption.part_file(out, 0).write_text(
        json.dumps({"key": "c", "source": "/a/c", "caption": "rain", "retrieved": []}) + "\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(batch_caption.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            batch_caption.merge_parts(out, items)
    assert batch_caption.part_files(out)  # the parts are still there ...
    assert batch_caption.merge_parts(out, items) == 0  # ... but already in the output: not added twice
    assert not batch_caption.parts_dir(out).exists()
    rows = out.read_text().splitlines()
    # One row per file in input order; c's later success replaces its earlier error.
    assert rows == ["key,source,caption,retrieved,windows,duration_s,error", "b,/a/b,a dog barks,dog,[],,",
                    "c,/a/c,rain,,[],,"]
    assert batch_caption.done_keys(out) == {"b", "c"}


def _train_rank(rank: int, world_size: int, port: int, app: AppConfig, cfg: DrcapTrainConfig, report: str) -> None:
    """One DDP rank of train_drcap; records the checkpoints it wrote, its first batch and its trained weights."""
    _join_as_rank(rank, world_size, port)
    import accelerate

    saves: list[str] = []
    batches: list[list[str]] = []
    accelerators = []
    initial: dict[str, torch.Tensor] = {}
    save, collate, set_trainable = train_drcap.save_training_checkpoint, train_drcap.collate, train_drcap.set_trainable

    def spy_save(directory, *args, **kwargs):
        saves.append(Path(directory).name)
        return save(directory, *args, **kwargs)

    def spy_collate(items):
        batch = collate(items)
        batches.append(batch[2])
        return batch

    def spy_set_trainable(model, cfg):
        set_trainable(model, cfg)
        initial.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    class SpyAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accelerators.append(self)

    train_drcap.save_training_checkpoint, train_drcap.collate = spy_save, spy_collate
    train_drcap.set_trainable = spy_set_trainable
    accelerate.Accelerator = SpyAccelerator
    result = train_drcap.train(app, cfg, show_progress=False)
    accelerator = accelerators[0]
    torch.save({"saves": saves, "first_batch": batches[0], "history": result.summary["history"], "mixed": accelerator.mixed_precision,
                "scaler": accelerator.scaler is not None, "processes": accelerator.num_processes, "initial": initial,
                "weights": {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}},
               Path(report, f"rank{rank}.pt"))


def test_train_drcap_ddp_on_two_gloo_ranks(tmp_path, tiny_clap_dir, tiny_llama_dir):
    app = models(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")
    app.llm.dtype = "bf16"  # mixed precision follows it: bf16 autocast, no GradScaler
    # The mapping network only (no peft: importing it costs each process seconds).
    cfg = tiny_run(tmp_path, "ddp", use_peft=False, freeze_llm=True, total_steps=4, val_every=2, warmup_steps=1,
                   batch_size=4, lr=1e-2)
    mp.spawn(_train_rank, args=(2, _free_port(), app, cfg, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert [(r["mixed"], r["scaler"]) for r in ranks] == [("bf16", False)] * 2
    assert not set(ranks[0]["first_batch"]) & set(ranks[1]["first_batch"])  # each rank trains on its own share
    zero, one = ranks[0]["weights"], ranks[1]["weights"]
    assert set(zero) == set(one) == {"encoder_projector.linear1.weight", "encoder_projector.linear1.bias",
                                     "encoder_projector.linear2.weight", "encoder_projector.linear2.bias"}
    for name in zero:  # gradients were averaged over the ranks: both hold the same weights after the steps
        assert torch.equal(zero[name], one[name]), name
        assert not torch.equal(zero[name], ranks[0]["initial"][name]), name  # ... and they did change
    # The LR schedule counts optimizer steps, as in one process (not one step per rank: 0 by step 2 of 4).
    assert [h["lr"] for h in ranks[0]["history"]] == pytest.approx([1e-2 * 2 / 3, 0.0])
    # train loss: the mean over the ranks (validation is gathered from both); seconds are each rank's own clock
    histories = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in ranks]
    assert histories[0] == histories[1]
    assert ranks[0]["saves"][:2] == ["last", "best"] and ranks[1]["saves"] == []  # only rank 0 writes checkpoints
    saved = load_file(tmp_path / "ddp" / "last" / "model.safetensors")
    for name in zero:
        assert torch.equal(saved[name], zero[name]), name
