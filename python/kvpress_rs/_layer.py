"""What every kvpress_rs cache shares: :class:`CacheLayer`, the transformers layer that
adapts one Rust ``LayerState`` (it holds no state of its own), and :class:`LayerStateCache`,
a transformers ``Cache`` made of such layers plus the Rust ``LayerGroup`` that runs the
cross-layer steps after each forward.

A forward through a layer: transformers calls ``update`` (→ ``LayerState.append``), then
the attention function, which kvpress_rs routes to ``attend``: the model's own attention
over what ``append`` returned, or a Rust kernel of the layer (``LayerState.route`` says
which), then ``LayerState.after_attention`` with the layer's queries.

Example
-------
>>> from kvpress_rs._layer import CacheLayer  # doctest: +SKIP
>>> isinstance(kvpress_rs.KnormCache(model).layers[0], CacheLayer)  # doctest: +SKIP
True
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _compat, attention
from ._guard import GuardedCache, TokenLog
from ._hooks import install_model_hooks
from ._native import LayerGroup, LayerState
from .errors import CacheStateError, UnsupportedError

# Attention options the quantized kernel does not implement: a layer that receives one of
# them attends through the model's own function over dequantized keys/values instead.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks")


class CacheLayer(CacheLayerMixin):
    """One layer of a kvpress_rs cache: transformers' ``CacheLayerMixin`` over a Rust
    ``LayerState`` (``self.state``)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state
        self.layer_idx = state.layer_idx

    # transformers reads `layer.keys` / `layer.values` (and sets them to None on init):
    # what one tensor of each shows of the stored tokens (views, or dequantized copies),
    # read-only; None where no single tensor holds them.
    @property
    def keys(self) -> torch.Tensor | None:
        return self.state.keys() if self.is_initialized else None

    @keys.setter
    def keys(self, value: object) -> None:
        if value is not None:
            raise CacheStateError(f"{type(self).__name__}.keys is read-only; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return self.state.values() if self.is_initialized else None

    @values.setter
    def values(self, value: object) -> None:
        if value is not None:
            raise CacheStateError(f"{type(self).__name__}.values is read-only; use update()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.state.append(key_states, value_states, attention.serves(self))

    def attend(
        self,
        attention_fn: Any,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's attention (called by ``attention.kvpress_attention``), where the
        layer state routes it, then the layer's steps after attention (its queries)."""
        route = self.state.route
        q_len = query.shape[-2]
        if route == "model":
            mask = self.state.model_mask(attention_mask, q_len)
            output = attention_fn(module, query, key, value, mask, **kwargs)
        elif route == "rows":
            output = self.state.attend_rows(query, _scaling(module, query, kwargs)), None
        elif route == "kernel":
            output = self._attend_kernel(attention_fn, module, query, attention_mask, kwargs)
        else:
            output = self._attend_heads(attention_fn, module, query, attention_mask, kwargs)
        self._after_attention(query)
        return output

    def _after_attention(self, query: torch.Tensor) -> None:
        self.state.after_attention(query)

    def _attend_kernel(
        self, attention_fn: Any, module: torch.nn.Module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused kernel over the quantized tokens; options it does not implement
        (soft-capping, sliding windows, attention sinks, dropout while training) go through
        the model's own attention over dequantized copies instead."""
        if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS) or (
            module.training and kwargs.get("dropout", 0.0)
        ):
            stats = self.state.quantized_stats()
            if stats is not None and stats["low_bits_tokens"]:
                raise UnsupportedError(
                    "low_bits (mixed precision) supports plain attention only (no softcap, sliding window, sinks)"
                )
            keys, values = self.state.dequantized()
            return attention_fn(module, query, keys, values, self.state.model_mask(mask, query.shape[-2]), **kwargs)
        return self.state.attend_kernel(query, mask, _scaling(module, query, kwargs)), None

    def _attend_heads(
        self, attention_fn: Any, module: torch.nn.Module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
    ) -> tuple[torch.Tensor, None]:
        """Each head set over its own tokens, written into the query heads it serves."""
        batch, q_heads, q_len, _ = query.shape
        out = None
        for heads, keys, values, part_mask, kernel in self.state.head_parts(mask, q_len, q_heads):
            part_query = query.index_select(1, heads)
            if kernel:
                part = self.state.attend_retrieval(part_query, part_mask, _scaling(module, query, kwargs))
            else:
                part, _ = attention_fn(module, part_query, keys, values, part_mask, **kwargs)
            if out is None:
                out = query.new_empty(batch, q_len, q_heads, part.shape[-1])
            out[:, :, heads] = part.to(out.dtype)
        return out, None

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, cache_position_or_query_length: torch.Tensor | int) -> tuple[int, int]:
        return self.state.mask_sizes(_compat.query_length(cache_position_or_query_length))

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.state.reset()
        self.is_initialized = False

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        self.state.crop(_compat.tokens_to_remove(max_length_or_tokens_to_remove, self.state.seen))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.index_batch(beam_idx.to(torch.long).flatten())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state.index_batch(batch_indices(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state.repeat_interleave_batch(repeats)

    def offload(self):
        raise UnsupportedError("offloading is not supported by kvpress_rs caches")

    def prefetch(self):
        raise UnsupportedError("offloading is not supported by kvpress_rs caches")

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's stores (keys, values, positions; codes, scales and
        zeros, outliers once quantized)."""
        return self.state.nbytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state!r})"


class LayerStateCache(GuardedCache, Cache):
    """A transformers ``Cache`` whose layers are :class:`CacheLayer` s over Rust
    ``LayerState`` s (``layers`` given per model layer; a transformers layer — a
    sliding-window one — is kept as it is), with a Rust ``LayerGroup`` for the steps that
    need every layer, and the hooks on ``model``. The base of every kvpress_rs cache, and
    the public way to build one from layer states.

    >>> states = [kvpress_rs._native.LayerState(i, press) for i in range(n_layers)]  # doctest: +SKIP
    >>> cache = LayerStateCache(model, states)  # doctest: +SKIP
    """

    layer_class: type[CacheLayer] = CacheLayer

    def __init__(self, model: Any, layers: list[Any], *, rerotate: Any = None):
        layers = [self.layer_class(layer) if isinstance(layer, LayerState) else layer for layer in layers]
        super().__init__(layers=layers)
        self._group = LayerGroup([layer.state for layer in layers if isinstance(layer, CacheLayer)], rerotate)
        self._token_log = TokenLog()
        if isinstance(model, torch.nn.Module):
            install_model_hooks(model)

    def layer_states(self) -> list[LayerState]:
        """The Rust state of every kvpress_rs layer, in layer order."""
        return [layer.state for layer in self.layers if isinstance(layer, CacheLayer)]

    # The protocol of the model hooks (_hooks.py).
    def _forward_started(self, attention_mask: torch.Tensor | None = None) -> None:
        self._group.begin_forward(_visibility(attention_mask))

    def _forward_finished(self) -> None:
        self._group.finish_forward()

    def _state(self, layer_idx: int) -> LayerState:
        layer = self.layers[layer_idx]
        if not isinstance(layer, CacheLayer):
            raise CacheStateError(f"layer {layer_idx} is a {type(layer).__name__}, not a kvpress_rs layer")
        return layer.state

    def kept_positions(self, layer_idx: int) -> torch.Tensor | list:
        """Original positions of the tokens layer ``layer_idx`` keeps (where they were in
        the sequence seen, also after re-rotation), ascending: an int64 tensor (batch,
        kv_heads, n_kept) when every head keeps the same count, −1 marking the padding slots
        of rows of a padded batch that keep fewer tokens; with a head budget (AdaKV), a
        list of per-head int64 tensors of shape (batch, n_h) — or, when batch rows of a
        head differ in count, a list over heads of lists over batch rows."""
        return self._per_head(self._state(layer_idx), self._state(layer_idx).kept_positions())

    def key_positions(self, layer_idx: int) -> torch.Tensor | list:
        """Where the kept keys of layer ``layer_idx`` sit now: their original positions, or
        after ``rerotate=True`` the compact positions they were rotated to (same layout as
        :meth:`kept_positions`)."""
        return self._per_head(self._state(layer_idx), self._state(layer_idx).key_positions())

    @staticmethod
    def _per_head(state: LayerState, positions: Any) -> Any:
        if isinstance(positions, torch.Tensor):
            return positions
        batch, heads = state.batch_heads
        per_head = [[positions[b * heads + h] for b in range(batch)] for h in range(heads)]
        return [torch.stack(rows) if len({len(r) for r in rows}) == 1 else rows for rows in per_head]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every layer's stores, and the keys/values of any layer
        transformers keeps itself (sliding-window layers)."""
        return layers_nbytes(self.layers)

    def stats(self) -> dict[str, Any]:
        """Tokens seen, tokens kept per layer and bytes held.

        Returns a dict with ``tokens_seen`` (int), ``tokens_kept`` (list, one entry per
        layer: tokens per KV head, the mean over heads when a head budget gives them
        different counts), ``tokens_kept_per_row`` (list per layer of the counts of every
        (batch, kv_head) row), ``nbytes`` (int) and ``nbytes_per_layer`` (list).
        """
        kept, rows, per_layer = [], [], []
        for layer in self.layers:
            if isinstance(layer, CacheLayer):
                lengths = layer.state.lengths()
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


def _visibility(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which tokens of a forward are real, from its 2-D attention mask (batch, seen + q):
    None when every one is (no padding) or the mask is not 2-D (a custom 4-D mask)."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    return attention_mask.to(torch.bool)


def _scaling(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    return float(scaling)


def batch_indices(indices: torch.Tensor) -> torch.Tensor:
    """``batch_select_indices``' argument (indices or a bool mask) as flat int64 indices."""
    indices = torch.as_tensor(indices)
    if indices.dtype == torch.bool:
        indices = indices.nonzero()
    return indices.to(torch.long).flatten()


def layers_nbytes(layers: list) -> int:
    """Bytes held by a cache's layers: ours report their own (``nbytes``); a layer
    transformers keeps itself (a sliding-window layer) holds its keys and values."""
    total = 0
    for layer in layers:
        if isinstance(layer, CacheLayer):
            total += layer.nbytes
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.nbytes + layer.values.nbytes
    return total
