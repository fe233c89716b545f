"""The quantized cache: round trips against an independent torch quantizer, bit packing,
attention over the packed store against attention over the dequantized tensors, and
QuantizedKVCache inside real forwards and generate() on tiny Llama models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs._native import QuantizedStore

from conftest import random_ids

# ----------------------------------------------------------------------------------------
# Independent references, written here.


def reference_groups(x: torch.Tensor, g: int, grouping: str) -> torch.Tensor:
    """(b, h, t, d) -> (b, h, n_groups, g) in the library's group order."""
    b, h, t, d = x.shape
    if grouping == "token":
        return x.reshape(b, h, t * d // g, g)
    return x.reshape(b, h, t // g, g, d).transpose(-1, -2).reshape(b, h, t // g * d, g)


def reference_quantize(x: torch.Tensor, bits: int, g: int, grouping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain asymmetric min/max quantization in float64: (codes, per-group step)."""
    groups = reference_groups(x.double(), g, grouping)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    codes = ((groups - lo) / step.clamp_min(1e-30)).round().clamp(0, 2**bits - 1)
    return codes, step


def reference_unpack(packed: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """The documented planar layout, unpacked bit by bit: (..., g*bits/8) uint8 -> (..., g)."""
    p = packed.long()
    if bits == 8:
        return p
    if bits == 4:
        return torch.cat([p & 15, p >> 4], -1)
    if bits == 2:
        return torch.cat([(p >> (2 * k)) & 3 for k in range(4)], -1)
    low = torch.cat([(p[..., : g // 4] >> (2 * k)) & 3 for k in range(4)], -1)
    high = torch.cat([(p[..., g // 4 :] >> k) & 1 for k in range(8)], -1)
    return low + 4 * high


def reference_attention(query, keys, values, scaling, mask=None):
    """sdpa over full keys/values with GQA; causal among the last q_len keys if no mask."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(rep, 1)
    v = values.float().repeat_interleave(rep, 1)
    q_len, n = query.shape[2], keys.shape[2]
    if mask is None:
        mask = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
        mask = mask[None]
    out = F.scaled_dot_product_attention(query.float(), k, v, attn_mask=mask[:, None], scale=scaling)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------
# Quantizing one tensor.


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("grouping", ["channel", "token"])
def test_round_trip_error_is_within_half_a_reference_step(bits, g, grouping):
    torch.manual_seed(bits + g)
    x = torch.randn(2, 3, 2 * g, 128)
    x[..., 7] *= 10  # an outlier channel
    q = ops.quantize(x, bits=bits, group_size=g, grouping=grouping)
    y = q.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    _, step = reference_quantize(x, bits, g, grouping)
    groups_x = reference_groups(x.double(), g, grouping)
    groups_y = reference_groups(y.double(), g, grouping)
    lo = groups_x.amin(-1, keepdim=True)
    # float16 scale (rounded up) and zero (rounded down) add a little slack.
    bound = 0.5 * step * (1 + 2**-9) + lo.abs() * 2**-10 / (2**bits - 1) + 1e-6
    assert ((groups_x - groups_y).abs() <= bound).all()
    # The bound is tight: errors of about half a step occur.
    assert ((groups_x - groups_y).abs() / step).max() > 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grouping", ["channel", "token"])
def test_codes_are_packed_exactly_as_documented(bits, grouping):
    torch.manual_seed(bits)
    g = 32
    x = torch.randn(1, 2, 64, 64)
    q = ops.quantize(x, bits=bits, group_size=g, grouping=grouping)
    b, h, _, _ = q.shape
    packed = q.codes.reshape(b, h, -1, g * bits // 8)
    codes = reference_unpack(packed, bits, g)
    # Decoding the packed codes by hand with the stored scales/zeros gives dequantize().
    manual = codes.double() * q.scales.double()[..., None] + q.zeros.double()[..., None]
    expected = reference_groups(q.dequantize().double(), g, grouping)
    torch.testing.assert_close(manual, expected, rtol=0, atol=1e-6)
    # And the codes are the reference quantizer's, up to one level where the float16
    # rounding of scale and zero moves a value across a rounding boundary.
    ref_codes, _ = reference_quantize(x, bits, g, grouping)
    assert (codes - ref_codes).abs().max() <= 1
    assert (codes != ref_codes).double().mean() < (0.01 if bits < 8 else 0.1)


def test_values_that_are_codes_round_trip_exactly():
    # Every group spans 0..15 exactly: scale 1, zero 0, so 4-bit codes reproduce x.
    x = (torch.arange(64 * 64) % 16).float().reshape(1, 1, 64, 64)
    for grouping in ["channel", "token"]:
        q = ops.quantize(x, bits=4, group_size=32, grouping=grouping)
        assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outliers_are_exact_and_hadamard_round_trips(dtype):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 64).to(dtype)
    x[0, 1, 10, 3] = 30.0
    q = ops.quantize(x, bits=2, group_size=32, grouping="token", outlier_fraction=0.05)
    assert q.outlier_positions.shape == (1, 2, 128, 2)
    assert q.dequantize()[0, 1, 10, 3] == 30.0
    h = ops.quantize(x, bits=8, group_size=32, grouping="token", hadamard=True)
    assert (h.dequantize().float() - x.float()).abs().max() < 0.05


def test_the_libtorch_path_gives_the_same_codes():
    torch.manual_seed(1)
    x = torch.randn(2, 2, 64, 64, dtype=torch.bfloat16)
    kwargs = dict(bits=3, group_size=32, grouping="channel", hadamard=True, outlier_fraction=0.03)
    rust = ops.quantize(x, **kwargs)
    with ops.cpu_kernels(False):
        torch_path = ops.quantize(x, **kwargs)
    for name in ["codes", "scales", "zeros", "outlier_positions", "outlier_values"]:
        assert torch.equal(getattr(rust, name), getattr(torch_path, name)), name
    assert torch.equal(rust.dequantize(), torch_path.dequantize())


# ----------------------------------------------------------------------------------------
# The store and its attention.


def filled_store(config, shape=(2, 2, 200, 64), decode=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    store = QuantizedStore(config)
    b, h, t, d = shape
    store.append(torch.randn(b, h, t, d).to(dtype), torch.randn(b, h, t, d).to(dtype))
    for _ in range(decode):
        store.append(torch.randn(b, h, 1, d).to(dtype), torch.randn(b, h, 1, d).to(dtype))
    return store


CONFIGS = [
    kvpress_rs.QuantConfig(bits=4),
    kvpress_rs.QuantConfig(bits=2, group_size=64, residual_length=64, sink_tokens=4),
    kvpress_rs.QuantConfig(bits=3, residual_length=32, key_grouping="token", value_grouping="channel"),
    kvpress_rs.QuantConfig(bits=2, residual_length=0, hadamard=True, outlier_fraction=0.02),
    kvpress_rs.QuantConfig(bits=8, residual_length=32),
    # a 100-token window leaving 32 at a time: 68..99 tokens stay in full precision
    kvpress_rs.QuantConfig(bits=2, residual_length=100, block_length=32, sink_tokens=3, hadamard=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("q_len", [1, 6])
def test_attention_over_the_store_equals_attention_over_the_dequantized_tensors(config, dtype, tol, q_len):
    store = filled_store(config, dtype=dtype)
    keys, values = store.dequantize()
    query = torch.randn(2, 6, q_len, 64).to(dtype)
    out = store.attend(query, None, 0.125)
    assert out.shape == (2, q_len, 6, 64) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_attention(query, keys, values, 0.125), rtol=0, atol=tol)
    with ops.cpu_kernels(False):
        torch.testing.assert_close(store.attend(query, None, 0.125).float(), out.float(), rtol=0, atol=tol)


def test_a_long_chunk_of_queries_split_over_threads_equals_the_reference():
    # Decode steps run on the calling thread; only work this large (2 heads x 4096 tokens x
    # 512 query rows) is cut into pieces for rayon, whose partial softmaxes then merge.
    store = filled_store(kvpress_rs.QuantConfig(bits=4, residual_length=64, sink_tokens=4), shape=(1, 2, 4096, 64))
    query = torch.randn(1, 4, 256, 64)
    torch.testing.assert_close(
        store.attend(query, None, 0.125), reference_attention(query, *store.dequantize(), 0.125), rtol=0, atol=2e-5
    )


def test_attention_with_a_padding_mask():
    store = filled_store(kvpress_rs.QuantConfig(bits=4, residual_length=32))
    n = store.seen
    query = torch.randn(2, 6, 2, 64)
    mask = torch.ones(2, 2, n, dtype=torch.bool)
    mask[0, :, :50] = False
    mask[1, 0, -1] = False
    torch.testing.assert_close(
        store.attend(query, mask, 0.2), reference_attention(query, *store.dequantize(), 0.2, mask), rtol=0, atol=2e-5
    )


def test_store_bookkeeping():
    store = QuantizedStore(kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=64, sink_tokens=3))
    k = torch.randn(1, 2, 100, 64, dtype=torch.bfloat16)
    store.append(k, k)
    assert (store.sink_tokens, store.quantized_tokens, store.residual_tokens, store.blocks) == (3, 64, 33, 1)
    # nbytes: codes + float16 scale/zero per group of 32 for 64 tokens, the 33 tokens of
    # the residual window (no spare capacity) and sinks in bf16; keys and values alike.
    per_token_fp = 2 * 64 * 2
    quantized = 64 * 2 * 64 * (4 + 32 / 32) / 8
    assert store.nbytes == 2 * (quantized + (33 + 3) * per_token_fp)
    store.crop(30)
    assert store.seen == 70 and store.residual_tokens == 3
    assert store.nbytes == 2 * (quantized + (3 + 3) * per_token_fp)  # freed, not masked
    with pytest.raises(kvpress_rs.CacheStateError, match="full precision"):
        store.crop(10)


# ----------------------------------------------------------------------------------------
# The cache in real models.


@pytest.fixture
def llama(tiny_llama):
    """Tiny Llama models with head_dim 32 (4 query heads, 2 KV heads: GQA)."""

    def make(**kw):
        return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, **kw)

    return make


def reference_logits(model, cache, new_ids, attention_mask=None):
    """Logits of `new_ids` from a DynamicCache holding the quantized cache's dequantized
    keys/values: what attention over the dequantized tensors gives."""
    ref = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        k, v = layer.state.dequantized()
        ref.update(k, v, i)
    with torch.no_grad():
        return model(new_ids, past_key_values=ref, attention_mask=attention_mask).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_decode_and_chunks_equal_attention_over_dequantized_tensors(llama, attn, dtype, tol):
    model = llama(attn=attn, dtype=dtype)
    cache = kvpress_rs.QuantizedKVCache(model, bits=3, residual_length=32, sink_tokens=2)
    context = random_ids(2, 101, seed=1)
    with torch.no_grad():
        model(context, past_key_values=cache)
    for new in [random_ids(2, 1, seed=2), random_ids(2, 7, seed=3), random_ids(2, 1, seed=4)]:
        expected = reference_logits(model, cache, new)  # before `new` enters the cache
        with torch.no_grad():
            ours = model(new, past_key_values=cache).logits
        torch.testing.assert_close(ours.float(), expected.float(), rtol=0, atol=tol)
    assert cache.get_seq_length() == 110
    assert cache.stats()["quantized_tokens"] == [96] * 3


def test_left_padded_batch_uses_the_padding_mask(llama):
    model = llama()
    ids = random_ids(2, 70, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    new = random_ids(2, 1, seed=6)
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    expected = reference_logits(model, cache, new, full_mask)
    with torch.no_grad():
        ours = model(new, attention_mask=full_mask, past_key_values=cache).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=2),
        dict(bits=3, group_size=64, residual_length=64, value_grouping="channel"),
        dict(bits=4, key_grouping="token", value_grouping="channel", residual_length=0),
        dict(bits=2, hadamard=True, outlier_fraction=0.02, sink_tokens=4),
        dict(bits=8, group_size=32, residual_length=32),
        dict(bits=2, group_size=32, residual_length=64, block_length=32, pre_rope_keys=True, hadamard=True),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_runs_and_stores_what_it_saw(llama, kwargs, batch):
    model = llama()
    ids = random_ids(batch, 77, seed=7)
    cache = kvpress_rs.QuantizedKVCache(model, **kwargs)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=9, min_new_tokens=9,
        do_sample=False, pad_token_id=0,
    )
    assert out.shape == (batch, 86)
    seen = 85  # the last generated token is never fed back
    stats = cache.stats()
    assert stats["tokens_seen"] == seen
    for s, q, r in zip(stats["sink_tokens"], stats["quantized_tokens"], stats["residual_tokens"]):
        assert s + q + r == seen
    # the layers' bytes, and the cos/sin table they share once (pre-RoPE keys)
    assert cache.nbytes == sum(stats["nbytes_per_layer"]) + stats["rope_table_nbytes"]
    assert (stats["rope_table_nbytes"] > 0) == kwargs.get("pre_rope_keys", False)


@pytest.mark.parametrize("window", [dict(residual_length=0), dict(residual_length=64, block_length=32)])
def test_eight_bits_generate_like_dynamic_cache(llama, window):
    model = llama()
    ids = random_ids(1, 90, seed=8)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    out = model.generate(ids, past_key_values=kvpress_rs.QuantizedKVCache(model, bits=8, **window), **kw)
    assert torch.equal(out, expected)


def test_a_sliding_window_keeps_the_newest_tokens_exact_while_decoding(llama):
    """residual_length=64, block_length=32: after the window first fills, 32..63 tokens
    stay in full precision (a whole-window flush leaves none); the bytes follow."""
    model = llama()
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=64, block_length=32)
    assert (cache.quant_config.window_tokens, cache.quant_config.block_tokens) == (64, 32)
    assert kvpress_rs.QuantizedKVCache.from_config(model, cache.quant_config).quant_config == cache.quant_config
    ids = random_ids(1, 70, seed=14)
    layer = cache.layers[0].state
    with torch.no_grad():
        model(ids, past_key_values=cache)
        window = 70 - 32  # 70 >= 64: the oldest 32 left
        stats = layer.quantized_stats()
        assert (stats["quantized_tokens"], stats["residual_tokens"]) == (32, window)
        for step in range(40):
            keys_before = layer.dequantized()[0]
            model(random_ids(1, 1, seed=100 + step), past_key_values=cache)
            window += 1
            if window == 64:
                window = 32
            stats = layer.quantized_stats()
            assert stats["residual_tokens"] == window and layer.seen == 71 + step
            assert stats["residual_tokens"] >= 32
            # blocks are append-only: what was quantized before is unchanged
            n = stats["quantized_tokens"] if window != 32 else stats["quantized_tokens"] - 32
            torch.testing.assert_close(layer.dequantized()[0][:, :, :n], keys_before[:, :, :n], rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"pre_rope_keys": True, "hadamard": True}], ids=["plain", "pre-rope"])
