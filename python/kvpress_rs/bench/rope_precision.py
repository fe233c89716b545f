"""RoPE precision and speed: ``python -m kvpress_rs.bench.rope_precision``.

1. Relative-position error of bf16 keys moved far away. A chunk of keys is encoded at
   positions 0..C-1 in bf16 (cached post-RoPE) and then moved to a global offset P (1K, 10K,
   100K, 1M) — KVLink-style reuse. A query at position P + C + gap attends to them. For
   each method we compare with the float64 truth computed from the same bf16 inputs:

   - ``ours``: ``Rope.shift`` of the cached bf16 keys (angles in float64, reduced mod 2π,
     one rounding to bf16); the query rotated by ``Rope.apply``;
   - ``bf16 angles``: the naive rotation, positions·inv_freq, cos and sin in bf16;
   - ``f32 angles``: what a bf16 transformers model does: angles in float32, cos/sin cast to
     bf16, the products in bf16 (keys rotated directly at their new positions).

   Errors: ``key``: RMS of (rotated key − exact) / RMS(key); ``score``: mean |q·k − exact| /
   (|q|·|k|) over every query/key pair. The ratio column is naive / ours.

2. Time of ``shift`` on a (1, 8, 8192, 128) bf16 tensor against ``tensor.clone()`` of the
   same bytes in the same process (median of ``--repeats`` after warm-up; the faster of
   torch's default thread count and one thread is the baseline): one delta for all
   tokens (placing a reused chunk), the deltas i − p_i of re-rotation after evicting half of
   a context, random per-(batch, head, token) deltas over ±10⁵ (no two rows share an angle:
   cos/sin computed per row), and the libtorch path (what CUDA runs) for comparison.

Set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` before starting
for stable timings on glibc.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from .. import ops
from ..rope import Rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def exact_rotation(x64: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float64 (``inv_freq`` float64)."""
    ang = positions.double()[..., None] * inv_freq
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x64 * cos + _rotate_half(x64) * sin


def naive_rotation(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, angle_dtype: torch.dtype):
    """bf16 rotation with angles computed in ``angle_dtype`` and cos/sin cast to bf16."""
    ang = positions.to(angle_dtype)[..., None] * inv_freq.to(angle_dtype)
    cos = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    return x * cos + _rotate_half(x) * sin


