"""Evaluating the demo bundle on the held-out test split of its sound corpus (used by
benchmarks/bench_demo_bundle.py and by the bundle build to pick example clips)."""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.config import PROJECT_ROOT, load_config
from engine.classifier import project_prompts
from engine.datastore import CaptionDatastore
from engine.drcap import project_onto_support
from engine.metrics import bleu, cider_d, normalize_caption
from engine.service import AudioScribe

TEMPLATE = "This is a sound of {}."


# --------------------------------------------------------------------------------------------------------------------
# the test split


def test_rows(corpus: Path, limit: int) -> list[dict]:
    from trainers.soundworld import load_manifest

    rows = [r for r in load_manifest(corpus) if r["split"] == "test"]
    if limit and len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).astype(int)]
    return rows


def embed_rows(scribe: AudioScribe, corpus: Path, rows: list[dict]) -> torch.Tensor:
    audios = [scribe.load(corpus / r["path"]) for r in rows]
    return scribe.clap.embed_audio(audios)  # [N, D]


# --------------------------------------------------------------------------------------------------------------------
# classification


def zero_shot(scribe: AudioScribe, embeddings: torch.Tensor, labels: list[str], classes: list[dict],
              support: torch.Tensor | None = None, temperature: float = 0.02) -> dict:
    """Top-1 of single-source clips with (a) the class labels, (b) each class's unlike-phrased test prompts
    averaged, (c) one test prompt per class at a time (mean and worst over the prompt index); with ``support``,
    every prompt is projected onto it first (classify.prompt_projection)."""
    names = [c["label"] for c in classes]
    truth = torch.tensor([names.index(y) for y in labels])

    def top1(class_texts: list[list[str]]) -> float:
        rows = []
        for texts in class_texts:
            prompts = scribe.clap.embed_text([TEMPLATE.format(t) for t in texts])
            if support is not None:
                prompts = project_prompts(prompts, support, temperature)
            rows.append(torch.nn.functional.normalize(prompts.mean(0), dim=0))
        return float(((embeddings @ torch.stack(rows).T).argmax(1) == truth).float().mean())

    prompts = [c["test_prompts"] for c in classes]
    per_index = [top1([[p[i % len(p)]] for p in prompts]) for i in range(max(len(p) for p in prompts))]
    return {"labels": top1([[n] for n in names]), "test_prompts_ensemble": top1(prompts),
            "test_prompts_single_mean": float(np.mean(per_index)), "test_prompts_single_min": float(min(per_index)),
            "clips": len(labels), "classes": len(names)}


def tuning_gains(scribe: AudioScribe, corpus: Path, rows: list[dict], classes: list[str], seeds: Sequence[int],
                 preset: str) -> dict:
    """tune_prompts.run on the test clips, base-to-new: prompts tuned on the first half of the classes, scored on
    those (the classes tuned) and on the second half (unseen classes), next to the zero-shot template."""
    from trainers.tune_prompts import run

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "eval.csv"
        lines = ["source,label"] + [f"{corpus / r['path']},{r['labels'][0]}" for r in rows]
        csv.write_text("\n".join(lines) + "\n")
        tuned = AudioScribe(replace(scribe.config, tuning=_preset(scribe, preset)), scribe.clap, scribe.datastore)
        return run(tuned, classes, None, csv, seeds, False, True, None, False)["summary"]


def _preset(scribe: AudioScribe, preset: str):
    config = load_config(str(PROJECT_ROOT / "assets" / "profiles" / f"{scribe.config.profile}.toml"),
                         [f"tuning.preset={preset}"])
    return config.tuning


# --------------------------------------------------------------------------------------------------------------------
# captioning


def caption(scribe: AudioScribe, embeddings: torch.Tensor, store: CaptionDatastore, *, projection: bool,
            retrieval: bool, batch_size: int = 16) -> list[str]:
    """DRCap captions with the store as datastore and support; PD and retrieval switchable (ablations)."""
    captioner = scribe.captioner
    cfg = captioner.config
    out: list[str] = []
    for start in range(0, len(embeddings), batch_size):
        chunk = embeddings[start:start + batch_size]
        similar = store.search(chunk, cfg.rag_k).captions if retrieval else [[] for _ in range(len(chunk))]
        mapped = project_onto_support(chunk, store.support, captioner.temperature)[0] if projection else chunk
        out.extend(captioner.model.generate(mapped, similar, num_beams=cfg.num_beams,
                                            max_new_tokens=cfg.max_new_tokens))
    return out


def item_cider(candidates: list[str], references: list[list[str]]) -> list[float]:
    """CIDEr-D of each caption (IDF from this set)."""
    return cider_d([normalize_caption(c) for c in candidates],
                   [[normalize_caption(r) for r in rs] for rs in references])


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
    cands = [normalize_caption(c) for c in candidates]
    refs = [[normalize_caption(r) for r in rs] for rs in references]
    return {"CIDEr-D": float(np.mean(cider_d(cands, refs))), "BLEU-4": bleu(cands, refs)[3],
            "examples": [{"caption": c, "references": r[:2]} for c, r in zip(candidates[:3], references[:3])]}


def captioning(scribe: AudioScribe, embeddings: torch.Tensor, rows: list[dict], bundle: Path) -> dict:
    style_a = CaptionDatastore.load(bundle / "stores" / "style_a", scribe.clap)
    style_b = CaptionDatastore.load(bundle / "stores" / "style_b", scribe.clap)
    refs_a = [r["captions_a"] for r in rows]
    refs_b = [r["captions_b"] for r in rows]
    result = {}
    for name, projection, retrieval in (("full system", True, True), ("without projection decoding", False, True),
                                        ("without retrieval", True, False), ("without both", False, False)):
        result[name] = caption_scores(caption(scribe, embeddings, style_a, projection=projection,
                                              retrieval=retrieval), refs_a)
    result["style B refs, style-A support + datastore"] = caption_scores(
        caption(scribe, embeddings, style_a, projection=True, retrieval=True), refs_b)
    result["style B refs, swapped to style-B support + datastore"] = caption_scores(
        caption(scribe, embeddings, style_b, projection=True, retrieval=True), refs_b)
    return result


