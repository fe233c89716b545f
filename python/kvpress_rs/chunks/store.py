"""``kvpress_rs.ChunkStore``: encode chunks once, keep them in a backend, assemble caches."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .. import _native
from .._native import QuantConfig
from ..errors import ChunkStoreError, InvalidArgumentError, UnsupportedModelError
from ..models import decoder_config
from ..rope import Rope
from . import entry as _entry
from .assembled import AssembledCache
from .backends import Backend, LocalDirBackend
from .recompute import recompute as _recompute



class ChunkStore:
    """Reusable chunk caches for one model: each chunk's KV is encoded once, on its own at
    positions 0..n (optionally compressed by an eviction policy and/or quantized), kept in a backend under a
    key of everything it depends on (model, tokenizer, token ids, compression, RoPE; see
    ``kvpress_rs.chunks.entry``), and assembled into a drop-in ``past_key_values`` for any
    prompt made of a prefix and chunks, each chunk's keys moved to its offset with one
    RoPE rotation (Rust).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder whose layers are all full attention (sliding-window layers are refused).
    tokenizer : optional
        Its identity is part of the key; also lets chunks be given as text.
    backend : str, os.PathLike or backend
        A directory (:class:`LocalDirBackend`, the default: ``$KVPRESS_RS_CACHE/chunks``),
        a :class:`RedisBackend`, or anything with ``get``/``put``/``delete`` of bytes.
    compression : dict, optional
        An eviction policy applied to every chunk when encoded, as ``KVCache`` keyword
        arguments: ``{"policy": "knorm", "compression_ratio": 0.5}``. Head budgets
        (``"adakv"``) are not supported for chunks.
    quantization : kvpress_rs.QuantConfig or dict, optional
        Quantized chunks (a ``QuantConfig`` or a dict of its keyword arguments). Keys are
        quantized BEFORE RoPE: ``pre_rope_keys`` is forced to True (whatever is given), so
        a chunk's blocks move to any offset by changing their positions only — nothing is
        re-quantized. A chunk is encoded by one forward through a ``QuantizedKVCache``
        (with ``compression`` too, through ``KVCache(..., quantization=...)``: eviction,
        then quantization of the kept tokens) with blocks of ``group_size`` tokens
        (``residual_length=0`` while encoding: every whole group is quantized, the last
        ``< group_size`` tokens stay in full precision). The assembled cache quantizes the
        tokens that come after the chunks with the given config (its ``residual_length``).
        ``hadamard=True`` works as in the cache (codes of Hadamard-rotated pre-RoPE keys,
        which an offset does not touch). Refused: ``sink_tokens > 0`` (the assembled
        cache holds the chunks' full-precision remainders where sinks live) and rope types
        whose frequencies depend on the length (``dynamic``, ``longrope``).
        ``recompute_ratio`` must be 0 with quantized chunks.
    on_invalid : "miss" or "raise"
        What :meth:`encode` does with a corrupt or mismatched entry: re-encode it and
        overwrite it (counted in ``stats["invalid"]``), or raise
        :class:`CorruptChunkError` / :class:`ChunkMismatchError`. :meth:`load` always raises.

    Example
    -------
    >>> import torch, kvpress_rs  # doctest: +SKIP
    >>> store = kvpress_rs.ChunkStore(model, tokenizer, backend="/tmp/chunks")  # doctest: +SKIP
    >>> docs = [tokenizer(d, add_special_tokens=False).input_ids for d in documents]  # doctest: +SKIP
    >>> cache = store.assemble(docs, prefix=system_ids, recompute_ratio=0.1)  # doctest: +SKIP
    >>> ids = torch.cat([cache.input_ids, question_ids], dim=1)  # doctest: +SKIP
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
    >>> q4 = kvpress_rs.ChunkStore(model, tokenizer, backend="/tmp/chunks",  # doctest: +SKIP
    ...                            quantization={"bits": 4, "group_size": 32})
    >>> cache = q4.assemble(docs, prefix=system_ids)  # quantized layers, blocks moved by positions  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        backend: Any = None,
        compression: dict[str, Any] | None = None,
        quantization: QuantConfig | dict[str, Any] | None = None,
        on_invalid: str = "miss",
    ):
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(f"invalid `model`: got {type(model).__name__}, expected a transformers model")
        config = decoder_config(model)
        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
            raise UnsupportedModelError(
                f"`model` ({type(model).__name__}) has sliding-window or other non-full-attention layers; "
                "chunk reuse needs every layer to keep every token"
            )
        self.quantization = _check_quantization(quantization, config)
        if on_invalid not in ("miss", "raise"):
            raise InvalidArgumentError(f"invalid `on_invalid`: got {on_invalid!r}, expected 'miss' or 'raise'")
        self.compression = _check_compression(compression)
        self.model, self.tokenizer, self.on_invalid = model, tokenizer, on_invalid
        self.rope = Rope.from_config(config)
        if self.quantization is not None:
            _native.QuantizedStore(self.quantization, self.rope)  # refuses length-dependent rope types
        self.backend = _backend(backend)
        self._model_ident = _entry.model_identity(model)
        self._tokenizer_ident = _entry.tokenizer_identity(tokenizer)
        self._rope_ident = _entry.rope_identity(model)
        quant_ident = None
        if self.quantization is not None:
            # the parts layout version: a change of what the parts mean is another entry
            quant_ident = {"config": _config_dict(self.quantization), "parts": 1}
        self._settings = {"eviction": self.compression, "quantization": quant_ident}
        self.stats = {"hits": 0, "misses": 0, "invalid": 0, "bytes_written": 0, "bytes_read": 0}

    # -- identity ---------------------------------------------------------------------------

    def token_ids(self, chunk: Any) -> torch.Tensor:
        """A chunk as int64 (n,) ids: text (needs the tokenizer; no special tokens added),
        a list of ints, or a (n,) / (1, n) tensor."""
        if isinstance(chunk, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("invalid `chunk`: text needs a tokenizer; pass token ids or a tokenizer")
            chunk = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(chunk).to("cpu", torch.int64)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise InvalidArgumentError(
                f"invalid `chunk`: got ids of shape {tuple(ids.shape)}, expected a non-empty (n,) or (1, n)"
            )
        return ids

    def identity(self, chunk: Any) -> dict[str, Any]:
        """The identity document of ``chunk`` (what its key is the hash of)."""
        return _entry.identity(self._model_ident, self._tokenizer_ident, self._rope_ident, self._settings,
                               self.token_ids(chunk))

    def key(self, chunk: Any) -> str:
        """The backend key of ``chunk``."""
        return _entry.key_of(self.identity(chunk))

    # -- entries ----------------------------------------------------------------------------

    def load(self, chunk: Any) -> _entry.EncodedChunk | None:
        """The stored encoding of ``chunk``, verified; None when absent. Raises
        :class:`CorruptChunkError` or :class:`ChunkMismatchError` for an invalid entry."""
        ident = self.identity(chunk)
        key = _entry.key_of(ident)
        data = self.backend.get(key)
        if data is None:
            return None
        self.stats["bytes_read"] += len(data)
        encoded = _entry.from_bytes(data, ident, device=self.model.device)
        encoded.key = key
        return encoded

    def encode(self, chunk: Any) -> _entry.EncodedChunk:
        """The encoding of ``chunk``: from the backend when stored and valid, else computed
        (one forward at positions 0..n) and stored."""
        try:
            found = self.load(chunk)
        except ChunkStoreError:
            if self.on_invalid == "raise":
                raise
            self.stats["invalid"] += 1
            found = None
        if found is not None:
            self.stats["hits"] += 1
            return found
        self.stats["misses"] += 1
        ids = self.token_ids(chunk)
        encoded = self._compute(ids)
        ident = self.identity(ids)
        encoded.key = _entry.key_of(ident)
        data = _entry.to_bytes(encoded, ident)
        self.backend.put(encoded.key, data)
        self.stats["bytes_written"] += len(data)
        return encoded

    def entry_nbytes(self, chunk: Any) -> int | None:
        """Bytes the stored entry of ``chunk`` takes in the backend (None when absent)."""
        data = self.backend.get(self.key(chunk))
        return None if data is None else len(data)

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor) -> _entry.EncodedChunk:
        from ..cache import KVCache

        model = self.model
        if self.quantization is not None:
            return self._compute_quantized(ids)
        cache = KVCache(model, **self.compression) if self.compression else DynamicCache(config=model.config)
        model(ids[None].to(model.device), past_key_values=cache, use_cache=True)
        layers = []
        for layer in cache.layers:
            store = getattr(layer, "state", None)
            if store is None:
                layers.append((layer.keys, layer.values, None))
                continue
            if store.is_ragged:
                raise UnsupportedModelError(
                    "invalid `compression`: a head budget left rows of different lengths, which chunk "
                    "assembly does not support; use head_budget='uniform'"
                )
            positions = store.kept_positions().to(torch.int32) if store.has_evicted else None
            layers.append((store.keys().clone(), store.values().clone(), positions))
        return _entry.EncodedChunk(ids, layers)

    @torch.no_grad()
    def _compute_quantized(self, ids: torch.Tensor) -> _entry.EncodedChunk:
        from ..cache import KVCache
        from ..quantized import QuantizedKVCache

        model = self.model
        # Blocks of group_size while encoding: every whole group quantized.
        config = _with(self.quantization, residual_length=0, block_length=None)
        if self.compression:
            cache = KVCache(model, **self.compression, quantization=config)
        else:
            cache = QuantizedKVCache.from_config(model, config)
        model(ids[None].to(model.device), past_key_values=cache, use_cache=True)
        parts = [layer.state.quantized_parts() for layer in cache.layers]
        return _entry.EncodedChunk(ids, [], quantized=parts)

    def _assemble_quantized(self, encoded: list[_entry.EncodedChunk]) -> list[Any]:
        config = decoder_config(self.model)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        return [
            _native.assemble_quantized_layer(
                self.quantization, self.rope, (1, heads, head_dim, head_dim), dtype,
                [(e.quantized[i], e.n_tokens) for e in encoded],
            )
            for i in range(config.num_hidden_layers)
        ]

    # -- assembly ---------------------------------------------------------------------------

    def assemble(
        self,
        chunks: Sequence[Any],
        *,
        prefix: Any = None,
        recompute_ratio: float = 0.0,
        probe_layer: int = 1,
    ) -> AssembledCache:
        """A cache holding ``prefix`` (optional) then every chunk, each placed right after
        the previous one: chunk keys shifted to their offsets (Rust, one rotation each),
        values as they are. Chunks missing from the backend are encoded and stored first.

        Parameters
        ----------
        chunks : sequence of text, id lists or tensors
            The documents, in prompt order.
        prefix : text, ids or tensor, optional
            Tokens before the chunks (system prompt, chat header); stored like a chunk.
            Sitting at position 0, its KV is exact.
        recompute_ratio : float
            Fraction in [0, 1] of the chunk tokens to recompute with attention to what
            precedes them (``kvpress_rs.chunks.recompute`` gives the criterion). Needs
            uncompressed chunks.
        probe_layer : int
            The layer whose value deviation chooses the tokens (layers up to it are
            recomputed for every token).

        Returns
        -------
        AssembledCache
            Pass ``torch.cat([cache.input_ids, question_ids], 1)`` and the cache to
            ``generate``; generation continues at ``cache.get_seq_length()``.
        """
        if not 0.0 <= float(recompute_ratio) <= 1.0:
            raise InvalidArgumentError(f"invalid `recompute_ratio`: got {recompute_ratio}, expected a fraction in [0, 1]")
        n_layers = decoder_config(self.model).num_hidden_layers
        if recompute_ratio > 0 and not 0 <= probe_layer < n_layers:
            raise InvalidArgumentError(f"invalid `probe_layer`: got {probe_layer}, expected 0 <= layer < {n_layers}")
        if recompute_ratio > 0 and self.compression:
            raise InvalidArgumentError(
                "invalid `recompute_ratio`: recomputation needs uncompressed chunks (this store compresses with "
                f"{self.compression}); use 0.0"
            )
        if recompute_ratio > 0 and self.quantization is not None:
            raise InvalidArgumentError(
                "invalid `recompute_ratio`: recomputation is not supported with quantized chunks (the recomputed "
                "tokens would have to be re-quantized into blocks of other tokens); use 0.0"
            )
        if isinstance(chunks, (str, torch.Tensor)) or not len(chunks):
            raise InvalidArgumentError("invalid `chunks`: expected a non-empty list of chunks")
        segments = ([prefix] if prefix is not None else []) + list(chunks)
        encoded = [self.encode(segment) for segment in segments]
        stores = self._assemble_quantized(encoded) if self.quantization is not None else [
            _native.assemble_layer(self.rope, [(e.layers[i][0], e.layers[i][1], e.layers[i][2], e.n_tokens) for e in encoded])
            for i in range(n_layers)
        ]
        ids = torch.cat([e.ids for e in encoded])[None]
        spans, start = [], 0
        for e in encoded:
            spans.append((start, start + e.n_tokens))
            start += e.n_tokens
        cache = AssembledCache(self.model, stores, ids, spans, quantization=self.quantization)
        if recompute_ratio > 0:
            chunk_tokens = sum(e.n_tokens for e in encoded[1 if prefix is not None else 0 :])
            candidates = torch.zeros(start, dtype=torch.bool)
            candidates[spans[0][1] :] = True  # the first segment is exact
            n = min(int(round(recompute_ratio * chunk_tokens)), int(candidates.sum()))
            cache.recomputed = _recompute(self.model, cache, n, candidates, probe_layer)
        return cache

    def __repr__(self) -> str:
        return (
            f"ChunkStore(backend={self.backend!r}, compression={self.compression or None}, "
            f"quantization={self.quantization!r})"
        )


