"""The cache assembled from reused chunks: a :class:`~kvpress_rs.KVCache` whose layers are
``CompressedLayer`` s without a press, each holding one Rust ``LayerStore`` built by
``_native.assemble_layer`` (chunks shifted to their offsets and concatenated, in Rust).

Quantized chunks (``ChunkStore(quantization=...)``): each layer holds one Rust
``QuantizedStore`` built by ``_native.assemble_quantized_layer`` instead (chunk blocks
moved by their offset, positions only; the chunks' full-precision remainders shifted and
held in front), set as the ``CompressedLayer``'s quantized store, exactly as a
``KVCache(quantization=...)`` layer is after its prefill: later tokens are appended to it
and attention runs through the fused kernel over the codes.

So everything a ``KVCache`` offers works on it unchanged: ``nbytes``, ``stats()``,
``kept_positions(layer)`` (global positions of the kept tokens of compressed chunks),
``crop``, beam reordering, and the check that ``generate``'s input continues the assembled
ids. It reports the total token count from ``get_seq_length()``, so generation continues
at that position, and decoding appends without further compression.
"""

from __future__ import annotations

from typing import Any

import torch

from .._layer import LayerStateCache
from .._native import LayerState, QuantConfig, QuantizedStore
from ..cache import CompressedLayer
from ..models import decoder_config
from ..rope import Rope


class AssembledCache(LayerStateCache):
    """A drop-in ``past_key_values`` made of reused chunks (build it with
    :meth:`kvpress_rs.ChunkStore.assemble`).

    Attributes
    ----------
    input_ids : torch.Tensor
        (1, n) the token ids the cache holds, segment after segment: pass
        ``torch.cat([cache.input_ids, question_ids], 1)`` to ``generate``.
    segments : list of (start, end)
        Token span of each segment (prefix first when there is one).
    recomputed : torch.Tensor or None
        Positions of the tokens recomputed in the layers past the probe layer.

    Example
    -------
    >>> cache = chunk_store.assemble([doc1_ids, doc2_ids], prefix=system_ids)  # doctest: +SKIP
    >>> ids = torch.cat([cache.input_ids, question_ids], dim=1)  # doctest: +SKIP
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
    """

    layer_class = CompressedLayer

    def __init__(
        self,
        model: Any,
        stores: list[Any],
        input_ids: torch.Tensor,
        segments: list[tuple[int, int]],
        quantization: QuantConfig | None = None,
    ):
        config = decoder_config(model)
        self.rope = Rope.from_config(config)
        self.rerotate = False
        self.press = None
        self.decoding = None
        self.quantization = quantization
        total = int(input_ids.shape[-1])
        # each layer as a KVCache layer is after its prompt: it holds the assembled tokens
        # (quantized: the tokens it does not store were evicted) and appends without press
        states = [
            LayerState.assembled_quantized(idx, store, total, self.rope)
            if isinstance(store, QuantizedStore)
            else LayerState.assembled(idx, store)
            for idx, store in enumerate(stores)
        ]
        super().__init__(model, states)
        param = next(model.parameters())
        for layer in self.layers:
            layer.dtype, layer.device, layer.is_initialized = param.dtype, param.device, True
        self._token_log.record(input_ids)
        self.input_ids = input_ids
        self.segments = segments
        self.recomputed: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.input_ids = self.input_ids[:, :0]
        self.segments = []

    def __repr__(self) -> str:
        return (
            f"AssembledCache(tokens={self.get_seq_length()}, segments={len(self.segments)}, "
            f"layers={len(self.layers)}, nbytes={self.nbytes})"
        )
