"""The one place for AudioScribe's settings and their defaults.

Settings are plain dataclasses grouped by concern. An :class:`AppConfig` is assembled from, in increasing priority:
the defaults below, a profile file (TOML, ``assets/profiles/<name>.toml`` or any path), environment variables
``AUDIOSCRIBE_<SECTION>__<FIELD>`` and ``--set section.field=value`` command-line overrides. Values are
type-checked against the dataclass field types, so a typo fails loudly instead of being ignored.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import get_origin, get_type_hints

from engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Hugging Face Spaces): the same parser, packaged separately
    import tomli as tomllib

WINDOW_POLICIES = ("shift", "keep", "drop")


@dataclass
class AudioConfig:
    """How audio is decoded and cut into model windows."""

    max_duration_s: float = 1800.0  # refuse longer inputs (30 minutes) before decoding them in full
    window_s: float = 10.0  # CLAP models see at most this much audio at once
    hop_s: float = 10.0  # distance between window starts; < window_s gives overlapping windows
    # What to do with the tail when the clip is not a whole number of hops long:
    #   "shift": the last window is moved back so that it ends at the clip's end (full length, may overlap)
    #   "keep":  the last window is shorter than window_s
    #   "drop":  the partial tail is ignored (unless it is the only window)
    last_window: str = "shift"


@dataclass
class ClapConfig:
    """Which CLAP model embeds audio and text, and where it runs."""

    backend: str = "hf"  # a name registered in engine.clap (see engine.clap.BACKENDS)
    # Hub id, local directory, or "builtin:tiny-random" (a tiny untrained CLAP built on first use, for offline runs).
    model: str = "laion/clap-htsat-unfused"
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    fp16: bool = True  # half precision on CUDA; ignored on CPU, where fp16 is slow and inexact
    batch_size: int = 16  # audio windows per forward pass
    text_batch_size: int = 256  # texts per forward pass
    max_text_tokens: int = 77  # longer captions are truncated, as in LAION-CLAP training
    # Text tokenizer for backends whose checkpoint does not carry one, e.g. drcap: a hub id like roberta-base or a
    # local folder; empty = the backend's default.
    tokenizer: str = ""


@dataclass
class DatastoreConfig:
    """The caption datastore used for retrieval (and, later, as DRCap's projection support)."""

    path: str = ""  # directory of a saved datastore; built from `sources` on first start if it does not exist
    sources: list[str] = field(default_factory=list)  # caption files: AudioCaps-style CSV, DRCap jsonl, or .txt
    csv_column: str = "caption"
    jsonl_field: str = "target"
    exact_max_size: int = 200_000  # above this many captions an approximate index is used (below: exact search)
    # the approximate index: "ivf_sq8" / "ivf_sq4" (IVF cells of 8- / 4-bit codes; candidates re-scored exactly) or
    # "ivf" (IVF cells of full vectors: a second copy of the embeddings); chosen by measurement (benchmarks/RESULTS.md)
    approximate_index: str = "ivf_sq8"
    ivf_nlist: int = 0  # IVF cells; 0 picks 2*sqrt(N) for ivf_sq8/ivf_sq4, 4*sqrt(N) for ivf
    ivf_nprobe: int = 64  # IVF cells visited per query: higher is slower and closer to exact (RESULTS.md)
    rerank_depth: int = 50  # ivf_sq8/ivf_sq4: candidates per query re-scored exactly (at least k)
    chunk_size: int = 2048  # captions embedded per chunk while building
    top_k: int = 5  # captions shown per query
    max_caption_file_mb: float = 512.0  # larger caption files are refused before reading (AudioCaps is 5 MB)


@dataclass
class ClassifyConfig:
    """Zero-shot classification defaults."""

    templates: list[str] = field(default_factory=lambda: ["This is a sound of {}."])
    multi_label: bool = False
    threshold: float = 0.5  # multi-label decision threshold on the sigmoid score
    # Prompt projection (engine.classifier.project_prompts): class prompts expressed through the datastore captions
    # they resemble. For a CLAP trained on a narrow corpus (the demo bundle); off for general CLAPs.
    prompt_projection: bool = False
    prompt_temperature: float = 0.02
    max_classes: int = 1000


@dataclass
class PromptTuningConfig:
    """Audio-free prompt tuning (AFPT, Li et al. ICASSP 2024).

    The defaults deviate from the paper's code where a comment says so; ``preset = "reference"`` restores the code's
    values (see :data:`TUNING_PRESETS`, the one place presets are defined). Build a preset in code with
    :meth:`from_preset`; ``PromptTuningConfig(preset=...)`` alone only records the name.
    """

    # "default" | "reference" (AFPT's code) | "quick" (minutes on a CPU): named value sets (TUNING_PRESETS)
    preset: str = "default"
    prompt_len: int = 32  # vectors per prompt set (coarse and fine), shared across classes
    init_std: float = 0.02
    class_max_tokens: int = 24  # tokens for " <class name>" incl. special tokens (AFPT: 68 = 100 - 32)
    caption_max_tokens: int = 77  # caption tokens for the frozen caption features (AFPT: 100)
    # Deviation: pad each batch of captions only to its longest caption. True = AFPT's code: every caption padded to
    # caption_max_tokens, and (with mask_padding = false) the pads' token features take part in the fine pooling.
    pad_captions_to_max: bool = False
    caption_tokens_fp32: bool = False  # deviation: caption token features kept in float16 (half the memory)
    token_temperature: float = 0.1  # softmax pooling over caption tokens / audio frames
    mask_padding: bool = True  # deviation: padding gets -inf in the token softmax; False = AFPT's leaky 0-logit mask
    double_embedding: bool = False  # deviation; True = AFPT's code: class tokens pass the embedding layer twice
    train_dropout: bool = True  # AFPT encodes the class prompts with the text tower in training mode (dropout on)
    multi_label: bool = False  # ranking loss on raw cosines (AFPT's multi-label mode) instead of cross-entropy
    ranking_scale: float = 5.0
    lr: float = 2e-3
    weight_decay: float = 0.01  # AdamW's default, as in AFPT (betas 0.9/0.98, eps 1e-6)
    epochs: int = 10
    batch_size: int = 24
    seed: int = 0
    min_texts_per_class: int = 16
    max_texts_per_class: int = 128
    logit_scale_max: float = 100.0  # AFPT clamps exp(logit_scale) to at most 100
    max_classes: int = 50  # more class names are refused: each step encodes every class twice (cost ~ C^2)
    # Early stop: end the run once `patience` epochs in a row bring the mean epoch loss no lower than
    # (1 - plateau_tolerance) x the best before them. 0 = off: every epoch runs (AFPT).
    patience: int = 0
    plateau_tolerance: float = 0.02
    # Autocast while encoding the class prompts (the step's cost): "auto" = the model's own half dtype on CUDA (an
    # fp16 model tunes in fp16 with loss scaling), bf16 on a CPU with native bf16 (AMX), else none | "bf16" | "fp16"
    # (always with loss scaling) | "no". Caption features, losses and the prompts themselves stay float32.
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        _check_preset(self.preset)  # an unknown name fails here, not silently later
        _check_tuning_precision(self.mixed_precision)

    @classmethod
    def from_preset(cls, preset: str, **explicit: object) -> PromptTuningConfig:
        """The preset's values, then ``explicit`` ones on top (explicit settings always win)."""
        return cls(**{**tuning_preset(preset), "preset": preset, **explicit})


# Presets of the tuning section: named sets of field values, applied before any explicit setting (from a profile,
# the environment, --set or --preset), which therefore always wins. "default" is the dataclass defaults above.
TUNING_PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # Reproduces the numbers of AFPT's code (Ming-er/Audio-Free-P-Tuning @0b7d7ee), not only its formulas:
    # BERT's 100-token text length for captions (pads included in the fine pooling through the leaky mask) and for
    # class prompts (68 tokens + 32 prompts), the double embedding pass, float32 features, and its hyper-parameters.
    # Token lengths are capped to what the CLAP's text tower takes (100 fits every real CLAP here). float32 throughout
    # (no autocast), as the code runs.
    "reference": {
        "mask_padding": False, "double_embedding": True, "pad_captions_to_max": True, "caption_tokens_fp32": True,
        "caption_max_tokens": 100, "class_max_tokens": 68, "train_dropout": True, "prompt_len": 32,
        "init_std": 0.02, "token_temperature": 0.1, "ranking_scale": 5.0, "lr": 2e-3, "weight_decay": 0.01,
        "epochs": 10, "batch_size": 24, "logit_scale_max": 100.0, "mixed_precision": "no",
    },
    # A run a CPU user can wait for (benchmarks/RESULTS.md, "Prompt tuning": run time and accuracy against
    # "default"): shorter prompts (each step encodes C x (1 + prompt_len + name tokens) positions twice), fewer
    # captions per class and epochs, and an early stop once the epoch loss stops falling.
    "quick": {
        "prompt_len": 8, "max_texts_per_class": 32, "epochs": 6, "patience": 1,
    },
}


