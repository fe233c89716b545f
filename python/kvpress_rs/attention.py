"""The attention path of kvpress_rs caches.

When a kvpress_rs cache is first built for a model, the decoder config's attention
implementation ``X`` (sdpa, eager, ...) becomes ``"kvpress_rs_X"`` for good: our function,
registered with transformers' ``AttentionInterface`` with X's mask function. It is nothing
switched per forward (one model may run in several threads at once, each with its own
cache): in every call, :func:`kvpress_attention`

- delegates to X when the running forward of this thread has no kvpress_rs cache, or the
  layer is not ours (a plain ``DynamicCache``, a sliding-window layer), and otherwise
- hands the call to the cache layer (``layer.attend``), which sees the post-RoPE queries of
  that layer (scorers that need queries use them right after the prompt's attention) and
  can adapt the mask to what it stores.

The model hooks (``_hooks.py``) say which cache the running forward of a thread uses.
This is model-agnostic: no per-architecture re-projection of queries.

Example
-------
>>> from kvpress_rs.attention import active_cache
>>> active_cache() is None  # outside a forward with a kvpress_rs cache
True
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import UnsupportedError

PREFIX = "kvpress_rs_"

_STATE = threading.local()


def _caches() -> list[Any]:
    if not hasattr(_STATE, "caches"):
        _STATE.caches = []
    return _STATE.caches


def active_cache() -> Any:
    """The kvpress_rs cache of the forward running in this thread, or None."""
    caches = _caches()
    return caches[-1] if caches else None


def serves(layer: Any) -> bool:
    """Whether the running forward goes through the kvpress_rs attention for ``layer``
    (so ``layer.attend`` will be called after its ``update``)."""
    cache = active_cache()
    layer_idx = getattr(layer, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    return layers is not None and isinstance(layer_idx, int) and layer_idx < len(layers) and layers[layer_idx] is layer


def enter(cache: Any) -> None:
    """The running forward of this thread uses ``cache`` (until the matching :func:`exit`)."""
    _caches().append(cache)


def exit() -> None:  # noqa: A001 - the pair of `enter`
    """The running forward of this thread is done with its cache."""
    caches = _caches()
    if caches:
        caches.pop()


def install(config: Any) -> None:
    """Routes ``config``'s attention through :func:`kvpress_attention` (idempotent)."""
    current = config._attn_implementation or "eager"
    if not current.startswith(PREFIX):
        config._attn_implementation = _register(current)


def original_attention(module: torch.nn.Module, name: str) -> Callable:
    """The attention function the model would have used (``eager`` is each modeling
    file's own ``eager_attention_forward``)."""
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
    return eager


def kvpress_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as ``"kvpress_rs_<original>"``."""
    config = getattr(module, "config", None)
    name = (getattr(config, "_attn_implementation", None) or "eager").removeprefix(PREFIX)
    attend = original_attention(module, name)
    cache = active_cache()
    layer_idx = getattr(module, "layer_idx", None)
    layers = getattr(cache, "layers", [])
    layer = layers[layer_idx] if isinstance(layer_idx, int) and layer_idx < len(layers) else None
    if layer is None or not hasattr(layer, "attend"):
        return attend(module, query, key, value, attention_mask, **kwargs)
    return layer.attend(attend, module, query, key, value, attention_mask, **kwargs)


def _register(original: str) -> str:
    """Registers ``"kvpress_rs_<original>"`` once: our attention function, and the mask
    function of the original implementation (sdpa and eager masks differ in dtype)."""
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        if original not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise UnsupportedError(f"attention implementation {original!r} has no mask function")
        AttentionInterface.register(name, kvpress_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name
