"""Rotary position embeddings for KV caches: apply, invert and shift RoPE on cached keys.

All the math (frequencies of every rope type, angles in float64 reduced modulo 2π, the
rotation kernels) is Rust; this module only reads a transformers config into plain
parameters (both the ``rope_parameters`` dict of transformers 5.x and the older
``rope_scaling`` + ``rope_theta`` spelling).

What a cache does with it:

- re-rotation after eviction: kept key i, cached at position p_i, moves to compact
  position i with one rotation, ``rope.shift(kept_keys, i - p_i)`` (per head);
- scoring in pre-RoPE space: ``rope.invert(keys, positions)``, and back with ``apply``;
- reusing a precomputed chunk at a new offset: ``rope.shift(chunk_keys, new_start - old_start)``;
- re-applying RoPE to keys dequantized in pre-RoPE space: ``rope.apply(keys, positions)``.

Example
-------
>>> import torch, kvpress_rs
>>> from transformers import LlamaConfig
>>> rope = kvpress_rs.rope.Rope.from_config(LlamaConfig(hidden_size=64, num_attention_heads=4))
>>> pre = torch.randn(1, 2, 10, 16)                  # (batch, kv_heads, tokens, head_dim)
>>> cached = rope.apply(pre, torch.arange(10))        # as the model caches them
>>> kept = torch.tensor([0, 3, 7])                    # positions kept by a press
>>> compact = rope.shift(cached[:, :, kept], torch.arange(3) - kept)
>>> torch.allclose(compact, rope.apply(pre[:, :, kept], torch.arange(3)), atol=1e-5)
True
"""

from __future__ import annotations

from typing import Any

import torch

from ._native import BaseBounds
from ._native import Rope as _NativeRope
from ._native import base_bounds as _base_bounds
from .errors import UnsupportedModelError
from .models import decoder_config