def test_beam_search_and_batch_operations_act_on_the_quantized_store(llama, options):
    model = llama()
    ids = random_ids(2, 70, seed=9)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    cache = kvpress_rs.QuantizedKVCache(model, bits=8, residual_length=32, **options)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    assert out.shape == expected.shape
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32, **options)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    before = cache.layers[0].state.dequantized()[0]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].state.dequantized()[0], before.flip(0))
    cache.batch_repeat_interleave(2)
    assert cache.layers[1].state.dequantized()[0].shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(cache.layers[0].state.dequantized()[0], before.flip(0))


def test_crop_within_the_residual_window(llama):
    model = llama()
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=64)
    with torch.no_grad():
        model(random_ids(1, 100), past_key_values=cache)
    cache.crop(-10) if not kvpress_rs._compat.CROP_TAKES_MAX_LENGTH else cache.crop(90)
    assert cache.get_seq_length() == 90
    with pytest.raises(kvpress_rs.CacheStateError, match="quantized"):
        cache.crop(-50) if not kvpress_rs._compat.CROP_TAKES_MAX_LENGTH else cache.crop(40)


def test_both_paths_generate_alike(llama):
    model = llama()
    ids = random_ids(1, 80, seed=10)

    def run():
        cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32, hadamard=True)
        with torch.no_grad():
            model(ids, past_key_values=cache)
            return model(random_ids(1, 3, seed=11), past_key_values=cache).logits

    rust = run()
    with ops.cpu_kernels(False):
        torch.testing.assert_close(run(), rust, rtol=0, atol=1e-4)


