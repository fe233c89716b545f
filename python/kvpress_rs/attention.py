"""The attention path of kvpress_rs caches.

While a model runs a forward with one of our caches, its decoder config's attention
implementation ``X`` (sdpa, eager, ...) is switched to ``"kvpress_rs_X"`` (registered with
transformers' ``AttentionInterface``, with X's mask function registered for it), and
restored right after. Every attention layer then calls :func:`kvpress_attention`, which

- delegates to the model's own implementation (sdpa, eager, ...) for layers that are not
  ours, and otherwise
- hands the call to the cache layer (``layer.attend``), which sees the post-RoPE queries of
  that layer (scorers that need queries use them right after the prefill attention) and can
  adapt the mask to what it stores (layers may store different token counts).

This is model-agnostic: no per-architecture re-projection of queries.

Example
-------
>>> from kvpress_rs.attention import active_cache  # doctest: +SKIP
>>> active_cache() is None  # outside a forward with a kvpress_rs cache
True
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import UnsupportedError

PREFIX = "kvpress_rs_"


@dataclass
class _Frame:
    cache: Any
    config: Any
    original: str


_STATE = threading.local()


def _frames() -> list[_Frame]:
    if not hasattr(_STATE, "frames"):
        _STATE.frames = []
    return _STATE.frames


def active_cache() -> Any:
    """The kvpress_rs cache of the forward running in this thread, or None."""
    frames = _frames()
    return frames[-1].cache if frames else None


def serves(layer: Any) -> bool:
    """Whether the running forward goes through the kvpress_rs attention for ``layer``
    (so ``layer.attend`` will be called after its ``update``)."""
    cache = active_cache()
    layer_idx = getattr(layer, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    return layers is not None and isinstance(layer_idx, int) and layer_idx < len(layers) and layers[layer_idx] is layer


def enter(config: Any, cache: Any) -> None:
    """Switches ``config`` (a decoder config) to the kvpress_rs attention for one forward."""
    current = config._attn_implementation or "eager"
    original = current.removeprefix(PREFIX)  # a nested forward keeps the outer original
    _frames().append(_Frame(cache, config, current))
    config._attn_implementation = _register(original)


def exit() -> None:  # noqa: A001 - the pair of `enter`
    """Restores the attention implementation switched by the matching :func:`enter`."""
    frames = _frames()
    if frames:
        frame = frames.pop()
        frame.config._attn_implementation = frame.original



def _original_name(frame: _Frame) -> str:
    return frame.original.removeprefix(PREFIX)


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
    frames = _frames()
    if not frames:
        raise RuntimeError("kvpress_rs attention called outside a forward with a kvpress_rs cache")
    frame = frames[-1]
    attend = original_attention(module, _original_name(frame))
    layer_idx = getattr(module, "layer_idx", None)
    layers = getattr(frame.cache, "layers", [])
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
