"""``python -m kvpress_rs.bench micro``: the Rust kernels against ``clone()`` of the same bytes.

On a (batch, heads, tokens, head_dim) tensor (``--shape``, ``--dtype``): scoring (knorm,
keydiff, snapkv with a 64-query window), gathering half of the tokens, quantizing and
dequantizing (4 and 2 bits, groups of 32), and RoPE shifts (one delta for all tokens; one
per token). Each kernel's time is compared with ``clone()`` of the bytes it reads or writes
(the keys for scoring, the gathered output for gathering, the float tensor for the
quantizers and shifts): ``fraction_of_copy`` = clone time / kernel time, 1.0 = as fast as
copying memory. The plain-torch way to do the same (and optimum-quanto's quantizer when
installed) runs beside ours: ``ours/theirs`` is the time ratio (below 1: ours faster).

Medians of ``--repeats`` after a warm-up. Example: ``python -m kvpress_rs.bench micro
--threads 1``. Writes micro.csv/.json/.md/.png.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

from .cli import add_common, setup
from .measure import median_seconds


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def torch_shift(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The plain-torch re-rotation (transformers' way: float32 angles, cos/sin in x's dtype)."""
    ang = delta.float()[..., None] * inv_freq
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def kernels(x: torch.Tensor) -> list[tuple[str, str, Callable[[], Any], torch.Tensor]]:
    """(kernel, implementation, call, tensor whose clone is the same bytes)."""
    from transformers import LlamaConfig

    from kvpress_rs import ops
    from kvpress_rs.rope import Rope

    b, h, t, d = x.shape
    keys, values = x, x.flip(2).contiguous()
    queries = torch.randn(b, h, min(64, t), d).to(x.dtype)
    kept = ops.kept_indices("knorm", keys, compression_ratio=0.5)
    gathered = ops.gather(keys, kept)
    full_idx = kept[..., None].expand(-1, -1, -1, d)
    config = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h, head_dim=d)
    rope = Rope.from_config(config)
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    per_token = torch.randint(-(10**4), 10**4, (b, h, t))
    one = torch.full((b, h, t), 4096)
    out = [
        ("score knorm", "ours", lambda: ops.score("knorm", keys), keys),
        ("score knorm", "torch", lambda: -keys.float().norm(dim=-1), keys),
        ("score keydiff", "ours", lambda: ops.score("keydiff", keys), keys),
        ("score keydiff", "torch", lambda: -torch.nn.functional.cosine_similarity(
            keys.float(), keys.float().mean(2, keepdim=True), dim=-1), keys),
        ("score snapkv (64 queries)", "ours", lambda: ops.score("snapkv", keys, queries=queries, window_size=queries.shape[2]), keys),
        ("gather 50%", "ours", lambda: ops.gather(keys, kept), gathered),
        ("gather 50%", "torch", lambda: keys.gather(2, full_idx), gathered),
        ("rope shift, one delta", "ours", lambda: rope.shift(keys, 4096), keys),
        ("rope shift, one delta", "torch", lambda: torch_shift(keys, one, inv_freq), keys),
        ("rope shift, per token", "ours", lambda: rope.shift(keys, per_token), keys),
        ("rope shift, per token", "torch", lambda: torch_shift(keys, per_token, inv_freq), keys),
    ]
    for bits in (4, 2):
        q = ops.quantize(values, bits=bits, group_size=32)
        out += [(f"quantize {bits}b G32", "ours", lambda bits=bits: ops.quantize(values, bits=bits, group_size=32), values),
                (f"dequantize {bits}b G32", "ours", lambda q=q: q.dequantize(), values)]
        try:
            from transformers.cache_utils import QuantoQuantizedLayer

            layer = QuantoQuantizedLayer(nbits=bits, axis_key=0, q_group_size=32)
            qq = layer._quantize(values, axis=0)
            out += [(f"quantize {bits}b G32", "quanto", lambda layer=layer: layer._quantize(values, axis=0), values),
                    (f"dequantize {bits}b G32", "quanto", lambda qq=qq: qq.dequantize(), values)]
        except Exception:  # optimum-quanto not installed
            pass
    return out


COLUMNS = ["kernel", "impl", "ms", "clone_ms", "fraction_of_copy", "ours/theirs"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, methods=[], out="micro", model_options=False)
    parser.add_argument("--shape", default="1,8,8192,128", help="batch,heads,tokens,head_dim")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a (1, 2, 256, 64) tensor, 3 repeats (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.repeats = "1,2,256,64", 3
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4:
        raise SystemExit(f"--shape must be batch,heads,tokens,head_dim; got {args.shape!r}")
    run = setup(args, argv, "micro", load_model=False)
    torch.manual_seed(0)
    x = torch.randn(*shape).to(getattr(torch, args.dtype))
    rows = []
    clone_cache: dict[int, float] = {}
    for name, impl, fn, ref in run.progress(kernels(x), "kernels"):
        ms = median_seconds(fn, args.repeats) * 1e3
        if ref.nbytes not in clone_cache:
            clone_cache[ref.nbytes] = median_seconds(ref.clone, args.repeats) * 1e3
        clone_ms = clone_cache[ref.nbytes]
        rows.append({"kernel": name, "impl": impl, "ms": ms, "clone_ms": clone_ms, "bytes": ref.nbytes,
                     "fraction_of_copy": clone_ms / ms, "shape": args.shape, "dtype": args.dtype})
    ours = {r["kernel"]: r for r in rows if r["impl"] == "ours"}
    for r in rows:
        if r["impl"] != "ours" and r["kernel"] in ours:
            r["ours/theirs"] = ours[r["kernel"]]["ms"] / r["ms"]

    from . import plots, results

    print(f"\nkernels on {shape} {args.dtype}, median of {args.repeats}; fraction_of_copy = clone ms / kernel ms")
    results.print_table(rows, COLUMNS)
    paths = results.write(args.out, "micro", rows, run.meta, COLUMNS)
    paths["png"] = plots.micro_plot(rows, args.out / "micro.png", title=f"kernels, {shape} {args.dtype}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
