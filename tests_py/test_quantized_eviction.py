"""Quantization combined with eviction: every eviction cache takes
``quantization=QuantConfig(...)``; the prefill is compressed first, then the kept tokens are
quantized once (never re-quantized), and later tokens go through the quantized store.

References are written here: the kept tokens come from the same cache without
quantization, and attention over them from a plain ``DynamicCache``."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs._native import QuantizedStore

from conftest import random_ids


@pytest.fixture
def llama(tiny_llama):
    """Tiny Llama models with head_dim 32 (4 query heads, 2 KV heads: GQA)."""

    def make(**kw):
        return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, **kw)

    return make


QCONFIG = kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32)


def prefill(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache).logits


@pytest.mark.parametrize("policy,kw", [("knorm", {}), ("snapkv", dict(window_size=8)), ("streaming_llm", {})])
def test_kept_tokens_are_quantized_once_after_the_compression(llama, policy, kw):
    model = llama()
    ids = random_ids(2, 150, seed=1)
    plain = kvpress_rs.KVCache(model, policy, compression_ratio=0.5, **kw)
    quant = kvpress_rs.KVCache(model, policy, compression_ratio=0.5, quantization=QCONFIG, **kw)
    # The prefill attends in full precision: identical logits.
    torch.testing.assert_close(prefill(model, quant, ids), prefill(model, plain, ids), rtol=0, atol=0)
    for i, (p, q) in enumerate(zip(plain.layers, quant.layers)):
        kept_k, kept_v = p.keys, p.values
        assert q.state.is_quantized  # the float copy is freed
        # Exactly one quantization of the kept tokens.
        once = QuantizedStore(QCONFIG)
        once.append(kept_k, kept_v)
        deq_k, deq_v = q.state.dequantized()
        assert torch.equal(deq_k, once.dequantize()[0]) and torch.equal(deq_v, once.dequantize()[1])
        # ... which stays within 4-bit error of the kept tokens (75 kept: 64 quantized, 11 residual).
        stats = q.state.quantized_stats()
        assert stats["quantized_tokens"] == 64 and stats["residual_tokens"] == 11
        assert (deq_k - kept_k).abs().max() <= (kept_k.amax() - kept_k.amin()) / 15
        assert q.get_seq_length() == 150 and q.get_mask_sizes(1) == (76, 75)
    assert quant.get_seq_length() == 150
    assert quant.stats()["tokens_kept"] == [75] * 3
    assert quant.nbytes < 0.6 * plain.nbytes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_later_forwards_equal_attention_over_the_dequantized_kept_tokens(llama, attn):
    model = llama(attn=attn)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.6, quantization=kvpress_rs.QuantConfig(bits=3, residual_length=32))
    prefill(model, cache, random_ids(2, 130, seed=2))
    seen = 130
    for new in [random_ids(2, 1, seed=3), random_ids(2, 5, seed=4), random_ids(2, 1, seed=5)]:
        ref = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            ref.update(*layer.state.dequantized(), i)
        positions = torch.arange(seen, seen + new.shape[1]).expand(2, -1)
        with torch.no_grad():
            expected = model(new, past_key_values=ref, position_ids=positions).logits
            ours = model(new, past_key_values=cache).logits
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
        seen += new.shape[1]
    assert cache.get_seq_length() == seen


def test_stored_codes_are_never_requantized(llama):
    model = llama()
    cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5, quantization=QCONFIG)
    prefill(model, cache, random_ids(1, 140, seed=6))
    before = cache.layers[1].state.dequantized()[0][:, :, :64].clone()
    with torch.no_grad():
        for step in range(40):
            model(random_ids(1, 1, seed=100 + step), past_key_values=cache)
    layer = cache.layers[1].state
    assert layer.quantized_stats()["quantized_tokens"] == 96  # one more block appended, the first one untouched
    assert torch.equal(layer.dequantized()[0][:, :, :64], before)


@pytest.mark.parametrize("name", ["SnapKVCache", "TOVACache", "PyramidKVCache", "CAKECache", "ExpectedAttentionCache"])
def test_named_caches_take_quantization_and_generate(llama, name):
    model = llama()
    ids = random_ids(2, 120, seed=7)
    cls = getattr(kvpress_rs, name)
    cache = cls(model, compression_ratio=0.5, quantization=QCONFIG)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 126)
    assert cache.get_seq_length() == 125
    assert all(layer.state.is_quantized for layer in cache.layers)


def test_rerotate_then_quantize(llama):
    model = llama()
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5, rerotate=True, quantization=QCONFIG)
    prefill(model, cache, random_ids(1, 100, seed=8))
    # Re-rotation compacted the positions before quantization: 50 seen, 50 stored.
    assert cache.get_seq_length() == 50 and cache.layers[0].get_mask_sizes(1) == (51, 0)


def test_batch_operations_crop_and_reset_act_on_the_quantized_store(llama):
    model = llama()
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG)
    prefill(model, cache, random_ids(2, 100, seed=9))
    before = [layer.state.dequantized() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    for (k, v), layer in zip(before, cache.layers):
        k2, v2 = layer.state.dequantized()
        assert torch.equal(k2, k[[1, 0]]) and torch.equal(v2, v[[1, 0]])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].state.dequantized()[0].shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    k2 = cache.layers[0].state.dequantized()[0]
    assert torch.equal(k2, before[0][0][[1, 0]])
    cache.crop(-5)  # within the residual window
    assert cache.get_seq_length() == 95 and cache.layers[0].state.stored == 45
    assert cache.layers[0].nbytes == cache.layers[0].state.quantized_stats()["nbytes"]
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.layers[0].state.is_quantized
    prefill(model, cache, random_ids(1, 64, seed=10))
    assert cache.get_seq_length() == 64 and cache.layers[0].state.stored == 32


def test_a_cache_built_from_a_config_quantizes_at_the_next_update(llama):
    model = llama()
    cache = kvpress_rs.KnormCache(model.config, compression_ratio=0.5, quantization=QCONFIG)
    prefill(model, cache, random_ids(1, 80, seed=11))
    assert not cache.layers[0].state.is_quantized  # no hooks: nothing ran after the forward
    with torch.no_grad():
        model(random_ids(1, 1, seed=12), past_key_values=cache)
    assert cache.layers[0].state.stored == 41 and cache.get_seq_length() == 81


def test_bad_quantization_arguments(llama):
    model = llama()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="quantization"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=dict(bits=4))
    with pytest.raises(kvpress_rs.UnsupportedError, match="adakv"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, head_budget="adakv", quantization=QCONFIG)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="group_size"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=kvpress_rs.QuantConfig(group_size=64))
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG)
    prefill(model, cache, random_ids(1, 100, seed=13))
    with pytest.raises(kvpress_rs.CacheStateError, match="quantized"):
        cache.kept_positions(0)


# ----------------------------------------------------------------------------------------
# Mixed precision (MiKV): evicted tokens kept at low_bits instead of dropped.


def reference_attention(query, keys, values, scaling):
    """Plain softmax attention (no mask: every key precedes the single query), GQA by
    repeating KV heads; (batch, q_len, q_heads, dim)."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(rep, dim=1)
    v = values.float().repeat_interleave(rep, dim=1)
    p = torch.softmax(query.float() @ k.transpose(-1, -2) * scaling, dim=-1)
    return (p @ v).transpose(1, 2)


