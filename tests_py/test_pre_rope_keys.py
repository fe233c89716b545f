"""Keys quantized before RoPE (``pre_rope_keys=True``, KVQuant): the codes hold pre-RoPE
keys, attention re-applies the rotation per tile. Checked against an independent float64
RoPE written here, against attention over the dequantized tensors (fused kernel and
libtorch path), and inside forwards of tiny Llama models, with eviction too."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs._native import QuantizedStore
from kvpress_rs.errors import InvalidArgumentError, ShapeError, UnsupportedError

from conftest import random_ids
from test_quantized import reference_attention, reference_groups, reference_logits, reference_quantize

THETA = 10000.0


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, sign: float) -> torch.Tensor:
    """rotate-half RoPE in float64: x (b, h, t, d), positions (t,) or (b, h, t)."""
    d = x.shape[-1]
    inv_freq = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = sign * positions.double()[..., None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x = x.double()
    rotated_half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated_half * sin


def pre_rope_store(config=None, rope=None):
    config = config or kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32, pre_rope_keys=True)
    return QuantizedStore(config, rope or kvpress_rs.Rope(64, theta=THETA))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("grouping", ["channel", "token"])
def test_codes_hold_pre_rope_keys_within_half_a_reference_step(bits, grouping):
    torch.manual_seed(bits)
    pre = torch.randn(2, 3, 96, 64)
    pre[..., 5] *= 8  # a pre-RoPE outlier channel: what per-channel groups are for
    positions = torch.arange(1000, 1096)
    keys = reference_rotate(pre, positions, 1.0).float()
    config = kvpress_rs.QuantConfig(bits=bits, group_size=32, residual_length=32, key_grouping=grouping,
                                    pre_rope_keys=True)
    store = pre_rope_store(config)
    store.append(keys, keys.clone(), positions)
    assert store.quantized_tokens == 96
    stored = reference_rotate(store.dequantize()[0], positions, -1.0)  # back to pre-RoPE
    _, step = reference_quantize(pre, bits, 32, grouping)
    error = (reference_groups(stored, 32, grouping) - reference_groups(pre.double(), 32, grouping)).abs()
    assert (error <= 0.5 * step * (1 + 2**-8) + 1e-4).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("hadamard", [False, True])
def test_attention_rotates_every_tile_like_the_dequantized_keys(dtype, tol, q_len, hadamard):
    # with hadamard the kernel rotates each key tile back to the plain basis before RoPE
    torch.manual_seed(0)
    store = pre_rope_store(kvpress_rs.QuantConfig(bits=3, group_size=32, residual_length=64, pre_rope_keys=True,
                                                  sink_tokens=3, hadamard=hadamard))
    # rows at different, non-consecutive positions (as after eviction), then decoding
    base = torch.sort(torch.randperm(5000)[:200]).values
    positions = torch.stack([base, base + 7]).view(2, 1, 200).expand(2, 2, 200)
    store.append(torch.randn(2, 2, 200, 64).to(dtype), torch.randn(2, 2, 200, 64).to(dtype), positions)
    for step in range(70):  # fills and flushes the residual window once
        store.append(torch.randn(2, 2, 1, 64).to(dtype), torch.randn(2, 2, 1, 64).to(dtype),
                     torch.tensor([5100 + step]))
    keys, values = store.dequantize()
    query = torch.randn(2, 6, q_len, 64).to(dtype)
    out = store.attend(query, None, 0.125)
    torch.testing.assert_close(out.float(), reference_attention(query, keys, values, 0.125), rtol=0, atol=tol)
    with ops.cpu_kernels(False):
        torch.testing.assert_close(store.attend(query, None, 0.125).float(), out.float(), rtol=0, atol=tol)


def test_positions_run_on_from_the_tokens_seen_by_default():
    torch.manual_seed(1)
    keys = torch.randn(1, 2, 64, 64)
    given, default = pre_rope_store(), pre_rope_store()
    given.append(keys, keys, torch.arange(64))
    default.append(keys[:, :, :40], keys[:, :, :40])
    default.append(keys[:, :, 40:], keys[:, :, 40:])
    assert torch.equal(given.dequantize()[0], default.dequantize()[0])
    # stored at other positions, the same keys dequantize differently
    shifted = pre_rope_store()
    shifted.append(keys, keys, torch.arange(100, 164))
    assert not torch.allclose(shifted.dequantize()[0], given.dequantize()[0], atol=1e-2)


def test_positions_and_the_table_are_counted_in_nbytes():
    keys = torch.randn(1, 2, 64, 64)
    plain = QuantizedStore(kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32))
    plain.append(keys, keys)
    table = 8 * 32 * (64 + 2)  # (cos, sin) f32 per frequency: fine table + a coarse entry per 64 positions
    # consecutive positions: only the first is kept
    run = pre_rope_store()
    run.append(keys, keys, torch.arange(10, 74))
    assert run.nbytes == plain.nbytes + table
    # any other positions: int32 per token of the two blocks (one row, shared by every head)
    scattered = pre_rope_store()
    scattered.append(keys, keys, torch.arange(0, 128, 2))
    assert scattered.nbytes == plain.nbytes + 4 * 64 + table
    torch.testing.assert_close(scattered.dequantize()[1], run.dequantize()[1])  # values do not move


def test_layers_share_one_rope_table_counted_once(llama):
    model = llama()
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32, pre_rope_keys=True)
    with torch.no_grad():
        model(random_ids(1, 96, seed=1), past_key_values=cache)  # three whole blocks
    stats = cache.stats()
    # the table covers positions [0, 128): the fine table and two coarse entries
    half = model.config.hidden_size // model.config.num_attention_heads // 2
    assert stats["rope_table_nbytes"] == 8 * half * (64 + 2)
    assert cache.nbytes == sum(stats["nbytes_per_layer"]) + stats["rope_table_nbytes"]
    # a layer's store holds codes, scales/zeros and the residual window, no table nor positions
    plain = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32)
    with torch.no_grad():
        model(random_ids(1, 96, seed=1), past_key_values=plain)
    assert stats["nbytes_per_layer"] == plain.stats()["nbytes_per_layer"]


@pytest.fixture
def llama(tiny_llama):
    def make(**kw):
        return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, **kw)

    return make


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("hadamard", [False, True])
def test_cache_decode_equals_attention_over_dequantized_tensors(llama, dtype, tol, hadamard):
    model = llama(dtype=dtype)
    cache = kvpress_rs.QuantizedKVCache(model, bits=3, residual_length=32, pre_rope_keys=True, hadamard=hadamard)
    with torch.no_grad():
        model(random_ids(2, 101, seed=1), past_key_values=cache)
    for new in [random_ids(2, 1, seed=2), random_ids(2, 7, seed=3), random_ids(2, 1, seed=4)]:
        expected = reference_logits(model, cache, new)
        with torch.no_grad():
            ours = model(new, past_key_values=cache).logits
        torch.testing.assert_close(ours.float(), expected.float(), rtol=0, atol=tol)


def test_eight_bit_pre_rope_keys_generate_like_dynamic_cache(llama):
    model = llama()
    ids = random_ids(1, 90, seed=8)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    cache = kvpress_rs.QuantizedKVCache(model, bits=8, residual_length=32, pre_rope_keys=True)
    assert torch.equal(model.generate(ids, past_key_values=cache, **kw), expected)


@pytest.mark.parametrize("rerotate", [False, True])
def test_eviction_then_pre_rope_quantization_keeps_positions(llama, rerotate):
    # 8 bits are nearly exact: logits must match the unquantized evicted cache, which they
    # would not if kept keys were rotated back from the wrong positions
    model = llama()
    ids, new = random_ids(1, 120, seed=9), random_ids(1, 3, seed=10)
    quant = kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=32, pre_rope_keys=True)
    logits = []
    for quantization in (None, quant):
        cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=8, rerotate=rerotate,
                                       quantization=quantization)
        with torch.no_grad():
            model(ids, past_key_values=cache)
            logits.append(model(new, past_key_values=cache).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=2e-2)


def test_bad_pre_rope_options_raise(llama):
    with pytest.raises(InvalidArgumentError, match="pre_rope_keys.*RoPE"):
        QuantizedStore(kvpress_rs.QuantConfig(pre_rope_keys=True))
    with pytest.raises(UnsupportedError, match="dynamic"):
        pre_rope_store(rope=kvpress_rs.Rope(64, rope_type="dynamic", factor=2.0, max_position_embeddings=128))
    store = pre_rope_store()
    keys = torch.randn(1, 2, 8, 64)
    with pytest.raises(ShapeError, match="positions"):
        store.append(keys, keys, torch.arange(7))
    with pytest.raises(InvalidArgumentError, match="positions"):
        store.append(keys, keys, torch.arange(-1, 7))
    assert store.seen == 0