def test_a_cache_built_from_a_config_attends_over_dequantized_copies(llama):
    model = llama()
    ids, new = random_ids(1, 80, seed=12), random_ids(1, 2, seed=13)
    hooked = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32)
    plain = kvpress_rs.QuantizedKVCache(model.config, bits=4, residual_length=32)
    with torch.no_grad():
        model(ids, past_key_values=hooked)
        model.model(ids, past_key_values=plain)  # an inner module: no hooks act
        a = model(new, past_key_values=hooked).logits
        b = model.lm_head(model.model(new, past_key_values=plain).last_hidden_state)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits"),
        (dict(bits=1), "bits"),
        (dict(group_size=48), "group_size"),
        (dict(group_size=256), "group_size"),
        (dict(residual_length=-1), "residual_length"),
        (dict(residual_length=100), "residual_length"),
        (dict(residual_length=128, block_length=48), "block_length"),
        (dict(residual_length=64, block_length=96), "block_length"),
        (dict(block_length=0), "block_length"),
        (dict(outlier_fraction=0.5), "outlier_fraction"),
        (dict(outlier_fraction=float("nan")), "outlier_fraction"),
        (dict(sink_tokens=-2), "sink_tokens"),
        (dict(key_grouping="row"), "key_grouping"),
    ],
)
def test_bad_options_raise_invalid_argument(llama, kwargs, match):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match=match):
        kvpress_rs.QuantConfig(**kwargs)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match=match):
        kvpress_rs.QuantizedKVCache(llama(), **kwargs)


