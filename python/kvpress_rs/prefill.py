"""Block-wise prefill: feed a long prompt into a compressing cache a block at a time, so
that the cache never holds more than its decoding budget plus one block — the peak memory
of the prefill is bounded, not only the memory after it.

Each block is one forward of the model through the cache; after that block's attention
(which sees every stored token and the block itself) each layer compresses back to its
``decoding_budget`` with the block's queries (see :mod:`kvpress_rs.decoding`). The
activations of one forward are those of one block, not of the whole prompt.

Example
-------
>>> cache = kvpress_rs.SnapKVCache(model, decoding_budget=1024)  # doctest: +SKIP
>>> kvpress_rs.prefill(model, ids[:, :-1], cache, block_size=512)  # doctest: +SKIP
>>> out = model.generate(ids, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP

Multi-turn chat: call :func:`prefill` with each new turn's ids (the cache appends and
compresses them), then ``generate`` with the whole conversation so far.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidArgumentError


def prefill(
    model: Any, input_ids: torch.Tensor, cache: Any, *, block_size: int, attention_mask: torch.Tensor | None = None
) -> Any:
    """Feeds ``input_ids`` (batch, T) — the tokens after those ``cache`` has already seen —
    into ``cache`` in blocks of ``block_size`` tokens, compressing after each block.

    ``cache`` must be a :class:`~kvpress_rs.KVCache` built with ``decoding_budget`` (or
    ``decoding_ratio``) and without ``compression_ratio``/``max_tokens`` (those compress
    the first forward only, which here is the first block). For ``generate`` to continue,
    leave the prompt's last token out of ``input_ids`` and pass the whole prompt to
    ``generate``: it feeds the tokens the cache has not seen. ``attention_mask`` (batch, T)
    marks the pads of a left-padded batch (tokens the cache saw before count as real);
    each row then gets positions from its own tokens, as ``generate`` gives them.

    Returns the model output of the last block (its ``logits`` predict the next token).
    """
    from .cache import KVCache

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise InvalidArgumentError(f"`block_size` must be a positive int, got {block_size!r}")
    if not isinstance(cache, KVCache):
        raise InvalidArgumentError(f"`cache` must be a kvpress_rs.KVCache, got {type(cache).__name__}")
    if cache.decoding is None:
        raise InvalidArgumentError(
            "`cache` has no decoding budget: build it with `decoding_budget=` (or `decoding_ratio=`) "
            "so that it compresses after every block"
        )
    if not cache.press.keeps_everything:
        raise InvalidArgumentError(
            "`cache` has a prefill budget (`compression_ratio`/`max_tokens`), which would compress the "
            "first block only; block-wise prefill uses `decoding_budget` alone"
        )
    window = cache.press.query_window
    if isinstance(window, int) and block_size < window:
        raise InvalidArgumentError(
            f"`block_size` ({block_size}) must be at least the {window} queries policy "
            f"{cache.press.policy!r} scores with (window_size)"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InvalidArgumentError(f"`input_ids` must be a (batch, tokens) tensor with tokens > 0, got {shape}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InvalidArgumentError(
            f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    seen = cache.get_seq_length()
    mask = None
    if attention_mask is not None:
        earlier = torch.ones(input_ids.shape[0], seen, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([earlier, attention_mask], dim=1)
    output = None
    start, total = 0, input_ids.shape[1]
    with torch.no_grad():
        while start < total:
            size = min(_next_block(cache, block_size, window if isinstance(window, int) else 1), total - start)
            kwargs: dict[str, Any] = {}
            if mask is not None:
                # each row's positions count its own tokens (pads at 1), as generate does
                block_mask = mask[:, : seen + start + size]
                positions = block_mask.long().cumsum(-1) - 1
                kwargs["attention_mask"] = block_mask
                kwargs["position_ids"] = positions.masked_fill(block_mask == 0, 1)[:, -size:]
            block = input_ids[:, start : start + size]
            output = model(input_ids=block, past_key_values=cache, use_cache=True, **kwargs)
            start += size
    return output


def _next_block(cache: Any, block_size: int, min_block: int) -> int:
    """The next block's size: ``block_size``, or less when the cache holds more than its
    budget (a generation left it up to budget + interval), so that budget + one block stays
    the peak — but never fewer tokens than the scorer's query window."""
    budget = cache.decoding.decoding_budget
    stored = max((state.stored for state in cache.layer_states()), default=0)
    if budget is None or stored <= budget:
        return block_size
    return max(min(block_size, budget + block_size - stored), min_block)
