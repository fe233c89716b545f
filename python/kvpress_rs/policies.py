"""The named caches, one per policy. Each is :class:`~kvpress_rs.KVCache` with its policy
fixed; :data:`REGISTRY` lists them with an easy and a hard configuration, which the
generic tests run through (adding a policy adds one entry and gets every generic test).

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cache import KVCache


class StreamingLLMCache(KVCache):
    """StreamingLLM (Xiao et al., 2023): keep the first ``n_sink`` tokens (attention sinks)
    and the most recent ones.

    >>> cache = StreamingLLMCache(model, compression_ratio=0.5, n_sink=4)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, compression_ratio: float | None = None, max_tokens: int | None = None, n_sink: int = 4):
        super().__init__(model, "streaming_llm", compression_ratio=compression_ratio, max_tokens=max_tokens, n_sink=n_sink)


class KnormCache(KVCache):
    """Knorm (Devoto et al., 2024): keep the keys with the smallest L2 norm (score −‖k‖₂,
    in float32).

    >>> cache = KnormCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, compression_ratio: float | None = None, max_tokens: int | None = None):
        super().__init__(model, "knorm", compression_ratio=compression_ratio, max_tokens=max_tokens)


class RandomCache(KVCache):
    """Random eviction (a baseline): uniform scores from a seeded counter-based generator,
    reproducible per (seed, layer, batch row, head, token).

    >>> cache = RandomCache(model, compression_ratio=0.5, seed=0)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, compression_ratio: float | None = None, max_tokens: int | None = None, seed: int = 0):
        super().__init__(model, "random", compression_ratio=compression_ratio, max_tokens=max_tokens, seed=seed)


@dataclass(frozen=True)
class PolicySpec:
    """A policy as the tests and the demo see it."""

    name: str
    cache_class: type[KVCache]
    easy: dict[str, Any] = field(default_factory=dict)
    hard: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, PolicySpec] = {
    "streaming_llm": PolicySpec("streaming_llm", StreamingLLMCache, {"n_sink": 4}, {"n_sink": 1}),
    "knorm": PolicySpec("knorm", KnormCache),
    "random": PolicySpec("random", RandomCache, {"seed": 0}, {"seed": 12345}),
}
