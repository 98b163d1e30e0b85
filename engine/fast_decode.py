"""Fast decoding for DRCap captions: a static KV cache and a compiled one-token decode step.

Token-identical to ``llm.generate`` (greedy and beam search, any repetition penalty, left-padded batches): the call
goes through transformers' own ``generate``, which prepares everything exactly as for plain decoding (expanded beams,
attention mask, position ids, logits processors such as the repetition penalty, stopping criteria); only the loop that
follows is ours (``custom_generate``), and it mirrors transformers 5.23's ``_sample`` and ``_beam_search`` step for
step.
What differs:

- the KV cache is a ``StaticCache`` of a fixed, bucketed length (tensors at fixed addresses, shapes that repeat);
- decode steps (one token per row) call ``torch.compile``'d ``model.__call__`` (``get_compiled_call``, transformers'
  own compile cache on the model, so a process compiles once per shape and later calls reuse it); the prefill stays
  eager, as in transformers, because prompt lengths vary;
- beam search reorders the static cache in place, keeping its addresses (transformers' ``reorder_cache`` swaps in new
  tensors, which CUDA graphs cannot replay).

Why not transformers' own path (``cache_implementation="static"`` + ``compile_config``) alone: in 5.23 it compiles
greedy decoding only (``_beam_search`` calls the eager forward; DRCap decodes with 4 beams) and never compiles a
bitsandbytes model (``Bnb4BitHfQuantizer.is_compileable`` is False, see ``_valid_auto_compile_criteria``), which is
what runs on a GPU in production (nf4). Our loop compiles both, fp16 and nf4 alike: 4-bit models take exactly the same
code path as fp16 ones (bitsandbytes 0.50's 4-bit matmul is a registered torch op). Tested here (no GPU): fp32 models,
peft-wrapped or not, eager, dynamo-traced and (in the benchmark) inductor-compiled, and nf4 through bitsandbytes' CPU
kernels with the eager static cache. Compiled nf4 and CUDA graphs run only on a GPU (benchmarks/bench_gpu.py). In half
precision on a GPU, compiled kernels may round differently from eager ones, so a near-tie between two tokens can go
the other way there; fp32 on the CPU gives the same ids in every test and benchmark row.

Per device (:func:`default_plan`):

- CUDA: compile with ``mode="reduce-overhead"`` (CUDA graphs). CUDA graph trees in torch 2.9 only work in the thread
  that imported torch (pytorch/pytorch#123177: other threads fail an assertion; the app decodes in Gradio worker
  threads), and a graph replays only on the tensors it was recorded with. So every fast CUDA decode runs on one
  decode thread per process, which sets up the graph trees' thread state for itself and keeps a small pool of static
  caches that are reused call after call. The thread is also the answer to concurrency: two requests never share a
  static cache because their decodes take turns on that thread (on one GPU their kernels would take turns on the
  device anyway). If compilation fails, the model decodes without compiling from then on (logged once).
- CPU: plain ``generate`` (the measurements that decided it are in the comment above :data:`CPU_DECISION`). Tests
  and the benchmark force the static cache and/or compilation on the CPU with an explicit :class:`FastPlan`; then
  each call gets its own static cache (nothing shared between concurrent calls) and may run in any thread.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

CACHE_BUCKET = 128  # static caches are sized to prompt + new tokens rounded up to this: prompts of other lengths reuse
CACHE_POOL_SIZE = 4  # static caches kept per model on the decode thread (one per shape; the least recent goes)
# ... and at most this many bytes of them besides the one in use: a Vicuna-7B cache for 4 clips x 4 beams x 384 tokens
# is 3.2 GB (0.5 MB per token and row), which must not stay allocated next to a 4-GB nf4 model on a 16-GB GPU.
CACHE_POOL_BYTES = 1 << 30

# The CPU decision, measured with benchmarks/bench_decoding.py (benchmarks/RESULTS.md, "Decoding"; four runs on the
# shared 2-core machine, one torch thread, 48 new tokens, random Llamas of hidden 64 x 2 layers and 512 x 4 layers,
# greedy / beam 4 / beam 4 over 4 left-padded rows), tokens/s against plain generate in the same run:
# - the static cache alone: 0.69-1.43x, below 1 in most rows (each step attends over the whole bucketed cache and
#   beam search copies the whole cache to reorder it);
# - the compiled decode step (inductor): 0.55-3.6x once compiled; for the 512 x 4 model with beam search (the app
#   decodes with 4 beams) 0.88-1.16x; and compiling took 27-89 s (cold cache) on the first call of each new shape
#   family (batch 1 first, once more when beams or batches change), paid by the first users.
# So the CPU decodes with plain generate. The token ids of every variant equalled plain generate's in every row.
CPU_DECISION = ("the CPU decodes with plain generate: the static cache alone is no faster there, and the compiled "
                "decode step, after tens of seconds of compilation per new shape on the first requests, gains little "
                "or nothing with beam search on the larger model")


@dataclass(frozen=True)
class FastPlan:
    """How the fast path decodes. :func:`default_plan` picks one per device; tests and benchmarks may pass their own."""

    compile: bool = True  # torch.compile the one-token decode step; False = the static cache runs eagerly
    backend: str | Callable = "inductor"  # torch.compile backend (tests pass a counting backend)
    mode: str | None = "reduce-overhead"  # CUDA graphs on CUDA; None for backends other than inductor
    decode_thread: bool = False  # run on the process's decode thread with pooled static caches (needed for CUDA graphs)


CUDA_PLAN = FastPlan(compile=True, backend="inductor", mode="reduce-overhead", decode_thread=True)


def default_plan(device: torch.device) -> FastPlan | None:
    """The fast path for ``device``; None = plain ``generate`` (the CPU: :data:`CPU_DECISION`)."""
    return CUDA_PLAN if device.type == "cuda" else None


def cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """Static cache length for a prompt: prompt + new tokens, rounded up to :data:`CACHE_BUCKET`."""
    return CACHE_BUCKET * math.ceil((prompt_length + max_new_tokens) / CACHE_BUCKET)


def fast_generate(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, plan: FastPlan,
                  num_beams: int, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
    """``llm.generate(inputs_embeds=..., attention_mask=..., ...)`` with a static cache (and a compiled decode step).

    inputs_embeds [B, L, H] (left-padded), attention_mask [B, L] -> new token ids [B, T], the same ids ``generate``
    returns for these arguments. ``llm`` may be peft-wrapped. ``generate_kwargs``: repetition_penalty, pad/eos/bos ids.
    """
    state = _state(_base_model(llm))
    length = cache_length(inputs_embeds.shape[1], max_new_tokens)
    rows = inputs_embeds.shape[0] * max(num_beams, 1)
    shape = (rows, length, inputs_embeds.dtype, inputs_embeds.device)

    def run(active: FastPlan) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: the decode thread needs its own (the caches are inference tensors)
            cache = state.pooled_cache(llm, shape) if active.decode_thread else _new_cache(llm, length)
            step = state.compiled_step(llm, active) if active.compile else None
            return llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=cache,
                                custom_generate=_decoding_loop(step), num_beams=num_beams, do_sample=False,
                                max_new_tokens=max_new_tokens, **generate_kwargs)

    def run_with_fallback() -> torch.Tensor:
        active = replace(plan, compile=False) if state.compile_failed else plan
        try:
            return run(active)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure must cost speed, not the caption
            if not active.compile:
                raise
            ids = run(replace(active, compile=False))  # fails too if the compiler was not the cause: then that raises
            state.compile_failed = True
            log.warning("Compiled decoding failed (%s: %s); this model decodes without torch.compile from now on",
                        type(e).__name__, e, exc_info=True)
            return ids

    if plan.decode_thread:
        return _decode_thread().submit(run_with_fallback).result()
    return run_with_fallback()


def compile_failed(llm: nn.Module) -> bool:
    """Whether compiling the decode step failed for this model (it then decodes with the static cache, eagerly)."""
    return _state(_base_model(llm)).compile_failed


# --------------------------------------------------------------------------------------------------------------------
# per-model state: the compiled step (transformers' cache on the model) and the static-cache pool


class _ModelState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.compile_failed = False
        self.caches: collections.OrderedDict[tuple, object] = collections.OrderedDict()  # decode thread only

    def compiled_step(self, llm: nn.Module, plan: FastPlan) -> Callable:
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=None, backend=plan.backend, mode=plan.mode)
        with self.lock:  # get_compiled_call compares and replaces the model's cached compiled call: not thread-safe
            return _base_model(llm).get_compiled_call(config)

    def pooled_cache(self, llm: nn.Module, shape: tuple):
        """A reset static cache for ``shape`` = (rows, length, dtype, device) from the pool: CUDA graphs replay on
        the tensors they were recorded with, so the same shape gets the same tensors call after call."""
        cache = self.caches.pop(shape, None)
        if cache is None:
            cache = _new_cache(llm, shape[1])
        else:
            cache.reset()
        self.caches[shape] = cache  # most recently used last
        while len(self.caches) > 1 and (len(self.caches) > CACHE_POOL_SIZE
                                        or sum(map(cache_bytes, self.caches.values())) - cache_bytes(cache)
                                        > CACHE_POOL_BYTES):
            self.caches.popitem(last=False)
        return cache


_STATE_ATTRIBUTE = "_audioscribe_fast_decode"
_STATE_LOCK = threading.Lock()


def _state(model: nn.Module) -> _ModelState:
    """The model's fast-decoding state, kept on the model itself (it lives and dies with it, like transformers'
    own ``_compiled_call``)."""
    with _STATE_LOCK:
        state = model.__dict__.get(_STATE_ATTRIBUTE)
        if state is None:
            state = _ModelState()
            model.__dict__[_STATE_ATTRIBUTE] = state
        return state


def _base_model(llm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers are inside it), else ``llm``."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


def cache_bytes(cache) -> int:
    """Bytes the static cache's key and value tensors hold (0 for layers not yet allocated: they are lazy)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _new_cache(llm: nn.Module, length: int):
    from transformers import StaticCache

    return StaticCache(config=llm.config.get_text_config(decoder=True), max_cache_len=length)


