"""Zero-shot audio classification with CLAP: class names x prompt templates -> classifier weights.

Single-label scores are ``softmax(logit_scale * cos(audio, class))`` over the given classes, as in CLAP's own
zero-shot evaluation. Multi-label scores are ``sigmoid(logit_scale * cos + bias)`` per class, thresholded. CLAP
was trained with a softmax, so sigmoid scores are uncalibrated: compare them across clips, tune the threshold (and
``bias``) on labelled data, and read the cosine, which is reported too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from string import Formatter

import numpy as np
import torch

from engine.audio import Audio, Window
from engine.clap.base import ClapBackend, WindowEmbeddings, l2_normalize
from engine.errors import ClassifierInputError

DEFAULT_TEMPLATES = ("This is a sound of {}.",)


def parse_class_names(text: str) -> list[str]:
    """Class names typed by a person: one per line, or comma-separated on a line. Blank and repeated names
    (case-insensitive) are dropped, order is kept."""
    names: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        for piece in line.split(","):
            name = " ".join(piece.split())
            if name and name.casefold() not in seen:
                seen.add(name.casefold())
                names.append(name)
    return names


def check_templates(templates: Sequence[str]) -> list[str]:
    """The non-blank templates, stripped; each must hold exactly one ``{}`` where the class name goes."""
    cleaned = [t.strip() for t in templates if t.strip()]
    if not cleaned:
        raise ClassifierInputError("Give at least one prompt template, e.g. 'This is a sound of {}.'")
    for template in cleaned:
        _check_template(template)
    return cleaned


def _check_template(template: str) -> None:
    """Accept exactly the templates ``template.format(name)`` (how prompts are built) fills with the class name
    once: one bare ``{}`` field, no numbered or named fields, format specs or conversions, and no lone brace.
    ``{{`` and ``}}`` are literal braces, as in ``str.format``. The parse is str.format's own, so a template that
    passes cannot fail later, when the classifier is built."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in Formatter().parse(template)
                  if name is not None]
    except ValueError as e:  # "Single '{' encountered in format string", ...
        raise ClassifierInputError(f"Template {template!r} has a brace without its pair ({e}): use exactly one "
                                   "'{}' where the class name goes, and '{{' or '}}' for a literal brace") from e
    if fields != [("", "", None)]:
        found = ", ".join(_field_text(*field) for field in fields) or "none"
        raise ClassifierInputError(f"Template {template!r} must contain exactly one '{{}}' where the class name "
                                   f"goes (found: {found}); write '{{{{' or '}}}}' for a literal brace")


def _field_text(name: str, spec: str, conversion: str | None) -> str:
    """A replacement field as it was written: '{}', '{0}', '{name!r}', '{:>10}'."""
    return "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"


@dataclass
class ZeroShotClassifier:
    """Unit-norm class embeddings plus the scale that turns cosines into logits."""

    class_names: list[str]
    templates: list[str]
    weights: torch.Tensor  # [C, D] unit-norm
    logit_scale: float

    def cosine(self, audio_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, D] unit-norm audio -> [B, C] cosine similarities."""
        return audio_embeddings.float() @ self.weights.T

    def logits(self, audio_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.cosine(audio_embeddings)  # [B, C]

    def scores(self, audio_embeddings: torch.Tensor, multi_label: bool = False, bias: float = 0.0) -> torch.Tensor:
        """[B, D] -> [B, C]: softmax over classes (single-label) or independent sigmoids (multi-label)."""
        logits = self.logits(audio_embeddings)
        return torch.sigmoid(logits + bias) if multi_label else logits.softmax(dim=-1)


def project_prompts(prompts: torch.Tensor, support: torch.Tensor, temperature: float) -> torch.Tensor:
    """Prompt projection: each [P, D] prompt embedding becomes ``softmax(p·Sᵀ/τ)·S``, a mix of the embeddings of
    the support captions (the datastore's) it resembles, as DRCap projects audio. A CLAP trained on a narrow corpus places
    wordings it never saw ("emergency vehicle wail") poorly; their nearest captions ("a siren wails") it knows."""
    weights = torch.softmax(prompts.float() @ support.float().T / temperature, dim=-1)  # [P, N]
    return weights @ support.float()  # [P, D]


def build_zero_shot_classifier(clap: ClapBackend, class_names: Sequence[str],
                               templates: Sequence[str] = DEFAULT_TEMPLATES, *, max_classes: int = 1000,
                               batch_size: int | None = None, support: torch.Tensor | None = None,
                               support_temperature: float = 0.02) -> ZeroShotClassifier:
    """Embed every (template, class) prompt; a class's weight is the renormalised mean over its templates.
    With ``support`` ([N, D] unit-norm caption embeddings), each prompt is first projected onto it."""
    names = [n for n in class_names if n.strip()]
    if not names:
        raise ClassifierInputError("Type at least one class name (one per line or comma-separated)")
    if len(names) > max_classes:
        raise ClassifierInputError(f"{len(names)} class names given; the limit is {max_classes} "
                                   "(classify.max_classes)")
    if len({n.casefold() for n in names}) != len(names):
        raise ClassifierInputError("Class names must be distinct (case-insensitive); use parse_class_names")
    templates = check_templates(templates)
    prompts = [t.format(name) for name in names for t in templates]  # class-major: [C * T]
    embedded = clap.embed_text(prompts, batch_size=batch_size)  # [C * T, D]
    if support is not None:
        embedded = project_prompts(embedded, support, support_temperature)
    per_class = embedded.view(len(names), len(templates), -1).mean(dim=1)  # [C, D]
    return ZeroShotClassifier(class_names=list(names), templates=templates, weights=l2_normalize(per_class),
                              logit_scale=clap.logit_scale)


@dataclass
class Classification:
    """The result of classifying one clip, for the whole clip and per window."""

    class_names: list[str]
    scores: np.ndarray  # [C] clip-level scores (from the pooled clip embedding)
    cosine: np.ndarray  # [C] clip-level cosine similarities
    windows: list[Window]
    window_scores: np.ndarray  # [W, C]
    multi_label: bool
    threshold: float

    def as_dict(self) -> dict[str, float]:
        """{class name: score}, the shape ``gr.Label`` takes."""
        return {name: float(s) for name, s in zip(self.class_names, self.scores)}

    def predicted(self) -> list[str]:
        """Multi-label: every class at or above the threshold, best first. Single-label: the best class."""
        order = np.argsort(-self.scores, kind="stable")
        if not self.multi_label:
            return [self.class_names[order[0]]]
        return [self.class_names[i] for i in order if self.scores[i] >= self.threshold]


def classify_audio(clap: ClapBackend, classifier: ZeroShotClassifier, audio: Audio, *, multi_label: bool = False,
                   threshold: float = 0.5, bias: float = 0.0, embedded: WindowEmbeddings | None = None
                   ) -> Classification:
    """Score one clip against the classifier, pooled over its windows and window by window (``embedded``: the
    clip's embeddings when the caller already has them)."""
    embedded = embedded or clap.embed_windows([audio])[0]
    clip = embedded.pooled.unsqueeze(0)  # [1, D]
    return Classification(
        class_names=classifier.class_names,
        scores=classifier.scores(clip, multi_label, bias)[0].numpy(),
        cosine=classifier.cosine(clip)[0].numpy(),
        windows=embedded.windows,
        window_scores=classifier.scores(embedded.embeddings, multi_label, bias).numpy(),
        multi_label=multi_label,
        threshold=threshold,
    )
