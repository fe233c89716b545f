"""kvpress_rs: KV-cache compression for Hugging Face transformers, with a Rust core.

Swap one object in ``generate``::

    import kvpress_rs
    cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    print(cache.stats()["nbytes"])
"""

# libtorch must be loaded (by torch) before the native module that links against it.
import torch  # noqa: F401

from . import chunks, errors, ops, rope
from ._native import QuantConfig, __version__
from .cache import CompressedLayer, KVCache
from .prefill import prefill
from .chunks import AssembledCache, ChunkStore
from .errors import *  # noqa: F403 - the exception hierarchy is part of the top-level API
from . import policies as _policies
from .policies import *  # noqa: F403 - every named cache (generated from the registry)
from .quantized import QuantizedKVCache, QuantizedLayer
from .head_scores import retrieval_head_scores
from .retrieval_heads import RetrievalHeadsCache, RetrievalHeadsLayer
from .rope import Rope
from .kvpress_compat import from_press

__all__ = [
    "__version__",
    "KVCache",
    "prefill",
    "CompressedLayer",
    *_policies.__all__,
    "QuantizedKVCache",
    "QuantizedLayer",
    "RetrievalHeadsCache",
    "RetrievalHeadsLayer",
    "retrieval_head_scores",
    "QuantConfig",
    "Rope",
    "from_press",
    "ChunkStore",
    "AssembledCache",
    "chunks",
    "ops",
    "rope",
    "errors",
    *errors.__all__,
]