# --------------------------------------------------------------------------------------------------------------------
# the decode thread (CUDA graphs)

_DECODE_THREADS: dict[int, ThreadPoolExecutor] = {}


def _decode_thread() -> ThreadPoolExecutor:
    """The process's decode thread; keyed by pid, so a forked worker (ZeroGPU) starts its own."""
    with _STATE_LOCK:
        executor = _DECODE_THREADS.get(os.getpid())
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audioscribe-decode",
                                          initializer=_init_cudagraph_thread_state)
            _DECODE_THREADS[os.getpid()] = executor
        return executor


def _init_cudagraph_thread_state() -> None:
    """CUDA graph trees (torch 2.9) keep their managers in thread-local storage that only the importing thread has;
    in any other thread ``torch.compile(mode="reduce-overhead")`` fails ``assert torch._C._is_key_in_tls(...)``
    (pytorch/pytorch#123177, fixed upstream by giving each thread its own, pytorch/pytorch#184357). Do that here."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if not hasattr(local, "tree_manager_containers"):
        local.tree_manager_containers = {}
        local.tree_manager_locks = collections.defaultdict(threading.Lock)


# --------------------------------------------------------------------------------------------------------------------
# the decoding loops: transformers 5.23's _sample and _beam_search, with a compiled decode step


def _decoding_loop(step: Callable | None) -> Callable:
    """A ``custom_generate`` callable: ``generate`` calls it with everything prepared, as it calls ``_sample``."""

    def decode(self, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        forward = step or self.__call__
        if generation_config.num_beams > 1:
            return _beam_search(self, forward, input_ids, logits_processor, stopping_criteria, generation_config,
                                model_kwargs)
        return _greedy(self, forward, input_ids, logits_processor, stopping_criteria, generation_config,
                       model_kwargs)

    return decode


def _prefill(model: nn.Module, input_ids: torch.Tensor, model_kwargs: dict):
    """The whole prompt in one eager forward (its length varies: compiling it would recompile per prompt)."""
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    return model(**inputs, return_dict=True)


def _next_logits(outputs, device: torch.device) -> torch.Tensor:
    """Last position's logits as float32 [N, V], copied: a CUDA graph overwrites its outputs on the next replay."""
    return outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=device)


