"""Decoding-time compression: one layer's bookkeeping between compressions.

A :class:`~kvpress_rs.KVCache` built with ``decoding_budget=N`` (or ``decoding_ratio=r``)
keeps compressing while it grows. The schedule — when, and to how many tokens — is the
Rust ``DecodingSchedule``; the scoring, protection and eviction are one Rust call,
``LayerStore.compress_to`` (``QuantizedStore.compress_to`` once the layer is quantized:
the kept tokens keep their codes). What is left here is what only the adapter sees: the
layer's post-RoPE queries since the previous compression (the scorers' "window" during
generation), TriAttention's query statistics, which prompt tokens are protected, and —
for a scorer that remembers (SnapKV's rank pooling) — the scores the kept tokens had at
the previous compression, kept aligned with the store's first tokens through crop, beam
reordering and batch selection.

No scoring happens per step: a decoding step only appends its query to a list (for the
policies that read queries) and asks the schedule one integer question.

Example
-------
>>> cache = kvpress_rs.SnapKVCache(model, decoding_budget=1024, decoding_interval=128)  # doctest: +SKIP
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4096)  # doctest: +SKIP
>>> max(cache.stats()["tokens_kept"]) <= 1024 + 128  # doctest: +SKIP
True
"""

from __future__ import annotations

import torch

from ._native import DecodingSchedule, LayerStore, Press, QuantizedStore, QueryStats
from .rope import Rope


