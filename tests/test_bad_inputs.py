"""Every path a user can give gets the project's typed error, naming the file and saying what is wrong (issue 8,
faults 5 and 6): the projection support, HF CLAP and LLM folders, the released-checkpoint loaders, DRCap decoder
checkpoints, the app's start-up, and prompt templates.

Each damaged input is made from a real tiny model (or file) and then corrupted, so the loaders see what a user's
disk would hold. Files with a pickled payload carry one that would create a marker file if it ever ran.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.captioner import build_model, load_support
from engine.classifier import build_zero_shot_classifier, check_templates
from engine.clap.demo import CONFIG_FILE as DEMO_CONFIG, DemoClapBackend, build_random_demo_clap
from engine.clap.drcap import DrcapClapBackend
from engine.clap.hf import HFClapBackend
from engine.clap.msclap import MsClapBackend
from engine.config import AppConfig, LLMConfig
from engine.drcap import read_checkpoint
from engine.errors import ClassifierInputError, DatastoreError, ModelLoadError
from engine.llm import load_llm
from engine.service import AudioScribe
from tests.helpers import PROJECT_ROOT

# torch's own error advises re-running torch.load with weights_only=False, i.e. running the file's code: never shown
UNSAFE_ADVICE = "weights_only"


def at(path: Path) -> str:
    """``path`` as a regex that matches it literally."""
    return re.escape(str(path))


@contextmanager
def raises_exactly(error: type[Exception], match: str) -> Iterator[pytest.ExceptionInfo]:
    """``pytest.raises`` that also refuses subclasses: the error's type is part of what the user (and app) get."""
    with pytest.raises(error, match=match) as info:
        yield info
    assert type(info.value) is error


def touch(path: str) -> None:
    """What the pickled payloads below would run: create ``path``."""
    Path(path).touch()


class Payload:
    """Unpickling this calls ``touch(marker)``: a harmless stand-in for a malicious object in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return touch, (str(self.marker),)


def save_with_payload(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A torch.save zip checkpoint whose tensors sit beside a pickled payload; the marker sits beside the file."""
    torch.save({**tensors, "payload": Payload(path.parent / "payload-ran")}, path)
    return path


def assert_payload_never_ran(path: Path) -> None:
    assert not (path.parent / "payload-ran").exists()


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# --------------------------------------------------------------------------------------------------------------------
# caption.support (engine/captioner.py)


