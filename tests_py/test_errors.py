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
        store.compress(_native.Press("knorm", compression_ratio=0.5), 0)
    values = torch.randn(1, 2, 10, 8)
    values[0, 0, 0, 0] = bad
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 10, 8), values)
    with pytest.raises(kvpress_rs.NonFiniteError, match="values"):
        store.compress(_native.Press("streaming_llm", compression_ratio=0.5), 0)


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
