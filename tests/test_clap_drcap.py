"""DRCap's own CLAP (engine.clap.drcap): checkpoint layout and loading, front end, windowing, batching."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchaudio
from transformers import AutoTokenizer

from engine.clap import BACKENDS, create_clap
from engine.clap.drcap import (
    DrcapClapBackend,
    DrcapClapConfig,
    DrcapClapModel,
    build_tiny_drcap_clap,
    convert_checkpoint_to_safetensors,
    infer_drcap_config,
    make_tiny_drcap_model,
    tiny_drcap_config,
)
from engine.config import AppConfig, AudioConfig
from engine.errors import ModelLoadError
from tests.helpers import noise_clip

SR = 32_000
A = "audio_encoder.audio_enc."
T = "text_encoder.text_encoder."


class TrainingConfig:
    """Stands for the pickled config object of a training checkpoint (any class that is not a plain container)."""

    def __init__(self) -> None:
        self.lr = 1e-4


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return build_tiny_drcap_clap(tmp_path_factory.mktemp("tiny-drcap"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_files):
    return AutoTokenizer.from_pretrained(str(tiny_files[1]))


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The in-memory model the tiny checkpoint was saved from (same seed), never written to disk."""
    return DrcapClapBackend(make_tiny_drcap_model(0, len(tokenizer)), tokenizer, name="in-memory",
                            audio_config=AudioConfig(), device=torch.device("cpu"), fp16=False, batch_size=8,
                            text_batch_size=8)


@pytest.fixture(scope="module")
def drcap(tiny_files, tmp_path_factory):
    config = AppConfig(cache_dir=str(tmp_path_factory.mktemp("cache")))
    config.clap.backend = "drcap"
    config.clap.model = str(tiny_files[0])
    config.clap.tokenizer = str(tiny_files[1])
    config.clap.device = "cpu"
    return create_clap(config)


def _load(path, tiny_files, **kwargs) -> DrcapClapBackend:
    return DrcapClapBackend.from_checkpoint(path, tokenizer=str(tiny_files[1]), device="cpu", **kwargs)


def _assert_same_outputs(a: DrcapClapBackend, b: DrcapClapBackend) -> None:
    clips = [noise_clip(2.0, SR, seed=1), noise_clip(10.0, SR, seed=2)]
    texts = ["a dog barks", "rain falls on a roof while thunder rumbles"]
    assert torch.equal(a.embed_audio(clips), b.embed_audio(clips))
    assert torch.equal(a.embed_text(texts), b.embed_text(texts))
    assert a.fingerprint == b.fingerprint


# --- layout --------------------------------------------------------------------------------------------------------


