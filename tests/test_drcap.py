"""DRCap: prompt layouts token for token, projection decoding, training retrieval, checkpoints, generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.captioner import Captioner, Support, build_model
from engine.config import AppConfig, LLMConfig
from engine.datastore import CaptionDatastore, band_neighbours
from engine.drcap import (
    IGNORE_INDEX,
    DrcapModel,
    PromptLayout,
    collate,
    encode_prompt,
    project_onto_support,
    read_checkpoint,
    write_checkpoint,
)
from engine.errors import ModelLoadError
from engine.llm import _plan, attach_lora, load_llm
from tests.helpers import noise_clip, small_caption_set

SIMILAR = ["A dog barks", "Rain falls on a roof"]
ANSWER = "A dog barks while rain falls"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return load_llm(LLMConfig(model=str(tiny_llama_dir), dtype="fp32"))


def app_config(tiny_clap_dir, tiny_llama_dir, **caption) -> AppConfig:
    config = AppConfig()
    config.clap.model, config.clap.device = str(tiny_clap_dir), "cpu"
    config.llm.model, config.llm.dtype = str(tiny_llama_dir), "fp32"
    config.caption.mapping_hidden = 64
    for key, value in caption.items():
        setattr(config.caption, key, value)
    return config


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- the three prompt layouts, token for token -----------------------------------------------------------------------


def test_rag_first_layout(llm):
    tok = llm.tokenizer
    p = encode_prompt(tok, PromptLayout(rag_first=True), SIMILAR, ANSWER)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # [BOS] "A dog barks. Rain falls on a roof. " [EOS] <soft> [BOS] "USER: ... ASSISTANT:" + answer [EOS]
    assert p.before[0] == bos and p.before[-1] == eos
    assert decode(tok, p.before[1:-1]).strip() == "A dog barks. Rain falls on a roof."
    assert p.after[0] == bos and p.after[-1] == eos
    assert decode(tok, p.after[1:p.prompt_after]).strip() == "USER: Describe the audio you hear. \n ASSISTANT:"
    assert decode(tok, p.after[p.prompt_after:-1]) == "A dog barks while rain falls"
    assert p.after == [bos] + tok("USER: Describe the audio you hear. \n ASSISTANT:" + ANSWER,
                                  add_special_tokens=False)["input_ids"] + [eos]
    # No retrieved captions: the segment is just [BOS][EOS], as DRCap's tok("") = [BOS].
    assert encode_prompt(tok, PromptLayout(rag_first=True), [], ANSWER).before == [bos, eos]


def test_rag_sentence_and_no_rag_layouts(llm):
    tok = llm.tokenizer
    sentence = encode_prompt(tok, PromptLayout(use_rag=True, rag_first=False), SIMILAR, ANSWER)
    assert sentence.before == []
    assert decode(tok, sentence.after[1:sentence.prompt_after]).strip() == (
        "USER: Similar audios sound like: A dog barks. Rain falls on a roof. This audio sounds like \n ASSISTANT:")
    plain = encode_prompt(tok, PromptLayout(use_rag=False, rag_first=False), SIMILAR, ANSWER)
    assert plain.before == []
    assert decode(tok, plain.after[1:plain.prompt_after]).strip() == "USER: Describe the audio you hear. \n ASSISTANT:"
    # The instruction is configurable; the RAG sentence replaces it.
    custom = encode_prompt(tok, PromptLayout(use_rag=False, rag_first=False, instruction="Caption this."), [], None)
    assert decode(tok, custom.after[1:]).strip() == "USER: Caption this. \n ASSISTANT:"


def test_collate_masks_everything_but_the_answer(llm):
    tok = llm.tokenizer
    prompts = [encode_prompt(tok, PromptLayout(), SIMILAR, ANSWER), encode_prompt(tok, PromptLayout(), [], "Wind")]
    batch = collate(prompts, tok.pad_token_id, left_pad=False, with_labels=True)
    for row, p in enumerate(prompts):
        ids = p.before + [tok.pad_token_id] + p.after
        assert batch.input_ids[row, :len(ids)].tolist() == ids
        assert batch.attention_mask[row].sum() == len(ids)
        assert batch.soft_position[row] == len(p.before)
        answer = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert answer == p.after[p.prompt_after:]  # answer tokens + EOS
        assert answer[-1] == tok.eos_token_id
    left = collate(prompts, tok.pad_token_id, left_pad=True, with_labels=False)
    shorter = prompts[1]
    assert left.attention_mask[1, :left.input_ids.shape[1] - shorter.length].sum() == 0  # padding on the left
    assert left.soft_position[1] == left.input_ids.shape[1] - shorter.length + len(shorter.before)


# --- projection decoding and training retrieval ---------------------------------------------------------------------


def test_projection_decoding_matches_numpy():
    rng = np.random.default_rng(0)
    support = rng.standard_normal((50, 8))
    support /= np.linalg.norm(support, axis=1, keepdims=True)
    audio = rng.standard_normal((3, 8))
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    tau = 0.07
    logits = audio @ support.T / tau
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    expected = weights @ support
    projected, got_weights = project_onto_support(torch.tensor(audio), torch.tensor(support), tau)
    np.testing.assert_allclose(projected.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(got_weights.numpy(), weights, atol=1e-6)
    assert (np.linalg.norm(expected, axis=1) < 1).all()  # not renormalised, as in DRCap
    renormalised, _ = project_onto_support(torch.tensor(audio), torch.tensor(support), tau, renormalize=True)
    np.testing.assert_allclose(np.linalg.norm(renormalised.numpy(), axis=1), 1.0, atol=1e-5)


def test_band_retrieval_edge_cases():
    keys = np.eye(4, dtype=np.float32)  # four orthogonal captions
    queries = np.array([
        [1, 0, 0, 0],  # cos 1 with key 0 (itself: excluded by the upper bound), 0 with the rest -> none
        [0.8, 0.6, 0, 0],  # cos 0.8 with key 0 only -> exactly one candidate, kept
        [0.5, 0.5, 0.5, 0.5],  # cos 0.5 with all -> in a band (0.4, 0.6): all four, k=3 of them
    ], dtype=np.float32)
    assert band_neighbours(queries[:2], keys, 0.75, 0.85, k=3) == [[], [0]]
    many = band_neighbours(queries[2:], keys, 0.4, 0.6, k=3, seed=1)[0]
    assert len(many) == 3 and len(set(many)) == 3
    assert band_neighbours(queries[2:], keys, 0.4, 0.6, k=3, seed=1) == [many]  # seeded
    # Chunking (4 queries at a time over 15) gives the same answers as one pass.
    chunked = band_neighbours(np.repeat(queries, 5, axis=0), keys, 0.7, 0.9, k=2, seed=3, chunk_size=4)
    assert chunked == [[]] * 5 + [[0]] * 5 + [[]] * 5


# --- checkpoints -----------------------------------------------------------------------------------------------------


def randomize_adapters(model: DrcapModel, seed: int) -> None:
    """LoRA B starts at zero; give every adapter weight random values so a load is visible in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in model.adapter_names():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_drcap_released_model_pt_layout_loads(tmp_path, tiny_clap, tiny_clap_dir, tiny_llama_dir, llm):
    config = app_config(tiny_clap_dir, tiny_llama_dir)
    reference = build_model(load_llm(config.llm), tiny_clap, config, checkpoint=None, trainable=True)
    randomize_adapters(reference, seed=1)
    state = {k: v.clone() for k, v in reference.named_parameters() if k in reference.adapter_names()}
    # The names DRCap's model.pt uses.
    assert "encoder_projector.linear1.weight" in state and "encoder_projector.linear2.bias" in state
    assert "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
    assert "llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in state
    torch.save(state, tmp_path / "model.pt")
    loaded = build_model(load_llm(config.llm), tiny_clap, config, read_checkpoint(tmp_path / "model.pt"),
                         trainable=False)
    embeddings = tiny_clap.embed_text(["a dog barks", "rain"])
    reference.eval()
    with torch.no_grad():
        expected = reference.loss(embeddings, [SIMILAR, []], ["a dog", "rain"])
        got = loaded.loss(embeddings, [SIMILAR, []], ["a dog", "rain"])
    assert torch.equal(expected, got)
    assert reference.generate(embeddings, [SIMILAR, []], num_beams=1, max_new_tokens=8) == \
        loaded.generate(embeddings, [SIMILAR, []], num_beams=1, max_new_tokens=8)


