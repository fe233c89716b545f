"""The Rust <-> Python boundary: zero-copy tensors, dtypes, strides, numpy, the GIL and
error mapping."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import kvpress_rs
from kvpress_rs import _native, ops


def test_first_append_adopts_the_tensor_without_copy():
    store = _native.LayerStore()
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    keys, values = store.append(k, v)
    assert keys.data_ptr() == k.data_ptr() and values.data_ptr() == v.data_ptr()
    assert keys.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    # the store still holds the same storage: writing through the input shows in the cache
    k[0, 0, 0, 0] = 123.0
    assert store.keys()[0, 0, 0, 0].item() == 123.0


def test_stored_keys_are_views_of_the_store_after_appends():
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    keys, _ = store.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert keys.data_ptr() == store.keys().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_knorm_scores_every_float_dtype_in_float32(dtype):
    keys = (torch.randn(2, 3, 20, 16) * 3).to(dtype)
    scores = ops.score("knorm", keys)
    expected = -keys.double().norm(dim=-1)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_contiguous_inputs_are_read_through_their_strides(dtype):
    base = torch.randn(2, 20, 3, 16).to(dtype)  # (B, T, H, D) as projections produce it
    keys = base.transpose(1, 2)  # (B, H, T, D), not contiguous
    assert not keys.is_contiguous()
    torch.testing.assert_close(ops.score("knorm", keys), ops.score("knorm", keys.contiguous()), rtol=0, atol=0)
    idx = ops.kept_indices("knorm", keys, compression_ratio=0.5)
    torch.testing.assert_close(ops.gather(keys, idx), ops.gather(keys.contiguous(), idx), rtol=0, atol=0)
    # a narrowed head_dim (stride 1, but rows not adjacent) and an expanded batch (stride 0)
    narrowed = torch.randn(1, 3, 20, 32).to(dtype)[..., 8:24]
    torch.testing.assert_close(ops.score("knorm", narrowed), ops.score("knorm", narrowed.contiguous()), rtol=0, atol=0)
    expanded = torch.randn(1, 3, 20, 16).to(dtype).expand(4, -1, -1, -1)
    torch.testing.assert_close(ops.score("knorm", expanded), ops.score("knorm", expanded.contiguous()), rtol=0, atol=0)


def test_store_accepts_non_contiguous_prefill_and_appends():
    k = torch.randn(1, 12, 2, 8).transpose(1, 2)
    v = torch.randn(1, 12, 2, 8).transpose(1, 2)
    store = _native.LayerStore()
    store.append(k, v)
    press = _native.Press("knorm", compression_ratio=0.5)
    press.compress(store, _native.Plan.prefill(0))
    kept = ops.kept_indices("knorm", k.contiguous(), v.contiguous(), compression_ratio=0.5)
    torch.testing.assert_close(store.keys(), ops.gather(k.contiguous(), kept), rtol=0, atol=0)
    new_k = torch.randn(1, 3, 2, 8).transpose(1, 2)
    keys, _ = store.append(new_k, new_k)
    torch.testing.assert_close(keys[:, :, -3:], new_k, rtol=0, atol=0)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
def test_numpy_arrays_give_the_same_results_as_torch(np_dtype):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 3, 30, 8)).astype(np_dtype)
    t = torch.from_numpy(keys)
    for policy in ["knorm", "streaming_llm", "random"]:
        s_np = ops.score(policy, keys, n_kept=10)
        assert isinstance(s_np, np.ndarray) and s_np.dtype == np.float32
        np.testing.assert_array_equal(s_np, ops.score(policy, t, n_kept=10).numpy())
        i_np = ops.kept_indices(policy, keys, compression_ratio=0.6)
        np.testing.assert_array_equal(i_np, ops.kept_indices(policy, t, compression_ratio=0.6).numpy())
        np.testing.assert_array_equal(ops.gather(keys, i_np), ops.gather(t, torch.from_numpy(i_np)).numpy())
    scores = rng.standard_normal((2, 3, 30)).astype(np.float32)
    np.testing.assert_array_equal(ops.top_k(scores, 7), ops.top_k(torch.from_numpy(scores), 7).numpy())


def test_numpy_views_are_read_without_copy_through_strides():
    keys = np.random.default_rng(1).standard_normal((1, 30, 2, 8)).astype(np.float32).transpose(0, 2, 1, 3)
    assert not keys.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ops.score("knorm", keys), ops.score("knorm", np.ascontiguousarray(keys)))


def test_mixing_numpy_and_torch_is_a_type_error():
    with pytest.raises(TypeError):
        ops.score("knorm", np.zeros((1, 1, 4, 2), np.float32), torch.zeros(1, 1, 4, 2))
    with pytest.raises(TypeError, match="torch.Tensor or a numpy.ndarray"):
        ops.score("knorm", [[1.0]])


def test_gil_is_released_during_rust_work():
    """Python code in another thread runs while a thread is inside a long Rust call."""
    keys = torch.randn(1, 8, 160000, 128)  # 655 MB: ~20 ms per call on a fast machine
    ticks: list[float] = []
    calls: list[tuple[float, float]] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    def worker():
        for _ in range(5):
            t0 = time.perf_counter()
            ops.score("knorm", keys)
            calls.append((t0, time.perf_counter()))

    t_tick = threading.Thread(target=ticker)
    t_tick.start()
    worker()
    stop.set()
    t_tick.join()
    # Ticks strictly inside a Rust call (away from its edges) prove the GIL was released;
    # with the GIL held, no Python bytecode could run there.
    inside = sum(1 for t in ticks for a, b in calls if a + 0.002 < t < b - 0.002)
    assert all(b - a > 0.01 for a, b in calls)
    assert inside > 100


def test_concurrent_use_of_one_store_is_serialised():
    store = _native.LayerStore()
    store.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    errors = []

    def append_many():
        try:
            for _ in range(200):
                x = torch.randn(1, 2, 1, 8)
                store.append(x, x)
        except Exception as e:  # pragma: no cover - a failure is reported below
            errors.append(e)

    threads = [threading.Thread(target=append_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.seen == store.stored == 4 + 4 * 200


def test_every_core_error_maps_to_its_exception_class():
    cases = [
        (lambda: ops.n_kept(10, compression_ratio=-0.1), kvpress_rs.InvalidArgumentError, ValueError),
        (lambda: ops.score("knorm", torch.randn(2, 3, 4)), kvpress_rs.ShapeError, ValueError),
        (lambda: ops.score("knorm", torch.randint(0, 3, (1, 1, 4, 2))), kvpress_rs.DtypeError, TypeError),
        (
            lambda: ops.kept_indices("knorm", torch.full((1, 1, 4, 2), float("nan")), compression_ratio=0.5),
            kvpress_rs.NonFiniteError,
            ValueError,
        ),
        (lambda: ops.score("knorm", torch.randn(1, 1, 0, 2)), kvpress_rs.EmptySequenceError, ValueError),
        (lambda: _native.LayerStore().keys(), kvpress_rs.CacheStateError, RuntimeError),
    ]
    for call, cls, builtin in cases:
        with pytest.raises(cls) as info:
            call()
        assert isinstance(info.value, builtin) and isinstance(info.value, kvpress_rs.KVPressError)
