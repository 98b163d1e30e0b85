"""Benchmark DRCap decoding: plain ``generate`` next to the fast path (static KV cache, compiled decode step).

    python -m benchmarks.bench_decoding [--models tiny,mid] [--max-new-tokens N] [--repeats N] [--threads N]
                                        [--no-compile] [--out benchmarks/RESULTS.md]

Two random Llamas built by ``engine.llm.build_tiny_llama`` (fp32, CPU), each under a DRCap mapping network with the
rag_first prompt (three retrieved captions, as the app builds it):

* ``tiny``: hidden 64, 2 layers: the offline profile's LLM;
* ``mid``: hidden 512, 4 layers (intermediate 1024, vocabulary 2,000).

Variants, all through :meth:`engine.drcap.DrcapModel.generate_ids`: ``plain`` (``fast=False``), ``static`` (static
cache, eager decode step) and ``compiled`` (static cache + ``torch.compile`` inductor decode step). The first call of
each variant is timed on its own (it includes compilation, cold: inductor's on-disk cache is pointed at an empty
temporary folder, as on a machine's first start); the table shows the median of the next ``--repeats``.
Tokens are the tokens each output row holds up to its EOS; every variant's token ids are compared with plain's.

:func:`measure_decoding` is the reusable part (benchmarks/bench_gpu.py can call it with a GPU model and
``{"plain": False, "fast": True}``). Results go to stdout (markdown) and into this script's section of ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.bench_datastore import CpuShare, machine_facts, run_command, seed_everything, write_section

import torch  # noqa: E402

from engine.config import LLMConfig  # noqa: E402
from engine.drcap import DrcapModel, PromptLayout  # noqa: E402
from engine.fast_decode import CPU_DECISION, FastPlan, compile_failed  # noqa: E402
from engine.llm import build_tiny_llama, load_llm  # noqa: E402

SECTION_TITLE = "## Decoding (benchmarks/bench_decoding.py)"
MODELS = {"tiny": {"hidden_size": 64, "layers": 2}, "mid": {"hidden_size": 512, "layers": 4}}
SIMILAR = ["A dog barks while a car passes by", "Rain falls on a tin roof", "People talk in a crowded room"]
PROMPTS = [SIMILAR, SIMILAR[:1], SIMILAR[1:], ["Wind blows hard"] + SIMILAR]  # rows of different lengths
CLAP_DIM = 512
CASES = ((1, 1), (4, 1), (4, 4))  # (beams, rows): greedy, beam 4 as the app decodes one clip, a batch of 4


def log(message: str) -> None:
    print(f"[bench_decoding {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def generated_tokens(ids: torch.Tensor, eos: int) -> int:
    """Tokens in [B, T] output ids up to and including each row's first EOS (what follows is padding)."""
    total = 0
    for row in ids.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def measure_decoding(model: DrcapModel, embeddings: torch.Tensor, similar: Sequence[Sequence[str]], *,
                     num_beams: int, max_new_tokens: int, variants: Mapping[str, bool | FastPlan],
                     repeats: int = 3) -> list[dict]:
    """Time ``model.generate_ids`` for each variant (``fast=`` value) on the same inputs.

    Per variant: first-call seconds (with any compilation), median seconds of ``repeats`` more calls, generated tokens
    and tokens/s, whether its ids equal the first variant's, and whether compiling the model's decode step has failed
    so far (the fast path then decodes eagerly). CUDA is synchronised around each call.
    """
    def call(fast: bool | FastPlan) -> tuple[torch.Tensor, float]:
        if embeddings.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ids = model.generate_ids(embeddings, similar, num_beams=num_beams, max_new_tokens=max_new_tokens, fast=fast)
        if embeddings.is_cuda:
            torch.cuda.synchronize()
        return ids, time.perf_counter() - start

    rows, reference = [], None
    for name, fast in variants.items():
        ids, first_s = call(fast)
        times = [call(fast)[1] for _ in range(repeats)]
        reference = ids if reference is None else reference
        tokens = generated_tokens(ids, model.tokenizer.eos_token_id)
        median = statistics.median(times)
        rows.append({"variant": name, "first_s": first_s, "median_s": median, "tokens": tokens,
                     "steps": ids.shape[1], "tok_per_s": tokens / median, "identical": torch.equal(ids, reference),
                     "compile_failed": compile_failed(model.llm)})
        log(f"{name}: first {first_s:.2f} s, median {median:.3f} s, {tokens / median:.1f} tok/s, "
            f"identical {rows[-1]['identical']}")
    return rows


