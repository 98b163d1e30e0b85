"""Checkpoint loading shared by the backends that re-implement a released CLAP (DRCap's CLAP, MS-CLAP 2022).

Both rebuild a released model's module tree so that its ``torch.save`` file (``{"model": state_dict, ...}``) loads
key for key, and both put an HF text tower (RoBERTa, BERT) inside it. The pieces here are the same for both: finding
the file, reading a state dict without unpickling anything, dropping the buffers only some ``transformers`` versions
save, reading the text tower's sizes from tensor shapes, a strict load whose error names every missing, unexpected
or mis-shaped key, and loading the tokenizer. The model-specific words of the error messages (the model's name, its
released file) are arguments, so each backend's messages name its own model.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.clap.tiny import UNTRAINED_MARKER
from engine.errors import AudioScribeError, ModelLoadError

# Buffers that HF RoBERTa/BERT saved in some transformers versions and not in others (non-persistent since 4.31); a
# checkpoint carrying them would otherwise fail a strict load ("Unexpected key(s) ... position_ids").
STALE_BUFFER_SUFFIXES = (".position_ids", ".token_type_ids")
# what a folder given instead of a file is searched for, to name the file that was probably meant
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")

ConfigT = TypeVar("ConfigT")


# --------------------------------------------------------------------------------------------------------------------
# finding and reading the file


def checkpoint_file(path: str | os.PathLike, *, model: str, hint: str) -> Path:
    """``path`` if it is a file; otherwise a :class:`ModelLoadError` naming ``model`` and ending in ``hint``."""
    checkpoint = Path(path).expanduser()
    if checkpoint.is_file():
        return checkpoint
    if checkpoint.is_dir():
        found = sorted(p.name for p in checkpoint.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        listed = f"; it holds {', '.join(found)}" if found else ""
        raise ModelLoadError(f"{checkpoint} is a folder, not a checkpoint file{listed}. {hint}")
    raise ModelLoadError(f"The {model} checkpoint {str(path)!r} does not exist. {hint}")


def read_state_dict(path: str | os.PathLike, *, released_file: str, layout: str) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling anything; stale HF buffers (:data:`STALE_BUFFER_SUFFIXES`) dropped.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``, taking the
    ``"model"`` entry of a training checkpoint or the whole file when it is a bare state dict. ``released_file``
    ("a DRCap/WavCaps best_model.pt") and ``layout`` ("as WavCaps/DRCap save it") complete the error messages.
    """
    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path, released_file)
    return state_dict_from(obj, path, layout=layout)


def _read_torch(path: Path, released_file: str) -> object:
    return torch_load_tensors(path, hint=f"It should be {released_file} or a .safetensors file.",
                              pickled=_pickled_objects_message)


def read_safetensors(path: Path, error: type[AudioScribeError] = ModelLoadError) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file; a damaged or foreign file is ``error`` naming ``path``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError for a damaged header, OSError, ...
        raise error(f"Could not read {path}: it is not a readable safetensors file (damaged, truncated or another "
                    f"format; {failure_reason(e)})") from e


def torch_load_tensors(path: Path, *, hint: str, error: type[AudioScribeError] = ModelLoadError,
                       pickled: Callable[[Path, str], str] | None = None) -> object:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, nothing else is unpickled.

    Any failure is ``error`` naming ``path``; ``hint`` (what the file should be) ends the message. A file that holds
    pickled objects gets ``pickled(path, what torch refused)`` as its message (default: a generic one).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused:
            raise error((pickled or _generic_pickled_message)(path, refused)) from e
        # not a pickle torch accepts at all (text, numpy, a plain pickle...): nothing was unpickled
        raise error(f"Could not read {path}: it is not a tensors-only torch checkpoint (torch.load's weights-only "
                    f"reader refused it: {unpickler_reason(e)}). {hint}") from e
    except Exception as e:  # noqa: BLE001 - truncated zip (RuntimeError), empty file (EOFError), random bytes, ...
        raise error(f"Could not read {path} with torch.load ({failure_reason(e)}). {hint}") from e


