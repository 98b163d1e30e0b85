"""Small helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AUDIOCAPS = SHARED_DATA / "audiocaps"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CAPTIONS = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"


def noise_clip(seconds: float, sample_rate: int = 48_000, seed: int = 0) -> np.ndarray:
    """Deterministic band-limited-ish noise with a tone, mono float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.1 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32)


def small_caption_set(count: int = 3000) -> list[str]:
    """The first ``count`` shipped AudioCaps training captions (unique): real text, quick to embed with the tiny CLAP."""
    return SHIPPED_CAPTIONS.read_text(encoding="utf-8").splitlines()[:count]


def audiocaps_train_source() -> Path:
    """The AudioCaps training CSV (49,838 rows) from the shared data folder, or the shipped unique captions when the
    shared folder is not beside the checkout."""
    csv = AUDIOCAPS / "train.csv"
    return csv if csv.is_file() else SHIPPED_CAPTIONS


# A child's own peak RSS is VmHWM in its /proc/self/status: the high-water mark of its address space, which exec
# starts afresh. getrusage cannot give it: RUSAGE_CHILDREN is the maximum over every child ever waited for, and even
# the child's RUSAGE_SELF ru_maxrss starts at the parent's peak (Linux carries it over the vfork + exec).
_PEAK_RSS_WRAPPER = """
import atexit, runpy, sys

def write_peak(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(kib)

atexit.register(write_peak)  # runs on a normal exit and on sys.exit alike
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def proc_status_kib(key: str) -> int:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (peak) in KiB, from /proc/self/status (Linux only)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{key}:"))


def reset_peak_rss() -> None:
    """Lower this process's VmHWM to its current RSS (Linux >= 4.0), so that a later peak measures only what follows."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def run_module_with_peak_rss(
    module: str, args: list[str], *, scratch: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m module *args`` in a child from the project root; returns its result and its peak RSS in MiB.

    ``scratch`` is a folder for the file the child reports its peak in (stdout stays the module's own).
    """
    peak_file = scratch / "peak_rss_kib"
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_WRAPPER, str(peak_file), module, *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert peak_file.is_file(), f"the child reported no peak RSS; stderr: {done.stderr[-2000:]}"
    return done, int(peak_file.read_text()) / 1024


def tiny_app_config(root: Path, clap_dir: Path, llm_dir: Path | None, captions: int = 500, *,
                    num_beams: int = 1, max_new_tokens: int = 8):
    """An AppConfig serving the tiny random models on the first ``captions`` shipped captions (written under
    ``root``), cached under ``root``; without ``llm_dir`` captioning is off. The app and handler tests share it."""
    from engine.config import AppConfig

    source = root / "captions.txt"
    source.write_text("\n".join(small_caption_set(captions)) + "\n")
    config = AppConfig(cache_dir=str(root / "cache"))
    config.clap.model, config.clap.device = str(clap_dir), "cpu"
    config.datastore.sources = [str(source)]
    if llm_dir is None:
        config.caption.enabled = False
    else:
        config.llm.model = str(llm_dir)
    config.caption.num_beams, config.caption.max_new_tokens = num_beams, max_new_tokens
    return config
