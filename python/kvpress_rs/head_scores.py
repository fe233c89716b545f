"""Which attention heads retrieve: the induction/echo score of every KV head, measured by
a probe on repeated random tokens (RazorAttention, arXiv 2407.15891), and the top fraction.

A head that copies from anywhere in the context attends, in the second copy of a repeated
random sequence, to the token after the previous occurrence of the current one (induction)
or to that occurrence (echo). Random ids make the probe data-free and model-agnostic; the
scores depend on the weights only and are memoised on the model.

Example
-------
>>> from kvpress_rs.head_scores import retrieval_head_scores, select_retrieval_heads  # doctest: +SKIP
>>> scores = retrieval_head_scores(model)  # doctest: +SKIP
>>> select_retrieval_heads(scores, 0.25).sum()  # doctest: +SKIP
tensor(22)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ._guard import GuardedCache, TokenLog
from ._hooks import install_model_hooks
from .errors import InvalidArgumentError
from .models import decoder_config

# Memoised per model object: the scores depend on the weights only.
_SCORES_ATTR = "_kvpress_rs_retrieval_head_scores"


def head_counts(config: Any) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a decoder config."""
    n_q = config.num_attention_heads
    return config.num_hidden_layers, n_q, getattr(config, "num_key_value_heads", None) or n_q


class _ProbeLayer(DynamicLayer):
    """A plain layer whose attention also measures, for the second copy of a repeated
    sequence, the attention each query head pays to the induction target (the token after
    the previous occurrence) and the echo target (the previous occurrence)."""

    def __init__(self, period: int, scores: torch.Tensor, layer_idx: int):
        super().__init__()
        self._period, self._scores, self._layer_idx = period, scores, layer_idx

    def attend(self, attend: Any, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, **kwargs: Any) -> Any:
        n, t = self._period, query.shape[-2]
        group = query.shape[1] // key.shape[1]
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        q = query[:, :, n : t - 1].float()  # queries of the second copy that have a next token
        k = key.float().repeat_interleave(group, dim=1)
        logits = q @ k.transpose(-1, -2) * scaling
        rows = torch.arange(n, t - 1, device=query.device)
        future = torch.arange(t, device=query.device)[None, :] > rows[:, None]
        weights = logits.masked_fill(future, float("-inf")).softmax(-1)
        induction = weights[..., torch.arange(rows.numel()), rows - n + 1]
        echo = weights[..., torch.arange(rows.numel()), rows - n]
        self._scores[self._layer_idx] += torch.maximum(induction, echo).mean(dim=(0, -1)).cpu()
        return attend(module, query, key, value, attention_mask, **kwargs)


class _Probe(GuardedCache, Cache):
    """The cache of the probe forwards: plain layers that measure as they attend."""

    def __init__(self, config: Any, period: int, scores: torch.Tensor):
        super().__init__(layers=[_ProbeLayer(period, scores, i) for i in range(config.num_hidden_layers)])
        self._token_log = TokenLog()

    def _forward_started(self, attention_mask: Any = None) -> None:
        pass

    def _forward_finished(self) -> None:
        pass


@torch.no_grad()
def retrieval_head_scores(model: torch.nn.Module, period: int = 256, repeats: int = 3, seed: int = 0) -> torch.Tensor:
    """How much each KV head retrieves: (layers, KV heads) float32 in [0, 1].

    ``repeats`` sequences of ``period`` random token ids are fed twice each; a query head's
    score is the attention its second-copy queries pay to the induction target (the token
    after the previous occurrence of the current token) or the echo target (that
    occurrence), whichever is larger, averaged; a KV head takes the largest score of its
    query heads. Data-free and model-agnostic; memoised on ``model``.

    >>> scores = retrieval_head_scores(model)  # doctest: +SKIP
    >>> scores.shape  # doctest: +SKIP
    torch.Size([30, 3])
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"`model` must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (period, repeats)) or period < 2 or repeats < 1:
        raise InvalidArgumentError(f"`period` must be >= 2 and `repeats` >= 1, got {period} and {repeats}")
    memo = getattr(model, _SCORES_ATTR, {})
    if (period, repeats, seed) in memo:
        return memo[(period, repeats, seed)].clone()
    config = decoder_config(model)
    n_layers, n_q, n_kv = head_counts(config)
    scores = torch.zeros(n_layers, n_q)
    install_model_hooks(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # ids from the middle of the vocabulary: no special tokens
    low, high = min(1000, config.vocab_size // 4), config.vocab_size - 1
    for _ in range(repeats):
        sequence = torch.randint(low, high, (1, period), generator=generator)
        ids = torch.cat([sequence, sequence], dim=1).to(device)
        model(ids, past_key_values=_Probe(config, period, scores), use_cache=True)
    kv_scores = (scores / repeats).reshape(n_layers, n_kv, n_q // n_kv).amax(-1)
    memo[(period, repeats, seed)] = kv_scores
    setattr(model, _SCORES_ATTR, memo)
    return kv_scores.clone()


def select_retrieval_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``round(fraction * heads)`` highest-scoring heads of ``scores`` (any shape), as a
    bool mask of the same shape; ties broken towards the lower index.

    >>> select_retrieval_heads(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), 0.5)
    tensor([[False,  True],
            [ True, False]])
    """
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise InvalidArgumentError(f"`retrieval_fraction` must be in [0, 1], got {fraction}")
    k = round(fraction * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    order = torch.argsort(-scores.flatten().double(), stable=True)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)
