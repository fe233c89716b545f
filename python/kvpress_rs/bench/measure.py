"""How the benchmarks measure: clocks, medians after warm-up, the time our caches spend
compressing, and peak memory (CUDA's allocator statistics, or the process's peak resident
set on CPU, reset through ``/proc/self/clear_refs``).

>>> seconds = median_seconds(lambda: sum(range(1000)), repeats=5)  # one warm-up call first
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def paired_median_seconds(
    fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """Medians of ``fn`` and ``baseline`` timed in alternation (one warm-up call each), so
    that both see the same state of a noisy machine: a ratio of the two drifts far less
    than two medians taken one after the other.

    >>> fast, slow = paired_median_seconds(lambda: sum(range(10)), lambda: sum(range(10_000)), repeats=5)
    """
    fn()
    baseline()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for f, log in ((fn, times[0]), (baseline, times[1])):
            start = clock()
            f()
            log.append(clock() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@contextmanager
def compression_timer(log: list[float], clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """Appends to ``log`` the seconds of every compression step of our caches: each layer's
    steps after its attention (scoring and eviction), and the cross-layer steps after the
    forward (the allocation of layer budgets, re-rotation, quantizing the kept tokens).
    ``clock=time.process_time`` counts CPU seconds of the process, which a busy machine
    disturbs less than wall time (use it with one thread)."""
    from kvpress_rs._layer import CacheLayer, LayerStateCache

    originals = (CacheLayer._after_attention, LayerStateCache._forward_finished)

    def wrap(fn):
        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                log.append(clock() - start)

        return timed

    CacheLayer._after_attention, LayerStateCache._forward_finished = map(wrap, originals)
    try:
        yield
    finally:
        CacheLayer._after_attention, LayerStateCache._forward_finished = originals


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc), so that memory reused later counts in
    the resident set again; without it a peak below earlier peaks would read as zero."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry, in bytes, of a block:

    >>> with PeakMemory("cpu") as peak:  # doctest: +SKIP
    ...     model(ids, past_key_values=cache)
    >>> peak.bytes  # doctest: +SKIP

    On CUDA, ``torch.cuda.max_memory_allocated`` (exact, tensors only). On Linux CPU, the
    process's peak resident set (``VmHWM``, reset on entry after ``malloc_trim``) minus its
    resident set at entry: page-granular, it includes the allocator's slack, and is None
    where ``/proc`` cannot be reset."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self._start = _rss_bytes("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
        elif self._start is not None:
            peak = _rss_bytes("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._start)


def set_threads(threads: int | None) -> int:
    """Sets torch's and rayon's thread counts (rayon reads its variable when its pool
    starts, so call this before the first Rust kernel); returns torch's count."""
    import os

    import torch

    if threads:
        torch.set_num_threads(threads)
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()
