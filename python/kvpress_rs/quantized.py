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

from transformers.cache_utils import DynamicCache, DynamicLayer

from ._layer import CacheLayer, LayerStateCache
from ._native import LayerState, QuantConfig, RopeTable
from .models import decoder_config
from .rope import Rope


class QuantizedLayer(CacheLayer):
    """One full-attention layer of a :class:`QuantizedKVCache` (a
    :class:`~kvpress_rs._layer.CacheLayer` over a Rust ``LayerState`` holding a
    ``QuantizedStore``)."""


class QuantizedKVCache(LayerStateCache):
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
        layers = [
            LayerState.quantized(idx, self.quant_config, rope, self._rope_table) if type(layer) is DynamicLayer else layer
            for idx, layer in enumerate(DynamicCache(config=config).layers)
        ]
        super().__init__(model, layers)

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

    layer_class = QuantizedLayer

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every quantized layer's store, the cos/sin table the layers
        share with ``pre_rope_keys``, and the keys/values of any layer transformers keeps
        itself (sliding-window layers)."""
        return self.rope_table_nbytes + super().nbytes

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
        states = self.layer_states()
        counts = [state.quantized_stats() for state in states]
        return {
            "tokens_seen": self.get_seq_length(),
            "sink_tokens": [c["sink_tokens"] if c else 0 for c in counts],
            "quantized_tokens": [c["quantized_tokens"] if c else 0 for c in counts],
            "residual_tokens": [c["residual_tokens"] if c else 0 for c in counts],
            "nbytes": self.nbytes,
            "nbytes_per_layer": [state.nbytes for state in states],
            "rope_table_nbytes": self.rope_table_nbytes,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.quant_config!r}, layers={len(self.layers)})"
