"""Each query-aware scorer and budget against an independent torch reference written here
from the method's definition (and kvpress 0.5.5's dtype chain), on random and crafted
inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kvpress_rs
from kvpress_rs import ops


def rand_kv(b=1, hk=2, g=3, t=40, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hk, t, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, t, d, generator=gen).to(dtype)
    q = torch.randn(b, hk * g, t, d, generator=gen).to(dtype)
    return q, k, v


# Our q·k products sum in another order than the reference's matmul (float32 GEMM, query
# heads folded per KV head): float32 scores agree to rounding; bf16 ones, rounded after
# every step of the same chain, come out identical on these inputs.
SAME_CHAIN = {torch.float32: dict(rtol=1e-6, atol=1e-8), torch.bfloat16: dict(rtol=0, atol=0)}


def ref_window_attention(q_win, k):
    """(b, h, w, d) queries of the last w tokens over all T keys, causal, in kvpress's chain."""
    b, h, w, d = q_win.shape
    t = k.shape[2]
    g = h // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    logits = (q_win @ kk.transpose(-1, -2)) / math.sqrt(d)
    for i in range(w):
        logits[:, :, i, t - w + i + 1 :] = float("-inf")
    return torch.softmax(logits.float(), dim=-1).to(q_win.dtype)


def ref_snapkv(q, k, window, kernel):
    t, hk = k.shape[2], k.shape[1]
    attn = ref_window_attention(q[:, :, -window:], k)[..., : t - window]
    m = attn.mean(dim=2)
    pooled = F.avg_pool1d(m, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    b, h, n = pooled.shape
    scores = pooled.view(b, hk, h // hk, n).mean(2)
    top = scores.max().item() + 1
    return torch.cat([scores, torch.full((b, hk, window), top, dtype=scores.dtype)], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,kernel", [(8, 5), (4, 3), (1, 1)])
def test_snapkv_scores_match_the_reference(dtype, window, kernel):
    q, k, v = rand_kv(dtype=dtype)
    ours = ops.score("snapkv", k, v, q, window_size=window, kernel_size=kernel)
    torch.testing.assert_close(ours.float(), ref_snapkv(q, k, window, kernel).float(), **SAME_CHAIN[dtype])
    kept = ops.kept_indices("snapkv", k, v, q, compression_ratio=0.5, window_size=window, kernel_size=kernel)
    # the window is always kept
    assert set(range(40 - window, 40)) <= set(kept[0, 0].tolist())


def test_snapkv_must_keep_a_token_the_window_attends_to():
    q, k, v = rand_kv(t=50, seed=1)
    q[:, :, -8:] = q[:, :, -8:].abs()
    k[0, 1, 12] = 50.0  # every window query (positive entries) attends to token 12 of head 1
    kept = ops.kept_indices("snapkv", k, v, q, max_tokens=9, window_size=8, kernel_size=1)
    assert 12 in kept[0, 1].tolist() and 12 not in kept[0, 0].tolist()
    # pooling spreads the score over the kernel's neighbourhood: all 5 of them are kept
    kept = ops.kept_indices("snapkv", k, v, q, max_tokens=13, window_size=8, kernel_size=5)
    assert set(range(10, 15)) <= set(kept[0, 1].tolist())


def test_tova_scores_match_the_reference():
    q, k, v = rand_kv(t=30, seed=2)
    attn = ref_window_attention(q[:, :, -1:], k)[..., :-1]  # (b, h, 1, t-1)
    shared = attn.mean(dim=1)  # (b, 1, t-1)
    expected = torch.cat([shared.expand(1, 2, 29), torch.full((1, 2, 1), shared.max().item() + 1)], dim=-1)
    torch.testing.assert_close(ops.score("tova", k, v, q), expected, **SAME_CHAIN[torch.float32])
    kept = ops.kept_indices("tova", k, v, q, compression_ratio=0.5)
    assert torch.equal(kept[0, 0], kept[0, 1]) and kept[0, 0, -1] == 29


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk", [512, 7])
def test_observed_attention_matches_eager_weights(dtype, tol, chunk):
    q, k, v = rand_kv(t=33, dtype=dtype, seed=3)
    t, d = 33, 16
    kk = k.repeat_interleave(3, dim=1)
    logits = (q @ kk.transpose(-1, -2)) * d**-0.5
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)  # eager attention
    received = weights.sum(dim=2)
    per_head = received / torch.arange(t, 0, -1).to(dtype)
    expected = per_head.view(1, 2, 3, t).mean(2)
    ours = ops.score("observed_attention", k, v, q, chunk_size=chunk)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=tol, atol=tol)


def test_observed_attention_keeps_a_crafted_heavy_hitter():
    q, k, v = rand_kv(t=40, seed=4)
    q = q.abs()
    k[0, 0, 5] = 30.0  # every later query of head 0's group attends to token 5
    kept = ops.kept_indices("observed_attention", k, v, q, max_tokens=3)
    assert 5 in kept[0, 0].tolist()


def test_keydiff_matches_the_reference_and_keeps_an_outlier():
    _, k, v = rand_kv(t=30, seed=5)
    anchor = F.normalize(k, p=2, dim=-1).mean(dim=2, keepdim=True)
    expected = -F.cosine_similarity(k, anchor, dim=-1)
    torch.testing.assert_close(ops.score("keydiff", k, v), expected, rtol=1e-6, atol=1e-6)
    k2 = torch.ones(1, 1, 20, 8) + 0.01 * torch.randn(1, 1, 20, 8)
    k2[0, 0, 7] = -1.0  # the one key pointing away from all others
    assert 7 in ops.kept_indices("keydiff", k2, max_tokens=1)[0, 0].tolist()


def ref_lagkv(k, v, n_sink, lag):
    b, h, t, d = k.shape
    end = n_sink + (t - n_sink) // lag * lag
    parts = (end - n_sink) // lag

    def part_scores(x):
        blocks = x[:, :, n_sink:end].reshape(b, h, parts, lag, d)
        cur, ref = blocks[:, :, :-1], blocks[:, :, 1:]
        lo, hi = ref.min(dim=-2, keepdim=True).values, ref.max(dim=-2, keepdim=True).values
        return torch.softmax(((cur - lo) / (hi - lo)).std(dim=-1), dim=-1)

    s = (part_scores(k) + part_scores(v)) / 2
    ranks = s.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(k.dtype) / lag
    return torch.cat([torch.ones(b, h, n_sink), ranks.reshape(b, h, -1), torch.ones(b, h, lag + t - end)], dim=-1)


def test_lagkv_matches_the_reference():
    _, k, v = rand_kv(t=45, seed=6)
    torch.testing.assert_close(ops.score("lagkv", k, v, n_sink=4, lag_size=8), ref_lagkv(k, v, 4, 8), rtol=0, atol=0)
    # short prompts: sinks plus a ramp that keeps the most recent tokens
    _, k, v = rand_kv(t=12, seed=7)
    kept = ops.kept_indices("lagkv", k, v, max_tokens=7, n_sink=4, lag_size=8)
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 9, 10, 11]


