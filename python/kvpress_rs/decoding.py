"""Decoding-time compression: a :class:`~kvpress_rs.KVCache` built with ``decoding_budget=N``
(or ``decoding_ratio=r``) keeps compressing while it grows.

The schedule — when, and to how many tokens — is the Rust ``DecodingSchedule``; the
state between compressions (the layer's post-RoPE queries since the previous one,
TriAttention's query statistics, the protected prompt, a remembering scorer's previous
scores) is each Rust ``LayerState``'s (``src/layer/decoding.rs``), and the scoring,
protection and eviction are one ``Press.compress`` with a decoding plan. What is left here
is reading TriAttention's calibration files.

No scoring happens per step: a decoding step only appends its query (for the policies that
read queries) and asks the schedule one integer question per batch row.

Example
-------
>>> cache = kvpress_rs.SnapKVCache(model, decoding_budget=1024, decoding_interval=128)  # doctest: +SKIP
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4096)  # doctest: +SKIP
>>> max(cache.stats()["tokens_kept"]) <= 1024 + 128  # doctest: +SKIP
True
"""

from __future__ import annotations

from ._native import QueryStats


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