def build_model(name: str, workdir: Path) -> DrcapModel:
    spec = MODELS[name]
    directory = build_tiny_llama(workdir / name, seed=0, hidden_size=spec["hidden_size"], layers=spec["layers"])
    loaded = load_llm(LLMConfig(model=str(directory), dtype="fp32", device="cpu"))
    seed_everything(0)
    return DrcapModel(loaded.model, loaded.tokenizer, CLAP_DIM, 2048, PromptLayout()).eval()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see the section's note)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    return args


def render(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION_TITLE, "", f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Runtime: {res['runtime_s']:.0f} s  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {res['threads']}; torch {m['torch']}, "
             f"transformers {m['transformers']}  ",
             f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f}; other "
             f"processes' CPU use during the run: {res['others_cores']:.2f} cores on average (0 = quiet, 2 = both "
             "cores busy)", "",
             "> **Timings are approximate** (a shared 2-core machine, see the load above). One torch thread: with two "
             "OpenMP threads and another process on a core, the threads wait on each other and small matmuls take "
             "up to 100x as long, which would measure the contention, not the decoding. Ratios within one row are "
             "the figures to read; every variant decodes the same inputs right after the others.", "",
             f"rag_first prompt (3 retrieved captions), fp32 on the CPU, max_new_tokens {res['max_new_tokens']}; "
             f"median of {res['repeats']} calls after a first one (the first includes compilation, with an empty "
             "inductor cache; a restart that finds the on-disk cache compiles faster). Tokens: output "
             "tokens up to each row's EOS. `same ids`: the token ids equal plain generate's.", "",
             "| model | decoding | rows | variant | first call (s) | median (s) | tokens | tokens/s | vs plain | "
             "same ids |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for case in res["cases"]:
        plain = case["rows"][0]["tok_per_s"]
        for r in case["rows"]:
            lines.append(f"| {case['model']} | {case['decoding']} | {case['batch']} | {r['variant']} | "
                         f"{r['first_s']:.2f} | {r['median_s']:.3f} | {r['tokens']} | {r['tok_per_s']:.1f} | "
                         f"{r['tok_per_s'] / plain:.2f}x | {'yes' if r['identical'] else '**no**'} |")
    if any(r["compile_failed"] for case in res["cases"] for r in case["rows"]):
        lines += ["", "**Compiling the decode step failed** for at least one model (see the log): its compiled rows "
                  "decoded eagerly."]
    lines += ["", f"Decision (engine/fast_decode.py): {CPU_DECISION}. The fast path's CUDA plan (static cache + "
              "CUDA graphs) is measured on a GPU by benchmarks/bench_gpu.py."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    started, share = time.perf_counter(), CpuShare()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    variants: dict[str, bool | FastPlan] = {"plain": False, "static": FastPlan(compile=False)}
    if not args.no_compile:
        variants["compiled"] = FastPlan(compile=True, backend="inductor", mode=None)
    res: dict = {"command": run_command("benchmarks.bench_decoding", argv),
                 "machine": machine_facts(), "threads": torch.get_num_threads(), "load_start": os.getloadavg()[0],
                 "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "cases": [],
                 "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="bench-decoding-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold compiles, not the last run's
        for name in args.model_list:
            model = build_model(name, Path(tmp))
            for beams, batch in CASES:
                log(f"{name}: beams {beams}, rows {batch}")
                embeddings = torch.nn.functional.normalize(torch.randn(batch, CLAP_DIM), dim=-1)
                rows = measure_decoding(model, embeddings, PROMPTS[:batch], num_beams=beams,
                                        max_new_tokens=args.max_new_tokens, variants=variants, repeats=args.repeats)
                res["cases"].append({"model": name, "decoding": "greedy" if beams == 1 else f"beam {beams}",
                                     "batch": batch, "rows": rows})
            del model
            gc.collect()
    res.update(load_end=os.getloadavg()[0], others_cores=share.others(), runtime_s=time.perf_counter() - started)
    section = render(res)
    print(section)
    if str(args.out) != "-":
        write_section(args.out, section, SECTION_TITLE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
