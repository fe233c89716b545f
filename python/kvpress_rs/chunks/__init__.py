"""Reusable chunk caches: encode each document's KV once, reuse it at any position.

RAG and multi-agent prompts prefill the same documents again and again. A
:class:`ChunkStore` encodes each chunk alone at positions 0..n (optionally compressed by an
eviction policy), keeps it in a backend (a local directory by default, or Redis), and
assembles a drop-in ``past_key_values`` for a prompt [prefix, chunk_1, ..., chunk_n]: each
chunk's keys move to their offset with one RoPE rotation, in Rust. Optional selective
recomputation restores part of the cross-chunk attention (``recompute.py``).

Modules: ``entry`` (key and verified serialization), ``backends`` (local directory,
Redis), ``store`` (:class:`ChunkStore`), ``assembled`` (:class:`AssembledCache`),
``recompute`` (which tokens to recompute, and how).

Example
-------
>>> import torch, kvpress_rs  # doctest: +SKIP
>>> store = kvpress_rs.ChunkStore(model, tokenizer, backend="/tmp/chunks")  # doctest: +SKIP
>>> cache = store.assemble(["first document ...", "second document ..."], prefix=header_ids)  # doctest: +SKIP
>>> out = model.generate(torch.cat([cache.input_ids, question_ids], 1), past_key_values=cache)  # doctest: +SKIP
"""

from .assembled import AssembledCache
from .backends import LocalDirBackend, RedisBackend
from .entry import EncodedChunk
from .store import ChunkStore

__all__ = ["ChunkStore", "AssembledCache", "EncodedChunk", "LocalDirBackend", "RedisBackend"]
