"""The engine as one object: a loaded CLAP, the caption datastore and the settings, with the operations the app,
the command-line tools and scripts call. Nothing here knows about Gradio.

One :class:`AudioScribe` is shared by every user of an app process; it holds only models and data that are the same
for everyone. Anything a user creates (uploads, edits, tuned prompts) lives in the caller's per-user state.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path


from engine.audio import Audio, AudioSource, Window, load_audio
from engine.annotations import ModelVersions, Suggestion
from engine.captioner import Captioner, ClipCaptions, Domain
from engine.clap import ClapBackend, create_clap
from engine.clap.base import WindowEmbeddings, serving_state_ok
from engine.classifier import Classification, ZeroShotClassifier, build_zero_shot_classifier, classify_audio
from engine.config import AppConfig, CaptionConfig, PromptTuningConfig, tuning_preset
from engine.datastore import CaptionDatastore, SearchResult, is_datastore
from engine.datastore import ProgressCallback as DatastoreProgress
from engine.errors import ClassifierInputError, DatastoreError, ModelLoadError, NotReadyError
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


@dataclass(frozen=True)
class Readiness:
    """What is still loading in the background, for a status line: state building | ready | failed."""

    state: str = "ready"
    message: str = ""
    done: int = 0  # captions embedded so far (while building the datastore)
    total: int = 0

    def describe(self) -> str:
        counts = f" ({self.done:,} of {self.total:,} captions embedded)" if self.total else ""
        return f"{self.message}{counts}"


class AudioScribe:
    """CLAP + caption datastore + config."""

    def __init__(self, config: AppConfig, clap: ClapBackend, datastore: CaptionDatastore | None,
                 captioner: Captioner | None = None) -> None:
        self.config = config
        self.clap = clap
        self.datastore = datastore
        self.captioner = captioner
        self.readiness = Readiness()
        self._loader: threading.Thread | None = None
        self._classifiers: dict[str, PromptedClassifier] = {}  # prompt-set content hash -> class embeddings

    @classmethod
    def from_config(cls, config: AppConfig, show_progress: bool = True, background: bool = False) -> AudioScribe:
        """Load the configured CLAP, open (or build once and cache) the datastore, then the captioner if enabled.

        With ``background``, a datastore that must first be built (minutes to an hour for a large CLAP on a CPU) is
        built in a thread after this returns, and the captioner loaded after it: an app can serve its page at once
        and say what is still loading (:attr:`readiness`); requests that need them raise NotReadyError meanwhile.
        """
        clap = create_clap(config)
        if background and datastore_build_needed(config, clap):
            scribe = cls(config, clap, None, None)
            scribe._load_in_background()
            return scribe
        datastore = open_datastore(config, clap, show_progress=show_progress)
        captioner = Captioner.from_config(config, clap, datastore) if config.caption.enabled else None
        return cls(config, clap, datastore, captioner)

    def _load_in_background(self) -> None:
        self.readiness = Readiness("building", "Building the caption datastore (once; later starts load it)")
        self._loader = threading.Thread(target=self._finish_loading, name="audioscribe-datastore", daemon=True)
        self._loader.start()

    def _finish_loading(self) -> None:
        def progress(done: int, total: int) -> None:
            self.readiness = replace(self.readiness, done=done, total=total)

        try:
            datastore = open_datastore(self.config, self.clap, show_progress=False, progress=progress)
            self.datastore = datastore
            if self.config.caption.enabled:
                self.readiness = Readiness("building", "Loading the captioner")
                self.captioner = Captioner.from_config(self.config, self.clap, datastore)
            self.readiness = Readiness()
        except Exception as e:  # noqa: BLE001 - a failure in the thread must reach the page, not only the log
            log.exception("Background loading failed")
            self.readiness = Readiness("failed", f"Loading failed: {e}")

    def wait_until_ready(self, timeout_s: float | None = None) -> Readiness:
        """Block until background loading has finished (scripts and tests); returns the final readiness."""
        if self._loader is not None:
            self._loader.join(timeout_s)
        return self.readiness

    def _store(self, domain: Domain | None = None) -> CaptionDatastore:
        """The datastore a request uses: the session's domain, else the shared one (when it is ready)."""
        if domain is not None:
            return domain.datastore
        if self.datastore is not None:
            return self.datastore
        if self.readiness.state == "building":
            raise NotReadyError(f"The caption datastore is not ready yet: {self.readiness.describe()}. Try again "
                                "in a minute; classification without retrieval works meanwhile.")
        if self.readiness.state == "failed":
            raise DatastoreError(self.readiness.message)
        raise DatastoreError("No caption datastore is configured (datastore.path / datastore.sources)")

    # --- operations --------------------------------------------------------------------------------------------------

    def load(self, source: AudioSource) -> Audio:
        """Decode any supported input to mono float32 at the CLAP's sample rate, within the duration limit."""
        return load_audio(source, self.clap.sample_rate, max_duration_s=self.config.audio.max_duration_s)

    def embed(self, audio: Audio, frames: bool = False) -> WindowEmbeddings:
        """One pass of the audio tower over the clip: window and pooled embeddings (and with ``frames`` the frame
        embeddings tuned prompts score). Every operation below takes it as ``embedded``, so a request that
        retrieves, captions and classifies one clip runs the audio tower once."""
        return self.clap.embed_windows([audio], frames=frames)[0]

    def retrieve(self, audio: Audio, k: int | None = None, domain: Domain | None = None,
                 embedded: WindowEmbeddings | None = None) -> Retrieval:
        """Top-k datastore captions for the clip and for each of its windows."""
        store = self._store(domain)
        embedded = embedded or self.embed(audio)
        k = k or self.config.datastore.top_k
        return Retrieval(clip=store.search(embedded.pooled.unsqueeze(0), k), windows=embedded.windows,
                         per_window=store.search(embedded.embeddings, k))

    def caption(self, audio: Audio, domain: Domain | None = None, settings: CaptionConfig | None = None,
                embedded: WindowEmbeddings | None = None) -> ClipCaptions:
        """DRCap captions for the clip (and per window for long clips); ``domain`` and ``settings`` apply to this
        request only."""
        if self.captioner is None:
            if self.config.caption.enabled and self.readiness.state == "building":
                raise NotReadyError(f"The captioner is not ready yet: {self.readiness.describe()}")
            raise ModelLoadError("Captioning is off in this profile (caption.enabled = false)")
        return self.captioner.caption_embedded([embedded or self.embed(audio)], domain, settings)[0]

    def classifier(self, class_names: Sequence[str], templates: Sequence[str] | None = None,
                   domain: Domain | None = None) -> ZeroShotClassifier:
        cfg = self.config.classify
        store = domain.datastore if domain else self.datastore
        support = store.support if cfg.prompt_projection and store is not None else None
        return build_zero_shot_classifier(self.clap, class_names, templates or cfg.templates,
                                          max_classes=cfg.max_classes, support=support,
                                          support_temperature=cfg.prompt_temperature)

    def classify(self, audio: Audio, class_names: Sequence[str], templates: Sequence[str] | None = None, *,
                 multi_label: bool | None = None, threshold: float | None = None,
                 domain: Domain | None = None, embedded: WindowEmbeddings | None = None) -> Classification:
        cfg = self.config.classify
        return classify_audio(self.clap, self.classifier(class_names, templates, domain), audio,
                              multi_label=cfg.multi_label if multi_label is None else multi_label,
                              threshold=cfg.threshold if threshold is None else threshold, embedded=embedded)

    def select_tuning_texts(self, class_names: Sequence[str], descriptions: dict[str, list[str]] | None = None,
                            domain: Domain | None = None, tuning: PromptTuningConfig | None = None):
        """Captions from the datastore that mention each class (topped up by CLAP similarity): the training texts,
        as many per class as ``tuning`` (default: the server's tuning settings) allows."""
        from engine.text_selection import select_texts

        store = self._store(domain)
        cfg = tuning or self.config.tuning
        return select_texts(list(class_names), store.captions, clap=self.clap,
                            caption_embeddings=store.embeddings, min_per_class=cfg.min_texts_per_class,
                            max_per_class=cfg.max_texts_per_class, descriptions=descriptions,
                            templates=tuple(self.config.classify.templates), seed=cfg.seed)

    def tune_prompts(self, class_names: Sequence[str], *, multi_label: bool | None = None,
                     descriptions: dict[str, list[str]] | None = None, progress: ProgressCallback | None = None,
                     should_stop: Callable[[], bool] | None = None, domain: Domain | None = None,
                     preset: str | None = None) -> TunedPrompts:
        """Audio-free prompt tuning for ``class_names`` on datastore captions. Returns new prompts; the caller keeps
        them (per user), nothing is stored here.

        ``preset`` (a name in ``TUNING_PRESETS``) runs with that preset's values in place of the server's for every
        field a preset sets; None or the server's own preset keeps the server's tuning settings as they are."""
        config = replace(self.config.tuning, multi_label=self.config.tuning.multi_label if multi_label is None
                         else multi_label)
        if preset is not None and preset != config.preset:
            config = replace(config, **tuning_preset(preset), preset=preset)  # ConfigError for an unknown name
        if len(class_names) > config.max_classes:  # refused before selecting texts, which embeds every class
            raise ClassifierInputError(f"{len(class_names)} class names to tune; the limit is {config.max_classes} "
                                       "(tuning.max_classes)")
        selection = self.select_tuning_texts(class_names, descriptions, domain, tuning=config)
        data = training_texts(selection, config.multi_label)
        prompts = tune(self.clap, list(class_names), data, config, progress=progress, should_stop=should_stop)
        prompts.report["selection"] = selection.format_report()
        return prompts

    def classify_tuned(self, audio: Audio, prompts: TunedPrompts, embedded: WindowEmbeddings | None = None
                       ) -> TunedClassification:
        """Scores from tuned prompts; ``embedded`` must hold frame embeddings (``embed(audio, frames=True)``)."""
        return self._prompted_classifier(prompts).classify(audio, embedded)

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

    # --- annotation ----------------------------------------------------------------------------------------------

    def suggest(self, audio: Audio, class_names: Sequence[str], *, tuned: TunedPrompts | None = None,
                domain: Domain | None = None, labels: int = 3) -> tuple[Suggestion, ModelVersions]:
        """What the models propose for one clip (generated and retrieved captions, labels with scores) and the
        versions behind it, for an annotator to accept or correct. Tuned prompts score the labels when they are for
        exactly these class names; otherwise zero-shot. Single-label: the best label; multi-label: those above the
        threshold, at most ``labels``."""
        store = domain.datastore if domain else self.datastore
        names = list(class_names)
        use_tuned = tuned is not None and tuned.is_for(names)
        embedded = self.embed(audio, frames=use_tuned)  # the one audio-tower pass of this request
        retrieved = tuple(self.retrieve(audio, 3, domain, embedded).clip.captions[0]) if store is not None else ()
        caption = self.caption(audio, domain, embedded=embedded).clip.caption if self.captioner is not None else ""
        if use_tuned:
            scores = self.classify_tuned(audio, tuned, embedded).as_dict()
            chosen = [max(scores, key=scores.get)]
        else:
            result = self.classify(audio, names, domain=domain, embedded=embedded)
            scores, chosen = result.as_dict(), result.predicted()
        chosen = sorted(chosen, key=scores.get, reverse=True)[:labels]
        suggestion = Suggestion(caption, retrieved, tuple(chosen), scores, "tuned" if use_tuned else "zero-shot")
        versions = ModelVersions(
            clap_name=self.clap.name, clap_fingerprint=self.clap.fingerprint,
            datastore_version=(f"{domain.name}:" if domain else "") + (store.manifest.data or "flat") if store else "",
            datastore_size=len(store) if store is not None else None,
            llm=self.captioner.llm.name if self.captioner else "",
            decoder=self.config.caption.checkpoint if self.captioner else "",
            prompt_key=tuned.content_key() if use_tuned else "")
        return suggestion, versions

    # --- domains: a session's own captions -------------------------------------------------------------------------

    def build_domain(self, name: str, captions: Sequence[str], progress: DatastoreProgress | None = None) -> Domain:
        """A domain from captions alone (DRCap's adaptation): their datastore, which is also the projection support.
        It belongs to the caller (a session) until saved with :meth:`save_domain`."""
        name = check_domain_name(name)
        store = CaptionDatastore.build(captions, self.clap, self.config.datastore, source=name, show_progress=False,
                                       progress=progress)
        return Domain(name, store)

    def save_domain(self, domain: Domain) -> Path:
        """Save a domain under its name for every session (atomically: a new version of its folder)."""
        return domain.datastore.save(self._domains_dir() / check_domain_name(domain.name))

    def domain_names(self) -> list[str]:
        """Saved domains, by name."""
        root = self._domains_dir()
        return sorted(p.name for p in root.iterdir() if is_datastore(p)) if root.is_dir() else []

    def load_domain(self, name: str) -> Domain:
        folder = self._domains_dir() / check_domain_name(name)
        if not is_datastore(folder):
            raise DatastoreError(f"No saved domain is called {name!r}")
        return Domain(name, CaptionDatastore.load(folder, self.clap, self.config.datastore))

    def _domains_dir(self) -> Path:
        return self.config.resolved_cache_dir() / "domains" / self.clap.fingerprint

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
            "readiness": self.readiness.state,
            "readiness_message": self.readiness.describe(),
        }


