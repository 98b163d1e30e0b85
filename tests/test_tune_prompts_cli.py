"""Prompt tuning end to end: through the service (datastore captions) and the tune_prompts command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from engine.config import AppConfig
from engine.prompt_tuning import TunedPrompts
from engine.service import AudioScribe
from tests.helpers import SHARED_DATA, noise_clip, small_caption_set
from trainers import tune_prompts


@pytest.fixture(scope="module")
def scribe(tmp_path_factory, tiny_clap_dir) -> AudioScribe:
    root = tmp_path_factory.mktemp("tuning")
    (root / "captions.txt").write_text("\n".join(small_caption_set(3000)) + "\n")
    config = AppConfig(cache_dir=str(root / "cache"))
    config.clap.model, config.clap.device = str(tiny_clap_dir), "cpu"
    config.datastore.sources = [str(root / "captions.txt")]
    config.caption.enabled = False
    t = config.tuning
    t.prompt_len, t.epochs, t.min_texts_per_class, t.max_texts_per_class = 4, 2, 8, 24
    return AudioScribe.from_config(config, show_progress=False)


def test_service_tunes_on_datastore_captions(scribe):
    steps = []
    prompts = scribe.tune_prompts(["dog", "rain", "siren"], progress=lambda f, m: steps.append(f))
    assert isinstance(prompts, TunedPrompts) and prompts.class_names == ["dog", "rain", "siren"]
    assert steps[-1] == pytest.approx(1.0) and steps == sorted(steps)
    assert "dog" in prompts.report["selection"]
    assert all(8 <= n <= 24 for n in prompts.report["texts_per_class"])
    result = scribe.classify_tuned(scribe.load((48_000, noise_clip(3.0))), prompts)
    assert set(result.scores) == {"coarse", "fine", "combined"}
    assert result.scores["combined"].sum() == pytest.approx(1.0, abs=1e-5)


def write_labelled_folder(root, classes, per_class=2):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            sf.write(root / name / f"{k}.wav", noise_clip(2.0, 16_000, seed=10 * c + k), 16_000)


def cli_flags(scribe, *extra):
    cfg = scribe.config
    # The tiny profile: the default one runs the demo bundle's CLAP, a different backend from the tiny HF CLAP here.
    return ["--profile", "tiny", "--set", f"clap.model={cfg.clap.model}", "--set", "clap.device=cpu",
            "--set", f"datastore.sources={cfg.datastore.sources[0]}", "--set", f"cache_dir={cfg.cache_dir}",
            "--set", "tuning.prompt_len=4", "--set", "tuning.epochs=1", "--set", "tuning.min_texts_per_class=8",
            "--set", "tuning.max_texts_per_class=16", "--quiet", *extra]


def test_cli_tunes_and_evaluates_on_a_labelled_folder(scribe, tmp_path, capsys):
    write_labelled_folder(tmp_path / "clips", ["dog", "rain", "siren"])
    code = tune_prompts.main(["--classes", "dog, rain, siren", "--eval", str(tmp_path / "clips"), "--seeds", "0,1",
                              "--out", str(tmp_path / "out"), *cli_flags(scribe)])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["seed"] for r in results["seeds"]] == [0, 1] and results["metric"] == "accuracy"
    for row in results["seeds"]:
        assert 0 <= row["all_zero_shot"] <= 1 and 0 <= row["all_tuned"] <= 1
    assert results["summary"]["all_tuned"]["mean"] == pytest.approx(
        np.mean([r["all_tuned"] for r in results["seeds"]]))
    assert (tmp_path / "out" / "seed1" / "prompts.safetensors").is_file()
    assert "all_tuned" in capsys.readouterr().out


def test_cli_base_to_new_split(scribe, tmp_path):
    classes = ["dog", "rain", "siren", "bell"]
    write_labelled_folder(tmp_path / "clips", classes)
    assert tune_prompts.main(["--classes", ",".join(classes), "--eval", str(tmp_path / "clips"), "--base-to-new",
                              "--out", str(tmp_path / "out"), *cli_flags(scribe)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["base"] == ["dog", "rain"] and results["new"] == ["siren", "bell"]
    row = results["seeds"][0]
    for key in ("base_zero_shot", "base_tuned", "new_zero_shot", "new_tuned", "harmonic_tuned"):
        assert 0 <= row[key] <= 1
    prompts = TunedPrompts.load(tmp_path / "out" / "seed0")
    assert prompts.class_names == ["dog", "rain"]  # tuned on the base half only


def test_cli_trains_on_an_afpt_corpus(scribe, tmp_path, capsys):
    corpus = SHARED_DATA / "afpt" / "cap_urbansound8k.csv"
    if not corpus.is_file():
        pytest.skip("the AFPT corpora are not beside this checkout")
    assert tune_prompts.main(["--corpus", str(corpus), "--label-set", "urbansound8k", "--out", str(tmp_path / "o"),
                              *cli_flags(scribe)]) == 0
    prompts = TunedPrompts.load(tmp_path / "o" / "seed0")
    assert len(prompts.class_names) == 10 and prompts.class_names[0] == "air conditioner"
    assert sum(prompts.report["texts_per_class"]) == prompts.report["texts"] == 1512


def test_cli_preset_reference_and_explicit_settings_win(scribe, tmp_path, capsys):
    """--preset reference sets AFPT's code values; every explicit --set (and cli_flags' prompt_len/epochs) wins."""
    assert tune_prompts.main(["--classes", "dog, rain", "--preset", "reference", "--set",
                              "tuning.double_embedding=false", "--out", str(tmp_path / "out"), *cli_flags(scribe)]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["preset"] == "reference"
    config = TunedPrompts.load(tmp_path / "out" / "seed0").config
    assert config.preset == "reference" and config.mask_padding is False and config.train_dropout is True
    assert config.pad_captions_to_max and config.caption_tokens_fp32 and config.caption_max_tokens == 100
    assert config.double_embedding is False  # explicit --set beats the preset
    assert (config.prompt_len, config.epochs) == (4, 1)  # so do cli_flags' values (the preset has 32 and 10)
    with pytest.raises(SystemExit):
        tune_prompts.main(["--classes", "dog", "--preset", "paper", *cli_flags(scribe)])
    assert "invalid choice: 'paper'" in capsys.readouterr().err


def test_cli_errors(scribe, tmp_path, capsys):
    assert tune_prompts.main([*cli_flags(scribe)]) == 2
    assert "Give class names" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("path,label\nx.wav,unicorn\n")
    assert tune_prompts.main(["--classes", "dog", "--eval", str(tmp_path / "bad.csv"), *cli_flags(scribe)]) == 2
    assert "not among the class names" in capsys.readouterr().err


def test_class_embeddings_are_computed_once_per_prompt_set(scribe, monkeypatch):
    import engine.service as service_module

    prompts = scribe.tune_prompts(["dog", "rain"])
    built = []
    original = service_module.PromptedClassifier

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(service_module, "PromptedClassifier", counting)
    audio = scribe.load((48_000, noise_clip(2.0)))
    first = scribe.classify_tuned(audio, prompts).scores["combined"]
    second = scribe.classify_tuned(audio, prompts).scores["combined"]
    np.testing.assert_array_equal(first, second)
    assert len(built) == 1
