"""Drop-in transformers caches that compress the KV cache with a Rust press.

A :class:`KVCache` is a transformers ``Cache`` whose full-attention layers are
:class:`CompressedLayer` s, each adapting one Rust ``LayerState``: on the first forward
(the prefill) the layer returns the full keys/values for that forward's attention, then
the press scores the tokens and the store frees all but the kept ones. Later forwards
(decoding, a question, the next chat turn) append without compression — unless the cache
has a decoding budget, which keeps compressing as it grows.

With ``quantization=QuantConfig(...)`` the kept tokens are then quantized once (append-only
blocks, fused attention over the codes); with ``low_bits`` as well, the evicted tokens are
kept at low precision instead of dropped (MiKV). Every step of it is the layer state's, in
Rust (``src/layer/``); this module reads the arguments and builds the pieces.

Positions: the cache reports tokens SEEN from ``get_seq_length()`` so that generation
continues at the right position, and describes the keys it actually STORES to the mask
(``get_mask_sizes``), offset so that a multi-token chunk after compression stays causal.
Left-padded batches: every row is scored and budgeted over its own tokens, pads are never
kept while a token of their row is evicted, and attention never sees them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ._layer import CacheLayer, LayerStateCache
from ._native import DecodingSchedule, LayerState, Press, QuantConfig
from .decoding import load_calibration
from .errors import InvalidArgumentError, UnsupportedError, UnsupportedModelError
from .models import decoder_config
from .rope import Rope


class CompressedLayer(CacheLayer):
    """One full-attention layer of a :class:`KVCache` (a :class:`~kvpress_rs._layer.CacheLayer`
    over a Rust ``LayerState`` with the cache's press)."""


class KVCache(LayerStateCache):
    """A transformers cache that compresses the prompt's KV cache once per layer, right
    after that layer's prefill attention, with a Rust press.

    Parameters
    ----------
    model : transformers.PreTrainedModel or PretrainedConfig
        The model the cache serves (its config gives the layers; a model also lets the
        cache see each layer's queries and detect reuse for an unrelated prompt).
    policy : str
        A scorer of the registry: ``"knorm"``, ``"streaming_llm"``, ``"random"``,
        ``"snapkv"``, ``"tova"``, ``"observed_attention"``, ``"keydiff"``, ``"lagkv"``,
        ``"expected_attention"``, ``"triattention"``, ``"cake"`` (``kvpress_rs._native.registry()``).
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1) (kvpress's meaning): each layer
        keeps ``int(T * (1 - compression_ratio))`` tokens per KV head on average (T: a
        row's real tokens, in a padded batch).
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str
        ``"uniform"``, ``"pyramid"`` (PyramidKV, ``beta``), ``"cake"`` (CAKE, ``tau1``,
        ``tau2``, ``cake_window``) or ``"explicit"`` (``layer_ratios``: one ratio per layer).
    head_budget : str
        ``"uniform"`` or ``"adakv"`` (AdaKV: heads keep different counts, at least
        ``alpha_safeguard`` of the mean; the memory of evicted tokens is freed).
    selector : str
        How a row's tokens are chosen from its scores: ``"topk"`` or ``"chunks"`` (ChunkKV:
        whole chunks of ``chunk_length`` consecutive tokens, the same in every head).
    transforms : sequence of str
        Score transforms applied in order, e.g. ``["head_mean"]``.
    rerotate : bool
        Re-rotate the kept keys to compact positions (one delta rotation per key, angles in
        float64) so that generation continues at position n_kept instead of the number of
        tokens seen. With per-layer or per-head budgets (and per row of a padded batch),
        every row is compacted to end right before the same next position (the longest
        row's length). ``kept_positions`` stays the original positions, ``key_positions``
        gives where the keys sit now.
    quantization : kvpress_rs.QuantConfig, optional
        Quantize the kept tokens once, right after the compression (and re-rotation) of
        the prefill, and every later token append-only, as :class:`QuantizedKVCache` does.
        Not available with ``head_budget="adakv"`` (ragged rows); once quantized, a layer
        no longer keeps the original positions (``kept_positions`` raises). With
        ``decoding_budget``, tokens are evicted from the quantized store during generation
        too: the kept tokens keep their codes and scales/zeros (never re-quantized), the
        full-precision sinks and residual window are never evicted, and ``rerotate=True``
        needs ``pre_rope_keys=True``.
    low_bits : int, optional
        Mixed precision (MiKV), with ``quantization``: the tokens the policy would evict are
        kept, quantized once at ``low_bits`` (2, 3, 4 or 8; the other options of
        ``quantization``, no residual window), instead of dropped; attention covers both
        precisions with one softmax. Not with ``rerotate``.
    decoding_budget : int, optional
        Compress during generation too: each layer keeps this many tokens per KV head,
        compressing back to it whenever it has grown ``decoding_interval`` past it (a
        multi-token forward — a prompt block, a chat turn — as soon as it exceeds it). The
        last ``decoding_interval`` tokens are never evicted.
    decoding_ratio : float, optional
        Instead of ``decoding_budget``: keep this fraction, in (0, 1], of the tokens seen.
    decoding_interval : int, optional
        Tokens between compressions during generation (default 128).
    protect_prompt : bool, optional
        Never evict the tokens stored when generation starts (default: True for
        TriAttention, its reference schedule; False otherwise).
    query_stats : str, optional
        TriAttention: a calibration file from ``python -m kvpress_rs.calibrate``
        (default: statistics of the queries the cache sees).
    **params
        The stages' parameters: ``n_sink`` (StreamingLLM, 4), ``seed`` (Random),
        ``window_size``/``kernel_size`` (SnapKV, 64/5), ``beta`` (pyramid, 20.0), ... —
        every name, default and range in the registry; the named caches
        (``kvpress_rs.SnapKVCache`` ...) spell them out.

    Example
    -------
    >>> import kvpress_rs  # doctest: +SKIP
    >>> cache = kvpress_rs.KVCache(model, policy="knorm", compression_ratio=0.5)  # doctest: +SKIP
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
    >>> cache.stats()["tokens_kept"][:3]  # doctest: +SKIP
    [512, 512, 512]
    """

    layer_class = CompressedLayer

    def __init__(
        self,
        model: Any,
        policy: str = "knorm",
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        head_budget: str = "uniform",
        selector: str = "topk",
        transforms: Sequence[str] = (),
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
        **params: Any,
    ):
        config = decoder_config(model)
        self.quantization = self._quantization(quantization, head_budget, config)
        self.low_quantization = self._low_quantization(low_bits, rerotate)
        if not _has_rope(config):
            raise UnsupportedModelError(
                f"`model` ({type(config).__name__}) has no rotary position embedding config "
                "(rope_parameters / rope_theta); kvpress_rs caches need a RoPE model"
            )
        self.rope = Rope.from_config(config)
        self.rerotate = bool(rerotate)
        self.press = Press(
            policy,
            compression_ratio=compression_ratio,
            max_tokens=max_tokens,
            layer_budget=layer_budget,
            head_budget=head_budget,
            selector=selector,
            eviction="low_bits" if low_bits is not None else "drop",
            transforms=list(transforms),
            n_layers=config.num_hidden_layers,
            rope=self.rope,
            **params,
        )
        if self.rerotate and not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError("rerotate=True re-rotates after the whole prefill: pass the model itself, not its config")
        if self.press.query_window is not None and not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError(
                f"policy {policy!r} scores tokens with the model's queries: pass the model itself, not its config"
            )
        self.decoding = self._decoding_schedule(
            decoding_budget, decoding_ratio, decoding_interval, protect_prompt, head_budget
        )
        calibration = self._calibration(query_stats, config.num_hidden_layers)
        # transformers decides which layers are sliding-window; those stay as they are.
        layers: list[Any] = []
        for idx, layer in enumerate(DynamicCache(config=config).layers):
            if type(layer) is not DynamicLayer:
                layers.append(layer)
                continue
            layers.append(
                LayerState(
                    idx,
                    self.press,
                    quantization=self.quantization,
                    low_bits=self.low_quantization,
                    rope=self.rope,
                    decoding=self.decoding,
                    query_stats=calibration[idx] if calibration is not None else None,
                )
            )
        super().__init__(model, layers, rerotate=self.rope if self.rerotate else None)

    @staticmethod
    def _quantization(quantization: Any, head_budget: str, config: Any) -> QuantConfig | None:
        if quantization is None:
            return None
        if not isinstance(quantization, QuantConfig):
            raise InvalidArgumentError(
                f"`quantization` must be a kvpress_rs.QuantConfig or None, got {type(quantization).__name__}"
            )
        if head_budget == "adakv":
            raise UnsupportedError(
                "`quantization` with head_budget='adakv' is not supported: AdaKV stores ragged "
                "rows (per-head lengths), the quantized store uniform ones; use head_budget='uniform'"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        quantization.check_head_dims(head_dim)
        return quantization

    def _low_quantization(self, low_bits: int | None, rerotate: bool) -> QuantConfig | None:
        if low_bits is None:
            return None
        if self.quantization is None:
            raise InvalidArgumentError("`low_bits` needs `quantization` (the precision of the kept tokens)")
        if rerotate:
            raise UnsupportedError("`low_bits` with rerotate=True is not supported: low-precision tokens keep their positions")
        q = self.quantization
        return QuantConfig(
            bits=low_bits, group_size=q.group_size, residual_length=0, key_grouping=q.key_grouping,
            value_grouping=q.value_grouping, hadamard=q.hadamard, outlier_fraction=q.outlier_fraction,
        )

    def _decoding_schedule(
        self,
        budget: int | None,
        ratio: float | None,
        interval: int | None,
        protect_prompt: bool | None,
        head_budget: str,
    ) -> DecodingSchedule | None:
        """The decoding-time compression schedule, or None when none of its arguments is
        given. TriAttention protects the prompt by default (its reference schedule)."""
        if budget is None and ratio is None and interval is None and protect_prompt is None:
            return None
        for name, value in (("decoding_budget", budget), ("decoding_interval", interval)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidArgumentError(f"`{name}` must be an int, got {value!r}")
        if protect_prompt is None:
            protect_prompt = self.press.policy == "triattention"
        schedule = DecodingSchedule(
            decoding_budget=budget, decoding_ratio=ratio, decoding_interval=interval, protect_prompt=bool(protect_prompt)
        )
        if head_budget == "adakv":
            raise UnsupportedError(
                "decoding-time compression with head_budget='adakv' is not supported: AdaKV leaves "
                "ragged rows, which are not re-scored; use head_budget='uniform'"
            )
        if self.quantization is not None:
            self._check_quantized_decoding(schedule)
        window = self.press.query_window
        if isinstance(window, int) and window > schedule.decoding_interval:
            raise InvalidArgumentError(
                f"`decoding_interval` ({schedule.decoding_interval}) must be at least the {window} queries "
                f"policy {self.press.policy!r} scores with (window_size)"
            )
        return schedule

    def _check_quantized_decoding(self, schedule: DecodingSchedule) -> None:
        """What decoding-time compression of a quantized cache cannot do, refused up front."""
        q = self.quantization
        if self.low_quantization is not None:
            raise UnsupportedError(
                "`low_bits` (mixed precision) with decoding-time compression is not supported: moving "
                "evicted tokens' codes into the low-precision store would re-quantize them"
            )
        if self.rerotate and not q.pre_rope_keys:
            raise UnsupportedError(
                "`rerotate=True` with decoding-time compression of a quantized cache needs "
                "QuantConfig(pre_rope_keys=True): packed post-RoPE keys cannot be re-rotated without "
                "re-quantizing them (with pre-RoPE keys, re-rotation only changes positions)"
            )
        if self.rerotate and q.sink_tokens:
            raise UnsupportedError(
                "`rerotate=True` with decoding-time compression of a quantized cache needs "
                "QuantConfig(sink_tokens=0): sink positions are not recorded"
            )
        budget = schedule.decoding_budget
        # Only quantized tokens are evicted: the sinks and the residual window (fewer than
        # window_tokens tokens) stay, so the budget must hold them next to the recent tokens.
        protected = max(schedule.decoding_interval, q.window_tokens - 1) + q.sink_tokens
        if budget is not None and budget < protected:
            raise InvalidArgumentError(
                f"`decoding_budget` ({budget}) must be at least {protected} with this quantization: "
                f"max(decoding_interval={schedule.decoding_interval}, window_tokens-1={q.window_tokens - 1}) "
                f"+ sink_tokens={q.sink_tokens} tokens are never evicted (the full-precision sinks and "
                "residual window stay whole)"
            )

    def _calibration(self, query_stats: Any, n_layers: int) -> list | None:
        """TriAttention's per-layer query statistics from a calibration file, or None
        (statistics of the queries the cache sees)."""
        if query_stats is None or query_stats == "online":
            return None
        if self.press.policy != "triattention":
            raise InvalidArgumentError(
                f"`query_stats` is TriAttention's calibration file; policy {self.press.policy!r} does not use one"
            )
        if self.decoding is None:
            raise InvalidArgumentError("`query_stats` is used by decoding-time compression: give `decoding_budget`")
        if isinstance(query_stats, (list, tuple)):
            return list(query_stats)
        return load_calibration(query_stats, n_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(press={self.press!r}, layers={len(self.layers)})"


def _has_rope(config: Any) -> bool:
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))
