"""A tiny, randomly initialised CLAP that is built locally in about a second.

It exists for two reasons: tests need a real ``ClapModel`` without downloading weights, and the app needs something
to run on a machine with no internet before the trained demo bundle exists. Its weights are random: the folder
carries an ``UNTRAINED_MARKER`` file and every backend loaded from it reports ``is_untrained``, which the UI shows.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

TINY_CLAP_ID = "builtin:tiny-random"
TINY_CLAP_VERSION = 2  # bump when the recipe below changes, so cached copies are rebuilt
UNTRAINED_MARKER = "audioscribe_untrained.json"

# Text the tokenizer's byte-level BPE is trained on: the everyday vocabulary of sound captions.
_TOKENIZER_CORPUS = """
a man speaks while a woman talks and children laugh in the background
a dog barks repeatedly and a cat meows while birds chirp and sing
rain falls on a roof as thunder rumbles and wind blows through trees
a car engine revs and accelerates then a horn honks and tires screech
a siren wails as an emergency vehicle passes by on a busy street
water flows and splashes in a stream while frogs croak nearby
people clap and cheer while music plays and a crowd applauds
a train horn blows and a train passes on railroad tracks with a bell ringing
an airplane flies overhead with a loud jet engine roar
a baby cries and a woman speaks softly then footsteps walk on wood
a door opens and closes with a creak then a knock and a telephone rings
typing on a keyboard with mouse clicks and a printer running
a helicopter hovers as a motorcycle drives by and a bus stops
an insect buzzes while a rooster crows and sheep bleat and cows moo
glass breaks and dishes clatter while a vacuum cleaner hums
someone snores and coughs and sneezes then whistles a tune
an alarm clock beeps and a bell dings as a microphone gives feedback
guitar drums piano violin and a choir sing a song with a beat
ocean waves crash on the shore while seagulls call in the distance
fire crackles and sizzles as food fries in a pan with a hiss
""".split("\n")


def build_tiny_clap(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random ``ClapModel``, its feature extractor and tokenizer to ``directory``; return the path."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_caption_tokenizer()
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        audio_config=dict(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                          window_size=8, spec_size=256, num_mel_bins=64, enable_fusion=False),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    _spread_weights(model, std=_SPREAD_STD)
    model.save_pretrained(directory)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / UNTRAINED_MARKER).write_text(json.dumps(
        {"what": "randomly initialised tiny CLAP; embeddings carry no meaning", "seed": seed,
         "recipe_version": TINY_CLAP_VERSION}, indent=2))
    return directory


# With the default initialisation a random tower maps every input to almost the same direction (cosine ~0.999
# between unrelated captions), which no trained CLAP does. Wider random matrices give a spread of similarities closer
# to a trained model's (mean cosine ~0.85 between unrelated captions), so retrieval and training on the tiny model
# exercise distinguishable embeddings. The weights remain random.
_SPREAD_STD = 0.3


def _spread_weights(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for module in (model.text_model, model.text_projection, model.audio_model, model.audio_projection):
            for parameter in module.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, std)


def ensure_tiny_clap(models_dir: str | os.PathLike) -> Path:
    """The cached tiny CLAP under ``models_dir``, built on first use."""
    return build_once(Path(models_dir) / f"tiny-random-clap-v{TINY_CLAP_VERSION}", build_tiny_clap)


def build_once(target: Path, build: Callable[[Path], object], marker: str = UNTRAINED_MARKER) -> Path:
    """``target`` if it is complete (holds ``marker``), else built by ``build(folder)`` in a staging folder and
    renamed into place, so a crash leaves no half copy and a concurrent build that finished first wins."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        if not target.exists():
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_caption_tokenizer(corpus: Sequence[str] | None = None, vocab_size: int = 600, min_frequency: int = 1):
    """A RoBERTa-style byte-level BPE tokenizer trained on ``corpus`` (default: the sound vocabulary above, in
    milliseconds).

    Special tokens get RoBERTa's ids (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4), so tiny RoBERTa text towers built
    for it (the tiny HF CLAP here, the tiny DRCap CLAP in engine.clap.drcap) use RoBERTa's padding index.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer  # tokenizers-backed in transformers 5

    bpe = ByteLevelBPETokenizer()
    lines = [line for line in (_TOKENIZER_CORPUS if corpus is None else corpus) if line]
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.save_model(tmp)
        vocab = json.loads(Path(vocab_file).read_text())
        merges = [tuple(line.split(" ")) for line in Path(merges_file).read_text().splitlines()[1:] if line]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=77)
