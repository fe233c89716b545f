"""Where chunk entries live: bytes under a key. A backend only stores and returns bytes;
verifying them is the entry's job (``entry.py``), so a backend cannot hand out a corrupt
entry as valid.

- :class:`LocalDirBackend` (the default): one file per entry,
  ``<root>/<key[:2]>/<key>.safetensors``. A write goes to a temporary file in the same
  folder, is flushed and fsync'ed, then renamed over the final name (``os.replace``,
  atomic on POSIX), and the folder is fsync'ed. A reader therefore sees either no file or
  a complete one, never a partial write; a writer killed midway leaves only a temporary
  file, which readers never open (``clean_temporary`` removes old ones). Concurrent
  writers of one key each rename a complete file; the last one wins.
- :class:`RedisBackend`: one Redis string per entry (``SET`` is atomic: a client that
  dies mid-command writes nothing), for sharing across processes and machines.

Example
-------
>>> import tempfile
>>> backend = LocalDirBackend(tempfile.mkdtemp())
>>> backend.put("ab" * 32, b"hello")
>>> backend.get("ab" * 32), backend.get("cd" * 32)
(b'hello', None)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidArgumentError

_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"


def _check_key(key: str) -> str:
    if not (isinstance(key, str) and len(key) >= 8 and all(c in "0123456789abcdef" for c in key)):
        raise InvalidArgumentError(f"invalid `key`: got {key!r}, expected a lowercase hex digest")
    return key


class Backend(Protocol):
    """What a chunk store needs from storage."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class LocalDirBackend:
    """Entries as files under ``root`` (created if missing); see the module doc."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / key[:2] / (key + _SUFFIX)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=_TMP_SUFFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        # The rename itself must reach the disk for the entry to survive a power loss.
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def clean_temporary(self, older_than_s: float = 3600.0) -> int:
        """Removes temporary files left by writers that died (older than
        ``older_than_s``, so that running writers keep theirs); returns how many."""
        removed, cutoff = 0, time.time() - older_than_s
        for tmp in self.root.glob(f"*/.*{_TMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def __repr__(self) -> str:
        return f"LocalDirBackend({str(self.root)!r})"


class RedisBackend:
    """Entries as Redis strings under ``prefix + key``.

    Parameters
    ----------
    client : redis.Redis, optional
        A connected client; else one is made from ``url``.
    url : str
        ``redis://host:port/db`` when no client is given.
    prefix : str
        Namespace of the keys.
    ttl_s : int, optional
        Expiry of each entry in seconds (None: never).

    Example
    -------
    >>> backend = RedisBackend(url="redis://127.0.0.1:6379/0")  # doctest: +SKIP
    """

    def __init__(self, client: Any = None, *, url: str = "redis://127.0.0.1:6379/0", prefix: str = "kvpress_rs:chunk:",
                 ttl_s: int | None = None):
        if client is None:
            import redis

            client = redis.Redis.from_url(url)
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def get(self, key: str) -> bytes | None:
        return self.client.get(self.prefix + _check_key(key))

    def put(self, key: str, data: bytes) -> None:
        self.client.set(self.prefix + _check_key(key), data, ex=self.ttl_s)

    def delete(self, key: str) -> None:
        self.client.delete(self.prefix + _check_key(key))

    def __repr__(self) -> str:
        return f"RedisBackend(prefix={self.prefix!r})"
