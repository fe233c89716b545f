"""Exceptions raised by kvpress_rs.

Every error of the library derives from :class:`KVPressError`; each also derives from the
built-in exception Python users would expect (``ValueError`` for bad values and shapes,
``TypeError`` for bad dtypes, ``RuntimeError`` for misuse of a cache), so existing
``except ValueError`` code keeps working.

Example
-------
>>> import kvpress_rs
>>> try:
...     kvpress_rs.ops.n_kept(100, compression_ratio=1.5)
... except kvpress_rs.InvalidArgumentError as e:
...     print(e)
invalid `compression_ratio`: got 1.5, expected a number in [0, 1) (the fraction of tokens removed)
"""


class KVPressError(Exception):
    """Base class of every kvpress_rs error."""


class InvalidArgumentError(KVPressError, ValueError):
    """An argument has an invalid value (ratio out of range, unknown policy, ...)."""


class ShapeError(KVPressError, ValueError):
    """A tensor has the wrong rank or size."""


class DtypeError(KVPressError, TypeError):
    """A tensor has an unsupported dtype or one that differs from the cache's."""


class DeviceError(KVPressError, ValueError):
    """A tensor is on a different device than the cache."""


class NonFiniteError(KVPressError, ValueError):
    """Keys or values contain NaN or infinite values."""


class EmptySequenceError(KVPressError, ValueError):
    """A sequence of zero tokens where at least one is required."""


class UnsupportedModelError(KVPressError, ValueError):
    """The model cannot be used with this cache (no rotary position embedding, ...)."""


class CacheStateError(KVPressError, RuntimeError):
    """The cache is used in a way its state does not allow (reuse without ``reset()``)."""


class ChunkStoreError(KVPressError, RuntimeError):
    """A stored chunk entry cannot be used (base class of the two below)."""


class CorruptChunkError(ChunkStoreError):
    """A stored chunk entry is truncated, unreadable, or fails its checksum."""


class ChunkMismatchError(ChunkStoreError):
    """A stored chunk entry was written for something else: another model, tokenizer,
    RoPE, compression or token ids than the ones asked for."""


class UnsupportedError(KVPressError, NotImplementedError):
    """An option that kvpress_rs recognises but does not implement (yet)."""


class TorchError(KVPressError, RuntimeError):
    """libtorch reported an error inside the Rust core."""


class RegistryUnavailableError(KVPressError, FileNotFoundError):
    """An input from a package registry (the default model, the essays, Austen's novels) is
    neither installed nor cached, and the registry could not be reached."""


class InternalError(KVPressError, RuntimeError):
    """A bug in kvpress_rs; please report it."""


__all__ = [
    "KVPressError",
    "InvalidArgumentError",
    "ShapeError",
    "DtypeError",
    "DeviceError",
    "NonFiniteError",
    "EmptySequenceError",
    "UnsupportedModelError",
    "CacheStateError",
    "ChunkStoreError",
    "CorruptChunkError",
    "ChunkMismatchError",
    "UnsupportedError",
    "TorchError",
    "RegistryUnavailableError",
    "InternalError",
]