def _refused_global(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused to import ("GLOBAL module.Class"), or "" for other refusals."""
    found = re.search(r"GLOBAL\s+([\w.]+)", str(error))
    return f"it refused to import GLOBAL {found[1]}" if found else ""


def unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The useful part of torch's weights-only error, without its advice to load with ``weights_only=False``
    (which would run whatever code the file holds: never something to tell a user of a file of unknown origin)."""
    _, marker, tail = str(error).partition("WeightsUnpickler error:")
    body = (tail if marker else str(error)).split("Check the documentation")[0]
    return " ".join(body.split())[:300] or "not a pickle it accepts"


def failure_reason(error: BaseException) -> str:
    """``"Type: message"`` on one line, at most 300 characters; an empty message (EOFError) is explained."""
    message = " ".join(str(error).split())
    if not message and isinstance(error, EOFError):
        message = "the file is empty or ends early"
    return f"{type(error).__name__}: {message or 'no details'}"[:300]


def _generic_pickled_message(path: Path, refused: str) -> str:
    return (f"{path} holds pickled Python objects besides tensors, and AudioScribe never unpickles arbitrary objects "
            "(unpickling can run any code the file holds). Save the tensors alone (torch.save of a state dict) or as "
            f".safetensors. torch.load said: {refused}")


def read_json_object(path: Path, error: type[AudioScribeError] = ModelLoadError) -> dict:
    """The JSON object in ``path``; an unreadable, non-UTF-8 or malformed file, or JSON that is not an object
    (``{...}``), is ``error`` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise error(f"Could not read {path} as JSON ({failure_reason(e)})") from e
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object ({{...}}), not a JSON {type(value).__name__}")
    return value


def _pickled_objects_message(path: Path, refused: str) -> str:
    return (
        f"The checkpoint {path} holds pickled Python objects besides tensors (for example a training config "
        "object), and AudioScribe does not unpickle them: unpickling can run arbitrary code. If you trust the "
        "file, convert it once with convert_checkpoint_to_safetensors (it unpickles the file, so only for "
        "files you trust): python -c \"from engine.clap.drcap import convert_checkpoint_to_safetensors as c; "
        f"c('{path}', '{path.with_suffix('.safetensors')}')\" and set clap.model to the .safetensors file. "
        "(Saving {'model': model.state_dict()} with torch.save works too.) "
        f"torch.load said: {refused}")


def state_dict_from(obj: object, path: Path, *, layout: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint object (its ``"model"`` entry, or itself), stale HF buffers dropped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(f"The checkpoint {path} holds no state dict (expected {{'model': state_dict}} "
                             f"{layout}, or a bare state dict)")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ModelLoadError(f"The checkpoint {path} has no 'model' entry and is not a state dict: entries that are "
                             f"not tensors: {', '.join(others[:10])}")
    return {str(k): v for k, v in obj.items() if not str(k).endswith(STALE_BUFFER_SUFFIXES)}


def write_untrained_checkpoint(directory: Path, state_dict: Mapping[str, torch.Tensor], *, released_file: str,
                               safetensors: bool, what: str, seed: int,
                               extra: Mapping[str, object] | None = None) -> Path:
    """Write a random model's state dict and the untrained marker beside it; returns the checkpoint's path.

    The layout is the release's (``directory/released_file`` holding ``{"model": state_dict, **extra}``) or
    ``directory/model.safetensors``, so tests load tiny models through the same code as released ones. The marker
    (``what``, ``seed``) makes the backend loaded from ``directory`` report ``is_untrained``.
    """
    if safetensors:
        from safetensors.torch import save_file

        checkpoint = directory / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(checkpoint))
    else:
        checkpoint = directory / released_file
        torch.save({"model": state_dict, **(extra or {})}, checkpoint)
    (directory / UNTRAINED_MARKER).write_text(json.dumps({"what": what, "seed": seed}, indent=2))
    return checkpoint


# --------------------------------------------------------------------------------------------------------------------
# sizes from tensor shapes (the released checkpoints store no config)


def tensor_shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    """The shape of ``state_dict[key]``, or None when the key is missing or not a tensor."""
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def infer_hf_text_sizes(state_dict: Mapping[str, torch.Tensor], prefix: str,
                        default_hidden: int) -> dict[str, object]:
    """The sizes of an HF RoBERTa/BERT model saved under ``prefix``, as changes to a config's ``text_*`` fields.

    Only sizes whose tensors are present are returned: vocabulary and hidden size, positions, token types, layers,
    intermediate size. Attention heads are not visible in any shape: ``hidden // 64`` (the base models' 12; at least
    1, and 1 when that does not divide the hidden size), left to the default when the hidden size is the default.
    """
    changes: dict[str, object] = {}
    if (s := tensor_shape(state_dict, prefix + "embeddings.word_embeddings.weight")) and len(s) == 2:
        changes["text_vocab_size"], changes["text_hidden_size"] = s
        if s[1] != default_hidden:
            heads = max(1, s[1] // 64)
            changes["text_heads"] = heads if s[1] % heads == 0 else 1
    if (s := tensor_shape(state_dict, prefix + "embeddings.position_embeddings.weight")) and len(s) == 2:
        changes["text_max_positions"] = s[0]
    if (s := tensor_shape(state_dict, prefix + "embeddings.token_type_embeddings.weight")) and len(s) == 2:
        changes["text_type_vocab_size"] = s[0]
    layers = {int(m[1]) for key in state_dict if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", key))}
    if layers:
        changes["text_layers"] = max(layers) + 1
    if (s := tensor_shape(state_dict, prefix + "encoder.layer.0.intermediate.dense.weight")) and len(s) == 2:
        changes["text_intermediate_size"] = s[0]
    return changes


def config_with(defaults: ConfigT, changes: Mapping[str, object], model: str) -> ConfigT:
    """``defaults`` with the inferred sizes; sizes the config rejects are a :class:`ModelLoadError` naming ``model``."""
    try:
        return replace(defaults, **changes)
    except ValueError as e:
        raise ModelLoadError(f"The checkpoint's tensor shapes describe an impossible {model}: {e}") from e


# --------------------------------------------------------------------------------------------------------------------
# strict loading


def _key_group(key: str) -> str:
    """'audio_encoder.audio_enc.layers.2.blocks.5.attn.qkv.weight' -> 'audio_encoder.audio_enc.layers'."""
    parts = []
    for part in key.split("."):
        if part.isdigit() or len(parts) == 3:
            break
        parts.append(part)
    return ".".join(parts) or key


def _describe_keys(what: str, keys: Sequence[str]) -> str:
    groups = Counter(_key_group(k) for k in keys)
    listed = ", ".join(f"{group}: {count}" for group, count in groups.most_common())
    more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
    return f"{len(keys)} {what} key(s) [{listed}]: {', '.join(keys[:10])}{more}"


def _key_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """One line each for the missing keys, the unexpected keys and the shape mismatches; empty when all match."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
                  for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(_describe_keys("missing", missing))
    if unexpected:
        problems.append(_describe_keys("unexpected", unexpected))
    if mismatched:
        more = f" (and {len(mismatched) - 10} more)" if len(mismatched) > 10 else ""
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:10])}{more}")
    return problems


