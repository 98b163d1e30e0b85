"""app.gpu: spaces.GPU on a Hugging Face Space, the identity elsewhere."""
from __future__ import annotations

import sys
import types

from app.gpu import gpu


def test_without_spaces_the_function_is_unchanged(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError

    def work(x: int) -> int:
        return x + 1

    assert gpu(work) is work


def test_with_spaces_the_function_is_wrapped_by_spaces_gpu(monkeypatch):
    wrapped = []
    fake = types.SimpleNamespace(GPU=lambda fn: wrapped.append(fn) or (lambda *a, **k: ("on gpu", fn(*a, **k))))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu(lambda x: x * 2)(3) == ("on gpu", 6) and len(wrapped) == 1