def test_default_sizes_give_the_released_key_names_and_shapes():
    state = DrcapClapModel(DrcapClapConfig()).state_dict()
    shapes = {k: list(v.shape) for k, v in state.items()}
    expected = {
        A + "audio_feats_extractor.mel_trans.stft.conv_real.weight": [513, 1, 1024],
        A + "audio_feats_extractor.mel_trans.stft.conv_imag.weight": [513, 1, 1024],
        A + "audio_feats_extractor.log_trans.melW": [513, 64],
        A + "bn0.weight": [64], A + "bn0.running_var": [64], A + "bn0.num_batches_tracked": [],
        A + "patch_embed.proj.weight": [96, 1, 4, 4], A + "patch_embed.proj.bias": [96],
        A + "patch_embed.norm.weight": [96],
        A + "layers.0.blocks.0.norm1.weight": [96],
        A + "layers.0.blocks.0.attn.relative_position_bias_table": [225, 4],
        A + "layers.0.blocks.0.attn.relative_position_index": [64, 64],
        A + "layers.0.blocks.0.attn.qkv.weight": [288, 96], A + "layers.0.blocks.0.attn.qkv.bias": [288],
        A + "layers.0.blocks.0.attn.proj.weight": [96, 96],
        A + "layers.0.blocks.0.mlp.fc1.weight": [384, 96], A + "layers.0.blocks.0.mlp.fc2.weight": [96, 384],
        A + "layers.0.blocks.1.attn_mask": [64, 64, 64],
        A + "layers.1.blocks.1.attn_mask": [16, 64, 64],
        A + "layers.2.blocks.1.attn_mask": [4, 64, 64],
        A + "layers.2.blocks.5.attn.relative_position_bias_table": [225, 16],
        A + "layers.2.blocks.5.norm2.bias": [384],
        A + "layers.3.blocks.1.attn.relative_position_bias_table": [225, 32],
        A + "layers.3.blocks.1.mlp.fc1.weight": [3072, 768],
        A + "layers.0.downsample.reduction.weight": [192, 384], A + "layers.0.downsample.norm.weight": [384],
        A + "layers.2.downsample.reduction.weight": [768, 1536],
        A + "norm.weight": [768], A + "norm.bias": [768],
        A + "tscam_conv.weight": [527, 768, 2, 3], A + "tscam_conv.bias": [527],
        A + "head.weight": [527, 527], A + "head.bias": [527],
        T + "embeddings.word_embeddings.weight": [50265, 768],
        T + "embeddings.position_embeddings.weight": [514, 768],
        T + "embeddings.token_type_embeddings.weight": [1, 768],
        T + "embeddings.LayerNorm.weight": [768],
        T + "encoder.layer.11.attention.self.query.weight": [768, 768],
        T + "encoder.layer.11.attention.output.dense.bias": [768],
        T + "encoder.layer.0.intermediate.dense.weight": [3072, 768],
        T + "encoder.layer.0.output.dense.weight": [768, 3072],
        T + "encoder.layer.0.output.LayerNorm.bias": [768],
        "audio_proj.0.weight": [1024, 768], "audio_proj.0.bias": [1024], "audio_proj.2.weight": [1024, 1024],
        "text_proj.0.weight": [1024, 768], "text_proj.2.bias": [1024],
        "temp": [],
    }
    assert {k: shapes.get(k) for k in expected} == expected
    absent = [A + "layers.3.downsample.reduction.weight", A + "layers.3.blocks.1.attn_mask",
              A + "layers.0.blocks.0.attn_mask", T + "pooler.dense.weight", T + "embeddings.position_ids"]
    assert not [k for k in absent if k in state]
    assert sorted({int(k.split(".")[5]) for k in state if k.startswith(A + "layers.2.blocks.")}) == list(range(6))
    assert not any(k.startswith(T + "encoder.layer.12.") for k in state)
    assert {k.split(".")[0] for k in state} == {"audio_encoder", "text_encoder", "audio_proj", "text_proj", "temp"}
    audio_params = sum(v.numel() for k, v in state.items() if k.startswith(A) and "attn_mask" not in k)
    assert 28e6 < audio_params < 32e6
    assert float(state["temp"]) == pytest.approx(0.07)
    # the sizes read back from the shapes are the released ones
    assert infer_drcap_config(state) == DrcapClapConfig()


def test_tiny_sizes_are_read_back_from_the_checkpoint(tiny_files, tokenizer):
    state = torch.load(tiny_files[0], weights_only=True)["model"]
    assert infer_drcap_config(state) == tiny_drcap_config(len(tokenizer))


# --- front end -----------------------------------------------------------------------------------------------------


