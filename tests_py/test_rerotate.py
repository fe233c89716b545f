"""Key re-rotation (``rerotate=True``): kept keys move to compact positions with one delta
rotation each, and generation continues at position n_kept."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress_rs

from conftest import random_ids

ROPE_TYPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [2.0 + 0.1 * i for i in range(8)], "original_max_position_embeddings": 32},
}


def build(rope_scaling, **overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_scaling=rope_scaling, **overrides)
    return LlamaForCausalLM(config).eval()


def pre_rope_keys(model, ids):
    """Keys as k_proj produces them, before RoPE: (batch, kv_heads, T, head_dim) per layer."""
    captured = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config))
    for h in hooks:
        h.remove()
    b, t = ids.shape
    return {i: out.view(b, t, -1, 16).transpose(1, 2) for i, out in captured.items()}


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rerotated_keys_equal_pre_rope_keys_rotated_at_compact_positions(rope_type):
    model = build(ROPE_TYPES[rope_type])
    ids = random_ids(1, 30)
    pre = pre_rope_keys(model, ids)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5, rerotate=True)
    plain = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=plain)
    rope = kvpress_rs.Rope.from_config(model.config)
    for layer in range(2):
        kept = plain.kept_positions(layer)  # original positions of the kept tokens
        # kept_positions stays the original positions; key_positions is where the keys sit now
        assert torch.equal(cache.kept_positions(layer), kept)
        assert torch.equal(cache.key_positions(layer), torch.arange(15).expand(1, 2, 15))
        kept_pre = pre[layer].gather(2, kept[..., None].expand(-1, -1, -1, 16))
        expected = rope.apply(kept_pre, torch.arange(15), seq_len=30)
        # the model rotated its keys with float32 angles; the shift itself is exact
        torch.testing.assert_close(cache.layers[layer].keys, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(cache.layers[layer].values, plain.layers[layer].values)
    assert cache.get_seq_length() == 15 and plain.get_seq_length() == 30


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_continues_at_n_kept(attn):
    model = build(None)
    model.set_attn_implementation(attn)
    ids, nxt = random_ids(1, 30, seed=1), random_ids(1, 1, seed=2)
    cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5, n_sink=2, rerotate=True)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        keys = [cache.layers[i].keys.clone() for i in range(2)]
        values = [cache.layers[i].values.clone() for i in range(2)]
        ours = model(nxt, past_key_values=cache).logits
        ref = DynamicCache(config=model.config)
        for i in range(2):
            ref.update(keys[i], values[i], i)
        theirs = model(nxt, past_key_values=ref, position_ids=torch.tensor([[15]])).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 16


@pytest.mark.parametrize("policy", ["snapkv", "knorm", "streaming_llm"])
@pytest.mark.parametrize("budgets", [{"layer_budget": "pyramid"}, {"head_budget": "adakv"}, {"layer_budget": "cake", "cake_window": 4}])
def test_rerotate_with_layer_and_head_budgets_aligns_every_row(policy, budgets):
    model = build(None)
    params = {"window_size": 4} if policy == "snapkv" else {}
    cache = kvpress_rs.KVCache(model, policy, compression_ratio=0.5, rerotate=True, **budgets, **params)
    ids = random_ids(1, 40, seed=3)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 43)
    longest = max(max(row) for row in cache.stats()["tokens_kept_per_row"])
    # every row ends right before the shared next position, then holds the 2 fed-back tokens
    assert cache.get_seq_length() == longest
    for layer in range(2):
        positions = cache.layers[layer].state.key_positions()  # where the keys sit now
        rows = positions if isinstance(positions, list) else list(positions.reshape(-1, positions.shape[-1]))
        for row in rows:
            assert row[-1].item() == longest - 1 and bool((row[1:] - row[:-1] == 1).all())


def test_rerotate_with_ratio_zero_changes_nothing():
    model = build(None)
    ids = random_ids(1, 20)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(model.generate(ids, past_key_values=kvpress_rs.KnormCache(model, compression_ratio=0.0, rerotate=True), **kw), expected)


def test_rerotate_needs_the_model():
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="pass the model"):
        kvpress_rs.KnormCache(build(None).config, compression_ratio=0.5, rerotate=True)
