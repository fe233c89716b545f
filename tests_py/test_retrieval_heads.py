"""RetrievalHeadsCache: retrieval heads keep every token (quantized or not), streaming heads
keep sinks + a window. Checked against straightforward torch references written here."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs.head_scores import select_retrieval_heads


def greedy(model, ids, cache, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                          do_sample=False, min_new_tokens=n)


def test_select_retrieval_heads_keeps_the_top_fraction_exactly():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.5], [0.0, 0.7, 0.05]])
    picked = select_retrieval_heads(scores, 4 / 9)
    expected = torch.tensor([[False, True, False], [True, False, True], [False, True, False]])
    assert torch.equal(picked, expected)
    # ties go to the lower index: 0.5 at (1, 0) before 0.5 at (1, 2)
    assert torch.equal(select_retrieval_heads(scores, 3 / 9)[1], torch.tensor([True, False, False]))
    assert not select_retrieval_heads(scores, 0.0).any() and select_retrieval_heads(scores, 1.0).all()


def reference_scores(model, period, repeats, seed):
    """Induction/echo scores from the eager attention weights transformers returns."""
    config = model.config
    low, high = min(1000, config.vocab_size // 4), config.vocab_size - 1
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    for _ in range(repeats):
        sequence = torch.randint(low, high, (1, period), generator=generator)
        out = model(torch.cat([sequence, sequence], 1), output_attentions=True)
        rows = torch.arange(period, 2 * period - 1)
        for layer, weights in enumerate(out.attentions):
            w = weights[0].float()
            total[layer] += torch.maximum(w[:, rows, rows - period + 1], w[:, rows, rows - period]).mean(-1)
    group = config.num_attention_heads // config.num_key_value_heads
    return (total / repeats).reshape(config.num_hidden_layers, config.num_key_value_heads, group).amax(-1)


def test_head_scores_match_the_eager_attention_weights(tiny_llama):
    model = tiny_llama(attn="eager")
    scores = kvpress_rs.retrieval_head_scores(model, period=24, repeats=2, seed=3)
    expected = reference_scores(model, 24, 2, 3)
    assert scores.shape == (3, 2)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_every_head_retrieving_or_a_window_longer_than_the_prompt_generate_like_dynamic_cache(tiny_llama):
    model = tiny_llama()
    ids = random_ids(2, 40)
    expected = greedy(model, ids, DynamicCache(config=model.config), 12)
    all_retrieval = kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=1.0)
    assert torch.equal(greedy(model, ids, all_retrieval, 12), expected)
    wide = kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=0.0, window=100, sink_tokens=0, heavy_hitters=8)
    assert torch.equal(greedy(model, ids, wide, 12), expected)
    assert wide.stats()["layers"][0]["streaming_tokens_dropped"] == 0


def reference_attention(q, k, v, scaling):
    """Softmax attention of q (heads, q, D) over k, v (heads, n, D), causal by position:
    the last q keys are the queries' own tokens."""
    logits = q @ k.transpose(-1, -2) * scaling
    n, m = k.shape[-2], q.shape[-2]
    future = torch.arange(n)[None, :] > torch.arange(n - m, n)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("new_tokens,heavy", [(1, 0), (3, 0), (1, 4), (3, 4)])