def precision_table(
    offsets: list[int], head_dim: int, theta: float, chunk: int, queries: int, seed: int = 0
) -> list[dict]:
    rope = Rope(head_dim, theta=theta)
    inv = rope.inv_freq()
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 4, chunk, head_dim, generator=g).bfloat16()
    q = torch.randn(1, 4, queries, head_dim, generator=g).bfloat16()
    k64, q64 = keys.double(), q.double()
    local = torch.arange(chunk)
    cached = rope.apply(keys, local)  # the chunk as encoded on its own
    rows = []
    for offset in offsets:
        kpos = local + offset
        qpos = offset + chunk + 16 + torch.arange(queries)
        k_exact, q_exact = exact_rotation(k64, kpos, inv), exact_rotation(q64, qpos, inv)
        s_exact = q_exact @ k_exact.transpose(-1, -2)
        norm = q64.norm(dim=-1)[..., None] * k64.norm(dim=-1)[..., None, :]
        methods = {
            "ours": (rope.shift(cached, offset), rope.apply(q, qpos)),
            "bf16 angles": tuple(naive_rotation(t, p, inv, torch.bfloat16) for t, p in ((keys, kpos), (q, qpos))),
            "f32 angles": tuple(naive_rotation(t, p, inv, torch.float32) for t, p in ((keys, kpos), (q, qpos))),
        }
        row = {"offset": offset}
        for name, (k_rot, q_rot) in methods.items():
            key_err = ((k_rot.double() - k_exact).pow(2).mean() / k64.pow(2).mean()).sqrt().item()
            score_err = ((q_rot.double() @ k_rot.double().transpose(-1, -2) - s_exact).abs() / norm).mean().item()
            row[name] = (key_err, score_err)
        rows.append(row)
    return rows


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_table(shape: tuple[int, int, int, int], theta: float, repeats: int) -> list[tuple[str, float]]:
    b, h, t, d = shape
    rope = Rope(d, theta=theta)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).bfloat16()
    per_token = torch.randint(-100_000, 100_000, (b, h, t), generator=g)
    # Re-rotation after evicting half of a 2T-token context: kept key i (original position
    # p_i, a sorted random subset per head) moves by i - p_i.
    kept = torch.stack([torch.randperm(2 * t, generator=g)[:t].sort().values for _ in range(b * h)])
    rerotation = (torch.arange(t) - kept).reshape(b, h, t)
    threads = torch.get_num_threads()
    clones = [(f"clone, {threads} torch threads", _median_seconds(x.clone, repeats))]
    if threads > 1:
        # On a shared machine torch's OpenMP threads can lose their time slices; a
        # single-threaded copy is then faster. The baseline is the faster of the two.
        torch.set_num_threads(1)
        try:
            clones.append(("clone, 1 torch thread", _median_seconds(x.clone, repeats)))
        finally:
            torch.set_num_threads(threads)
    rows = [
        min(clones, key=lambda r: r[1]),
        *[c for c in clones if c is not min(clones, key=lambda r: r[1])],
        ("shift, one delta", _median_seconds(lambda: rope.shift(x, 123_457), repeats)),
        ("shift, re-rotation deltas i - p_i", _median_seconds(lambda: rope.shift(x, rerotation), repeats)),
        ("shift, random (B,H,T) deltas", _median_seconds(lambda: rope.shift(x, per_token), repeats)),
        ("apply, (T,) positions", _median_seconds(lambda: rope.apply(x, torch.arange(t)), repeats)),
    ]
    with ops.cpu_kernels(False):
        rows.append(("libtorch path: shift, one delta", _median_seconds(lambda: rope.shift(x, 123_457), repeats)))
        rows.append(("libtorch path: shift, (B,H,T)", _median_seconds(lambda: rope.shift(x, per_token), repeats)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offsets", default="1000,10000,100000,1000000", help="global offsets P, comma-separated")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--theta", type=float, default=5e5, help="RoPE base (Llama-3: 5e5)")
    parser.add_argument("--chunk", type=int, default=256, help="keys per reused chunk")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--shape", default="1,8,8192,128", help="tensor timed: batch,heads,tokens,head_dim")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    offsets = [int(v) for v in args.offsets.split(",")]
    print(
        f"Relative-position error of bf16 keys moved from 0..{args.chunk - 1} to offset P "
        f"(head_dim {args.head_dim}, base {args.theta:g}); float64 truth from the same bf16 inputs"
    )
    names = ["ours", "bf16 angles", "f32 angles"]
    header = f"{'P':>9} | " + " | ".join(f"{n + ' key':>15} {n + ' score':>17}" for n in names)
    print(header + " | ratio bf16/ours (score) | ratio f32/ours (score)")
    for row in precision_table(offsets, args.head_dim, args.theta, args.chunk, args.queries):
        cells = " | ".join(f"{row[n][0]:>15.2e} {row[n][1]:>17.2e}" for n in names)
        r_bf16 = row["bf16 angles"][1] / row["ours"][1]
        r_f32 = row["f32 angles"][1] / row["ours"][1]
        print(f"{row['offset']:>9} | {cells} | {r_bf16:>23.1f} | {r_f32:>22.2f}")

    shape = tuple(int(v) for v in args.shape.split(","))
    nbytes = torch.Size(shape).numel() * 2
    print(
        f"\nTime on a {shape} bf16 tensor ({nbytes / 2**20:.1f} MiB), median of {args.repeats} after warm-up, "
        f"{torch.get_num_threads()} torch threads"
    )
    rows = timing_table(shape, args.theta, args.repeats)
    base = rows[0][1]
    print(f"baseline: {rows[0][0]}")
    for name, seconds in rows:
        print(f"{name:<36} {seconds * 1e3:>9.2f} ms  {seconds / base:>6.2f}x clone")


if __name__ == "__main__":
    main()
