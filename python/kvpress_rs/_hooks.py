"""The hooks a kvpress_rs cache installs on its model (once per model). They act only in
forwards whose cache is one of ours:

- a forward pre-hook records the token ids fed into the cache (reuse detection,
  ``_guard.py``) and switches the decoder's attention to the kvpress_rs path
  (``attention.py``); a forward hook (always called, exceptions included) switches it back;
- a wrapper around ``prepare_inputs_for_generation``, which receives generate's full
  sequence, checks that it continues what the cache has seen.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import attention
from .models import decoder_config

_MARK = "_kvpress_rs_hooks"


def _cache_of(kwargs: dict[str, Any]) -> Any:
    from ._guard import GuardedCache

    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if isinstance(cache, GuardedCache):
            return cache
    return None


def _before_forward(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache._record_token_ids(input_ids if isinstance(input_ids, torch.Tensor) else None)
    attention.enter(decoder_config(module), cache)
    cache._forward_started()
    if getattr(cache, "rerotate", False):
        return args, _compact_positions(kwargs, cache.get_seq_length())
    return None


def _compact_positions(kwargs: dict[str, Any], seen: int) -> dict[str, Any]:
    """With re-rotation the cache continues at a compact position (tokens stored), but
    ``generate`` counts positions itself (tokens fed): shift ``cache_position`` and
    ``position_ids`` so that the new tokens start at the cache's position."""
    cache_position = kwargs.get("cache_position")
    position_ids = kwargs.get("position_ids")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        offset = int(cache_position[0]) - seen
    elif isinstance(position_ids, torch.Tensor) and position_ids.numel():
        offset = int(position_ids[..., 0].max()) - seen
    else:
        return kwargs
    if offset <= 0:
        return kwargs
    kwargs = dict(kwargs)
    if isinstance(cache_position, torch.Tensor):
        kwargs["cache_position"] = cache_position - offset
    if isinstance(position_ids, torch.Tensor):
        kwargs["position_ids"] = position_ids - offset
    return kwargs


def _after_forward(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        attention.exit()
        cache._forward_finished()
    return None


def _check_continuation(prepare: Any) -> Any:
    @functools.wraps(prepare)
    def prepare_inputs_for_generation(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = _cache_of(kwargs)
        if cache is not None and isinstance(input_ids, torch.Tensor):
            cache._check_continues(input_ids)
        return prepare(input_ids, *args, **kwargs)

    return prepare_inputs_for_generation


def install_model_hooks(model: Any) -> None:
    """Installs the hooks on ``model`` (idempotent)."""
    if getattr(model, _MARK, False):
        return
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)
    if hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = _check_continuation(model.prepare_inputs_for_generation)
    setattr(model, _MARK, True)
