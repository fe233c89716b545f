"""Kernel throughput on a CUDA device (the libtorch path), each as a ratio to a copy of the
same bytes (``tensor.clone()``) and, for decode attention, to torch's SDPA over the
bfloat16 cache it replaces. Run on a GPU machine:

    PYTHONPATH=python python benches/device_kernels.py --out docs/results/cuda_kernels.json

Timings are medians of CUDA-synchronised wall times after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs._native import LayerStore, Press, QuantizedStore


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels(tokens: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(1, 8, tokens, 128, device=device, dtype=torch.bfloat16)
    gb = x.nbytes / 1e9
    clone = median_ms(lambda: x.clone())
    rows: dict[str, Any] = {"shape": list(x.shape), "clone_ms": clone, "clone_gbps": gb / clone * 1e3}

    def row(name: str, ms: float) -> None:
        rows[name] = {"ms": ms, "gbps": gb / ms * 1e3, "vs_clone": clone / ms}

    for bits in (2, 4):
        for grouping in ("channel", "token"):
            q = ops.quantize(x, bits=bits, group_size=32, grouping=grouping)
            row(f"quantize {bits}b {grouping}", median_ms(lambda: ops.quantize(x, bits=bits, group_size=32, grouping=grouping)))
            row(f"dequantize {bits}b {grouping}", median_ms(q.dequantize))
    rope = kvpress_rs.Rope(128, theta=100000.0)
    row("rope shift", median_ms(lambda: rope.shift(x, 4096)))
    positions = torch.arange(tokens, device=device)
    row("rope apply", median_ms(lambda: rope.apply(x, positions)))
    row("knorm kept_indices + gather", median_ms(lambda: ops.gather(x, ops.kept_indices("knorm", x, compression_ratio=0.5))))
    return rows


def decode_attention(tokens: int, device: torch.device) -> dict[str, Any]:
    """One decode step of SmolLM2's shape (9 query heads over 3 KV heads, head_dim 64)."""
    torch.manual_seed(0)
    keys = torch.randn(1, 3, tokens, 64, device=device, dtype=torch.bfloat16)
    values = torch.randn(1, 3, tokens, 64, device=device, dtype=torch.bfloat16)
    query = torch.randn(1, 9, 1, 64, device=device, dtype=torch.bfloat16)
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, scale=0.125, enable_gqa=True))
    rows: dict[str, Any] = {"tokens": tokens, "sdpa_bf16_ms": sdpa}
    for bits in (2, 4):
        store = QuantizedStore(kvpress_rs.QuantConfig(bits=bits, group_size=32, residual_length=128))
        store.append(keys, values)
        ms = median_ms(lambda: store.attend(query, None, 0.125))
        rows[f"quantized {bits}b"] = {"ms": ms, "vs_sdpa": sdpa / ms, "nbytes": store.nbytes,
                                      "bf16_nbytes": keys.nbytes + values.nbytes}
    return rows


def compression(tokens: int, device: torch.device) -> dict[str, Any]:
    """Scoring + eviction of one layer (SmolLM2 shape) per policy, against a clone of its KV."""
    torch.manual_seed(0)
    keys = torch.randn(1, 3, tokens, 64, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    queries = torch.randn(1, 9, tokens, 64, device=device, dtype=torch.bfloat16)
    clone = median_ms(lambda: (keys.clone(), values.clone()))
    rows: dict[str, Any] = {"tokens": tokens, "clone_kv_ms": clone}
    for policy, kwargs in (("knorm", {}), ("snapkv", {"window_size": 64}), ("tova", {}),
                           ("expected_attention", {}), ("keydiff", {}), ("lagkv", {})):
        press = Press(policy, compression_ratio=0.5, rope=kvpress_rs.Rope(64, theta=100000.0), **kwargs)

        def run() -> None:
            store = LayerStore()
            store.append(keys, values)
            press.compress(store, kvpress_rs._native.Plan.prefill(0, queries))

        rows[policy] = {"ms": median_ms(run, repeats=10)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    big = not args.quick
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else args.device,
        "torch": torch.__version__,
        "kernels": {t: kernels(t, device) for t in ((8192, 131072) if big else (512,))},
        "decode_attention": {t: decode_attention(t, device) for t in ((2048, 16384, 131072) if big else (512,))},
        "compression": {t: compression(t, device) for t in ((2048, 8192) if big else (256,))},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
