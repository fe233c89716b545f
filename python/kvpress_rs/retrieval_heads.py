"""Head-wise memory: retrieval heads keep every token, the other heads a window.

Most attention heads of a decoder look at the first tokens and the recent ones; a few
(induction and echo heads: RazorAttention, arXiv 2407.15891; DuoAttention) copy from
anywhere in the context, and those carry long-range retrieval such as a needle in a
haystack. :class:`RetrievalHeadsCache` keeps, per layer and KV head:

- retrieval heads: every token, optionally quantized (a Rust ``QuantizedStore`` over those
  heads only: bit-packed, append-only);
- the other (streaming) heads: the ``sink_tokens`` first tokens, ``heavy_hitters`` tokens
  of the prompt chosen at its end by SnapKV's score (per head and batch row), and the
  ``window`` most recent tokens, in full precision.

Every dropped byte is freed: streaming heads hold ``sink_tokens + heavy_hitters + window``
tokens whatever the context length (plus the tokens of the forward in progress). Without
the heavy hitters, windows alone cost SmolLM2 a quarter of its perplexity (x1.25 at 2k,
30% retrieval heads); with them it stays within 10%. RazorAttention's
compensation token (the dropped tokens' mean key and value) was measured and left out: on
SmolLM2 it changed nothing without a log-count bias on its logit (perplexity x1.133 either
way) and hurt with one (x1.286 against x1.149). Positions are not re-rotated: queries carry the positions of
the tokens seen, and the kept keys keep theirs.

Which heads retrieve is measured once per model by
:func:`~kvpress_rs.head_scores.retrieval_head_scores` (``head_scores.py``), or given
explicitly.

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=0.25,  # doctest: +SKIP
...     quantization=kvpress_rs.QuantConfig(bits=3, group_size=64, residual_length=0))
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
>>> cache.nbytes  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ._layer import CacheLayer, LayerStateCache
from ._native import LayerState, QuantConfig, RopeTable
from .errors import InvalidArgumentError
from .head_scores import head_counts, retrieval_head_scores, select_retrieval_heads
from .models import decoder_config
from .rope import Rope


class RetrievalHeadsLayer(CacheLayer):
    """One full-attention layer of a :class:`RetrievalHeadsCache`: a
    :class:`~kvpress_rs._layer.CacheLayer` over a Rust ``LayerState`` whose retrieval KV
    heads keep every token (quantized or not) and whose streaming heads keep sinks, heavy
    hitters and a window. No single tensor holds its keys: ``keys``/``values`` are None."""

    def stats(self) -> dict[str, int]:
        """Heads and tokens: retrieval / streaming heads, tokens seen, tokens each streaming
        head keeps and has dropped."""
        return self.state.head_stats()


class RetrievalHeadsCache(LayerStateCache):
    """A transformers cache where retrieval heads keep every token (optionally quantized)
    and the other heads keep sink tokens, a recent window and one compensation token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves (its attention is routed through the cache).
    retrieval_fraction : float
        Fraction of all KV heads (over every layer) kept whole, in [0, 1]: the
        highest-scoring ones of ``head_scores``. Ignored when ``retrieval_heads`` is given.
    retrieval_heads : bool tensor (layers, KV heads), optional
        The heads kept whole, explicitly.
    head_scores : tensor (layers, KV heads), optional
        Scores to rank heads by; default :func:`retrieval_head_scores` of ``model``.
    window : int
        Most recent tokens streaming heads keep (>= 1).
    sink_tokens : int
        First tokens streaming heads keep (>= 0).
    heavy_hitters : int
        Tokens each streaming head (per batch row) also keeps for good, chosen once at the
        end of the prompt's forward among those between the sinks and the window: the
        highest SnapKV scores (attention of the prompt's last ``observation_window``
        queries, pooled over 5 neighbours). On SmolLM2 this is what keeps perplexity.
    observation_window : int
        Prompt queries that score the heavy hitters (>= 1).
    quantization : QuantConfig, optional
        How retrieval heads store their tokens; None keeps them in full precision.

    Example
    -------
    >>> import kvpress_rs  # doctest: +SKIP
    >>> cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_fraction=0.25,  # doctest: +SKIP
    ...     quantization=kvpress_rs.QuantConfig(bits=3, group_size=64, residual_length=0))
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        retrieval_fraction: float = 0.25,
        retrieval_heads: Any = None,
        head_scores: Any = None,
        window: int = 48,
        sink_tokens: int = 4,
        heavy_hitters: int = 48,
        observation_window: int = 64,
        quantization: QuantConfig | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(
                f"`model` must be a transformers model (torch.nn.Module), got {type(model).__name__}: "
                "the cache routes attention through hooks on it"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidArgumentError(f"`window` must be an int >= 1, got {window!r}")
        for name, given, least in (("sink_tokens", sink_tokens, 0), ("heavy_hitters", heavy_hitters, 0),
                                   ("observation_window", observation_window, 1)):
            if isinstance(given, bool) or not isinstance(given, int) or given < least:
                raise InvalidArgumentError(f"`{name}` must be an int >= {least}, got {given!r}")
        if quantization is not None and not isinstance(quantization, QuantConfig):
            raise InvalidArgumentError(f"`quantization` must be a kvpress_rs.QuantConfig or None, got {quantization!r}")
        config = decoder_config(model)
        n_layers, _, n_kv = head_counts(config)
        self.retrieval_heads = self._resolve_heads(model, retrieval_fraction, retrieval_heads, head_scores, (n_layers, n_kv))
        self.window, self.sink_tokens, self.quantization = window, sink_tokens, quantization
        self.heavy_hitters, self.observation_window = heavy_hitters, observation_window
        rope = None
        self._rope_table = None
        if quantization is not None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            quantization.check_head_dims(head_dim)
            if quantization.pre_rope_keys:
                rope = Rope.from_config(config)
                self._rope_table = RopeTable(rope)
        layers = [
            LayerState.heads(
                idx, self.retrieval_heads[idx].tolist(), window=window, sink_tokens=sink_tokens,
                heavy_hitters=heavy_hitters, observation_window=observation_window, quantization=quantization,
                rope=rope, rope_table=self._rope_table,
            )
            if type(layer) is DynamicLayer
            else layer
            for idx, layer in enumerate(DynamicCache(config=config).layers)
        ]
        super().__init__(model, layers)

    @staticmethod
    def _resolve_heads(model: Any, fraction: float, heads: Any, scores: Any, shape: tuple[int, int]) -> torch.Tensor:
        if heads is not None:
            heads = torch.as_tensor(heads)
            if heads.dtype != torch.bool or tuple(heads.shape) != shape:
                raise InvalidArgumentError(
                    f"`retrieval_heads` must be a bool tensor of shape (layers, KV heads) = {shape}, "
                    f"got {heads.dtype} {tuple(heads.shape)}"
                )
            return heads.cpu()
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise InvalidArgumentError(f"`retrieval_fraction` must be a number in [0, 1], got {fraction!r}")
        if scores is None:
            scores = retrieval_head_scores(model)
        scores = torch.as_tensor(scores).float().cpu()
        if tuple(scores.shape) != shape:
            raise InvalidArgumentError(f"`head_scores` must have shape (layers, KV heads) = {shape}, got {tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise InvalidArgumentError("`head_scores` must be finite")
        return select_retrieval_heads(scores, float(fraction))

    layer_class = RetrievalHeadsLayer

    def _head_layers(self) -> list[RetrievalHeadsLayer]:
        return [layer for layer in self.layers if isinstance(layer, RetrievalHeadsLayer)]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every layer's parts, the cos/sin table of pre-RoPE keys,
        and the keys/values of any layer transformers keeps itself."""
        return (self._rope_table.nbytes if self._rope_table is not None else 0) + super().nbytes

    def stats(self) -> dict[str, Any]:
        """Per-layer head split and token counts (``RetrievalHeadsLayer.stats``) and ``nbytes``."""
        return {"layers": [layer.stats() for layer in self._head_layers()], "nbytes": self.nbytes,
                "tokens_seen": self.get_seq_length()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(retrieval_heads={int(self.retrieval_heads.sum())}/"
                f"{self.retrieval_heads.numel()}, window={self.window}, sink_tokens={self.sink_tokens}, "
                f"heavy_hitters={self.heavy_hitters}, "
                f"quantization={self.quantization!r})")
