"""Bad input: a clear kvpress_rs exception naming the argument, never a crash."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kvpress_rs
from kvpress_rs import _native, ops

from conftest import random_ids


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_ratio_outside_zero_one(tiny_llama, ratio):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="compression_ratio"):
        kvpress_rs.KnormCache(tiny_llama(), compression_ratio=ratio)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_non_positive_max_tokens(tiny_llama, max_tokens):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="max_tokens"):
        kvpress_rs.KnormCache(tiny_llama(), max_tokens=max_tokens)


def test_ratio_and_max_tokens_together(tiny_llama):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="not both"):
        kvpress_rs.KnormCache(tiny_llama(), compression_ratio=0.5, max_tokens=10)


def test_ratio_that_keeps_no_token(tiny_llama):
    model = tiny_llama()
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.9)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="at least one token"):
        with torch.no_grad():
            model(random_ids(1, 5), past_key_values=cache)


def test_unknown_policy_and_bad_policy_parameters(tiny_llama):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="unknown policy"):
        kvpress_rs.KVCache(tiny_llama(), "h2o-typo", compression_ratio=0.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="n_sink"):
        kvpress_rs.StreamingLLMCache(tiny_llama(), compression_ratio=0.5, n_sink=-1)


@pytest.mark.parametrize(
    "keys,match",
    [
        (torch.randn(2, 16, 8), "rank 4"),
        (torch.randn(1, 2, 3, 16, 8), "rank 4"),
        (torch.randn(1, 0, 16, 8), "non-zero"),
    ],
)
def test_wrong_rank_or_shape(keys, match):
    with pytest.raises(kvpress_rs.ShapeError, match=match):
        ops.score("knorm", keys)
    with pytest.raises(kvpress_rs.ShapeError):
        _native.LayerStore().append(keys, keys)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bool])
def test_wrong_dtype(dtype):
    keys = torch.zeros(1, 2, 4, 8, dtype=dtype)
    with pytest.raises(kvpress_rs.DtypeError, match="float32, torch.float16 or torch.bfloat16"):
        ops.score("knorm", keys)


def test_keys_and_values_must_agree():
    with pytest.raises(kvpress_rs.ShapeError, match="values"):
        _native.LayerStore().append(torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8))
    with pytest.raises(kvpress_rs.DtypeError, match="values"):
        _native.LayerStore().append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half())


def test_mismatched_heads_after_the_first_update():
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(kvpress_rs.ShapeError, match="reset"):
        store.append(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(kvpress_rs.DtypeError, match="reset"):
        store.append(torch.randn(1, 2, 1, 8).bfloat16(), torch.randn(1, 2, 1, 8).bfloat16())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_keys_or_values_at_compression(tiny_llama, bad):
    store = _native.LayerStore()
    keys = torch.randn(1, 2, 10, 8)
    keys[0, 1, 3, 2] = bad
    store.append(keys, torch.randn(1, 2, 10, 8))
    with pytest.raises(kvpress_rs.NonFiniteError, match="keys"):
        _native.Press("knorm", compression_ratio=0.5).compress(store, _native.Plan.prefill(0))
    values = torch.randn(1, 2, 10, 8)
    values[0, 0, 0, 0] = bad
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 10, 8), values)
    with pytest.raises(kvpress_rs.NonFiniteError, match="values"):
        _native.Press("streaming_llm", compression_ratio=0.5).compress(store, _native.Plan.prefill(0))


def test_nan_in_a_model_reaches_the_user_as_non_finite_error(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(kvpress_rs.NonFiniteError):
        with torch.no_grad():
            model(random_ids(1, 20), past_key_values=kvpress_rs.KnormCache(model, compression_ratio=0.5))


def test_empty_prompt():
    with pytest.raises(kvpress_rs.EmptySequenceError):
        _native.LayerStore().append(torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8))
    with pytest.raises(kvpress_rs.EmptySequenceError):
        ops.kept_indices("knorm", torch.randn(1, 2, 0, 8), compression_ratio=0.5)


def test_model_without_rope():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="rotary"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5)


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        kvpress_rs.KnormCache("SmolLM2", compression_ratio=0.5)


def test_top_k_out_of_range():
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="k"):
        ops.top_k(torch.randn(1, 1, 5), 6)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="k"):
        ops.top_k(torch.randn(1, 1, 5), 0)
    with pytest.raises(kvpress_rs.NonFiniteError, match="NaN"):
        ops.top_k(torch.tensor([[[0.1, float("nan")]]]), 1)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        _native.LayerStore().append([1, 2], [3, 4])


def test_model_without_query_access(tiny_llama):
    """A model whose attention bypasses transformers' attention interface gives the cache no
    queries: query-aware policies refuse it clearly; key-only policies still work."""
    from transformers.models.llama import modeling_llama

    model = tiny_llama()

    def direct_attention(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kw):
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
        cache = past_key_values if past_key_values is not None else kw.get("cache")
        k, v = cache.update(k, v, self.layer_idx)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None

    for layer in model.model.layers:
        layer.self_attn.forward = direct_attention.__get__(layer.self_attn)
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="queries"):
        with torch.no_grad():
            model(random_ids(1, 20), past_key_values=kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=4))
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(random_ids(1, 20), past_key_values=cache)
    assert cache.stats()["tokens_kept"] == [10, 10, 10]


def test_query_policies_need_the_model_not_its_config(tiny_llama):
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="pass the model"):
        kvpress_rs.SnapKVCache(tiny_llama().config, compression_ratio=0.5)


def test_window_larger_than_the_prompt(tiny_llama):
    model = tiny_llama()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="window"):
        with torch.no_grad():
            model(random_ids(1, 20), past_key_values=kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=64))


def test_unknown_budgets(tiny_llama):
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="layer_budget"):
        kvpress_rs.KnormCache(tiny_llama(), compression_ratio=0.5, layer_budget="pyramidal")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="head_budget"):
        kvpress_rs.KnormCache(tiny_llama(), compression_ratio=0.5, head_budget="ada")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="alpha_safeguard"):
        kvpress_rs.AdaKVCache(tiny_llama(), scorer="knorm", compression_ratio=0.5, alpha_safeguard=2.0)


@pytest.mark.parametrize("make", [lambda m: kvpress_rs.KnormCache(m, compression_ratio=0.5),
                                  lambda m: kvpress_rs.QuantizedKVCache(m, bits=4)])
@pytest.mark.parametrize("method", ["offload", "prefetch"])
def test_offloading_is_refused_with_a_kvpress_rs_error(tiny_llama, make, method):
    """A layer refuses offloading in the kvpress_rs hierarchy (still a NotImplementedError,
    as transformers' callers expect)."""
    layer = make(tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)).layers[0]  # head_dim 32
    with pytest.raises(kvpress_rs.errors.UnsupportedError, match="offloading"):
        getattr(layer, method)()
    assert issubclass(kvpress_rs.errors.UnsupportedError, NotImplementedError)
