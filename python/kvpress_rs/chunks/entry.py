"""What a stored chunk is: its identity (the key) and its bytes (the entry).

Identity. An entry is valid only for the exact inputs that produced it, so its key is the
SHA-256 of a canonical JSON document of:

- ``model``: the model class, its decoder config (private and version fields dropped), the
  dtype, and a fingerprint of its weights (name, shape, dtype and a strided sample of every
  parameter — cheap, and any retrained or other checkpoint differs);
- ``tokenizer``: a hash of its full definition (a fast tokenizer's JSON, else its vocab and
  special tokens), or ``None`` when the store works on token ids only;
- ``rope``: the RoPE parameters read from the config (``kvpress_rs.rope.rope_parameters``);
- ``compression``: the eviction policy and its parameters, and ``quantization``: ``None``,
  or the quantization config and the version of the parts layout (``{"config": {...},
  "parts": 1}``), so a quantized entry never answers for an unquantized chunk or the
  reverse;
- ``tokens``: the token ids themselves (their SHA-256, and their count).

Entry. One safetensors file (or Redis value): tensors ``ids`` (int64), ``k.<l>``, ``v.<l>``
and, when a press evicted tokens, ``p.<l>`` (int32 chunk-local kept positions) per layer;
the safetensors header's ``__metadata__`` holds the identity JSON (``kvpress_rs``) and a
SHA-256 over every tensor's name, dtype, shape and bytes (``sha256``). A quantized entry
holds, instead of ``k``/``v``/``p``, each layer's quantized store parts as
``q.<l>.<name>`` (``QuantizedStore.parts()``: codes, scales/zeros, outliers and positions
of every block, and the full-precision remainder with its positions). Reading checks, in
order: the container parses (else :class:`CorruptChunkError`), the checksum matches (else
:class:`CorruptChunkError`), the identity equals the one asked for, field by field, and the
ids are the ids asked for (else :class:`ChunkMismatchError`, naming the field).

Example
-------
>>> import torch
>>> from kvpress_rs.chunks.entry import EncodedChunk, from_bytes, to_bytes, token_identity
>>> ids = torch.tensor([5, 6])
>>> ident = {"format": 1, "tokens": token_identity(ids)}
>>> chunk = EncodedChunk(ids, [(torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, 4), None)])
>>> data = to_bytes(chunk, ident)
>>> from_bytes(data, ident).layers[0][1].sum().item()
8.0
>>> from_bytes(data[:-3], ident)
Traceback (most recent call last):
    ...
kvpress_rs.errors.CorruptChunkError: chunk entry is unreadable: ...
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ChunkMismatchError, CorruptChunkError
from ..rope import rope_parameters

FORMAT_VERSION = 1


@dataclass
class EncodedChunk:
    """The KV of one chunk encoded alone at positions 0..n.

    ``ids``: int64 (n,) token ids. ``layers[l]``: (keys, values, positions) with keys and
    values (1, kv_heads, stored, head_dim) and positions int32 (1, kv_heads, stored)
    chunk-local kept positions, or None when every token is stored.
    """

    ids: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    key: str = ""
    #: Quantized chunks: per layer, the parts of its ``QuantizedStore`` by name (then
    #: ``layers`` is empty).
    quantized: list[dict[str, torch.Tensor]] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values and kept positions over all layers (of every quantized
        part for quantized chunks)."""
        if self.quantized is not None:
            return sum(t.nbytes for parts in self.quantized for t in parts.values())
        return sum(k.nbytes + v.nbytes + (p.nbytes if p is not None else 0) for k, v, p in self.layers)


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal identities give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def model_identity(model: Any) -> dict[str, Any]:
    """Model class, decoder config, dtype and a weight fingerprint (see the module doc)."""
    from ..models import decoder_config

    config = decoder_config(model).to_dict()
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    weights = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            # A strided sample of ~256 values per tensor: reading every weight would cost
            # seconds on large models, and any other checkpoint differs in the sample.
            step = max(flat.numel() // 256, 1)
            sample = flat[::step].to("cpu", torch.float64).numpy().tobytes()
            weights.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
            weights.update(sample)
    dtype = next(model.parameters()).dtype
    return {
        "class": type(model).__name__,
        "config": sha256(canonical(config)),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights.hexdigest(),
    }


def tokenizer_identity(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's full definition, or None without a tokenizer."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = backend.to_str()
    else:
        definition = canonical(sorted(tokenizer.get_vocab().items()))
    special = canonical(getattr(tokenizer, "special_tokens_map", {}))
    return sha256(f"{type(tokenizer).__name__}\n{special}\n{definition}")


def rope_identity(model: Any) -> dict[str, Any]:
    return rope_parameters(model)


def token_identity(ids: torch.Tensor) -> dict[str, Any]:
    ids = ids.to("cpu", torch.int64).contiguous()
    return {"n": int(ids.numel()), "sha256": sha256(ids.numpy().tobytes())}


def identity(
    model_ident: dict[str, Any],
    tokenizer_ident: str | None,
    rope_ident: dict[str, Any],
    compression: dict[str, Any],
    ids: torch.Tensor,
) -> dict[str, Any]:
    """The identity document of one chunk (everything its KV depends on)."""
    return {
        "format": FORMAT_VERSION,
        "model": model_ident,
        "tokenizer": tokenizer_ident,
        "rope": rope_ident,
        "compression": compression,
        "tokens": token_identity(ids),
    }


def key_of(ident: dict[str, Any]) -> str:
    """The entry key: SHA-256 of the canonical identity."""
    return sha256(canonical(ident))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def to_bytes(chunk: EncodedChunk, ident: dict[str, Any]) -> bytes:
    """The entry of ``chunk`` (see the module doc)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {"ids": chunk.ids.to("cpu", torch.int64).contiguous()}
    for i, parts in enumerate(chunk.quantized or []):
        for name, t in parts.items():
            tensors[f"q.{i}.{name}"] = t.detach().to("cpu").contiguous()
    for i, (k, v, p) in enumerate(chunk.layers):
        tensors[f"k.{i}"] = k.detach().to("cpu").contiguous()
        tensors[f"v.{i}"] = v.detach().to("cpu").contiguous()
        if p is not None:
            tensors[f"p.{i}"] = p.to("cpu", torch.int32).contiguous()
    n_layers = len(chunk.quantized) if chunk.quantized is not None else len(chunk.layers)
    meta = {"kvpress_rs": canonical({**ident, "n_layers": n_layers}), "sha256": _checksum(tensors)}
    return save(tensors, metadata=meta)


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptChunkError(f"chunk entry is truncated: {len(data)} bytes, not even a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CorruptChunkError(f"chunk entry is truncated: header of {n} bytes but {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
        return header.get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise CorruptChunkError(f"chunk entry header is unreadable: {e}") from None


def from_bytes(data: bytes, expected: dict[str, Any], device: torch.device | str = "cpu") -> EncodedChunk:
    """Reads an entry, verifying it (see the module doc) against the identity
    ``expected``; returns the chunk with tensors on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = _header(data)
    if "kvpress_rs" not in meta or "sha256" not in meta:
        raise CorruptChunkError("chunk entry has no kvpress_rs metadata or checksum")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptChunkError(f"chunk entry is unreadable: {e}") from None
    if _checksum(tensors) != meta["sha256"]:
        raise CorruptChunkError("chunk entry fails its checksum (corrupt or partly written)")
    try:
        stored = json.loads(meta["kvpress_rs"])
    except ValueError:
        raise CorruptChunkError("chunk entry metadata is not JSON") from None
    n_layers = stored.pop("n_layers", None)
    # The specific causes first: another model usually differs in rope settings too.
    for field in ("format", "tokens", "rope", "tokenizer", "compression", "model"):
        if canonical(stored.get(field)) != canonical(expected.get(field)):
            what = {"model": "another model (class, config, dtype or weights)", "tokenizer": "another tokenizer",
                    "rope": "other RoPE settings", "compression": "other compression settings",
                    "tokens": "other token ids", "format": "another entry format version"}[field]
            raise ChunkMismatchError(
                f"chunk entry was written for {what}: stored {field}={canonical(stored.get(field))[:200]}, "
                f"expected {canonical(expected.get(field))[:200]}"
            )
    ids = tensors.get("ids")
    if ids is None or token_identity(ids) != expected["tokens"]:
        raise ChunkMismatchError("chunk entry holds other token ids than its metadata says")
    if not isinstance(n_layers, int):
        raise CorruptChunkError("chunk entry metadata lacks its layer count")
    if (expected.get("compression") or {}).get("quantization") is not None:
        quantized: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
        for name, t in tensors.items():
            if name == "ids":
                continue
            tag, _, rest = name.partition(".")
            layer, _, part = rest.partition(".")
            if tag != "q" or not layer.isdigit() or int(layer) >= n_layers or not part:
                raise CorruptChunkError(f"quantized chunk entry holds an unexpected tensor {name!r}")
            quantized[int(layer)][part] = t.to(device)
        if any(not parts for parts in quantized):
            raise CorruptChunkError("quantized chunk entry lacks the parts of some layer")
        return EncodedChunk(ids, [], quantized=quantized)
    if any(f"{x}.{i}" not in tensors for i in range(n_layers) for x in "kv"):
        raise CorruptChunkError("chunk entry lacks the keys or values of some layer")
    layers = []
    for i in range(n_layers):
        k, v, p = tensors[f"k.{i}"], tensors[f"v.{i}"], tensors.get(f"p.{i}")
        layers.append((k.to(device), v.to(device), p))
    return EncodedChunk(ids, layers)