def test_own_checkpoint_round_trip_and_refusals(tmp_path, tiny_clap, other_clap, tiny_clap_dir, tiny_llama_dir):
    config = app_config(tiny_clap_dir, tiny_llama_dir)
    model = build_model(load_llm(config.llm), tiny_clap, config, checkpoint=None, trainable=True)
    randomize_adapters(model, seed=2)
    meta = {"clap": {"name": tiny_clap.name, "fingerprint": tiny_clap.fingerprint, "embedding_dim": 32},
            "layout": {"use_rag": False, "rag_first": False, "instruction": "Say it."}}
    write_checkpoint(tmp_path / "ckpt", model, meta)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["drcap_config.json", "model.safetensors"]
    info = read_checkpoint(tmp_path / "ckpt")
    reloaded = build_model(load_llm(config.llm), tiny_clap, config, info, trainable=False)
    assert reloaded.layout == PromptLayout(use_rag=False, rag_first=False, instruction="Say it.")
    for name in model.adapter_names():
        assert torch.equal(dict(model.named_parameters())[name], dict(reloaded.named_parameters())[name])
    with pytest.raises(ModelLoadError, match="trained on embeddings of CLAP .* is another model"):
        build_model(load_llm(config.llm), other_clap, config, info, trainable=False)
    broken = dict(info.weights)
    del broken["encoder_projector.linear2.bias"]
    broken["encoder_projector.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match="1 missing: encoder_projector.linear2.bias.*1 unexpected"):
        model.load_adapters(broken, "broken")
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save({"encoder_projector.linear1.weight": torch.zeros(64, 16), "encoder_projector.linear1.bias":
                torch.zeros(64), "encoder_projector.linear2.weight": torch.zeros(64, 64),
                "encoder_projector.linear2.bias": torch.zeros(64)}, tmp_path / "wrong_dim.pt")
    with pytest.raises(ModelLoadError, match="maps 16-d CLAP embeddings but .* gives 32-d"):
        build_model(load_llm(config.llm), tiny_clap, config, read_checkpoint(tmp_path / "wrong_dim.pt"),
                    trainable=False)


class Payload:
    """A stand-in for an arbitrary pickled object (module level, so pickle can save it)."""


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"encoder_projector.linear1.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="never unpickles arbitrary objects"):
        read_checkpoint(tmp_path / "evil.pt")


# --- the captioner on audio ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(tiny_clap, tiny_clap_dir, tiny_llama_dir) -> Captioner:
    store = CaptionDatastore.build(small_caption_set(300), tiny_clap, show_progress=False)
    config = app_config(tiny_clap_dir, tiny_llama_dir, num_beams=1, max_new_tokens=6, batch_size=3)
    return Captioner.from_config(config, tiny_clap, store)


def test_caption_long_audio_per_window_and_whole_clip(captioner, tiny_clap):
    from engine.audio import Audio
    audio = Audio(noise_clip(25.0), 48_000, 48_000, 1, "<array>")
    result = captioner.caption(audio)
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]
    assert len(result.per_window) == 3 and isinstance(result.clip.caption, str)
    assert set(result.timings_ms) == {"clap", "retrieval", "projection", "generation"}
    embedded = tiny_clap.embed_windows([audio])[0]
    found = captioner.datastore.search(embedded.pooled[None], 3)
    assert [c for c, _ in result.clip.retrieved] == found.captions[0]  # top-3, most similar first
    weights = [w for _, w in result.clip.support_top]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
    _, all_weights = project_onto_support(embedded.pooled[None], captioner.support.embeddings, captioner.temperature)
    assert weights[0] == pytest.approx(float(all_weights.max()), rel=1e-5)
    # A clip of one window gets no per-window captions (the clip caption is that window's).
    short = captioner.caption(Audio(noise_clip(4.0), 48_000, 48_000, 1, "<array>"))
    assert short.per_window == [] and len(short.windows) == 1


