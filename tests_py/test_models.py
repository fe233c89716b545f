"""Query access is model-agnostic: Llama, Mistral, Qwen2, Qwen3 (q_norm/k_norm), Phi-3 (fused
qkv) and Gemma 3 (sliding-window layers left to the model, global layers compressed), on
tiny random configs. The queries the caches score with equal queries recomputed from each
layer's input the way kvpress does (projection, q_norm, RoPE)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvpress_rs
from kvpress_rs import ops

from conftest import random_ids

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    ),
}


def build(name, attn="sdpa"):
    config_class, model_class, extra = MODELS[name]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **extra)).eval()
    model.set_attn_implementation(attn)
    return model


def recomputed_queries(model, ids):
    """Post-RoPE queries of every layer, recomputed from the layer input (kvpress's recipe)."""
    inputs, queries = {}, {}
    layers = model.model.layers
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, (kw.get("hidden_states", a[0] if a else None), kw)),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hidden, kw = inputs[i]
        b, t, _ = hidden.shape
        d = attn.head_dim
        if hasattr(attn, "qkv_proj"):
            q = attn.qkv_proj(hidden)[..., : model.config.num_attention_heads * d]
        else:
            q = attn.q_proj(hidden)
        q = q.view(b, t, -1, d)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = kw["position_embeddings"]
        if q.shape[-1] != cos.shape[-1]:  # partial rotary
            rot = cos.shape[-1]
            q_rot, _ = apply_rotary_pos_emb(q[..., :rot], q[..., :rot], cos, sin)
            q = torch.cat([q_rot, q[..., rot:]], dim=-1)
        else:
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        queries[i] = q
    return queries


def full_layers(model):
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


@pytest.mark.parametrize("name", list(MODELS))
def test_snapkv_scores_with_the_models_own_queries(name):
    model = build(name)
    ids = random_ids(1, 40)
    queries = recomputed_queries(model, ids)
    full = DynamicCache(config=model.config)
    cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=8)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    for i in full_layers(model):
        k, v = full.layers[i].keys, full.layers[i].values
        expected = ops.kept_indices("snapkv", k, v, queries[i], compression_ratio=0.5, window_size=8)
        assert torch.equal(cache.kept_positions(i), expected), (name, i)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ratio_zero_reproduces_dynamic_cache_and_compression_generates(name, attn):
    model = build(name, attn)
    ids = random_ids(1, 30)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(model.generate(ids, past_key_values=kvpress_rs.SnapKVCache(model, compression_ratio=0.0, window_size=4), **kw), expected)
    cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=4)
    out = model.generate(ids, past_key_values=cache, **kw)
    assert out.shape == expected.shape
    kept = cache.stats()["tokens_kept"]
    for i in range(model.config.num_hidden_layers):
        if i in full_layers(model):
            assert kept[i] == 15 + 5  # 15 kept prompt tokens + 5 generated tokens fed back
        else:  # sliding layers are the model's own, untouched
            assert isinstance(cache.layers[i], type(DynamicCache(config=model.config).layers[i]))


def test_gemma3_sliding_layers_are_not_compressed():
    model = build("gemma3")
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(random_ids(1, 30), past_key_values=cache)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DynamicSlidingWindowLayer",
        "CompressedLayer",
        "DynamicSlidingWindowLayer",
    ]
    assert cache.stats()["tokens_kept"][1] == 15
