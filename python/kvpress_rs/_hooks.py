"""The hooks a kvpress_rs cache installs on its model (once per model). They sit on the
decoder (``model.get_decoder()``), which every entry point runs through — ``generate``,
the causal LM's forward, or the decoder called alone (``model.model(...)``, as kvpress's
pipeline prefills a context) — and act only in forwards whose cache is one of ours:

- a forward pre-hook records the token ids fed into the cache (reuse detection,
  ``_guard.py``), tells this thread's attention path which cache the forward uses
  (``attention.py``) and hands the forward's 2-D attention mask to the cache (padding);
  a forward hook (always called, exceptions included) ends both;
- a wrapper around ``prepare_inputs_for_generation``, which receives generate's full
  sequence, checks that it continues what the cache has seen.

Nothing shared is switched per forward: the decoder config's attention implementation is
routed through kvpress_rs once, for good (``attention.install``), so several threads may
run one model at once, each with its own cache.
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


def _before_forward(module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    attention.install(decoder_config(module))  # again, should the model have been switched
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    cache._record_token_ids(input_ids if isinstance(input_ids, torch.Tensor) else None)
    attention.enter(cache)
    try:
        cache._forward_started(mask if isinstance(mask, torch.Tensor) else None)
    except BaseException:
        attention.exit()
        raise
    if getattr(cache, "rerotate", False):
        return args, _compact_positions(kwargs, cache.get_seq_length())
    return None


def _compact_positions(kwargs: dict[str, Any], seen: int) -> dict[str, Any]:
    """With re-rotation the cache continues at a compact position (tokens stored), but
    ``generate`` counts positions itself (tokens fed; per row of a padded batch): shift
    ``cache_position`` and each row's ``position_ids`` so that the new tokens start at the
    cache's position."""
    if seen == 0:
        return kwargs
    cache_position = kwargs.get("cache_position")
    position_ids = kwargs.get("position_ids")
    kwargs = dict(kwargs)
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        offset = int(cache_position[0]) - seen
        if offset > 0:
            kwargs["cache_position"] = cache_position - offset
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        # each row's first new token goes to the shared compact position (rows of a padded
        # batch count their own tokens, and kept fewer)
        kwargs["position_ids"] = position_ids - position_ids[..., :1] + seen
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


def decoder_of(model: Any) -> Any:
    """The module every forward of ``model`` runs through: its decoder."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # exotic models without a decoder rule
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def install_model_hooks(model: Any) -> None:
    """Installs the hooks on ``model``'s decoder and routes its attention through
    kvpress_rs (idempotent)."""
    decoder = decoder_of(model)
    attention.install(decoder_config(model))
    if not getattr(decoder, _MARK, False):
        decoder.register_forward_pre_hook(_before_forward, with_kwargs=True)
        decoder.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)
        setattr(decoder, _MARK, True)
    if hasattr(model, "prepare_inputs_for_generation") and not getattr(model, _MARK + "_generate", False):
        model.prepare_inputs_for_generation = _check_continuation(model.prepare_inputs_for_generation)
        setattr(model, _MARK + "_generate", True)
