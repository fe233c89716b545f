"""Drop-in transformers caches that compress the KV cache with a Rust press.

A :class:`KVCache` is a ``transformers.Cache`` whose full-attention layers are
:class:`CompressedLayer` s. Each layer holds a Rust ``LayerStore``; on the first forward
(the prefill) the layer returns the full keys/values for that forward's attention, then
the press scores the tokens and the store frees all but the kept ones. Later forwards
(decoding, a question, the next chat turn) append without compression.

Positions: the cache reports tokens SEEN from ``get_seq_length()`` so that generation
continues at the right position, and describes the keys it actually STORES to the mask
(``get_mask_sizes``), offset so that a multi-token chunk after compression stays causal.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from . import _compat, attention
from ._native import LayerStore, Press
from .rope import Rope
from ._guard import TokenLog
from ._hooks import install_model_hooks
from .errors import CacheStateError, UnsupportedModelError
from .models import decoder_config


class CompressedLayer(CacheLayerMixin):
    """One full-attention layer of a :class:`KVCache`: a Rust ``LayerStore`` plus the
    shared press, adapted to transformers' ``CacheLayerMixin`` interface."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, press: Press, layer_idx: int):
        super().__init__()
        self._store = LayerStore()
        self._press = press
        self.layer_idx = layer_idx
        self._pending_compression = False
        self._scored: tuple[torch.Tensor, float] | None = None

    # transformers reads `layer.keys` / `layer.values`; they are views of the Rust store
    # (None for ragged rows, which no single tensor holds: read them with `row`).
    @property
    def keys(self) -> torch.Tensor | None:
        return self._store.keys() if self._store.seen and not self._store.is_ragged else None

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise CacheStateError("CompressedLayer.keys is read-only; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return self._store.values() if self._store.seen and not self._store.is_ragged else None

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise CacheStateError("CompressedLayer.values is read-only; use update()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        is_prefill = self._store.seen == 0
        keys, values = self._store.append(key_states, value_states)
        if is_prefill:
            # This forward's attention still sees every token (keys/values above); the
            # store keeps only what the press selects, right after that attention.
            if attention.serves(self):
                self._pending_compression = True
            else:  # no attention hook (a cache built from a config): compress now
                self._compress(None)
        return keys, values

    def attend(
        self,
        attention: Any,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's attention (called by ``attention.kvpress_attention``): the model's
        own attention over what ``update`` returned — or, for ragged rows, head by head in
        Rust — then the prefill compression, which sees this layer's queries."""
        if self._store.is_ragged:
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            return self._store.attend_rows(query, float(scaling)), None
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = _fit_mask(attention_mask, key.shape[-2], query.shape[-2])
        output = attention(module, query, key, value, attention_mask, **kwargs)
        if self._pending_compression:
            if self._press.needs_all_layers:
                # CAKE: score now (this layer's queries are here), evict once every layer's
                # preference is known, at the end of the forward.
                self._pending_compression = False
                self._scored = self._score(query)
            else:
                self._compress(query)
        return output

    def _score(self, query: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self._store.score(self._press, self.layer_idx, query)

    def _compress(self, query: torch.Tensor | None) -> None:
        self._pending_compression = False
        self._store.compress(self._press, self.layer_idx, query if self._press.query_window else None)

    def _forward_started(self) -> None:
        self._pending_compression = False
        self._scored = None

    def _forward_finished(self) -> None:
        # A model whose attention does not go through transformers' attention interface
        # never called `attend`: compress here, after the whole forward, instead.
        if self._pending_compression:
            if self._press.query_window is not None:
                self._pending_compression = False
                raise UnsupportedModelError(
                    f"policy {self._press.policy!r} scores tokens with the model's queries, but layer "
                    f"{self.layer_idx}'s attention did not go through transformers' attention interface"
                )
            self._compress(None)

    def get_seq_length(self) -> int:
        return self._store.seen

    def get_mask_sizes(self, cache_position_or_query_length: torch.Tensor | int) -> tuple[int, int]:
        query_length = _compat.query_length(cache_position_or_query_length)
        stored, seen = self._store.stored, self._store.seen
        return stored + query_length, seen - stored

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self._store.reset()
        self.is_initialized = False

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        self._store.crop(_compat.tokens_to_remove(max_length_or_tokens_to_remove, self._store.seen))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._store.index_batch(beam_idx.to(torch.long).flatten())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero()
        self._store.index_batch(indices.to(torch.long).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._store.repeat_interleave_batch(repeats)

    def offload(self):
        raise NotImplementedError("offloading is not supported by kvpress_rs caches")

    def prefetch(self):
        raise NotImplementedError("offloading is not supported by kvpress_rs caches")

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer: keys, values and kept positions."""
        return self._store.nbytes

    def __repr__(self) -> str:
        return f"CompressedLayer(layer_idx={self.layer_idx}, {self._store!r})"


class KVCache(Cache):
    """A transformers cache that compresses the prompt's KV cache once per layer, right
    after that layer's prefill attention, with a Rust policy.

    Parameters
    ----------
    model : transformers.PreTrainedModel or PretrainedConfig
        The model the cache serves (its config gives the layers; a model also lets the
        cache detect reuse for an unrelated prompt).
    policy : str
        A policy name: ``"knorm"``, ``"streaming_llm"``, ``"random"``, ``"snapkv"``,
        ``"tova"``, ``"observed_attention"``, ``"keydiff"``, ``"lagkv"`` (see
        ``kvpress_rs.policies.REGISTRY``).
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1) (kvpress's meaning): each layer
        keeps ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str
        ``"uniform"`` or ``"pyramid"`` (PyramidKV's linear decrease with depth, ``beta=20``).
    head_budget : str
        ``"uniform"`` or ``"adakv"`` (AdaKV: heads keep different counts, at least
        ``alpha_safeguard=0.2`` of the mean; the memory of evicted tokens is freed).
    rerotate : bool
        Re-rotate the kept keys to compact positions (one delta rotation per key, angles in
        float64) so that generation continues at position n_kept instead of the number of
        tokens seen. With per-layer or per-head budgets, every row is compacted to end
        right before the same next position (the longest row's length).
    **policy_kwargs
        Policy parameters: ``n_sink`` (StreamingLLM, default 4), ``seed`` (Random),
        ``window_size``/``kernel_size`` (SnapKV, 64/5), ``lag_size`` (LagKV), ...

    Example
    -------
    >>> import kvpress_rs  # doctest: +SKIP
    >>> cache = kvpress_rs.KVCache(model, policy="knorm", compression_ratio=0.5)  # doctest: +SKIP
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
    >>> cache.stats()["tokens_kept"][:3]  # doctest: +SKIP
    [512, 512, 512]
    """

    def __init__(
        self,
        model: Any,
        policy: str = "knorm",
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        head_budget: str = "uniform",
        rerotate: bool = False,
        **policy_kwargs: Any,
    ):
        config = decoder_config(model)
        if not _has_rope(config):
            raise UnsupportedModelError(
                f"`model` ({type(config).__name__}) has no rotary position embedding config "
                "(rope_parameters / rope_theta); kvpress_rs caches need a RoPE model"
            )
        self.rope = Rope.from_config(config)
        self.rerotate = bool(rerotate)
        self.press = Press(
            policy,
            compression_ratio=compression_ratio,
            max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            n_layers=config.num_hidden_layers,
            rope=self.rope,
            **policy_kwargs,
        )
        if self.rerotate and not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError("rerotate=True re-rotates after the whole prefill: pass the model itself, not its config")
        if self.press.query_window is not None and not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError(
                f"policy {policy!r} scores tokens with the model's queries: pass the model itself, not its config"
            )
        # transformers decides which layers are sliding-window; those stay as they are.
        layers = []
        for idx, layer in enumerate(DynamicCache(config=config).layers):
            layers.append(CompressedLayer(self.press, idx) if type(layer) is DynamicLayer else layer)
        super().__init__(layers=layers)
        self._token_log = TokenLog()
        if isinstance(model, torch.nn.Module):
            install_model_hooks(model)

    def reset(self) -> None:
        """Empties the cache so that it can serve an unrelated prompt."""
        super().reset()
        self._token_log.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._token_log.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        indices = torch.as_tensor(indices)
        self._token_log.index_batch(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._token_log.repeat_interleave(repeats)

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        seen = self.get_seq_length()
        super().crop(max_length_or_tokens_to_remove)
        self._token_log.truncate(self.get_seq_length() if seen else 0)

    def _forward_started(self) -> None:
        for _, layer in self._compressed_layers():
            layer._forward_started()

    def _forward_finished(self) -> None:
        for _, layer in self._compressed_layers():
            layer._forward_finished()
        scored = [layer for _, layer in self._compressed_layers() if layer._scored is not None]
        if scored:
            self._allocate(scored)
        if self.rerotate:
            self._rerotate()

    def _rerotate(self) -> None:
        """Compacts the kept keys' positions (after a compression) so that every layer ends
        right before one shared next position."""
        layers = [layer for _, layer in self._compressed_layers() if layer._store.seen]
        if not layers or not any(layer._store.has_evicted for layer in layers):
            return
        next_position = max(layer._store.stored for layer in layers)
        if all(layer._store.seen == next_position for layer in layers):
            return  # already compact (a later forward)
        for layer in layers:
            layer._store.rerotate(self.rope, next_position)

    def _allocate(self, scored: list[CompressedLayer]) -> None:
        """Splits the budget across the scored layers (CAKE) and evicts in each."""
        budgets = self.press.allocate([layer._store.stored for layer in scored], [layer._scored[1] for layer in scored])
        for layer, n_kept in zip(scored, budgets):
            scores, _ = layer._scored
            layer._scored = None
            layer._store.compress_scored(self.press, scores, n_kept)

    def _record_token_ids(self, input_ids: torch.Tensor | None) -> None:
        self._token_log.record(input_ids)

    def _check_continues(self, input_ids: torch.Tensor) -> None:
        self._token_log.check_continues(input_ids, self.get_seq_length())

    def _compressed_layers(self) -> list[tuple[int, CompressedLayer]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def kept_positions(self, layer_idx: int) -> torch.Tensor | list[torch.Tensor]:
        """Original positions of the tokens layer ``layer_idx`` keeps, ascending: an int64
        tensor (batch, kv_heads, n_kept) when every head keeps the same count; with a head
        budget (AdaKV), a list of per-head int64 tensors of shape (batch, n_h) — or, when
        batch rows of a head differ in count, a list over heads of lists over batch rows."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            raise CacheStateError(f"layer {layer_idx} is a {type(layer).__name__}, not a compressed layer")
        positions = layer._store.kept_positions()
        if isinstance(positions, torch.Tensor):
            return positions
        batch, heads = layer._store.batch_heads
        per_head = [[positions[b * heads + h] for b in range(batch)] for h in range(heads)]
        return [
            torch.stack(rows) if len({len(r) for r in rows}) == 1 else rows
            for rows in per_head
        ]


    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: keys, values and kept positions of every layer."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.nbytes
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def stats(self) -> dict[str, Any]:
        """Tokens seen, tokens kept per layer and bytes held.

        Returns a dict with ``tokens_seen`` (int), ``tokens_kept`` (list, one entry per
        layer: tokens per KV head, the mean over heads when a head budget gives them
        different counts), ``tokens_kept_per_row`` (list per layer of the counts of every
        (batch, kv_head) row), ``nbytes`` (int) and ``nbytes_per_layer`` (list).
        """
        kept, rows, per_layer = [], [], []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                lengths = layer._store.lengths()
                rows.append(lengths)
                mean = sum(lengths) / len(lengths) if lengths else 0
                kept.append(int(mean) if mean == int(mean) else mean)
                per_layer.append(layer.nbytes)
            else:
                keys = getattr(layer, "keys", None)
                n = int(keys.shape[-2]) if keys is not None and keys.numel() else 0
                kept.append(n)
                rows.append([n] * (keys.shape[0] * keys.shape[1]) if n else [])
                per_layer.append(keys.nbytes + layer.values.nbytes if n else 0)
        return {
            "tokens_seen": self.get_seq_length(),
            "tokens_kept": kept,
            "tokens_kept_per_row": rows,
            "nbytes": sum(per_layer),
            "nbytes_per_layer": per_layer,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(press={self.press!r}, layers={len(self.layers)})"


def _fit_mask(mask: torch.Tensor, kv_length: int, query_length: int) -> torch.Tensor:
    """The mask built for another layer's stored length, fitted to this layer's
    ``kv_length`` keys: every stored key is visible (all precede the queries), and the last
    ``query_length`` columns — the new tokens, causal among themselves — are kept."""
    stored = kv_length - query_length
    visible = True if mask.dtype == torch.bool else 0.0
    head = torch.full((*mask.shape[:-1], stored), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([head, mask[..., -query_length:]], dim=-1)


def _has_rope(config: Any) -> bool:
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))
