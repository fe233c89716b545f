"""Detects a compressed cache reused for an unrelated prompt without ``reset()``.

``generate(ids, past_key_values=cache)`` on a cache that has already seen N tokens treats
``ids[:, :N]`` as already processed. That is right when ``ids`` continues what the cache
saw (a question after a compressed context, the next chat turn) and silently wrong when
the prompt is unrelated. The cache keeps a :class:`TokenLog` of the ids fed into it (the
model hooks in ``_hooks.py`` record them) and checks, when ``generate`` prepares its inputs
from the full sequence, that the sequence begins with them.
"""

from __future__ import annotations

import torch

from .errors import CacheStateError


class TokenLog:
    """The token ids a cache has seen, (batch, seen), or unknown (inputs_embeds)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.known = True

    def reset(self) -> None:
        self.ids, self.known = None, True

    def record(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None or input_ids.dim() != 2:
            self.known = False
            return
        ids = input_ids.detach().to("cpu", torch.long)
        if self.ids is None:
            self.ids = ids
        elif self.ids.shape[0] == ids.shape[0]:
            self.ids = torch.cat([self.ids, ids], dim=1)
        else:
            self.known = False

    def index_batch(self, indices: torch.Tensor) -> None:
        if self.ids is not None:
            self.ids = self.ids[torch.as_tensor(indices, dtype=torch.long).cpu()]

    def repeat_interleave(self, repeats: int) -> None:
        if self.ids is not None:
            self.ids = self.ids.repeat_interleave(repeats, dim=0)

    def truncate(self, length: int) -> None:
        if self.ids is not None:
            self.ids = self.ids[:, :length]

    def check_continues(self, input_ids: torch.Tensor, seen: int) -> None:
        if seen == 0 or not self.known or self.ids is None or self.ids.shape[1] != seen:
            return
        if input_ids.dim() != 2 or input_ids.shape[0] != self.ids.shape[0]:
            raise CacheStateError(
                f"this cache holds a batch of {self.ids.shape[0]} sequences but `input_ids` has "
                f"shape {tuple(input_ids.shape)}; call cache.reset() before reusing it for another prompt"
            )
        if input_ids.shape[1] <= seen:
            raise CacheStateError(
                f"this cache has already seen {seen} tokens but `input_ids` has only {input_ids.shape[1]}: "
                "pass the full sequence the cache continues (context + new tokens), or call "
                "cache.reset() before reusing it for an unrelated prompt"
            )
        prefix = input_ids[:, :seen].to("cpu", torch.long)
        if not torch.equal(prefix, self.ids):
            first = int((prefix != self.ids).any(dim=0).nonzero()[0, 0])
            raise CacheStateError(
                f"`input_ids` does not continue the {seen} tokens this cache has seen (they differ at "
                f"position {first}); call cache.reset() before reusing the cache for an unrelated prompt"
            )


class GuardedCache:
    """The reuse guard's side of a transformers ``Cache`` (mixed in before ``Cache``): keeps
    the :class:`TokenLog` in step with every batch operation and answers the model hooks
    (``_record_token_ids``, ``_check_continues``). Subclasses set ``self._token_log``."""

    _token_log: TokenLog

    def reset(self) -> None:
        """Empties the cache so that it can serve an unrelated prompt."""
        super().reset()
        self._token_log.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._token_log.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        indices = torch.as_tensor(indices)
        self._token_log.index_batch(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._token_log.repeat_interleave(repeats)

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        seen = self.get_seq_length()
        super().crop(max_length_or_tokens_to_remove)
        self._token_log.truncate(self.get_seq_length() if seen else 0)

    def _record_token_ids(self, input_ids: torch.Tensor | None) -> None:
        self._token_log.record(input_ids)

    def _check_continues(self, input_ids: torch.Tensor) -> None:
        self._token_log.check_continues(input_ids, self.get_seq_length())