@pytest.mark.parametrize(
    "t,r,layers,first,last,total",
    [(4096, 0.5, 32, 3994, 102, 65536), (2048, 0.5, 32, 1984, 64, 32768), (4096, 0.25, 28, 4032, 2112, 86016)],
)
def test_pyramid_budgets_follow_pyramidkv(t, r, layers, first, last, total):
    press = kvpress_rs._native.Press(
        "snapkv", compression_ratio=r, layer_budget="pyramid", n_layers=layers, window_size=64
    )
    budgets = [press.n_kept(t, layer) for layer in range(layers)]
    assert (budgets[0], budgets[-1], sum(budgets)) == (first, last, total)
    assert budgets == sorted(budgets, reverse=True)


def test_pyramid_falls_back_to_uniform_when_it_cannot_fit():
    press = kvpress_rs._native.Press("snapkv", compression_ratio=0.75, layer_budget="pyramid", n_layers=32)
    assert {press.n_kept(4096, layer) for layer in range(32)} == {1024}


def ref_adakv(scores, n_kept, alpha):
    """Safeguard per head, then the best remaining scores across the layer's heads."""
    b, h, t = scores.shape
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    rows = []
    for i in range(b):
        s = scores[i].double().clone()
        if n_safe:
            safe = s.topk(n_safe, dim=-1).indices
            s.scatter_(1, safe, float("inf"))
        order = sorted(range(h * t), key=lambda f: (-s.view(-1)[f].item(), f))[: h * n_kept]
        for head in range(h):
            rows.append(torch.tensor(sorted(f % t for f in order if f // t == head)))
    return rows


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adakv_split_matches_the_reference(alpha):
    q, k, v = rand_kv(b=2, hk=4, g=2, t=30, seed=8)
    # make heads very different so that the split is uneven
    k[:, 0] *= 4.0
    scores = ops.score("knorm", k, v)
    expected = ref_adakv(scores, 12, alpha)
    rows = ops.kept_indices("knorm", k, v, max_tokens=12, head_budget="adakv", alpha_safeguard=alpha)
    assert len(rows) == 8 and all(torch.equal(a, b) for a, b in zip(rows, expected))
    counts = [len(r) for r in rows]
    assert sum(counts[:4]) == sum(counts[4:]) == 48
    if alpha == 1.0:
        assert counts == [12] * 8
    elif alpha == 0.2:
        assert min(counts) >= 2 and len(set(counts)) > 1


def test_query_policies_need_queries():
    _, k, v = rand_kv()
    for policy in ["snapkv", "tova", "observed_attention"]:
        with pytest.raises(kvpress_rs.InvalidArgumentError, match="queries"):
            ops.score(policy, k, v, window_size=4) if policy == "snapkv" else ops.score(policy, k, v)
    q, k, v = rand_kv(t=10)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="window"):
        ops.score("snapkv", k, v, q, window_size=10)
    with pytest.raises(kvpress_rs.ShapeError, match="queries"):
        ops.score("snapkv", k, v, q[:, :5], window_size=4)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="kernel_size"):
        ops.score("snapkv", k, v, q, window_size=4, kernel_size=4)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="window_sizee"):
        ops.score("snapkv", k, v, q, window_sizee=4)


