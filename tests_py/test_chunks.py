"""Chunk reuse: chunks placed at their offsets (keys equal keys computed at the target
positions for every rope type), assembled-cache generation equal to full-prefill
generation for one chunk at position 0 (tiny Llama and SmolLM2), compressed chunks,
selective recomputation against a reference selection and against the full prefill."""

from __future__ import annotations


import pytest
import torch
from conftest import random_ids, tiny_llama_config
from test_rope import HEAD_DIM, ROPES, SEQ_DEPENDENT
from transformers import DynamicCache, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import kvpress_rs
from kvpress_rs import _native
from kvpress_rs.data import needle_prompt

# Shifting +d then -d back to the original, for every rope type and layout, is tested in
# test_rope.py::test_invert_apply_shift_identities_fp32.


def greedy(model, ids, cache, n=12):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )


def full_prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("name", list(ROPES))
def test_shifted_chunk_keys_equal_keys_computed_at_the_target_positions(name):
    rope = ROPES[name]
    torch.manual_seed(1)
    sizes = [5, 7, 4]  # 16 tokens: within every case's original context
    pre = [torch.randn(1, 2, n, HEAD_DIM) for n in sizes]
    parts = [(rope.apply(x, torch.arange(n)), x * 3, None, n) for x, n in zip(pre, sizes)]
    store = _native.assemble_layer(rope, parts)
    assert (store.seen, store.stored, store.has_evicted) == (16, 16, False)
    keys, values, start = store.keys(), store.values(), 0
    for x, n in zip(pre, sizes):
        direct = rope.apply(x, torch.arange(start, start + n))
        torch.testing.assert_close(keys[:, :, start : start + n], direct, atol=1e-6, rtol=1e-6)
        assert torch.equal(values[:, :, start : start + n], x * 3)
        start += n
    if name.split("-")[0] in SEQ_DEPENDENT:
        # frequencies of a longer prompt differ from the encoded ones: refused, not approximated
        long = [(rope.apply(x, torch.arange(16)), x, None, 16) for x in [torch.randn(1, 2, 16, HEAD_DIM)] * 5]
        with pytest.raises(kvpress_rs.InvalidArgumentError, match="frequencies differ"):
            _native.assemble_layer(rope, long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_at_position_zero_generates_like_full_prefill_tiny(dtype, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    chunk, question = random_ids(1, 40), random_ids(1, 6, seed=1)
    expected = greedy(model, torch.cat([chunk, question], 1), DynamicCache(config=model.config))
    for _ in range(2):  # computed, then read back from the backend
        cache = store.assemble([chunk])
        assert cache.get_seq_length() == 40 and torch.equal(cache.input_ids, chunk)
        assert torch.equal(greedy(model, torch.cat([cache.input_ids, question], 1), cache), expected)
    assert store.stats["misses"] == 1 and store.stats["hits"] == 1


def test_several_chunks_layer_zero_is_exact_and_positions_continue(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    prefix, docs = random_ids(1, 6, seed=5), [random_ids(1, n, seed=s) for n, s in [(9, 6), (13, 7), (4, 8)]]
    cache = store.assemble(docs, prefix=prefix)
    ids = torch.cat([prefix, *docs], 1)
    assert torch.equal(cache.input_ids, ids) and cache.segments == [(0, 6), (6, 15), (15, 28), (28, 32)]
    full = full_prefill(model, ids)
    # layer 0's KV depends on the token and its position only: reuse is exact there
    torch.testing.assert_close(cache.layers[0].keys, full.layers[0].keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layers[0].values, full.layers[0].values, atol=1e-6, rtol=1e-6)
    # the prefix, at position 0 with nothing before it, is exact in every layer
    for i in range(3):
        torch.testing.assert_close(cache.layers[i].keys[:, :, :6], full.layers[i].keys[:, :, :6], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 32 and cache.nbytes == full_nbytes(full)
    question = random_ids(1, 3, seed=9)
    out = greedy(model, torch.cat([ids, question], 1), cache, n=4)
    assert out.shape[1] == 32 + 3 + 4 and cache.get_seq_length() == 32 + 3 + 3
    assert cache.kept_positions(1)[0, 0].tolist() == list(range(38))
    before = cache.nbytes
    cache.crop(-5)  # the store's own crop: the 5 newest tokens go
    assert cache.get_seq_length() == 33 and cache.kept_positions(2)[0, 0].tolist() == list(range(33))
    assert cache.nbytes < before


def full_nbytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_compressed_chunks_keep_what_the_policy_kept_offset(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    compression = {"policy": "knorm", "compression_ratio": 0.5}
    store = kvpress_rs.ChunkStore(model, backend=tmp_path, compression=compression)
    docs = [random_ids(1, 20, seed=1), random_ids(1, 16, seed=2)]
    cache = store.assemble(docs)
    offset = 0
    kept = []
    for doc in docs:
        alone = kvpress_rs.KnormCache(model, compression_ratio=0.5)
        with torch.no_grad():
            model(doc, past_key_values=alone)
        kept.append([alone.kept_positions(i) + offset for i in range(3)])
        offset += doc.shape[1]
    for i in range(3):
        assert torch.equal(cache.kept_positions(i), torch.cat([k[i] for k in kept], dim=-1))
    assert cache.get_seq_length() == 36 and cache.stats()["tokens_kept"] == [18, 18, 18]
    # nothing else is stored: 18 tokens of keys and values, int32 positions
    assert cache.nbytes == 3 * (2 * 1 * 2 * 18 * 16 * 4 + 2 * 18 * 4)
    out = greedy(model, torch.cat([cache.input_ids, random_ids(1, 3, seed=3)], 1), cache, n=3)
    assert out.shape[1] == 42
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="recompute_ratio"):
        store.assemble(docs, recompute_ratio=0.1)


def test_full_recomputation_reproduces_the_full_prefill(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).eval()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    docs = [random_ids(1, 12, seed=1), random_ids(1, 10, seed=2), random_ids(1, 7, seed=3)]
    full = full_prefill(model, torch.cat(docs, 1))
    cache = store.assemble(docs, recompute_ratio=1.0)
    assert cache.recomputed.tolist() == list(range(12, 29))
    for i in range(4):
        torch.testing.assert_close(cache.layers[i].keys, full.layers[i].keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, full.layers[i].values, atol=2e-5, rtol=1e-5)


def test_partial_recomputation_chooses_the_most_deviating_values(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).eval()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    prefix = random_ids(1, 5, seed=4)
    docs = [random_ids(1, 12, seed=1), random_ids(1, 10, seed=2)]
    plain = store.assemble(docs, prefix=prefix)
    full = full_prefill(model, torch.cat([prefix, *docs], 1))
    cache = store.assemble(docs, prefix=prefix, recompute_ratio=0.25, probe_layer=1)
    # reference: squared value deviation at the probe layer, summed over heads and channels,
    # over the chunk tokens (the prefix is exact), the top round(0.25 * 22) = 6
    deviation = ((full.layers[1].values - plain.layers[1].values) ** 2).sum(dim=(0, 1, 3))
    deviation[:5] = -1
    expected = deviation.topk(6).indices.sort().values
    assert torch.equal(cache.recomputed, expected)
    # layers up to the probe are the full prefill's; deeper, the chosen tokens moved toward it
    torch.testing.assert_close(cache.layers[1].values, full.layers[1].values, atol=2e-5, rtol=1e-5)
    err = lambda c: (c.layers[3].values[:, :, expected] - full.layers[3].values[:, :, expected]).abs().sum()
    assert err(cache) < err(plain)


def test_assembly_errors(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="recompute_ratio"):
        store.assemble([random_ids(1, 4)], recompute_ratio=1.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="probe_layer"):
        store.assemble([random_ids(1, 4)], recompute_ratio=0.5, probe_layer=3)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="chunks"):
        store.assemble([])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="tokenizer"):
        store.assemble(["text without a tokenizer"])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="chunk"):
        store.assemble([torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="head_budget"):
        kvpress_rs.ChunkStore(model, backend=tmp_path, compression={"policy": "snapkv", "head_budget": "adakv"})
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="quantization"):
        kvpress_rs.ChunkStore(model, backend=tmp_path, quantization="4bit")  # valid configs: test_chunk_quantized.py
    sliding = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="sliding"):
        kvpress_rs.ChunkStore(sliding, backend=tmp_path)


@pytest.mark.model
def test_one_chunk_at_position_zero_generates_like_full_prefill_smollm2(smollm2_bf16, tmp_path):
    model, tokenizer = smollm2_bf16
    prompt = needle_prompt(tokenizer, context_tokens=600, depth=0.4)
    expected = greedy(model, prompt.input_ids, DynamicCache(config=model.config), 24)
    store = kvpress_rs.ChunkStore(model, tokenizer, backend=tmp_path)
    for _ in range(2):  # computed, then read back and verified
        cache = store.assemble([prompt.context_ids])
        out = greedy(model, torch.cat([cache.input_ids, prompt.question_ids], 1), cache, 24)
        assert torch.equal(out, expected)
    answer = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert prompt.is_correct(answer), answer
