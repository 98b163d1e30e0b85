"""Benchmark featurisation: audio windows -> the log-mel input each CLAP backend's audio tower sees.

    python -m benchmarks.bench_features [--repeats N] [--out benchmarks/RESULTS.md]

Rows (per window, median of ``--repeats`` timed calls after one warm-up; all methods are timed round-robin, one call
of each per round, so load from other processes falls on all of them alike):

* LAION-CLAP (``HFClapBackend``), 10-s windows at 48 kHz: transformers' numpy ``ClapFeatureExtractor`` (what the
  backend used before) vs ``engine.clap.features.ClapFeatures`` (what it uses now), unfused (``rand_trunc``, 1
  channel) and fused (``fusion``, 4 channels), batch 1 and 16, with the torch result's error against the numpy one
  (max |a - b| / max |b| over the batch) and the speed-up in the same rounds. The CPU block size (frames per FFT
  call) of ``ClapFeatures`` is measured too;
* MS-CLAP (``MsClapBackend``): ``prepare_windows`` (tiling to 5 s) + Cnn14's ``log_mel`` (torchlibrosa-style conv
  STFT, mel, dB, bn0) for 5-s windows at 44.1 kHz;
* DRCap's CLAP (``DrcapClapBackend``): ``prepare_windows`` (conv STFT, mel, dB, bn0, bicubic stretch to 1024 frames)
  for 10-s windows at 32 kHz.

Inputs are numpy float32 windows, as the backends get them, so torch rows include the host -> device copy. With CUDA
the torch rows are repeated on the GPU (synchronised before each clock read); the numpy extractor has no GPU path.
Results go to stdout (markdown) and into this script's own section of ``--out``; other sections are kept.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_datastore import CpuShare, machine_facts, run_command, write_section  # noqa: E402
from engine.clap.features import ClapFeatures  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## Featurisation (benchmarks/bench_features.py)"
BATCHES = (1, 16)
TARGET = 5.0  # required speed-up over the numpy extractor (issue 10, item 2)
BLOCKS = (32, 128, 512, 1001)  # frames per FFT call (1001 = a whole 10-s window)


def log(message: str) -> None:
    print(f"[bench_features {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clips(seconds: float, sample_rate: int, count: int) -> list[np.ndarray]:
    """Distinct deterministic windows: a tone, its octave and noise (mono float32)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        f = 220.0 * (1 + i % 7)
        out.append((0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(4 * np.pi * f * t)
                    + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    return float((ours - reference).abs().max() / reference.abs().max())


class Row:
    """One timed method: a call on ``batch`` windows."""

    def __init__(self, group: str, method: str, device: str, batch: int, call: Callable[[], object],
                 threads: int | None = None) -> None:
        self.group, self.method, self.device, self.batch, self.call = group, method, device, batch, call
        self.threads = threads  # torch intra-op threads for this call (None: the process default)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU time of this process (all its threads, user + system)
        self.error: float | None = None
        self.speedup: float | None = None  # numpy wall median / this wall median
        self.cpu_speedup: float | None = None  # the same for CPU time

    def run_once(self) -> None:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        default = torch.get_num_threads()
        torch.set_num_threads(self.threads or default)
        try:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            self.call()
            sync()
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)
        finally:
            torch.set_num_threads(default)

    def per_window_ms(self) -> tuple[float, float]:
        """(median, fastest) milliseconds per window."""
        times = np.array(self.times) * 1e3 / self.batch
        return float(np.median(times)), float(times.min())

    def cpu_ms(self) -> float:
        """Median CPU milliseconds per window (this process, all threads): the work done, which waiting for a core
        held by another process does not inflate (OpenMP threads spinning at a barrier do count)."""
        return float(np.median(np.array(self.cpu_times) * 1e3 / self.batch))


def torch_settings(devices: list[str]) -> list[tuple[str, int | None]]:
    """(device, threads) for torch rows: on the CPU the default thread count and, when that is more, 1 thread
    (OpenMP threads wait on each other when other processes hold the cores)."""
    settings: list[tuple[str, int | None]] = []
    for device in devices:
        settings.append((device, None))
        if device == "cpu" and torch.get_num_threads() > 1:
            settings.append((device, 1))
    return settings


def laion_rows(devices: list[str]) -> list[Row]:
    from transformers import ClapFeatureExtractor

    rows: list[Row] = []
    windows = clips(10.0, 48_000, max(BATCHES))
    for truncation, label in (("rand_trunc", "unfused"), ("fusion", "fused")):
        extractor = ClapFeatureExtractor(truncation=truncation)
        for batch in BATCHES:
            part = windows[:batch]
            reference = extractor(part, sampling_rate=48_000, return_tensors="pt")["input_features"]
            numpy_row = Row(f"LAION-CLAP {label}", "numpy `ClapFeatureExtractor`", "cpu", batch,
                            lambda e=extractor, p=part: e(p, sampling_rate=48_000, return_tensors="pt"))
            rows.append(numpy_row)
            for device, threads in torch_settings(devices):
                features = ClapFeatures.from_extractor(extractor).to(device)
                methods = {"torch `ClapFeatures`": features}
                if truncation == "rand_trunc":  # the float32 alternative, for the speed / accuracy trade-off
                    methods["float32 STFT variant (not used)"] = float32_variant(features)
                for method, compute in methods.items():
                    row = Row(f"LAION-CLAP {label}", method, device, batch, lambda f=compute, p=part: f(p), threads)
                    with torch.inference_mode():
                        row.error = relative_error(compute(part), reference)
                    row.reference = numpy_row  # type: ignore[attr-defined]
                    rows.append(row)
    return rows


def float32_variant(features: ClapFeatures) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """``features`` with a float32 ``torch.stft`` instead of the float64 FFT (same padding, filters and dB):
    the alternative the float64 choice was measured against. Its error on the benchmark's windows (tones in noise)
    is small; on a pure chirp it is ~2.5e-3 of the range, above the 1e-4 requirement (``chirp_error``)."""
    window = features.window.float()

    def run(windows: list[np.ndarray]) -> torch.Tensor:
        spectrum = torch.stft(features.pad(windows).float(), features.n_fft, features.hop_length, window=window,
                              center=True, pad_mode="reflect", return_complex=True)  # [B, bins, T]
        power = torch.view_as_real(spectrum.transpose(1, 2)).square().sum(-1)  # [B, T, bins]
        return (10.0 * torch.log10((power @ features.mel_filters).clamp_min(1e-10)))[:, None]

    return run


def chirp_error() -> float:
    """The float32 variant's error on a 10-s chirp (100 Hz to 19 kHz), where bins at the -100 dB floor matter."""
    from transformers import ClapFeatureExtractor

    extractor = ClapFeatureExtractor(truncation="rand_trunc")
    t = np.arange(480_000) / 48_000
    chirp = [(0.5 * np.sin(2 * np.pi * (100 * t + (19_100 - 100) / 20 * t ** 2))).astype(np.float32)]
    reference = extractor(chirp, sampling_rate=48_000, return_tensors="pt")["input_features"]
    with torch.inference_mode():
        return relative_error(float32_variant(ClapFeatures.from_extractor(extractor))(chirp), reference)


def block_rows() -> list[Row]:
    """ClapFeatures on the CPU, one 10-s window, with each block size (frames per FFT call)."""
    from transformers import ClapFeatureExtractor

    windows = clips(10.0, 48_000, 1)
    rows = []
    for _, threads in torch_settings(["cpu"]):
        for block in BLOCKS:
            features = ClapFeatures.from_extractor(ClapFeatureExtractor(truncation="rand_trunc"))
            features.cpu_block_frames = block
            rows.append(Row("block", str(block), "cpu", 1, lambda f=features: f(windows), threads))
    return rows


def front_end_rows(devices: list[str]) -> list[Row]:
    from engine.clap.drcap import DrcapClapBackend, make_tiny_drcap_model
    from engine.clap.msclap import MsClapBackend, make_tiny_msclap_model, train_bert_tokenizer
    from engine.clap.tiny import train_caption_tokenizer
    from engine.config import AudioConfig

    rows = []
    roberta, bert = train_caption_tokenizer(), train_bert_tokenizer()
    # Tiny towers, full-size front ends (the released models' STFT, mel and window sizes).
    for device, threads in torch_settings(devices):
        msclap = MsClapBackend(make_tiny_msclap_model(0, len(bert)), bert, name="tiny", device=device)
        drcap = DrcapClapBackend(make_tiny_drcap_model(0, len(roberta)), roberta, name="tiny",
                                 audio_config=AudioConfig(), device=torch.device(device), fp16=False, batch_size=16,
                                 text_batch_size=16)
        ms_windows, dr_windows = clips(5.0, 44_100, max(BATCHES)), clips(10.0, 32_000, max(BATCHES))
        for batch in BATCHES:
            rows.append(Row("MS-CLAP (5 s, 44.1 kHz)", "`prepare_windows` + `Cnn14.log_mel`", device, batch,
                            lambda m=msclap, w=ms_windows[:batch]: m.model.cnn14.log_mel(m.prepare_windows(w)),
                            threads))
            rows.append(Row("DRCap CLAP (10 s, 32 kHz)", "`prepare_windows` (log-mel + stretch)", device, batch,
                            lambda d=drcap, w=dr_windows[:batch]: d.prepare_windows(w), threads))
    return rows


def one_blas_thread():
    """numpy's BLAS limited to one thread while timing (threadpoolctl, when installed), or no limit.

    After each matrix product OpenBLAS's idle threads spin for a while (up to ~0.1 s) and take a core from whatever
    runs next; in a round-robin that is the torch method after the numpy extractor (measured: median 27 vs 12 ms for
    one torch call right after an extractor call). The extractor's only BLAS call, its mel product, takes ~1.2 ms
    on one thread (~6% of its time)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext("default (threadpoolctl not installed)")
    return threadpool_limits(1, user_api="blas")


def measure(rows: list[Row], repeats: int) -> None:
    with torch.inference_mode():
        for row in rows:  # warm-up (allocations, FFT plans, CUDA kernels)
            row.run_once()
            row.times.clear()
            row.cpu_times.clear()
        for i in range(repeats):
            for row in rows:
                row.run_once()
            if (i + 1) % max(1, repeats // 5) == 0:
                log(f"round {i + 1}/{repeats}")
    for row in rows:
        reference = getattr(row, "reference", None)
        if reference is not None:  # both timed in the same rounds: ratio of medians
            row.speedup = reference.per_window_ms()[0] / row.per_window_ms()[0]
            row.cpu_speedup = reference.cpu_ms() / row.cpu_ms()


def fmt(x: float) -> str:
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def render(res: dict, rows: list[Row], blocks: list[Row]) -> str:
    m = res["machine"]
    lines = [SECTION_TITLE, "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ", f"Runtime: {res['runtime_s']:.0f} s  ",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads "
             f"{m['torch_threads']}, numpy BLAS threads while timing {res['blas_threads']} (see `one_blas_thread`); "
             f"GPU: {res['gpu']}; Python {m['python']}, torch {m['torch']}, transformers "
             f"{m['transformers']}, numpy {m['numpy']}  ",
             f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f}  ",
             "Other processes' CPU use during the run (from /proc/stat minus this process; 0 = quiet, 2 = both "
             f"cores busy): {res['others_cores']:.2f} cores on average", "",
             f"Per window, milliseconds: median / fastest of {res['repeats']} timed calls after a warm-up, all "
             "methods timed round-robin (one call of each per round), so contention from other processes falls on "
             "all alike. Speed-up = numpy median / torch median, same batch, same rounds. CPU ms = median CPU "
             "time of this process per window (all threads, user + system): waiting for a core that another "
             "process holds does not count, spinning OpenMP threads do, so on a busy machine it is the steadier "
             "measure of work (for the GPU rows it is the host's share only). Error = max |torch - numpy| / max "
             "|numpy| over the batch (the requirement is 1e-4). Inputs: 10-s windows at 48 kHz (two tones + "
             "noise, a different one per row of the batch), float32 numpy arrays as the backends get them.", "",
             "| front end | method | device | torch threads | batch | wall ms per window (median / fastest) "
             "| speed-up vs numpy (wall) | CPU ms per window | speed-up vs numpy (CPU) | error vs numpy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r.group, r.batch, r.device, -(r.threads or 99))):
        median, fastest = row.per_window_ms()
        speed = f"**{row.speedup:.1f}x**" if row.speedup is not None else ""
        cpu_speed = f"{row.cpu_speedup:.1f}x" if row.cpu_speedup is not None else ""
        error = f"{row.error:.1e}" if row.error is not None else ""
        threads = "" if row.method.startswith("numpy") or row.device != "cpu" else (row.threads or m["torch_threads"])
        lines.append(f"| {row.group} | {row.method} | {row.device} | {threads} | {row.batch} "
                     f"| {fmt(median)} / {fmt(fastest)} | {speed} | {fmt(row.cpu_ms())} | {cpu_speed} | {error} |")
    lines += ["", f"`ClapFeatures` CPU block size (frames per FFT call), one 10-s window (1001 frames), unfused, timed "
              f"in the same rounds; the module uses `cpu_block_frames = {ClapFeatures.cpu_block_frames}`:", "",
              "| frames per FFT call | torch threads | wall ms per window (median / fastest) | CPU ms per window |",
              "|---:|---:|---:|---:|"]
    for row in blocks:
        median, fastest = row.per_window_ms()
        lines.append(f"| {row.method} | {row.threads or m['torch_threads']} | {fmt(median)} / {fmt(fastest)} "
                     f"| {fmt(row.cpu_ms())} |")
    timed = [r for r in rows if r.speedup is not None and r.method.startswith("torch")]

    def label(r: Row) -> str:
        threads = f", {r.threads or m['torch_threads']} thread(s)" if r.device == "cpu" else ""
        return f"{r.group.split()[-1]}, {r.device}{threads}, batch {r.batch}"

    lines += ["", "Speed-up of `ClapFeatures` over the numpy extractor, wall (CPU time), medians of the same rounds: "
              + "; ".join(f"{label(r)}: {r.speedup:.1f}x ({r.cpu_speedup:.1f}x)" for r in timed) + "."]
    met = [f"{label(r)} ({r.speedup:.1f}x)" for r in timed if r.speedup >= TARGET]
    missed = [f"{label(r)} ({r.speedup:.1f}x)" for r in timed if r.speedup < TARGET]
    lines += ["", f"Target: at least {TARGET:.0f}x the numpy extractor's speed (wall medians). Met: "
              f"{', '.join(met) or 'none'}. Not met: {', '.join(missed) or 'none'}."]
    lines += ["", "Notes:", "",
              "- `ClapFeatures` computes what `ClapFeatureExtractor.__call__` returns for windows that fit (repeatpad, "
              "periodic Hann, centred reflect-padded STFT, |X|^2, the extractor's own mel filters, 10·log10 with the "
              "1e-10 floor) with `torch.fft.rfft` over the framed windows (the whole batch in one call on a GPU). "
              "The STFT is float64, as the extractor's (a float32 FFT fails the 1e-4 requirement on pure tones, "
              "see the float32 rows); float64 is 1e-7 off (tests/test_features.py checks noise, sine, chirp, near "
              "and exact silence, 0.05-s and 10-s windows, mixed batches, fused and unfused, other sizes).",
              f"- The float32 STFT variant rows (not used) show what the float64 FFT costs: on the benchmark's "
              f"windows (tones in noise) its error is small, but on a pure chirp it is {res['chirp_error']:.1e} of "
              "the range (bins at the -100 dB floor lifted by up to 0.25 dB), above the 1e-4 requirement.",
              "- On the CPU `ClapFeatures` computes one row at a time, a whole window per FFT call, in buffers it "
              "keeps between calls (fresh multi-megabyte buffers came back from the kernel as fresh pages on most "
              "calls, which cost about as much as the FFT here). The block table is why whole windows: cache-sized "
              "blocks of frames save a little work on one thread, but every block is more parallel ops, each of "
              "which waits for a second thread on a busy machine.",
              "- 1 vs default torch threads: every torch op of this size runs as an OpenMP parallel region, and when "
              "other processes hold the cores each region waits for its second thread to be scheduled, with the "
              "first one spinning (CPU ms far above the 1-thread rows' for the same work). The numpy extractor runs "
              "in one thread and does not wait like that. The 1-thread rows are the comparison of work; the "
              "default-thread rows show what contention does to small parallel ops (the audio towers pay it too).",
              "- The MS-CLAP and DRCap front ends are the authors' float32 torchlibrosa-style conv STFTs (unchanged, "
              "kept identical to the released code); their times include tiling (MS-CLAP) and the bicubic stretch "
              "to 1024 frames (DRCap). The conv computes the DFT as a matrix product (about 1 GFLOP for 10 s), more "
              "work than an FFT; `torch.stft` would agree with it to float32 rounding (tests/test_clap_drcap.py) but "
              "is not used, so that these stay the released computation.",
              "- numpy's BLAS runs one thread while timing: after each matrix product OpenBLAS's idle threads spin "
              "for up to ~0.1 s and took the core from the torch call that followed the extractor's (median 27 vs "
              "12 ms measured); the extractor's one BLAS call (its 64 x 513 x 1001 mel product) takes 1.2 ms on one "
              "thread, ~6% of its time.",
              "- Timings on a shared machine are approximate; treat differences under ~30% as noise."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (each method once per round)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "RESULTS.md",
                   help="markdown file to write this script's section into ('-' = do not write)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    whole_run = CpuShare()
    args = parse_args(argv)
    command = run_command("benchmarks.bench_features", argv)
    import transformers
    transformers.logging.set_verbosity_error()
    load_start = os.getloadavg()[0]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    log(f"devices: {devices}; building inputs and front ends")
    rows = laion_rows(devices) + front_end_rows(devices)
    blocks = block_rows()
    log(f"timing {len(rows) + len(blocks)} methods, {args.repeats} rounds")
    with one_blas_thread() as limit:
        measure(rows + blocks, args.repeats)
    blas = limit if isinstance(limit, str) else "1"
    res = {"command": command, "machine": machine_facts(), "repeats": args.repeats, "blas_threads": blas,
           "chirp_error": chirp_error(),
           "load_start": load_start,
           "load_end": os.getloadavg()[0], "others_cores": whole_run.others(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
           "runtime_s": time.perf_counter() - started}
    section = render(res, rows, blocks)
    print(section)
    if str(args.out) != "-":
        write_section(args.out, section, SECTION_TITLE)
        log(f"wrote the section to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