def _check_compression(compression: dict[str, Any] | None) -> dict[str, Any]:
    if compression is None:
        return {}
    if not isinstance(compression, dict) or "policy" not in compression:
        raise InvalidArgumentError(
            f"invalid `compression`: got {compression!r}, expected a dict of KVCache arguments with a 'policy'"
        )
    for name in ("quantization", "low_bits"):
        if compression.get(name) is not None:
            raise InvalidArgumentError(
                f"invalid `compression`: {name!r} does not belong there; pass ChunkStore(quantization=...) "
                "(low_bits is not supported for chunks)"
            )
    if compression.get("rerotate"):
        raise InvalidArgumentError("invalid `compression`: rerotate=True is not supported for chunks (expected False)")
    if compression.get("head_budget", "uniform") != "uniform":
        raise InvalidArgumentError(
            f"invalid `compression`: head_budget={compression['head_budget']!r} gives rows of different lengths; "
            "chunks support 'uniform' only"
        )
    return dict(compression)


_CONFIG_FIELDS = ("bits", "group_size", "residual_length", "block_length", "key_grouping", "value_grouping",
                  "hadamard", "outlier_fraction", "sink_tokens", "pre_rope_keys")


def _config_dict(config: QuantConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in _CONFIG_FIELDS}


def _with(config: QuantConfig, **changes: Any) -> QuantConfig:
    return QuantConfig(**{**_config_dict(config), **changes})