def test_long_audio_captions_at_most_max_window_captions_segments(captioner, tiny_clap):
    from engine.audio import Audio
    from engine.clap.base import pool_windows

    audio = Audio(noise_clip(45.0), 48_000, 48_000, 1, "<array>")  # windows 0-10, 10-20, 20-30, 30-40, 35-45
    embedded = tiny_clap.embed_windows([audio])[0]
    assert len(embedded.windows) == 5
    limit = captioner.config.max_window_captions
    captioner.config.max_window_captions = 2
    try:
        result = captioner.caption(audio)
    finally:
        captioner.config.max_window_captions = limit
    assert [(w.start_s, w.end_s) for w in result.windows] == [(0.0, 30.0), (30.0, 45.0)]  # windows 0-2 and 3-4
    assert len(result.per_window) == 2
    merged = pool_windows(embedded.embeddings[3:5])
    assert result.per_window[1].caption == captioner.caption_embeddings(merged[None])[0].caption


def test_a_domain_and_settings_apply_to_one_request_only(captioner, tiny_clap):
    from dataclasses import replace

    from engine.audio import Audio
    from engine.captioner import Domain

    domain_captions = ["A violin plays a slow melody", "A cello hums", "Piano chords ring out", "A harp is plucked"]
    domain = Domain("strings", CaptionDatastore.build(domain_captions, tiny_clap, show_progress=False))
    audio = Audio(noise_clip(4.0), 48_000, 48_000, 1, "<array>")
    shared = captioner.caption(audio)
    adapted = captioner.caption(audio, domain=domain, settings=replace(captioner.config, max_new_tokens=2))
    assert {c for c, _ in adapted.clip.retrieved} <= set(domain_captions)
    assert {c for c, _ in adapted.clip.support_top} <= set(domain_captions)
    assert not {c for c, _ in shared.clip.support_top} & set(domain_captions)
    assert len(captioner.llm.tokenizer(adapted.clip.caption, add_special_tokens=False)["input_ids"]) <= 2
    assert captioner.caption(audio).clip.caption == shared.clip.caption  # nothing shared was changed
    assert captioner.support.source == "datastore" and captioner.config.max_new_tokens == 6


