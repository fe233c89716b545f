"""The drop-in caches inside real transformers forwards and generate(), on tiny random
Llama models. Every policy of the registry runs through every generic test."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from settings import REGISTRY

from conftest import random_ids

POLICIES = list(REGISTRY)


def make_cache(model, policy: str, hard: bool = False, **budget):
    spec = REGISTRY[policy]
    return spec.cache_class(model, **budget, **(spec.hard if hard else spec.easy))


def greedy(model, ids, cache, n=12):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=0,
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_ratio_zero_reproduces_dynamic_cache(tiny_llama, policy, attn, dtype, batch):
    model = tiny_llama(dtype=dtype, attn=attn)
    ids = random_ids(batch, 37)
    expected = greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(greedy(model, ids, make_cache(model, policy, compression_ratio=0.0)), expected)


def assert_budget_kept(cache, n_tokens, batch, kv_heads):
    """Each layer keeps press.n_kept(T, layer) per head; with AdaKV that is the mean over
    the layer's heads (per batch row); positions are ascending and within the prompt."""
    press = cache.press
    n_layers = len(cache.layers)
    if press.layer_budget == "cake":  # split by preference: the total is the requested one
        per_layer = [cache.layers[layer].state.lengths()[0] for layer in range(n_layers)]
        assert sum(per_layer) == n_layers * press.n_kept(n_tokens)
    else:
        per_layer = [press.n_kept(n_tokens, layer) for layer in range(n_layers)]
    for layer in range(n_layers):
        expected = per_layer[layer]
        lengths = cache.layers[layer].state.lengths()
        assert len(lengths) == batch * kv_heads
        if press.head_budget == "adakv":
            for b in range(batch):
                row = lengths[b * kv_heads : (b + 1) * kv_heads]
                assert sum(row) == kv_heads * expected and min(row) >= max(1, int(expected * 0.2))
            per_head = cache.kept_positions(layer)
            flat = [p for h in per_head for p in (h if isinstance(h, list) else list(h))]
        else:
            assert lengths == [expected] * (batch * kv_heads)
            pos = cache.kept_positions(layer)
            assert pos.shape == (batch, kv_heads, expected)
            flat = list(pos.reshape(-1, expected))
        for p in flat:
            assert bool((p[1:] > p[:-1]).all()) and int(p.min()) >= 0 and int(p.max()) < n_tokens


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_each_layer_and_head_keeps_its_budget(tiny_llama, policy, ratio):
    model = tiny_llama()
    ids = random_ids(2, 53)
    cache = make_cache(model, policy, hard=True, compression_ratio=ratio)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert cache.get_seq_length() == 53
    assert_budget_kept(cache, 53, batch=2, kv_heads=2)
    n_kept = int(53 * (1 - ratio))
    if cache.press.layer_budget == "uniform":
        assert all(cache.press.n_kept(53, layer) == n_kept for layer in range(3))
    else:  # the mean over layers is the requested budget, up to rounding
        assert abs(sum(cache.press.n_kept(53, layer) for layer in range(3)) / 3 - n_kept) <= 1


@pytest.mark.parametrize("policy", POLICIES)
def test_max_tokens_is_a_fixed_per_layer_budget(tiny_llama, policy):
    model = tiny_llama()
    cache = make_cache(model, policy, max_tokens=10)
    with torch.no_grad():
        model(random_ids(1, 40), past_key_values=cache)
    assert_budget_kept(cache, 40, batch=1, kv_heads=2)
    if cache.press.layer_budget == "uniform":
        assert cache.stats()["tokens_kept"] == [10, 10, 10]