def test_cake_indicator_and_preference_match_the_reference():
    q, k, v = rand_kv(t=40, seed=9)
    w, gamma = 8, 200.0
    attn = ref_window_attention(q[:, :, -w:], k)[..., : 40 - w]
    indicator = attn.mean(dim=2) + gamma * attn.var(dim=2)
    pooled = F.avg_pool1d(indicator, kernel_size=5, stride=1, padding=2, count_include_pad=True)
    grouped = pooled.view(1, 2, 3, -1).mean(2)
    expected = torch.cat([grouped, torch.full((1, 2, w), grouped.max().item() + 1)], dim=-1)
    ours = ops.score("cake", k, v, q, window_size=w, gamma=gamma)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_cake_layer_budget_splits_the_total_by_preference(tiny_llama):
    """Layers whose window attention is more dispersed and shifting keep more; the total
    is the requested one; the preference follows dispersion^(1/tau1) * shift^(1/tau2)."""
    from conftest import random_ids

    model = tiny_llama(num_hidden_layers=4)
    ids = random_ids(1, 60)
    cache = kvpress_rs.CAKECache(model, compression_ratio=0.5, window_size=8, tau1=1.6, tau2=0.6)

    with torch.no_grad():
        model(ids, past_key_values=cache)
    kept = cache.stats()["tokens_kept"]
    assert sum(kept) == 4 * 30 and all(8 <= n <= 60 for n in kept)
    assert len(set(kept)) > 1  # random layers differ in preference
    # the allocation itself: proportional to the preferences, exact total, within [floor, T]
    press = cache.press
    assert press.allocate([60, 60, 60, 60], [1.0, 1.0, 1.0, 1.0]) == [30, 30, 30, 30]
    # shares 90/30/0/0 -> layer 0 capped at 60 (T), layers 2-3 raised to the floor 8 (the
    # window); the missing 14 tokens are spread evenly over the layers below their cap,
    # whole tokens going first to the layers with more preference: 30+5, 8+5, 8+4.
    assert press.allocate([60, 60, 60, 60], [3.0, 1.0, 0.0, 0.0]) == [60, 35, 13, 12]
    assert press.allocate([60, 60, 60, 60], [0.0, 0.0, 0.0, 0.0]) == [30, 30, 30, 30]