def test_batched_generation_equals_one_by_one(captioner, tiny_clap):
    embeddings = tiny_clap.embed_text(["a dog barks", "rain on a tin roof and distant thunder", "a bell"])
    together = [r.caption for r in captioner.caption_embeddings(embeddings)]
    alone = [captioner.caption_embeddings(embeddings[i:i + 1])[0].caption for i in range(3)]
    assert together == alone


def test_support_from_a_drcap_tensor_file(tmp_path, tiny_clap):
    from engine.captioner import load_support
    matrix = torch.randn(20, 32)
    torch.save(matrix, tmp_path / "support.pt")
    support = load_support(str(tmp_path / "support.pt"), None, tiny_clap)
    assert support.captions is None and support.embeddings.shape == (20, 32)
    torch.testing.assert_close(support.embeddings.norm(dim=1), torch.ones(20))
    torch.save(torch.randn(20, 16), tmp_path / "wrong.pt")
    with pytest.raises(Exception, match=r"must be an \[N, 32\] tensor"):
        load_support(str(tmp_path / "wrong.pt"), None, tiny_clap)


def test_nf4_path_runs_on_cpu(tiny_llama_dir, tiny_clap):
    loaded = load_llm(LLMConfig(model=str(tiny_llama_dir), quantization="nf4", dtype="fp32"))
    assert loaded.quantization == "nf4"
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = DrcapModel(attach_lora(loaded.model, LLMConfig()), loaded.tokenizer, 32, 64, PromptLayout())
    embeddings = tiny_clap.embed_text(["a dog barks"])
    loss = model.loss(embeddings, [SIMILAR], ["A dog"])
    loss.backward()  # QLoRA: gradients reach the adapters through the 4-bit base
    assert torch.isfinite(loss)
    lora_grads = [p.grad for n, p in model.named_parameters() if ".lora_A." in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert model.encoder_projector.linear1.weight.grad is not None
    texts = model.generate(embeddings, [SIMILAR], num_beams=2, max_new_tokens=5)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_auto_quantization_falls_back_on_cpu_and_says_so(tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto means nf4 here")
    loaded = load_llm(LLMConfig(model=str(tiny_llama_dir)))
    assert loaded.quantization == "none" and loaded.dtype == torch.float32
    assert loaded.notice == ""  # a small model is fast on the CPU: no warning
    _, dtype, notice = _plan(LLMConfig(), torch.device("cpu"), params=7_000_000_000)
    assert dtype == torch.bfloat16 and notice.startswith("No CUDA device") and "GB of RAM" in notice
    with pytest.raises(ModelLoadError, match="int8 needs a CUDA device"):
        load_llm(LLMConfig(model=str(tiny_llama_dir), quantization="int8"))


def test_captioner_with_drcaps_own_clap(tmp_path, tiny_llama_dir):
    """The whole captioner on a DRCap-layout CLAP checkpoint (32 kHz HTSAT + RoBERTa), loaded through the registry."""
    from engine.audio import Audio
    from engine.clap import create_clap
    from engine.clap.drcap import build_tiny_drcap_clap

    checkpoint, tokenizer = build_tiny_drcap_clap(tmp_path / "drcap-clap", seed=0)
    config = AppConfig(cache_dir=str(tmp_path / "cache"))
    config.clap.backend, config.clap.model, config.clap.tokenizer = "drcap", str(checkpoint), str(tokenizer)
    config.clap.device = "cpu"
    config.llm.model, config.llm.dtype = str(tiny_llama_dir), "fp32"
    config.caption.num_beams, config.caption.max_new_tokens, config.caption.mapping_hidden = 1, 5, 64
    clap = create_clap(config)
    assert clap.sample_rate == 32_000
    store = CaptionDatastore.build(small_caption_set(200), clap, show_progress=False)
    captioner = Captioner.from_config(config, clap, store)
    assert captioner.temperature == pytest.approx(float(clap.model.temp))  # PD's τ is the checkpoint's temp
    audio = Audio(noise_clip(12.0, 32_000), 32_000, 32_000, 1, "<array>")
    result = captioner.caption(audio)
    assert len(result.windows) == 2 and len(result.per_window) == 2 and len(result.clip.retrieved) == 3
    pooled = clap.embed_audio([audio])
    _, weights = project_onto_support(pooled, store.support, float(clap.model.temp))
    assert result.clip.support_top[0][1] == pytest.approx(float(weights.max()), rel=1e-5)


def test_drcap_release_folder_with_a_peft_adapter(tmp_path, tiny_clap, tiny_clap_dir, tiny_llama_dir):
    """DRCap's release folder: model.pt with the mapping network, and the LoRA as a peft adapter folder."""
    config = app_config(tiny_clap_dir, tiny_llama_dir)
    config.llm.lora_r = 4  # the adapter's own rank must win over the config's
    reference_config = app_config(tiny_clap_dir, tiny_llama_dir)
    reference_config.llm.lora_r, reference_config.llm.lora_alpha = 4, 16
    reference = build_model(load_llm(reference_config.llm), tiny_clap, reference_config, None, trainable=True)
    randomize_adapters(reference, seed=5)
    release = tmp_path / "release"
    reference.llm.save_pretrained(release)  # peft: adapter_config.json + adapter_model.safetensors
    torch.save({k: v for k, v in reference.named_parameters() if k.startswith("encoder_projector.")},
               release / "model.pt")
    info = read_checkpoint(release)
    assert info.meta["lora"]["lora_r"] == 4 and info.meta["lora"]["lora_alpha"] == 16
    config.llm.lora_r, config.llm.lora_alpha = 8, 32
    loaded = build_model(load_llm(config.llm), tiny_clap, config, info, trainable=False)
    embeddings = tiny_clap.embed_text(["a dog barks"])
    reference.eval()
    with torch.no_grad():
        assert torch.equal(reference.loss(embeddings, [SIMILAR], ["a dog"]), loaded.loss(embeddings, [SIMILAR],
                                                                                          ["a dog"]))
    (release / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match="holds no DRCap mapping network"):
        read_checkpoint(release)


def test_release_folder_model_pt_lora_wins_over_the_adapter(tmp_path, tiny_clap, tiny_clap_dir, tiny_llama_dir):
    """DRCap's loader applies the peft adapter, then model.pt (strict=False) on top: where both hold a LoRA tensor,
    model.pt's value is the one used; LoRA keys only in the adapter still load."""
    config = app_config(tiny_clap_dir, tiny_llama_dir)
    adapter_model = build_model(load_llm(config.llm), tiny_clap, config, None, trainable=True)
    randomize_adapters(adapter_model, seed=5)
    release = tmp_path / "release"
    adapter_model.llm.save_pretrained(release)
    adapter_values = {k: v.detach().clone() for k, v in adapter_model.named_parameters()
                      if k in adapter_model.adapter_names()}
    shared = "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    adapter_only = "llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    model_pt = {k: v for k, v in adapter_values.items() if k.startswith("encoder_projector.")}
    model_pt[shared] = adapter_values[shared] + 1.0  # model.pt's LoRA value differs from the adapter's
    torch.save(model_pt, release / "model.pt")

    info = read_checkpoint(release)
    loaded = dict(build_model(load_llm(config.llm), tiny_clap, config, info, trainable=False).named_parameters())
    assert torch.equal(loaded[shared], model_pt[shared])  # model.pt wins
    assert not torch.equal(loaded[shared], adapter_values[shared])
    assert torch.equal(loaded[adapter_only], adapter_values[adapter_only])  # adapter-only keys still load
    for name in model_pt:
        assert torch.equal(loaded[name], model_pt[name]), name
