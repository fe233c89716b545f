"""The libtorch path (what CUDA tensors take) gives the same results as the fused Rust CPU
kernels. With the kernels switched off, CPU tensors go through exactly that path."""

from __future__ import annotations

import pytest
import torch

import kvpress_rs
from kvpress_rs import ops
from settings import REGISTRY

from conftest import random_ids


@pytest.fixture
def libtorch_path():
    with ops.cpu_kernels(False):
        yield
    assert ops.cpu_kernels_enabled()


@pytest.mark.parametrize("policy", ["knorm", "streaming_llm", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_indices_agree(policy, dtype):
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 70, 16).to(dtype)
    rust = ops.kept_indices(policy, keys, compression_ratio=0.6)
    rust_scores = ops.score(policy, keys, n_kept=28)
    with ops.cpu_kernels(False):
        libtorch = ops.kept_indices(policy, keys, compression_ratio=0.6)
        libtorch_scores = ops.score(policy, keys, n_kept=28)
    torch.testing.assert_close(rust_scores, libtorch_scores, rtol=1e-6, atol=1e-6)
    assert torch.equal(rust, libtorch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,lag,cross", [(70, 8, False), (70, 8, True), (133, 16, False), (20, 8, False)])
def test_lagkv_kernel_agrees_with_its_libtorch_chain(dtype, t, lag, cross):
    # the fused CPU kernel (float32 statistics per partition) vs the same chain as torch ops
    gen = torch.Generator().manual_seed(t + lag)
    keys = torch.randn(2, 3, t, 16, generator=gen).to(dtype)
    values = torch.randn(2, 3, t, 16, generator=gen).to(dtype)
    params = dict(n_sink=4, lag_size=lag, cross_scoring=cross)
    rust = ops.score("lagkv", keys, values, **params)
    with ops.cpu_kernels(False):
        libtorch = ops.score("lagkv", keys, values, **params)
    assert rust.dtype == libtorch.dtype == torch.float32
    torch.testing.assert_close(rust, libtorch, rtol=1e-5, atol=1e-6)


def test_ties_and_gather_agree():
    scores = torch.randint(0, 3, (2, 2, 40)).float()
    x = torch.randn(2, 2, 40, 8).bfloat16()
    rust = ops.top_k(scores, 13)
    with ops.cpu_kernels(False):
        assert torch.equal(ops.top_k(scores, 13), rust)
        assert torch.equal(ops.gather(x, rust), ops.gather(x.float(), rust).bfloat16())
    assert torch.equal(ops.gather(x, rust), x.gather(2, rust[..., None].expand(-1, -1, -1, 8)))


def test_errors_are_the_same(libtorch_path):
    with pytest.raises(kvpress_rs.NonFiniteError):
        ops.kept_indices("knorm", torch.full((1, 1, 4, 2), float("inf")), compression_ratio=0.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="indices"):
        ops.gather(torch.randn(1, 1, 4, 2), torch.tensor([[[0, 9]]]))
    with pytest.raises(kvpress_rs.NonFiniteError):
        ops.top_k(torch.tensor([[[0.1, float("nan")]]]), 1)


@pytest.mark.parametrize("policy", list(REGISTRY))
def test_caches_generate_the_same_through_both_paths(tiny_llama, policy):
    model = tiny_llama()
    ids = random_ids(2, 45, seed=11)
    spec = REGISTRY[policy]

    def run():
        cache = spec.cache_class(model, compression_ratio=0.5, **spec.easy)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=8, do_sample=False,
            pad_token_id=0,
        )
        rows = [cache.layers[i].state.kept_positions() for i in range(3)]
        flat = [r if isinstance(r, list) else list(r.reshape(-1, r.shape[-1])) for r in rows]
        return out, [p for layer in flat for p in layer], cache.nbytes

    rust = run()
    with ops.cpu_kernels(False):
        libtorch = run()
    assert torch.equal(rust[0], libtorch[0])
    assert all(torch.equal(a, b) for a, b in zip(rust[1], libtorch[1]))
    assert rust[2] == libtorch[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keydiff_and_expected_attention_kernels_agree_with_their_libtorch_chains(dtype):
    # token-major keys (transformers' layout): the fused CPU kernels read them in place
    from transformers import LlamaConfig

    gen = torch.Generator().manual_seed(7)
    t = 90
    keys = torch.randn(1, t, 2, 16, generator=gen).to(dtype).transpose(1, 2)
    values = torch.randn(1, t, 2, 16, generator=gen).to(dtype).transpose(1, 2)
    queries = (torch.randn(1, t, 6, 16, generator=gen) + 0.5).to(dtype).transpose(1, 2)
    rope = kvpress_rs.Rope.from_config(
        LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, rope_theta=1000.0)
    )
    ea = dict(rope=rope, n_future_positions=16, n_sink=4)
    rust = (ops.score("keydiff", keys, values), ops.score("expected_attention", keys, values, queries, **ea))
    with ops.cpu_kernels(False):
        chain = (ops.score("keydiff", keys, values), ops.score("expected_attention", keys, values, queries, **ea))
    torch.testing.assert_close(rust[0], chain[0], rtol=1e-5, atol=1e-6)
    # bf16 on a CPU that multiplies bf16 natively: the covariance term's products are bf16
    # (rounded to 2^-9; that term is ~0.5 here, a weight moves by about twice its rounding)
    native_bf16 = dtype == torch.bfloat16 and ops.native_bf16_matmul()
    torch.testing.assert_close(rust[1], chain[1], rtol=1e-2 if native_bf16 else 1e-4, atol=1e-7)


@pytest.mark.model
def test_expected_attention_kernel_keeps_what_the_float32_chain_keeps_on_smollm2(smollm2_bf16):
    # the real bf16 model: whatever products the fused kernel takes (bf16 where the CPU
    # multiplies it natively), it keeps nearly the tokens the float32 libtorch chain keeps
    from kvpress_rs.data import needle_prompt

    model, tokenizer = smollm2_bf16
    ids = needle_prompt(tokenizer, context_tokens=700, depth=0.5).input_ids

    def kept():
        cache = kvpress_rs.ExpectedAttentionCache(model, compression_ratio=0.5)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        return [cache.kept_positions(i) for i in range(model.config.num_hidden_layers)]

    fused = kept()
    with ops.cpu_kernels(False):
        chain = kept()
    overlaps = []
    for a, b in zip(fused, chain):
        assert a.shape == b.shape
        for row_a, row_b in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
            overlaps.append(len(set(row_a.tolist()) & set(row_b.tolist())) / row_a.numel())
    assert min(overlaps) >= 0.95, min(overlaps)
    assert sum(overlaps) / len(overlaps) >= 0.99, sum(overlaps) / len(overlaps)
