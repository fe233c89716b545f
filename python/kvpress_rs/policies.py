"""The named caches, one per method: :class:`~kvpress_rs.KVCache` with its scorer (and for
some, its layer or head budget) fixed and every parameter spelled out with its default.

Generated from the Rust registry (``src/registry.rs``) by ``python -m kvpress_rs._generate``:
do not edit; ``tests_py/test_generated.py`` fails when it is stale.

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=64)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import kvpress_rs  # noqa: F401 - the docstring examples' name

from ._native import QuantConfig  # noqa: F401 - annotations
from .cache import KVCache

__all__ = [
    "StreamingLLMCache",
    "KnormCache",
    "RandomCache",
    "SnapKVCache",
    "PyramidKVCache",
    "TOVACache",
    "ObservedAttentionCache",
    "KeyDiffCache",
    "LagKVCache",
    "ExpectedAttentionCache",
    "TriAttentionCache",
    "CAKECache",
    "AdaKVCache",
    "ChunkKVCache",
    "CACHES",
]


class StreamingLLMCache(KVCache):
    """StreamingLLM (Xiao et al., 2023): the scorer ``streaming_llm``.

    Keeps the first ``n_sink`` tokens (attention sinks) and the most recent ones.
    Paper: https://arxiv.org/abs/2309.17453

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    n_sink : int, default 4
        First tokens always kept (attention sinks) (an integer >= 0).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.StreamingLLMCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        n_sink: int = 4,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "streaming_llm", compression_ratio=compression_ratio, max_tokens=max_tokens,
            n_sink=n_sink,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class KnormCache(KVCache):
    """Knorm (Devoto et al., 2024): the scorer ``knorm``.

    Keeps the keys with the smallest L2 norm (score −‖k‖₂, in float32).
    Paper: https://arxiv.org/abs/2406.11430

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "knorm", compression_ratio=compression_ratio, max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class RandomCache(KVCache):
    """Random eviction (a baseline): the scorer ``random``.

    Uniform scores from a seeded counter-based generator, reproducible per (seed, layer, batch
    row, head, token).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    seed : int, default 0
        Seed of the generator (scores per seed, layer, row, head, token) (an integer).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.RandomCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "random", compression_ratio=compression_ratio, max_tokens=max_tokens,
            seed=seed,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class SnapKVCache(KVCache):
    """SnapKV (Li et al., 2024): the scorer ``snapkv``.

    The attention of the last ``window_size`` prompt queries to each earlier token, averaged,
    pooled over ``kernel_size`` neighbours and over each KV head's group; the window itself is
    kept. Append the question to the context before compressing to make it query-aware. During
    generation (``decoding_budget``), ``decoding_pooling="rank"`` pools each token's score over
    the tokens the previous compression ranked next to it.
    Paper: https://arxiv.org/abs/2404.14469

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    window_size : int, default 64
        Last prompt queries that score the tokens (the window is always kept) (an integer >= 1).
    kernel_size : int, default 5
        Odd width of the average pooling of scores over neighbours (an integer >= 1).
    decoding_pooling : str, default "rank"
        Decoding-time compressions pool over the previous ranking ("rank") or over storage neighbours (one of ["rank", "position"]).
    decoding_kernel_size : int, default 7
        Odd width of the pooling over the previous ranking (an integer >= 1).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        window_size: int = 64,
        kernel_size: int = 5,
        decoding_pooling: str = "rank",
        decoding_kernel_size: int = 7,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "snapkv", compression_ratio=compression_ratio, max_tokens=max_tokens,
            window_size=window_size,
            kernel_size=kernel_size,
            decoding_pooling=decoding_pooling,
            decoding_kernel_size=decoding_kernel_size,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class PyramidKVCache(KVCache):
    """PyramidKV (Cai et al., 2024): the scorer ``snapkv``, layer budget ``pyramid``.

    SnapKV scores with a per-layer budget that decreases linearly with depth (``beta`` sets the
    smallest budget; the mean stays the requested ratio).
    Paper: https://arxiv.org/abs/2406.02069

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    window_size : int, default 64
        Last prompt queries that score the tokens (the window is always kept) (an integer >= 1).
    kernel_size : int, default 5
        Odd width of the average pooling of scores over neighbours (an integer >= 1).
    decoding_pooling : str, default "rank"
        Decoding-time compressions pool over the previous ranking ("rank") or over storage neighbours (one of ["rank", "position"]).
    decoding_kernel_size : int, default 7
        Odd width of the pooling over the previous ranking (an integer >= 1).
    beta : float, default 20.0
        The mean budget over the smallest one (the last layer's) (a number >= 1).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.PyramidKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        window_size: int = 64,
        kernel_size: int = 5,
        decoding_pooling: str = "rank",
        decoding_kernel_size: int = 7,
        beta: float = 20.0,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "snapkv", compression_ratio=compression_ratio, max_tokens=max_tokens,
            window_size=window_size,
            kernel_size=kernel_size,
            decoding_pooling=decoding_pooling,
            decoding_kernel_size=decoding_kernel_size,
            layer_budget="pyramid",
            beta=beta,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class TOVACache(KVCache):
    """TOVA (Oren et al., 2024): the scorer ``tova``.

    The attention of the last prompt token, averaged over all query heads and shared by every KV
    head; the last token is kept.
    Paper: https://arxiv.org/abs/2401.06104

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.TOVACache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "tova", compression_ratio=compression_ratio, max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class ObservedAttentionCache(KVCache):
    """H2O / ObservedAttention (Zhang et al., 2023): the scorer ``observed_attention``.

    The attention each token received from all prompt queries, divided by how many queries could
    see it; computed from the queries in chunks of ``chunk_size`` (the model need not run eager
    attention).
    Paper: https://arxiv.org/abs/2306.14048

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    chunk_size : int, default 512
        Queries processed at a time (memory: chunk × tokens per head) (an integer >= 1).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.ObservedAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        chunk_size: int = 512,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "observed_attention", compression_ratio=compression_ratio, max_tokens=max_tokens,
            chunk_size=chunk_size,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class KeyDiffCache(KVCache):
    """KeyDiff (Park et al., 2025): the scorer ``keydiff``.

    Keeps the keys least similar (cosine) to the mean normalised key of their head.
    Paper: https://arxiv.org/abs/2504.15364

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.KeyDiffCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "keydiff", compression_ratio=compression_ratio, max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class LagKVCache(KVCache):
    """LagKV (Liang et al., 2025): the scorer ``lagkv``.

    Tokens ranked within partitions of ``lag_size`` by the spread of their keys and values
    normalised with the next partition's statistics; sinks and the last partition are kept.
    Paper: https://arxiv.org/abs/2504.04704

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    n_sink : int, default 4
        First tokens always kept (an integer >= 0).
    lag_size : int, default 128
        Tokens per partition (the last one is kept) (an integer >= 2).
    cross_scoring : bool, default False
        Score keys and values against each other's statistics (True or False).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.LagKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        n_sink: int = 4,
        lag_size: int = 128,
        cross_scoring: bool = False,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "lagkv", compression_ratio=compression_ratio, max_tokens=max_tokens,
            n_sink=n_sink,
            lag_size=lag_size,
            cross_scoring=cross_scoring,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class ExpectedAttentionCache(KVCache):
    """ExpectedAttention (NVIDIA kvpress): the scorer ``expected_attention``.

    The attention a key can expect from future queries, from the mean and covariance of the
    prompt's pre-RoPE queries moved ``n_future_positions`` ahead by averaged RoPE, times ‖v‖;
    ``n_sink`` sinks are kept.
    Paper: https://arxiv.org/abs/2510.00636

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    n_future_positions : int, default 512
        Future positions RoPE is averaged over (an integer >= 1).
    n_sink : int, default 4
        First tokens always kept, and left out of the query statistics (an integer >= 0).
    use_covariance : bool, default True
        Add the covariance term kᵀR̄ΣR̄ᵀk/2d (True or False).
    use_vnorm : bool, default True
        Multiply the score (+ epsilon) by the value norm ‖v‖ (True or False).
    epsilon : float, default 0.0
        Added to the score before it is multiplied by ‖v‖ (a number >= 0).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.ExpectedAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        n_future_positions: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "expected_attention", compression_ratio=compression_ratio, max_tokens=max_tokens,
            n_future_positions=n_future_positions,
            n_sink=n_sink,
            use_covariance=use_covariance,
            use_vnorm=use_vnorm,
            epsilon=epsilon,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class TriAttentionCache(KVCache):
    """TriAttention (Mao et al., 2026): the scorer ``triattention``.

    Keys scored by the trigonometric series of their distance to future queries, from the center
    of the pre-RoPE queries (over offsets 1, 2, 4, … 2^(``n_offsets``−1)), plus a norm term;
    z-normalised per query head, max over each KV head's group.
    Paper: https://arxiv.org/abs/2604.04921

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    n_offsets : int, default 17
        Future offsets 1, 2, 4, … 2^(n−1) the series is averaged over (an integer in [1, 40]).
    normalize : bool, default True
        Z-normalise each query head's scores over the keys (True or False).
    aggregation : str, default "max"
        How a KV head combines its query heads (one of ["max", "mean"]).
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.TriAttentionCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        n_offsets: int = 17,
        normalize: bool = True,
        aggregation: str = "max",
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "triattention", compression_ratio=compression_ratio, max_tokens=max_tokens,
            n_offsets=n_offsets,
            normalize=normalize,
            aggregation=aggregation,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class CAKECache(KVCache):
    """CAKE (Qin et al., 2025): the scorer ``cake``, layer budget ``cake``.

    The CAKE eviction indicator (mean + ``gamma`` × variance of the last ``window_size``
    queries' attention, pooled) with the CAKE layer budget: after the prefill forward, the
    model's total budget is split across layers in proportion to each layer's preference
    (attention dispersion^(1/``tau1``) × shift^(1/``tau2``)).
    Paper: https://arxiv.org/abs/2503.12491

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    window_size : int, default 32
        Last prompt queries whose attention is measured (always kept) (an integer >= 2).
    kernel_size : int, default 5
        Odd width of the average pooling (an integer >= 1).
    gamma : float, default 200.0
        Weight of the variance over the window (a number >= 0).
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, default 1.6
        Temperature of the dispersion (a number > 0).
    tau2 : float, default 0.6
        Temperature of the shift (a number > 0).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2); default: ``window_size``.
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.

    Example
    -------
    >>> cache = kvpress_rs.CAKECache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        window_size: int = 32,
        kernel_size: int = 5,
        gamma: float = 200.0,
        beta: float | None = None,
        tau1: float = 1.6,
        tau2: float = 0.6,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        super().__init__(
            model, "cake", compression_ratio=compression_ratio, max_tokens=max_tokens,
            window_size=window_size,
            kernel_size=kernel_size,
            gamma=gamma,
            layer_budget="cake",
            tau1=tau1,
            tau2=tau2,
            cake_window=cake_window if cake_window is not None else window_size,
            head_budget=head_budget,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class AdaKVCache(KVCache):
    """AdaKV (Feng et al., 2024): the scorer ``snapkv``, head budget ``adakv``.

    Any scorer with an adaptive split of each layer's budget among its KV heads (each head keeps
    at least ``alpha_safeguard`` of the mean, the rest goes to the highest scores across heads).
    Heads then hold different counts and the evicted tokens' memory is freed (kvpress only masks
    them).
    Paper: https://arxiv.org/abs/2407.11550

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    scorer : str
        The scorer whose scores the budget splits (any of the registry); its
        parameters go in ``**scorer_params``.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    alpha_safeguard : float, default 0.2
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]).
    selector : str, default "topk"
        Selector: ``"topk"`` | ``"chunks"`` | ``"entropy_chunks"``.
    chunk_length : int, optional
        Consecutive tokens per chunk (an integer >= 1), with selector="chunks" (default 20).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.
    **scorer_params
        The scorer's parameters.

    Example
    -------
    >>> cache = kvpress_rs.AdaKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        scorer: str = "snapkv",
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        alpha_safeguard: float = 0.2,
        selector: str = "topk",
        chunk_length: int | None = None,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
        **scorer_params: Any,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("chunk_length", chunk_length),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        stage_params.update(scorer_params)
        super().__init__(
            model, scorer, compression_ratio=compression_ratio, max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget="adakv",
            alpha_safeguard=alpha_safeguard,
            selector=selector,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


class ChunkKVCache(KVCache):
    """ChunkKV (Liu et al., 2025): the scorer ``snapkv``, selector ``chunks``.

    Any scorer with chunk-wise selection: the prompt is cut into chunks of ``chunk_length``
    consecutive tokens, ranked by their mean score summed over the KV heads, and the best chunks
    are kept whole, the same in every head, so that what survives is whole phrases rather than
    scattered tokens. The count is exactly the budget (the last chunk taken may be cut to its
    best tokens).
    Paper: https://arxiv.org/abs/2502.00299

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache serves.
    scorer : str
        The scorer whose scores the budget splits (any of the registry); its
        parameters go in ``**scorer_params``.
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps
        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str, default "uniform"
        Layer budget: ``"uniform"`` | ``"pyramid"`` | ``"cake"`` | ``"explicit"``.
    beta : float, optional
        The mean budget over the smallest one (the last layer's) (a number >= 1), with layer_budget="pyramid" (default 20.0).
    tau1 : float, optional
        Temperature of the dispersion (a number > 0), with layer_budget="cake" (default 1.6).
    tau2 : float, optional
        Temperature of the shift (a number > 0), with layer_budget="cake" (default 0.6).
    cake_window : int, optional
        Last prompt queries that measure each layer (an integer >= 2), with layer_budget="cake" (default 32).
    layer_ratios : list[float], optional
        The compression ratio of each layer, in [0, 1) (a list of numbers in [0, 1)), with layer_budget="explicit".
    head_budget : str, default "uniform"
        Head budget: ``"uniform"`` | ``"adakv"``.
    alpha_safeguard : float, optional
        Fraction of the mean budget every head keeps whatever its scores (a number in [0, 1]), with head_budget="adakv" (default 0.2).
    chunk_length : int, default 20
        Consecutive tokens per chunk (an integer >= 1).
    entropy_chunk_length : int, optional
        Consecutive tokens per chunk of the entropy-gated selection (an integer >= 2), with selector="entropy_chunks" (default 10).
    low_entropy_chunk_length : int, optional
        Tokens kept of a spiky chunk (fewer than entropy_chunk_length) (an integer >= 1), with selector="entropy_chunks" (default 4).
    transforms
        Score transforms (see :class:`~kvpress_rs.KVCache`).
    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, protect_prompt, query_stats
        As for :class:`~kvpress_rs.KVCache`.
    **scorer_params
        The scorer's parameters.

    Example
    -------
    >>> cache = kvpress_rs.ChunkKVCache(model, compression_ratio=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        scorer: str = "snapkv",
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        beta: float | None = None,
        tau1: float | None = None,
        tau2: float | None = None,
        cake_window: int | None = None,
        layer_ratios: list[float] | None = None,
        head_budget: str = "uniform",
        alpha_safeguard: float | None = None,
        chunk_length: int = 20,
        entropy_chunk_length: int | None = None,
        low_entropy_chunk_length: int | None = None,
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
        **scorer_params: Any,
    ):
        stage_params = {name: value for name, value in (
            ("beta", beta),
            ("tau1", tau1),
            ("tau2", tau2),
            ("cake_window", cake_window),
            ("layer_ratios", layer_ratios),
            ("alpha_safeguard", alpha_safeguard),
            ("entropy_chunk_length", entropy_chunk_length),
            ("low_entropy_chunk_length", low_entropy_chunk_length),
        ) if value is not None}
        stage_params.update(scorer_params)
        super().__init__(
            model, scorer, compression_ratio=compression_ratio, max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector="chunks",
            chunk_length=chunk_length,
            transforms=transforms,
            rerotate=rerotate,
            quantization=quantization,
            low_bits=low_bits,
            decoding_budget=decoding_budget,
            decoding_ratio=decoding_ratio,
            decoding_interval=decoding_interval,
            protect_prompt=protect_prompt,
            query_stats=query_stats,
            **stage_params,
        )


# The named caches by the method's short name (benchmark specs, the demo).
CACHES: dict[str, type[KVCache]] = {
    "streaming_llm": StreamingLLMCache,
    "knorm": KnormCache,
    "random": RandomCache,
    "snapkv": SnapKVCache,
    "pyramidkv": PyramidKVCache,
    "tova": TOVACache,
    "observed_attention": ObservedAttentionCache,
    "keydiff": KeyDiffCache,
    "lagkv": LagKVCache,
    "expected_attention": ExpectedAttentionCache,
    "triattention": TriAttentionCache,
    "cake": CAKECache,
    "adakv": AdaKVCache,
    "chunkkv": ChunkKVCache,
}