def test_attention_over_two_stores_is_one_softmax_over_their_union():
    torch.manual_seed(0)
    high = QuantizedStore(kvpress_rs.QuantConfig(bits=4, residual_length=32))
    low = QuantizedStore(kvpress_rs.QuantConfig(bits=2, residual_length=0))
    high.append(torch.randn(2, 2, 70, 64), torch.randn(2, 2, 70, 64))
    low.append(torch.randn(2, 2, 45, 64), torch.randn(2, 2, 45, 64))
    query = torch.randn(2, 4, 1, 64)
    (hk, hv), (lk, lv) = high.dequantize(), low.dequantize()
    expected = reference_attention(query, torch.cat([lk, hk], 2), torch.cat([lv, hv], 2), 0.125)
    torch.testing.assert_close(high.attend_union([low], query, None, 0.125), expected, rtol=0, atol=2e-5)
    with kvpress_rs.ops.cpu_kernels(False):
        torch.testing.assert_close(high.attend_union([low], query, None, 0.125), expected, rtol=0, atol=2e-5)
    # Several queries: causal among the recent store's last tokens, the past store all visible.
    q3 = torch.randn(2, 4, 3, 64)
    out = high.attend_union([low], q3, None, 0.125)
    for i in range(3):
        keys = torch.cat([lk, hk[:, :, : 70 - 2 + i]], 2)
        vals = torch.cat([lv, hv[:, :, : 70 - 2 + i]], 2)
        torch.testing.assert_close(out[:, i : i + 1], reference_attention(q3[:, :, i : i + 1], keys, vals, 0.125), rtol=0, atol=2e-5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="past"):
        high.attend_union([high], query, None, 0.125)


