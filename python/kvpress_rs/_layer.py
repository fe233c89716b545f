"""What every kvpress_rs cache layer shares: transformers' ``CacheLayerMixin`` for a layer
that holds its tokens in stores of its own (no static shape, no offloading)."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .errors import CacheStateError, UnsupportedError


class StoreLayer(CacheLayerMixin):
    """Base of ``CompressedLayer``, ``QuantizedLayer`` and ``RetrievalHeadsLayer``."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    # transformers reads `layer.keys` / `layer.values` (and sets them to None on init):
    # what one tensor of each can show of the stored tokens, read-only.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._stored_keys()

    @keys.setter
    def keys(self, value: object) -> None:
        if value is not None:
            raise CacheStateError(f"{type(self).__name__}.keys is read-only; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return self._stored_values()

    @values.setter
    def values(self, value: object) -> None:
        if value is not None:
            raise CacheStateError(f"{type(self).__name__}.values is read-only; use update()")

    def _stored_keys(self) -> torch.Tensor | None:
        """The stored keys as one tensor, or None when no single tensor holds them."""
        return None

    def _stored_values(self) -> torch.Tensor | None:
        return None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def offload(self):
        raise UnsupportedError("offloading is not supported by kvpress_rs caches")

    def prefetch(self):
        raise UnsupportedError("offloading is not supported by kvpress_rs caches")


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
        if isinstance(layer, StoreLayer):
            total += layer.nbytes
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.nbytes + layer.values.nbytes
    return total
