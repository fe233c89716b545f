"""The functional API: score tokens, pick the top-k, gather kept tokens.

Each function takes ``torch.Tensor`` s (any device; CPU tensors run fused Rust kernels,
other devices libtorch ops) or ``numpy.ndarray`` s (float32/float16, zero-copy into the
same Rust kernels) and returns the same kind of array. Handy for experiments on saved KV
tensors without a model.

Example
-------
>>> import numpy as np, kvpress_rs
>>> keys = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)
>>> idx = kvpress_rs.ops.kept_indices("knorm", keys, compression_ratio=0.75)
>>> idx.shape, kvpress_rs.ops.gather(keys, idx).shape
((1, 2, 4), (1, 2, 4, 8))
"""

from ._native import gather, kept_indices, n_kept, score, top_k

__all__ = ["score", "top_k", "gather", "kept_indices", "n_kept"]