def _support_cases(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, regex its DatastoreError must match after the path)."""
    cases: dict[str, tuple[Path, str]] = {"missing": (d / "nope.pt", r" \(caption.support\) does not exist")}
    (d / "empty.pt").write_bytes(b"")
    cases["empty"] = (d / "empty.pt", r" with torch.load \(EOFError: the file is empty or ends early\)")
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(512))
    cases["garbage bytes"] = (d / "garbage.pt", r"( with torch.load \(|: it is not a tensors-only torch checkpoint)")
    (d / "captions.txt").write_text("a dog barks\n\n")
    cases["text file"] = (d / "captions.txt", r" with torch.load \(")
    np.save(d / "support.npy", np.ones((4, 32), np.float32))
    cases["numpy file"] = (d / "support.npy", r": it is not a tensors-only torch checkpoint .*Unsupported operand")
    torch.save(torch.ones(4, 32), d / "whole.pt")
    shutil.copy(d / "whole.pt", d / "truncated.pt")
    truncate(d / "truncated.pt")
    cases["truncated zip"] = (d / "truncated.pt", r" with torch.load \(RuntimeError: PytorchStreamReader failed")
    (d / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    cases["damaged safetensors"] = (d / "bad.safetensors", r": it is not a readable safetensors file")
    save_file({"a": torch.ones(2, 32), "b": torch.ones(2, 32)}, str(d / "two.safetensors"))
    cases["two tensors"] = (d / "two.safetensors", r" must hold exactly one \[N, D\] tensor, found \['a', 'b'\]")
    torch.save(torch.ones(32), d / "vector.pt")
    cases["1-d"] = (d / "vector.pt", r" must be an \[N, 32\] tensor for .*, got \(32,\)")
    torch.save(torch.ones(4, 16), d / "narrow.pt")
    cases["wrong width"] = (d / "narrow.pt", r" must be an \[N, 32\] tensor for .*, got \(4, 16\)")
    torch.save({"support": torch.ones(4, 32)}, d / "dict.pt")
    cases["dict"] = (d / "dict.pt", r" must be an \[N, 32\] tensor for .*, got dict")
    torch.save(torch.ones(0, 32), d / "no_rows.pt")
    cases["no rows"] = (d / "no_rows.pt", r" holds no rows")
    torch.save(torch.full((3, 32), float("nan")), d / "nan.pt")
    cases["NaN"] = (d / "nan.pt", r" holds NaN or infinite values")
    torch.save(torch.cat([torch.ones(2, 32), torch.zeros(1, 32)]), d / "zero_row.pt")
    cases["zero row"] = (d / "zero_row.pt", r" has 1 all-zero row\(s\) \(first: row 2\)")
    torch.save(torch.ones(3, 32, dtype=torch.bool), d / "bool.pt")
    cases["bool"] = (d / "bool.pt", r" must hold real numbers \(a float tensor\), got torch.bool")
    save_with_payload(d / "pickled.pt", {"support": torch.ones(4, 32)})
    cases["pickled object"] = (d / "pickled.pt", r" holds pickled Python objects .*never unpickles.*GLOBAL "
                                                 r"tests.test_bad_inputs.touch")
    return cases


SUPPORT_CASES = ["missing", "empty", "garbage bytes", "text file", "numpy file", "truncated zip", "damaged safetensors",
                 "two tensors", "1-d", "wrong width", "dict", "no rows", "NaN", "zero row", "bool", "pickled object"]


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_a_bad_support_file_is_a_datastore_error_naming_it(case, tmp_path, tiny_clap):
    path, problem = _support_cases(tmp_path)[case]
    with raises_exactly(DatastoreError, match="^(Support |The support |Could not read )?" + at(path) + problem):
        load_support(str(path), None, tiny_clap)
    assert_payload_never_ran(path)


def test_a_good_support_file_still_loads(tmp_path, tiny_clap):
    save_file({"support": torch.randn(5, 32).half()}, str(tmp_path / "s.safetensors"))
    support = load_support(str(tmp_path / "s.safetensors"), None, tiny_clap)
    assert support.embeddings.dtype == torch.float32 and support.embeddings.shape == (5, 32)
    torch.testing.assert_close(support.embeddings.norm(dim=1), torch.ones(5))


# --------------------------------------------------------------------------------------------------------------------
# transformers folders: the HF CLAP (clap.model) and the LLM (llm.model)


def _pickled_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    save_with_payload(folder / "pytorch_model.bin", {"x": torch.zeros(1)})


def _stray_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")  # tensors only, of some other model


def _set_config(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)


FOLDER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "pickled pytorch_model.bin": (_pickled_bin, r": pytorch_model.bin is not a tensors-only checkpoint: torch's "
                                                r"weights-only reader refused it \(.*GLOBAL tests.test_bad_inputs."
                                                r"touch.*\), and AudioScribe never unpickles"),
    "garbage model.safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 50),
                                  r": model.safetensors is not a readable safetensors file \(damaged or truncated: "
                                  r"Error while deserializing header"),
    "truncated model.safetensors": (lambda f: truncate(f / "model.safetensors"),
                                    r": model.safetensors is not a readable safetensors file \(damaged or truncated"),
    "no config.json": (lambda f: (f / "config.json").unlink(), r": the folder has no config.json"),
    "config.json not JSON": (lambda f: _set_config(f, "{not json"), r": OSError: .*config.json.*not a valid JSON"),
    "config.json a list": (lambda f: _set_config(f, "[1, 2]"), r": (TypeError|ValueError): "),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r": OSError: .*no file named model.safetensors"),
    "tokenizer.json not JSON": (lambda f: (f / "tokenizer.json").write_text("{ garbage"), r": \w+Error: "),
}


@pytest.mark.parametrize("damage", FOLDER_DAMAGE)
def test_a_damaged_hf_clap_folder_is_a_model_load_error(damage, tiny_clap_dir, tmp_path):
    folder = copy_of(tiny_clap_dir, tmp_path)
    corrupt, problem = FOLDER_DAMAGE[damage]
    corrupt(folder)
    with raises_exactly(ModelLoadError, match=f"^Could not load a CLAP model from '{at(folder)}'{problem}"
                       ) as info:
        HFClapBackend.from_pretrained(str(folder), device="cpu")
    assert UNSAFE_ADVICE not in str(info.value)
    assert_payload_never_ran(folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage", FOLDER_DAMAGE)
def test_a_damaged_llm_folder_is_a_model_load_error(damage, tiny_llama_dir, tmp_path):
    folder = copy_of(tiny_llama_dir, tmp_path)
    corrupt, problem = FOLDER_DAMAGE[damage]
    corrupt(folder)
    with raises_exactly(ModelLoadError, match=f"^Could not load an LLM from '{at(folder)}'{problem}"
                       ) as info:
        load_llm(LLMConfig(model=str(folder), device="cpu"))
    assert UNSAFE_ADVICE not in str(info.value)
    assert_payload_never_ran(folder / "pytorch_model.bin")


def test_weights_that_do_not_cover_the_model_are_refused_not_run_as_random(tiny_clap_dir, tiny_llama_dir,
                                                                           tmp_path):
    # transformers 5 loads these with every weight random and only prints a report.
    clap, llm = copy_of(tiny_clap_dir, tmp_path, "clap"), copy_of(tiny_llama_dir, tmp_path, "llm")
    _stray_bin(clap)
    _stray_bin(llm)
    with raises_exactly(ModelLoadError, match=rf"^The weights in {at(clap)} do not cover the model its config.json "
                                             r"describes: \d+ missing key\(s\) .*logit_scale_a"):
        HFClapBackend.from_pretrained(str(clap), device="cpu")
    with raises_exactly(ModelLoadError, match=rf"^The weights in {at(llm)} do not cover the model its config.json "
                                             r"describes: 21 missing key\(s\) .*lm_head.weight"):
        load_llm(LLMConfig(model=str(llm), device="cpu"))


def test_a_folder_without_tokenizer_files_is_refused(tiny_clap_dir, tmp_path):
    # transformers 5 builds a tokenizer of 5 special tokens instead: every text would embed the same.
    folder = copy_of(tiny_clap_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with raises_exactly(ModelLoadError, match=rf"^The tokenizer of '{at(folder)}' knows only its 5 special tokens: the "
                                             "folder lacks its tokenizer files"):
        HFClapBackend.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_path_that_is_not_a_model_folder_is_named(what, tiny_clap_dir, tmp_path):
    path = tmp_path / "nowhere" if what == "missing" else tiny_clap_dir / "config.json"
    problem = "the folder does not exist" if what == "missing" else "it is a file, not a model folder"
    with raises_exactly(ModelLoadError, match=f"^Could not load a CLAP model from '{at(path)}': {problem}"):
        HFClapBackend.from_pretrained(str(path), device="cpu")
    with raises_exactly(ModelLoadError, match=f"^Could not load an LLM from '{at(path)}': {problem}$"):
        load_llm(LLMConfig(model=str(path), device="cpu"))


# --------------------------------------------------------------------------------------------------------------------
# released-checkpoint loaders: DRCap's CLAP, MS-CLAP (the file is read before anything else is built)


def _damaged_checkpoint(d: Path, damage: str) -> tuple[Path, str]:
    """(file, regex of the ModelLoadError after the path)."""
    path = d / ("model.safetensors" if damage.endswith("safetensors") else "best_model.pt")
    if damage == "empty":
        path.write_bytes(b"")
        return path, r" with torch.load \(EOFError: the file is empty or ends early\)\. It should be "
    if damage == "text":
        path.write_text("not a checkpoint\n")
        return path, r"(: it is not a tensors-only torch checkpoint| with torch.load \()"
    if damage == "numpy":
        np.save(path.open("wb"), np.zeros(3))
        return path, r": it is not a tensors-only torch checkpoint \(torch.load's weights-only reader refused it: " \
                     r"Unsupported operand 147\)\. It should be "
    if damage == "truncated":
        torch.save({"model": {"w": torch.ones(64, 64)}}, path)
        truncate(path)
        return path, r" with torch.load \((RuntimeError|OSError): "  # which depends on where the zip is cut
    if damage == "pickled object":
        save_with_payload(path, {"model": torch.ones(1)})
        return path, r" holds pickled Python objects besides tensors.*GLOBAL tests.test_bad_inputs.touch"
    if damage == "a list":
        torch.save([torch.ones(1)], path)
        return path, r" holds no state dict"
    path.write_bytes(b"\xff" * 64)  # damaged safetensors
    return path, r": it is not a readable safetensors file \(damaged, truncated or another format; SafetensorError"


CHECKPOINT_DAMAGE = ["empty", "text", "numpy", "truncated", "pickled object", "a list", "damaged safetensors"]


@pytest.mark.parametrize("backend", [DrcapClapBackend, MsClapBackend], ids=["drcap", "msclap"])
@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_damaged_released_checkpoint_is_a_model_load_error(backend, damage, tmp_path):
    path, problem = _damaged_checkpoint(tmp_path, damage)
    with raises_exactly(ModelLoadError, match=f"^(The checkpoint |Could not read )?{at(path)}{problem}"
                       ) as info:
        backend.from_checkpoint(path, tokenizer="never-reached", device="cpu")
    assert UNSAFE_ADVICE not in str(info.value)
    assert_payload_never_ran(path)


# --------------------------------------------------------------------------------------------------------------------
# the demo CLAP folder


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return build_random_demo_clap(tmp_path_factory.mktemp("demo") / "clap")


def _edit_demo_config(folder: Path, **changes) -> None:
    config = json.loads((folder / DEMO_CONFIG).read_text())
    (folder / DEMO_CONFIG).write_text(json.dumps({**config, **changes}))


def _damage_demo(folder: Path, damage: str) -> str:
    """Damage ``folder``; return the regex its ModelLoadError must match."""
    config, weights = at(folder / DEMO_CONFIG), at(folder / "model.safetensors")
    if damage == "config not UTF-8":
        (folder / DEMO_CONFIG).write_bytes(b"\xff\xfe{")
        return rf"^Could not read {config} as JSON \(UnicodeDecodeError: "
    if damage == "config a list":
        (folder / DEMO_CONFIG).write_text("[1]")
        return rf"^{config} must hold a JSON object \(\{{\.\.\.\}}\), not a JSON list$"
    if damage == "config with impossible sizes":
        _edit_demo_config(folder, channels="abc")
        return rf"^{config} describes a model that cannot be built \(TypeError: "
    truncate(folder / "model.safetensors")
    return rf"^Could not read {weights}: it is not a readable safetensors file"


@pytest.mark.parametrize("damage", ["config not UTF-8", "config a list", "config with impossible sizes",
                                    "damaged weights"])
def test_a_damaged_demo_clap_folder_is_a_model_load_error(damage, demo_folder, tmp_path):
    folder = copy_of(demo_folder, tmp_path)
    with raises_exactly(ModelLoadError, match=_damage_demo(folder, damage)):
        DemoClapBackend.from_folder(folder, device="cpu")


def test_a_damaged_sentence_encoder_folder_is_a_model_load_error(demo_folder, tiny_clap_dir, tmp_path):
    folder = copy_of(demo_folder, tmp_path)
    encoder = copy_of(tiny_clap_dir, tmp_path, "encoder")  # any transformers folder, then damaged
    truncate(encoder / "model.safetensors")
    _edit_demo_config(folder, text_encoder=str(encoder))
    with raises_exactly(ModelLoadError, match=f"^Could not load the sentence encoder from {at(encoder)}: "
                                             "model.safetensors is not a readable safetensors file"):
        DemoClapBackend.from_folder(folder, device="cpu")


# --------------------------------------------------------------------------------------------------------------------
# DRCap decoder checkpoints (caption.checkpoint, engine/drcap.py)


def _own_checkpoint(folder: Path) -> Path:
    folder.mkdir()
    save_file({"encoder_projector.linear1.weight": torch.ones(64, 32),
               "encoder_projector.linear1.bias": torch.zeros(64),
               "encoder_projector.linear2.weight": torch.ones(64, 64),
               "encoder_projector.linear2.bias": torch.zeros(64)}, str(folder / "model.safetensors"))
    (folder / "drcap_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("damage, file, problem", [
    ("weights", "model.safetensors", r": it is not a readable safetensors file \(damaged, truncated"),
    ("config", "drcap_config.json", r" as JSON \(JSONDecodeError: "),
    ("config list", "drcap_config.json", r" must hold a JSON object"),
])
def test_a_damaged_own_decoder_checkpoint_is_a_model_load_error(damage, file, problem, tmp_path):
    folder = _own_checkpoint(tmp_path / "ckpt")
    if damage == "weights":
        truncate(folder / file)
    else:
        (folder / file).write_text("[]" if damage == "config list" else "{")
    with raises_exactly(ModelLoadError, match=f"^(Could not read )?{at(folder / file)}{problem}"):
        read_checkpoint(folder)


def test_a_pickled_model_pt_and_a_bad_adapter_config_are_model_load_errors(tmp_path):
    path = save_with_payload(tmp_path / "model.pt", {"encoder_projector.linear1.weight": torch.ones(64, 32)})
    with raises_exactly(ModelLoadError, match=f"^{at(path)} holds pickled Python objects besides tensors, and "
                                             "AudioScribe never unpickles arbitrary objects"):
        read_checkpoint(path)
    assert_payload_never_ran(path)
    release = tmp_path / "release"
    release.mkdir()
    torch.save({"encoder_projector.linear1.weight": torch.ones(64, 32)}, release / "model.pt")
    (release / "adapter_config.json").write_text(json.dumps({"r": "eight"}))
    with raises_exactly(ModelLoadError, match=f"^{at(release)}/adapter_config.json holds an unusable LoRA setting "
                                             r"\(ValueError: invalid literal for int\(\)"):
        read_checkpoint(release)


@pytest.mark.parametrize("meta, found", [
    ({"layout": {"no_such_field": True}}, "TypeError"),
    ({"clap": "not an object"}, "AttributeError"),
    ({"lora": {"lora_targets": ["no_such_module"]}}, r"\w+Error"),
])
def test_checkpoint_settings_the_model_cannot_use_name_the_checkpoint(meta, found, tmp_path, tiny_clap,
                                                                      tiny_clap_dir, tiny_llama_dir):
    config = AppConfig()
    config.clap.model, config.llm.model, config.llm.dtype = str(tiny_clap_dir), str(tiny_llama_dir), "fp32"
    weights = {"encoder_projector.linear1.weight": torch.ones(8, 32), "encoder_projector.linear1.bias": torch.ones(8),
               "encoder_projector.linear2.weight": torch.ones(64, 8), "encoder_projector.linear2.bias": torch.ones(64),
               "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(8, 64)}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "drcap_config.json").write_text(json.dumps(meta))
    with raises_exactly(ModelLoadError, match=f"^{at(folder)} does not describe a DRCap decoder for this LLM and CLAP "
                                             rf"\({found}: .*check its weights and drcap_config.json$"):
        build_model(load_llm(config.llm), tiny_clap, config, read_checkpoint(folder), trainable=False)


# --------------------------------------------------------------------------------------------------------------------
# start-up: AudioScribe.from_config and app.py


def _config(tmp_path: Path, clap: Path, llm: Path, **caption) -> AppConfig:
    config = AppConfig(cache_dir=str(tmp_path / "cache"))
    config.clap.model, config.clap.device = str(clap), "cpu"
    config.llm.model, config.llm.dtype = str(llm), "fp32"
    config.datastore.sources = []
    config.caption.enabled = bool(caption)
    for key, value in caption.items():
        setattr(config.caption, key, value)
    return config


def test_start_up_with_bad_paths_raises_typed_errors(tmp_path, tiny_clap_dir, tiny_llama_dir):
    clap = copy_of(tiny_clap_dir, tmp_path, "clap")
    _pickled_bin(clap)
    with raises_exactly(ModelLoadError, match=f"^Could not load a CLAP model from '{at(clap)}': "
                                             "pytorch_model.bin is not a tensors-only checkpoint"):
        AudioScribe.from_config(_config(tmp_path, clap, tiny_llama_dir), show_progress=False)
    llm = copy_of(tiny_llama_dir, tmp_path, "llm")
    truncate(llm / "model.safetensors")
    with raises_exactly(ModelLoadError, match=f"^Could not load an LLM from '{at(llm)}': "
                                             "model.safetensors is not a readable safetensors file"):
        AudioScribe.from_config(_config(tmp_path, tiny_clap_dir, llm, support="unused"), show_progress=False)
    support = tmp_path / "support.pt"
    support.write_bytes(b"\x00" * 100)
    with raises_exactly(DatastoreError, match=f"^Could not read {at(support)}"):
        AudioScribe.from_config(_config(tmp_path, tiny_clap_dir, tiny_llama_dir, support=str(support)),
                                show_progress=False)


def test_app_prints_the_message_not_a_traceback(tmp_path, tiny_clap_dir):
    clap = copy_of(tiny_clap_dir, tmp_path, "clap")
    truncate(clap / "model.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUDIOSCRIBE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "app.py", "--profile", "tiny", "--set", f"clap.model={clap}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"error: Could not load a CLAP model from '{clap}': model.safetensors is not a readable safetensors " \
           "file" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------------------------------
# prompt templates (fault 6): validated as str.format, which builds the prompts, parses them


@pytest.mark.parametrize("template, problem", [
    ("This is {} {", r"has a brace without its pair \(Single '\{' encountered in format string\)"),
    ("This is {}}", r"has a brace without its pair \(Single '\}' encountered in format string\)"),
    ("{0} sound", r"must contain exactly one '\{\}' where the class name goes \(found: \{0\}\)"),
    ("{name}", r"must contain exactly one '\{\}' where the class name goes \(found: \{name\}\)"),
    ("no placeholder", r"must contain exactly one '\{\}' where the class name goes \(found: none\)"),
    ("{} and {}", r"must contain exactly one '\{\}' where the class name goes \(found: \{\}, \{\}\)"),
    ("a {!r} sound", r"must contain exactly one '\{\}' where the class name goes \(found: \{!r\}\)"),
    ("a {:>9} sound", r"must contain exactly one '\{\}' where the class name goes \(found: \{:>9\}\)"),
    ("{{}}", r"must contain exactly one '\{\}' where the class name goes \(found: none\)"),
])
def test_a_malformed_template_is_a_classifier_input_error_quoting_it(template, problem):
    with raises_exactly(ClassifierInputError, match=re.escape(f"Template {template!r} ") + problem):
        check_templates(["This is a sound of {}.", template])


class RecordingClap:
    """Records the prompts a classifier is built from (and embeds each as a distinct unit vector)."""

    logit_scale = 10.0

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def embed_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        self.prompts += texts
        return torch.eye(8)[:len(texts)]


def test_escaped_braces_are_literal_as_in_str_format():
    clap = RecordingClap()
    build_zero_shot_classifier(clap, ["dog", "cat"], ["a {} sound {{x}}", "  {}.  "])
    assert clap.prompts == ["a dog sound {x}", "dog.", "a cat sound {x}", "cat."]


def test_a_bad_template_fails_before_anything_is_embedded():
    clap = RecordingClap()
    with raises_exactly(ClassifierInputError, match=re.escape("Template 'This is {} {' has a brace without its pair")):
        build_zero_shot_classifier(clap, ["dog"], ["This is {} {"])
    assert clap.prompts == []
