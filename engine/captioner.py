"""DRCap zero-shot captioning of audio: CLAP embedding -> retrieval + projection decoding -> LLM caption.

Per clip: the raw CLAP audio embedding retrieves the top-k datastore captions (most similar first) for the prompt;
the same embedding is projected onto the support (softmax(a·Sᵀ/τ)·S) and mapped to one soft token; the LLM writes
the caption. Long audio gets one caption per window (with timestamps) plus one for the whole clip (from the pooled
embedding). Swapping the support and the datastore adapts it to a new domain without training.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.audio import Audio, Window
from engine.clap.base import ClapBackend
from engine.config import AppConfig, CaptionConfig
from engine.datastore import CaptionDatastore
from engine.drcap import CheckpointInfo, DrcapModel, PromptLayout, project_onto_support, read_checkpoint
from engine.errors import DatastoreError, ModelLoadError
from engine.llm import LoadedLLM, attach_lora, load_llm

log = logging.getLogger(__name__)


@dataclass
class Support:
    """The projection support: unit-norm CLAP text embeddings [N, D] and, when known, their captions."""

    embeddings: torch.Tensor  # [N, D]
    captions: list[str] | None
    source: str


@dataclass
class CaptionResult:
    caption: str
    retrieved: list[tuple[str, float]]  # captions put in the prompt, with their cosine to the audio
    support_top: list[tuple[str, float]]  # support captions that weighed most in the projection, with weights


@dataclass
class ClipCaptions:
    """Captions of one clip: the whole clip, and each window when there is more than one."""

    clip: CaptionResult
    windows: list[Window]
    per_window: list[CaptionResult]
    timings_ms: dict[str, float] = field(default_factory=dict)  # clap, retrieval, projection, generation


def load_support(spec: str, datastore: CaptionDatastore | None, clap: ClapBackend) -> Support:
    """"" = the datastore's captions; a datastore folder; or a tensor file ([N, D], e.g. DRCap's support .pt)."""
    if not spec:
        if datastore is None:
            raise DatastoreError("Projection decoding needs a support: configure a datastore or caption.support")
        return Support(datastore.support, datastore.captions, "datastore")
    path = Path(spec)
    if path.is_dir():
        store = CaptionDatastore.load(path, clap)
        return Support(store.support, store.captions, str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise DatastoreError(f"{path} must hold exactly one [N, D] tensor, found {sorted(tensors)}")
        matrix = next(iter(tensors.values()))
    else:
        matrix = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[1] != clap.embedding_dim:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise DatastoreError(f"Support {path} must be an [N, {clap.embedding_dim}] tensor for {clap.name}, got {shape}")
    matrix = matrix.float()
    return Support(matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12), None, str(path))


class Captioner:
    """A loaded DRCap: LLM + mapping network (+ LoRA), the CLAP, the datastore and the support."""

    def __init__(self, model: DrcapModel, llm: LoadedLLM, clap: ClapBackend, datastore: CaptionDatastore | None,
                 support: Support, config: CaptionConfig, trained: bool) -> None:
        self.model = model.eval()
        self.llm = llm
        self.clap = clap
        self.datastore = datastore
        self.support = support
        self.config = config
        self.trained = trained  # a trained checkpoint was loaded (else the mapping network is random)

    @property
    def is_untrained(self) -> bool:
        return not self.trained or self.llm.is_untrained

    @property
    def temperature(self) -> float:
        return self.config.temperature or self.clap.temperature

    @classmethod
    def from_config(cls, config: AppConfig, clap: ClapBackend, datastore: CaptionDatastore | None) -> Captioner:
        checkpoint = read_checkpoint(config.caption.checkpoint) if config.caption.checkpoint else None
        llm_config = config.llm
        if checkpoint is not None and (checkpoint.path / "llm").is_dir():  # trained with the LLM unfrozen
            llm_config = replace(config.llm, model=str(checkpoint.path / "llm"))
        llm = load_llm(llm_config, config.resolved_cache_dir())
        model = build_model(llm, clap, config, checkpoint, trainable=False)
        support = load_support(config.caption.support, datastore, clap)
        return cls(model, llm, clap, datastore, support, config.caption, trained=checkpoint is not None)

    # --- captioning ------------------------------------------------------------------------------------------------

    def caption_embeddings(self, audio_embeddings: torch.Tensor, timings: dict[str, float] | None = None
                           ) -> list[CaptionResult]:
        """[B, D] unit-norm CLAP audio embeddings -> one caption each (batched by caption.batch_size)."""
        cfg = self.config
        timings = timings if timings is not None else {}
        results: list[CaptionResult] = []
        for start in range(0, len(audio_embeddings), cfg.batch_size):
            chunk = audio_embeddings[start:start + cfg.batch_size]
            with _timer(timings, "retrieval"):
                retrieved = self._retrieve(chunk)
            with _timer(timings, "projection"):
                if cfg.projection:
                    projected, weights = project_onto_support(chunk, self.support.embeddings, self.temperature,
                                                              cfg.renormalize)
                else:
                    projected, weights = chunk.float(), None
            with _timer(timings, "generation"):
                texts = self.model.generate(projected, [[c for c, _ in r] for r in retrieved],
                                            num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                            repetition_penalty=cfg.repetition_penalty)
            for row, text in enumerate(texts):
                top = self._top_support(weights[row]) if weights is not None else []
                results.append(CaptionResult(caption=text, retrieved=retrieved[row], support_top=top))
        return results

    def caption(self, audio: Audio) -> ClipCaptions:
        return self.caption_clips([audio])[0]

    def caption_clips(self, audios: Sequence[Audio]) -> list[ClipCaptions]:
        """Captions for whole clips and, for clips with several windows, each window; one batched pass."""
        timings: dict[str, float] = {}
        with _timer(timings, "clap"):
            embedded = self.clap.embed_windows(list(audios))
        rows, owners = [], []  # which clip (and window) each embedding row belongs to
        for i, clip in enumerate(embedded):
            rows.append(clip.pooled)
            owners.append((i, None))
            if len(clip.windows) > 1:
                rows.extend(clip.embeddings)
                owners.extend((i, w) for w in range(len(clip.windows)))
        results = self.caption_embeddings(torch.stack(rows), timings)
        clips = [ClipCaptions(clip=None, windows=e.windows, per_window=[], timings_ms=timings) for e in embedded]
        for (i, window), result in zip(owners, results):
            if window is None:
                clips[i].clip = result
            else:
                clips[i].per_window.append(result)
        return clips

    def _retrieve(self, audio_embeddings: torch.Tensor) -> list[list[tuple[str, float]]]:
        layout = self.model.layout
        if not (layout.rag_first or layout.use_rag) or self.datastore is None:
            return [[] for _ in range(len(audio_embeddings))]
        found = self.datastore.search(audio_embeddings, self.config.rag_k)
        return [[(c, float(s)) for c, s in zip(caps, scores)] for caps, scores in zip(found.captions, found.scores)]

    def _top_support(self, weights: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        values, indices = weights.topk(min(k, len(weights)))
        names = self.support.captions
        return [(names[i] if names else f"#{i}", float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def describe(self) -> str:
        state = "trained" if self.trained else "UNTRAINED mapping network"
        return (f"DRCap ({state}; LLM {self.llm.describe()}; layout {self.model.layout.name}; support "
                f"{len(self.support.embeddings):,} from {self.support.source}; τ={self.temperature:.4g})")


def build_model(llm: LoadedLLM, clap: ClapBackend, config: AppConfig, checkpoint: CheckpointInfo | None,
                trainable: bool, use_peft: bool = True) -> DrcapModel:
    """Mapping network + LLM (+ LoRA) shaped by the checkpoint when there is one, else by the config."""
    cfg, lora = config.caption, config.llm
    layout = PromptLayout(use_rag=cfg.use_rag, rag_first=cfg.rag_first, instruction=cfg.instruction)
    hidden = cfg.mapping_hidden
    if checkpoint is not None:
        meta = checkpoint.meta
        clap_dim, hidden, llm_dim = checkpoint.mapping_shape
        if clap_dim != clap.embedding_dim:
            raise ModelLoadError(f"{checkpoint.path} maps {clap_dim}-d CLAP embeddings but {clap.name} gives "
                                 f"{clap.embedding_dim}-d ones: load the CLAP it was trained with")
        if llm_dim != llm.hidden_size:
            raise ModelLoadError(f"{checkpoint.path} feeds a {llm_dim}-d LLM but {llm.name} is {llm.hidden_size}-d")
        trained_with = meta.get("clap", {}).get("fingerprint")
        if trained_with and trained_with != clap.fingerprint:
            raise ModelLoadError(f"{checkpoint.path} was trained on embeddings of CLAP {meta['clap'].get('name')!r} "
                                 f"(fingerprint {trained_with}); the loaded CLAP {clap.name!r} is another model")
        if "layout" in meta:  # the layout it was trained with is the one to decode with
            layout = PromptLayout(**meta["layout"])
        use_peft = checkpoint.uses_lora
        if use_peft and checkpoint.lora_rank and checkpoint.lora_rank != lora.lora_r:
            lora = type(lora)(**{**lora.__dict__, "lora_r": checkpoint.lora_rank})
        if "lora" in meta:
            lora = type(lora)(**{**lora.__dict__, **meta["lora"]})
    network = attach_lora(llm.model, lora, trainable=trainable) if use_peft else llm.model
    model = DrcapModel(network, llm.tokenizer, clap.embedding_dim, hidden, layout)
    model.encoder_projector.to(llm.device)
    if checkpoint is not None:
        model.load_adapters(checkpoint.weights, str(checkpoint.path))
    return model.eval()  # peft creates its dropout layers in training mode; a trainer calls .train() itself


class _timer:
    """Adds the elapsed milliseconds of a ``with`` block to ``timings[key]``."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.timings[self.key] = self.timings.get(self.key, 0.0) + 1000 * (time.perf_counter() - self.start)