def tuning_preset(name: str) -> dict[str, object]:
    """The values a tuning preset sets: every field that any preset names, from this preset or else the dataclass
    default (so switching from "reference" back to "default" undoes all of it). Unknown names are a ConfigError."""
    _check_preset(name)
    defaults = {f.name: f.default for f in fields(PromptTuningConfig)}
    named = {key for values in TUNING_PRESETS.values() for key in values}
    return {key: TUNING_PRESETS[name].get(key, defaults[key]) for key in sorted(named)}


def _check_preset(name: str) -> None:
    if name not in TUNING_PRESETS:
        raise ConfigError(f"tuning.preset must be one of {', '.join(TUNING_PRESETS)}, got {name!r}")


TUNING_PRECISIONS = ("auto", "bf16", "fp16", "no")


def _check_tuning_precision(value: str) -> None:
    if value not in TUNING_PRECISIONS:
        raise ConfigError(f"tuning.mixed_precision must be one of {', '.join(TUNING_PRECISIONS)}, got {value!r}")


@dataclass
class LLMConfig:
    """The language model DRCap decodes with, and its LoRA adapters."""

    # Hub id, local folder, or "builtin:tiny-llama" (a tiny untrained Llama built on first use, for offline runs).
    model: str = "lmsys/vicuna-7b-v1.5"
    # "auto": nf4 on CUDA, none on CPU (said in the log and the UI); "nf4" and "int8" need bitsandbytes.
    quantization: str = "auto"
    device: str = "auto"
    # Compute dtype. "auto": bfloat16 on CUDA and for large models on the CPU (a 7B model does not fit in RAM as
    # float32), float32 for small models on the CPU.
    dtype: str = "auto"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class CaptionConfig:
    """DRCap captioning: projection decoding, retrieval augmentation, prompt layout and generation."""

    enabled: bool = True  # load the LLM and show generated captions
    checkpoint: str = ""  # trained mapping network + LoRA (folder from trainers.train_drcap, or DRCap's model.pt)
    support: str = ""  # projection support: "" = the datastore's captions; or a datastore folder or [N, D] tensor file
    projection: bool = True  # project the audio embedding onto the support (DRCap's PD); False feeds it directly
    temperature: float = 0.0  # PD softmax temperature; 0 = the CLAP's own temperature (DRCap)
    renormalize: bool = False  # L2-normalise the projected embedding (DRCap does not)
    use_rag: bool = True  # retrieved captions in the prompt (with rag_first=false: the "Similar audios" sentence)
    rag_first: bool = True  # retrieved captions as a separate segment before the soft token (DRCap's default)
    rag_k: int = 3
    instruction: str = "Describe the audio you hear."
    mapping_hidden: int = 2048  # mapping network: CLAP dim -> mapping_hidden -> ReLU -> LLM hidden size
    num_beams: int = 4
    max_new_tokens: int = 200
    repetition_penalty: float = 1.0
    batch_size: int = 4
    max_window_captions: int = 30  # long audio: at most this many per-window captions; more windows are merged
    fast_decoding: bool = True  # static KV cache + compiled decode step (CUDA; CPU: plain); false = plain generate


