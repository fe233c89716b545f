"""The named caches, one per policy: each is :class:`~kvpress_rs.KVCache` with its policy
fixed and its parameters spelled out. :data:`REGISTRY` lists them with an easy and a hard
configuration (sized for short test prompts), which the generic tests run through: adding
a policy adds one entry and gets every generic test.

Every cache also takes ``compression_ratio`` or ``max_tokens``, ``layer_budget``
(``"uniform"`` | ``"pyramid"`` | ``"cake"``) and ``head_budget`` (``"uniform"`` |
``"adakv"``): any policy with any budget.

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=64)  # doctest: +SKIP
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

    def __init__(self, model: Any, *, n_sink: int = 4, **budget: Any):
        super().__init__(model, "streaming_llm", n_sink=n_sink, **budget)


class KnormCache(KVCache):
    """Knorm (Devoto et al., 2024): keep the keys with the smallest L2 norm (score −‖k‖₂,
    in float32).

    >>> cache = KnormCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, **budget: Any):
        super().__init__(model, "knorm", **budget)


class RandomCache(KVCache):
    """Random eviction (a baseline): uniform scores from a seeded counter-based generator,
    reproducible per (seed, layer, batch row, head, token).

    >>> cache = RandomCache(model, compression_ratio=0.5, seed=0)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, seed: int = 0, **budget: Any):
        super().__init__(model, "random", seed=seed, **budget)


class SnapKVCache(KVCache):
    """SnapKV (Li et al., 2024): the attention of the last ``window_size`` prompt queries
    to each earlier token, averaged, average-pooled over ``kernel_size`` neighbours and over
    each KV head's group of query heads; the window itself is kept. Append the question to
    the context before compressing to make it query-aware.

    During generation (``decoding_budget``), the kept tokens are no longer neighbours in the
    text: with ``decoding_pooling="rank"`` (the default) each compression pools a token's
    score over the ``decoding_kernel_size`` tokens ranked next to it by the previous
    compression instead, a memory of earlier windows; ``"position"`` pools over storage
    neighbours with ``kernel_size``, as kvpress's DecodingPress does with position-ordered
    tokens.

    >>> cache = SnapKVCache(model, compression_ratio=0.5, window_size=64, kernel_size=5)  # doctest: +SKIP
    >>> cache = SnapKVCache(model, decoding_budget=1024, decoding_pooling="position")  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, window_size: int = 64, kernel_size: int = 5, decoding_pooling: str = "rank",
                 decoding_kernel_size: int = 7, **budget: Any):
        super().__init__(model, "snapkv", window_size=window_size, kernel_size=kernel_size,
                         decoding_pooling=decoding_pooling, decoding_kernel_size=decoding_kernel_size, **budget)


class PyramidKVCache(KVCache):
    """PyramidKV (Cai et al., 2024): SnapKV scores with a per-layer budget that decreases
    linearly with depth (``beta`` sets the smallest budget; the mean stays the requested
    ratio). Layers then store different counts; the attention path adapts the mask per
    layer, so generation is exact with sdpa and eager attention.

    >>> cache = PyramidKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, window_size: int = 64, kernel_size: int = 5, beta: float = 20.0, **budget: Any):
        budget.setdefault("layer_budget", "pyramid")
        super().__init__(model, "snapkv", window_size=window_size, kernel_size=kernel_size, beta=beta, **budget)


class TOVACache(KVCache):
    """TOVA (Oren et al., 2024): the attention of the last prompt token, averaged over all
    query heads and shared by every KV head; the last token is kept.

    >>> cache = TOVACache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, **budget: Any):
        super().__init__(model, "tova", **budget)


class ObservedAttentionCache(KVCache):
    """H2O / ObservedAttention (Zhang et al., 2023): the attention each token received from
    all prompt queries, divided by how many queries could see it. Computed from the queries
    in chunks of ``chunk_size``: the model need not run eager attention.

    >>> cache = ObservedAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, chunk_size: int = 512, **budget: Any):
        super().__init__(model, "observed_attention", chunk_size=chunk_size, **budget)


class KeyDiffCache(KVCache):
    """KeyDiff (Park et al., 2025): keep the keys least similar (cosine) to the mean
    normalised key of their head.

    >>> cache = KeyDiffCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, **budget: Any):
        super().__init__(model, "keydiff", **budget)