def check_domain_name(name: str) -> str:
    """A domain name is also a folder name: letters, digits, spaces, '-', '_' and '.', 1-64 characters."""
    cleaned = " ".join((name or "").split())
    if not re.fullmatch(r"[\w][\w .-]{0,63}", cleaned) or cleaned.endswith("."):
        raise DatastoreError(f"{name!r} cannot name a domain: use 1-64 letters, digits, spaces, '-', '_' or '.'")
    return cleaned


def datastore_build_needed(config: AppConfig, clap: ClapBackend) -> bool:
    """True when opening the configured datastore means embedding its captions first (not yet built or cached)."""
    ds = config.datastore
    if ds.path and is_datastore(ds.path):
        return False
    if not ds.sources:
        return False
    return not is_datastore(Path(ds.path) if ds.path else _cache_path(config, clap))


def open_datastore(config: AppConfig, clap: ClapBackend, show_progress: bool = True,
                   progress: DatastoreProgress | None = None) -> CaptionDatastore | None:
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
    store = CaptionDatastore.from_files(ds.sources, clap, ds, show_progress=show_progress, progress=progress)
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


__all__ = ["AudioScribe", "Domain", "Readiness", "Retrieval", "check_domain_name", "datastore_build_needed",
           "open_datastore", "top_caption_rows"]
