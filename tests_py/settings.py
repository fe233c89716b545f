"""Test-only settings of every named cache: an easy and a hard configuration sized for
short (tens of tokens) test prompts, which the generic tests run through — adding a method
adds one line here and gets every generic test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvpress_rs.cache import KVCache
from kvpress_rs.policies import CACHES


@dataclass(frozen=True)
class PolicySpec:
    """A named cache as the tests see it: ``easy``/``hard`` are keyword arguments."""

    name: str
    cache_class: type[KVCache]
    easy: dict[str, Any] = field(default_factory=dict)
    hard: dict[str, Any] = field(default_factory=dict)
    needs_queries: bool = False


def _spec(name: str, easy: dict | None = None, hard: dict | None = None, needs_queries: bool = False) -> PolicySpec:
    return PolicySpec(name, CACHES[name], easy or {}, hard or {}, needs_queries)


REGISTRY: dict[str, PolicySpec] = {
    "streaming_llm": _spec("streaming_llm", {"n_sink": 4}, {"n_sink": 1}),
    "knorm": _spec("knorm"),
    "random": _spec("random", {"seed": 0}, {"seed": 12345}),
    "snapkv": _spec("snapkv", {"window_size": 8}, {"window_size": 3, "kernel_size": 1}, True),
    "pyramidkv": _spec("pyramidkv", {"window_size": 4}, {"window_size": 2, "beta": 2.0}, True),
    "tova": _spec("tova", {}, {}, True),
    "observed_attention": _spec("observed_attention", {}, {"chunk_size": 7}, True),
    "keydiff": _spec("keydiff"),
    "lagkv": _spec("lagkv", {"lag_size": 8}, {"n_sink": 1, "lag_size": 4, "cross_scoring": True}),
    "expected_attention": _spec(
        "expected_attention", {}, {"n_sink": 1, "n_future_positions": 7, "use_covariance": False}, True
    ),
    "triattention": _spec("triattention", {}, {"n_offsets": 3, "aggregation": "mean", "normalize": False}, True),
    "cake": _spec("cake", {"window_size": 8}, {"window_size": 4, "gamma": 0.0, "tau1": 0.5}, True),
    "adakv": _spec("adakv", {"window_size": 8}, {"scorer": "knorm", "alpha_safeguard": 0.5}, True),
    "chunkkv": _spec("chunkkv", {"window_size": 8, "chunk_length": 4}, {"scorer": "knorm", "chunk_length": 3}, True),
}

assert set(REGISTRY) == set(CACHES), "every named cache needs its test settings here"