def test_low_bits_keeps_the_evicted_tokens_at_low_precision(llama):
    model = llama()
    ids = random_ids(2, 150, seed=20)
    plain = kvpress_rs.KVCache(model, "knorm", compression_ratio=0.5)
    full = DynamicCache(config=model.config)
    prefill(model, plain, ids)
    prefill(model, full, ids)
    mixed = kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG, low_bits=2)
    prefill(model, mixed, ids)
    for i, layer in enumerate(mixed.layers):
        stats = layer.state.quantized_stats()
        assert layer.state.stored == 150 and stats["low_bits_tokens"] == 75 and stats["low_bits"] == 2
        # Exactly the kept tokens at 4 bits and the evicted ones at 2 bits, each quantized once.
        kept_pos = plain.kept_positions(i)
        evicted = torch.ones(2, 2, 150, dtype=torch.bool).scatter(2, kept_pos, False)
        k_all, v_all = full.layers[i].keys, full.layers[i].values
        ev_k = k_all[evicted].view(2, 2, 75, 32)
        ev_v = v_all[evicted].view(2, 2, 75, 32)
        once = QuantizedStore(mixed.low_quantization)
        once.append(ev_k, ev_v)
        low_k, low_v = (t[:, :, :75] for t in layer.state.dequantized())  # the low-precision ones first
        assert torch.equal(low_k, once.dequantize()[0])
        assert torch.equal(low_v, once.dequantize()[1])
        assert layer.get_mask_sizes(1) == (151, 0)
    assert mixed.get_seq_length() == 150 and mixed.stats()["tokens_kept"] == [150] * 3
    # Memory: the cache that drops them plus the low-precision stores, which are smaller than
    # the same tokens at 4 bits.
    only_kept = kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG)
    prefill(model, only_kept, ids)
    assert mixed.nbytes == only_kept.nbytes + sum(layer.state.quantized_stats()["low_bits_nbytes"] for layer in mixed.layers)
    at_4_bits = QuantizedStore(kvpress_rs.QuantConfig(bits=4, residual_length=0))
    at_4_bits.append(ev_k, ev_v)
    assert mixed.layers[-1].state.quantized_stats()["low_bits_nbytes"] < at_4_bits.nbytes
    # A decode step attends over both precisions with one softmax: equal to a DynamicCache
    # holding every dequantized token.
    ref = DynamicCache(config=model.config)
    for i, layer in enumerate(mixed.layers):
        ref.update(*layer.state.dequantized(), i)
    new = random_ids(2, 1, seed=21)
    with torch.no_grad():
        ours = model(new, past_key_values=mixed).logits
        expected = model(new, past_key_values=ref, position_ids=torch.full((2, 1), 150)).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # and is closer to the full cache than dropping them.
    with torch.no_grad():
        exact = model(new, past_key_values=full).logits
        dropped = model(new, past_key_values=only_kept).logits
    assert (ours - exact).abs().mean() < (dropped - exact).abs().mean()


def test_low_bits_generate_batch_ops_and_errors(llama):
    model = llama()
    cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.6, window_size=8, quantization=QCONFIG, low_bits=2)
    ids = random_ids(2, 120, seed=22)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, num_beams=2)
    assert out.shape == (2, 125)
    cache = kvpress_rs.CAKECache(model, compression_ratio=0.5, quantization=QCONFIG, low_bits=3)
    prefill(model, cache, random_ids(1, 100, seed=23))
    assert all(layer.state.quantized_stats()["low_bits_tokens"] and layer.state.stored == 100 for layer in cache.layers)
    cache.reset()
    assert cache.layers[0].state.quantized_stats() is None
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="low_bits"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, low_bits=2)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="bits"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG, low_bits=5)
    with pytest.raises(kvpress_rs.UnsupportedError, match="rerotate"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, quantization=QCONFIG, low_bits=2, rerotate=True)
