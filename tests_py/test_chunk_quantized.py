"""Quantized chunk caches (``ChunkStore(quantization=...)``): one chunk at position 0
generates like a pre-RoPE ``QuantizedKVCache`` prefill of the same tokens; a chunk placed
at an offset holds the chunk's keys shifted by that offset (checked against
``Rope.shift`` of the chunk's own dequantized keys) with codes byte-identical (nothing
re-quantized); attention over an assembled store equals a softmax reference written here;
``nbytes`` and entry sizes; corrupt, mismatched and malformed entries; bad configs."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_llama_config
from transformers import LlamaForCausalLM

import kvpress_rs
from kvpress_rs import _native
from kvpress_rs.errors import ChunkMismatchError, CorruptChunkError, InvalidArgumentError, ShapeError

G = 32


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden_size=128)).eval()  # head_dim 32 (= a group)


def greedy(model, ids, cache, n=8):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )


def config(bits=8, **kw):
    return kvpress_rs.QuantConfig(bits=bits, group_size=G, residual_length=kw.pop("residual_length", 32), **kw)


@pytest.mark.parametrize("bits,hadamard", [(8, False), (4, False), (4, True)])
def test_one_chunk_at_position_zero_generates_like_a_quantized_prefill(bits, hadamard, tmp_path):
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path, quantization=config(bits, hadamard=hadamard))
    chunk, question = random_ids(1, 2 * G + 5), random_ids(1, 6, seed=1)
    # the reference: the same tokens prefilled through a pre-RoPE quantized cache with blocks
    # of one group (what a chunk is encoded with); 5 + 6 + 8 tokens never fill its window
    ref = kvpress_rs.QuantizedKVCache(model, bits=bits, group_size=G, residual_length=0, pre_rope_keys=True,
                                      hadamard=hadamard)
    with torch.no_grad():
        model(chunk, past_key_values=ref, use_cache=True)
        ref_logits = model(question, past_key_values=ref, use_cache=True).logits
    ref = kvpress_rs.QuantizedKVCache(model, bits=bits, group_size=G, residual_length=0, pre_rope_keys=True,
                                      hadamard=hadamard)
    with torch.no_grad():
        model(chunk, past_key_values=ref, use_cache=True)
    expected = greedy(model, torch.cat([chunk, question], 1), ref)
    for _ in range(2):  # computed, then read back from the backend
        cache = store.assemble([chunk])
        layer = cache.layers[0].state.quantized_stats()
        assert (cache.get_seq_length(), layer["sink_tokens"], layer["quantized_tokens"], layer["residual_tokens"]) == (
            69, 5, 64, 0)
        with torch.no_grad():
            logits = model(question, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        cache = store.assemble([chunk])
        assert torch.equal(greedy(model, torch.cat([cache.input_ids, question], 1), cache), expected)
    assert store.stats["misses"] == 1 and store.stats["hits"] == 3


@pytest.mark.parametrize("hadamard", [False, True])
def test_chunks_at_offsets_move_by_positions_only(hadamard, tmp_path):
    """Assembled keys equal Rope.shift of each chunk's own dequantized keys by its offset
    (1e-5, fp32), values are the chunk's, codes are byte-identical, positions are offset.
    With Hadamard too: the codes hold rotated pre-RoPE keys, which an offset does not touch."""
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path,
                                  quantization=config(4, outlier_fraction=0.05, hadamard=hadamard))
    sizes = [G + 7, 2 * G + 3, 11]
    chunks = [random_ids(1, n, seed=s) for n, s in zip(sizes, (3, 4, 5))]
    encoded = [store.encode(c) for c in chunks]
    cache = store.assemble(chunks)
    assert cache.get_seq_length() == sum(sizes)
    rope = store.rope
    offsets = [0, sizes[0], sizes[0] + sizes[1]]
    for layer_idx in range(3):
        assembled = cache.layers[layer_idx].state
        parts = assembled.quantized_parts()
        keys, values = assembled.dequantized()
        front, block, block_start = 0, 0, sum(n % G for n in sizes)
        for e, d in zip(encoded, offsets):
            own = _native.assemble_quantized_layer(
                store.quantization, rope, (1, 2, 32, 32), torch.float32, [(e.quantized[layer_idx], e.n_tokens)]
            )
            own_k, own_v = own.dequantize()  # the chunk alone at 0: front (remainder) then blocks
            n_fp, n_q = own.sink_tokens, own.quantized_tokens
            torch.testing.assert_close(keys[:, :, front : front + n_fp], rope.shift(own_k[:, :, :n_fp], d), atol=1e-5, rtol=0)
            assert torch.equal(values[:, :, front : front + n_fp], own_v[:, :, :n_fp])
            q = slice(block_start, block_start + n_q)
            torch.testing.assert_close(keys[:, :, q], rope.shift(own_k[:, :, n_fp:], d), atol=1e-5, rtol=0)
            assert torch.equal(values[:, :, q], own_v[:, :, n_fp:])
            for b in range(1 if n_q else 0):  # encoding makes one block of whole groups
                for name in ("k.codes", "k.params", "k.outlier_pos", "k.outlier_val", "v.codes", "v.params"):
                    assert torch.equal(parts[f"block.{block}.{name}"], e.quantized[layer_idx][f"block.{b}.{name}"])
                assert torch.equal(parts[f"block.{block}.pos"], e.quantized[layer_idx][f"block.{b}.pos"] + d)
                block += 1
            front, block_start = front + n_fp, block_start + n_q


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("hadamard", [False, True])
def test_attention_over_an_assembled_store_equals_a_softmax_reference(q_len, hadamard):
    """The front region holds reused tokens out of position order; only the newest q_len
    tokens (appended last) are causal among themselves."""
    torch.manual_seed(0)
    rope = kvpress_rs.Rope(32)
    cfg = kvpress_rs.QuantConfig(bits=4, group_size=G, residual_length=0, pre_rope_keys=True, hadamard=hadamard)
    parts = []
    for n in (45, 70):
        chunk = _native.QuantizedStore(cfg, rope)
        chunk.append(torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32))
        parts.append((chunk.parts(), n))
    store = _native.assemble_quantized_layer(cfg, rope, (1, 2, 32, 32), torch.float32, parts)
    new_k, new_v = torch.randn(1, 2, q_len, 32), torch.randn(1, 2, q_len, 32)
    store.append(new_k, new_v, torch.arange(115, 115 + q_len))
    query = torch.randn(1, 4, q_len, 32)
    keys, values = store.dequantize()
    keys, values = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
    scores = query @ keys.transpose(-1, -2) * 0.2
    causal = torch.ones(q_len, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - q_len)
    expected = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ values).transpose(1, 2)
    torch.testing.assert_close(store.attend(query, None, 0.2), expected, atol=2e-5, rtol=1e-5)


def test_nbytes_is_exact_and_entries_are_smaller_than_unquantized(tmp_path):
    model = tiny()
    chunk = random_ids(1, 200, seed=7)
    plain = kvpress_rs.ChunkStore(model, backend=tmp_path / "fp")
    plain.encode(chunk)
    sizes = {"fp32": plain.entry_nbytes(chunk)}
    for bits in (8, 4, 2):
        store = kvpress_rs.ChunkStore(model, backend=tmp_path / f"q{bits}", quantization=config(bits))
        encoded = store.encode(chunk)
        sizes[bits] = store.entry_nbytes(chunk)
        cache = store.assemble([chunk])
        for i, layer in enumerate(cache.layers):
            parts = encoded.quantized[i]
            # positions: the fp remainder keeps none, each block's are consecutive (its first only)
            held = sum(t.nbytes for name, t in parts.items() if not name.endswith(".pos"))
            end = 192  # positions covered by the angle table: the blocks' 0..191
            table = (64 + -(-end // 64)) * (32 // 2) * 8  # (cos, sin) f32 pairs: fine + coarse rows
            assert layer.nbytes == held + table
        assert cache.nbytes == sum(layer.nbytes for layer in cache.layers)
    print(f"entry bytes, 200-token chunk: {sizes}; ratios vs fp32: "
          + ", ".join(f"{b}-bit {sizes[b] / sizes['fp32']:.3f}" for b in (8, 4, 2)))
    # fp32 keys+values: 256 B per token and head; 4-bit: 32·(0.5 + 4/32)·2 + 4 (position) = 44 B
    assert sizes[8] < 0.4 * sizes["fp32"] and sizes[4] < 0.25 * sizes["fp32"] and sizes[2] < sizes[4]


def test_eviction_then_quantization_generates_like_the_quantized_kvcache(tmp_path):
    model = tiny()
    compression = {"policy": "knorm", "compression_ratio": 0.5}
    store = kvpress_rs.ChunkStore(model, backend=tmp_path, compression=compression, quantization=config(8))
    chunk, question = random_ids(1, 150, seed=2), random_ids(1, 5, seed=1)
    ref = kvpress_rs.KVCache(model, **compression, quantization=config(8, residual_length=0, pre_rope_keys=True))
    with torch.no_grad():
        model(chunk, past_key_values=ref, use_cache=True)
    expected = greedy(model, torch.cat([chunk, question], 1), ref)
    for _ in range(2):
        cache = store.assemble([chunk])
        assert cache.get_seq_length() == 150 and cache.layers[0].state.stored == 75
        assert torch.equal(greedy(model, torch.cat([cache.input_ids, question], 1), cache), expected)
    # several compressed chunks: kept positions offset, generation continues at the total
    cache = store.assemble([random_ids(1, 90, seed=8), chunk])
    assert cache.get_seq_length() == 240
    parts = cache.layers[1].state.quantized_parts()
    assert int(parts["block.1.pos"].min()) >= 90 and int(parts["block.1.pos"].max()) < 240
    assert greedy(model, torch.cat([cache.input_ids, question], 1), cache, n=3).shape[-1] == 248


def test_corrupt_and_mismatched_quantized_entries(tmp_path):
    model = tiny()
    ids = random_ids(1, 40)
    q4 = kvpress_rs.ChunkStore(model, backend=tmp_path, quantization=config(4))
    q2 = kvpress_rs.ChunkStore(model, backend=tmp_path, quantization={"bits": 2, "group_size": G})
    plain = kvpress_rs.ChunkStore(model, backend=tmp_path)
    assert len({q4.key(ids), q2.key(ids), plain.key(ids)}) == 3
    # the dict form is the same settings as the QuantConfig form
    same = kvpress_rs.ChunkStore(model, backend=tmp_path, quantization={"bits": 4, "group_size": G, "residual_length": 32})
    assert same.key(ids) == q4.key(ids)
    good = {s: s.backend.get(s.encode(ids).key) for s in (q4, q2, plain)}
    for ours, theirs in [(q4, plain), (plain, q4), (q4, q2)]:
        ours.backend.put(ours.key(ids), good[theirs])
        with pytest.raises(ChunkMismatchError, match="other compression settings"):
            ours.load(ids)
        ours.backend.put(ours.key(ids), good[ours])
    flipped = bytearray(good[q4])
    flipped[-10] ^= 1
    q4.backend.put(q4.key(ids), bytes(flipped))
    with pytest.raises(CorruptChunkError, match="checksum"):
        q4.load(ids)
    again = q4.encode(ids)  # a miss: re-encoded, valid again
    assert q4.stats["invalid"] == 1 and q4.load(ids).quantized[0].keys() == again.quantized[0].keys()


def test_bad_configs_and_malformed_parts_raise_clearly(tmp_path):
    model = tiny()
    for quantization, match in [
        (config(4, sink_tokens=4), "sink_tokens"),
        ({"bits": 4, "nope": 1}, "unknown option"),
        ("4bit", "expected a kvpress_rs.QuantConfig"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            kvpress_rs.ChunkStore(model, backend=tmp_path, quantization=quantization)
    with pytest.raises(InvalidArgumentError, match="group_size"):  # token groups of 64 > head_dim 32
        kvpress_rs.ChunkStore(model, backend=tmp_path, quantization={"bits": 4, "group_size": 64})
    with pytest.raises(InvalidArgumentError, match="ChunkStore\\(quantization"):
        kvpress_rs.ChunkStore(model, backend=tmp_path, compression={"policy": "knorm", "quantization": config()})
    store = kvpress_rs.ChunkStore(model, backend=tmp_path, quantization=config(4))
    assert store.quantization.pre_rope_keys  # forced
    with pytest.raises(InvalidArgumentError, match="recompute_ratio"):
        store.assemble([random_ids(1, 40)], recompute_ratio=0.1)

    parts = store.encode(random_ids(1, 40)).quantized[0]
    rope, cfg = store.rope, store.quantization

    def assemble(p, tokens=40, cfg=cfg):
        return _native.assemble_quantized_layer(cfg, rope, (1, 2, 32, 32), torch.float32, [(p, tokens)])

    assert assemble(parts).seen == 40
    cases = [
        ({**parts, "block.0.k.params": parts["block.0.k.params"].float()}, kvpress_rs.DtypeError, "block.0.k.params"),
        ({**parts, "block.0.v.codes": parts["block.0.v.codes"][..., 1:]}, ShapeError, "block.0.v.codes"),
        ({k: v for k, v in parts.items() if k != "block.0.v.params"}, InvalidArgumentError, "block.0.v.params"),
        ({**parts, "block.1.k.codes": parts["block.0.k.codes"]}, InvalidArgumentError, "unknown part"),
        ({**parts, "residual.pos": parts["residual.pos"] + 40}, InvalidArgumentError, "residual.pos"),
        ({**parts, "block.0.k.outlier_pos": parts["block.0.k.codes"]}, InvalidArgumentError, "outlier"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            assemble(bad)
    with pytest.raises(InvalidArgumentError, match="pre_rope_keys"):
        assemble(parts, cfg=config(4))
    with pytest.raises(InvalidArgumentError, match="positions span"):
        assemble(parts, tokens=20)  # positions beyond the part's token count
