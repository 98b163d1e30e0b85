"""Build the offline demo bundle from scratch: sound corpus -> demo CLAP -> datastores -> DRCap decoder.

    python -m trainers.build_demo_bundle                       # the shipped bundle (assets/demo), ~40-60 min
    python -m trainers.build_demo_bundle --smoke --work /tmp/w --out /tmp/bundle   # CI-sized, ~1 min

Steps (each is skipped when its output already exists in --work, so an interrupted build resumes):
1. corpus:   trainers.soundworld (Debian-package recordings + procedural synthesis), --work/soundworld
2. clap:     trainers.train_demo_clap: audio tower trained against the frozen all-MiniLM-L6-v2 -> <out>/clap
3. stores:   caption datastores (compact: float16, exact index rebuilt on load): style A and style B captions of the
             corpus' training clips, and the AudioCaps training captions -> <out>/stores/{style_a,style_b,audiocaps}
4. decoder:  a small Llama (BPE tokenizer trained on the captions) trained DRCap-style on text only with
             trainers.train_drcap (AudioCaps + style-A captions; full fine-tune of LLM + mapping network)
             -> <out>/decoder (the checkpoint, with its LLM in llm/, weights in float16)
Then <out>/bundle.json records what was built, from what, and how long each step took.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.clap.demo import save_sentence_cache
from engine.config import AppConfig, DemoClapTrainConfig, DrcapTrainConfig, PROJECT_ROOT
from engine.datastore import CaptionDatastore, read_captions, unique_captions
from engine.errors import ConfigError
from engine.service import AudioScribe
from trainers.cli import run_trainer

log = logging.getLogger("build_demo_bundle")
STEPS = ("corpus", "clap", "stores", "decoder", "examples")
AUDIOCAPS_SHARED = PROJECT_ROOT.parent / "shared" / "data" / "audiocaps"
AUDIOCAPS_SHIPPED = PROJECT_ROOT / "assets" / "captions" / "audiocaps_train.txt"


@dataclass
class BundleConfig:
    """What the bundle build makes; the defaults build the shipped bundle."""

    out: str = "assets/demo"
    work: str = "data/bundle_work"  # corpus, caches and training runs (not committed)
    seed: int = 0
    smoke: bool = False  # a CI-sized build: tiny corpus (procedural sources only), a few steps each
    train_clips: int = 8000
    val_clips: int = 600
    test_clips: int = 600
    clap_epochs: int = 14
    clap_minutes: float = 14.0
    store_max: int = 6000  # captions per corpus datastore (style A / style B), evenly spaced over the unique ones
    audiocaps_store: bool = True
    decoder_hidden: int = 256
    decoder_layers: int = 4
    decoder_vocab: int = 4000
    decoder_steps: int = 1400
    decoder_batch: int = 32
    decoder_lr: float = 1e-3
    decoder_noise: float = 0.02  # CapDec-style noise on the text embedding while training (DRCap uses none)
    band_low: float = 0.6  # training retrieval band for this CLAP (DRCap's 0.75-0.85 suits LAION-sized ones)
    band_high: float = 0.9
    mapping_hidden: int = 512
    examples: str = "assets/examples"  # example clips the bundle describes well (picked on the test split)
    heldout: str = "tests/data/heldout"  # evenly spaced test-split clips the bundle's tests check (not picked)
    steps: list[str] = field(default_factory=lambda: ["corpus", "clap", "stores", "decoder", "examples"])


def smoke_overrides(cfg: BundleConfig) -> BundleConfig:
    """Sizes for the CI smoke build: the whole pipeline, end to end, in about a minute."""
    return BundleConfig(**{**asdict(cfg), "train_clips": 96, "val_clips": 24, "test_clips": 24, "clap_epochs": 2,
                           "clap_minutes": 0.0, "store_max": 200, "audiocaps_store": False, "decoder_hidden": 32,
                           "decoder_layers": 1, "decoder_vocab": 400, "decoder_steps": 6, "decoder_batch": 8,
                           "mapping_hidden": 32, "examples": str(Path(cfg.out) / "examples"),
                           "heldout": str(Path(cfg.out) / "heldout")})


# --------------------------------------------------------------------------------------------------------------------
# steps


def build_corpus(cfg: BundleConfig, work: Path) -> Path:
    from trainers import soundworld

    corpus = work / "soundworld"
    if (corpus / "manifest.jsonl").is_file():
        return corpus
    return soundworld.build(corpus, seed=cfg.seed, n_train=cfg.train_clips, n_val=cfg.val_clips,
                            n_test=cfg.test_clips, smoke=cfg.smoke)


def train_clap(cfg: BundleConfig, corpus: Path, out: Path) -> dict:
    from trainers.train_demo_clap import train

    extra = [] if cfg.smoke else [str(AUDIOCAPS_SHIPPED)]
    train_cfg = DemoClapTrainConfig(corpus=str(corpus), out=str(out / "clap"), extra_text=extra,
                                    sentence_cache=str(Path(cfg.work) / "sentence_cache.npz"),
                                    epochs=cfg.clap_epochs, minutes=cfg.clap_minutes, seed=cfg.seed,
                                    batch_size=16 if cfg.smoke else 64)
    return train(train_cfg, show_progress=False)


def load_bundle_clap(out: Path, work: Path):
    """The freshly trained CLAP, with a memo of sentence features shared by the store and decoder steps."""
    from engine.clap.demo import DemoClapBackend, load_sentence_cache

    clap = DemoClapBackend.from_folder(out / "clap", device="cpu")
    clap.sentence_cache = load_sentence_cache(work / "sentence_cache.npz")
    return clap


def corpus_captions(corpus: Path, split: str, style: str) -> list[str]:
    from trainers.train_demo_clap import read_corpus

    rows, _ = read_corpus(corpus)
    return unique_captions(c for row in rows if row["split"] == split for c in row[f"captions_{style}"])


def evenly(items: list[str], limit: int) -> list[str]:
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).astype(int)]


def audiocaps_train_captions() -> Path:
    csv = AUDIOCAPS_SHARED / "train.csv"
    return csv if csv.is_file() else AUDIOCAPS_SHIPPED


def build_stores(cfg: BundleConfig, corpus: Path, out: Path, clap) -> dict:
    sizes = {}
    for style in ("a", "b"):
        captions = evenly(corpus_captions(corpus, "train", style), cfg.store_max)
        store = CaptionDatastore.build(captions, clap, source=f"soundworld-style-{style}", show_progress=False)
        store.save(out / "stores" / f"style_{style}", compact=True)
        sizes[f"style_{style}"] = len(store)
    if cfg.audiocaps_store:
        store = CaptionDatastore.build(read_captions(AUDIOCAPS_SHIPPED), clap, source="audiocaps-train",
                                       show_progress=False)
        store.save(out / "stores" / "audiocaps", compact=True)
        sizes["audiocaps"] = len(store)
    return sizes


def build_decoder_init(cfg: BundleConfig, corpus: Path, directory: Path) -> Path:
    """An untrained Llama with a byte-level BPE tokenizer trained on the captions it will learn to write."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.llm import train_llama_tokenizer

    lines = read_captions(audiocaps_train_captions()) + corpus_captions(corpus, "train", "a") + \
        corpus_captions(corpus, "train", "b")
    tokenizer = train_llama_tokenizer(cfg.decoder_vocab, lines)
    hidden = cfg.decoder_hidden
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=cfg.decoder_layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def decoder_records(corpus: Path, work: Path, split: str, limit: int = 0, audiocaps: bool = True) -> Path:
    """AudioCaps captions + style-A corpus captions of one split, as a DRCap jsonl (target = text)."""
    shared = AUDIOCAPS_SHARED / f"{split}.csv"
    captions = [] if not audiocaps else read_captions(shared) if shared.is_file() else (
        read_captions(AUDIOCAPS_SHIPPED) if split == "train" else [])
    captions = unique_captions(captions + corpus_captions(corpus, split, "a"))
    if limit:
        captions = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))[:limit]]
    path = work / f"decoder_{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"key": f"{split}_{i}", "target": caption, "text": caption}) + "\n")
    return path


