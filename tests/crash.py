"""Kill a process with SIGKILL at a chosen point of an operation, as a power cut or ``kill -9`` would: the harness of
the crash-safety tests.

The operation runs in a child process started by a fork server (it imports torch before any thread pool exists, so
forking is safe and cheap). A trace function counts the Python lines the child executes in the ``traced`` engine
files; at line ``kill_at`` the child kills itself. A first run without a kill counts the lines, so kill points can
be spread over the whole operation (seeded).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import numpy as np

_CONTEXT = multiprocessing.get_context("forkserver")
# Imported once by the fork server, not by every child (transformers imports its model classes lazily: seconds).
_CONTEXT.set_forkserver_preload([
    "torch", "numpy", "pandas", "faiss", "safetensors.torch", "transformers", "peft",
    "transformers.models.clap.modeling_clap", "transformers.models.clap.feature_extraction_clap",
    "transformers.models.roberta.tokenization_roberta", "transformers.models.llama.modeling_llama",
    "engine.clap", "engine.datastore", "engine.prompt_tuning", "engine.captioner", "trainers.build_datastore",
    "trainers.train_drcap", "tests.test_crash_safety",
])


Traced = Sequence[tuple[str, frozenset[str] | None]]  # (file suffix, function names or None for every function)


def _child(operation: Callable, args: tuple, traced: Traced, kill_at: int, result) -> None:
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def tracer(frame, event, arg):
        code = frame.f_code
        for suffix, functions in traced:
            if code.co_filename.endswith(suffix) and (functions is None or code.co_name in functions):
                return local
        return None

    threading.settrace(tracer)
    sys.settrace(tracer)
    operation(*args)
    sys.settrace(None)
    result.value = count


def run_until(operation: Callable, args: tuple, traced: Traced, kill_at: int = 0,
              timeout_s: float = 300) -> tuple[int, int]:
    """Run ``operation(*args)`` in a child; SIGKILL it at its ``kill_at``-th line in ``traced`` (0: never).
    Returns (exit code, lines counted); exit code -9 when it was killed."""
    counted = _CONTEXT.Value("q", -1)
    process = _CONTEXT.Process(target=_child, args=(operation, args, tuple(traced), kill_at, counted))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        raise TimeoutError(f"{operation.__name__} did not finish in {timeout_s} s")
    return process.exitcode, counted.value


def kill_points(total: int, count: int, seed: int, start: int = 1) -> list[int]:
    """``count`` distinct line numbers in [start, total], seeded, always including the first and the last."""
    rng = np.random.default_rng(seed)
    inner = rng.choice(np.arange(start + 1, total), size=min(count - 2, max(total - start - 1, 0)), replace=False)
    return sorted({start, total, *inner.tolist()})
