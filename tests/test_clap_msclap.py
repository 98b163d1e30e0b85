"""MS-CLAP 2022 backend (Cnn14 + BERT): released key layout, strict loading, windows, frames, text tower."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from engine.clap import create_clap
from engine.clap.msclap import (
    MsClapBackend,
    MsClapConfig,
    MsClapModel,
    build_tiny_msclap,
    load_msclap_state_dict,
    make_tiny_msclap_model,
    msclap_audio_config,
)
from engine.config import AppConfig, AudioConfig
from engine.errors import ModelLoadError
from engine.prompt_tuning import insert_prompts
from tests.helpers import noise_clip

SR = 44_100
CAPTIONS = ["A dog barks while rain falls on a roof", "a man speaks", "Birds chirp and sing in the morning"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-msclap")
    checkpoint, tokenizer_dir = build_tiny_msclap(directory, seed=0)
    return checkpoint, tokenizer_dir


@pytest.fixture(scope="module")
def clap(tiny) -> MsClapBackend:
    checkpoint, tokenizer_dir = tiny
    config = AppConfig()
    config.clap.backend, config.clap.model, config.clap.tokenizer = "msclap", str(checkpoint), str(tokenizer_dir)
    config.clap.device = "cpu"
    return create_clap(config)


@pytest.fixture(scope="module")
def reference(clap) -> MsClapBackend:
    """The same tiny model built in memory (never saved), behind the same backend class."""
    model = make_tiny_msclap_model(seed=0, vocab_size=len(clap.tokenizer))
    return MsClapBackend(model, clap.tokenizer, name="in-memory", device="cpu")


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return noise_clip(seconds, SR, seed=seed)


# --- loading -----------------------------------------------------------------------------------------------------


def test_registry_loads_the_checkpoint_exactly(clap, reference, tiny):
    assert isinstance(clap, MsClapBackend)
    assert clap.is_untrained and clap.sample_rate == SR and clap.max_window_s == 5.0 and clap.embedding_dim == 16
    assert clap.max_text_tokens == 100
    # the app default window (10 s) is lowered to MS-CLAP's 5 s
    assert (clap.audio_config.window_s, clap.audio_config.hop_s) == (5.0, 5.0)
    loaded, built = clap.model.state_dict(), reference.model.state_dict()
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[k], built[k]) for k in loaded)
    assert clap.fingerprint == reference.fingerprint
    audio = [clip(5.0), clip(3.2, seed=1)]
    assert torch.equal(clap.embed_audio(audio), reference.embed_audio(audio))
    assert torch.equal(clap.embed_text(CAPTIONS), reference.embed_text(CAPTIONS))
    assert torch.equal(clap.embed_frames(audio[0])[1][0], reference.embed_frames(audio[0])[1][0])
    # and the safetensors form of the same weights
    st_checkpoint, _ = build_tiny_msclap(tiny[0].parent / "st", seed=0, safetensors=True)
    from_st = MsClapBackend.from_checkpoint(st_checkpoint, tokenizer=tiny[1], device="cpu")
    assert from_st.fingerprint == clap.fingerprint
    assert torch.equal(from_st.embed_text(CAPTIONS), clap.embed_text(CAPTIONS))


def test_default_sizes_have_the_released_key_layout():
    model = MsClapModel.empty(MsClapConfig())  # uninitialised: fast, and no weights are needed to read shapes
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "logit_scale": [],
        "audio_encoder.base.spectrogram_extractor.stft.conv_real.weight": [513, 1, 1024],
        "audio_encoder.base.spectrogram_extractor.stft.conv_imag.weight": [513, 1, 1024],
        "audio_encoder.base.logmel_extractor.melW": [513, 64],
        "audio_encoder.base.bn0.running_var": [64],
        "audio_encoder.base.bn0.num_batches_tracked": [],
        "audio_encoder.base.conv_block1.conv1.weight": [64, 1, 3, 3],
        "audio_encoder.base.conv_block1.bn2.running_mean": [64],
        "audio_encoder.base.conv_block6.conv2.weight": [2048, 2048, 3, 3],
        "audio_encoder.base.conv_block6.bn1.weight": [2048],
        "audio_encoder.base.fc1.weight": [2048, 2048],
        "audio_encoder.base.fc1.bias": [2048],
        "audio_encoder.base.fc_audioset.weight": [527, 2048],
        "audio_encoder.projection.linear1.weight": [1024, 2048],
        "audio_encoder.projection.linear2.weight": [1024, 1024],
        "audio_encoder.projection.layer_norm.weight": [1024],
        "caption_encoder.base.embeddings.word_embeddings.weight": [30522, 768],
        "caption_encoder.base.embeddings.position_embeddings.weight": [512, 768],
        "caption_encoder.base.embeddings.token_type_embeddings.weight": [2, 768],
        "caption_encoder.base.embeddings.LayerNorm.bias": [768],
        "caption_encoder.base.encoder.layer.0.attention.self.query.weight": [768, 768],
        "caption_encoder.base.encoder.layer.11.attention.output.LayerNorm.weight": [768],
        "caption_encoder.base.encoder.layer.11.intermediate.dense.weight": [3072, 768],
        "caption_encoder.base.encoder.layer.11.output.dense.weight": [768, 3072],
        "caption_encoder.base.pooler.dense.weight": [768, 768],
        "caption_encoder.projection.linear1.weight": [1024, 768],
        "caption_encoder.projection.linear2.weight": [1024, 1024],
        "caption_encoder.projection.layer_norm.bias": [1024],
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any(k.endswith(("position_ids", "token_type_ids")) for k in shapes)  # non-persistent in HF BERT
    assert "caption_encoder.base.encoder.layer.12.output.dense.weight" not in shapes
    assert "audio_encoder.base.conv_block7.conv1.weight" not in shapes
    for no_bias in ("audio_encoder.projection.linear1.bias", "caption_encoder.projection.linear2.bias",
                    "audio_encoder.base.conv_block1.conv1.bias"):
        assert no_bias not in shapes
    assert model.config.num_frames == 19
    assert 190e6 < sum(v.numel() for v in model.state_dict().values()) < 200e6
    # the computed front end is real even in an uninitialised model: periodic Hann x DFT, slaney mel filters
    real = model.cnn14.spectrogram_extractor.stft.conv_real.weight[:, 0]  # [513, 1024]
    assert torch.allclose(real[0], torch.hann_window(1024, periodic=True), atol=1e-6)
    assert model.cnn14.logmel_extractor.melW.sum(dim=0).gt(0).all()


def _save(path, state_dict, **extra):
    torch.save({"model": state_dict, **extra}, path)
    return path


def test_stale_position_ids_are_dropped(tmp_path, tiny, clap):
    state = load_msclap_state_dict(tiny[0])
    state["caption_encoder.base.embeddings.position_ids"] = torch.arange(128)[None]
    path = _save(tmp_path / "old.pth", state, epoch=3)  # extra top-level entries besides "model" are fine
    loaded = MsClapBackend.from_checkpoint(path, tokenizer=tiny[1], device="cpu")
    assert loaded.fingerprint == clap.fingerprint
    # a bare state dict works as well
    torch.save(state, tmp_path / "bare.pth")
    assert MsClapBackend.from_checkpoint(tmp_path / "bare.pth", tokenizer=tiny[1], device="cpu").fingerprint == \
        clap.fingerprint


def test_missing_unexpected_and_misshaped_keys_are_reported(tmp_path, tiny):
    state = load_msclap_state_dict(tiny[0])
    del state["audio_encoder.projection.linear2.weight"]
    del state["caption_encoder.base.pooler.dense.bias"]
    state["audio_encoder.base.att_block.att.weight"] = torch.zeros(3)
    state["audio_encoder.projection.layer_norm.weight"] = torch.ones(17)
    with pytest.raises(ModelLoadError) as error:
        MsClapBackend.from_checkpoint(_save(tmp_path / "bad.pth", state), tokenizer=tiny[1], device="cpu")
    message = str(error.value)
    assert "2 missing key(s)" in message and "audio_encoder.projection.linear2.weight" in message
    assert "caption_encoder.base.pooler.dense.bias" in message
    assert "1 unexpected key(s)" in message and "audio_encoder.base.att_block.att.weight" in message
    assert "audio_encoder.projection.layer_norm.weight: checkpoint [17] vs model [16]" in message
    assert "[audio_encoder.projection.linear2: 1, caption_encoder.base.pooler: 1]" in message  # grouped


def test_pickled_objects_are_refused(tmp_path, tiny):
    state = load_msclap_state_dict(tiny[0])
    path = _save(tmp_path / "pickled.pth", state, args=_TrainingArgs())
    with pytest.raises(ModelLoadError, match="pickled Python objects"):
        MsClapBackend.from_checkpoint(path, tokenizer=tiny[1], device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        MsClapBackend.from_checkpoint(tmp_path / "nope.pth", tokenizer=tiny[1], device="cpu")
    with pytest.raises(ModelLoadError, match="is a folder"):
        MsClapBackend.from_checkpoint(tmp_path, tokenizer=tiny[1], device="cpu")


class _TrainingArgs:
    lr = 1e-4


def test_logit_scale_is_clamped_as_afpt_does(tmp_path, tiny):
    state = load_msclap_state_dict(tiny[0])
    assert math.isclose(MsClapBackend.from_checkpoint(tiny[0], tokenizer=tiny[1], device="cpu").logit_scale,
                        1 / 0.07, rel_tol=1e-6)
    for raw, expected in ((math.log(250.0), 100.0), (-1.0, 1.0), (math.log(42.0), 42.0)):
        state["logit_scale"] = torch.tensor(raw)
        backend = MsClapBackend.from_checkpoint(_save(tmp_path / "scale.pth", state), tokenizer=tiny[1],
                                                device="cpu")
        assert math.isclose(backend.logit_scale, expected, rel_tol=1e-6)
        assert math.isclose(backend.raw_logit_scale, raw, rel_tol=1e-6)


# --- audio -------------------------------------------------------------------------------------------------------


def test_frame_embeddings_of_a_five_second_clip(clap):
    windows, frames = clap.embed_frames(clip(5.0))
    assert len(windows) == 1 and len(frames) == 1
    assert frames[0].shape == (19, clap.embedding_dim) and frames[0].dtype == torch.float32
    assert torch.allclose(frames[0].norm(dim=-1), torch.ones(19), atol=1e-5)
    assert not torch.allclose(frames[0][0], frames[0][-1])


def test_long_clip_is_cut_into_five_second_windows(clap):
    long = clip(12.0, seed=2)
    [result] = clap.embed_windows([long])
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 5.0), (5.0, 10.0), (7.0, 12.0)]
    assert result.embeddings.shape == (3, clap.embedding_dim)
    assert torch.allclose(result.embeddings[2], clap.embed_audio([long[7 * SR:12 * SR]])[0], atol=1e-6)
    windows, frames = clap.embed_frames(long)
    assert len(windows) == 3 and all(f.shape == (19, clap.embedding_dim) for f in frames)


def test_short_clips_are_tiled_deterministically(clap):
    short = clip(1.3, seed=4)
    first, second = clap.embed_audio([short]), clap.embed_audio([short])
    assert torch.equal(first, second)
    tiled = np.tile(short, 4)[:5 * SR]  # MS-CLAP repeats a short clip and keeps the first 5 s
    assert torch.allclose(first, clap.embed_audio([tiled]), atol=1e-6)
    assert clap.embed_frames(short)[1][0].shape == (19, clap.embedding_dim)
    mixed = [clip(5.0, seed=5), short, clip(0.4, seed=6), clip(2.5, seed=7)]
    batched = clap.embed_audio(mixed, batch_size=4)
    one_by_one = torch.cat([clap.embed_audio([c]) for c in mixed])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_audio_config_is_clamped_to_five_seconds(caplog):
    with caplog.at_level(logging.INFO, logger="engine.clap.msclap"):
        clamped = msclap_audio_config(AudioConfig(window_s=10.0, hop_s=8.0, last_window="keep"))
    assert (clamped.window_s, clamped.hop_s, clamped.last_window) == (5.0, 5.0, "keep")
    assert "audio.window_s 10.0 -> 5.0" in caplog.text
    kept = AudioConfig(window_s=4.0, hop_s=2.0)
    assert msclap_audio_config(kept) == kept and msclap_audio_config(kept) is not kept


# --- text --------------------------------------------------------------------------------------------------------


def test_text_is_lower_cased_and_truncated_to_100_tokens(clap):
    assert torch.equal(clap.embed_text(["A DOG Barks"]), clap.embed_text(["a dog barks"]))
    ids = clap.tokenize([" ".join(["rain"] * 300)])["input_ids"]
    assert ids.shape == (1, 100)


def test_text_tower_reproduces_embed_text(clap):
    tower = clap.text_tower()
    tokens = tower.tokenize(CAPTIONS, max_length=100)
    assert (tokens.input_ids[:, 0] == clap.tokenizer.cls_token_id).all()
    with torch.no_grad():
        hidden = tower.encode(tower.embed_words(tokens.input_ids), tokens.attention_mask)
        via_tower = torch.nn.functional.normalize(
            tower.project(tower.sentence_features(hidden, tokens.attention_mask)), dim=-1)
        # zero-length prompts: splicing nothing after [CLS] is exactly the plain encoder input
        spliced, mask = insert_prompts(tower.embed_words(tokens.input_ids), tokens.attention_mask,
                                       torch.empty(0, tower.hidden_size))
        assert torch.equal(mask, tokens.attention_mask)
        assert torch.equal(tower.encode(spliced, mask), hidden)
        # embed_full is BERT's whole embeddings module (word + position + type 0, LayerNorm)
        bert = clap.model.caption_encoder.base
        assert torch.equal(tower.embed_full(tokens.input_ids), bert.embeddings(input_ids=tokens.input_ids))
    assert torch.allclose(via_tower, clap.embed_text(CAPTIONS), atol=1e-6)
    padded = tower.tokenize(["a dog"], max_length=24, pad_to_max=True)
    assert padded.input_ids.shape == (1, 24) and padded.attention_mask.sum() == 4  # [CLS] a dog [SEP]
    assert tower.hidden_size == 32
    params = tower.frozen_parameters()
    assert any(p is bert.embeddings.word_embeddings.weight for p in params)
    assert any(p is clap.model.caption_encoder.projection.linear1.weight for p in params)


def test_prompt_tuning_runs_on_msclap(clap):
    """AFPT end to end on the tiny model: zero prompts reproduce the plain class embedding; a short tune leaves the
    frozen tower untouched and classifies a long clip from its 5-s windows and 19 frames per window."""
    from engine.audio import Audio
    from engine.config import PromptTuningConfig
    from engine.prompt_tuning import (
        PromptedClassifier,
        TrainingTexts,
        prompted_class_embeddings,
        tokenize_classes,
        tune,
    )

    tower = clap.text_tower()
    names = ["dog", "rain"]
    ids = tokenize_classes(tower, names, 24)
    with torch.no_grad():
        plain = prompted_class_embeddings(tower, ids.input_ids, ids.attention_mask, torch.empty(0, tower.hidden_size))
    assert torch.allclose(torch.nn.functional.normalize(plain, dim=-1), clap.embed_text([" dog", " rain"]), atol=1e-6)
    before = [p.detach().clone() for p in tower.frozen_parameters()]
    texts = ["a dog barks", "dogs bark loudly", "rain falls on a roof", "heavy rain and thunder"]
    data = TrainingTexts(texts, np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32))
    config = PromptTuningConfig(prompt_len=4, epochs=2, batch_size=2, double_embedding=True)
    prompts = tune(clap, names, data, config)
    assert all(torch.equal(a, b) for a, b in zip(before, tower.frozen_parameters()))
    assert not clap.model.training
    audio = Audio(waveform=clip(7.0, seed=8), sample_rate=SR, original_sample_rate=SR, original_channels=1,
                  source="<array>")
    result = PromptedClassifier(clap, prompts).classify(audio)
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 5.0), (2.0, 7.0)]
    assert result.window_scores.shape == (2, 2)
    assert np.isclose(result.scores["combined"].sum(), 1.0, atol=1e-5)
