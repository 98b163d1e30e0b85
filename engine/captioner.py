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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.audio import Audio, Window
from engine.clap.base import ClapBackend, WindowEmbeddings, pool_windows
from engine.clap.checkpoints import failure_reason, model_load_errors, read_safetensors, torch_load_tensors
from engine.config import AppConfig, CaptionConfig
from engine.datastore import CaptionDatastore
from engine.drcap import CONFIG_FILE, CheckpointInfo, DrcapModel, PromptLayout, project_onto_support, read_checkpoint
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
class Domain:
    """Captions of one domain: a datastore that serves retrieval and, as DRCap adapts to a domain, the projection
    support (its caption embeddings). A new domain needs only captions; a session may hold its own."""

    name: str
    datastore: CaptionDatastore

    @property
    def support(self) -> Support:
        return Support(self.datastore.support, self.datastore.captions, f"domain {self.name!r}")


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


SUPPORT_FORMATS = ("caption.support must be a datastore folder, a .safetensors file holding one [N, D] tensor, or "
                   "a torch.save'd [N, D] tensor (DRCap's support .pt)")


def load_support(spec: str, datastore: CaptionDatastore | None, clap: ClapBackend) -> Support:
    """"" = the datastore's captions; a datastore folder; or a tensor file ([N, D], e.g. DRCap's support .pt)."""
    if not spec:
        if datastore is None:
            raise DatastoreError("Projection decoding needs a support: configure a datastore or caption.support")
        return Support(datastore.support, datastore.captions, "datastore")
    path = Path(spec).expanduser()
    if path.is_dir():
        store = CaptionDatastore.load(path, clap)
        return Support(store.support, store.captions, str(path))
    if not path.is_file():
        raise DatastoreError(f"The support {path} (caption.support) does not exist. {SUPPORT_FORMATS}.")
    matrix = _support_matrix(_read_support_file(path), path, clap)
    return Support(matrix / matrix.norm(dim=1, keepdim=True), None, str(path))


def _read_support_file(path: Path) -> object:
    """The tensor in a support file, read without unpickling any object; an unreadable file is a DatastoreError."""
    if path.suffix != ".safetensors":
        return torch_load_tensors(path, hint=SUPPORT_FORMATS + ".", error=DatastoreError)
    tensors = read_safetensors(path, error=DatastoreError)
    if len(tensors) != 1:
        raise DatastoreError(f"{path} must hold exactly one [N, D] tensor, found {sorted(tensors)}")
    return next(iter(tensors.values()))