def test_front_end_matches_torch_stft_and_slaney_mel(reference):
    front = reference.model.htsat.audio_feats_extractor
    wave = torch.from_numpy(np.stack([noise_clip(1.3, SR, seed=4), noise_clip(1.3, SR, seed=5)]))
    power = front.mel_trans(wave)  # [B, 1, frames, 513]
    spec = torch.stft(wave, n_fft=1024, hop_length=320, window=torch.hann_window(1024), center=True,
                      pad_mode="reflect", return_complex=True)
    expected = (spec.abs() ** 2).transpose(1, 2)[:, None]
    assert power.shape == expected.shape == (2, 1, 1 + wave.shape[1] // 320, 513)
    assert ((power - expected).abs().max() / expected.abs().max()) < 1e-4
    strong = expected > 1e-3 * expected.max()
    assert ((power - expected).abs()[strong] / expected[strong]).max() < 1e-4
    mel = torchaudio.functional.melscale_fbanks(n_freqs=513, f_min=50, f_max=14000, n_mels=64, sample_rate=32000,
                                                norm="slaney", mel_scale="slaney")
    assert torch.equal(front.log_trans.melW, mel)
    log_mel = front(wave)
    torch.testing.assert_close(log_mel, 10 * torch.log10(torch.clamp(power @ mel, min=1e-6)))


def test_short_window_is_stretched_to_1024_frames(reference):
    htsat = reference.model.htsat
    clip = noise_clip(3.0, SR, seed=6)
    raw = htsat.log_mel(torch.from_numpy(clip)[None])
    assert raw.shape == (1, 1, 301, 64)
    stretched = reference.prepare_windows([clip])
    assert stretched.shape == (1, 1, 1024, 64)
    # align_corners=True: the first and last frames stay where they were
    torch.testing.assert_close(stretched[0, 0, [0, -1]], raw[0, 0, [0, -1]])
    # a 10-s window has 1001 frames and is stretched too; the folded image is 256 x 256
    assert htsat.log_mel(torch.from_numpy(noise_clip(10.0, SR))[None]).shape[2] == 1001
    assert htsat.fold(stretched).shape == (1, 1, 256, 256)
    # a window of a few samples (too short for reflect padding) still embeds
    assert reference.embed_audio([np.zeros(100, dtype=np.float32)]).shape == (1, 16)


# --- loading -------------------------------------------------------------------------------------------------------


def test_reload_through_the_registry_reproduces_the_in_memory_model(drcap, reference, tiny_files):
    assert "drcap" in BACKENDS
    assert isinstance(drcap, DrcapClapBackend)
    assert drcap.name == str(tiny_files[0])
    assert drcap.sample_rate == 32_000 and drcap.max_window_s == 10.0 and drcap.embedding_dim == 16
    assert drcap.is_untrained  # the tiny folder carries the untrained marker
    _assert_same_outputs(drcap, reference)


def test_temperature_is_the_checkpoint_temp(drcap):
    temp = float(torch.load(drcap.name, weights_only=True)["model"]["temp"])
    assert drcap.temperature == temp
    assert drcap.logit_scale == pytest.approx(1.0 / temp)


def test_training_checkpoint_with_plain_extras_loads(tiny_files, drcap, tmp_path):
    state = torch.load(tiny_files[0], weights_only=True)["model"]
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-4)
    parameter.grad = torch.ones(3)
    optimizer.step()
    path = tmp_path / "best_model.pt"
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    _assert_same_outputs(_load(path, tiny_files), drcap)


def test_pickled_objects_are_refused_and_the_trusted_converter_fixes_them(tiny_files, drcap, tmp_path):
    state = torch.load(tiny_files[0], weights_only=True)["model"]
    path = tmp_path / "best_model.pt"
    torch.save({"model": state, "config": TrainingConfig(), "epoch": 3}, path)
    with pytest.raises(ModelLoadError, match="holds pickled Python objects") as info:
        _load(path, tiny_files)
    assert "convert_checkpoint_to_safetensors" in str(info.value)
    assert "TrainingConfig" in str(info.value)  # names the class it refused
    converted = convert_checkpoint_to_safetensors(path, tmp_path / "clap.safetensors")
    _assert_same_outputs(_load(converted, tiny_files), drcap)


def test_safetensors_round_trip(tmp_path, drcap):
    checkpoint, tokenizer_dir = build_tiny_drcap_clap(tmp_path, seed=0, safetensors=True)
    assert checkpoint.suffix == ".safetensors"
    _assert_same_outputs(DrcapClapBackend.from_checkpoint(checkpoint, tokenizer=str(tokenizer_dir), device="cpu"),
                         drcap)