@pytest.mark.parametrize("policy", ["knorm", "streaming_llm", "snapkv", "tova", "keydiff", "lagkv", "observed_attention"])
@pytest.mark.parametrize("layer_budget", ["uniform", "pyramid", "cake"])
@pytest.mark.parametrize("head_budget", ["uniform", "adakv"])
def test_any_scorer_with_any_budget(tiny_llama, policy, layer_budget, head_budget):
    from conftest import random_ids

    model = tiny_llama()
    params = {"snapkv": {"window_size": 4}, "lagkv": {"lag_size": 8}}.get(policy, {})
    cache = kvpress_rs.KVCache(
        model, policy, compression_ratio=0.5, layer_budget=layer_budget, head_budget=head_budget,
        cake_window=4, **params,
    ) if layer_budget == "cake" else kvpress_rs.KVCache(
        model, policy, compression_ratio=0.5, layer_budget=layer_budget, head_budget=head_budget, **params,
    )
    ids = random_ids(1, 40)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 44)
    rows = cache.stats()["tokens_kept_per_row"]
    # 40 prompt tokens halved on average per layer, plus the 3 generated tokens fed back
    total = sum(sum(r) for r in rows)
    assert total == 3 * 2 * (20 + 3) or layer_budget == "pyramid"
    if layer_budget == "pyramid":
        per_layer = [cache.press.n_kept(40, layer) for layer in range(3)]
        assert total == 2 * sum(n + 3 for n in per_layer)


def _rope_and_queries(seed=10, t=40, rope_scaling=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                         max_position_embeddings=256, rope_scaling=rope_scaling)
    rope = kvpress_rs.Rope.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    pre_q = torch.randn(1, 6, t, 16, generator=gen) + 0.5  # concentrated around a center
    keys = rope.apply(torch.randn(1, 2, t, 16, generator=gen), torch.arange(t))
    values = torch.randn(1, 2, t, 16, generator=gen)
    return config, rope, pre_q, rope.apply(pre_q, torch.arange(t)), keys, values, LlamaRotaryEmbedding(config)