def _support_matrix(matrix: object, path: Path, clap: ClapBackend) -> torch.Tensor:
    """``matrix`` as float32 [N, D] after the checks projection needs: a support that is empty, not real-valued, or
    holds NaN, infinity or a zero row would turn every caption's soft token into NaN or noise, silently."""
    expected = f"an [N, {clap.embedding_dim}] tensor for {clap.name}"
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[1] != clap.embedding_dim:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise DatastoreError(f"Support {path} must be {expected}, got {shape}")
    if not matrix.is_floating_point():
        raise DatastoreError(f"Support {path} must hold real numbers (a float tensor), got {matrix.dtype}")
    if matrix.shape[0] == 0:
        raise DatastoreError(f"Support {path} holds no rows: it must be {expected} with N >= 1")
    matrix = matrix.float()
    if not torch.isfinite(matrix).all():
        raise DatastoreError(f"Support {path} holds NaN or infinite values; rebuild it from caption embeddings")
    zero_rows = (matrix.norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero_rows:
        raise DatastoreError(f"Support {path} has {len(zero_rows)} all-zero row(s) (first: row {zero_rows[0]}), "
                             "which have no direction to project onto; rebuild it from caption embeddings")
    return matrix


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

    def caption_embeddings(self, audio_embeddings: torch.Tensor, timings: dict[str, float] | None = None,
                           domain: Domain | None = None, settings: CaptionConfig | None = None
                           ) -> list[CaptionResult]:
        """[B, D] unit-norm CLAP audio embeddings -> one caption each (batched by caption.batch_size).

        ``domain`` (a session's own captions) replaces the datastore and the support for this call only, and
        ``settings`` the generation settings: nothing shared is changed, so sessions never see each other's."""
        cfg = settings or self.config
        datastore, support = (domain.datastore, domain.support) if domain else (self.datastore, self.support)
        timings = timings if timings is not None else {}
        results: list[CaptionResult] = []
        for start in range(0, len(audio_embeddings), cfg.batch_size):
            chunk = audio_embeddings[start:start + cfg.batch_size]
            with _timer(timings, "retrieval"):
                retrieved = self._retrieve(chunk, datastore, cfg.rag_k)
            with _timer(timings, "projection"):
                if cfg.projection:
                    projected, weights = project_onto_support(chunk, support.embeddings, self.temperature,
                                                              cfg.renormalize)
                else:
                    projected, weights = chunk.float(), None
            with _timer(timings, "generation"):
                texts = self.model.generate(projected, [[c for c, _ in r] for r in retrieved],
                                            num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                            repetition_penalty=cfg.repetition_penalty, fast=cfg.fast_decoding)
            for row, text in enumerate(texts):
                top = _top_support(support, weights[row]) if weights is not None else []
                results.append(CaptionResult(caption=text, retrieved=retrieved[row], support_top=top))
        return results

    def caption(self, audio: Audio, domain: Domain | None = None, settings: CaptionConfig | None = None
                ) -> ClipCaptions:
        return self.caption_clips([audio], domain, settings)[0]

    def caption_clips(self, audios: Sequence[Audio], domain: Domain | None = None,
                      settings: CaptionConfig | None = None) -> list[ClipCaptions]:
        """Captions for whole clips and, for clips with several windows, each window; one batched pass."""
        timings: dict[str, float] = {}
        with _timer(timings, "clap"):
            embedded = self.clap.embed_windows(list(audios))
        return self.caption_embedded(embedded, domain, settings, timings)

    def caption_embedded(self, embedded: Sequence[WindowEmbeddings], domain: Domain | None = None,
                         settings: CaptionConfig | None = None, timings: dict[str, float] | None = None
                         ) -> list[ClipCaptions]:
        """Captions for clips already embedded (one audio-tower pass, shared with retrieval and classification):
        the whole clip and, for clips with several windows, each window; all rows in as few LLM batches as
        ``caption.batch_size`` allows."""
        cfg = settings or self.config
        timings = timings if timings is not None else {}
        segments = [merge_windows(e.windows, e.embeddings, cfg.max_window_captions) for e in embedded]
        rows, owners = [], []  # which clip (and segment) each embedding row belongs to
        for i, (clip, (windows, vectors)) in enumerate(zip(embedded, segments)):
            rows.append(clip.pooled)
            owners.append((i, None))
            if len(windows) > 1:
                rows.extend(vectors)
                owners.extend((i, w) for w in range(len(windows)))
        results = self.caption_embeddings(torch.stack(rows), timings, domain, settings)
        clips = [ClipCaptions(clip=None, windows=windows, per_window=[], timings_ms=timings)
                 for windows, _ in segments]
        for (i, window), result in zip(owners, results):
            if window is None:
                clips[i].clip = result
            else:
                clips[i].per_window.append(result)
        return clips

    def _retrieve(self, audio_embeddings: torch.Tensor, datastore: CaptionDatastore | None, k: int
                  ) -> list[list[tuple[str, float]]]:
        layout = self.model.layout
        if not (layout.rag_first or layout.use_rag) or datastore is None:
            return [[] for _ in range(len(audio_embeddings))]
        found = datastore.search(audio_embeddings, k)
        return [[(c, float(s)) for c, s in zip(caps, scores)] for caps, scores in zip(found.captions, found.scores)]

    def describe(self) -> str:
        state = "trained" if self.trained else "UNTRAINED mapping network"
        return (f"DRCap ({state}; LLM {self.llm.describe()}; layout {self.model.layout.name}; support "
                f"{len(self.support.embeddings):,} from {self.support.source}; τ={self.temperature:.4g})")


def _top_support(support: Support, weights: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` support captions that weighed most in one projection, with their weights."""
    values, indices = weights.topk(min(k, len(weights)))
    names = support.captions
    return [(names[i] if names else f"#{i}", float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def merge_windows(windows: Sequence[Window], embeddings: torch.Tensor, limit: int
                  ) -> tuple[list[Window], torch.Tensor]:
    """At most ``limit`` caption segments for a long clip: runs of consecutive windows (as even as possible) merged
    into one segment each, its embedding the renormalised mean of theirs. Bounds the LLM calls per request (a
    30-min recording has 359 windows of 10 s); up to ``limit`` windows, each stays its own segment."""
    if len(windows) <= limit:
        return list(windows), embeddings
    groups = np.array_split(np.arange(len(windows)), limit)
    merged = [Window(j, windows[g[0]].start_sample, windows[g[-1]].end_sample, windows[g[0]].start_s,
                     windows[g[-1]].end_s) for j, g in enumerate(groups)]
    return merged, torch.stack([pool_windows(embeddings[torch.from_numpy(g)]) for g in groups])  # [limit, D]


def build_model(llm: LoadedLLM, clap: ClapBackend, config: AppConfig, checkpoint: CheckpointInfo | None,
                trainable: bool, use_peft: bool = True) -> DrcapModel:
    """Mapping network + LLM (+ LoRA) shaped by the checkpoint when there is one, else by the config."""
    with _checkpoint_errors(checkpoint):
        return _build_model(llm, clap, config, checkpoint, trainable, use_peft)


def _checkpoint_errors(checkpoint: CheckpointInfo | None) -> AbstractContextManager[None]:
    """Failures while a checkpoint shapes the model name the checkpoint: its tensors may have odd shapes and its
    drcap_config.json is user-editable (a "layout" or "lora" entry with unknown fields, "clap" that is not an
    object, target modules the LLM lacks). Without a checkpoint nothing is wrapped: errors are then bugs."""
    if checkpoint is None:
        return nullcontext()
    return model_load_errors(lambda e: f"{checkpoint.path} does not describe a DRCap decoder for this LLM and CLAP "
                                       f"({failure_reason(e)}); check its weights and {CONFIG_FILE}")


def _build_model(llm: LoadedLLM, clap: ClapBackend, config: AppConfig, checkpoint: CheckpointInfo | None,
                 trainable: bool, use_peft: bool) -> DrcapModel:
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
