"""The functional API: score tokens, pick the top-k, gather kept tokens.

Each function takes ``torch.Tensor`` s (any device; CPU tensors run fused Rust kernels,
other devices libtorch ops) or ``numpy.ndarray`` s (float32/float16, zero-copy into the
same Rust kernels) and returns the same kind of array. Handy for experiments on saved KV
tensors without a model.

``quantize`` (torch tensors only) quantizes a (batch, heads, tokens, head_dim) tensor
group-wise and returns a ``QuantizedTensor`` (``.dequantize()``, ``.codes``, ``.scales``,
``.zeros``, ``.nbytes``).

Example
-------
>>> import numpy as np, kvpress_rs
>>> keys = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)
>>> idx = kvpress_rs.ops.kept_indices("knorm", keys, compression_ratio=0.75)
>>> idx.shape, kvpress_rs.ops.gather(keys, idx).shape
((1, 2, 4), (1, 2, 4, 8))
"""

from contextlib import contextmanager
from typing import Iterator

from ._native import (
    cpu_kernels_enabled,
    gather,
    kept_indices,
    n_kept,
    native_bf16_matmul,
    quantize,
    score,
    set_cpu_kernels,
    top_k,
)


@contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """Runs a block with the fused Rust CPU kernels on or off (off: CPU tensors take the
    libtorch path that CUDA tensors take), restoring the previous setting afterwards.

    >>> import torch, kvpress_rs
    >>> with kvpress_rs.ops.cpu_kernels(False):
    ...     kvpress_rs.ops.top_k(torch.tensor([[[0.1, 0.9, 0.5]]]), 1)
    tensor([[[1]]])
    """
    previous = cpu_kernels_enabled()
    set_cpu_kernels(enabled)
    try:
        yield
    finally:
        set_cpu_kernels(previous)


__all__ = [
    "score",
    "top_k",
    "gather",
    "kept_indices",
    "n_kept",
    "quantize",
    "set_cpu_kernels",
    "cpu_kernels_enabled",
    "cpu_kernels",
    "native_bf16_matmul",
]