class LayerDecoding:
    """The decoding-time compression state of one layer (see the module docstring)."""

    def __init__(
        self,
        schedule: DecodingSchedule,
        press: Press,
        layer_idx: int,
        rope: Rope,
        calibrated: QueryStats | None = None,
    ):
        self.schedule = schedule
        self.press = press
        self.layer_idx = layer_idx
        self.rope = rope
        self._calibrated = calibrated
        # TriAttention without a calibration file: statistics of every query the layer has
        # seen (the prompt's, then the generated ones), folded in at each compression.
        self._online = press.policy == "triattention" and calibrated is None
        self._online_stats: QueryStats | None = None
        window = press.query_window
        self._window: int | None = window if isinstance(window, int) else None
        self._needs_queries = window is not None and calibrated is None
        self._queries: list[torch.Tensor] = []
        self._n_queries = 0
        # Prompt tokens protected from eviction: set when generation starts (the first
        # one-token forward), if protect_prompt.
        self.protected = 0
        self._generating = False
        # (batch, kv_heads, m): the scores of the first m stored tokens when the previous
        # compression kept them, for a press that remembers_scores; None before the first.
        self.kept_scores: torch.Tensor | None = None

    def reset(self) -> None:
        self._queries, self._n_queries = [], 0
        self._online_stats = None
        self.protected, self._generating = 0, False
        self.kept_scores = None

    def index_batch(self, indices: torch.Tensor) -> None:
        """Beam search / batch selection reorders the rows: the buffered queries and the
        kept scores follow."""
        self._queries = [q.index_select(0, indices.to(q.device)) for q in self._queries]
        if self.kept_scores is not None:
            self.kept_scores = self.kept_scores.index_select(0, indices.to(self.kept_scores.device))

    def repeat_interleave_batch(self, repeats: int) -> None:
        self._queries = [q.repeat_interleave(repeats, dim=0) for q in self._queries]
        if self.kept_scores is not None:
            self.kept_scores = self.kept_scores.repeat_interleave(repeats, dim=0)

    def cropped(self, stored: int) -> None:
        """The store was cut back to ``stored`` tokens (assisted decoding's rollback): the
        buffered queries may belong to removed tokens, and kept scores past it go."""
        self.forget_queries()
        if self.kept_scores is not None and self.kept_scores.shape[-1] > stored:
            self.kept_scores = self.kept_scores[..., :stored]

    def evicted_elsewhere(self, seen: int) -> None:
        """A compression other than this schedule's (a prompt's) evicted tokens: the
        buffered queries and the kept scores no longer match the stored tokens."""
        self.forget_queries(seen)
        self.kept_scores = None

    def appended(self, stored_before: int, new_tokens: int) -> None:
        """Called by ``update``: the first one-token forward starts the generation, and
        with ``protect_prompt`` every token stored then is protected from now on."""
        if new_tokens == 1 and not self._generating:
            self._generating = True
            if self.schedule.protect_prompt:
                self.protected = stored_before

    def observe(self, query: torch.Tensor) -> None:
        """Keeps this forward's queries (batch, q_heads, q, head_dim) for the next
        compression: the last ``window`` of them for windowed scorers, all since the
        previous compression otherwise."""
        if not self._needs_queries:
            return
        self._queries.append(query)
        self._n_queries += query.shape[-2]
        if self._window is not None:
            while len(self._queries) > 1 and self._n_queries - self._queries[0].shape[-2] >= self._window:
                self._n_queries -= self._queries.pop(0).shape[-2]

    def forget_queries(self, seen_before: int | None = None) -> None:
        """After any compression (the buffered queries no longer belong to the last stored
        tokens); online TriAttention statistics absorb them first."""
        if self._online and self._queries and seen_before is not None:
            self._fold(seen_before)
        self._queries, self._n_queries = [], 0

    def statistics(self, seen: int) -> QueryStats | None:
        """TriAttention's online query statistics, with the queries buffered so far folded
        in (``seen``: tokens seen, the position after the last buffered query)."""
        if self._online and self._queries:
            self._fold(seen)
            self._queries, self._n_queries = [], 0
        return self._online_stats

    def _fold(self, seen: int) -> None:
        queries = torch.cat(self._queries, dim=-2) if len(self._queries) > 1 else self._queries[0]
        fresh = QueryStats.from_queries(queries, self.rope, seen - queries.shape[-2])
        self._online_stats = fresh if self._online_stats is None else self._online_stats.merged(fresh)

    def maybe_compress(self, store: LayerStore, new_tokens: int) -> bool:
        """Compresses ``store`` if the schedule says so after a forward of ``new_tokens``
        tokens. Returns whether it evicted."""
        return self._compress_if_planned(store, store.stored, store.seen, new_tokens)

    def maybe_compress_quantized(self, store: QuantizedStore, new_tokens: int, seen: int) -> bool:
        """:meth:`maybe_compress` for a layer whose tokens are quantized (``seen``: the
        layer's tokens seen; the store holds ``store.seen`` of them). The store scores
        dequantized tokens and keeps the selected codes as they are; its full-precision
        sinks and residual window are protected too. Returns whether it evicted."""
        return self._compress_if_planned(store, store.seen, seen, new_tokens)

    def _compress_if_planned(self, store: LayerStore | QuantizedStore, stored: int, seen: int, new_tokens: int) -> bool:
        n_kept = self.schedule.plan(stored, seen, new_tokens, self.protected)
        if n_kept is None:
            return False
        queries, stats = self._scoring_inputs(seen)
        evicted, kept_scores = store.compress_to(
            self.press,
            self.layer_idx,
            n_kept,
            seen,
            queries=queries,
            query_stats=stats,
            protect_first=self.protected,
            protect_last=self.schedule.decoding_interval,
            previous_scores=self.kept_scores,
        )
        if evicted:
            self.kept_scores = kept_scores
        # The last `interval` stored tokens are never evicted, so their queries still are
        # the queries of the last stored tokens: keep them (a short last prompt block then
        # still has a full window).
        self._keep_last(self.schedule.decoding_interval)
        return evicted

    def _scoring_inputs(self, seen: int) -> tuple[torch.Tensor | None, QueryStats | None]:
        """The queries (or, for TriAttention, statistics) a compression scores with."""
        stats = self._calibrated
        queries = None
        if self._online:
            if self._queries:
                self._fold(seen)
                self._queries, self._n_queries = [], 0
            stats = self._online_stats
        elif self._needs_queries and self._queries:
            queries = torch.cat(self._queries, dim=-2) if len(self._queries) > 1 else self._queries[0]
        return queries, stats

    def _keep_last(self, n: int) -> None:
        if not self._queries:
            return
        queries = torch.cat(self._queries, dim=-2) if len(self._queries) > 1 else self._queries[0]
        q = queries.shape[-2]
        if q > n:
            queries = queries[..., q - n :, :]
        self._queries, self._n_queries = [queries], queries.shape[-2]


def load_calibration(path: str, n_layers: int) -> list[QueryStats]:
    """Per-layer TriAttention query statistics from a file written by
    ``python -m kvpress_rs.calibrate`` (safetensors: ``layer.{i}.{name}`` tensors)."""
    from safetensors.torch import load_file

    from .errors import InvalidArgumentError

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # a missing or corrupt file: say which argument
        raise InvalidArgumentError(f"`query_stats`: cannot read calibration file {str(path)!r}: {exc}") from exc
    names = ("center_re", "center_im", "magnitude", "rest_mean", "rest_magnitude")
    stats = []
    for i in range(n_layers):
        missing = [n for n in (*names, "count") if f"layer.{i}.{n}" not in tensors]
        if missing:
            raise InvalidArgumentError(
                f"`query_stats`: calibration file {str(path)!r} lacks layer {i}'s {missing} "
                f"(the model has {n_layers} layers; was it calibrated on another model?)"
            )
        parts = [tensors[f"layer.{i}.{n}"].float() for n in names]
        stats.append(QueryStats.from_tensors(*parts, int(tensors[f"layer.{i}.count"].item())))
    return stats
