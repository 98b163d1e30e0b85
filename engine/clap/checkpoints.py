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
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.clap.tiny import UNTRAINED_MARKER
from engine.errors import ModelLoadError

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
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path, released_file)
    return state_dict_from(obj, path, layout=layout)


def _read_safetensors(path: Path) -> object:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ModelLoadError(f"Could not read the safetensors file {path}: {type(e).__name__}: {e}") from e


def _read_torch(path: Path, released_file: str) -> object:
    expected = f"It should be {released_file} or a .safetensors file."
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the class it refused ("Unsupported global: GLOBAL x.Y ...");
        # other unpickling errors mean the file is not a torch checkpoint at all.
        refused = [line.strip() for line in str(e).splitlines() if "global" in line.lower()]
        if not refused:
            raise ModelLoadError(f"Could not read the checkpoint {path} with torch.load: {str(e).strip()[:300]}. "
                                 f"{expected}") from e
        raise ModelLoadError(_pickled_objects_message(path, refused[0])) from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise ModelLoadError(f"Could not read the checkpoint {path} with torch.load: {type(e).__name__}: {e}. "
                             f"{expected}") from e


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

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = ("HF_HUB_OFFLINE is set, so only the local cache is used" if offline
                 else "the hub could not be reached or the id does not exist")
        raise ModelLoadError(
            f"Could not load the {model} text tokenizer {name!r} ({where}; {type(e).__name__}: {e}). The "
            f"checkpoint does not carry one: download it once where there is internet (`hf download {name}`) or set "
            f"clap.tokenizer to a local folder holding {kind}.") from e


__all__ = ["CHECKPOINT_SUFFIXES", "STALE_BUFFER_SUFFIXES", "checkpoint_file", "config_with", "infer_hf_text_sizes",
           "load_state_dict_strictly", "load_tokenizer", "read_state_dict", "resolve_tokenizer", "state_dict_from",
           "tensor_shape", "write_untrained_checkpoint"]
