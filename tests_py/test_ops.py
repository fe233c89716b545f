"""The functional API against independent torch references written here."""

from __future__ import annotations

import pytest
import torch

import kvpress_rs
from kvpress_rs import ops


def reference_n_kept(n_tokens: int, ratio: float) -> int:
    return int(n_tokens * (1 - ratio))


def reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k with ties to the earlier token, ascending: a plain Python sort per row."""
    b, h, t = scores.shape
    out = torch.empty(b, h, k, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            row = scores[i, j].tolist()
            order = sorted(range(t), key=lambda x: (-row[x], x))[:k]
            out[i, j] = torch.tensor(sorted(order))
    return out


@pytest.mark.parametrize("n_tokens,ratio", [(10, 0.5), (7, 0.3), (100, 0.25), (33, 0.9), (1000, 0.75), (5, 0.0)])
def test_n_kept_matches_pythons_int_arithmetic(n_tokens, ratio):
    assert ops.n_kept(n_tokens, compression_ratio=ratio) == reference_n_kept(n_tokens, ratio)


def test_n_kept_with_a_token_budget():
    assert ops.n_kept(100, max_tokens=30) == 30
    assert ops.n_kept(20, max_tokens=30) == 20


def test_top_k_crafted_with_ties_goes_to_earlier_tokens():
    scores = torch.tensor([[[0.5, 0.9, 0.5, 0.1, 0.9, 0.5]]])
    assert ops.top_k(scores, 1).tolist() == [[[1]]]
    assert ops.top_k(scores, 2).tolist() == [[[1, 4]]]
    assert ops.top_k(scores, 3).tolist() == [[[0, 1, 4]]]
    assert ops.top_k(scores, 4).tolist() == [[[0, 1, 2, 4]]]


def test_top_k_random_and_heavily_tied_scores_match_the_reference():
    torch.manual_seed(0)
    for scores in [torch.randn(2, 3, 50), torch.randint(0, 4, (2, 3, 50)).float()]:
        for k in [1, 7, 25, 50]:
            assert torch.equal(ops.top_k(scores, k), reference_top_k(scores, k))


def test_knorm_keeps_the_smallest_norm_keys_like_a_torch_reference():
    torch.manual_seed(1)
    keys = torch.randn(2, 3, 64, 16)
    n_kept = reference_n_kept(64, 0.6)
    expected = (-keys.norm(dim=-1)).topk(n_kept, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(ops.kept_indices("knorm", keys, compression_ratio=0.6), expected)


def test_knorm_must_keep_a_crafted_small_key():
    keys = torch.randn(1, 2, 40, 8) + 5.0
    keys[0, 0, 17] = 0.01  # by far the smallest norm in head 0
    keys[0, 1, 3] = 0.01
    idx = ops.kept_indices("knorm", keys, max_tokens=1)
    assert idx.tolist() == [[[17], [3]]]


@pytest.mark.parametrize("n_tokens,ratio,n_sink", [(20, 0.5, 4), (20, 0.5, 0), (9, 0.7, 4), (50, 0.9, 4)])
def test_streaming_llm_keeps_sinks_and_the_recent_window(n_tokens, ratio, n_sink):
    keys = torch.randn(1, 2, n_tokens, 8)
    n_kept = reference_n_kept(n_tokens, ratio)
    sinks = min(n_sink, n_kept)
    expected = list(range(sinks)) + list(range(n_tokens - (n_kept - sinks), n_tokens))
    idx = ops.kept_indices("streaming_llm", keys, compression_ratio=ratio, n_sink=n_sink)
    assert idx[0, 0].tolist() == expected and idx[0, 1].tolist() == expected


def test_random_is_reproducible_per_seed_and_layer():
    keys = torch.randn(1, 2, 100, 8)
    a = ops.kept_indices("random", keys, compression_ratio=0.5, seed=7)
    assert torch.equal(a, ops.kept_indices("random", keys, compression_ratio=0.5, seed=7))
    assert not torch.equal(a, ops.kept_indices("random", keys, compression_ratio=0.5, seed=8))
    assert not torch.equal(a, ops.kept_indices("random", keys, compression_ratio=0.5, seed=7, layer_idx=1))
    scores = ops.score("random", keys, seed=7)
    assert scores.min() >= 0 and scores.max() < 1
    # roughly uniform: mean of 200 draws near 0.5
    assert abs(scores.mean().item() - 0.5) < 0.1


def test_gather_matches_advanced_indexing():
    x = torch.randn(2, 3, 30, 8)
    idx = ops.kept_indices("knorm", x, compression_ratio=0.5)
    expected = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(ops.gather(x, idx), expected)
    positions = torch.arange(30).expand(2, 3, 30).contiguous()
    assert torch.equal(ops.gather(positions, idx), idx)


def test_gather_rejects_out_of_range_indices():
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="outside"):
        ops.gather(torch.randn(1, 1, 4, 2), torch.tensor([[[0, 4]]]))
    with pytest.raises(kvpress_rs.DtypeError, match="int64"):
        ops.gather(torch.randn(1, 1, 4, 2), torch.tensor([[[0, 1]]], dtype=torch.int32))


def test_press_object_reports_its_configuration():
    press = kvpress_rs._native.Press("streaming_llm", compression_ratio=0.25, n_sink=2)
    assert (press.policy, press.compression_ratio, press.max_tokens) == ("streaming_llm", 0.25, None)
    assert press.n_kept(100) == 75 and not press.keeps_everything
    assert kvpress_rs._native.Press("knorm", max_tokens=16).max_tokens == 16