def test_layer_attention_equals_a_reference_over_each_heads_own_tokens(tiny_llama, new_tokens, heavy):
    """Retrieval heads over every token; streaming heads over sinks + heavy hitters + window
    + the new tokens."""
    model = tiny_llama(num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    retrieval = torch.tensor([[False, True, False]])
    cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=retrieval, window=5, sink_tokens=2,
                                           heavy_hitters=heavy, observation_window=6)
    captured = {}

    def capture(module, args, kwargs, output):
        captured["out"] = output[0]

    attn = model.model.layers[0].self_attn
    ids = random_ids(1, 30 + new_tokens, seed=5)
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(ids, past_key_values=full)
        k_all, v_all = full.layers[0].keys[0], full.layers[0].values[0]  # (3, T, D)
        queries = {}

        def grab_query(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            q = module.q_proj(hidden).view(1, hidden.shape[1], 6, -1).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            queries["q"] = apply_rotary_pos_emb(q, q, cos, sin)[0][0]

        pre = attn.register_forward_pre_hook(grab_query, with_kwargs=True)
        post = attn.register_forward_hook(capture, with_kwargs=True)
        try:
            model(ids[:, :30], past_key_values=cache)
            prompt_q = queries["q"]  # (6, 30, D)
            model(ids[:, 30:], past_key_values=cache)
        finally:
            pre.remove()
            post.remove()
    got = captured["out"]  # after o_proj
    q = queries["q"]  # (6, new, D)
    # heavy hitters: SnapKV's scores of the prompt's streaming heads from its last 6 queries
    # (the scorer is checked against its own reference in test_policies_reference.py),
    # the top `heavy` between the sinks and the window
    streaming = torch.tensor([0, 2])
    scores = kvpress_rs.ops.score("snapkv", k_all[streaming][None, :, :30], v_all[streaming][None, :, :30],
                                  prompt_q[[0, 1, 4, 5]][None, :, -6:], window_size=6, kernel_size=5)[0]
    scaling = attn.scaling
    heads = []
    for h in range(6):
        kv = h // 2
        k, v = k_all[kv], v_all[kv]
        if retrieval[0, kv]:
            heads.append(reference_attention(q[h : h + 1], k[None], v[None], scaling)[0])
            continue
        middle = scores[0 if kv == 0 else 1, 2 : 30 - 5]
        chosen = sorted((torch.topk(middle, heavy).indices + 2).tolist()) if heavy else []
        kept = list(range(2)) + chosen + list(range(30 - 5, 30 + new_tokens))
        heads.append(reference_attention(q[h : h + 1], k[kept][None], v[kept][None], scaling)[0])
    expected = attn.o_proj(torch.stack(heads, 1).reshape(1, new_tokens, -1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    layer = cache.layers[0]
    kept = 2 + heavy + 5
    assert layer.stats()["streaming_tokens_kept"] == kept
    assert layer.stats()["streaming_tokens_dropped"] == 30 + new_tokens - kept


def test_nbytes_counts_what_each_part_holds(tiny_llama):
    model = tiny_llama(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    retrieval = torch.tensor([[True, False], [False, False]])
    config = kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=0)
    cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=retrieval, window=8, sink_tokens=2,
                                           heavy_hitters=5, quantization=config)
    with torch.no_grad():
        model(random_ids(1, 64), past_key_values=cache)
    head_dim = 128 // 4
    # streaming heads: (2 + 5 + 8) kept tokens x K and V in float32, and their int32 positions
    streaming = lambda heads: heads * (2 + 5 + 8) * (head_dim * 4 * 2 + 4)  # noqa: E731
    layer0, layer1 = cache.layers
    quantized = layer0.nbytes - streaming(1)
    assert quantized > 0
    assert layer1.nbytes == streaming(2)
    assert cache.nbytes == layer0.nbytes + layer1.nbytes
    # the quantized head: 64 tokens x head_dim at 4 bits + one (scale, zero) f16 pair per 32 values, K and V
    assert quantized == 2 * (64 * head_dim * 4 // 8 + 64 * head_dim // 32 * 4)


def test_beam_search_and_batch_operations(tiny_llama):
    model = tiny_llama(hidden_size=128)
    ids = random_ids(2, 30)
    cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=0.5, window=6,
                                           quantization=kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6,
                         num_beams=3, do_sample=False)
    assert out.shape == (2, 36)
    before = cache.nbytes
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.nbytes < before
    cache.crop(-2)
    assert cache.get_seq_length() == 33
    cache.reset()
    assert cache.nbytes == 0 and cache.get_seq_length() == 0


def test_bad_arguments_raise_named_errors(tiny_llama):
    model = tiny_llama()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="retrieval_fraction"):
        kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=1.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="retrieval_fraction"):
        kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=float("nan"))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="window"):
        kvpress_rs.RetrievalHeadsCache(model, window=0)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="sink_tokens"):
        kvpress_rs.RetrievalHeadsCache(model, sink_tokens=-1)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="heavy_hitters"):
        kvpress_rs.RetrievalHeadsCache(model, heavy_hitters=2.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="observation_window"):
        kvpress_rs.RetrievalHeadsCache(model, observation_window=0)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match=r"retrieval_heads.*\(3, 2\)"):
        kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="head_scores"):
        kvpress_rs.RetrievalHeadsCache(model, head_scores=torch.tensor([[0.0, float("inf")]] * 3))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="quantization"):
        kvpress_rs.RetrievalHeadsCache(model, quantization="3bit")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="model"):
        kvpress_rs.RetrievalHeadsCache(model.config)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="period"):
        kvpress_rs.retrieval_head_scores(model, period=1)