def _greedy(model, forward, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
    """transformers' ``_sample`` without sampling, streaming or returned dicts: input_ids [B, 0] -> [B, T]."""
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    outputs = _prefill(model, input_ids, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        scores = logits_processor(input_ids, _next_logits(outputs, input_ids.device))
        del outputs
        next_tokens = torch.argmax(scores, dim=-1)
        if has_eos_stopping_criteria:  # finished rows get padding
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            return input_ids
        inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        outputs = forward(**inputs, return_dict=True)


def _reorder_in_place(cache, beam_idx: torch.Tensor) -> None:
    """Beam reordering that keeps the static cache's tensors (and so the addresses CUDA graphs recorded)."""
    for layer in cache.layers:
        if layer.is_initialized:
            index = beam_idx.to(layer.keys.device)
            layer.keys.copy_(layer.keys.index_select(0, index))
            layer.values.copy_(layer.values.index_select(0, index))


def _beam_search(model, forward, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
    """transformers 5.23's ``_beam_search`` (deterministic, no returned dicts): input_ids [B*beams, 0] -> [B, T].

    Same tensors, same helper methods, same order of operations; the decode forward and the in-place cache reorder
    are the only changes (see the module docstring)."""
    pad_token_id = generation_config._pad_token_tensor
    eos_token_id = generation_config._eos_token_tensor
    early_stopping = generation_config.early_stopping
    length_penalty = generation_config.length_penalty
    max_length = generation_config.max_length
    num_beams = generation_config.num_beams
    num_return_sequences = generation_config.num_return_sequences
    flatten, unflatten = model._flatten_beam_dim, model._unflatten_beam_dim
    device = input_ids.device

    batch_size_unflattened, cur_len = input_ids.shape[:2]
    batch_size = batch_size_unflattened // num_beams
    decoder_prompt_len = cur_len

    # K = (EOS tokens + 1) * beams candidates per step, so that `num_beams` unfinished ones always remain
    n_eos_tokens = eos_token_id.shape[0] if eos_token_id is not None else 0
    beams_to_keep = max(2, 1 + n_eos_tokens) * num_beams
    top_num_beam_mask = torch.cat((torch.ones((num_beams), dtype=torch.bool),
                                   torch.zeros((beams_to_keep - num_beams), dtype=torch.bool)), dim=0).to(device)

    # running tensors and static-shaped placeholders, as in transformers
    output_fill_value = pad_token_id or eos_token_id[0] if eos_token_id is not None else -1
    running_sequences = torch.full((batch_size, num_beams, max_length), fill_value=output_fill_value,
                                   dtype=torch.int64, device=device)
    running_sequences[:, :, :cur_len] = unflatten(input_ids, batch_size, num_beams)
    sequences = running_sequences.detach().clone()
    running_beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
    beam_scores = torch.full((batch_size, num_beams), fill_value=-1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    is_early_stop_heuristic_unsatisfied = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    next_token_hits_stopping_criteria = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    running_beam_indices = torch.full((batch_size, num_beams, max_length - cur_len), fill_value=-1,
                                      dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.detach().clone()

    flat_running_sequences = input_ids
    outputs = _prefill(model, input_ids, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        log_probs = nn.functional.log_softmax(_next_logits(outputs, device), dim=-1)
        log_probs = logits_processor(flat_running_sequences, log_probs)
        del outputs
        log_probs = unflatten(log_probs, batch_size, num_beams) + running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (batch_size, -1))  # [B, beams * vocab]

        topk_log_probs, topk_running_sequences, topk_running_beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=running_sequences,
            running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=decoder_prompt_len,
            do_sample=False, beams_to_keep=beams_to_keep, num_beams=num_beams, batch_size=batch_size)
        next_token_hits_stopping_criteria = unflatten(
            stopping_criteria(flatten(topk_running_sequences[:, :, :cur_len + 1]), None), batch_size, beams_to_keep)
        running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs, topk_running_sequences=topk_running_sequences,
            topk_running_beam_indices=topk_running_beam_indices,
            next_token_hits_stopping_criteria=next_token_hits_stopping_criteria, num_beams=num_beams)
        sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
            sequences=sequences, topk_running_sequences=topk_running_sequences, beam_scores=beam_scores,
            topk_log_probs=topk_log_probs, beam_indices=beam_indices,
            topk_running_beam_indices=topk_running_beam_indices,
            is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
            is_sent_finished=is_sent_finished, next_token_hits_stopping_criteria=next_token_hits_stopping_criteria,
            top_num_beam_mask=top_num_beam_mask, num_beams=num_beams, cur_len=cur_len,
            decoder_prompt_len=decoder_prompt_len, length_penalty=length_penalty, early_stopping=early_stopping)

        _reorder_in_place(model_kwargs["past_key_values"],
                          flatten(running_beam_indices[..., cur_len - decoder_prompt_len]))
        cur_len = cur_len + 1
        is_early_stop_heuristic_unsatisfied = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
            running_beam_scores=running_beam_scores, beam_scores=beam_scores, is_sent_finished=is_sent_finished,
            cur_len=cur_len, max_length=max_length, decoder_prompt_len=decoder_prompt_len,
            early_stopping=early_stopping, length_penalty=length_penalty)
        if not model._beam_search_has_unfinished_sequences(is_early_stop_heuristic_unsatisfied, is_sent_finished,
                                                           next_token_hits_stopping_criteria, early_stopping):
            break
        flat_running_sequences = flatten(running_sequences[:, :, :cur_len])
        inputs = model.prepare_inputs_for_generation(flat_running_sequences, next_sequence_length=1, **model_kwargs)
        outputs = forward(**inputs, return_dict=True)

    # the best num_return_sequences per row, cropped to the longest generated length (as transformers does)
    sequences = flatten(sequences[:, :num_return_sequences, :])
    beam_indices = flatten(beam_indices[:, :num_return_sequences, :])
    max_generated_length = ((beam_indices + 1).bool()).sum(dim=1).max()
    return sequences[:, :decoder_prompt_len + max_generated_length]
