"""Hugging Face ZeroGPU: GPU work runs inside ``spaces.GPU``-decorated functions when the ``spaces`` package is
present (on a Space); elsewhere the decorator is the identity, so nothing changes locally or on a dedicated GPU."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def gpu(fn: F) -> F:
    """``spaces.GPU(fn)`` on a Space with the ``spaces`` package, else ``fn`` unchanged."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)
