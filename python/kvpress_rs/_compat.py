"""The differences between the transformers versions we support (5.2.x and the latest 5.x),
detected from signatures rather than version numbers."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicLayer

# transformers 5.2: `crop(max_length)` (an absolute length when >= 0, tokens to remove when
# negative). Later: `crop(tokens_to_remove)` (<= 0: how many tokens to remove).
CROP_TAKES_MAX_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters


def query_length(cache_position_or_length: torch.Tensor | int) -> int:
    """`get_mask_sizes` receives `cache_position` (5.2) or the query length (later)."""
    if isinstance(cache_position_or_length, torch.Tensor):
        return int(cache_position_or_length.shape[0])
    return int(cache_position_or_length)


def tokens_to_remove(crop_argument: int, seen: int) -> int:
    """How many of the `seen` tokens a `crop(crop_argument)` call removes."""
    if crop_argument < 0:
        return min(-crop_argument, seen)
    if CROP_TAKES_MAX_LENGTH:
        return max(seen - crop_argument, 0)
    if crop_argument > 0:
        raise ValueError(
            f"Calling `crop` with a positive value (`{crop_argument}`) is not supported. "
            "Use a negative integer to remove that number of tokens from the cache."
        )
    return 0
