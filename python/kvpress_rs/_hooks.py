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
    from .cache import KVCache
    from .quantized import QuantizedKVCache

    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if isinstance(cache, (KVCache, QuantizedKVCache)):
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
    return None


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
