"""Decoding-time compression of a quantized cache
(``KVCache(model, policy, decoding_budget=N, quantization=QuantConfig(...))``).

Store level: evicting tokens keeps the kept tokens' integer codes and float16 scales/zeros
bit for bit (nothing is re-quantized), ``nbytes`` falls to the exact size of what is kept,
and attention over the store equals a plain softmax over the dequantized kept tokens (CPU
kernel and libtorch path). Cache level: the cache never holds more than budget + interval
tokens, a budget that covers everything is the same quantized cache without a budget token
for token, positions are the tokens seen (or compact with ``rerotate=True`` and pre-RoPE
keys), and what cannot work is refused naming the argument."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs._native import Press, QuantizedStore, Rope
from kvpress_rs.cache import CompressedLayer
from settings import REGISTRY

from conftest import random_ids, tiny_llama_config


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Many tiny forwards: one intra-op thread is much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (config, dtype): KIVI 4-bit; 3-bit with outliers and sinks; keys per token and values per
# channel with Hadamard; pre-RoPE keys with outliers in bf16; 8-bit, G=64, no residual window.
CONFIGS = [
    (dict(bits=4, group_size=32, residual_length=32), torch.float32),
    (dict(bits=3, group_size=32, residual_length=64, outlier_fraction=0.1, sink_tokens=4), torch.float32),
    (dict(bits=2, group_size=32, residual_length=32, key_grouping="token", value_grouping="channel", hadamard=True), torch.float32),
    (dict(bits=4, group_size=32, residual_length=32, pre_rope_keys=True, outlier_fraction=0.05), torch.bfloat16),
    (dict(bits=8, group_size=64, residual_length=0, pre_rope_keys=True), torch.float16),
]
IDS = ["kivi4", "3bit-outliers-sinks", "2bit-token-keys-hadamard", "pre-rope-bf16", "8bit-g64"]

B, H, D = 2, 3, 64


def filled_store(cfg: dict, dtype: torch.dtype, tokens: int = 200, seed: int = 0) -> QuantizedStore:
    g = torch.Generator().manual_seed(seed)
    store = QuantizedStore(kvpress_rs.QuantConfig(**cfg), Rope(D))
    keys = torch.randn(B, H, tokens, D, generator=g).to(dtype)
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    store.append(keys, torch.randn(B, H, tokens, D, generator=g).to(dtype))
    return store


def random_kept(store: QuantizedStore, n: int, seed: int = 1) -> torch.Tensor:
    """Per row, the sinks, the residual window and a random (different per row) choice of
    the quantized tokens: n in all."""
    g = torch.Generator().manual_seed(seed)
    s, r, stored = store.sink_tokens, store.residual_tokens, store.seen
    rows = []
    for _ in range(B * H):
        middle = torch.randperm(stored - s - r, generator=g)[: n - s - r].sort().values + s
        rows.append(torch.cat([torch.arange(s), middle, torch.arange(stored - r, stored)]))
    return torch.stack(rows).view(B, H, n)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (b, h, t, ...) at token indices idx (b, h, n)."""
    view = idx.view(*idx.shape, *([1] * (x.dim() - 3)))
    return x.gather(2, view.expand(*idx.shape, *x.shape[3:]))


