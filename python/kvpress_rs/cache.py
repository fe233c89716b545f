"""Drop-in transformers caches that compress the KV cache with a Rust press.

A :class:`KVCache` is a ``transformers.Cache`` whose full-attention layers are
:class:`CompressedLayer` s. Each layer holds a Rust ``LayerStore``; on the first forward
(the prefill) the layer returns the full keys/values for that forward's attention, then
the press scores the tokens and the store frees all but the kept ones. Later forwards
(decoding, a question, the next chat turn) append without compression.

With ``quantization=QuantConfig(...)`` the kept tokens are then quantized once: at the end of
the prefill forward (after any cross-layer budget allocation and re-rotation) the layer
moves them from its ``LayerStore`` into a Rust ``QuantizedStore`` and frees the former;
from then on it behaves like a :class:`~kvpress_rs.QuantizedLayer` (append-only blocks,
fused attention over the codes) whose first token sits after the evicted ones.

With a decoding budget as well, the quantized store keeps compressing during generation:
the layer scores its (dequantized) tokens and the store drops the evicted ones' codes,
keeping the others' exactly (``QuantizedStore.compress_to``; docs/ARCHITECTURE.md,
"Decoding-time compression of a quantized cache").

With ``low_bits`` as well (mixed precision, MiKV), the tokens the policy evicts are not
dropped: they go, once, into a second ``QuantizedStore`` at ``low_bits``, and attention runs
over both stores with one softmax (``QuantizedStore.attend_union``).

Positions: the cache reports tokens SEEN from ``get_seq_length()`` so that generation
continues at the right position, and describes the keys it actually STORES to the mask
(``get_mask_sizes``), offset so that a multi-token chunk after compression stays causal.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import _compat, attention
from ._guard import GuardedCache, TokenLog
from ._hooks import install_model_hooks
from ._layer import StoreLayer, batch_indices, layers_nbytes
from ._native import DecodingSchedule, LayerStore, Press, QuantConfig, QuantizedStore
from .decoding import LayerDecoding, load_calibration
from .errors import CacheStateError, InvalidArgumentError, UnsupportedError, UnsupportedModelError
from .models import decoder_config
from .quantized import _UNSUPPORTED_KWARGS, attend_store
from .rope import Rope


class CompressedLayer(StoreLayer):
    """One full-attention layer of a :class:`KVCache`: a Rust ``LayerStore`` plus the
    shared press, adapted to transformers' ``CacheLayerMixin`` interface. Without a press
    (an assembled cache of reused chunks) it only appends. With a ``quantization`` config,
    the tokens kept after the prefill move to a Rust ``QuantizedStore`` (see the module
    docstring)."""

    def __init__(
        self,
        press: Press | None,
        layer_idx: int,
        quantization: QuantConfig | None = None,
        low_quantization: QuantConfig | None = None,
        rope: Rope | None = None,
        decoding: LayerDecoding | None = None,
    ):
        super().__init__()
        self._store = LayerStore()
        self._decoding = decoding  # decoding-time compression (decoding_budget=)
        self._new_tokens = 0  # tokens of the running forward
        self._press = press
        self.layer_idx = layer_idx
        self._pending_compression = False
        self._scored: tuple[torch.Tensor, float] | None = None
        self._quantization = quantization
        self._low_quantization = low_quantization  # mixed precision: evicted tokens' config
        self._rope = rope  # for quantization with pre_rope_keys
        self._evicted_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._low: QuantizedStore | None = None
        # After quantization: the kept tokens (and every later one) and how many tokens seen
        # before them were evicted (so that seen = evicted + stored).
        self._qstore: QuantizedStore | None = None
        self._evicted = 0
        self._attend_quantized = False
        self._evicted_now = False  # a decoding-time eviction in the running forward (rerotate)

    @property
    def _seen(self) -> int:
        return self._stored + self._evicted if self._qstore is not None else self._store.seen

    @property
    def _stored(self) -> int:
        if self._qstore is None:
            return self._store.stored
        return self._qstore.seen + (self._low.seen if self._low is not None else 0)

    def _quantize_kept(self) -> None:
        """Moves the kept tokens into a quantized store, once, after the compression
        (and any re-rotation) of the prefill; a no-op otherwise."""
        if (
            self._quantization is None
            or self._qstore is not None
            or not self._store.seen
            or self._pending_compression
            or self._scored is not None
        ):
            return
        if self._store.is_ragged:
            raise UnsupportedError("quantization of ragged rows (head_budget='adakv') is not supported")
        qstore = QuantizedStore(self._quantization, self._rope)
        # where each kept key is rotated (original or re-rotated positions): pre-RoPE
        # quantization rotates them back from there
        qstore.append(self._store.keys(), self._store.values(), self._store.kept_positions())
        self._evicted = self._store.seen - self._store.stored
        if self._evicted_kv is not None:  # mixed precision: keep them at low_bits
            self._low = QuantizedStore(self._low_quantization)
            self._low.append(*self._evicted_kv)
            self._evicted -= self._low.seen
            self._evicted_kv = None
        self._store.reset()
        self._qstore = qstore

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token dequantized (the low-precision ones first, so NOT in position
        order with mixed precision; attention does not depend on the order)."""
        keys, values = self._qstore.dequantize()
        if self._low is not None:
            low_k, low_v = self._low.dequantize()
            keys, values = torch.cat([low_k, keys], dim=-2), torch.cat([low_v, values], dim=-2)
        return keys, values

    # `keys` / `values` are views of the Rust store (None for ragged rows, which no single
    # tensor holds: read them with `row`).
    def _stored_keys(self) -> torch.Tensor | None:
        if self._qstore is not None:  # a dequantized copy (inspection only)
            return self._dequantized()[0]
        return self._store.keys() if self._store.seen and not self._store.is_ragged else None

    def _stored_values(self) -> torch.Tensor | None:
        if self._qstore is not None:  # a dequantized copy (inspection only)
            return self._dequantized()[1]
        return self._store.values() if self._store.seen and not self._store.is_ragged else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._quantize_kept()  # without model hooks, the first forward after the prefill
        if self._qstore is not None:
            seen = self._seen
            stored_before = self._qstore.seen
            positions = torch.arange(seen, seen + key_states.shape[-2])
            self._qstore.append(key_states, value_states, positions)
            if self._decoding is not None:
                self._decoding.appended(stored_before, key_states.shape[-2])
            if attention.serves(self):
                self._attend_quantized = True  # `attend` reads the store
                return key_states, value_states
            keys, values = self._dequantized()
            if self._decoding is not None:  # no queries here; the copies above stay whole
                self._maybe_compress_quantized(key_states.shape[-2])
            return keys, values
        is_prefill = self._store.seen == 0
        stored_before = self._store.stored
        self._new_tokens = key_states.shape[-2]
        keys, values = self._store.append(key_states, value_states)
        if self._decoding is not None:
            self._decoding.appended(stored_before, key_states.shape[-2])
        served = attention.serves(self)
        if is_prefill and self._press is not None:
            # This forward's attention still sees every token (keys/values above); the
            # store keeps only what the press selects, right after that attention.
            if served:
                self._pending_compression = True
            else:  # no attention hook (a cache built from a config): compress now
                self._compress(None)
        if self._decoding is not None and not served:
            # no queries here; the returned keys/values keep the pre-compression storage
            self._decoding.maybe_compress(self._store, key_states.shape[-2])
        return keys, values

    def attend(
        self,
        attention: Any,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's attention (called by ``attention.kvpress_attention``): the model's
        own attention over what ``update`` returned — or, for ragged rows, head by head in
        Rust — then the prefill compression, which sees this layer's queries. Once
        quantized, the fused Rust kernel over the codes."""
        if self._attend_quantized:
            self._attend_quantized = False
            if self._low is not None:
                return self._attend_mixed(attention, module, query, attention_mask, kwargs)
            if attention_mask is not None and attention_mask.shape[-1] != self._qstore.seen:
                attention_mask = _fit_mask(attention_mask, self._qstore.seen, query.shape[-2])
            output = attend_store(self._qstore, attention, module, query, attention_mask, kwargs)
            if self._decoding is not None:
                # as below: evict after the attention that saw every token
                self._decoding.observe(query)
                self._maybe_compress_quantized(query.shape[-2])
            return output
        if self._store.is_ragged:
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            return self._store.attend_rows(query, float(scaling)), None
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = _fit_mask(attention_mask, key.shape[-2], query.shape[-2])
        output = attention(module, query, key, value, attention_mask, **kwargs)
        if self._decoding is not None:
            self._decoding.observe(query)
        if self._pending_compression:
            if self._press.needs_all_layers:
                # CAKE: score now (this layer's queries are here), evict once every layer's
                # preference is known, at the end of the forward.
                self._pending_compression = False
                self._scored = self._score(query)
            else:
                self._compress(query)
        if self._decoding is not None and self._scored is None:
            # After this forward's attention (which saw every token): back to the budget
            # if the schedule says so, scored with the queries since the last compression.
            self._decoding.maybe_compress(self._store, query.shape[-2])
        return output

    def _attend_mixed(
        self, attention: Any, module: torch.nn.Module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
    ) -> tuple[torch.Tensor, None]:
        """Attention over the kept (``bits``) and the low-precision (``low_bits``) stores
        with one softmax. The two stores do not follow position order, so the only mask
        they can honour is causality among the new tokens."""
        q_len = query.shape[-2]
        if mask is not None:
            visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
            if not bool(visible[..., : visible.shape[-1] - q_len].all()):
                raise UnsupportedError("low_bits (mixed precision) does not support padding masks (left-padded batches)")
        if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS) or (module.training and kwargs.get("dropout")):
            raise UnsupportedError("low_bits (mixed precision) supports plain attention only (no softcap, sliding window, sinks)")
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        return self._qstore.attend_union([self._low], query, None, float(scaling)), None

    def _maybe_compress_quantized(self, new_tokens: int) -> None:
        """Decoding-time compression of the quantized store: evicted tokens leave it with
        their codes; kept codes are never re-quantized."""
        before = self._qstore.seen
        if self._decoding.maybe_compress_quantized(self._qstore, new_tokens, self._seen):
            self._evicted += before - self._qstore.seen
            self._evicted_now = True

    def _score(self, query: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self._store.score(self._press, self.layer_idx, query)

    def _compress(self, query: torch.Tensor | None) -> None:
        self._pending_compression = False
        stored = self._store.stored
        self._evicted_kv = self._store.compress(
            self._press,
            self.layer_idx,
            query if self._press.query_window else None,
            keep_evicted=self._low_quantization is not None,
        )
        if self._decoding is not None and self._store.stored < stored:
            self._decoding.evicted_elsewhere(self._store.seen)

    def _forward_started(self) -> None:
        self._pending_compression = False
        self._scored = None
        self._attend_quantized = False
        self._evicted_now = False

    def _forward_finished(self) -> None:
        # A model whose attention does not go through transformers' attention interface
        # never called `attend`: compress here, after the whole forward, instead.
        if self._pending_compression:
            if self._press.query_window is not None:
                self._pending_compression = False
                raise UnsupportedModelError(
                    f"policy {self._press.policy!r} scores tokens with the model's queries, but layer "
                    f"{self.layer_idx}'s attention did not go through transformers' attention interface"
                )
            self._compress(None)

    def get_seq_length(self) -> int:
        return self._seen

    def get_mask_sizes(self, cache_position_or_query_length: torch.Tensor | int) -> tuple[int, int]:
        query_length = _compat.query_length(cache_position_or_query_length)
        stored, seen = self._stored, self._seen
        return stored + query_length, seen - stored

    @property
    def _active(self) -> LayerStore | QuantizedStore:
        return self._qstore if self._qstore is not None else self._store

    def reset(self) -> None:
        self._store.reset()
        if self._decoding is not None:
            self._decoding.reset()
        self._qstore, self._evicted, self._attend_quantized = None, 0, False
        self._low, self._evicted_kv = None, None
        self.is_initialized = False

    def crop(self, max_length_or_tokens_to_remove: int) -> None:
        self._active.crop(_compat.tokens_to_remove(max_length_or_tokens_to_remove, self._seen))
        if self._decoding is not None:
            self._decoding.cropped(self._stored)

    def _stores(self) -> list[LayerStore | QuantizedStore]:
        return [self._active] + ([self._low] if self._low is not None else [])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in self._stores():
            store.index_batch(beam_idx.to(torch.long).flatten())
        if self._decoding is not None:
            self._decoding.index_batch(beam_idx.to(torch.long).flatten())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = batch_indices(indices)
        for store in self._stores():
            store.index_batch(indices)
        if self._decoding is not None:
            self._decoding.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for store in self._stores():
            store.repeat_interleave_batch(repeats)
        if self._decoding is not None:
            self._decoding.repeat_interleave_batch(repeats)

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer: keys, values and kept positions — once quantized,
        codes, scales/zeros, outliers, sinks and the residual window (positions are not
        kept), plus the low-precision store with ``low_bits``."""
        return sum(store.nbytes for store in self._stores())

    def __repr__(self) -> str:
        return f"CompressedLayer(layer_idx={self.layer_idx}, {self._active!r})"


class KVCache(GuardedCache, Cache):
    """A transformers cache that compresses the prompt's KV cache once per layer, right
    after that layer's prefill attention, with a Rust policy.

    Parameters
    ----------
    model : transformers.PreTrainedModel or PretrainedConfig
        The model the cache serves (its config gives the layers; a model also lets the
        cache detect reuse for an unrelated prompt).
    policy : str
        A policy name: ``"knorm"``, ``"streaming_llm"``, ``"random"``, ``"snapkv"``,
        ``"tova"``, ``"observed_attention"``, ``"keydiff"``, ``"lagkv"`` (see
        ``kvpress_rs.policies.REGISTRY``).
    compression_ratio : float, optional
        Fraction of the prompt's tokens removed, in [0, 1) (kvpress's meaning): each layer
        keeps ``int(T * (1 - compression_ratio))`` tokens per KV head on average.
    max_tokens : int, optional
        A fixed per-layer token budget instead of a ratio.
    layer_budget : str
        ``"uniform"`` or ``"pyramid"`` (PyramidKV's linear decrease with depth, ``beta=20``).
    head_budget : str
        ``"uniform"`` or ``"adakv"`` (AdaKV: heads keep different counts, at least
        ``alpha_safeguard=0.2`` of the mean; the memory of evicted tokens is freed).
    rerotate : bool
        Re-rotate the kept keys to compact positions (one delta rotation per key, angles in
        float64) so that generation continues at position n_kept instead of the number of
        tokens seen. With per-layer or per-head budgets, every row is compacted to end
        right before the same next position (the longest row's length).
    quantization : kvpress_rs.QuantConfig, optional
        Quantize the kept tokens once, right after the compression (and re-rotation) of
        the prefill, and every later token append-only, as :class:`QuantizedKVCache`
        does. Not available with ``head_budget="adakv"`` (ragged rows); once quantized, a
        layer no longer keeps the original positions (``kept_positions`` raises). With
        ``decoding_budget``, tokens are evicted from the quantized store during generation
        too: the kept tokens keep their codes and scales/zeros (never re-quantized), the
        full-precision sinks and residual window are never evicted, and ``rerotate=True``
        needs ``pre_rope_keys=True``. Example:
        ``KVCache(model, "knorm", decoding_budget=1024, quantization=QuantConfig(bits=4))``.
    low_bits : int, optional
        Mixed precision (MiKV), with ``quantization``: the tokens the policy would evict are
        kept, quantized once at ``low_bits`` (2, 3, 4 or 8; the other options of
        ``quantization``, no residual window), instead of dropped; attention covers both
        precisions with one softmax. Not with ``rerotate`` nor with left-padded batches.
    decoding_budget : int, optional
        Compress during generation too: each layer keeps this many tokens per KV head,
        compressing back to it whenever it has grown ``decoding_interval`` past it (a
        multi-token forward — a prompt block, a chat turn — as soon as it exceeds it). The
        last ``decoding_interval`` tokens are never evicted (see :mod:`kvpress_rs.decoding`).
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
    **policy_kwargs
        Policy parameters: ``n_sink`` (StreamingLLM, default 4), ``seed`` (Random),
        ``window_size``/``kernel_size`` (SnapKV, 64/5), ``lag_size`` (LagKV), ...

    Example
    -------
    >>> import kvpress_rs  # doctest: +SKIP
    >>> cache = kvpress_rs.KVCache(model, policy="knorm", compression_ratio=0.5)  # doctest: +SKIP
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
    >>> cache.stats()["tokens_kept"][:3]  # doctest: +SKIP
    [512, 512, 512]
    """

    def __init__(
        self,
        model: Any,
        policy: str = "knorm",
        *,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        layer_budget: str = "uniform",
        head_budget: str = "uniform",
        rerotate: bool = False,
        quantization: QuantConfig | None = None,
        low_bits: int | None = None,
        decoding_budget: int | None = None,
        decoding_ratio: float | None = None,
        decoding_interval: int | None = None,
        protect_prompt: bool | None = None,
        query_stats: str | None = None,
        **policy_kwargs: Any,
    ):
        config = decoder_config(model)
        if quantization is not None:
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
        self.quantization = quantization
        self.low_quantization = None
        if low_bits is not None:
            if quantization is None:
                raise InvalidArgumentError("`low_bits` needs `quantization` (the precision of the kept tokens)")
            if rerotate:
                raise UnsupportedError("`low_bits` with rerotate=True is not supported: low-precision tokens keep their positions")
            q = quantization
            self.low_quantization = QuantConfig(
                bits=low_bits, group_size=q.group_size, residual_length=0, key_grouping=q.key_grouping,
                value_grouping=q.value_grouping, hadamard=q.hadamard, outlier_fraction=q.outlier_fraction,
            )
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
            n_layers=config.num_hidden_layers,
            rope=self.rope,
            **policy_kwargs,
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
        layers = []
        for idx, layer in enumerate(DynamicCache(config=config).layers):
            if type(layer) is not DynamicLayer:
                layers.append(layer)
                continue
            decoding = None
            if self.decoding is not None:
                stats = calibration[idx] if calibration is not None else None
                decoding = LayerDecoding(self.decoding, self.press, idx, self.rope, stats)
            layers.append(
                CompressedLayer(self.press, idx, quantization, self.low_quantization, rope=self.rope, decoding=decoding)
            )
        super().__init__(layers=layers)
        self._token_log = TokenLog()
        if isinstance(model, torch.nn.Module):
            install_model_hooks(model)

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

    def _forward_started(self) -> None:
        for _, layer in self._compressed_layers():
            layer._forward_started()

    def _forward_finished(self) -> None:
        for _, layer in self._compressed_layers():
            layer._forward_finished()
        scored = [layer for _, layer in self._compressed_layers() if layer._scored is not None]
        if scored:
            self._allocate(scored)
        if self.rerotate:
            self._rerotate()
            self._rerotate_quantized()
        for _, layer in self._compressed_layers():
            layer._quantize_kept()

    def _rerotate_quantized(self) -> None:
        """After a decoding-time eviction in quantized layers (pre-RoPE keys): every layer's
        tokens move to compact positions ending right before one shared next position —
        positions only, codes untouched."""
        layers = [layer for _, layer in self._compressed_layers() if layer._qstore is not None]
        if not any(layer._evicted_now for layer in layers):
            return
        next_position = max(layer._stored for layer in layers)
        for layer in layers:
            if layer._seen != next_position:
                layer._qstore.rerotate(next_position)
                layer._evicted = next_position - layer._stored
            layer._evicted_now = False

    def _rerotate(self) -> None:
        """Compacts the kept keys' positions (after a compression) so that every layer ends
        right before one shared next position."""
        layers = [layer for _, layer in self._compressed_layers() if layer._store.seen and layer._qstore is None]
        if not layers or not any(layer._store.has_evicted for layer in layers):
            return
        next_position = max(layer._store.stored for layer in layers)
        if all(layer._store.seen == next_position for layer in layers):
            return  # already compact (a later forward)
        for layer in layers:
            layer._store.rerotate(self.rope, next_position)

    def _allocate(self, scored: list[CompressedLayer]) -> None:
        """Splits the budget across the scored layers (CAKE) and evicts in each."""
        budgets = self.press.allocate([layer._store.stored for layer in scored], [layer._scored[1] for layer in scored])
        for layer, n_kept in zip(scored, budgets):
            scores, _ = layer._scored
            layer._scored = None
            stored = layer._store.stored
            layer._evicted_kv = layer._store.compress_scored(
                self.press, scores, n_kept, keep_evicted=layer._low_quantization is not None
            )
            if layer._decoding is not None:
                if layer._store.stored < stored:
                    layer._decoding.evicted_elsewhere(layer._store.seen)
                # the decoding schedule could not act before every layer's budget was known
                layer._decoding.maybe_compress(layer._store, layer._new_tokens)

    def _compressed_layers(self) -> list[tuple[int, CompressedLayer]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def kept_positions(self, layer_idx: int) -> torch.Tensor | list[torch.Tensor]:
        """Original positions of the tokens layer ``layer_idx`` keeps, ascending: an int64
        tensor (batch, kv_heads, n_kept) when every head keeps the same count; with a head
        budget (AdaKV), a list of per-head int64 tensors of shape (batch, n_h) — or, when
        batch rows of a head differ in count, a list over heads of lists over batch rows."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            raise CacheStateError(f"layer {layer_idx} is a {type(layer).__name__}, not a compressed layer")
        if layer._qstore is not None:
            raise CacheStateError(f"layer {layer_idx} is quantized: original positions are not kept after quantization")
        positions = layer._store.kept_positions()
        if isinstance(positions, torch.Tensor):
            return positions
        batch, heads = layer._store.batch_heads
        per_head = [[positions[b * heads + h] for b in range(batch)] for h in range(heads)]
        return [
            torch.stack(rows) if len({len(r) for r in rows}) == 1 else rows
            for rows in per_head
        ]


    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: keys, values and kept positions of every layer."""
        return layers_nbytes(self.layers)

    def stats(self) -> dict[str, Any]:
        """Tokens seen, tokens kept per layer and bytes held.

        Returns a dict with ``tokens_seen`` (int), ``tokens_kept`` (list, one entry per
        layer: tokens per KV head, the mean over heads when a head budget gives them
        different counts), ``tokens_kept_per_row`` (list per layer of the counts of every
        (batch, kv_head) row), ``nbytes`` (int) and ``nbytes_per_layer`` (list).
        """
        kept, rows, per_layer = [], [], []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                lengths = layer._store.lengths() if layer._qstore is None else [layer._stored] * _rows(layer._qstore)
                rows.append(lengths)
                mean = sum(lengths) / len(lengths) if lengths else 0
                kept.append(int(mean) if mean == int(mean) else mean)
                per_layer.append(layer.nbytes)
            else:
                keys = getattr(layer, "keys", None)
                n = int(keys.shape[-2]) if keys is not None and keys.numel() else 0
                kept.append(n)
                rows.append([n] * (keys.shape[0] * keys.shape[1]) if n else [])
                per_layer.append(keys.nbytes + layer.values.nbytes if n else 0)
        return {
            "tokens_seen": self.get_seq_length(),
            "tokens_kept": kept,
            "tokens_kept_per_row": rows,
            "nbytes": sum(per_layer),
            "nbytes_per_layer": per_layer,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(press={self.press!r}, layers={len(self.layers)})"


def _fit_mask(mask: torch.Tensor, kv_length: int, query_length: int) -> torch.Tensor:
    """The mask built for another layer's stored length, fitted to this layer's
    ``kv_length`` keys: every stored key is visible (all precede the queries), and the last
    ``query_length`` columns — the new tokens, causal among themselves — are kept."""
    stored = kv_length - query_length
    visible = True if mask.dtype == torch.bool else 0.0
    head = torch.full((*mask.shape[:-1], stored), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([head, mask[..., -query_length:]], dim=-1)


def _rows(store: QuantizedStore) -> int:
    batch, heads = store.batch_heads
    return batch * heads


def _has_rope(config: Any) -> bool:
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))