def capture_prefill_keys(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_knorm_cache_keeps_what_an_independent_reference_keeps(tiny_llama):
    model = tiny_llama()
    ids = random_ids(2, 48)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for layer, (keys, values) in enumerate(capture_prefill_keys(model, ids)):
        expected = (-keys.float().norm(dim=-1)).topk(24, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(cache.kept_positions(layer), expected)
        gathered = keys.gather(2, expected[..., None].expand(-1, -1, -1, keys.shape[-1]))
        assert torch.equal(cache.layers[layer].keys, gathered)
        assert torch.equal(cache.layers[layer].values, values.gather(2, expected[..., None].expand(-1, -1, -1, 16)))


def test_streaming_cache_keeps_sinks_and_recent_tokens(tiny_llama):
    model = tiny_llama()
    cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5, n_sink=4)
    with torch.no_grad():
        model(random_ids(1, 40), past_key_values=cache)
    expected = list(range(4)) + list(range(24, 40))
    for layer in range(3):
        assert cache.kept_positions(layer)[0, 1].tolist() == expected


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_chunk_after_compression_is_causal(tiny_llama, policy, attn):
    """Feeding a question in one forward equals feeding it token by token through an
    identically compressed cache: the chunk never sees its own future tokens."""
    model = tiny_llama(attn=attn)
    context, question = random_ids(2, 40, seed=1), random_ids(2, 6, seed=2)
    chunk_cache = make_cache(model, policy, compression_ratio=0.5)
    step_cache = make_cache(model, policy, compression_ratio=0.5)
    with torch.no_grad():
        model(context, past_key_values=chunk_cache)
        model(context, past_key_values=step_cache)
        chunk_logits = model(question, past_key_values=chunk_cache).logits
        step_logits = torch.cat(
            [model(question[:, i : i + 1], past_key_values=step_cache).logits for i in range(question.shape[1])], dim=1
        )
    torch.testing.assert_close(chunk_logits, step_logits, rtol=1e-4, atol=1e-4)
    assert chunk_cache.get_seq_length() == step_cache.get_seq_length() == 46
    assert chunk_cache.stats()["tokens_kept"] == step_cache.stats()["tokens_kept"]
    assert chunk_cache.stats()["tokens_kept_per_row"] == step_cache.stats()["tokens_kept_per_row"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_continues_at_the_position_of_tokens_seen(tiny_llama, attn):
    """After eviction the next token sits at position = tokens seen: its logits equal those
    of a plain DynamicCache holding exactly the kept keys/values and fed with explicit
    position_ids = tokens seen."""
    model = tiny_llama(attn=attn)
    ids = random_ids(1, 50, seed=3)
    nxt = random_ids(1, 1, seed=4)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.6)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        kept_positions = [cache.kept_positions(layer) for layer in range(3)]
        ours = model(nxt, past_key_values=cache).logits

        full = capture_prefill_keys(model, ids)
        ref = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(full):
            kept = kept_positions[layer][..., None]
            ref.update(k.gather(2, kept.expand(-1, -1, -1, 16)), v.gather(2, kept.expand(-1, -1, -1, 16)), layer)
        n_stored = ref.get_seq_length()
        theirs = model(
            nxt, past_key_values=ref, position_ids=torch.tensor([[50]]),
            attention_mask=torch.ones(1, n_stored + 1, dtype=torch.long),
        ).logits
        wrong = model(
            nxt, past_key_values=DynamicCache(config=model.config), position_ids=torch.tensor([[n_stored]]),
        ).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, wrong, atol=1e-3)


def test_context_then_generate_with_question_appends_the_question_uncompressed(tiny_llama):
    model = tiny_llama()
    context, question = random_ids(1, 40, seed=5), random_ids(1, 7, seed=6)
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(context, past_key_values=cache)
    out = greedy(model, torch.cat([context, question], dim=1), cache, n=5)
    assert out.shape[1] == 52
    # 20 kept context tokens + 7 question tokens + 4 generated tokens fed back
    assert cache.stats()["tokens_kept"] == [31, 31, 31] and cache.get_seq_length() == 51
    positions = cache.kept_positions(0)[0, 0].tolist()
    assert positions[-11:] == list(range(40, 51))