# Model types whose attention pairs channels (2i, 2i+1) (GPT-J's `rotate_every_two`) instead
# of (i, i + rotary_dim/2); read from their transformers modeling code.
INTERLEAVED_MODEL_TYPES = frozenset({"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "helium"})

# The keyword parameters of a rope type that the native constructor takes.
_TYPE_PARAMETERS = (
    "factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "low_freq_factor",
    "high_freq_factor",
    "short_factor",
    "long_factor",
)


class Rope(_NativeRope):
    """Rotary position embedding of one model, with the operations a KV cache needs.

    Tensors are (batch, heads, tokens, head_dim), float32/float16/bfloat16, on any device
    (CPU tensors run a fused Rust kernel that reads strided input without copying; other
    devices use libtorch ops). Positions and deltas are integer tensors of shape (),
    (tokens,), (batch, tokens) or (batch, heads, tokens). Angles are computed in float64
    and reduced modulo 2π; the rotation runs in float64 (float32 tensors) or float32
    (float16/bfloat16) and is cast to the tensor's dtype once.

    - ``apply(x, positions)``: s·R(p)·x (s: yarn/longrope attention scaling, else 1);
    - ``invert(x, positions)``: R(−p)·x / s, the exact inverse;
    - ``shift(x, delta)``: R(δ)·x, moves rotated keys by δ positions (no second s);
    - ``cos_sin(positions)``, ``inv_freq(seq_len)``: what transformers' rotary embedding computes;
    - ``base_bounds(context_length, depth, dtype)``: the feasible region of the base.

    ``seq_len`` (all methods) is the length of the sequence being processed; it changes
    the frequencies of "dynamic" and "longrope" only. None means the configured frequencies
    (transformers' values at initialisation); pass ``max(position_ids) + 1`` to match a
    forward pass beyond the original context.

    Build it with :meth:`from_config`, or with keyword parameters
    (``Rope(head_dim, rope_type=..., theta=..., ...)``).

    Example
    -------
    >>> import torch
    >>> from transformers import LlamaConfig
    >>> rope = Rope.from_config(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e5))
    >>> rope
    Rope(rope_type="default", head_dim=16, rotary_dim=16, theta=100000, interleaved=False, attention_scaling=1)
    >>> k = rope.apply(torch.randn(1, 2, 5, 16), torch.arange(5))
    >>> torch.allclose(rope.shift(k, 3), rope.apply(rope.invert(k, torch.arange(5)), torch.arange(3, 8)), atol=1e-5)
    True
    """

    @classmethod
    def from_config(cls, config: Any, *, layer_type: str | None = None, interleaved: bool | None = None) -> Rope:
        """The RoPE of a transformers model or config.

        Parameters
        ----------
        config : transformers.PretrainedConfig or PreTrainedModel
            Its text-decoder config is read: ``rope_parameters`` (transformers 5.x) or
            ``rope_scaling`` + ``rope_theta`` (older spelling), ``head_dim`` (else
            hidden_size // num_attention_heads), ``partial_rotary_factor`` / ``rotary_dim``,
            ``max_position_embeddings``, ``original_max_position_embeddings``.
        layer_type : str, optional
            For configs with per-layer-type RoPE (``{"full_attention": {...},
            "sliding_attention": {...}}``): which one. Default "full_attention".
        interleaved : bool, optional
            Channel pairing; default: interleaved for the model types in
            ``INTERLEAVED_MODEL_TYPES`` (GPT-J style), rotate-half otherwise.

        Raises
        ------
        UnsupportedModelError
            The config has no rotary position embedding.
        InvalidArgumentError
            Unknown rope type, missing or invalid parameter.
        """
        return cls(**rope_parameters(config, layer_type=layer_type, interleaved=interleaved))


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _type_parameters(config: Any, layer_type: str | None) -> dict[str, Any]:
    """The rope-type parameter dict, from either spelling."""
    parameters = _get(config, "rope_parameters")
    if isinstance(parameters, dict) and parameters:
        nested = [k for k, v in parameters.items() if isinstance(v, dict)]
        if nested:
            key = layer_type or ("full_attention" if "full_attention" in nested else None)
            if key not in nested:
                raise UnsupportedModelError(
                    f"this config has per-layer-type RoPE parameters {sorted(nested)}; pass layer_type=one of them"
                )
            parameters = parameters[key]
        return dict(parameters)
    scaling = _get(config, "rope_scaling")
    return dict(scaling) if isinstance(scaling, dict) else {}


def rope_parameters(config: Any, *, layer_type: str | None = None, interleaved: bool | None = None) -> dict[str, Any]:
    """The keyword arguments of :class:`Rope` read from a transformers config (or model,
    or a plain dict with config attribute names). No math happens here.

    >>> from transformers import LlamaConfig
    >>> p = rope_parameters(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    >>> p["rope_type"], p["head_dim"], p["factor"]
    ('linear', 16, 2.0)
    """
    if not isinstance(config, dict):
        config = decoder_config(config)
    params = _type_parameters(config, layer_type)
    theta = params.get("rope_theta") or _get(config, "rope_theta")
    rotary_dim = _get(config, "rotary_dim")
    partial = params.get("partial_rotary_factor") or _get(config, "partial_rotary_factor") or _get(config, "rotary_pct")
    if not params and theta is None and rotary_dim is None and partial is None:
        raise UnsupportedModelError(
            f"{type(config).__name__} describes no rotary position embedding (no rope_parameters, rope_scaling, "
            "rope_theta or rotary_dim)"
        )
    if theta is None:
        theta = _get(config, "default_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"

    head_dim = _get(config, "head_dim")
    if not head_dim:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if not hidden or not heads:
            raise UnsupportedModelError("the config gives neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads

    if interleaved is None:
        interleaved = _get(config, "model_type") in INTERLEAVED_MODEL_TYPES

    max_positions = _get(config, "max_position_embeddings")
    original = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope"):
        # As transformers: a top-level `original_max_position_embeddings` (Phi-3) wins, else
        # the one in the rope parameters, else max_position_embeddings.
        original = _get(config, "original_max_position_embeddings") or original or max_positions

    kwargs: dict[str, Any] = dict(
        head_dim=int(head_dim),
        rope_type=str(rope_type),
        theta=float(theta),
        partial_rotary_factor=float(partial) if partial is not None else 1.0,
        interleaved=bool(interleaved),
        max_position_embeddings=int(max_positions) if max_positions is not None else None,
        original_max_position_embeddings=int(original) if original is not None else None,
    )
    if isinstance(rotary_dim, int) and partial is None:
        kwargs["rotary_dim"] = rotary_dim
    for name in _TYPE_PARAMETERS:
        value = params.get(name)
        if value is not None:
            kwargs[name] = [float(v) for v in value] if name.endswith("_factor") and isinstance(value, list) else value
    return kwargs


def base_bounds(
    head_dim: int,
    context_length: int,
    depth: int,
    dtype: torch.dtype | str = torch.float32,
    base: float | None = None,
) -> BaseBounds:
    """The feasible region of the RoPE base for a context length, a depth (layers) and the
    dtype phases are computed in, after "Rotary Positional Embeddings as Phase Modulation:
    Theoretical Bounds on the RoPE Base for Long-Context Transformers". The formulas are
    our derivation of the three bounds that paper names.

    With d the rotary dimension, b the base, L the context length, N the depth,
    κ = (d − 2)/d, the slowest channel turns by θ_min = b^(−κ) per token and sweeps
    Φ = L·θ_min over the context; its DC component over the context (|mean of
    e^(iθ_min·p)|, p in [0, L]) is D(Φ) = |sin(Φ/2)/(Φ/2)|.

    - Aliasing (Nyquist-like) lower bound: the slowest channel must not complete a turn
      within the context, Φ < 2π (the first null of D): ``b > (L / 2π)^(1/κ)``.
    - Stability (DC component) lower bound, tightening with depth: the slow channels carry
      position-independent content, and their coherence D(Φ) compounds over the N layers;
      require D(Φ)^N ≥ 2/π (what one layer keeps at a half turn, D(π) = 2/π), i.e.
      Φ ≤ Φ_N with Φ_1 = π and Φ_N ≈ √(24·ln(π/2)/N) for large N: ``b ≥ (L / Φ_N)^(1/κ)``.
    - Precision upper bound: one token turns a unit phasor of the slowest channel by ≈
      θ_min; a dtype with p significand bits resolves relative changes down to u = 2^(−p)
      (float32 2^−24, float16 2^−11, bfloat16 2^−8); below it the increment rounds away:
      ``θ_min ≥ u``, ``b ≤ u^(−1/κ)``.

    For float32 phases the published bases (Llama-2 1e4 at 4K, Llama-3 5e5 at 8K, Mistral and
    Qwen2 1e6 at 32K, SmolLM2 1e5 at 8K) lie inside; for bfloat16 phases the region is
    empty (the precision bound ≈ 280 for d = 128 falls below the lower bounds), which is why
    angles must never be computed in bfloat16.

    Parameters
    ----------
    head_dim : int
        The rotary dimension (rotary_dim for partial rotary); even, >= 4.
    context_length : int
        Target context length L in tokens.
    depth : int
        Number of layers N.
    dtype : torch.dtype or str
        The type phases are computed in.
    base : float, optional
        A base to check: ``feasible`` says whether it lies in the region.

    Returns
    -------
    BaseBounds with ``aliasing``, ``stability``, ``precision``, ``lower``, ``upper``,
    ``max_phase`` (Φ_N), ``empty``, ``base``, ``feasible`` and ``contains(base)``.

    Example
    -------
    >>> b = base_bounds(128, 4096, 32, torch.float32, base=1e4)    # Llama-2 7B
    >>> round(b.aliasing), round(b.stability), b.feasible
    (723, 8113, True)
    >>> base_bounds(128, 131072, 32, base=10.0).feasible
    False
    """
    return _base_bounds(head_dim, context_length, depth, dtype, base)


__all__ = ["Rope", "BaseBounds", "base_bounds", "rope_parameters", "INTERLEAVED_MODEL_TYPES"]