@pytest.mark.parametrize("cfg,dtype", CONFIGS, ids=IDS)
def test_eviction_keeps_codes_and_scales_bit_for_bit(cfg, dtype):
    store = filled_store(cfg, dtype)
    keys, values = store.dequantize()
    before = store.element_codes()
    kept = random_kept(store, 120)
    s, r = store.sink_tokens, store.residual_tokens
    store.retain(kept)
    assert store.seen == 120 and store.evicted == 80 and store.blocks == 0
    after = store.element_codes()
    quantized = kept[..., s : 120 - r] - s  # the kept quantized tokens, in the old quantized region
    for (codes0, params0, out0), (codes1, params1, out1) in zip(before, after):
        assert torch.equal(take(codes0, quantized), codes1)
        # float16 scale and zero, compared as bits
        assert torch.equal(take(params0, quantized).view(torch.int16), params1.view(torch.int16))
        if out0 is None:
            assert out1 is None
            continue
        # the outliers of kept tokens, same values, re-indexed
        q0, q1 = codes0.shape[2], codes1.shape[2]
        idx0, val0 = out0
        row, t, c = idx0 // (q0 * D), (idx0 // D) % q0, idx0 % D
        new_t = torch.full((B * H, q0), -1, dtype=torch.long)
        new_t.scatter_(1, quantized.view(B * H, -1), torch.arange(quantized.shape[-1]).expand(B * H, -1))
        nt = new_t[row, t]
        keep = nt >= 0
        assert torch.equal(((row * q1 + nt) * D + c)[keep], out1[0])
        assert torch.equal(val0[keep], out1[1])
    # what attention reads: the same dequantized tokens (RoPE re-applied at their positions)
    k1, v1 = store.dequantize()
    assert torch.equal(k1, take(keys, kept)) and torch.equal(v1, take(values, kept))
    # a second eviction selects among ragged tiles the same way
    kept2 = random_kept(store, 70, seed=3)
    store.retain(kept2)
    k2, v2 = store.dequantize()
    assert torch.equal(k2, take(k1, kept2)) and torch.equal(v2, take(v1, kept2))