@dataclass
class ServerConfig:
    """How the Gradio app is served."""

    host: str = ""  # "" = Gradio's default: $GRADIO_SERVER_NAME (Spaces set it) or 127.0.0.1
    port: int = 0  # 0 = Gradio's default: $GRADIO_SERVER_PORT or 7860
    share: bool = False
    max_upload_mb: int = 500
    upload_ttl_s: int = 86_400  # uploads in Gradio's cache are deleted after this many seconds (checked hourly)


@dataclass
class AnnotateConfig:
    """The annotation workflow (Annotate and Export tabs)."""

    root: str = ""  # folder of annotation queues (one SQLite store each); "" = <cache_dir>/annotations
    server_paths: bool = True  # let the browser open folders and list files on the server (turn off on public hosts)
    suggested_labels: int = 3  # labels pre-ticked from the scores (single-label: the best one only)


@dataclass
class AppConfig:
    """Everything a running AudioScribe needs; see :func:`load_config`."""

    profile: str = "offline"
    cache_dir: str = ""  # where built models and datastores are cached; "" = $AUDIOSCRIBE_CACHE or ~/.cache/audioscribe
    audio: AudioConfig = field(default_factory=AudioConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("AUDIOSCRIBE_CACHE", "~/.cache/audioscribe")).expanduser()

    def annotation_root(self) -> Path:
        return Path(self.annotate.root).expanduser() if self.annotate.root else self.resolved_cache_dir() / "annotations"