def test_bare_state_dict_with_stale_hf_buffers_loads(tiny_files, drcap, tmp_path):
    state = dict(torch.load(tiny_files[0], weights_only=True)["model"])
    state[T + "embeddings.position_ids"] = torch.arange(40)[None]  # saved by older transformers
    state[T + "embeddings.token_type_ids"] = torch.zeros(1, 40, dtype=torch.long)
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    _assert_same_outputs(_load(path, tiny_files), drcap)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"1 missing key\(s\) \[audio_encoder.audio_enc.layers: 1\]: "
                r"audio_encoder\.audio_enc\.layers\.1\.blocks\.0\.norm1\.weight"),
    ("unexpected", r"1 unexpected key\(s\) \[audio_proj: 1\]: audio_proj\.3\.weight"),
    ("shape", r"1 shape mismatch\(es\): text_proj\.2\.bias: checkpoint \[15\] vs model \[16\]"),
])
def test_checkpoint_mismatches_are_reported_by_name(tiny_files, tmp_path, damage, message):
    state = dict(torch.load(tiny_files[0], weights_only=True)["model"])
    if damage == "missing":
        del state[A + "layers.1.blocks.0.norm1.weight"]
    elif damage == "unexpected":
        state["audio_proj.3.weight"] = torch.zeros(2, 2)
    else:
        state["text_proj.2.bias"] = torch.zeros(15)
    path = tmp_path / "damaged.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ModelLoadError, match=message):
        _load(path, tiny_files)


def test_missing_files_and_tokenizer_are_clear_errors(tiny_files, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nowhere.pt", tiny_files)
    with pytest.raises(ModelLoadError, match="is a folder, not a checkpoint file; it holds best_model.pt"):
        _load(tiny_files[0].parent, tiny_files)
    with pytest.raises(ModelLoadError, match="clap.tokenizer"):
        DrcapClapBackend.from_checkpoint(tiny_files[0], tokenizer=str(tmp_path / "no-tokenizer"), device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"Could not read .*junk\.pt: it is not a tensors-only torch checkpoint"):
        _load(junk, tiny_files)


# --- embeddings ----------------------------------------------------------------------------------------------------


def test_same_clip_twice_is_identical(drcap):
    clip = noise_clip(4.0, SR, seed=3)
    assert torch.equal(drcap.embed_audio([clip]), drcap.embed_audio([clip.copy()]))


def test_batched_equals_one_by_one(drcap):
    clips = [noise_clip(s, SR, seed=i) for i, s in enumerate([0.5, 3.0, 10.0, 14.0, 7.25, 3.0])]
    batched = drcap.embed_audio(clips, batch_size=8)
    singles = torch.cat([drcap.embed_audio([c], batch_size=1) for c in clips])
    assert (batched - singles).abs().max() < 1e-5
    texts = ["a dog barks", "water runs from a tap while a man speaks", "silence", "engine"]
    assert (drcap.embed_text(texts, batch_size=64)
            - torch.cat([drcap.embed_text([t], batch_size=1) for t in texts])).abs().max() < 1e-5


def test_35_second_clip_is_cut_into_four_windows(drcap):
    clip = noise_clip(35.0, SR, seed=7)
    result = drcap.embed_windows([clip])[0]
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (25.0, 35.0)]
    assert result.embeddings.shape == (4, 16)
    for window, row in zip(result.windows, result.embeddings):
        assert (drcap.embed_audio([clip[window.start_sample:window.end_sample]])[0] - row).abs().max() < 1e-5


