"""The engine at real sizes on a GPU: per-stage times of captioning one 10-s clip, decode tokens/s (plain
``generate`` next to the fast path, same run), clips/s of featurisation + audio tower at batch 64, peak GPU memory
of the whole DRCap profile, and prompt tuning of 10 and 50 classes.

    python -m benchmarks.bench_gpu                      # real sizes, on CUDA (random weights; ~5 min on an H100)
    python -m benchmarks.bench_gpu --tiny --device cpu  # tiny models on the CPU (what the test runs)

Models, all with random weights (nothing can be downloaded; speed and memory depend on shapes, not on values):

* CLAP: ``ClapModel(ClapConfig())``, the architecture of ``laion/clap-htsat-unfused`` (HTSAT + RoBERTa-base,
  512-d), loaded through ``HFClapBackend.from_pretrained`` like a downloaded one.
* LLM: a Llama with Vicuna-7B v1.5's shapes (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000), written
  to a local folder and loaded through ``engine.llm.load_llm`` in nf4 (bitsandbytes, the GPU default) and in fp16,
  with DRCap's LoRA (r 8 on q_proj, v_proj) and mapping network attached by ``engine.captioner.build_model``.
* Datastore: 45,716 captions (AudioCaps train's size) with random unit vectors, flat index.

Generation runs for a fixed number of new tokens (``--new-tokens``; EOS is never produced by a random model in
practice, and each run checks how many tokens came out), so tokens/s is steps / time. Results go to stdout
(markdown) and to this script's section of ``--out``; other sections are kept.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import benchmarks.bench_datastore as bench_datastore  # sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM first
from benchmarks.bench_datastore import random_store, write_section

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from engine.audio import load_audio  # noqa: E402
from engine.captioner import Captioner  # noqa: E402
from engine.clap.hf import HFClapBackend  # noqa: E402
from engine.clap.tiny import build_tiny_clap  # noqa: E402
from engine.config import AppConfig, PromptTuningConfig  # noqa: E402
from engine.drcap import project_onto_support  # noqa: E402
from engine.fast_decode import FastPlan  # noqa: E402
from engine.llm import build_tiny_llama, train_llama_tokenizer  # noqa: E402
from engine.prompt_tuning import training_texts, tune  # noqa: E402
from engine.text_selection import select_texts  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## GPU (benchmarks/bench_gpu.py)"
CAPTIONS = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"
STORE_SIZE = 45_716  # AudioCaps train's unique captions
CLIP_S = 10.0
# Vicuna-7B v1.5 (lmsys/vicuna-7b-v1.5 config.json): LlamaForCausalLM
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TUNING_CLASSES = ["dog", "cat", "siren", "rain", "bird", "engine", "train", "bell", "water", "wind",
                  "thunder", "car", "horn", "baby", "music", "bus", "truck", "motorcycle", "helicopter", "airplane",
                  "boat", "duck", "chicken", "rooster", "cow", "sheep", "pig", "horse", "frog", "insect",
                  "bee", "clock", "alarm", "phone", "door", "footsteps", "applause", "cough", "sneeze", "snore",
                  "typing", "toilet", "drill", "explosion", "fireworks", "whistle", "crowd", "waves", "owl", "violin"]


def log(message: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------------------------
# models


def build_clap(folder: Path, tiny: bool) -> None:
    if tiny:
        build_tiny_clap(folder, seed=0)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        captions = CAPTIONS.read_text(encoding="utf-8").splitlines()
        bench_datastore.build_full_random_clap(folder, captions, seed=0)


def build_llm(folder: Path, tiny: bool, device: torch.device) -> dict:
    """A random Llama saved with its tokenizer: tiny, or Vicuna-7B-shaped (made on the GPU in fp16: seconds, where
    a CPU float32 init of 6.7 B parameters takes minutes and 27 GB)."""
    if tiny:
        build_tiny_llama(folder, seed=0)
        return {"shape": "tiny (hidden 64, 2 layers)"}
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_llama_tokenizer(vocab_size=8000)
    config = LlamaConfig(**VICUNA_7B, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    with torch.no_grad():  # HF's init leaves a std-0.02 normal everywhere; keep activations in fp16 range
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="4GB")
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"shape": "Vicuna-7B v1.5 (hidden 4096, 32 layers, MLP 11008, vocab 32000)", "params": params}


def app_config(clap_dir: Path, llm_dir: Path, device: str, quantization: str, dtype: str) -> AppConfig:
    config = AppConfig()
    config.clap.backend, config.clap.model, config.clap.device = "hf", str(clap_dir), device
    config.llm.model, config.llm.device, config.llm.quantization, config.llm.dtype = (
        str(llm_dir), device, quantization, dtype)
    config.caption.checkpoint = ""  # random mapping network + LoRA (DRCap's shapes)
    return config


# --------------------------------------------------------------------------------------------------------------------
# measurements


def clap_stages(clap: HFClapBackend, wav: Path, repeats: int) -> dict:
    """decode audio -> features -> audio tower (+ projection) for one 10-s clip."""
    device = clap.device
    audio = load_audio(wav, clap.sample_rate)
    windows = [audio.waveform]
    features, is_longer = clap._input_features(windows)
    with torch.inference_mode():
        return {
            "decode audio": timed_ms(lambda: load_audio(wav, clap.sample_rate), device, repeats),
            "features": timed_ms(lambda: clap._input_features(windows), device, repeats),
            "audio tower": timed_ms(lambda: clap.model.audio_projection(clap.model.audio_model(
                input_features=features, is_longer=is_longer).pooler_output), device, repeats),
        }


def batch_throughput(clap: HFClapBackend, batch: int, repeats: int) -> dict:
    """Clips/s of featurisation + audio tower (+ projection) for ``batch`` 10-s clips in one call."""
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(CLIP_S * clap.sample_rate))).astype(np.float32) for _ in range(batch)]
    ms = timed_ms(lambda: clap.embed_windows(clips, batch_size=batch), clap.device, repeats)
    return {"batch": batch, "ms": ms, "clips_per_s": 1000 * batch / ms}


def generation_stages(captioner: Captioner, clap: HFClapBackend, store, wav: Path, new_tokens: int, repeats: int,
                      num_beams: int) -> dict:
    """Retrieval, projection, prefill, decode (plain generate and the fast path) and end to end for one clip."""
    device = clap.device
    model, cfg = captioner.model, captioner.config
    audio = load_audio(wav, clap.sample_rate)
    embedding = clap.embed_audio([audio])  # [1, D]
    found = store.search(embedding, cfg.rag_k)
    similar = [found.captions[0]]
    projected, _ = project_onto_support(embedding, captioner.support.embeddings, captioner.temperature)
    out: dict = {
        "retrieval": timed_ms(lambda: store.search(embedding, cfg.rag_k), device, repeats),
        "projection": timed_ms(lambda: project_onto_support(embedding, captioner.support.embeddings,
                                                            captioner.temperature), device, repeats),
        "prefill": timed_ms(lambda: prefill(model, projected, similar), device, repeats),
    }
    # On the CPU the engine's fast path is plain generate (engine.fast_decode.CPU_DECISION); the static-cache loop
    # is forced there so that the comparison still exercises it.
    fast_path = True if device.type == "cuda" else FastPlan(compile=False, mode=None)
    for label, fast in (("plain generate", False), ("fast path", fast_path)):
        ids = generated_ids(model, projected, similar, num_beams, new_tokens, fast)
        ms = timed_ms(lambda: generated_ids(model, projected, similar, num_beams, new_tokens, fast), device,
                      repeats, warmup=2)
        steps = ids.shape[-1]
        out[label] = {"ms": ms, "tokens": steps, "tokens_per_s": 1000 * steps / ms, "ids": ids.tolist()}
    out["identical tokens"] = out["plain generate"]["ids"] == out["fast path"]["ids"]
    settings = replace(cfg, num_beams=num_beams, max_new_tokens=new_tokens, fast_decoding=True)
    out["end to end"] = timed_ms(
        lambda: captioner.caption_embedded([clap.embed_windows([load_audio(wav, clap.sample_rate)])[0]],
                                           settings=settings), device, repeats)
    return out


def prefill(model, projected: torch.Tensor, similar: Sequence[Sequence[str]]) -> None:
    """One forward over the whole prompt (what generation does before its first token)."""
    from engine.drcap import _to

    device = model.encoder_projector.linear1.weight.device
    batch = _to(model.prepare(similar, None, left_pad=True), device)
    with torch.inference_mode():
        model.llm(inputs_embeds=model.embed(batch, projected.to(device)), attention_mask=batch.attention_mask)


def generated_ids(model, projected: torch.Tensor, similar, num_beams: int, new_tokens: int,
                  fast: bool | FastPlan) -> torch.Tensor:
    return model.generate_ids(projected, similar, num_beams=num_beams, max_new_tokens=new_tokens, fast=fast)


def tuning_times(clap: HFClapBackend, class_counts: Sequence[int], presets: Sequence[str], caption_count: int
                 ) -> list[dict]:
    """Prompt tuning as the app runs it (texts selected from the shipped captions, the first ``caption_count``
    or all) for each class count and preset: selection and tuning wall time."""
    captions = CAPTIONS.read_text(encoding="utf-8").splitlines()[:caption_count or None]
    embeddings = clap.embed_text(captions).numpy()
    rows = []
    for count in class_counts:
        names = TUNING_CLASSES[:count]
        for preset in presets:
            config = PromptTuningConfig.from_preset(preset)
            start = time.perf_counter()
            selection = select_texts(names, captions, clap=clap, caption_embeddings=embeddings,
                                     min_per_class=config.min_texts_per_class,
                                     max_per_class=config.max_texts_per_class, seed=config.seed)
            data = training_texts(selection, config.multi_label)
            selected = time.perf_counter()
            prompts = tune(clap, names, data, config)
            sync(clap.device)
            done = time.perf_counter()
            rows.append({"classes": count, "preset": preset, "texts": len(data.texts), "select_s": selected - start,
                         "tune_s": done - selected, "epochs": len(prompts.report.get("epoch_losses", [])) or None})
            log(f"tuning {count} classes ({preset}): {done - selected:.1f} s")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# run


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    clap_dir, llm_dir, wav = work / "clap", work / "llm", work / "clip.wav"
    rng = np.random.default_rng(1)
    sf.write(wav, (0.1 * rng.standard_normal((int(44_100 * CLIP_S), 2))).astype(np.float32), 44_100,
             subtype="PCM_16")  # a 10-s stereo 44.1-kHz WAV: decoding includes resampling to the CLAP's rate
    log(f"building models in {work}")
    build_clap(clap_dir, args.tiny)
    llm_facts = build_llm(llm_dir, args.tiny, device)
    res: dict = {"args": vars(args), "machine": machine(device), "llm": llm_facts, "profiles": {}}
    clap = HFClapBackend.from_pretrained(str(clap_dir), device=args.device, fp16=True)
    res["clap"] = {"params": sum(p.numel() for p in clap.model.parameters()), "dtype": str(clap.dtype)}
    res["clap_stages"] = clap_stages(clap, wav, args.repeats)
    res["batch"] = batch_throughput(clap, args.batch, max(2, args.repeats // 2))
    log(f"featurisation + audio tower, batch {args.batch}: {res['batch']['clips_per_s']:.0f} clips/s")
    captions = CAPTIONS.read_text(encoding="utf-8").splitlines()
    store_captions = (captions * (STORE_SIZE // len(captions) + 1))[:args.store_size]
    store = random_store(store_captions, clap.embedding_dim, clap)
    for quantization, dtype in args.llm_modes:
        label = f"{quantization}/{dtype}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        config = app_config(clap_dir, llm_dir, args.device, quantization, dtype)
        captioner = Captioner.from_config(config, clap, store)
        profile = {"llm": captioner.llm.describe()}
        for beams in args.beams:
            profile[f"beams={beams}"] = generation_stages(captioner, clap, store, wav, args.new_tokens,
                                                          args.repeats, beams)
            log(f"{label} beams {beams}: " + ", ".join(
                f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in profile[f"beams={beams}"].items()
                if isinstance(v, dict)))
        profile["peak_gb"] = peak_gb(device)
        res["profiles"][label] = profile
        del captioner
    if args.tuning_classes:
        res["tuning"] = tuning_times(clap, args.tuning_classes, args.tuning_presets, args.tuning_captions)
    return res


def machine(device: torch.device) -> dict:
    import transformers

    facts = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
             "cpu_cores": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                     cuda=torch.version.cuda)
        try:
            import bitsandbytes

            facts["bitsandbytes"] = bitsandbytes.__version__
        except ImportError:
            pass
    return facts


# --------------------------------------------------------------------------------------------------------------------
# report


def render(res: dict) -> str:
    a, m = res["args"], res["machine"]
    where = m.get("gpu", "CPU") + (f" ({m['gpu_memory_gb']} GB)" if "gpu" in m else "")
    lines = [SECTION_TITLE, "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {where}, torch {m['torch']}, "
             f"transformers {m['transformers']}. Command: `{res['command']}`.",
             f"Sizes: {'tiny test models' if a['tiny'] else 'real'}; LLM {res['llm']['shape']}; CLAP "
             f"{res['clap']['params'] / 1e6:.0f} M parameters ({res['clap']['dtype'].replace('torch.', '')}); "
             f"datastore {a['store_size']:,} captions; {a['new_tokens']} new tokens per caption; median of "
             f"{a['repeats']} runs.", "",
             "### One 10-s clip, batch 1 (ms)", "",
             "| stage | " + " | ".join(res["profiles"]) + " |",
             "|---|" + "---:|" * len(res["profiles"])]
    first = next(iter(res["profiles"].values()))
    beams = [k for k in first if k.startswith("beams=")]
    for stage, ms in res["clap_stages"].items():
        lines.append(f"| {stage} | " + " | ".join(f"{ms:.1f}" for _ in res["profiles"]) + " |")
    for beam in beams:
        for stage in ("retrieval", "projection", "prefill"):
            if beam != beams[0] and stage != "prefill":
                continue
            lines.append(f"| {stage}{' (' + beam + ')' if stage == 'prefill' else ''} | "
                         + " | ".join(f"{p[beam][stage]:.1f}" for p in res["profiles"].values()) + " |")
        for path in ("plain generate", "fast path"):
            lines.append(f"| decode {a['new_tokens']} tokens, {path} ({beam}) | " + " | ".join(
                f"{p[beam][path]['ms']:.0f} ({p[beam][path]['tokens_per_s']:.0f} tok/s)"
                for p in res["profiles"].values()) + " |")
        lines.append(f"| **end to end**, file → caption, fast path ({beam}) | " + " | ".join(
            f"**{p[beam]['end to end']:.0f}**" for p in res["profiles"].values()) + " |")
    lines.append("| fast path tokens identical to plain generate | " + " | ".join(
        "yes" if all(p[b]["identical tokens"] for b in beams) else "**NO**" for p in res["profiles"].values()) + " |")
    lines.append("| peak GPU memory, whole profile (GB) | " + " | ".join(
        f"{p['peak_gb']:.2f}" if p["peak_gb"] is not None else "n/a (CPU)" for p in res["profiles"].values()) + " |")
    b = res["batch"]
    lines += ["", f"Featurisation + audio tower, batch {b['batch']} × 10 s: **{b['clips_per_s']:,.0f} clips/s** "
              f"({b['ms']:.0f} ms per batch)."]
    if res.get("tuning"):
        lines += ["", "### Prompt tuning (texts selected from the shipped AudioCaps captions)", "",
                  "| classes | preset | training texts | selection (s) | tuning (s) |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['classes']} | {r['preset']} | {r['texts']} | {r['select_s']:.1f} | {r['tune_s']:.1f} |"
                  for r in res["tuning"]]
    if a["tiny"]:
        lines += ["", "Tiny models: these rows check that the script runs; they say nothing about real speed."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU test of the script)")
    p.add_argument("--llm", default="nf4/fp16,none/fp16",
                   help="LLM modes, quantization/dtype, comma-separated (default: nf4 and fp16)")
    p.add_argument("--beams", default="1,4", help="beam counts to measure (greedy and DRCap's 4)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per caption")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="clips per batch for the throughput row")
    p.add_argument("--store-size", type=int, default=STORE_SIZE)
    p.add_argument("--tuning-classes", default="10,50", help="class counts to tune ('' to skip)")
    p.add_argument("--tuning-presets", default="default,quick", help="tuning presets, comma-separated")
    p.add_argument("--tuning-captions", type=int, default=0, help="captions to select tuning texts from (0 = all)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    args.llm_modes = [tuple(m.split("/")) for m in args.llm.split(",") if m]
    args.beams = [int(b) for b in args.beams.split(",") if b]
    args.tuning_classes = [int(c) for c in args.tuning_classes.split(",") if c]
    args.tuning_presets = [s for s in args.tuning_presets.split(",") if s]
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but this machine has no CUDA device; use --device cpu (with --tiny)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    res["command"] = "python -m benchmarks.bench_gpu " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    section = render(res)
    print(section)
    write_section(args.out, section, SECTION_TITLE)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in res.items()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
