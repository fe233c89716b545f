"""Coming from kvpress: :func:`from_press` turns a kvpress press object into the
kvpress-rs cache that does the same, with the same parameters.

kvpress itself is not imported: a press is read by its class name and dataclass fields,
so any object built by kvpress 0.5.x works and kvpress is needed only to build it. Scorer
presses map to the named caches whose ``kvpress`` twin they are (the registry, see
``kvpress_rs.policies``); wrappers map to stages and cache options:

==============================  ==========================================================
kvpress                         kvpress-rs
==============================  ==========================================================
``AdaKVPress(p, a)``            ``head_budget="adakv", alpha_safeguard=a``
``ChunkKVPress(p, n)``          ``selector="chunks", chunk_length=n``
``EntropyGatedChunkKVPress``    ``selector="entropy_chunks"``
``KeyRerotationPress(p)``       ``rerotate=True``
``PerLayerCompressionPress``    ``layer_budget="explicit", layer_ratios=[...]``
``DecodingPress(p, i, s)``      ``decoding_budget=s, decoding_interval=i``
``CompressionRatioDecoding…``   ``decoding_ratio=1 - target_compression_ratio``
``PrefillDecodingPress(a, b)``  ``a``'s prompt compression and ``b``'s decoding budget
``ComposedPress([p])``          ``p``
==============================  ==========================================================

Decoding presses keep their schedule with one difference: kvpress compresses first after
``compression_interval`` decoding steps, kvpress-rs as soon as the cache exceeds the budget
by the interval (a long prompt at the prefill). A press with no equivalent raises :class:`~kvpress_rs.UnsupportedError` naming it and why.

Example
-------
>>> from kvpress import ChunkKVPress, KeyRerotationPress, SnapKVPress  # doctest: +SKIP
>>> press = KeyRerotationPress(ChunkKVPress(SnapKVPress(0.5)))  # doctest: +SKIP
>>> cache = kvpress_rs.from_press(press, model)  # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=20)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import _native
from .cache import KVCache
from .errors import UnsupportedError

__all__ = ["from_press", "cache_arguments"]

# Scorer presses with no named cache of ours: press class -> registry scorer.
SCORERS = {"LeverageScorePress": "leverage"}
# Press fields with no counterpart here, dropped, and why that is faithful.
DROPPED = {
    ("LeverageScorePress", "sketch_dimension"): "the leverage scorer uses the exact d x d Gram matrix, no sketch",
    ("RandomPress", "seed"): "seed None draws a fresh seed in kvpress; the cache's default seed is used",
    ("DecodingPress", "hidden_states_buffer_size"): "decoding scorers read the queries since the last compression",
    ("CompressionRatioDecodingPress", "hidden_states_buffer_size"): "as for DecodingPress",
}
# Presses that need artefacts downloaded from a model hub (see the README's limits).
NEEDS_DOWNLOADS = {
    "QFilterPress": "trained Q-filters from the Hugging Face hub",
    "KVzapPress": "a trained scoring model from the Hugging Face hub",
    "FastKVzipPress": "trained gates from the Hugging Face hub",
    "RestoreKVPress": "trained weights from the Hugging Face hub",
    "ExpectedAttentionStatsPress": "query statistics from the Hugging Face hub (use query_stats= with "
                                   "python -m kvpress_rs.calibrate instead)",
}
# The wrapper field that holds the wrapped press.
INNER = {
    "AdaKVPress": "press",
    "ChunkKVPress": "press",
    "EntropyGatedChunkKVPress": "press",
    "KeyRerotationPress": "press",
    "PerLayerCompressionPress": "press",
    "DecodingPress": "base_press",
    "CompressionRatioDecodingPress": "base_press",
}


def from_press(press: Any, model: Any, **options: Any) -> KVCache:
    """The kvpress-rs cache equivalent to the kvpress ``press`` for ``model``; ``options``
    (any :class:`~kvpress_rs.KVCache` argument, e.g. ``quantization``) are added on top.

    >>> cache = kvpress_rs.from_press(kvpress.SnapKVPress(0.5), model)  # doctest: +SKIP
    """
    arguments = {**cache_arguments(press), **options}
    policy = arguments.pop("policy")
    return KVCache(model, policy, **arguments)


def cache_arguments(press: Any) -> dict[str, Any]:
    """The :class:`~kvpress_rs.KVCache` arguments (``policy`` included) equivalent to ``press``."""
    name = type(press).__name__
    fields = _fields(press)
    if name in NEEDS_DOWNLOADS:
        raise UnsupportedError(f"{name} needs {NEEDS_DOWNLOADS[name]}, which kvpress_rs does not download")
    if name == "ComposedPress":
        presses = list(fields["presses"])
        if len(presses) != 1:
            raise UnsupportedError(f"ComposedPress of {len(presses)} presses: presses in sequence are not supported "
                                   "yet (one press, possibly wrapped, is)")
        return cache_arguments(presses[0])
    if name == "PrefillDecodingPress":
        return _prefill_decoding(fields)
    if name in INNER:
        return _wrapped(name, fields, cache_arguments(fields.pop(INNER[name])))
    return _scorer(name, fields)


def _fields(press: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(press) or isinstance(press, type):
        raise UnsupportedError(f"press: expected a kvpress press object (a dataclass instance), got {press!r}")
    return {f.name: getattr(press, f.name) for f in dataclasses.fields(press) if f.init and not f.name.startswith("_")}


def _presets() -> dict[str, dict]:
    return {p["kvpress"]: p for p in _native.presets() if p["kvpress"] and p["scorer"]}


def _stage_params(kind: str, name: str) -> set[str]:
    return {p["name"] for s in _native.registry() if s["kind"] == kind and s["name"] == name for p in s["params"]}


def _scorer(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    preset = _presets().get(name)
    scorer = preset["scorer"] if preset else SCORERS.get(name)
    if scorer is None:
        known = sorted([*_presets(), *SCORERS, *INNER, "ComposedPress", "PrefillDecodingPress"])
        raise UnsupportedError(f"{name} has no kvpress_rs equivalent yet; supported presses: {known}")
    arguments: dict[str, Any] = {"policy": scorer}
    accepted = _stage_params("scorer", scorer)
    for kind in ("layer_budget", "head_budget", "selector"):
        if preset and preset[kind]:
            arguments[kind] = preset[kind]
            accepted |= _stage_params(kind, preset[kind])
    for field, value in fields.items():
        if field == "compression_ratio":
            arguments["compression_ratio"] = float(value)
        elif field in accepted and value is not None:
            arguments[field] = value
        elif (name, field) not in DROPPED and value is not None:
            raise UnsupportedError(f"{name}.{field}={value!r} has no kvpress_rs counterpart")
    return arguments


def _wrapped(name: str, fields: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    out = dict(inner)

    def set_once(key: str, value: Any) -> None:
        if key in out and out[key] != value:
            raise UnsupportedError(f"{name} sets {key}={value!r}, but the wrapped press already has {out[key]!r}")
        out[key] = value

    if name == "AdaKVPress":
        set_once("head_budget", "adakv")
        out["alpha_safeguard"] = float(fields["alpha_safeguard"])
    elif name == "ChunkKVPress":
        set_once("selector", "chunks")
        out["chunk_length"] = int(fields["chunk_length"])
    elif name == "EntropyGatedChunkKVPress":
        set_once("selector", "entropy_chunks")
        out["entropy_chunk_length"] = int(fields["chunk_length"])
        out["low_entropy_chunk_length"] = int(fields["low_entropy_chunk_length"])
    elif name == "KeyRerotationPress":
        out["rerotate"] = True
    elif name == "PerLayerCompressionPress":
        set_once("layer_budget", "explicit")
        out.pop("compression_ratio", None)
        out["layer_ratios"] = [float(r) for r in fields["compression_ratios"]]
    else:  # DecodingPress, CompressionRatioDecodingPress: the prompt is left alone
        out.pop("compression_ratio", None)
        out["decoding_interval"] = int(fields["compression_interval"])
        if name == "DecodingPress":
            out["decoding_budget"] = int(fields["target_size"])
        else:
            out["decoding_ratio"] = 1.0 - float(fields["target_compression_ratio"])
    return out


def _prefill_decoding(fields: dict[str, Any]) -> dict[str, Any]:
    prefill, decoding = fields.get("prefilling_press"), fields.get("decoding_press")
    if prefill is None and decoding is None:
        raise UnsupportedError("PrefillDecodingPress with neither a prefilling nor a decoding press compresses nothing")
    if decoding is None:
        return cache_arguments(prefill)
    during = cache_arguments(decoding)
    if prefill is None:
        return during
    before = cache_arguments(prefill)
    decoding_keys = ("decoding_budget", "decoding_ratio", "decoding_interval")
    differ = {k for k in set(before) | set(during) if k not in decoding_keys and k != "compression_ratio"
              and before.get(k) != during.get(k)}
    if differ:
        raise UnsupportedError(f"PrefillDecodingPress: the prefilling and decoding presses differ in {sorted(differ)}; "
                               "one cache has one press pipeline")
    return {**before, **{k: during[k] for k in decoding_keys if k in during}}
