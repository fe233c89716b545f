"""Decoding-time compression (``decoding_budget=``) and block-wise prefill
(``kvpress_rs.prefill``): the cache stays within budget + interval at every step, a budget
that covers everything is DynamicCache token for token, positions stay those of the tokens
seen (or compact ones with ``rerotate=True``), and bad arguments raise naming themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import kvpress_rs
from kvpress_rs.cache import CompressedLayer
from settings import REGISTRY

from conftest import random_ids, tiny_llama_config

# AdaKV's ragged rows are not re-scored during generation (refused, tested below)
POLICIES = [name for name in REGISTRY if name != "adakv"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Thousands of tiny forwards: one intra-op thread is ~30x faster than two on a busy
    2-core machine (thread hand-off dominates a 64-wide matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    overrides.setdefault("max_position_embeddings", 4096)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def greedy(model, ids, cache, n, **kwargs):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=0, **kwargs,
    )


@pytest.fixture
def peak_stored(monkeypatch):
    """Records, per layer, the most tokens a CompressedLayer held while attending (the
    moment it holds the most: after the append, before any compression)."""
    peaks: dict[int, int] = {}
    attend = CompressedLayer.attend

    def recording(self, *args, **kwargs):
        peaks[self.layer_idx] = max(peaks.get(self.layer_idx, 0), self.state.stored)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(CompressedLayer, "attend", recording)
    return peaks


# 2K-token generations for one policy of each kind (keys only, a query window, every
# query since the last compression, query statistics); 300 tokens for every policy.
LONG = {"knorm": 2000, "snapkv": 2000, "observed_attention": 2000, "triattention": 2000}


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_never_exceeds_budget_plus_interval_during_generation(policy, peak_stored):
    model = tiny()
    spec = REGISTRY[policy]
    budget, interval, prompt, new = 64, 16, 32, LONG.get(policy, 300)
    cache = spec.cache_class(model, decoding_budget=budget, decoding_interval=interval, protect_prompt=False, **spec.easy)
    out = greedy(model, random_ids(1, prompt), cache, new)
    assert out.shape[1] == prompt + new
    assert set(peak_stored) == {0, 1, 2}
    assert max(peak_stored.values()) == budget + interval  # reached, never exceeded
    kept = cache.stats()["tokens_kept"]
    assert all(budget <= n < budget + interval for n in kept)
    assert cache.get_seq_length() == prompt + new - 1  # tokens seen (the last token is not fed)


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_everything_is_dynamic_cache_token_for_token(policy):
    model = tiny(seed=1)
    ids = random_ids(2, 24, seed=3)
    expected = greedy(model, ids, DynamicCache(config=model.config), 40)
    spec = REGISTRY[policy]
    cache = spec.cache_class(model, decoding_budget=64, decoding_interval=16, **spec.easy)
    assert torch.equal(greedy(model, ids, cache, 40), expected)
    assert cache.stats()["tokens_kept"] == [63] * 3


def test_decoding_ratio_keeps_a_fraction_of_the_tokens_seen(peak_stored):
    model = tiny()
    cache = kvpress_rs.KnormCache(model, decoding_ratio=0.25, decoding_interval=16)
    greedy(model, random_ids(1, 32), cache, 400)
    seen = cache.get_seq_length()
    kept = cache.stats()["tokens_kept"][0]
    # the last compression kept int(s * 0.25) of the s tokens seen then; fewer than 16 since
    assert int((seen - 15) * 0.25) <= kept < int(seen * 0.25) + 16
    assert max(peak_stored.values()) <= int(seen * 0.25) + 16


def pre_rope_layer0_keys(model, ids):
    """Layer 0's keys before RoPE, (batch, kv_heads, T, head_dim): they depend on the token
    only, so they tell which token a stored key is and at what position it was rotated."""
    captured = {}
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out))
    with torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config))
    hook.remove()
    b, t = ids.shape
    return captured["k"].view(b, t, 2, -1).transpose(1, 2)


def test_positions_are_tokens_seen_without_rerotation():
    model = tiny()
    prompt, budget, interval = 20, 48, 16
    cache = kvpress_rs.KnormCache(model, decoding_budget=budget, decoding_interval=interval, protect_prompt=True)
    out = greedy(model, random_ids(1, prompt), cache, 300)
    fed = out[:, :-1]
    length = fed.shape[1]
    assert cache.get_seq_length() == length
    rope = kvpress_rs.Rope.from_config(model.config)
    pre = pre_rope_layer0_keys(model, fed)
    positions = cache.kept_positions(0)
    assert positions.shape[-1] == cache.stats()["tokens_kept"][0]
    for h in range(2):
        kept = set(positions[0, h].tolist())
        assert set(range(prompt)) <= kept  # protect_prompt
        assert set(range(length - interval, length)) <= kept  # the last `interval` survive
    expected = rope.apply(pre.gather(2, positions[..., None].expand(-1, -1, -1, pre.shape[-1])), positions)
    torch.testing.assert_close(cache.layers[0].keys, expected, rtol=1e-5, atol=1e-5)


def test_positions_are_compact_with_rerotation():
    model = tiny()
    prompt, budget, interval, sinks = 20, 48, 16, 4
    cache = kvpress_rs.StreamingLLMCache(model, n_sink=sinks, decoding_budget=budget, decoding_interval=interval, rerotate=True)
    out = greedy(model, random_ids(1, prompt), cache, 300)
    fed = out[:, :-1]
    length = fed.shape[1]
    stored = cache.stats()["tokens_kept"][0]
    assert cache.get_seq_length() == stored < length  # generation continues at the compact position
    # StreamingLLM keeps the sinks and the newest tokens: their original positions are known
    original = torch.tensor(list(range(sinks)) + list(range(length - (stored - sinks), length)))
    pre = pre_rope_layer0_keys(model, fed)[:, :, original]
    rope = kvpress_rs.Rope.from_config(model.config)
    expected = rope.apply(pre, torch.arange(stored))
    torch.testing.assert_close(cache.layers[0].keys, expected, rtol=1e-4, atol=1e-4)
    # and the model sees the same thing as a fresh cache fed those tokens at those positions
    with torch.no_grad():
        ref = DynamicCache(config=model.config)
        model(fed[:, original], past_key_values=ref)
    torch.testing.assert_close(cache.layers[0].keys, ref.layers[0].keys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["knorm", "snapkv", "observed_attention", "triattention"])
def test_block_prefill_with_a_budget_covering_the_prompt_equals_one_prefill(policy):
    model = tiny(seed=2)
    ids = random_ids(1, 90, seed=5)
    spec = REGISTRY[policy]
    one = spec.cache_class(model, decoding_budget=256, decoding_interval=16, **spec.easy)
    blocks = spec.cache_class(model, decoding_budget=256, decoding_interval=16, **spec.easy)
    with torch.no_grad():
        single = model(ids[:, :-1], past_key_values=one)
    last = kvpress_rs.prefill(model, ids[:, :-1], blocks, block_size=16)
    torch.testing.assert_close(last.logits[:, -1], single.logits[:, -1], rtol=1e-4, atol=1e-4)
    for layer in range(3):
        torch.testing.assert_close(blocks.layers[layer].keys, one.layers[layer].keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(model, ids, blocks, 30), greedy(model, ids, one, 30))


@pytest.mark.parametrize("policy", ["knorm", "snapkv", "expected_attention"])
def test_block_prefill_never_holds_more_than_budget_plus_a_block(policy, peak_stored):
    model = tiny()
    spec = REGISTRY[policy]
    budget, block = 64, 24
    cache = spec.cache_class(model, decoding_budget=budget, decoding_interval=16, **spec.easy)
    ids = random_ids(1, 400)
    kvpress_rs.prefill(model, ids[:, :-1], cache, block_size=block)
    assert max(peak_stored.values()) <= budget + block
    assert cache.get_seq_length() == 399
    assert all(n <= budget for n in cache.stats()["tokens_kept"])
    out = greedy(model, ids, cache, 20)  # generate continues from the compressed prompt
    assert out.shape[1] == 420


def test_multi_turn_chat_appends_and_compresses_each_turn(peak_stored):
    model = tiny()
    cache = kvpress_rs.SnapKVCache(model, window_size=8, decoding_budget=64, decoding_interval=16)
    conversation = random_ids(1, 100, seed=1)
    kvpress_rs.prefill(model, conversation[:, :-1], cache, block_size=32)
    conversation = greedy(model, conversation, cache, 20)
    turn = random_ids(1, 70, seed=2)
    conversation = torch.cat([conversation, turn], dim=1)
    kvpress_rs.prefill(model, conversation[:, cache.get_seq_length() : -1], cache, block_size=32)
    assert cache.get_seq_length() == conversation.shape[1] - 1
    out = greedy(model, conversation, cache, 20)
    assert out.shape[1] == conversation.shape[1] + 20
    assert max(peak_stored.values()) <= 64 + 32


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"decoding_budget": 0}, "decoding_budget"),
        ({"decoding_budget": -5}, "decoding_budget"),
        ({"decoding_budget": 256, "decoding_interval": 0}, "decoding_interval"),
        ({"decoding_budget": 256, "decoding_interval": -1}, "decoding_interval"),
        ({"decoding_ratio": 0.0}, "decoding_ratio"),
        ({"decoding_ratio": 1.5}, "decoding_ratio"),
        ({"decoding_budget": 100, "decoding_ratio": 0.5}, "decoding_ratio"),
        ({"decoding_budget": 64}, "decoding_budget"),  # fewer than the 128 recent tokens kept
        ({"decoding_interval": 16}, "decoding_budget"),  # an interval without a budget
        ({"decoding_budget": 1.5}, "decoding_budget"),
    ],
)
def test_bad_decoding_arguments_raise_naming_them(kwargs, argument):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match=argument):
        kvpress_rs.KnormCache(tiny(), **kwargs)


def test_budget_smaller_than_the_protected_tokens_raises():
    model = tiny()
    cache = kvpress_rs.KnormCache(model, decoding_budget=40, decoding_interval=16, protect_prompt=True)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_budget.*protected"):
        greedy(model, random_ids(1, 30), cache, 40)


def test_window_larger_than_the_interval_raises():
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_interval"):
        kvpress_rs.SnapKVCache(tiny(), window_size=32, decoding_budget=64, decoding_interval=16)


@pytest.mark.parametrize("block_size", [0, -3, 2.5])
def test_bad_block_size_raises(block_size):
    model = tiny()
    cache = kvpress_rs.KnormCache(model, decoding_budget=64, decoding_interval=16)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="block_size"):
        kvpress_rs.prefill(model, random_ids(1, 20), cache, block_size=block_size)


def test_prefill_needs_a_decoding_budget_and_no_prefill_budget():
    model = tiny()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_budget"):
        kvpress_rs.prefill(model, random_ids(1, 20), kvpress_rs.KnormCache(model, compression_ratio=0.5), block_size=8)
    both = kvpress_rs.KnormCache(model, compression_ratio=0.5, decoding_budget=64, decoding_interval=16)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="compression_ratio"):
        kvpress_rs.prefill(model, random_ids(1, 20), both, block_size=8)


def test_unsupported_combinations_are_refused():
    model = tiny()
    with pytest.raises(kvpress_rs.UnsupportedError, match="adakv"):
        kvpress_rs.AdaKVCache(model, decoding_budget=64, decoding_interval=16)
    # quantized caches evict during generation too (tests_py/test_decoding_quantized.py),
    # but not into a low-precision store (that would re-quantize the evicted codes)
    with pytest.raises(kvpress_rs.UnsupportedError, match="low_bits"):
        kvpress_rs.KnormCache(
            tiny(hidden_size=256), decoding_budget=128, decoding_interval=16, quantization=kvpress_rs.QuantConfig(bits=4),
            low_bits=2,
        )


def test_calibration_file_round_trips_and_drives_triattention(tmp_path):
    from kvpress_rs.calibrate import calibrate

    model = tiny()
    ids = random_ids(1, 60, seed=4)
    path = calibrate(model, ids, tmp_path / "stats.safetensors")
    # the file holds the statistics of the pre-RoPE queries: check layer 0's center by hand
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    captured = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: captured.setdefault("q", out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    q = captured["q"].view(1, 60, 4, 16).transpose(1, 2)  # pre-RoPE queries (b, heads, T, d)
    torch.testing.assert_close(tensors["layer.0.center_re"], q[..., :8].mean(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tensors["layer.0.center_im"], q[..., 8:].mean(2), rtol=1e-4, atol=1e-4)
    assert int(tensors["layer.0.count"]) == 60
    cache = kvpress_rs.TriAttentionCache(model, decoding_budget=32, decoding_interval=16, protect_prompt=False, query_stats=str(path))
    out = greedy(model, random_ids(1, 20), cache, 100)
    assert out.shape[1] == 120 and max(cache.stats()["tokens_kept"]) < 48
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="query_stats"):
        kvpress_rs.TriAttentionCache(model, decoding_budget=32, decoding_interval=16, query_stats=str(tmp_path / "missing"))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="query_stats"):
        kvpress_rs.KnormCache(model, decoding_budget=32, decoding_interval=16, query_stats=str(path))


@pytest.mark.model
def test_smollm2_generation_stays_within_budget_and_matches_dynamic_cache_when_it_fits(smollm2_bf16, peak_stored):
    from kvpress_rs.data import needle_prompt

    model, tokenizer = smollm2_bf16
    ids = needle_prompt(tokenizer, context_tokens=300, depth=0.5).input_ids
    expected = greedy(model, ids, DynamicCache(config=model.config), 16)
    for policy in ("snapkv", "triattention"):
        roomy = kvpress_rs.KVCache(model, policy, decoding_budget=1024, decoding_interval=128)
        assert torch.equal(greedy(model, ids, roomy, 16), expected)
    peak_stored.clear()
    # the prompt (~300 tokens, held whole by its own forward) fits in budget + interval;
    # it is compressed to the budget at once, then every 64 generated tokens
    budget, interval = 256, 64
    assert budget < ids.shape[1] <= budget + interval
    cache = kvpress_rs.SnapKVCache(model, decoding_budget=budget, decoding_interval=interval)
    out = greedy(model, ids, cache, 200)
    assert out.shape[1] == ids.shape[1] + 200
    assert max(peak_stored.values()) <= budget + interval
    assert len(peak_stored) == model.config.num_hidden_layers
    assert cache.get_seq_length() == ids.shape[1] + 199


def test_beam_search_with_decoding_compression_keeps_queries_aligned(peak_stored):
    model = tiny()
    cache = kvpress_rs.SnapKVCache(model, window_size=8, decoding_budget=32, decoding_interval=16)
    ids = random_ids(1, 20)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=60,
                         min_new_tokens=60, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 80
    assert max(peak_stored.values()) <= 48


# ---- SnapKV's memory of the previous ranking -------------------------------------------


def assert_kept_scores_aligned(cache, window):
    """Each layer's kept scores describe its first m stored tokens: −inf exactly for the
    tokens that were the scoring window at the last compression (positions ≥ tokens seen
    then − window), finite for the others."""
    checked = 0
    for idx, layer in enumerate(cache.layers):
        scores = layer.state.kept_scores
        assert scores is not None, f"layer {idx} never compressed"
        stored, seen = layer.state.stored, layer.state.seen
        m = scores.shape[-1]
        assert tuple(scores.shape[:2]) == layer.state.batch_heads
        assert m <= stored
        seen_then = seen - (stored - m)
        positions = cache.kept_positions(idx)[..., :m]
        assert torch.equal(torch.isneginf(scores), positions >= seen_then - window)
        assert torch.isfinite(scores[positions < seen_then - window]).all()
        checked += 1
    assert checked == len(cache.layers)


def test_snapkv_remembers_the_ranking_aligned_with_the_store_through_beam_search():
    model = tiny()
    cache = kvpress_rs.SnapKVCache(model, window_size=8, decoding_budget=32, decoding_interval=16)
    assert cache.press.remembers_scores
    ids = random_ids(2, 20)
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=70,
                   min_new_tokens=70, num_beams=3, do_sample=False, pad_token_id=0)
    assert cache.layers[0].state.kept_scores.shape[0] == 6  # 2 prompts x 3 beams
    assert_kept_scores_aligned(cache, window=8)


def test_kept_scores_follow_crop_and_reset():
    model = tiny()
    cache = kvpress_rs.SnapKVCache(model, window_size=8, decoding_budget=32, decoding_interval=16)
    greedy(model, random_ids(1, 20), cache, 45)
    assert_kept_scores_aligned(cache, window=8)
    layer = cache.layers[0]
    before = layer.state.kept_scores
    m, stored = before.shape[-1], layer.state.stored
    since = stored - m  # tokens appended after the last compression
    cache.crop(-(since + 5))  # 5 of the remembered tokens go too
    assert layer.state.stored == m - 5
    assert torch.equal(layer.state.kept_scores, before[..., : m - 5])
    cache.reset()
    assert all(layer.state.kept_scores is None for layer in cache.layers)


def test_rank_pooling_changes_what_snapkv_keeps_and_position_pooling_remembers_nothing():
    model = tiny()
    ids = random_ids(1, 20)
    kept = {}
    for pooling in ("rank", "position"):
        cache = kvpress_rs.SnapKVCache(model, window_size=8, decoding_budget=32, decoding_interval=16,
                                       decoding_pooling=pooling)
        greedy(model, ids, cache, 120)
        kept[pooling] = [cache.kept_positions(i) for i in range(len(cache.layers))]
        remembered = [layer.state.kept_scores is not None for layer in cache.layers]
        assert all(remembered) if pooling == "rank" else not any(remembered)
    assert any(not torch.equal(a, b) for a, b in zip(kept["rank"], kept["position"]))


def test_bad_decoding_pooling_raises_naming_it():
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="decoding_pooling"):
        kvpress_rs.SnapKVCache(tiny(), decoding_budget=256, decoding_pooling="ranked")


def test_previous_scores_of_the_wrong_shape_raise_naming_them():
    store = kvpress_rs._native.LayerStore()
    keys = torch.randn(1, 2, 100, 16)
    store.append(keys, keys)
    press = kvpress_rs._native.Press("snapkv", window_size=8)
    queries = torch.randn(1, 4, 8, 16)
    plan = kvpress_rs._native.Plan.decoding
    with pytest.raises(kvpress_rs.ShapeError, match="previous_scores"):
        press.compress(store, plan(0, n_kept=60, next_position=100, queries=queries, protect_last=16,
                                   previous_scores=torch.zeros(1, 2, 101)))
    assert store.stored == 100
    done = press.compress(store, plan(0, n_kept=60, next_position=100, queries=queries, protect_last=16,
                                      previous_scores=torch.zeros(1, 2, 80)))
    assert done.evicted and done.kept_scores.shape == (1, 2, 60)