def test_expected_attention_matches_the_reference():
    config, rope, pre_q, q, k, v, rotary = _rope_and_queries()
    t, n_sink, n_future, d = 40, 4, 16, 16
    x = pre_q[:, :, n_sink:]
    mu = x.mean(dim=2)
    cov = torch.einsum("bhti,bhtj->bhij", x - mu[:, :, None], x - mu[:, :, None]) / (t - n_sink)
    # averaged rotation from transformers' own cos/sin at the future positions
    cos, sin = rotary(x, torch.arange(t, t + n_future)[None])
    c, s = cos[0].mean(0), sin[0].mean(0)
    eye = torch.eye(d)
    rot_half = torch.cat([-eye[:, d // 2 :], eye[:, : d // 2]], dim=1)  # x @ rot_half = rotate_half(x)
    r_bar = (torch.diag(c) + rot_half.T @ torch.diag(s)).T  # R̄ x = c ⊙ x + s ⊙ rotate_half(x)
    r_bar = torch.diag(c) + torch.diag(s) @ rot_half.T
    mu_f = mu @ r_bar.T
    cov_f = r_bar @ cov @ r_bar.T
    kk = k[:, :, n_sink:].repeat_interleave(3, dim=1)
    z = (kk @ mu_f[..., None])[..., 0] / math.sqrt(d) + torch.einsum("bhti,bhij,bhtj->bht", kk, cov_f, kk) / (2 * d)
    a = torch.softmax(z, dim=-1).view(1, 2, 3, -1).mean(2) * v[:, :, n_sink:].norm(dim=-1)
    expected = torch.cat([torch.full((1, 2, n_sink), a.max().item() + 1), a], dim=-1)
    ours = ops.score("expected_attention", k, v, q, rope=rope, n_future_positions=n_future, n_sink=n_sink)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_triattention_matches_the_series_over_distances(rope_scaling):
    """The reference evaluates the paper's series directly: every key un-rotated to its
    pre-RoPE value, then Σ_f |q̄_f||k_f| cos(ω_f (t0 − p + δ) + φ_f) averaged over δ, plus
    the norm term — in float64, key by key."""
    config, rope, pre_q, q, k, v, _ = _rope_and_queries(seed=11, rope_scaling=rope_scaling)
    t, n_off, f = 40, 5, 8
    omega = rope.inv_freq(t).double()
    s = rope.attention_scaling
    pre_k = rope.invert(k, torch.arange(t)).double()
    qc = torch.complex(pre_q[..., :f].double(), pre_q[..., f:].double())  # (1, 6, t, F)
    center, magnitude = qc.mean(dim=2), qc.abs().mean(dim=2)
    kc = torch.complex(pre_k[..., :f], pre_k[..., f:]).repeat_interleave(3, dim=1)  # (1, 6, t, F)
    dist = (t - torch.arange(t).double())[:, None] + torch.tensor([2.0**i for i in range(n_off)])  # (t, δ)
    phase = torch.angle(center[:, :, None, :] * kc.conj())  # (1, 6, t, F)
    amp = center.abs()[:, :, None, :] * kc.abs()
    series = (amp[..., None] * torch.cos(omega[:, None] * dist[:, None, :] + phase[..., None])).sum(-2).mean(-1)
    norm = ((magnitude - center.abs())[:, :, None, :] * kc.abs()).sum(-1)
    per_head = (series + norm) * s**2  # the same up to the global factor s²
    z = (per_head - per_head.mean(-1, keepdim=True)) / per_head.std(-1, unbiased=False, keepdim=True)
    expected = z.view(1, 2, 3, t).amax(dim=2)
    ours = ops.score("triattention", k, v, q, rope=rope, n_offsets=n_off)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


def test_triattention_keeps_the_key_aligned_with_the_query_center():
    """Crafted: among tiny keys, one key equal to the queries' pre-RoPE center and one
    opposite to it, at neighbouring recent positions: the series (cos of the phase
    difference) must rank the aligned key first — a check of the sign conventions."""
    _, rope, _, _, _, v, _ = _rope_and_queries(seed=12)
    t = 40
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(16, generator=gen)
    pre_q = base.expand(1, 6, t, 16) + 0.01 * torch.randn(1, 6, t, 16, generator=gen)
    pre_k = 0.01 * torch.randn(1, 2, t, 16, generator=gen)
    pre_k[:, :, 38], pre_k[:, :, 39] = base, -base
    q, k = rope.apply(pre_q, torch.arange(t)), rope.apply(pre_k, torch.arange(t))
    for n_offsets in (1, 4):
        kept = ops.kept_indices("triattention", k, v, q, rope=rope, max_tokens=1, n_offsets=n_offsets)
        assert kept[0, :, 0].tolist() == [38, 38]


def ref_snapkv_rank_pooled(q_win, k, window, kernel, previous):
    """SnapKV during generation with rank pooling, from its definition: the window's mean
    attention averaged over each KV head's group, then pooled over an order made of the
    first m tokens by decreasing ``previous`` score (stable: ties in position order) and the
    tokens after them in position order. Scores of the t − window tokens before the window."""
    t, hk = k.shape[2], k.shape[1]
    attn = ref_window_attention(q_win, k)[..., : t - window]
    m = attn.mean(dim=2)
    b, h, n = m.shape
    scores = m.view(b, hk, h // hk, n).mean(2)
    order = torch.arange(n).expand(b, hk, n).clone()
    if previous is not None:
        r = min(previous.shape[-1], n)
        order[..., :r] = previous[..., :r].float().sort(dim=-1, descending=True, stable=True).indices
    pooled = F.avg_pool1d(scores.gather(-1, order), kernel_size=kernel, stride=1, padding=kernel // 2,
                          count_include_pad=True)
    return torch.empty_like(scores).scatter_(-1, order, pooled)


def ref_decoding_keep(scores, window, n_kept, protect_last):
    """Top n_kept with the window and the last protect_last stored tokens always kept."""
    b, hk, _ = scores.shape
    ranked = torch.cat([scores, torch.full((b, hk, window), float("inf"))], dim=-1)
    ranked[..., ranked.shape[-1] - protect_last :] = float("inf")
    return ranked.topk(n_kept, dim=-1).indices.sort(dim=-1).values


def test_snapkv_decoding_compressions_pool_over_the_previous_ranking_as_the_reference():
    window, kernel, n_kept, protect = 8, 7, 40, 16
    press = kvpress_rs._native.Press("snapkv", window_size=window, decoding_kernel_size=kernel)
    assert press.remembers_scores
    q, k, v = rand_kv(b=2, hk=2, g=2, t=60, seed=3)
    store = kvpress_rs._native.LayerStore()
    store.append(k, v)
    q1 = q[:, :, -window:]
    # first compression: no ranking yet, pooled over positions
    plan = kvpress_rs._native.Plan.decoding
    done = press.compress(store, plan(0, n_kept=n_kept, next_position=60, queries=q1, protect_last=protect))
    evicted, remembered = done.evicted, done.kept_scores
    s1 = ref_snapkv_rank_pooled(q1, k, window, kernel, None)
    kept1 = ref_decoding_keep(s1, window, n_kept, protect)
    assert evicted and torch.equal(store.kept_positions(), kept1)
    unranked = torch.cat([s1, torch.full((2, 2, window), float("-inf"))], dim=-1)
    torch.testing.assert_close(remembered, unranked.gather(-1, kept1), rtol=1e-5, atol=1e-8)
    # 20 more tokens, then a compression that pools over that ranking
    _, k2, v2 = rand_kv(b=2, hk=2, g=2, t=20, seed=4)
    store.append(k2, v2)
    stored_keys, positions = store.keys().clone(), store.kept_positions().clone()
    q2 = rand_kv(b=2, hk=2, g=2, t=window, seed=5)[0]
    evicted = press.compress(store, plan(0, n_kept=n_kept, next_position=80, queries=q2, protect_last=protect,
                                         previous_scores=remembered)).evicted
    s2 = ref_snapkv_rank_pooled(q2, stored_keys, window, kernel, remembered)
    expected = positions.gather(-1, ref_decoding_keep(s2, window, n_kept, protect))
    assert evicted and torch.equal(store.kept_positions(), expected)
    # pooled over positions instead (no previous scores), it keeps other tokens
    twin = kvpress_rs._native.LayerStore()
    twin.append(stored_keys, stored_keys)
    press.compress(twin, plan(0, n_kept=n_kept, next_position=60, queries=q2, protect_last=protect))
    by_position = ref_decoding_keep(ref_snapkv_rank_pooled(q2, stored_keys, window, kernel, None), window, n_kept, protect)
    assert torch.equal(twin.kept_positions(), by_position)
    assert not torch.equal(by_position, ref_decoding_keep(s2, window, n_kept, protect))