def test_options_that_do_not_fit_the_model(tiny_llama):
    small = tiny_llama()  # head_dim 16
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="group_size"):
        kvpress_rs.QuantizedKVCache(small, group_size=32)  # per-token values need 32 | head_dim
    odd = tiny_llama(hidden_size=96, num_attention_heads=2, num_key_value_heads=1)  # head_dim 48
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="hadamard"):
        kvpress_rs.QuantizedKVCache(odd, group_size=32, value_grouping="channel", hadamard=True)
    # Channel groups do not need head_dim to be a multiple of the group size.
    kvpress_rs.QuantizedKVCache(odd, key_grouping="channel", value_grouping="channel")


def test_non_finite_values_raise_and_store_nothing(llama):
    model = llama()
    cache = kvpress_rs.QuantizedKVCache(model, bits=4, residual_length=32)
    with torch.no_grad():
        model(random_ids(1, 40), past_key_values=cache)
    layer = cache.layers[0]
    bad = torch.randn(1, 2, 3, 32)
    bad[0, 1, 2, 5] = math.nan
    with pytest.raises(kvpress_rs.NonFiniteError):
        layer.update(bad, torch.randn(1, 2, 3, 32))
    bad[0, 1, 2, 5] = math.inf
    with pytest.raises(kvpress_rs.NonFiniteError):
        layer.update(torch.randn(1, 2, 3, 32), bad)
    assert layer.get_seq_length() == 40
    big = torch.full((1, 2, 32, 32), 1e6)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="float16"):
        layer.update(big, big)
    assert layer.get_seq_length() == 40


def test_quantize_errors():
    with pytest.raises(kvpress_rs.ShapeError, match="multiple of group_size"):
        ops.quantize(torch.randn(1, 1, 33, 64))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="grouping"):
        ops.quantize(torch.randn(1, 1, 32, 64), grouping="rows")
    with pytest.raises(kvpress_rs.DtypeError):
        ops.quantize(torch.zeros(1, 1, 32, 64, dtype=torch.int32))
