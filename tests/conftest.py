"""Shared fixtures: a tiny random CLAP built from a config and reloaded from disk, and an isolated cache.

Tests never touch the network (HF_HUB_OFFLINE) or the user's cache (AUDIOSCRIBE_CACHE points at a temp dir).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
_TEST_CACHE = tempfile.mkdtemp(prefix="audioscribe-test-cache-")
os.environ["AUDIOSCRIBE_CACHE"] = _TEST_CACHE

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engine.clap.hf import HFClapBackend  # noqa: E402
from engine.clap.tiny import build_tiny_clap  # noqa: E402
from engine.config import AudioConfig  # noqa: E402

def pytest_unconfigure(config) -> None:
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory) -> Path:
    return build_tiny_clap(tmp_path_factory.mktemp("tiny-clap"), seed=0)


@pytest.fixture(scope="session")
def tiny_clap(tiny_clap_dir) -> HFClapBackend:
    return HFClapBackend.from_pretrained(str(tiny_clap_dir), device="cpu", audio_config=AudioConfig())


@pytest.fixture(scope="session")
def other_clap(tmp_path_factory) -> HFClapBackend:
    """Same architecture, different weights: stands for 'another CLAP'."""
    directory = build_tiny_clap(tmp_path_factory.mktemp("tiny-clap-other"), seed=1)
    return HFClapBackend.from_pretrained(str(directory), device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from engine.llm import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)