def _check_quantization(quantization: Any, model_config: Any) -> QuantConfig | None:
    """The chunk quantization config: pre_rope_keys forced on, sinks refused."""
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        unknown = set(quantization) - set(_CONFIG_FIELDS)
        if unknown:
            raise InvalidArgumentError(
                f"invalid `quantization`: unknown option(s) {sorted(unknown)}, expected QuantConfig arguments "
                f"{list(_CONFIG_FIELDS)}"
            )
        quantization = QuantConfig(**{**quantization, "pre_rope_keys": True})
    if not isinstance(quantization, QuantConfig):
        raise InvalidArgumentError(
            f"invalid `quantization`: got {type(quantization).__name__}, expected a kvpress_rs.QuantConfig, "
            "a dict of its arguments, or None"
        )
    if quantization.sink_tokens:
        raise InvalidArgumentError(
            f"invalid `quantization`: sink_tokens={quantization.sink_tokens} is not supported for chunks (the "
            "assembled cache keeps each chunk's full-precision remainder where sinks live); expected 0"
        )
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    quantization.check_head_dims(head_dim)
    return _with(quantization, pre_rope_keys=True)


def _backend(backend: Any) -> Backend:
    if backend is None:
        from ..models import cache_dir

        return LocalDirBackend(cache_dir() / "chunks")
    if isinstance(backend, (str, os.PathLike)):
        return LocalDirBackend(backend)
    if all(hasattr(backend, m) for m in ("get", "put", "delete")):
        return backend
    raise InvalidArgumentError(
        f"invalid `backend`: got {type(backend).__name__}, expected a directory path or an object with get/put/delete"
    )