# --------------------------------------------------------------------------------------------------------------------
# loading

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "assets" / "profiles"
DEFAULT_PROFILE = "offline"
ENV_PREFIX = "AUDIOSCRIBE_"
_SECTIONS = ("audio", "clap", "datastore", "classify", "tuning", "llm", "caption", "server", "annotate")
QUANTIZATIONS = ("auto", "nf4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
# Fields holding file-system paths: relative values in a profile file are resolved against that file's folder.
_PATH_FIELDS = {("datastore", "path"), ("datastore", "sources"), ("caption", "checkpoint"), ("caption", "support")}
# Fields that hold a hub id or a path: only values starting with ./ or ../ are paths relative to the profile file.
_MAYBE_PATH_FIELDS = {("clap", "model"), ("clap", "tokenizer"), ("llm", "model")}
# Settings that name a preset (a set of values of their section): applied before every explicit setting.
_PRESET_SETTINGS = {"tuning.preset"}


def list_profiles() -> list[str]:
    """Names of the profiles shipped in assets/profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_config(
    profile: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Build an AppConfig from a profile, the environment and ``section.field=value`` overrides.

    ``profile`` is a shipped profile name (see :func:`list_profiles`) or a path to a TOML file; ``None`` takes
    ``$AUDIOSCRIBE_PROFILE`` or the default profile. Later sources win: profile < environment < overrides.
    """
    environ = os.environ if environ is None else environ
    profile = profile or environ.get(ENV_PREFIX + "PROFILE") or DEFAULT_PROFILE
    profile_path = _find_profile(profile)
    config = AppConfig(profile=profile_path.stem)
    with open(profile_path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Profile {profile_path} is not valid TOML: {e}") from e
    assignments = _mapping_assignments(data, origin=str(profile_path), base_dir=profile_path.parent)
    for key, raw in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and "__" in key:
            section, name = key[len(ENV_PREFIX):].lower().split("__", 1)
            assignments.append((f"{section}.{name}", raw, f"environment variable {key}", None))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.field=value, e.g. clap.device=cpu")
        dotted, raw = item.split("=", 1)
        assignments.append((dotted.strip(), raw.strip(), f"override {item!r}", None))
    # Presets first (a stable sort keeps source order otherwise): a preset is a named set of defaults, so every
    # explicit setting wins over it, whichever source each comes from.
    for dotted, raw, origin, base_dir in sorted(assignments, key=lambda a: a[0] not in _PRESET_SETTINGS):
        set_field(config, dotted, raw, origin=origin, base_dir=base_dir)
    return config


def set_field(config: AppConfig, dotted: str, raw: object, origin: str = "", base_dir: Path | None = None) -> None:
    """Set ``section.field`` (or a top-level field) from a raw value, converting strings to the field's type."""
    parts = dotted.split(".")
    target: object = config
    for part in parts[:-1]:
        if part not in _SECTIONS or not hasattr(target, part):
            raise ConfigError(f"Unknown setting section {part!r} in {origin}; sections are {', '.join(_SECTIONS)}")
        target = getattr(target, part)
    name = parts[-1]
    types = get_type_hints(type(target))
    if name not in {f.name for f in fields(target)} or name in _SECTIONS:
        known = ", ".join(f.name for f in fields(target) if f.name not in _SECTIONS)
        raise ConfigError(f"Unknown setting {dotted!r} in {origin}; known here: {known}")
    value = _coerce(raw, types[name], dotted, origin)
    if dotted in _PRESET_SETTINGS:  # a preset sets its whole set of values (load_config applies presets first)
        for preset_field, preset_value in tuning_preset(str(value)).items():
            setattr(target, preset_field, preset_value)
    if base_dir is not None and ((parts[0], name) in _PATH_FIELDS or (
            (parts[0], name) in _MAYBE_PATH_FIELDS and str(value).startswith(("./", "../")))):
        value = _resolve_paths(value, base_dir)
    setattr(target, name, value)
    _validate(config)


def config_to_dict(config: AppConfig) -> dict:
    """Plain-dict view of a config (for logs, manifests and the app's settings panel)."""
    return asdict(config)


def _find_profile(profile: str) -> Path:
    candidate = Path(profile).expanduser()
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"Profile file {candidate} does not exist")
        return candidate
    shipped = PROFILES_DIR / f"{profile}.toml"
    if not shipped.is_file():
        raise ConfigError(f"Unknown profile {profile!r}; shipped profiles: {', '.join(list_profiles())}, "
                          "or give a path to a .toml file")
    return shipped


def _mapping_assignments(data: Mapping, origin: str, base_dir: Path) -> list[tuple[str, object, str, Path | None]]:
    """(dotted name, raw value, origin, base folder) for every setting in a profile's TOML data."""
    out: list[tuple[str, object, str, Path | None]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.extend((f"{key}.{name}", inner, origin, base_dir) for name, inner in value.items())
        else:
            out.append((key, value, origin, base_dir))
    return out


def _resolve_paths(value: str | list[str], base_dir: Path) -> str | list[str]:
    def one(p: str) -> str:
        if not p:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    return [one(p) for p in value] if isinstance(value, list) else one(value)


def _coerce(raw: object, annotation: object, dotted: str, origin: str) -> object:
    """Convert ``raw`` to the annotated type; strings (env vars, flags) are parsed, other values type-checked."""
    where = f"{dotted} (from {origin})" if origin else dotted
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[raw.strip().lower()]
        raise ConfigError(f"{where} must be true or false, got {raw!r}")
    if annotation in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{where} must be a number, got {raw!r}")
        try:
            if annotation is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return annotation(raw) if not isinstance(raw, str) else annotation(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where} must be {'an integer' if annotation is int else 'a number'}, "
                              f"got {raw!r}") from None
    if annotation is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where} must be a string, got {raw!r}")
        return raw
    if get_origin(annotation) is list:
        if isinstance(raw, str):
            text = raw.strip()
            items = json.loads(text) if text.startswith("[") else [s for s in text.split(",")]
            raw = [s.strip() for s in items if str(s).strip()]
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise ConfigError(f"{where} must be a list of strings, got {raw!r}")
        return list(raw)
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")  # a programming error, said clearly


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _validate(config: AppConfig) -> None:
    a = config.audio
    if a.last_window not in WINDOW_POLICIES:
        raise ConfigError(f"audio.last_window must be one of {', '.join(WINDOW_POLICIES)}, got {a.last_window!r}")
    for name, value in (("audio.window_s", a.window_s), ("audio.hop_s", a.hop_s),
                        ("audio.max_duration_s", a.max_duration_s),
                        ("datastore.max_caption_file_mb", config.datastore.max_caption_file_mb)):
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in (("clap.batch_size", config.clap.batch_size),
                        ("clap.text_batch_size", config.clap.text_batch_size),
                        ("datastore.chunk_size", config.datastore.chunk_size),
                        ("datastore.top_k", config.datastore.top_k),
                        ("classify.max_classes", config.classify.max_classes),
                        ("tuning.max_classes", config.tuning.max_classes),
                        ("caption.max_window_captions", config.caption.max_window_captions),
                        ("server.upload_ttl_s", config.server.upload_ttl_s)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if config.llm.quantization not in QUANTIZATIONS:
        raise ConfigError(f"llm.quantization must be one of {', '.join(QUANTIZATIONS)}, got {config.llm.quantization!r}")
    if config.llm.dtype not in DTYPES:
        raise ConfigError(f"llm.dtype must be one of {', '.join(DTYPES)}, got {config.llm.dtype!r}")
    _check_tuning_precision(config.tuning.mixed_precision)
    for name, value in (("caption.rag_k", config.caption.rag_k), ("caption.num_beams", config.caption.num_beams),
                        ("caption.max_new_tokens", config.caption.max_new_tokens),
                        ("caption.batch_size", config.caption.batch_size), ("llm.lora_r", config.llm.lora_r)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if config.caption.temperature < 0:
        raise ConfigError(f"caption.temperature must be >= 0 (0 = the CLAP's own), got {config.caption.temperature}")
    if not config.classify.prompt_temperature > 0:
        raise ConfigError(f"classify.prompt_temperature must be positive, got {config.classify.prompt_temperature}")
    if not 0.0 < config.classify.threshold < 1.0:
        raise ConfigError(f"classify.threshold must be between 0 and 1, got {config.classify.threshold}")


# --------------------------------------------------------------------------------------------------------------------
# training settings (the same dataclass system; the models come from an AppConfig profile)


@dataclass
class DrcapTrainConfig:
    """Text-only DRCap training. Defaults are DRCap's (drcap.md §2.6) unless a comment says otherwise."""

    train: str = ""  # DRCap jsonl (target, text, similar_captions) or any caption file (retrieval is then computed)
    val: str = ""  # the same for validation; "" = hold out val_fraction of train
    out: str = "runs/drcap"  # checkpoints: out/best (lowest val loss), out/last (+ training state, for resume)
    use_peft: bool = True  # LoRA on the LLM (r/alpha/dropout/targets from the llm section)
    freeze_llm: bool = True  # with use_peft=false: true trains the mapping network only, false the whole LLM too
    use_rag: bool = True
    rag_first: bool = True
    instruction: str = "Describe the audio you hear."
    mapping_hidden: int = 2048
    noise_std: float = 0.0  # Gaussian noise on the text embedding (CapDec-style); DRCap uses none
    band_low: float = 0.75  # training retrieval band (for caption files without similar_captions)
    band_high: float = 0.85
    rag_k: int = 3
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    total_steps: int = 40000  # linear decay to 0 at this step; training stops there or after `epochs`
    epochs: int = 4
    batch_size: int = 4
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (autocast to the LLM's dtype: bf16, or fp16 + loss scaling) | fp16 | bf16 | no
    val_every: int = 1000  # optimizer steps between validations
    val_fraction: float = 0.05
    log_every: int = 10
    shuffle: bool = True  # DRCap's single-GPU run does not shuffle; shuffling (seeded) is the better default
    seed: int = 1234
    resume: bool = False  # continue from out/last
    stop_after: int = 0  # end this run after N optimizer steps, saving out/last (0 = run to the end); --resume later
    max_val_samples: int = 0  # 0 = the whole validation set


def dataclass_to_argparse(parser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--field-name`` option per dataclass field, parsed as a string and converted by :func:`fill_dataclass`."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="VALUE",
                            help=f"default: {default!r}")


def fill_dataclass(cls: type, values: Mapping[str, object], origin: str = "command line") -> object:
    """An instance of ``cls`` with the given (string or typed) values converted and type-checked."""
    instance = cls()
    types = get_type_hints(cls)
    for name, raw in values.items():
        if raw is None:
            continue
        if name not in types:
            raise ConfigError(f"Unknown setting {name!r} in {origin}")
        setattr(instance, name, _coerce(raw, types[name], name, origin))
    return instance


@dataclass
class DemoClapTrainConfig:
    """Contrastive training of the demo CLAP's audio tower against the frozen sentence encoder (trainers/
    train_demo_clap.py). The corpus is a soundworld build (trainers/soundworld)."""

    corpus: str = "data/soundworld"  # a soundworld build folder (manifest.jsonl, clips/)
    out: str = "runs/demo_clap"  # the trained model folder (demo_clap.json + model.safetensors)
    extra_text: list[str] = field(default_factory=list)  # caption files that shape the text projection's PCA init
    extra_text_max: int = 10_000  # at most this many of them (evenly spaced)
    sentence_cache: str = ""  # an .npz memo of MiniLM sentence features, reused across runs ("" = none)
    embedding_dim: int = 128
    channels: list[str] = field(default_factory=lambda: ["16", "32", "64", "128", "256"])
    train_text_projection: bool = False  # False keeps the PCA projection: MiniLM's geometry for unseen wordings
    text_lr_scale: float = 0.1  # the text projection's learning rate relative to lr, when it is trained
    same_labels_weight: float = 0.5  # target weight of other clips with the same label set (the clip itself: 1)
    epochs: int = 12
    minutes: float = 0.0  # stop after this much training time (0 = no limit); the best epoch is kept
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    freq_mask: int = 8  # SpecAugment: mask up to this many mel bands (0 = off)
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