class LagKVCache(KVCache):
    """LagKV (Liang et al., 2025): tokens ranked within partitions of ``lag_size`` by the
    spread of their keys and values normalised with the next partition's statistics; sinks
    and the last partition are kept.

    >>> cache = LagKVCache(model, compression_ratio=0.5, lag_size=128)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, n_sink: int = 4, lag_size: int = 128, cross_scoring: bool = False, **budget: Any):
        super().__init__(model, "lagkv", n_sink=n_sink, lag_size=lag_size, cross_scoring=cross_scoring, **budget)


class ExpectedAttentionCache(KVCache):
    """ExpectedAttention (kvpress): the attention a key can expect from future queries,
    from the mean and covariance of the prompt's pre-RoPE queries moved ``n_future_positions``
    ahead by averaged RoPE, times ‖v‖; ``n_sink`` sinks are kept.

    >>> cache = ExpectedAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        n_future_positions: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
        **budget: Any,
    ):
        super().__init__(
            model, "expected_attention", n_future_positions=n_future_positions, n_sink=n_sink,
            use_covariance=use_covariance, use_vnorm=use_vnorm, epsilon=epsilon, **budget,
        )


class TriAttentionCache(KVCache):
    """TriAttention (Mao et al., 2026): keys scored by the trigonometric series of their
    distance to future queries, from the center of the pre-RoPE queries (over offsets 1, 2,
    4, … 2^(``n_offsets``−1)), plus a norm term; z-normalised per query head, max over each
    KV head's group.

    >>> cache = TriAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, n_offsets: int = 17, normalize: bool = True, aggregation: str = "max", **budget: Any):
        super().__init__(model, "triattention", n_offsets=n_offsets, normalize=normalize, aggregation=aggregation, **budget)


class CAKECache(KVCache):
    """CAKE (Qin et al., ICLR 2025): the CAKE eviction indicator (mean + ``gamma`` ×
    variance of the last ``window_size`` queries' attention, pooled) with the CAKE layer
    budget: after the prefill forward, the model's total budget is split across layers in
    proportion to each layer's preference (attention dispersion^(1/``tau1``) × shift^(1/``tau2``)).

    >>> cache = CAKECache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        window_size: int = 32,
        kernel_size: int = 5,
        gamma: float = 200.0,
        tau1: float = 1.6,
        tau2: float = 0.6,
        **budget: Any,
    ):
        budget.setdefault("layer_budget", "cake")
        super().__init__(
            model, "cake", window_size=window_size, kernel_size=kernel_size, gamma=gamma, tau1=tau1, tau2=tau2,
            cake_window=window_size, **budget,
        )


class AdaKVCache(KVCache):
    """AdaKV (Feng et al., 2024): any scorer with an adaptive split of each layer's budget
    among its KV heads (each head keeps at least ``alpha_safeguard`` of the mean, the rest
    goes to the highest scores across heads). Heads then hold different counts and the
    evicted tokens' memory is freed (kvpress only masks them).

    >>> cache = AdaKVCache(model, scorer="snapkv", compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(self, model: Any, scorer: str = "snapkv", *, alpha_safeguard: float = 0.2, **kwargs: Any):
        kwargs.setdefault("head_budget", "adakv")
        super().__init__(model, scorer, alpha_safeguard=alpha_safeguard, **kwargs)


@dataclass(frozen=True)
class PolicySpec:
    """A policy as the tests and the demo see it: ``easy``/``hard`` are keyword arguments
    sized for short (tens of tokens) test prompts."""

    name: str
    cache_class: type[KVCache]
    easy: dict[str, Any] = field(default_factory=dict)
    hard: dict[str, Any] = field(default_factory=dict)
    needs_queries: bool = False


REGISTRY: dict[str, PolicySpec] = {
    "streaming_llm": PolicySpec("streaming_llm", StreamingLLMCache, {"n_sink": 4}, {"n_sink": 1}),
    "knorm": PolicySpec("knorm", KnormCache),
    "random": PolicySpec("random", RandomCache, {"seed": 0}, {"seed": 12345}),
    "snapkv": PolicySpec("snapkv", SnapKVCache, {"window_size": 8}, {"window_size": 3, "kernel_size": 1}, True),
    "pyramidkv": PolicySpec("pyramidkv", PyramidKVCache, {"window_size": 4}, {"window_size": 2, "beta": 2.0}, True),
    "tova": PolicySpec("tova", TOVACache, {}, {}, True),
    "observed_attention": PolicySpec("observed_attention", ObservedAttentionCache, {}, {"chunk_size": 7}, True),
    "keydiff": PolicySpec("keydiff", KeyDiffCache),
    "lagkv": PolicySpec("lagkv", LagKVCache, {"lag_size": 8}, {"n_sink": 1, "lag_size": 4, "cross_scoring": True}),
    "expected_attention": PolicySpec("expected_attention", ExpectedAttentionCache, {}, {"n_sink": 1, "n_future_positions": 7, "use_covariance": False}, True),
    "triattention": PolicySpec("triattention", TriAttentionCache, {}, {"n_offsets": 3, "aggregation": "mean", "normalize": False}, True),
    "cake": PolicySpec("cake", CAKECache, {"window_size": 8}, {"window_size": 4, "gamma": 0.0, "tau1": 0.5}, True),
    "adakv": PolicySpec("adakv", AdaKVCache, {"window_size": 8}, {"scorer": "knorm", "alpha_safeguard": 0.5}, True),
}
