"""A cache works the same whatever entry point runs the model — generate, the causal LM, or
its decoder alone (how kvpress's pipeline prefills a context) — and several threads may run
one model at once, each with its own cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs

from conftest import random_ids
from settings import REGISTRY


def greedy(model, ids, cache, n=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


def kept(cache) -> list:
    out = []
    for i in range(len(cache.layers)):
        positions = cache.kept_positions(i)
        out.append([p.tolist() if isinstance(p, torch.Tensor) else [q.tolist() for q in p] for p in positions]
                   if isinstance(positions, list) else positions.tolist())
    return out


@pytest.mark.parametrize("policy", list(REGISTRY))
@pytest.mark.parametrize("entry", ["model.model", "get_decoder()"])
def test_a_prefill_through_the_decoder_alone_equals_the_causal_lm_prefill(tiny_llama, policy, entry):
    model = tiny_llama()
    spec = REGISTRY[policy]
    context, question = random_ids(1, 48, seed=1), random_ids(1, 6, seed=2)
    full = torch.cat([context, question], dim=1)
    decoder = model.model if entry == "model.model" else model.get_decoder()
    through_lm = spec.cache_class(model, compression_ratio=0.5, **spec.easy)
    alone = spec.cache_class(model, compression_ratio=0.5, **spec.easy)
    with torch.no_grad():
        model(context, past_key_values=through_lm)
        decoder(input_ids=context, past_key_values=alone)
    assert kept(alone) == kept(through_lm)
    assert torch.equal(greedy(model, full, alone), greedy(model, full, through_lm))
    assert kept(alone) == kept(through_lm)


def test_a_cache_built_from_the_decoder_serves_the_causal_lm(tiny_llama):
    model = tiny_llama()
    ids = random_ids(1, 40)
    from_decoder = kvpress_rs.SnapKVCache(model.model, compression_ratio=0.5, window_size=8)
    from_model = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=8)
    assert torch.equal(greedy(model, ids, from_decoder), greedy(model, ids, from_model))
    assert kept(from_decoder) == kept(from_model)


def test_four_threads_share_one_model(tiny_llama):
    """Four threads × ten generations (SnapKV, ExpectedAttention, a quantized cache and a
    DynamicCache) on one model: each output equals the same generation run alone."""
    model = tiny_llama(hidden_size=128)  # head_dim 32: quantization groups of 32 channels fit
    makers = [
        lambda: kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=8),
        lambda: kvpress_rs.ExpectedAttentionCache(model, compression_ratio=0.5),
        lambda: kvpress_rs.QuantizedKVCache(model, bits=4, group_size=32, residual_length=32),
        lambda: DynamicCache(config=model.config),
    ]
    prompts = [random_ids(1, 40 + 3 * i, seed=10 + i) for i in range(10)]
    alone = {(t, i): greedy(model, p, make()) for t, make in enumerate(makers) for i, p in enumerate(prompts)}

    def work(t: int) -> dict:
        return {(t, i): greedy(model, p, makers[t]()) for i, p in enumerate(prompts)}

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = {}
        for part in pool.map(work, range(4)):
            results.update(part)
    differ = [key for key in alone if not torch.equal(results[key], alone[key])]
    assert not differ, f"(thread, generation) pairs that differ from the run alone: {differ}"
