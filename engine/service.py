"""The engine as one object: a loaded CLAP, the caption datastore and the settings, with the operations the app,
the command-line tools and scripts call. Nothing here knows about Gradio.

One :class:`AudioScribe` is shared by every user of an app process; it holds only models and data that are the same
for everyone. Anything a user creates (uploads, edits, tuned prompts) lives in the caller's per-user state.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path


from engine.audio import Audio, AudioSource, Window, load_audio
from engine.captioner import Captioner, ClipCaptions
from engine.clap import ClapBackend, create_clap
from engine.clap.base import serving_state_ok
from engine.classifier import Classification, ZeroShotClassifier, build_zero_shot_classifier, classify_audio
from engine.config import AppConfig
from engine.datastore import CaptionDatastore, SearchResult, is_datastore
from engine.errors import DatastoreError, ModelLoadError
from engine.prompt_tuning import (
    ProgressCallback,
    PromptedClassifier,
    TunedClassification,
    TunedPrompts,
    training_texts,
    tune,
)

log = logging.getLogger(__name__)


@dataclass
class Retrieval:
    """Captions retrieved for one clip: for the whole clip (pooled embedding) and for each window."""

    clip: SearchResult  # one query: the pooled clip embedding
    windows: list[Window]
    per_window: SearchResult  # one query per window


class AudioScribe:
    """CLAP + caption datastore + config."""

    def __init__(self, config: AppConfig, clap: ClapBackend, datastore: CaptionDatastore | None,
                 captioner: Captioner | None = None) -> None:
        self.config = config
        self.clap = clap
        self.datastore = datastore
        self.captioner = captioner
        self._classifiers: dict[str, PromptedClassifier] = {}  # prompt-set content hash -> class embeddings

    @classmethod
    def from_config(cls, config: AppConfig, show_progress: bool = True) -> AudioScribe:
        """Load the configured CLAP, open (or build once and cache) the datastore, then the captioner if enabled."""
        clap = create_clap(config)
        datastore = open_datastore(config, clap, show_progress=show_progress)
        captioner = Captioner.from_config(config, clap, datastore) if config.caption.enabled else None
        return cls(config, clap, datastore, captioner)

    # --- operations --------------------------------------------------------------------------------------------------

    def load(self, source: AudioSource) -> Audio:
        """Decode any supported input to mono float32 at the CLAP's sample rate, within the duration limit."""
        return load_audio(source, self.clap.sample_rate, max_duration_s=self.config.audio.max_duration_s)

    def retrieve(self, audio: Audio, k: int | None = None) -> Retrieval:
        """Top-k datastore captions for the clip and for each of its windows."""
        if self.datastore is None:
            raise DatastoreError("No caption datastore is configured (datastore.path / datastore.sources)")
        embedded = self.clap.embed_windows([audio])[0]
        k = k or self.config.datastore.top_k
        return Retrieval(clip=self.datastore.search(embedded.pooled.unsqueeze(0), k), windows=embedded.windows,
                         per_window=self.datastore.search(embedded.embeddings, k))

    def caption(self, audio: Audio) -> ClipCaptions:
        """DRCap captions for the clip (and per window for long clips)."""
        if self.captioner is None:
            raise ModelLoadError("Captioning is off in this profile (caption.enabled = false)")
        return self.captioner.caption(audio)

    def classifier(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> ZeroShotClassifier:
        cfg = self.config.classify
        support = self.datastore.support if cfg.prompt_projection and self.datastore is not None else None
        return build_zero_shot_classifier(self.clap, class_names, templates or cfg.templates,
                                          max_classes=cfg.max_classes, support=support,
                                          support_temperature=cfg.prompt_temperature)

    def classify(self, audio: Audio, class_names: Sequence[str], templates: Sequence[str] | None = None, *,
                 multi_label: bool | None = None, threshold: float | None = None) -> Classification:
        cfg = self.config.classify
        return classify_audio(self.clap, self.classifier(class_names, templates), audio,
                              multi_label=cfg.multi_label if multi_label is None else multi_label,
                              threshold=cfg.threshold if threshold is None else threshold)

    def select_tuning_texts(self, class_names: Sequence[str], descriptions: dict[str, list[str]] | None = None):
        """Captions from the datastore that mention each class (topped up by CLAP similarity): the training texts."""
        from engine.text_selection import select_texts

        if self.datastore is None:
            raise DatastoreError("Prompt tuning takes its training captions from the datastore; none is configured")
        cfg = self.config.tuning
        return select_texts(list(class_names), self.datastore.captions, clap=self.clap,
                            caption_embeddings=self.datastore.embeddings, min_per_class=cfg.min_texts_per_class,
                            max_per_class=cfg.max_texts_per_class, descriptions=descriptions,
                            templates=tuple(self.config.classify.templates), seed=cfg.seed)

    def tune_prompts(self, class_names: Sequence[str], *, multi_label: bool | None = None,
                     descriptions: dict[str, list[str]] | None = None, progress: ProgressCallback | None = None,
                     should_stop: Callable[[], bool] | None = None) -> TunedPrompts:
        """Audio-free prompt tuning for ``class_names`` on datastore captions. Returns new prompts; the caller keeps
        them (per user), nothing is stored here."""
        config = replace(self.config.tuning, multi_label=self.config.tuning.multi_label if multi_label is None
                         else multi_label)
        selection = self.select_tuning_texts(class_names, descriptions)
        data = training_texts(selection, config.multi_label)
        prompts = tune(self.clap, list(class_names), data, config, progress=progress, should_stop=should_stop)
        prompts.report["selection"] = selection.format_report()
        return prompts

    def classify_tuned(self, audio: Audio, prompts: TunedPrompts) -> TunedClassification:
        return self._prompted_classifier(prompts).classify(audio)

    def _prompted_classifier(self, prompts: TunedPrompts) -> PromptedClassifier:
        """Class embeddings of a prompt set are computed once, not per clip (seconds for a large CLAP). Keyed by the
        prompts' content, so sessions never share anything but identical derived data; a few sets are kept."""
        key = prompts.content_key()
        if key in self._classifiers:
            return self._classifiers[key]
        classifier = PromptedClassifier(self.clap, prompts)
        if not serving_state_ok(self.clap.modules()):  # never keep embeddings made by a model in train mode
            log.warning("The CLAP is in train mode while serving; tuned class embeddings are not cached")
            return classifier
        if len(self._classifiers) >= 8:
            self._classifiers.pop(next(iter(self._classifiers)))
        self._classifiers[key] = classifier
        return classifier

    def status(self) -> dict[str, object]:
        """What is loaded, for logs and the app's header."""
        store = self.datastore
        return {
            "profile": self.config.profile,
            "clap": self.clap.name,
            "clap_untrained": self.clap.is_untrained,
            "embedding_dim": self.clap.embedding_dim,
            "sample_rate": self.clap.sample_rate,
            "device": str(self.clap.device),
            "datastore_size": len(store) if store else 0,
            "datastore_index": store.manifest.index_type if store else "none",
            "captioner": self.captioner.describe() if self.captioner else "off",
            "captioner_untrained": bool(self.captioner and self.captioner.is_untrained),
            "llm_notice": self.captioner.llm.notice if self.captioner else "",
        }


def open_datastore(config: AppConfig, clap: ClapBackend, show_progress: bool = True) -> CaptionDatastore | None:
    """The datastore the config names.

    ``datastore.path`` set and present: load it (refused if another CLAP built it). Set but absent: build it from
    ``datastore.sources`` and save it there. Unset: build from the sources into the cache, keyed by the CLAP and the
    sources' contents, so later starts just load it. No path and no sources: no datastore.
    """
    ds = config.datastore
    if ds.path and is_datastore(ds.path):
        return CaptionDatastore.load(ds.path, clap, ds)
    if not ds.sources:
        if ds.path:
            raise DatastoreError(f"datastore.path {ds.path} holds no datastore and datastore.sources is empty")
        return None
    target = Path(ds.path) if ds.path else _cache_path(config, clap)
    if is_datastore(target):
        return CaptionDatastore.load(target, clap, ds)
    log.info("Building the caption datastore from %s into %s (once)", ", ".join(ds.sources), target)
    store = CaptionDatastore.from_files(ds.sources, clap, ds, show_progress=show_progress)
    store.save(target)
    return store


def _cache_path(config: AppConfig, clap: ClapBackend) -> Path:
    digest = hashlib.sha256(clap.fingerprint.encode())
    for source in config.datastore.sources:
        digest.update(Path(source).read_bytes() if os.path.isfile(source) else source.encode())
    for setting in (config.datastore.csv_column, config.datastore.jsonl_field):
        digest.update(setting.encode())
    return config.resolved_cache_dir() / "datastores" / digest.hexdigest()[:16]


def top_caption_rows(result: SearchResult, row: int = 0) -> list[tuple[int, str, float]]:
    """(rank, caption, cosine) rows of one query of a search result, for tables and exports."""
    return [(rank + 1, caption, round(float(score), 4))
            for rank, (caption, score) in enumerate(zip(result.captions[row], result.scores[row]))]


__all__ = ["AudioScribe", "Retrieval", "open_datastore", "top_caption_rows"]
