"""Chunk entries and backends: round trips, corrupt / truncated / mismatched entries never
used, a writer killed mid-write leaves nothing that reads back as valid, concurrent readers
and writers, and a real redis-server on loopback (skipped only when the binary is absent)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch
from conftest import random_ids, tiny_llama_config
from transformers import LlamaForCausalLM

import kvpress_rs
from kvpress_rs.chunks import LocalDirBackend, RedisBackend
from kvpress_rs.chunks.entry import from_bytes


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


class FakeTokenizer:
    """Just what the identity reads: a vocab and special tokens."""

    def __init__(self, shift=0):
        self.vocab = {f"t{i}": i + shift for i in range(128)}
        self.special_tokens_map = {"bos_token": "t0"}

    def get_vocab(self):
        return self.vocab


def assert_same_chunk(a, b):
    assert torch.equal(a.ids, b.ids) and len(a.layers) == len(b.layers)
    for (ka, va, pa), (kb, vb, pb) in zip(a.layers, b.layers):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert (pa is None and pb is None) or torch.equal(pa, pb)


@pytest.mark.parametrize("compression", [None, {"policy": "streaming_llm", "compression_ratio": 0.5, "n_sink": 2}])
def test_local_round_trip_and_keying(tmp_path, compression):
    model = tiny()
    store = kvpress_rs.ChunkStore(model, FakeTokenizer(), backend=tmp_path, compression=compression)
    ids = random_ids(1, 24)
    computed = store.encode(ids)
    assert store.stats["misses"] == 1 and store.backend.path(computed.key).exists()
    loaded = store.load(ids)
    assert_same_chunk(computed, loaded)
    assert store.encode(ids[0].tolist()).key == computed.key and store.stats["hits"] == 1
    if compression:
        assert computed.layers[0][2].tolist()[0][0] == [0, 1] + list(range(14, 24))
    # every part of the identity changes the key
    others = [
        kvpress_rs.ChunkStore(model, FakeTokenizer(shift=1), backend=tmp_path, compression=compression),
        kvpress_rs.ChunkStore(model, None, backend=tmp_path, compression=compression),
        kvpress_rs.ChunkStore(tiny(seed=1), FakeTokenizer(), backend=tmp_path, compression=compression),
        kvpress_rs.ChunkStore(tiny(rope_theta=500000.0), FakeTokenizer(), backend=tmp_path, compression=compression),
        kvpress_rs.ChunkStore(model, FakeTokenizer(), backend=tmp_path, compression={"policy": "knorm", "compression_ratio": 0.25}),
    ]
    keys = {computed.key, store.key(random_ids(1, 23))} | {o.key(ids) for o in others}
    assert len(keys) == 7
    for other in others:
        assert other.load(ids) is None  # a miss, never another store's entry


def corrupt_cases(data: bytes):
    n = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # a bit in the last tensor's bytes
    return {
        "empty": b"",
        "header_only": data[: 8 + n],
        "truncated": data[: len(data) * 2 // 3],
        "bit_flip": bytes(flipped),
        "bad_header": data[:8] + b"{" * n + data[8 + n :],
    }


@pytest.mark.parametrize("case", ["empty", "header_only", "truncated", "bit_flip", "bad_header"])
def test_corrupt_entries_raise_or_count_as_a_miss(tmp_path, case):
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    ids = random_ids(1, 16)
    good = store.encode(ids)
    data = store.backend.get(good.key)
    store.backend.put(good.key, corrupt_cases(data)[case])
    with pytest.raises(kvpress_rs.CorruptChunkError):
        store.load(ids)
    strict = kvpress_rs.ChunkStore(model, backend=tmp_path, on_invalid="raise")
    with pytest.raises(kvpress_rs.CorruptChunkError):
        strict.encode(ids)
    # the default treats it as a miss: recomputed, rewritten, valid again
    again = store.encode(ids)
    assert store.stats["invalid"] == 1 and store.stats["misses"] == 2
    assert_same_chunk(again, good)
    assert_same_chunk(store.load(ids), good)


@pytest.mark.parametrize(
    "other, field",
    [
        (lambda: (tiny(seed=1), FakeTokenizer()), "another model"),
        (lambda: (tiny(), FakeTokenizer(shift=1)), "another tokenizer"),
        (lambda: (tiny(rope_theta=500000.0), FakeTokenizer()), "other RoPE settings"),
    ],
)
def test_mismatched_entries_are_refused(tmp_path, other, field):
    """An entry of another model/tokenizer/rope found under our key (a collision, a copied or
    tampered file) is refused by its metadata, never used."""
    ids = random_ids(1, 16)
    ours = kvpress_rs.ChunkStore(tiny(), FakeTokenizer(), backend=tmp_path / "ours")
    model, tokenizer = other()
    theirs = kvpress_rs.ChunkStore(model, tokenizer, backend=tmp_path / "theirs")
    data = theirs.backend.get(theirs.encode(ids).key)
    ours.backend.put(ours.key(ids), data)
    with pytest.raises(kvpress_rs.ChunkMismatchError, match=field):
        ours.load(ids)
    assert ours.encode(ids).key == ours.key(ids) and ours.stats["invalid"] == 1
    # other token ids under our key, too
    other_ids = random_ids(1, 16, seed=9)
    ours.backend.put(ours.key(ids), ours.backend.get(ours.encode(other_ids).key))
    with pytest.raises(kvpress_rs.ChunkMismatchError, match="token ids"):
        ours.load(ids)


WRITER = textwrap.dedent(
    """
    import os, sys, time
    import kvpress_rs.chunks.backends as backends
    root, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    real_fdopen = backends.os.fdopen

    class HalfWriter:
        # writes the first half, then stalls: killed mid-write
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
        def write(self, b):
            self.f.write(b[: len(b) // 2]); self.f.flush()
            print("ready", flush=True); time.sleep(600)
        def __getattr__(self, name): return getattr(self.f, name)

    if mode == "mid_write":
        backends.os.fdopen = lambda fd, m: HalfWriter(real_fdopen(fd, m))
    else:  # all bytes written, killed before the rename commits them
        def stall(fd):
            print("ready", flush=True); time.sleep(600)
        backends.os.fsync = stall
    backends.LocalDirBackend(root).put(key, data)
    """
)


@pytest.mark.parametrize("mode", ["mid_write", "before_rename"])
def test_writer_killed_mid_write_leaves_no_valid_entry(tmp_path, mode):
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    ids = random_ids(1, 16)
    key = store.key(ids)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), key, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    leftovers = list(tmp_path.glob(f"*/.{key}.*.tmp"))
    assert leftovers and leftovers[0].stat().st_size > 0  # the killed write did happen
    assert store.backend.get(key) is None and store.load(ids) is None
    encoded = store.encode(ids)  # a miss: computed and stored properly
    assert store.stats["misses"] == 1 and store.load(ids) is not None and encoded.key == key
    assert store.backend.clean_temporary(older_than_s=0) == 1 and not list(tmp_path.glob("*/.*.tmp"))


def test_concurrent_readers_and_writers_see_only_valid_entries(tmp_path):
    """Writers replace one key with two different valid entries while readers read it: every
    read is absent or verifies (never a mix of two writes)."""
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    ids = random_ids(1, 64)
    ident = store.identity(ids)
    first = store.encode(ids)
    versions = [store.backend.get(first.key)]
    second = kvpress_rs.ChunkStore(model, backend=tmp_path / "other")  # same identity, other bytes below
    encoded = second.encode(ids)
    encoded.layers = [(k + 1, v, p) for k, v, p in encoded.layers]
    from kvpress_rs.chunks.entry import to_bytes

    versions.append(to_bytes(encoded, ident))
    errors, reads, stop = [], [], threading.Event()

    def writer(data):
        backend = LocalDirBackend(tmp_path)
        while not stop.is_set():
            backend.put(first.key, data)

    def reader():
        backend = LocalDirBackend(tmp_path)
        while not stop.is_set():
            data = backend.get(first.key)
            try:
                chunk = from_bytes(data, ident)
                reads.append(float(chunk.layers[0][0][0, 0, 0, 0]))
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(d,)) for d in versions] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and reads
    assert set(reads) <= {float(first.layers[0][0][0, 0, 0, 0]), float(encoded.layers[0][0][0, 0, 0, 0])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    server = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if server is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    redis = pytest.importorskip("redis")
    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not start")
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_backend_round_trip_and_corruption(redis_client):
    model = tiny()
    store = kvpress_rs.ChunkStore(model, backend=RedisBackend(redis_client, prefix="test:"))
    ids = random_ids(1, 20)
    computed = store.encode(ids)
    assert redis_client.exists("test:" + computed.key)
    # another process (another store on another client) reads it back
    port = redis_client.connection_pool.connection_kwargs["port"]
    reader = kvpress_rs.ChunkStore(model, backend=RedisBackend(url=f"redis://127.0.0.1:{port}/0", prefix="test:"))
    assert_same_chunk(reader.load(ids), computed)
    cache = reader.assemble([ids, random_ids(1, 5, seed=3)])
    assert cache.get_seq_length() == 25 and reader.stats["hits"] == 1
    redis_client.set("test:" + computed.key, redis_client.get("test:" + computed.key)[:-100])
    with pytest.raises(kvpress_rs.CorruptChunkError):
        reader.load(ids)
    assert_same_chunk(reader.encode(ids), computed)
    assert reader.stats["invalid"] == 1
    store.backend.delete(computed.key)
    assert store.load(ids) is None


def test_backend_arguments(tmp_path):
    model = tiny()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="backend"):
        kvpress_rs.ChunkStore(model, backend=42)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="on_invalid"):
        kvpress_rs.ChunkStore(model, backend=tmp_path, on_invalid="ignore")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="key"):
        LocalDirBackend(tmp_path).get("../../etc/passwd")


def test_docstring_examples_run(tmp_path, monkeypatch):
    import doctest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() lands in tmp_path

    import kvpress_rs.chunks.backends as backends
    import kvpress_rs.chunks.entry as entry
    from kvpress_rs import _native

    for module in (entry, backends):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried and not failures, module.__name__
    for fn in (_native.assemble_layer, _native.select_deviating, _native.assemble_quantized_layer,
               _native.QuantizedStore.parts):
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner()
        for test in finder.find(fn, fn.__name__, globs={}):
            assert test.examples and not runner.run(test).failed, fn.__name__
