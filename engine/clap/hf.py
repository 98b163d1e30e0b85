"""CLAP from Hugging Face transformers (``ClapModel``): LAION-CLAP checkpoints such as ``laion/clap-htsat-unfused``.

Determinism: ``ClapFeatureExtractor`` crops clips longer than its 10-s window at random (``rand_trunc``) or picks
random chunks (``fusion``). The base class never hands it more than one window of at most ``max_window_s``, so
neither random path is ever taken and the same clip always gives the same embedding. Shorter windows are
repeat-padded to 10 s (LAION's ``repeatpad``), as in LAION-CLAP training. The extractor's features are computed in
torch (engine.clap.features), and ``is_longer`` is always False (the extractor in fusion mode would set it for a
random window of the batch).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.clap.base import ClapBackend, EncoderTextTower, fingerprint_tensors, l2_normalize, resolve_device
from engine.clap.checkpoints import (check_tokenizer_vocabulary, check_weights_cover_model, folder_failure,
                                     is_local_path, model_folder_problem, model_load_errors)
from engine.clap.features import ClapFeatures
from engine.clap.tiny import UNTRAINED_MARKER
from engine.config import AudioConfig
from engine.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import ClapFeatureExtractor, ClapModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class HFClapBackend(ClapBackend):
    """``transformers.ClapModel`` + its feature extractor and tokenizer."""

    def __init__(self, model, feature_extractor, tokenizer, *, name: str, audio_config: AudioConfig,
                 device: torch.device, fp16: bool, batch_size: int, text_batch_size: int, max_text_tokens: int,
                 is_untrained: bool = False) -> None:
        super().__init__(audio_config, batch_size, text_batch_size)
        # The fingerprint is taken from the float32 CPU weights, before any cast, so it is device-independent.
        self.fingerprint = fingerprint_tensors(
            [model.text_projection.linear1.weight, model.text_projection.linear2.weight,
             model.audio_projection.linear1.weight, model.audio_projection.linear2.weight,
             model.logit_scale_a, model.logit_scale_t], type(model).__name__)
        self.dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.feature_extractor = feature_extractor  # its settings and mel filters define self.features
        # The extractor's log-mel in torch, batched on the device (set its truncation before this line).
        self.features = ClapFeatures.from_extractor(feature_extractor).to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.is_untrained = is_untrained
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_window_s = float(feature_extractor.nb_max_samples) / self.sample_rate
        self.embedding_dim = int(model.config.projection_dim)
        # logits_per_audio = audio @ text.T * exp(logit_scale_a): the scale for classifying audio over texts.
        self.logit_scale = float(model.logit_scale_a.detach().float().exp())
        # Room for <s> and </s>; RoBERTa positions start after the padding index, hence the extra 2.
        position_limit = int(model.config.text_config.max_position_embeddings) - 2
        self.max_text_tokens = min(max_text_tokens, position_limit)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, audio_config: AudioConfig | None = None, device: str = "auto",
                        fp16: bool = True, batch_size: int = 16, text_batch_size: int = 256,
                        max_text_tokens: int = 77) -> HFClapBackend:
        """Load from a hub id (cached or downloadable) or a local directory written by ``save_pretrained``."""
        torch_device = resolve_device(device)
        model, feature_extractor, tokenizer = _load_parts(name_or_path)
        # Fused checkpoints expect 4-channel "fusion" features; unfused ones one channel (see module docstring).
        fused = bool(getattr(model.config.audio_config, "enable_fusion", False))
        feature_extractor.truncation = "fusion" if fused else "rand_trunc"
        untrained = Path(name_or_path, UNTRAINED_MARKER).is_file()
        backend = cls(model, feature_extractor, tokenizer, name=name_or_path,
                      audio_config=audio_config or AudioConfig(), device=torch_device, fp16=fp16,
                      batch_size=batch_size, text_batch_size=text_batch_size, max_text_tokens=max_text_tokens,
                      is_untrained=untrained)
        log.info("Loaded CLAP %s", backend.describe())
        return backend

    def _input_features(self, windows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows -> (input_features [B, 1 or 4, frames, mels], is_longer [B, 1]) on the device.

        The features are ``ClapFeatureExtractor``'s, computed in torch on the device (engine.clap.features; equal
        within 1e-6 of their range). ``is_longer`` is all False: every window fits the model's window. (The
        extractor in fusion mode, like LAION-CLAP's HTSAT, would mark a random window of the batch as longer, so an
        embedding would depend on chance and on its batch-mates; here it depends on the window alone.)
        """
        features = self.features(windows)  # raises a typed error for an empty or too-long window
        is_longer = torch.zeros(len(windows), 1, dtype=torch.bool, device=self.device)
        return features.to(self.dtype), is_longer

    def _audio_forward(self, windows: Sequence[np.ndarray]):
        input_features, is_longer = self._input_features(windows)
        return self.model.audio_model(input_features=input_features, is_longer=is_longer)

    @torch.inference_mode()
    def _embed_window_batch(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        pooled = self._audio_forward(windows).pooler_output
        return l2_normalize(self.model.audio_projection(pooled)).cpu()  # [B, D]

    @torch.inference_mode()
    def _embed_window_and_frame_batch(self, windows: Sequence[np.ndarray]
                                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HTSAT frames: the final map, regrouped by HF to [B, C, 2 frequency, 32 time] for a 10-s window, averaged
        over frequency, each of the 32 time steps (~0.32 s) projected by the audio head and L2-normalised (the
        clip embedding is the average of the same map). Short windows are repeat-padded first, so their frames
        cover the repeated audio too."""
        out = self._audio_forward(windows)
        clips = l2_normalize(self.model.audio_projection(out.pooler_output)).cpu()  # [B, D]
        frames = out.last_hidden_state.mean(dim=2).transpose(1, 2)  # [B, C, F, T] -> [B, T, C]
        projected = l2_normalize(self.model.audio_projection(frames)).cpu()  # [B, T, D]
        return clips, list(projected)

    def text_tower(self) -> EncoderTextTower:
        """RoBERTa + ClapModel's text projection; sentence feature = HF CLAP's pooler over the first token."""
        text_model = self.model.text_model
        return EncoderTextTower(self.tokenizer, text_model, self.model.text_projection, self.device,
                                pool=text_model.pooler)

    @torch.inference_mode()
    def _embed_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
        return l2_normalize(self.model.text_projection(pooled)).cpu()  # [B, D]


def _load_parts(name_or_path: str) -> tuple[ClapModel, ClapFeatureExtractor, PreTrainedTokenizerBase]:
    """(ClapModel, feature extractor, tokenizer) from a hub id or a local folder; every failure a ModelLoadError."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    if is_local_path(name_or_path) and (problem := model_folder_problem(name_or_path)):
        raise ModelLoadError(_local_failure(name_or_path, problem))
    with model_load_errors(lambda e: _explain_load_failure(name_or_path, e)):
        model, loading_info = ClapModel.from_pretrained(name_or_path, dtype=torch.float32, output_loading_info=True)
        check_weights_cover_model(model, loading_info, name_or_path)
        feature_extractor = ClapFeatureExtractor.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    check_tokenizer_vocabulary(tokenizer, repr(name_or_path))
    return model, feature_extractor, tokenizer


def _local_failure(folder: str, problem: str) -> str:
    return (f"Could not load a CLAP model from {folder!r}: {problem}. The folder must hold what "
            "ClapModel.save_pretrained and the processor's save_pretrained write (config.json, weights, "
            "preprocessor_config.json, tokenizer files).")


def _explain_load_failure(name_or_path: str, error: Exception) -> str:
    if is_local_path(name_or_path):
        return _local_failure(name_or_path, folder_failure(name_or_path, error))
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = ("HF_HUB_OFFLINE is set, so only the local cache is used"
            if offline else "the hub could not be reached or the id does not exist")
    return (f"Could not load CLAP {name_or_path!r}: {hint} ({type(error).__name__}: {error}). Download it once "
            f"where there is internet (`hf download {name_or_path}`), copy the folder here and set clap.model to "
            "that folder, or use the offline profile (clap.model = \"builtin:tiny-random\").")
