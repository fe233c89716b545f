"""Ragged rows (per-head lengths after a head budget): the bytes follow the per-head
counts, and attention over them equals dense attention over each head's own tokens."""

from __future__ import annotations

import pytest
import torch

import kvpress_rs
from kvpress_rs import _native


def ragged_store(batch=1, heads=2, tokens=20, dim=8, counts=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, tokens, dim, generator=g).to(dtype)
    v = torch.randn(batch, heads, tokens, dim, generator=g).to(dtype)
    store = _native.LayerStore()
    store.append(k, v)
    counts = counts or [tokens // 2 + 3 * r for r in range(batch * heads)]
    rows = [torch.randperm(tokens, generator=g)[:c].sort().values for c in counts]
    store.retain_rows(rows)
    return store, k, v, rows


def test_rows_keep_their_own_tokens_and_bytes():
    store, k, v, rows = ragged_store(batch=2, heads=3, counts=[4, 9, 12, 1, 7, 20])
    assert store.is_ragged and store.lengths() == [4, 9, 12, 1, 7, 20]
    positions = store.kept_positions()
    assert isinstance(positions, list) and len(positions) == 6
    for r, idx in enumerate(rows):
        b, h = divmod(r, 3)
        assert torch.equal(positions[r], idx)
        keys, values = store.row(b, h)
        assert torch.equal(keys[0, 0], k[b, h, idx]) and torch.equal(values[0, 0], v[b, h, idx])
    per_token = 2 * 8 * 4 + 4  # keys + values in float32, int32 position
    assert store.nbytes == sum(len(r) for r in rows) * per_token


def test_equal_counts_stay_uniform():
    store, *_ = ragged_store(counts=[5, 5])
    assert not store.is_ragged and store.keys().shape == (1, 2, 5, 8)


def reference_attention(query, rows_kv, group, scale, q_len):
    """Dense attention per head over that head's own tokens (new tokens last, causal)."""
    out = []
    for h, (keys, values) in enumerate(rows_kv):
        q = query[0, h * group : (h + 1) * group].double()  # (group, q, d)
        scores = q @ keys.double().T * scale  # (group, q, len)
        n = keys.shape[0]
        for j in range(q_len):
            scores[:, j, n - q_len + j + 1 :] = float("-inf")
        out.append(torch.softmax(scores, dim=-1) @ values.double())
    return torch.cat(out, dim=0).transpose(0, 1)[None]  # (1, q, q_heads, d)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_over_ragged_rows_equals_per_head_dense_attention(q_len, dtype, tol):
    store, *_ = ragged_store(heads=2, counts=[6, 13], dtype=dtype)
    g = torch.Generator().manual_seed(1)
    new_k, new_v = torch.randn(1, 2, q_len, 8, generator=g).to(dtype), torch.randn(1, 2, q_len, 8, generator=g).to(dtype)
    store.append(new_k, new_v)
    assert store.lengths() == [6 + q_len, 13 + q_len]
    query = torch.randn(1, 6, q_len, 8, generator=g).to(dtype)  # GQA: 3 query heads per KV head
    out = store.attend_rows(query, 0.35)
    rows_kv = [tuple(t[0, 0] for t in store.row(0, h)) for h in range(2)]
    expected = reference_attention(query, rows_kv, 3, 0.35, q_len)
    assert out.shape == (1, q_len, 6, 8) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_crop_and_batch_ops_on_ragged_rows():
    store, k, v, rows = ragged_store(batch=2, heads=2, counts=[3, 8, 5, 10])
    store.append(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8))
    assert store.lengths() == [5, 10, 7, 12] and store.seen == 22
    store.crop(2)
    assert store.lengths() == [3, 8, 5, 10] and store.seen == 20
    store.index_batch(torch.tensor([1, 1, 0]))
    assert store.lengths() == [5, 10, 5, 10, 3, 8]
    store.append(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
    # rows copied from the same batch row do not share storage
    assert not torch.equal(store.row(0, 0)[0][0, 0, -1], store.row(1, 0)[0][0, 0, -1])
    store.repeat_interleave_batch(2)
    assert store.lengths() == [6, 11, 6, 11, 6, 11, 6, 11, 4, 9, 4, 9]
    with pytest.raises(kvpress_rs.CacheStateError, match="read them per row"):
        store.keys()


def test_retain_rows_validates_its_input():
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4))
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="2 rows"):
        store.retain_rows([torch.tensor([0, 1])])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="ascending"):
        store.retain_rows([torch.tensor([3, 1]), torch.tensor([0, 1, 2])])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="outside"):
        store.retain_rows([torch.tensor([0, 10]), torch.tensor([0])])