def train_decoder(cfg: BundleConfig, corpus: Path, work: Path, out: Path, clap) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.train_drcap import train

    init = build_decoder_init(cfg, corpus, work / "decoder_init")
    app = AppConfig(cache_dir=str(work / "cache"))
    app.clap.backend, app.clap.model, app.clap.device = "demo", str(out / "clap"), "cpu"
    app.llm.model, app.llm.device = str(init), "cpu"
    train_cfg = DrcapTrainConfig(
        train=str(decoder_records(corpus, work, "train", audiocaps=not cfg.smoke)),
        val=str(decoder_records(corpus, work, "val", limit=64 if cfg.smoke else 512, audiocaps=not cfg.smoke)),
        out=str(work / "decoder_run"), use_peft=False, freeze_llm=False, mapping_hidden=cfg.mapping_hidden,
        noise_std=cfg.decoder_noise, band_low=cfg.band_low, band_high=cfg.band_high, lr=cfg.decoder_lr,
        warmup_steps=max(1, cfg.decoder_steps // 10), total_steps=cfg.decoder_steps, epochs=100,
        batch_size=cfg.decoder_batch, val_every=max(1, cfg.decoder_steps // 4), log_every=50, seed=cfg.seed)
    result = train(app, train_cfg, show_progress=False, clap=clap)
    best = Path(result.summary["best"])
    target = out / "decoder"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(best, target, ignore=shutil.ignore_patterns("training_state.pt", "llm"))
    llm = AutoModelForCausalLM.from_pretrained(best / "llm", dtype=torch.float32)
    llm.to(torch.float16).save_pretrained(target / "llm")  # half the bytes; loaded back as float32 on the CPU
    shutil.copy2(best / "llm" / "tokenizer.json", target / "llm" / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (best / "llm" / name).is_file():
            shutil.copy2(best / "llm" / name, target / "llm" / name)
    return {k: v for k, v in result.summary.items() if k != "history"} | {
        "history": result.summary["history"], "train_records": len(result.train_records)}


def bundle_config(out: Path, cache_dir: Path) -> AppConfig:
    """The settings the offline profile uses, for a bundle in ``out`` (tests and the build use it on any folder)."""
    config = AppConfig(cache_dir=str(cache_dir))
    config.clap.backend, config.clap.model, config.clap.device = "demo", str(out / "clap"), "cpu"
    config.datastore.path = str(out / "stores" / "style_a")
    config.caption.checkpoint = str(out / "decoder")
    config.caption.num_beams, config.caption.max_new_tokens = 4, 40
    return config


def export_examples(cfg: BundleConfig, corpus: Path, out: Path, clap) -> dict:
    """Held-out clips for the tests (evenly spaced over the test split, whatever the bundle makes of them) and
    example clips for the app (test clips the bundle classifies right and captions well, real recordings among them),
    each with a README/manifest naming its sources and licenses."""
    from trainers.demo_eval import caption, item_cider, test_rows
    from trainers.soundworld import load_classes

    from engine.captioner import Captioner
    from engine.service import open_datastore

    config = bundle_config(out, Path(cfg.work) / "cache")  # the CLAP the build already loaded, not a second one
    datastore = open_datastore(config, clap, show_progress=False)
    scribe = AudioScribe(config, clap, datastore, Captioner.from_config(config, clap, datastore))
    rows = test_rows(corpus, 0)
    embeddings = scribe.clap.embed_audio([scribe.load(corpus / r["path"]) for r in rows])
    names = [c["label"] for c in load_classes(corpus)]
    predicted = (embeddings @ scribe.clap.embed_text([f"This is a sound of {n}." for n in names]).T).argmax(1)
    captions = caption(scribe, embeddings, scribe.datastore, projection=True, retrieval=True)
    scores = item_cider(captions, [r["captions_a"] for r in rows])
    single = [i for i, r in enumerate(rows) if len(r["labels"]) == 1]
    multi = [i for i, r in enumerate(rows) if len(r["labels"]) > 1]
    heldout = [single[i] for i in np.linspace(0, len(single) - 1, min(12, len(single))).astype(int)] + \
        [multi[i] for i in np.linspace(0, len(multi) - 1, min(4, len(multi))).astype(int)]
    write_clips(corpus, [rows[i] for i in heldout], Path(cfg.heldout), "heldout.jsonl")
    # Correctly classified clips, best captioned first (the rest only as a fallback for an untrained smoke bundle).
    good = sorted(single, key=lambda i: (names[int(predicted[i])] != rows[i]["labels"][0], -scores[i]))
    chosen, seen = [], set()
    for want_real in (True, False):  # real recordings first, then the best of the rest; one clip per class
        for i in good:
            label = rows[i]["labels"][0]
            if len(chosen) < (4 if want_real else 8) and label not in seen and _is_recording(rows[i]) == want_real:
                chosen.append(i)
                seen.add(label)
    examples = Path(cfg.examples)
    write_clips(corpus, [rows[i] for i in chosen], examples, "examples.jsonl")
    long_clip = write_two_part_clip(corpus, rows[chosen[0]], rows[chosen[-1]], examples)
    licenses = {c["label"]: c["license"] for c in load_classes(corpus)}
    write_examples_readme(examples, [rows[i] for i in chosen], long_clip, licenses)
    return {"heldout": [rows[i]["id"] for i in heldout], "examples": [rows[i]["id"] for i in chosen],
            "two_part": long_clip["id"]}


def _is_recording(row: dict) -> bool:
    return not all(e["provenance"].startswith("procedural") for e in row["events"])


def write_clips(corpus: Path, rows: list[dict], folder: Path, manifest_name: str) -> None:
    """Copy clips to ``folder`` as <label>-<id>.flac beside a jsonl of their manifest rows (paths relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.flac"):  # clips of an earlier build
        stale.unlink()
    with open(folder / manifest_name, "w", encoding="utf-8") as f:
        for row in rows:
            name = f"{'-'.join(row['labels']).replace(' ', '_')}-{row['id']}.flac"
            shutil.copy2(corpus / row["path"], folder / name)
            f.write(json.dumps({**row, "path": name}, ensure_ascii=False) + "\n")


def write_two_part_clip(corpus: Path, first: dict, second: dict, folder: Path) -> dict:
    """A ~longer clip whose halves differ (one source, then another), to show one caption per 10-s window."""
    import soundfile as sf

    parts = [sf.read(corpus / r["path"], dtype="float32")[0] for r in (first, second)]
    sr = first["sample_rate"]
    pieces = [np.tile(p, int(np.ceil(10 * sr / len(p))))[:10 * sr] for p in parts]  # 10 s of each
    name = f"two_parts-{first['labels'][0].replace(' ', '_')}-then-{second['labels'][0].replace(' ', '_')}.flac"
    sf.write(folder / name, np.concatenate(pieces), sr, subtype="PCM_16")
    return {"id": name, "first": first["id"], "second": second["id"]}


def write_examples_readme(folder: Path, rows: list[dict], long_clip: dict, licenses: dict[str, str]) -> None:
    lines = ["# Example clips", "",
             "Held-out test clips of the demo bundle's sound corpus (`python -m trainers.build_demo_bundle`, step "
             "`examples`): clips it classifies correctly and captions well, one per class, recordings from Debian "
             "packages first. Sources and licenses per clip (license texts: `trainers/soundworld/licenses/`):", "",
             "| file | classes | caption (style A) | sources | license |", "|---|---|---|---|---|"]
    for row in rows:
        name = f"{'-'.join(row['labels']).replace(' ', '_')}-{row['id']}.flac"
        sources = "; ".join(e["provenance"] for e in row["events"])
        procedural = all(e["provenance"].startswith("procedural") for e in row["events"])
        license_text = "this repository's (procedural synthesis)" if procedural else \
            "; ".join(licenses[label].replace(" | ", " or ") for label in row["labels"])
        lines.append(f"| `{name}` | {', '.join(row['labels'])} | {row['captions_a'][0]} | {sources} | {license_text} |")
    lines += ["", f"`{long_clip['id']}`: 10 s of `{long_clip['first']}` (looped) then 10 s of `{long_clip['second']}` "
              "(looped), to show one caption per 10-s window; the licenses of both parts apply.", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------


def build(cfg: BundleConfig) -> dict:
    cfg = smoke_overrides(cfg) if cfg.smoke else cfg
    unknown = set(cfg.steps) - set(STEPS)
    if unknown:
        raise ConfigError(f"Unknown build steps {sorted(unknown)}; steps are {', '.join(STEPS)}")
    work, out = Path(cfg.work), Path(cfg.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # Steps run in an earlier invocation keep their report and timing (a build can be resumed step by step).
    previous = json.loads((out / "bundle.json").read_text()) if (out / "bundle.json").is_file() else {}
    timings: dict[str, float] = dict(previous.get("timings_s", {}))
    report: dict = {**previous, "config": asdict(cfg)}

    def timed(name: str, fn):
        started = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        log.info("step %s done in %.0f s", name, timings[name])
        return value

    corpus = work / "soundworld"
    if not (corpus / "manifest.jsonl").is_file():
        timed("corpus", lambda: build_corpus(cfg, work))
    if "clap" in cfg.steps:
        report["clap"] = timed("clap", lambda: train_clap(cfg, corpus, out))
    clap = load_bundle_clap(out, work)
    if "stores" in cfg.steps:
        report["stores"] = timed("stores", lambda: build_stores(cfg, corpus, out, clap))
        save_sentence_cache(work / "sentence_cache.npz", clap.sentence_cache)
    if "decoder" in cfg.steps:
        report["decoder"] = timed("decoder", lambda: train_decoder(cfg, corpus, work, out, clap))
        save_sentence_cache(work / "sentence_cache.npz", clap.sentence_cache)
    if "examples" in cfg.steps:
        report["examples"] = timed("examples", lambda: export_examples(cfg, corpus, out, clap))
    report["timings_s"] = timings
    report["corpus"] = json.loads((corpus / "build_info.json").read_text()) if (
        corpus / "build_info.json").is_file() else {}
    (out / "bundle.json").write_text(json.dumps(report, indent=2, default=str))
    return {"out": str(out), "timings_s": timings, "total_s": round(sum(timings.values()), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    return run_trainer(__doc__, "python -m trainers.build_demo_bundle", BundleConfig,
                       lambda cfg, args: build(cfg), argv, uses_profile=False)


if __name__ == "__main__":
    sys.exit(main())