def test_outputs_are_unit_norm_and_frame_level_features_are_consistent(drcap):
    clips = [noise_clip(2.0, SR, seed=8), noise_clip(10.0, SR, seed=9)]
    audio = drcap.embed_audio(clips)
    text = drcap.embed_text(["rain on a roof", "a siren wails", "birds"])
    assert audio.shape == (2, 16) and text.shape == (3, 16)
    assert audio.dtype == text.dtype == torch.float32
    torch.testing.assert_close(audio.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    frames = drcap.frame_features(clips)
    assert frames.shape == (2, 32, 64)  # tiny model: 8 * 2**3 = 64-d audio features, 32 frames per window
    pooled = torch.nn.functional.normalize(drcap.model.audio_proj(frames.mean(dim=1)), dim=-1)
    torch.testing.assert_close(pooled, audio)
    frame_embeddings = drcap.frame_embeddings(clips)
    assert frame_embeddings.shape == (2, 32, 16)
    torch.testing.assert_close(frame_embeddings.norm(dim=-1), torch.ones(2, 32))
    # different inputs give different embeddings (the tiny model's weights are spread for that)
    tone = (0.5 * np.sin(2 * np.pi * 2000 * np.arange(4 * SR) / SR)).astype(np.float32)
    assert (drcap.embed_audio([tone])[0] @ audio[0]) < 0.99 and (text[0] @ text[1]) < 0.99


def test_captions_are_raw_and_truncated_to_30_tokens(drcap):
    tokens = drcap.tokenize([" ".join(["a dog barks"] * 40), "A Dog"])
    assert tokens["input_ids"].shape == (2, 30)
    assert not torch.equal(drcap.embed_text(["A Dog barks."]), drcap.embed_text(["a dog barks"]))


def test_eval_mode_disables_stochastic_depth(tokenizer):
    model = make_tiny_drcap_model(0, len(tokenizer))
    model.htsat.layers[0].blocks[1].drop_path.rate = 0.9
    wave = torch.from_numpy(noise_clip(1.0, SR))[None]
    with torch.no_grad():
        first, second = model.encode_audio(wave), model.encode_audio(wave)
    assert torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 runs on CUDA only")
def test_fp16_on_cuda_is_close_to_float32(tiny_files, drcap):
    half = DrcapClapBackend.from_checkpoint(tiny_files[0], tokenizer=str(tiny_files[1]), device="cuda", fp16=True)
    assert half.dtype == torch.float16
    clips = [noise_clip(3.0, SR), noise_clip(10.0, SR, seed=1)]
    assert (half.embed_audio(clips) - drcap.embed_audio(clips)).abs().max() < 2e-2
    assert half.fingerprint == drcap.fingerprint


def test_config_dataclass_checks_its_sizes():
    with pytest.raises(ValueError, match="one entry per stage"):
        DrcapClapConfig(depths=(2, 2), num_heads=(1,))
    assert dataclasses.replace(DrcapClapConfig(), embed_dim=8).audio_width == 64
    assert DrcapClapConfig().num_frames == 32 and DrcapClapConfig().target_frames == 1024


def test_text_tower_and_frames_for_prompt_tuning(tmp_path):
    """The DRCap CLAP exposes what prompt tuning needs: its text tower reproduces embed_text; zero-length prompts
    change nothing; frame embeddings are unit-norm, 32 per window."""
    import numpy as np

    from engine.clap import create_clap
    from engine.clap.base import l2_normalize
    from engine.clap.drcap import build_tiny_drcap_clap
    from engine.config import AppConfig
    from engine.prompt_tuning import prompted_class_embeddings, tokenize_classes

    checkpoint, tokenizer = build_tiny_drcap_clap(tmp_path / "m", seed=2)
    config = AppConfig()
    config.clap.backend, config.clap.model, config.clap.tokenizer, config.clap.device = (
        "drcap", str(checkpoint), str(tokenizer), "cpu")
    clap = create_clap(config)
    tower = clap.text_tower()
    texts = ["a dog barks", "rain falls on a tin roof"]
    tokens = tower.tokenize(texts, max_length=30)
    with torch.no_grad():
        hidden = tower.encode(tower.embed_words(tokens.input_ids), tokens.attention_mask)
        path = l2_normalize(tower.project(tower.sentence_features(hidden, tokens.attention_mask)))
        ids = tokenize_classes(tower, ["dog", "rain"], 16)
        empty = prompted_class_embeddings(tower, ids.input_ids, ids.attention_mask, torch.empty(0, tower.hidden_size))
    torch.testing.assert_close(path, clap.embed_text(texts), rtol=0, atol=1e-6)
    torch.testing.assert_close(l2_normalize(empty), clap.embed_text([" dog", " rain"]), rtol=0, atol=1e-6)
    windows, frames = clap.embed_frames(np.random.default_rng(0).standard_normal(32_000 * 12).astype(np.float32))
    assert len(windows) == 2 and [tuple(f.shape) for f in frames] == [(32, 16), (32, 16)]
    torch.testing.assert_close(frames[0].norm(dim=1), torch.ones(32))
