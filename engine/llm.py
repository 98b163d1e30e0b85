"""Loading the causal LM that DRCap decodes with, with 4-bit/8-bit quantization and LoRA adapters.

Policy (``llm.quantization``): "auto" loads nf4 (bitsandbytes, double quantization, bfloat16 compute) on CUDA and no
quantization on a machine without CUDA, where it falls back to bfloat16 for large models (a 7B model does not fit
in 24 GB as float32) or float32 for small ones, and says so in ``LoadedLLM.notice`` (shown in the log and the UI).
"nf4" and "int8" may also be asked for explicitly; bitsandbytes runs nf4 on the CPU too (slowly).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.clap.base import resolve_device
from engine.clap.checkpoints import (check_tokenizer_vocabulary, check_weights_cover_model, failure_reason,
                                     folder_failure, is_local_path, model_folder_problem, model_load_errors)
from engine.config import LLMConfig
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

TINY_LLAMA_ID = "builtin:tiny-llama"
TINY_LLAMA_VERSION = 1
UNTRAINED_MARKER = "audioscribe_untrained.json"
_LARGE_MODEL_PARAMS = 1_000_000_000  # above this, float32 on the CPU is not a sensible default
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedLLM:
    model: torch.nn.Module  # a transformers causal LM (peft-wrapped once adapters are attached)
    tokenizer: object  # its tokenizer; pad_token_id == eos_token_id, as in DRCap
    name: str
    device: torch.device
    quantization: str  # what was actually used: nf4 | int8 | none
    dtype: torch.dtype  # compute dtype
    notice: str = ""  # anything the user should know about how it was loaded (fallbacks)
    is_untrained: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def describe(self) -> str:
        state = "UNTRAINED random weights" if self.is_untrained else "trained weights"
        return f"{self.name} ({state}, {self.quantization}, {str(self.dtype).replace('torch.', '')}, {self.device})"


def load_llm(config: LLMConfig, cache_dir: str | os.PathLike | None = None) -> LoadedLLM:
    """Load the configured LM and tokenizer (not yet with adapters: see :func:`attach_lora`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = config.model
    if name == TINY_LLAMA_ID:
        name = str(ensure_tiny_llama(Path(cache_dir or tempfile.gettempdir()) / "models"))
    device = resolve_device(config.device)
    if is_local_path(name) and (problem := model_folder_problem(name)):
        raise ModelLoadError(f"Could not load an LLM from {name!r}: {problem}")
    with model_load_errors(lambda e: _explain(name, e)):
        model_config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    check_tokenizer_vocabulary(tokenizer, repr(name))
    quantization, dtype, notice = _plan(config, device, _approx_params(model_config))
    kwargs: dict = {"dtype": dtype, "low_cpu_mem_usage": True}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
            if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": _cuda_index(device)} if device.type == "cuda" else {"": "cpu"}
    with model_load_errors(lambda e: _explain(name, e)):
        model, loading_info = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True, **kwargs)
        check_weights_cover_model(model, loading_info, name)
    if quantization == "none":
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # DRCap pads with EOS (id 2 for Llama)
    loaded = LoadedLLM(model=model, tokenizer=tokenizer, name=name, device=device, quantization=quantization,
                       dtype=dtype, notice=notice, is_untrained=Path(name, UNTRAINED_MARKER).is_file())
    if notice:
        log.warning(notice)
    log.info("Loaded LLM %s", loaded.describe())
    return loaded


def attach_lora(model: torch.nn.Module, config: LLMConfig, trainable: bool = True) -> torch.nn.Module:
    """Wrap the LM with LoRA adapters (DRCap: r 8, alpha 32, dropout 0.05 on q_proj and v_proj)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM",
                      inference_mode=not trainable)
    return get_peft_model(model, lora)


def _cuda_index(device: torch.device) -> int:
    """The GPU a quantized model is placed on: the resolved one (cuda:LOCAL_RANK under a launcher), else the current
    device (``device_map`` needs an index; ``0`` would put every rank of a multi-GPU run on the first GPU)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _plan(config: LLMConfig, device: torch.device, params: int) -> tuple[str, torch.dtype, str]:
    """(quantization, compute dtype, notice) for this machine."""
    notice = ""
    quantization = config.quantization
    if quantization == "auto":
        quantization = "nf4" if device.type == "cuda" else "none"
        if device.type != "cuda" and params > _LARGE_MODEL_PARAMS:  # a small LLM is fast on the CPU: nothing to say
            notice = ("No CUDA device: the LLM runs on the CPU without quantization; each caption takes seconds to "
                      "minutes.")
    if config.dtype != "auto":
        dtype = _DTYPES[config.dtype]
    elif device.type == "cuda" or params > _LARGE_MODEL_PARAMS:
        dtype = torch.bfloat16
        if device.type != "cuda":
            notice += f" bfloat16 weights (~{2 * params / 1e9:.0f} GB of RAM)."
    else:
        dtype = torch.float32
    if quantization == "int8" and device.type != "cuda":
        raise ModelLoadError("llm.quantization = int8 needs a CUDA device; use nf4 or none on the CPU")
    return quantization, dtype, notice.strip()


def _approx_params(model_config) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings + layers), without building it."""
    hidden = int(getattr(model_config, "hidden_size", 0))
    layers = int(getattr(model_config, "num_hidden_layers", 0))
    inner = int(getattr(model_config, "intermediate_size", 4 * hidden))
    vocab = int(getattr(model_config, "vocab_size", 0))
    return layers * (4 * hidden * hidden + 3 * hidden * inner) + 2 * vocab * hidden


def _explain(name: str, error: Exception) -> str:
    if is_local_path(name):
        return f"Could not load an LLM from {name!r}: {folder_failure(name, error)}"
    return (f"Could not load LLM {name!r} ({failure_reason(error)}). Without internet, download it once "
            f"elsewhere (`hf download {name}`), copy the folder here and set llm.model to it.")


# --------------------------------------------------------------------------------------------------------------------
# a tiny random Llama for tests and offline runs


def build_tiny_llama(directory: str | os.PathLike, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A tiny random ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained on the shipped captions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / UNTRAINED_MARKER).write_text(json.dumps(
        {"what": "randomly initialised tiny Llama; its text carries no meaning", "seed": seed,
         "recipe_version": TINY_LLAMA_VERSION}, indent=2))
    return directory


def ensure_tiny_llama(models_dir: str | os.PathLike) -> Path:
    """The cached tiny Llama under ``models_dir``, built on first use."""
    from engine.clap.tiny import build_once

    return build_once(Path(models_dir) / f"tiny-random-llama-v{TINY_LLAMA_VERSION}", build_tiny_llama)


def train_llama_tokenizer(vocab_size: int = 2000, lines: list[str] | None = None):
    """A Llama-style tokenizer (<s>=1, </s>=2, pad=EOS) with byte-level BPE trained on ``lines`` (default: the
    shipped AudioCaps captions) and DRCap's prompt words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if lines is None:
        captions = (Path(__file__).resolve().parent.parent / "assets" / "captions" / "audiocaps_train.txt")
        lines = captions.read_text(encoding="utf-8").splitlines()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(lines + ["USER: ASSISTANT: Describe the audio you hear. Similar audios sound like: "
                                     "This audio sounds like"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
