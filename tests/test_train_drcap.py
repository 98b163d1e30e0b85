"""Text-only DRCap training with tiny models: it learns, it checkpoints, it resumes, and the captioner loads it."""
from __future__ import annotations

import json

import pytest
import torch

from engine.captioner import Captioner
from engine.config import AppConfig, DrcapTrainConfig
from engine.datastore import CaptionDatastore
from tests.helpers import small_caption_set
from trainers import train_drcap


def models(tiny_clap_dir, tiny_llama_dir, cache) -> AppConfig:
    config = AppConfig(cache_dir=str(cache))
    config.clap.model, config.clap.device = str(tiny_clap_dir), "cpu"
    config.llm.model, config.llm.dtype = str(tiny_llama_dir), "fp32"
    return config


def tiny_run(tmp_path, name: str, **overrides) -> DrcapTrainConfig:
    captions = tmp_path / "captions.txt"
    if not captions.exists():
        captions.write_text("\n".join(small_caption_set(40)) + "\n")
    settings = dict(train=str(captions), out=str(tmp_path / name), use_peft=False, freeze_llm=False, lr=2e-3,
                    warmup_steps=10, total_steps=240, epochs=100, batch_size=8, val_every=80, val_fraction=0.1,
                    mapping_hidden=128, band_low=0.5, band_high=0.99, seed=7)
    settings.update(overrides)
    return DrcapTrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clap_dir, tiny_llama_dir):
    root = tmp_path_factory.mktemp("train")
    app = models(tiny_clap_dir, tiny_llama_dir, root / "cache")
    cfg = tiny_run(root, "run")
    return root, app, cfg, train_drcap.train(app, cfg, show_progress=False)


def test_loss_goes_down_and_checkpoints_are_written(trained):
    root, _, cfg, result = trained
    history = result.summary["history"]
    assert [h["step"] for h in history] == [80, 160, 240]
    assert history[-1]["train_loss"] < 0.25 * history[0]["train_loss"]
    best_step = min(history, key=lambda h: h["val_loss"])["step"]  # 36 captions: it may overfit, best keeps the min
    assert json.loads((root / "run" / "best" / "drcap_config.json").read_text())["training"]["step"] == best_step
    for name in ("best", "last"):
        folder = root / "run" / name
        assert (folder / "model.safetensors").is_file() and (folder / "llm" / "config.json").is_file()
    meta = json.loads((root / "run" / "last" / "drcap_config.json").read_text())
    assert meta["format"] == "audioscribe-drcap" and meta["training"]["step"] == 240
    assert meta["layout"] == {"use_rag": True, "rag_first": True, "instruction": "Describe the audio you hear."}
    assert json.loads((root / "run" / "history.json").read_text())["steps"] == 240


def test_trained_model_regenerates_held_in_captions(trained, tiny_clap):
    _, _, _, result = trained
    model = result.model.eval()
    records = result.train_records[:16]
    embeddings = tiny_clap.embed_text([r["text"] for r in records])
    generated = model.generate(embeddings, [r["similar_captions"] for r in records], num_beams=1, max_new_tokens=40)
    exact = sum(g == r["target"] for g, r in zip(generated, records))
    assert exact >= 12, list(zip(generated, [r["target"] for r in records]))


def test_checkpoint_reloads_into_the_captioner_with_identical_text(trained, tiny_clap):
    root, app, _, result = trained
    app.caption.checkpoint = str(root / "run" / "last")
    app.caption.num_beams, app.caption.max_new_tokens = 2, 30
    store = CaptionDatastore.build(small_caption_set(40), tiny_clap, show_progress=False)
    captioner = Captioner.from_config(app, tiny_clap, store)
    assert captioner.trained and not captioner.llm.is_untrained
    assert captioner.model.layout.rag_first
    records = result.train_records[:4]
    embeddings = tiny_clap.embed_text([r["text"] for r in records])
    similar = [r["similar_captions"] for r in records]
    in_memory = result.model.eval().generate(embeddings, similar, num_beams=2, max_new_tokens=30)
    assert captioner.model.generate(embeddings, similar, num_beams=2, max_new_tokens=30) == in_memory
    again = Captioner.from_config(app, tiny_clap, store)
    assert again.model.generate(embeddings, similar, num_beams=2, max_new_tokens=30) == in_memory


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_clap_dir, tiny_llama_dir):
    app = models(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")
    common = dict(total_steps=30, val_every=10, warmup_steps=5)
    whole = train_drcap.train(app, tiny_run(tmp_path, "whole", **common), show_progress=False)
    first = train_drcap.train(app, tiny_run(tmp_path, "split", stop_after=14, **common), show_progress=False)
    assert first.summary["stopped_early"] and first.summary["steps"] == 14
    resumed = train_drcap.train(app, tiny_run(tmp_path, "split", resume=True, **common), show_progress=False)
    assert resumed.summary["steps"] == 30
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_training_only_touches_adapters(tmp_path, tiny_clap_dir, tiny_llama_dir):
    app = models(tiny_clap_dir, tiny_llama_dir, tmp_path / "cache")
    cfg = tiny_run(tmp_path, "lora", use_peft=True, freeze_llm=True, total_steps=20, val_every=10, lr=1e-2)
    result = train_drcap.train(app, cfg, show_progress=False)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder_projector.") or ".lora_" in n for n in trainable)
    assert not (tmp_path / "lora" / "last" / "llm").exists()  # the base LLM is unchanged: not saved
    meta = json.loads((tmp_path / "lora" / "last" / "drcap_config.json").read_text())
    assert meta["lora"]["lora_r"] == 8 and meta["lora"]["lora_targets"] == ["q_proj", "v_proj"]
    history = result.summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as done:
        train_drcap.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--use-peft", "--freeze-llm", "--use-rag", "--rag-first", "--noise-std", "--grad-accum",
                 "--val-every", "--resume", "accelerate launch"):
        assert flag in text
    assert train_drcap.main(["--lr", "fast"]) == 2
    assert "lr (from command line) must be a number" in capsys.readouterr().err