def expected_nbytes(cfg: dict, dtype: torch.dtype, store: QuantizedStore, kept: torch.Tensor, before) -> int:
    """The bytes of a store after `retain(kept)`, from the kept indices alone."""
    config = kvpress_rs.QuantConfig(**cfg)
    e = torch.finfo(dtype).bits // 8
    s, r = store.sink_tokens, store.residual_tokens
    n = kept.shape[-1]
    quantized = kept[..., s : n - r] - s
    k = quantized.shape[-1]
    g, bits = config.group_size, config.bits
    tiles = sum(len(set((row // g).tolist())) for row in quantized.reshape(B * H, k))
    total = B * H * config.sink_tokens * 2 * D * e if config.sink_tokens else 0
    total += B * H * r * (2 * D * e + (4 if config.pre_rope_keys else 0))
    for grouping, (_, _, outliers) in zip((config.key_grouping, config.value_grouping), before):
        total += B * H * k * D * bits // 8  # codes
        total += tiles * D * 4 if grouping == "channel" else B * H * k * (D // g) * 4  # scales/zeros
        if outliers is not None:
            q0 = before[0][0].shape[2]  # quantized tokens before the eviction
            tok = (outliers[0] // (q0 * D)) * q0 + (outliers[0] // D) % q0
            kept_flat = (torch.arange(B * H)[:, None] * q0 + quantized.reshape(B * H, k)).flatten()
            total += int(torch.isin(tok, kept_flat).sum()) * (4 + e)  # int32 index + exact value
    if config.pre_rope_keys:
        total += B * H * k * 4  # positions
    return total + tiles  # one byte per tile: its kept count


@pytest.mark.parametrize("cfg,dtype", CONFIGS, ids=IDS)
def test_nbytes_is_the_exact_size_of_the_kept_tokens(cfg, dtype):
    store = filled_store(cfg, dtype)
    before = store.element_codes()
    # the cos/sin table (pre-RoPE keys) is fixed: measure it on an empty-blocks twin
    table = 0
    if cfg.get("pre_rope_keys"):
        twin = filled_store(cfg, dtype)
        twin.retain(torch.cat([torch.arange(twin.sink_tokens), torch.arange(twin.seen - twin.residual_tokens, twin.seen)]).expand(B, H, -1).contiguous())
        table = twin.nbytes - expected_nbytes(cfg, dtype, twin, torch.zeros(B, H, 0, dtype=torch.long), before)
    kept = random_kept(store, 120)
    full = store.nbytes
    store.retain(kept)
    assert store.nbytes == expected_nbytes(cfg, dtype, store, kept, before) + table
    assert store.nbytes < full
    assert store.ragged_tiles == sum(len(set(((row[store.sink_tokens:120 - store.residual_tokens] - store.sink_tokens) // kvpress_rs.QuantConfig(**cfg).group_size).tolist())) for row in kept.view(B * H, -1))


def reference_attention(query, keys, values, scaling, causal_last: int = 0):
    """softmax(q·kᵀ·scaling)·v over (b, kv_heads, t, d) keys/values with grouped query
    heads; the last `causal_last` keys are the queries' own, causal among themselves."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(rep, 1)
    v = values.float().repeat_interleave(rep, 1)
    scores = query.float() @ k.transpose(-1, -2) * scaling
    if causal_last:
        t, q = keys.shape[2], query.shape[2]
        allowed = torch.arange(t)[None, :] <= (t - q + torch.arange(q))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "libtorch-path"])
@pytest.mark.parametrize("cfg,dtype", CONFIGS, ids=IDS)
def test_attention_after_eviction_matches_a_softmax_reference(cfg, dtype, kernels):
    store = filled_store(cfg, dtype)
    store.retain(random_kept(store, 120))
    g = torch.Generator().manual_seed(7)
    # new tokens after the eviction: a decoding step and a 5-token chunk (causal among themselves)
    for q_len in (1, 5):
        store.append(*(torch.randn(B, H, q_len, D, generator=g).to(dtype) for _ in range(2)))
        keys, values = store.dequantize()
        query = torch.randn(B, 2 * H, q_len, D, generator=g).to(dtype)
        with ops.cpu_kernels(kernels):
            out = store.attend(query, None, 0.125)
        expected = reference_attention(query, keys, values, 0.125, causal_last=q_len)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_batch_reordering_after_eviction_moves_whole_rows():
    cfg, dtype = CONFIGS[1]
    store = filled_store(cfg, dtype)
    store.retain(random_kept(store, 120))
    keys, values = store.dequantize()
    nbytes = store.nbytes
    store.index_batch(torch.tensor([1, 0]))
    k, v = store.dequantize()
    assert torch.equal(k, keys[[1, 0]]) and torch.equal(v, values[[1, 0]]) and store.nbytes == nbytes
    store.repeat_interleave_batch(2)
    k2, _ = store.dequantize()
    assert torch.equal(k2, keys[[1, 1, 0, 0]])


def test_retain_refuses_bad_indices_naming_them():
    cfg, dtype = CONFIGS[1]
    store = filled_store(cfg, dtype)
    kept = random_kept(store, 120)
    for bad in (kept.flip(-1), kept[..., 4:], kept[:1], kept.int(), kept[..., :-1]):
        with pytest.raises(kvpress_rs.errors.KVPressError, match="kept"):
            store.retain(bad)
    assert store.seen == 200  # unchanged
    press = Press("knorm")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_budget"):
        press.compress(store, kvpress_rs._native.Plan.decoding(0, n_kept=40, next_position=200, protect_last=50))


# ---------------------------------------------------------------------------------------
# Through a cache and model.generate


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # head_dim 64: per-token value groups of 32 channels
    return LlamaForCausalLM(tiny_llama_config(hidden_size=256, max_position_embeddings=4096)).eval()


def greedy(model, ids, cache, n, **kwargs):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=0, **kwargs,
    )


@pytest.fixture
def peak_stored(monkeypatch):
    """Per layer, the most tokens a CompressedLayer held while attending (after the
    append, before any compression)."""
    peaks: dict[int, int] = {}
    attend = CompressedLayer.attend

    def recording(self, *args, **kwargs):
        peaks[self.layer_idx] = max(peaks.get(self.layer_idx, 0), self.state.stored)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(CompressedLayer, "attend", recording)
    return peaks


Q4 = dict(bits=4, group_size=32, residual_length=32)


@pytest.mark.parametrize("policy", ["knorm", "snapkv", "observed_attention", "triattention", "streaming_llm", "expected_attention"])
def test_quantized_cache_never_exceeds_budget_plus_interval(policy, peak_stored):
    model = tiny()
    spec = REGISTRY[policy]
    budget, interval, prompt, new = 64, 16, 32, 300
    cache = spec.cache_class(
        model, decoding_budget=budget, decoding_interval=interval, protect_prompt=False,
        quantization=kvpress_rs.QuantConfig(**Q4), **spec.easy,
    )
    out = greedy(model, random_ids(1, prompt), cache, new)
    assert out.shape[1] == prompt + new
    assert set(peak_stored) == {0, 1, 2}
    assert max(peak_stored.values()) == budget + interval  # reached, never exceeded
    assert all(s.is_quantized and s.quantized_stats()["evicted"] > 0 for s in cache.layer_states())
    assert all(budget <= n < budget + interval for n in cache.stats()["tokens_kept"])
    assert cache.get_seq_length() == prompt + new - 1  # tokens seen: positions run on


@pytest.mark.parametrize("cfg", [Q4, dict(bits=2, group_size=32, residual_length=64, outlier_fraction=0.05, sink_tokens=4)])
def test_roomy_budget_is_the_quantized_cache_without_budget_token_for_token(cfg):
    model = tiny(seed=1)
    ids = random_ids(1, 40, seed=2)
    plain = kvpress_rs.KnormCache(model, quantization=kvpress_rs.QuantConfig(**cfg))
    roomy = kvpress_rs.KnormCache(model, decoding_budget=512, decoding_interval=64, quantization=kvpress_rs.QuantConfig(**cfg))
    assert torch.equal(greedy(model, ids, roomy, 200), greedy(model, ids, plain, 200))
    assert all(s.quantized_stats()["evicted"] == 0 for s in roomy.layer_states())


def pre_rope_layer0_keys(model, ids):
    captured = {}
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    b, t = ids.shape
    return captured["k"].view(b, t, model.config.num_key_value_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("rerotate", [False, True])
def test_positions_are_tokens_seen_or_compact_with_rerotation(rerotate):
    """StreamingLLM keeps the first n_sink and the newest tokens, so the kept original
    positions are known: 8-bit pre-RoPE codes must hold those tokens' keys rotated at their
    original positions (or at 0..stored with rerotate=True)."""
    model = tiny()
    sinks, budget, interval = 4, 64, 16
    cache = kvpress_rs.StreamingLLMCache(
        model, n_sink=sinks, decoding_budget=budget, decoding_interval=interval, rerotate=rerotate,
        quantization=kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=32, pre_rope_keys=True),
    )
    out = greedy(model, random_ids(1, 20), cache, 300)
    fed = out[:, :-1]
    length = fed.shape[1]
    stored = cache.stats()["tokens_kept"][0]
    original = torch.tensor(list(range(sinks)) + list(range(length - (stored - sinks), length)))
    pre = pre_rope_layer0_keys(model, fed)[:, :, original]
    rope = kvpress_rs.Rope.from_config(model.config)
    if rerotate:
        assert cache.get_seq_length() == stored < length
        expected = rope.apply(pre, torch.arange(stored))
    else:
        assert cache.get_seq_length() == length
        expected = rope.apply(pre, original)
    keys = cache.layers[0].keys  # dequantized
    # 8-bit codes: within a few quantization steps of the exact keys
    step = (pre.amax() - pre.amin()) / 255
    assert (keys - expected).abs().max() <= 2 * step
    # and the new tokens were rotated at the cache's positions: the residual window is exact
    n = cache.layers[0].state.quantized_stats()["residual_tokens"]
    if n:
        torch.testing.assert_close(keys[..., -n:, :], expected[..., -n:, :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["knorm", "snapkv"])
def test_block_prefill_into_a_quantized_decoding_cache(policy, peak_stored):
    model = tiny(seed=2)
    ids = random_ids(1, 150, seed=5)
    spec = REGISTRY[policy]
    make = lambda budget: spec.cache_class(  # noqa: E731
        model, decoding_budget=budget, decoding_interval=16, quantization=kvpress_rs.QuantConfig(**Q4), **spec.easy
    )
    # a budget covering the prompt: the same block forwards through the quantized cache
    # without a budget (later blocks attend over the earlier blocks' codes in both)
    plain = spec.cache_class(model, quantization=kvpress_rs.QuantConfig(**Q4), **spec.easy)
    with torch.no_grad():
        for start in range(0, 150, 32):
            expected = model(ids[:, start : start + 32], past_key_values=plain).logits[:, -1]
    got = kvpress_rs.prefill(model, ids, make(512), block_size=32).logits[:, -1]
    assert torch.equal(got, expected)
    peak_stored.clear()
    small = make(64)
    kvpress_rs.prefill(model, ids[:, :-1], small, block_size=32)  # generate feeds the last one
    assert max(peak_stored.values()) <= 64 + 32
    assert small.get_seq_length() == 149
    out = greedy(model, ids, small, 40)
    assert out.shape[1] == 190


def test_beam_search_with_a_quantized_decoding_cache(peak_stored):
    model = tiny()
    cache = kvpress_rs.SnapKVCache(
        model, window_size=8, decoding_budget=48, decoding_interval=16, quantization=kvpress_rs.QuantConfig(**Q4)
    )
    ids = random_ids(1, 20)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=80,
                         min_new_tokens=80, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 100
    assert max(peak_stored.values()) <= 64


def test_what_cannot_work_is_refused_naming_the_argument():
    model = tiny()
    q = kvpress_rs.QuantConfig(**Q4)
    with pytest.raises(kvpress_rs.UnsupportedError, match="low_bits"):
        kvpress_rs.KnormCache(model, decoding_budget=64, decoding_interval=16, quantization=q, low_bits=2)
    with pytest.raises(kvpress_rs.UnsupportedError, match="rerotate.*pre_rope_keys"):
        kvpress_rs.KnormCache(model, decoding_budget=64, decoding_interval=16, quantization=q, rerotate=True)
    with pytest.raises(kvpress_rs.UnsupportedError, match="rerotate.*sink_tokens"):
        kvpress_rs.KnormCache(model, decoding_budget=64, decoding_interval=16, rerotate=True,
                              quantization=kvpress_rs.QuantConfig(**Q4, pre_rope_keys=True, sink_tokens=4))
    # the residual window (up to window_tokens - 1 tokens) is never evicted: the budget must hold it
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_budget"):
        kvpress_rs.KnormCache(model, decoding_budget=100, decoding_interval=16,
                              quantization=kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=128))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_budget"):  # < interval, as unquantized
        kvpress_rs.KnormCache(model, decoding_budget=64, decoding_interval=128, quantization=q)


@pytest.mark.model
def test_smollm2_quantized_generation_stays_within_budget(smollm2_bf16, peak_stored):
    from kvpress_rs.data import needle_prompt

    model, tokenizer = smollm2_bf16
    ids = needle_prompt(tokenizer, context_tokens=300, depth=0.5).input_ids
    q = dict(bits=4, group_size=32, residual_length=64)
    plain = kvpress_rs.KnormCache(model, quantization=kvpress_rs.QuantConfig(**q))
    roomy = kvpress_rs.KnormCache(model, decoding_budget=1024, decoding_interval=128, quantization=kvpress_rs.QuantConfig(**q))
    assert torch.equal(greedy(model, ids, roomy, 16), greedy(model, ids, plain, 16))
    peak_stored.clear()
    budget, interval = 256, 64
    assert budget < ids.shape[1] <= budget + interval
    cache = kvpress_rs.SnapKVCache(model, decoding_budget=budget, decoding_interval=interval, quantization=kvpress_rs.QuantConfig(**q))
    out = greedy(model, ids, cache, 200)
    assert out.shape[1] == ids.shape[1] + 200
    assert max(peak_stored.values()) <= budget + interval
    assert len(peak_stored) == model.config.num_hidden_layers
    assert cache.get_seq_length() == ids.shape[1] + 199
    assert all(s.quantized_stats()["evicted"] > 0 for s in cache.layer_states())
    # the same run without quantization keeps the same number of tokens; quantized, about
    # half the bytes: 4-bit codes + float16 scales/zeros (~0.31 of bf16) for the quantized
    # tokens, and a 64-token bf16 residual window allocated whole
    dense = kvpress_rs.SnapKVCache(model, decoding_budget=budget, decoding_interval=interval)
    greedy(model, ids, dense, 200)
    assert cache.stats()["tokens_kept"] == dense.stats()["tokens_kept"]
    assert cache.nbytes < 0.55 * dense.nbytes
