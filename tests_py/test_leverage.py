"""The leverage scorer (Compactor), added through the ARCHITECTURE.md recipe: no named
class, reached by name through ``KVCache(model, "leverage")``. Its kept tokens on SmolLM2
against a float64 torch reference written here; padded rows keep what they keep alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs.data import needle_prompt
from kvpress_rs.errors import UnsupportedError

from test_padding import check_rows_as_alone, prompts, tiny


def pre_rope(keys: torch.Tensor, theta: float) -> torch.Tensor:
    """Undo the rotate-half RoPE of keys cached at positions 0..T, in float64."""
    d, t = keys.shape[-1], keys.shape[-2]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = -torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x = keys.double()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def reference_leverage(pre: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
    """xᵢᵀ (XᵀX + ridge·I)⁻¹ xᵢ for the keys X of each head centred over tokens."""
    x = pre - pre.mean(dim=-2, keepdim=True)
    gram = x.transpose(-1, -2) @ x + ridge * torch.eye(x.shape[-1], dtype=x.dtype)
    return ((x @ torch.linalg.inv(gram)) * x).sum(-1)


@pytest.mark.model
def test_smollm2_keeps_the_keys_of_highest_leverage(smollm2_fp32_eager):
    model, tokenizer = smollm2_fp32_eager
    prompt = needle_prompt(tokenizer, context_tokens=300, depth=0.5)
    ids = prompt.context_ids
    theta = model.config.rope_parameters["rope_theta"]
    full = DynamicCache(config=model.config)
    cache = kvpress_rs.KVCache(model, "leverage", compression_ratio=0.5)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    t = ids.shape[1]
    n_kept = int(t * 0.5)
    for layer in (0, 15, 29):
        scores = reference_leverage(pre_rope(full.layers[layer].keys, theta))[0]  # (heads, T)
        kept = cache.kept_positions(layer)[0]
        expected = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        for h in range(scores.shape[0]):
            differ = set(kept[h].tolist()) ^ set(expected[h].tolist())
            # float32 against float64: only tokens on the cut may trade places
            cut = scores[h].sort(descending=True).values[n_kept - 1]
            assert all(abs(scores[h, p] - cut) <= 1e-3 * abs(cut) for p in differ), (layer, h, differ)
            assert len(differ) <= 2, (layer, h, differ)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert cache.nbytes < 0.55 * full_bytes
    # the question continues the compressed context
    question = prompt.input_ids
    out = model.generate(question, attention_mask=torch.ones_like(question), past_key_values=cache,
                         max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == question.shape[1] + 8 
    state = cache.layers[0].state
    assert (state.seen, state.stored) == (question.shape[1] + 7, n_kept + question.shape[1] - t + 7)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_padded_rows_keep_and_generate_what_they_do_alone(ratio):
    model = tiny("llama")
    check_rows_as_alone(model, lambda: kvpress_rs.KVCache(model, "leverage", compression_ratio=ratio),
                        prompts(128), 3)


def test_leverage_compresses_prompts_not_generation(tiny_llama):
    model = tiny_llama()
    cache = kvpress_rs.KVCache(model, "leverage", decoding_budget=16, decoding_interval=8)
    ids = torch.randint(3, 128, (1, 24))
    with pytest.raises(UnsupportedError, match="leverage"):
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12,
                       do_sample=False, pad_token_id=0)
