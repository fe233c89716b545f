"""ChunkKV (``ChunkKVCache``, selector ``"chunks"``) on SmolLM2: the kept tokens against a
torch reference written here from the definition (whole chunks ranked by the mean of the
scores summed over KV heads), whole chunks shared by every head with any scorer, inside
``generate``. The generic tests (padding, entry points, decoding, budgets) run it through
``settings.REGISTRY``."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs.data import needle_prompt


def reference_chunks(keys: torch.Tensor, chunk: int, n_chunks: int) -> list[int]:
    """Knorm's ChunkKV: token score −‖k‖ summed over heads, chunk mean, best chunks whole."""
    per_token = -keys[0].double().norm(dim=-1).sum(0)  # (T,)
    means = per_token.view(-1, chunk).mean(-1)
    best = means.topk(n_chunks).indices
    return sorted(int(c) * chunk + i for c in best for i in range(chunk))


@pytest.mark.model
def test_smollm2_keeps_the_reference_chunks(smollm2_fp32_eager):
    model, tokenizer = smollm2_fp32_eager
    ids = needle_prompt(tokenizer, context_tokens=400, depth=0.5).context_ids[:, :300]
    assert ids.shape[1] == 300
    full = DynamicCache(config=model.config)
    cache = kvpress_rs.ChunkKVCache(model, "knorm", compression_ratio=0.5, chunk_length=10)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    for layer in range(model.config.num_hidden_layers):
        expected = reference_chunks(full.layers[layer].keys, 10, 15)
        kept = cache.kept_positions(layer)[0]
        for h in range(kept.shape[0]):
            assert kept[h].tolist() == expected, (layer, h)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert full_bytes // 2 <= cache.nbytes <= 0.51 * full_bytes  # kept keys and values, their positions


@pytest.mark.model
@pytest.mark.parametrize("scorer", ["snapkv", "expected_attention"])
def test_smollm2_generates_from_whole_chunks(smollm2_bf16, scorer):
    model, tokenizer = smollm2_bf16
    prompt = needle_prompt(tokenizer, context_tokens=400, depth=0.5)
    cache = kvpress_rs.ChunkKVCache(model, scorer, compression_ratio=0.5)  # chunks of 20
    out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), past_key_values=cache,
                         max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    t = prompt.input_ids.shape[1]
    assert out.shape[1] == t + 4
    n_kept = int(t * 0.5)
    for layer in (0, 14, 29):
        kept = cache.kept_positions(layer)[0][:, :n_kept]  # the prompt's tokens, then the generated ones
        assert all(torch.equal(kept[h], kept[0]) for h in range(kept.shape[0])), layer
        chunks = {}
        for p in kept[0].tolist():
            chunks[p // 20] = chunks.get(p // 20, 0) + 1
        full_chunks = sum(n for c, n in chunks.items() if n == min(20, t - 20 * c))
        assert full_chunks >= n_kept - 19, (layer, chunks)  # at most one chunk cut to fill the budget


def test_chunk_length_is_checked(tiny_llama):
    model = tiny_llama()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="chunk_length"):
        kvpress_rs.ChunkKVCache(model, compression_ratio=0.5, chunk_length=0)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="chunk_length"):
        kvpress_rs.KVCache(model, "knorm", compression_ratio=0.5, chunk_length=4)  # topk takes none


def test_per_head_budgets_are_refused(tiny_llama):
    with pytest.raises(kvpress_rs.UnsupportedError, match='head_budget="adakv".*"chunks"'):
        kvpress_rs.ChunkKVCache(tiny_llama(), compression_ratio=0.5, head_budget="adakv")


@pytest.mark.model
def test_entropy_gated_chunks_on_smollm2_keep_the_budget_shared_by_heads(smollm2_bf16):
    model, tokenizer = smollm2_bf16
    prompt = needle_prompt(tokenizer, context_tokens=400, depth=0.5)
    cache = kvpress_rs.KVCache(model, "snapkv", compression_ratio=0.5, selector="entropy_chunks")
    out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), past_key_values=cache,
                         max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    t = prompt.input_ids.shape[1]
    assert out.shape[1] == t + 4
    for layer in (0, 29):
        kept = cache.kept_positions(layer)[0]
        assert kept.shape[-1] == int(t * 0.5) + 3
        assert all(torch.equal(kept[h], kept[0]) for h in range(kept.shape[0]))


@pytest.mark.parametrize("selector", ["chunks", "entropy_chunks"])
def test_padded_rows_keep_what_they_keep_alone(selector):
    from test_padding import check_rows_as_alone, prompts, tiny

    model = tiny("llama")
    check_rows_as_alone(model, lambda: kvpress_rs.KVCache(model, "knorm", compression_ratio=0.5, selector=selector,
                                                          entropy_chunk_length=4, low_entropy_chunk_length=2)
                        if selector == "entropy_chunks" else
                        kvpress_rs.KVCache(model, "knorm", compression_ratio=0.5, selector=selector, chunk_length=4),
                        prompts(128), 3)
