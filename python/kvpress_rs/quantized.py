"""A drop-in transformers cache that stores keys and values quantized, in Rust.

:class:`QuantizedKVCache` is a ``transformers.Cache`` whose full-attention layers are
:class:`QuantizedLayer` s, each holding a Rust ``QuantizedStore``: the first tokens (sinks)
and the most recent ones (the residual window) in full precision, everything in between in
bit-packed blocks that are quantized once, when the window fills, and never rewritten.

- The prefill forward attends over the full-precision keys/values of that forward (the
  model's own attention); the store quantizes them as they arrive.
- Every later forward (decoding, a question after a context) attends through the Rust
  kernel that reads the packed codes directly (``attention.py`` routes the layer's
  attention call to :meth:`QuantizedLayer.attend`); no full-precision copy of the cache is
  made.

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.QuantizedKVCache(model, bits=4)  # doctest: +SKIP
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
>>> cache.nbytes  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import _compat, attention
from ._guard import GuardedCache, TokenLog
from ._hooks import install_model_hooks
from ._layer import StoreLayer, batch_indices, layers_nbytes
from ._native import QuantConfig, QuantizedStore, RopeTable
from .models import decoder_config
from .rope import Rope

# Attention options the quantized kernel does not implement: a layer that receives one of
# them attends through the model's own function over dequantized keys/values instead.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks")


class QuantizedLayer(StoreLayer):
    """One full-attention layer of a :class:`QuantizedKVCache`: a Rust ``QuantizedStore``
    adapted to transformers' ``CacheLayerMixin`` interface."""

    def __init__(
        self, config: QuantConfig, layer_idx: int, rope: Rope | None = None, rope_table: RopeTable | None = None
    ):
        super().__init__()
        self._store = QuantizedStore(config, rope, rope_table)
        self.layer_idx = layer_idx
        self._attend_from_store = False

    # `keys` / `values` are dequantized copies (slow; for inspection only, the cache never
    # needs them).
    def _stored_keys(self) -> torch.Tensor | None:
        return self._store.dequantize()[0] if self._store.seen else None

    def _stored_values(self) -> torch.Tensor | None:
        return self._store.dequantize()[1] if self._store.seen else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self._store.seen == 0
        self._store.append(key_states, value_states)
        self._attend_from_store = False
        if first:
            # The prefill attends over its own full-precision keys/values.
            return key_states, value_states
        if attention.serves(self):
            # `attend` reads the store; what is returned here is not used.
            self._attend_from_store = True
            return key_states, value_states
        # No attention hook (a cache built from a config, an inner module's forward): the
        # model attends over dequantized copies.
        return self._store.dequantize()

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
        """This layer's attention (called by ``attention.kvpress_attention``): after the
        prefill, the fused Rust kernel over the stored (quantized) tokens."""
        if not self._attend_from_store:
            return attention(module, query, key, value, attention_mask, **kwargs)
        self._attend_from_store = False
        return attend_store(self._store, attention, module, query, attention_mask, kwargs)

    def _forward_started(self) -> None:
        self._attend_from_store = False

    def get_seq_length(self) -> int:
        return self._store.seen

    def get_mask_sizes(self, cache_position_or_query_length: torch.Tensor | int) -> tuple[int, int]:
        return self._store.seen + _compat.query_length(cache_position_or_query_length), 0

    def reset(self) -> None:
        self._store.reset()
        self.is_initialized = False

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        self._store.crop(_compat.tokens_to_remove(max_length_or_tokens_to_remove, self._store.seen))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._store.index_batch(beam_idx.to(torch.long).flatten())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._store.index_batch(batch_indices(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._store.repeat_interleave_batch(repeats)

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer: codes, scales/zeros, outliers, sinks and the residual
        window (exactly the tokens it holds)."""
        return self._store.nbytes

    def __repr__(self) -> str:
        return f"QuantizedLayer(layer_idx={self.layer_idx}, {self._store!r})"


def attend_store(
    store: QuantizedStore,
    attention: Any,
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` over every token of ``store`` through the fused Rust kernel;
    options the kernel does not implement (soft-capping, sliding windows, attention sinks,
    dropout while training) go through the model's own ``attention`` over dequantized
    copies instead. Shared by :class:`QuantizedLayer` and the quantized phase of
    :class:`~kvpress_rs.CompressedLayer`."""
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS) or (
        module.training and kwargs.get("dropout", 0.0)
    ):
        keys, values = store.dequantize()
        return attention(module, query, keys, values, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    mask = _visible(attention_mask, query.shape[-2])
    return store.attend(query, mask, float(scaling)), None


def _visible(attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """transformers' 4-D attention mask (bool, or additive float with the dtype's minimum
    where masked) as the store's bool (batch or 1, q_len, kv_len) mask of visible keys;
    None when it restricts nothing the kernel would not (causality is implicit)."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min
    if mask.dim() == 4:
        mask = mask[:, 0]
    if q_len == 1 and bool(mask.all()):
        return None
    return mask


class QuantizedKVCache(GuardedCache, Cache):
    """A transformers cache that stores keys and values quantized (bit-packed, append-only
    blocks) and attends over them with a fused Rust kernel.

    Parameters
    ----------
    model : transformers.PreTrainedModel or PretrainedConfig
        The model the cache serves. A model (not just a config) also installs the hooks
        that route attention through the quantized kernel and detect reuse for an
        unrelated prompt; with a config only, later forwards attend over dequantized copies.
    bits : int
        2, 3, 4 or 8 bits per code.
    group_size : int
        32, 64 or 128 elements per (float16 scale, float16 zero) pair.
    residual_length : int
        Most recent tokens kept in full precision (a multiple of ``group_size``, >= 0): the
        window holds up to ``max(residual_length, group_size)`` tokens.
    block_length : int or None
        Tokens quantized each time the window fills (a multiple of ``group_size``, at most
        the window); None quantizes the whole window (KIVI, quanto). ``residual_length=128,
        block_length=64`` keeps at least the 64 most recent tokens in full precision at the
        same peak bytes — at 2 bits this is worth more than any other option (recent keys
        draw most of the attention).
    key_grouping, value_grouping : str
        ``"channel"`` (one channel over ``group_size`` tokens) or ``"token"``
        (``group_size`` channels of one token). Defaults: KIVI's keys per channel, values
        per token.
    hadamard : bool
        Rotate keys and values by the orthonormal Walsh–Hadamard matrix before quantizing.
    outlier_fraction : float
        Keep the largest ``ceil(outlier_fraction * group_size)`` elements of every group
        exactly (dense-and-sparse), in [0, 0.25].
    sink_tokens : int
        Keep the first tokens in full precision.
    pre_rope_keys : bool
        Quantize keys before RoPE (KVQuant): each block's keys are rotated back by their
        positions (exactly, in Rust) before quantizing — pre-RoPE channels keep their
        outlier structure, which per-channel groups capture better — and attention
        re-applies RoPE to every dequantized tile (float64-derived cos/sin tables). With
        ``hadamard`` the keys are rotated before quantizing and back per tile before RoPE.
        Blocks of consecutive positions (no eviction) store only the first; one cos/sin
        table serves every layer (about 24 KB at 2k tokens, 40 KB at 6k). Not with rope
        types whose frequencies depend on the length (``dynamic``, ``longrope``).

    Non-finite keys or values raise ``NonFiniteError`` (nothing is stored); a group whose
    range exceeds float16 raises ``InvalidArgumentError``.

    Example
    -------
    >>> import kvpress_rs  # doctest: +SKIP
    >>> cache = kvpress_rs.QuantizedKVCache(model, bits=4, group_size=32)  # doctest: +SKIP
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        bits: int = 4,
        group_size: int = 32,
        residual_length: int = 128,
        key_grouping: str = "channel",
        value_grouping: str = "token",
        hadamard: bool = False,
        outlier_fraction: float = 0.0,
        sink_tokens: int = 0,
        pre_rope_keys: bool = False,
        block_length: int | None = None,
    ):
        self.quant_config = QuantConfig(
            bits=bits,
            group_size=group_size,
            residual_length=residual_length,
            key_grouping=key_grouping,
            value_grouping=value_grouping,
            hadamard=hadamard,
            outlier_fraction=outlier_fraction,
            sink_tokens=sink_tokens,
            pre_rope_keys=pre_rope_keys,
            block_length=block_length,
        )
        config = decoder_config(model)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.quant_config.check_head_dims(head_dim)
        rope = Rope.from_config(config) if pre_rope_keys else None
        # one cos/sin table for every layer (its bytes counted once, in `nbytes`)
        self._rope_table = RopeTable(rope) if rope is not None else None
        layers = []
        for idx, layer in enumerate(DynamicCache(config=config).layers):
            quantized = type(layer) is DynamicLayer
            layers.append(QuantizedLayer(self.quant_config, idx, rope, self._rope_table) if quantized else layer)
        super().__init__(layers=layers)
        self._token_log = TokenLog()
        if isinstance(model, torch.nn.Module):
            install_model_hooks(model)

    @classmethod
    def from_config(cls, model: Any, config: QuantConfig) -> QuantizedKVCache:
        """A cache with the options of a :class:`~kvpress_rs.QuantConfig`."""
        return cls(
            model,
            bits=config.bits,
            group_size=config.group_size,
            residual_length=config.residual_length,
            key_grouping=config.key_grouping,
            value_grouping=config.value_grouping,
            hadamard=config.hadamard,
            outlier_fraction=config.outlier_fraction,
            sink_tokens=config.sink_tokens,
            pre_rope_keys=config.pre_rope_keys,
            block_length=config.block_length,
        )

    # The protocol of the model hooks (_hooks.py).
    def _forward_started(self) -> None:
        for layer in self._quantized_layers():
            layer._forward_started()

    def _forward_finished(self) -> None:
        pass

    def _quantized_layers(self) -> list[QuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedLayer)]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every quantized layer's store, the cos/sin table the layers
        share with ``pre_rope_keys``, and the keys/values of any layer transformers keeps
        itself (sliding-window layers)."""
        return self.rope_table_nbytes + layers_nbytes(self.layers)

    @property
    def rope_table_nbytes(self) -> int:
        """Bytes of the cos/sin table shared by the layers (0 without ``pre_rope_keys``)."""
        return self._rope_table.nbytes if self._rope_table is not None else 0

    def stats(self) -> dict[str, Any]:
        """Tokens seen, per-layer token split (sinks / quantized / residual) and bytes.

        Returns a dict with ``tokens_seen``, ``sink_tokens``, ``quantized_tokens``,
        ``residual_tokens`` (lists, one entry per quantized layer), ``nbytes``,
        ``nbytes_per_layer`` (without the shared cos/sin table) and ``rope_table_nbytes``.
        """
        layers = self._quantized_layers()
        return {
            "tokens_seen": self.get_seq_length(),
            "sink_tokens": [layer._store.sink_tokens for layer in layers],
            "quantized_tokens": [layer._store.quantized_tokens for layer in layers],
            "residual_tokens": [layer._store.residual_tokens for layer in layers],
            "nbytes": self.nbytes,
            "nbytes_per_layer": [layer.nbytes for layer in layers],
            "rope_table_nbytes": self.rope_table_nbytes,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.quant_config!r}, layers={len(self.layers)})"
