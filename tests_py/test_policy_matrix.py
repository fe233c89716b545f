"""Every policy × {uniform, pyramid, adakv} × {rerotate off, on} inside model.generate, on a
tiny random Llama and on SmolLM2; ratio 0 reproduces DynamicCache everywhere."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from settings import REGISTRY

from conftest import random_ids

POLICIES = [name for name in REGISTRY if name not in ("pyramidkv", "adakv", "cake")]  # budgets are axes here
BUDGETS = {"uniform": {}, "pyramid": {"layer_budget": "pyramid"}, "adakv": {"head_budget": "adakv"}}
# ChunkKV keeps the same chunks in every head: it refuses per-head budgets (test_chunkkv.py).
PAIRS = [(p, b) for p in POLICIES for b in BUDGETS if (p, b) != ("chunkkv", "adakv")]


def make(model, policy, ratio, budget, rerotate, sized_for_tests):
    spec = REGISTRY[policy]
    params = dict(spec.easy) if sized_for_tests else {}
    if policy == "snapkv" and not sized_for_tests:
        params = {"window_size": 16}
    return spec.cache_class(model, compression_ratio=ratio, rerotate=rerotate, **BUDGETS[budget], **params)


def generate(model, ids, cache, n=4):
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("policy,budget", PAIRS)
@pytest.mark.parametrize("rerotate", [False, True])
def test_tiny_llama(tiny_llama, policy, budget, rerotate):
    model = tiny_llama()
    ids = random_ids(1, 48)
    full = DynamicCache(config=model.config)
    expected = generate(model, ids, full)
    assert torch.equal(generate(model, ids, make(model, policy, 0.0, budget, rerotate, True)), expected)
    cache = make(model, policy, 0.5, budget, rerotate, True)
    assert generate(model, ids, cache).shape == expected.shape
    kept = cache.stats()["tokens_kept"]
    assert abs(sum(kept) / len(kept) - (24 + 3)) <= 1  # half the prompt plus 3 fed-back tokens
    # right after the prefill, half of the prompt's bytes are freed (int32 positions aside)
    prefilled, full_prefill = make(model, policy, 0.5, budget, rerotate, True), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=prefilled)
        model(ids, past_key_values=full_prefill)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_prefill.layers)
    assert prefilled.nbytes == pytest.approx(full_bytes / 2 * (1 + 4 / (2 * 16 * 4)), rel=0.05)


@pytest.mark.model
@pytest.mark.parametrize("policy,budget", PAIRS)
@pytest.mark.parametrize("rerotate", [False, True])
def test_smollm2(smollm2_bf16, policy, budget, rerotate):
    model, tokenizer = smollm2_bf16
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    if budget == "uniform" and not rerotate:
        expected = generate(model, ids, DynamicCache(config=model.config))
        assert torch.equal(generate(model, ids, make(model, policy, 0.0, budget, rerotate, False)), expected)
    cache = make(model, policy, 0.5, budget, rerotate, False)
    out = generate(model, ids, cache)
    assert out.shape[1] == ids.shape[1] + 4
    kept = cache.stats()["tokens_kept"]
    assert abs(sum(kept) / len(kept) - (ids.shape[1] // 2 + 3)) <= 1
