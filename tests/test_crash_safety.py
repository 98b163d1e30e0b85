"""Crash safety: a process killed (SIGKILL) at any point while it writes a datastore, tuned prompts or a training
checkpoint leaves the old version or the new one, never a mix, and the same command run again succeeds.

Each write is killed at 24 seeded points spread over every line the engine executes while writing (tests/crash.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.config import PromptTuningConfig
from engine.datastore import CaptionDatastore, is_datastore
from engine.errors import DatastoreError
from engine.prompt_tuning import TunedPrompts
from tests.crash import kill_points, run_until
from tests.helpers import small_caption_set
from trainers import build_datastore

KILLS = 24  # kill points per write (the issue asks for at least 20)
ATOMIC = ("engine/atomic.py", None)
STORE_WRITE = [ATOMIC, ("engine/datastore.py", frozenset({"save", "write"}))]
PROMPT_WRITE = [ATOMIC, ("engine/prompt_tuning.py", frozenset({"save", "metadata"}))]
CHECKPOINT_WRITE = [ATOMIC, ("trainers/train_drcap.py", frozenset({"save_training_checkpoint", "write"})),
                    ("engine/drcap.py", frozenset({"write_checkpoint"}))]


# --- the operations a child runs (module level, so the fork server can import them) ---------------------------------


def build_store(out: str, captions: list[str], clap_dir: str, append: bool) -> None:
    code = build_datastore.main(["--profile", "tiny", "--clap", clap_dir, "--device", "cpu", "--quiet", "--out", out,
                                 *(["--append"] if append else []), *captions])
    assert code == 0


def save_prompts(directory: str, class_names: list[str], seed: int) -> None:
    prompts_for(class_names, seed).save(directory)


def save_checkpoint(directory: str, clap_dir: str, llm_dir: str, seed: int) -> None:
    from trainers.train_drcap import save_training_checkpoint

    model, meta = drcap_model(clap_dir, llm_dir, seed)
    save_training_checkpoint(Path(directory), model, meta, {"step": seed}, full_model=False)


# --- helpers ------------------------------------------------------------------------------------------------------


def prompts_for(class_names: list[str], seed: int) -> TunedPrompts:
    generator = torch.Generator().manual_seed(seed)
    config = PromptTuningConfig(prompt_len=3)
    return TunedPrompts(class_names, torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator),
                        config, "clap", "fingerprint", {"seed": seed})


def drcap_model(clap_dir: str, llm_dir: str, seed: int):
    from engine.captioner import build_model
    from engine.clap.hf import HFClapBackend
    from engine.config import AppConfig
    from engine.llm import load_llm

    config = AppConfig()
    config.clap.model, config.clap.device, config.llm.model = clap_dir, "cpu", llm_dir
    clap = HFClapBackend.from_pretrained(clap_dir, device="cpu")
    model = build_model(load_llm(config.llm), clap, config, checkpoint=None, trainable=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in model.adapter_names():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    meta = {"clap": {"name": clap.name, "fingerprint": clap.fingerprint, "embedding_dim": clap.embedding_dim},
            "training": {"step": seed}}
    return model, meta


def kill_at_every_point(operation, args: tuple, traced, seed: int, check) -> list[int]:
    """Run once to count the traced lines, then kill a fresh run at KILLS points and ``check`` after each."""
    code, total = run_until(operation, args(0), traced)
    assert code == 0 and total > KILLS, (code, total)
    points = kill_points(total, KILLS, seed)
    assert len(points) == KILLS
    for number, point in enumerate(points, 1):
        code, _ = run_until(operation, args(number), traced, kill_at=point)
        assert code == -9, f"the child was not killed at line {point} of {total}"
        check(number, point)
    return points


# --- tests --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("captions")
    captions = small_caption_set(160)
    (root / "first.txt").write_text("\n".join(captions[:100]) + "\n")
    (root / "more.txt").write_text("\n".join(captions[80:]) + "\n")
    return str(root / "first.txt"), str(root / "more.txt")


def test_a_killed_first_build_leaves_no_store_or_the_whole_store(tmp_path, tiny_clap, tiny_clap_dir, caption_files):
    first, _ = caption_files
    expected = CaptionDatastore.from_files([first], tiny_clap, show_progress=False).captions

    def check(number: int, point: int) -> None:
        out = tmp_path / f"s{number}"
        if is_datastore(out):
            assert CaptionDatastore.load(out, tiny_clap).captions == expected, point
        else:
            with pytest.raises(DatastoreError, match="is not a datastore"):
                CaptionDatastore.load(out, tiny_clap)
        build_store(str(out), [first], str(tiny_clap_dir), append=is_datastore(out))  # the rerun succeeds
        assert CaptionDatastore.load(out, tiny_clap).captions == expected

    kill_at_every_point(build_store, lambda n: (str(tmp_path / f"s{n}"), [first], str(tiny_clap_dir), False),
                        STORE_WRITE, seed=1, check=check)


def test_a_killed_append_leaves_the_old_store_or_the_new_one(tmp_path, tiny_clap, tiny_clap_dir, caption_files):
    first, more = caption_files
    base = tmp_path / "base"
    build_store(str(base), [first], str(tiny_clap_dir), append=False)
    old = CaptionDatastore.load(base, tiny_clap).captions
    new = CaptionDatastore.from_files([first, more], tiny_clap, show_progress=False).captions
    assert len(new) > len(old)

    def prepare(number: int) -> tuple:
        shutil.copytree(base, tmp_path / f"a{number}")
        return str(tmp_path / f"a{number}"), [more], str(tiny_clap_dir), True

    seen = set()

    def check(number: int, point: int) -> None:
        out = tmp_path / f"a{number}"
        captions = CaptionDatastore.load(out, tiny_clap).captions  # loads, consistent, as one of the two versions
        assert captions in (old, new), point
        seen.add(len(captions))
        if captions == old:
            build_store(str(out), [more], str(tiny_clap_dir), append=True)  # the rerun succeeds
        assert CaptionDatastore.load(out, tiny_clap).captions == new
        leftovers = sorted(p.name for p in out.iterdir())
        assert leftovers == [".lock", "manifest.json", CaptionDatastore.load(out).manifest.data], leftovers

    kill_at_every_point(build_store, prepare, STORE_WRITE, seed=2, check=check)
    assert seen == {len(old), len(new)}  # some kills came before the commit, some after


def test_a_killed_prompt_save_never_pairs_tensors_with_other_class_names(tmp_path):
    old, new = prompts_for(["dog", "rain"], 1), prompts_for(["siren", "engine"], 2)

    def prepare(number: int) -> tuple:
        old.save(tmp_path / f"p{number}")
        return str(tmp_path / f"p{number}"), new.class_names, 2

    def check(number: int, point: int) -> None:
        loaded = TunedPrompts.load(tmp_path / f"p{number}")
        expected = old if loaded.class_names == old.class_names else new
        assert loaded.class_names == expected.class_names, point
        assert torch.equal(loaded.coarse, expected.coarse) and torch.equal(loaded.fine, expected.fine), point
        new.save(tmp_path / f"p{number}")
        assert TunedPrompts.load(tmp_path / f"p{number}").class_names == new.class_names

    kill_at_every_point(save_prompts, prepare, PROMPT_WRITE, seed=3, check=check)


def test_a_killed_checkpoint_save_keeps_weights_and_state_of_one_step(tmp_path, tiny_clap_dir, tiny_llama_dir):
    from engine.drcap import read_checkpoint
    from trainers.train_drcap import STATE_FILE

    weights = {seed: {k: v.detach().clone() for k, v in drcap_model(str(tiny_clap_dir), str(tiny_llama_dir), seed)[0]
                      .named_parameters() if ".lora_" in k or "encoder_projector" in k} for seed in (1, 2)}
    base = tmp_path / "base"
    save_checkpoint(str(base / "last"), str(tiny_clap_dir), str(tiny_llama_dir), 1)

    def prepare(number: int) -> tuple:
        shutil.copytree(base, tmp_path / f"c{number}", symlinks=True)
        return str(tmp_path / f"c{number}" / "last"), str(tiny_clap_dir), str(tiny_llama_dir), 2

    def check(number: int, point: int) -> None:
        last = tmp_path / f"c{number}" / "last"
        info = read_checkpoint(last)
        step = info.meta["training"]["step"]
        assert torch.load(last / STATE_FILE, weights_only=True)["step"] == step, point
        for name, value in weights[step].items():
            assert torch.equal(info.weights[name], value), (point, name)
        save_checkpoint(str(last), str(tiny_clap_dir), str(tiny_llama_dir), 2)  # the rerun succeeds
        assert read_checkpoint(last).meta["training"]["step"] == 2

    kill_at_every_point(save_checkpoint, prepare, CHECKPOINT_WRITE, seed=4, check=check)