@pytest.mark.model
def test_smollm2_finds_the_needle_at_ten_times_less_memory(smollm2_bf16):
    """The defaults (the README's frontier row): 25% of the KV heads (the highest
    induction/echo scores) whole at 3 bits; the rest keep 4 sinks, 48 heavy hitters and 48
    recent tokens."""
    from kvpress_rs.data import needle_prompt

    model, tokenizer = smollm2_bf16
    prompt = needle_prompt(tokenizer, context_tokens=2000, depth=0.5)
    ids = prompt.input_ids
    cache = kvpress_rs.RetrievalHeadsCache(
        model,
        quantization=kvpress_rs.QuantConfig(bits=3, group_size=64, residual_length=0, sink_tokens=4))
    with torch.no_grad():
        model(prompt.context_ids, past_key_values=cache)
    bf16 = prompt.context_ids.shape[1] * 30 * 3 * 64 * 2 * 2
    assert bf16 / cache.nbytes >= 10.0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert prompt.is_correct(answer), answer


def test_docstring_examples_run():
    import doctest

    import kvpress_rs.head_scores as module

    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried and not failures


def test_every_store_layer_keeps_keys_and_values_read_only(tiny_llama):
    model = tiny_llama(hidden_size=128)
    caches = [kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=0.5, window=4),
              kvpress_rs.QuantizedKVCache(model, bits=4), kvpress_rs.SnapKVCache(model, compression_ratio=0.5)]
    for cache in caches:
        with torch.no_grad():
            model(random_ids(1, 80), past_key_values=cache)
        layer = cache.layers[0]
        for name in ("keys", "values"):
            with pytest.raises(kvpress_rs.CacheStateError, match=f"{type(layer).__name__}.{name} is read-only"):
                setattr(layer, name, torch.zeros(1))
    assert caches[0].layers[0].keys is None  # heads hold different numbers of tokens
    assert caches[1].layers[0].keys.shape == (1, 2, 80, 32)  # a dequantized copy


def test_left_padded_batch_decodes_like_dynamic_cache_when_nothing_is_dropped(tiny_llama):
    """The model's padding mask reaches both attentions: the retrieval heads' store and the
    streaming heads' kept tokens (gathered at their positions)."""
    model = tiny_llama(hidden_size=128)
    ids = random_ids(2, 30, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is left-padded
    steps = random_ids(2, 3, seed=8)

    @torch.no_grad()
    def run(cache):
        model(ids, attention_mask=mask, past_key_values=cache)
        logits = []
        for i in range(3):
            full_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1)
            logits.append(model(steps[:, i : i + 1], attention_mask=full_mask, past_key_values=cache).logits)
        return torch.cat(logits, 1)

    expected = run(DynamicCache(config=model.config))
    half = torch.tensor([[True, False]] * 3)
    for cache in (kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=half, window=64, heavy_hitters=0),
                  kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=half, window=64, heavy_hitters=0,
                                                 quantization=kvpress_rs.QuantConfig(bits=8, group_size=32,
                                                                                     residual_length=64))):
        torch.testing.assert_close(run(cache), expected, rtol=1e-4, atol=1e-5)