def load_state_dict_strictly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *,
                             architecture: str) -> None:
    """Load every key; any missing or unexpected key or shape mismatch is a :class:`ModelLoadError` naming them.

    ``architecture`` names the model in the error ("MS-CLAP 2022 (Cnn14 audio encoder + BERT text encoder)").
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(STALE_BUFFER_SUFFIXES)}
    problems = _key_problems(expected, state_dict)
    if problems:
        raise ModelLoadError(f"The checkpoint {source} does not match {architecture} built from its own tensor "
                             "shapes:\n  - " + "\n  - ".join(problems))
    model.load_state_dict(state_dict, strict=False)  # strictness checked above (stale HF buffers aside)


# --------------------------------------------------------------------------------------------------------------------
# the tokenizer (the checkpoints carry none)


def resolve_tokenizer(tokenizer: object, *, default: str, model: str, kind: str) -> tuple[object, str]:
    """``(tokenizer, name for the log)``: a hub id or local folder is loaded (empty means ``default``); a tokenizer
    object is used as it is. ``model`` and ``kind`` ("a RoBERTa tokenizer") complete the error message."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer, type(tokenizer).__name__
    name = str(tokenizer) or default
    return load_tokenizer(name, model=model, kind=kind), name


def load_tokenizer(name: str, *, model: str, kind: str):
    """``AutoTokenizer.from_pretrained(name)``; failures say whether the hub was tried and how to get the files."""
    from transformers import AutoTokenizer

    def explain(error: Exception) -> str:
        if is_local_path(name):
            where = f"the local folder is unusable: {folder_failure(name, error)}"
        elif os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            where = f"HF_HUB_OFFLINE is set, so only the local cache is used; {failure_reason(error)}"
        else:
            where = f"the hub could not be reached or the id does not exist; {failure_reason(error)}"
        return (f"Could not load the {model} text tokenizer {name!r} ({where}). The checkpoint does not carry one: "
                f"download it once where there is internet (`hf download {name}`) or set clap.tokenizer to a local "
                f"folder holding {kind}.")

    with model_load_errors(explain):
        loaded = AutoTokenizer.from_pretrained(name)
    check_tokenizer_vocabulary(loaded, repr(name))
    return loaded


# --------------------------------------------------------------------------------------------------------------------
# transformers model folders (HF CLAP, the LLM, the demo CLAP's sentence encoder)


