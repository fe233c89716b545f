"""The libtorch path (what CUDA tensors take) gives the same results as the fused Rust CPU
kernels. With the kernels switched off, CPU tensors go through exactly that path."""

from __future__ import annotations

import pytest
import torch

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs.policies import REGISTRY

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
        rows = [cache.layers[i]._store.kept_positions() for i in range(3)]
        flat = [r if isinstance(r, list) else list(r.reshape(-1, r.shape[-1])) for r in rows]
        return out, [p for layer in flat for p in layer], cache.nbytes

    rust = run()
    with ops.cpu_kernels(False):
        libtorch = run()
    assert torch.equal(rust[0], libtorch[0])
    assert all(torch.equal(a, b) for a, b in zip(rust[1], libtorch[1]))
    assert rust[2] == libtorch[2]