def test_reuse_for_an_unrelated_prompt_needs_reset(tiny_llama):
    model = tiny_llama()
    cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5)
    greedy(model, random_ids(1, 30, seed=7), cache, n=3)
    with pytest.raises(kvpress_rs.CacheStateError, match="reset"):
        greedy(model, random_ids(1, 30, seed=8), cache, n=3)
    with pytest.raises(kvpress_rs.CacheStateError, match="reset"):
        greedy(model, random_ids(1, 10, seed=8), cache, n=3)
    with pytest.raises(kvpress_rs.CacheStateError, match="reset"):
        greedy(model, random_ids(2, 60, seed=8), cache, n=3)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    fresh = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5)
    ids = random_ids(1, 30, seed=8)
    assert torch.equal(greedy(model, ids, cache, n=3), greedy(model, ids, fresh, n=3))


def test_nbytes_is_exact_after_prefill(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    full, half = kvpress_rs.KnormCache(model, compression_ratio=0.0), kvpress_rs.KnormCache(model, compression_ratio=0.5)
    ids = random_ids(1, 64)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=half)
    per_token = 2 * 2 * 16 * 2  # keys + values, 2 kv heads, head_dim 16, bf16
    assert full.nbytes == 3 * 64 * per_token
    positions = 2 * 32 * 4  # int32 kept positions per (head, token)
    assert half.nbytes == 3 * (32 * per_token + positions)


def test_beam_search_reorders_the_compressed_cache(tiny_llama):
    model = tiny_llama()
    ids = random_ids(1, 30, seed=9)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(model.generate(ids, past_key_values=kvpress_rs.KnormCache(model, compression_ratio=0.0), **kwargs), expected)
    out = model.generate(ids, past_key_values=kvpress_rs.KnormCache(model, compression_ratio=0.5), **kwargs)
    assert out.shape == expected.shape


def test_crop_removes_the_last_tokens(tiny_llama):
    model = tiny_llama()
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(random_ids(1, 40), past_key_values=cache)
        model(random_ids(1, 5, seed=1), past_key_values=cache)
    before = cache.layers[0].keys[:, :, :-3].clone()
    cache.crop(-3) if not kvpress_rs._compat.CROP_TAKES_MAX_LENGTH else cache.crop(42)
    assert cache.get_seq_length() == 42 and cache.stats()["tokens_kept"] == [22, 22, 22]
    assert torch.equal(cache.layers[0].keys, before)


def test_attention_is_routed_once_and_plain_caches_are_unaffected(tiny_llama):
    """The model's attention goes through kvpress_rs for good (nothing switched per forward,
    so threads may share the model); forwards with a plain DynamicCache delegate to the
    model's own attention and give exactly its logits, also after a failed forward."""
    from kvpress_rs import attention

    model = tiny_llama(attn="eager")
    ids = random_ids(1, 20)
    with torch.no_grad():
        plain = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    assert model.config._attn_implementation == "kvpress_rs_eager"
    attended = []
    original = type(cache.layers[0]).attend

    def recording(self, *args, **kwargs):
        attended.append(self.layer_idx)
        return original(self, *args, **kwargs)

    type(cache.layers[0]).attend = recording
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache)
            again = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    finally:
        type(cache.layers[0]).attend = original
    assert attended == [0, 1, 2]  # our cache's layers attended; the DynamicCache's did not
    assert torch.equal(again, plain) and attention.active_cache() is None
    bad = kvpress_rs.KnormCache(model, compression_ratio=0.99)
    with pytest.raises(kvpress_rs.InvalidArgumentError):
        with torch.no_grad():
            model(ids, past_key_values=bad)
    assert attention.active_cache() is None
    with torch.no_grad():
        assert torch.equal(model(ids, past_key_values=DynamicCache(config=model.config)).logits, plain)


def test_cache_built_from_a_config_compresses_without_hooks(tiny_llama):
    model = tiny_llama()
    ids = random_ids(1, 40)
    from_config = kvpress_rs.KnormCache(model.config, compression_ratio=0.5)
    from_model = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        a = model(ids, past_key_values=from_config).logits
        b = model(ids, past_key_values=from_model).logits
    assert torch.equal(a, b)
    assert from_config.stats()["tokens_kept"] == from_model.stats()["tokens_kept"] == [20, 20, 20]
    assert all(torch.equal(from_config.kept_positions(i), from_model.kept_positions(i)) for i in range(3))