def is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a folder on this machine rather than a hub id ("org/model")."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or Path(name).is_absolute()


def model_folder_problem(folder: str | os.PathLike) -> str | None:
    """What makes ``folder`` unusable as a transformers model folder before transformers is asked, or None.

    Without this, a file gets "Repo id must be in the form ..." and a folder without config.json is silently built
    from a default config (then fails on the first weight that does not fit)."""
    path = Path(folder).expanduser()
    if not path.exists():
        return "the folder does not exist"
    if not path.is_dir():
        return "it is a file, not a model folder"
    if not (path / "config.json").is_file():
        return "the folder has no config.json"
    return None


@contextmanager
def model_load_errors(explain: Callable[[Exception], str]) -> Iterator[None]:
    """Turn any failure inside into a :class:`ModelLoadError` whose message is ``explain(error)``.

    transformers, tokenizers, safetensors and torch raise many types for a damaged model folder (OSError,
    ValueError, TypeError, RuntimeError, SafetensorError, UnpicklingError, ...); none of them may reach the user as
    a traceback. The project's own typed errors pass through unchanged; the original stays chained for the log.
    """
    try:
        yield
    except AudioScribeError:
        raise
    except Exception as e:  # noqa: BLE001 - see above: the types are not documented and change between versions
        raise ModelLoadError(explain(e)) from e


def folder_failure(folder: str | os.PathLike, error: Exception) -> str:
    """What went wrong loading a local transformers folder, naming its weight files where they are the cause."""
    from safetensors import SafetensorError

    path = Path(folder).expanduser()
    if isinstance(error, pickle.UnpicklingError):
        files = _file_names(path, (".bin", ".pt", ".pth", ".ckpt")) or "its weights file"
        return (f"{files} is not a tensors-only checkpoint: torch's weights-only reader refused it "
                f"({unpickler_reason(error)}), and AudioScribe never unpickles arbitrary objects because that can "
                "run code. Save the model again with save_pretrained, which writes model.safetensors")
    if isinstance(error, SafetensorError):
        files = _file_names(path, (".safetensors",)) or "its .safetensors file"
        return f"{files} is not a readable safetensors file (damaged or truncated: {error})"
    return failure_reason(error)


def _file_names(folder: Path, suffixes: tuple[str, ...]) -> str:
    if not folder.is_dir():
        return ""
    return ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in suffixes))


def check_tokenizer_vocabulary(tokenizer: object, source: str) -> None:
    """Refuse a tokenizer that knows only its special tokens.

    transformers 5 builds such a tokenizer from a folder whose tokenizer files are missing instead of failing; it
    maps every text to the same ids, so every caption and class name would get the same embedding."""
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    if len(tokenizer) <= len(specials):
        raise ModelLoadError(f"The tokenizer of {source} knows only its {len(tokenizer)} special tokens: the folder "
                             "lacks its tokenizer files (tokenizer.json, or vocab/merges files); copy them beside "
                             "the model (the tokenizer's save_pretrained writes them)")


def check_weights_cover_model(model: nn.Module, loading_info: Mapping[str, object], source: str) -> None:
    """Refuse a model some of whose parameters were not in the weights file.

    ``from_pretrained`` fills such parameters with random values and only logs a report, so a folder whose weights
    belong to another model (or a stray ``pytorch_model.bin``) would run as a random model. Buffers (position ids,
    BatchNorm statistics) are left out: models re-create them, and some checkpoints do not save them.
    """
    parameters = {name for name, _ in model.named_parameters()}
    missing = sorted(str(k) for k in loading_info.get("missing_keys", ()) if str(k) in parameters)
    if missing:
        raise ModelLoadError(f"The weights in {source} do not cover the model its config.json describes: "
                             f"{_describe_keys('missing', missing)}. They would run as random values; the folder "
                             "must hold the weights that save_pretrained wrote for this config.")


__all__ = ["CHECKPOINT_SUFFIXES", "STALE_BUFFER_SUFFIXES", "check_tokenizer_vocabulary", "check_weights_cover_model",
           "checkpoint_file",
           "config_with", "failure_reason", "folder_failure", "infer_hf_text_sizes", "is_local_path",
           "load_state_dict_strictly", "load_tokenizer", "model_folder_problem", "model_load_errors",
           "read_json_object", "read_safetensors", "read_state_dict", "resolve_tokenizer", "state_dict_from",
           "tensor_shape", "torch_load_tensors", "unpickler_reason", "write_untrained_checkpoint"]
