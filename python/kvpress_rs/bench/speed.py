"""``python -m kvpress_rs.bench speed``: time and memory against context length.

For each ``--lengths`` context (Paul Graham's essays) and method: the prefill's seconds
(compression included) and the seconds spent compressing within it (ours: scoring,
eviction and budgets of every layer; kvpress: its ``compress()`` calls), medians of
``--repeats`` after a warm-up; decode ms/token (median of ``--steps`` greedy steps after
two untimed ones); peak memory above the level before the prefill, over prefill and decode
(CUDA: allocator peak; CPU: peak resident set, which includes the allocator's slack); and
the KV bytes held after the prefill. kvpress 0.5.5 runs the same token ids in its own
process (its peak is measured there the same way).

Example: ``python -m kvpress_rs.bench speed --lengths 2048 6144 --methods full knorm snapkv
quantized:bits=4 --threads 1``. Writes speed.csv/.json/.md/.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .cli import Run, add_common, setup
from .measure import CLOCKS, PeakMemory, compression_timer
from .specs import Method, kv_bytes, make_cache


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(run: Run, method: Method, ids: torch.Tensor, repeats: int, steps: int) -> dict:
    model, device, clock = run.model, run.args.device, CLOCKS[run.args.clock]

    def prefill():
        cache = make_cache(model, method)
        log: list[float] = []
        _sync(device)
        with compression_timer(log, clock):
            start = clock()
            logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
            _sync(device)
            seconds = clock() - start
        return cache, logits, seconds, sum(log)

    prefill()  # warm-up
    timings = [prefill()[2:] for _ in range(repeats)]
    with PeakMemory(device) as peak:
        cache, logits, _, _ = prefill()
        nbytes = kv_bytes(cache)
        token = logits[:, -1:].argmax(-1)
        times = []
        for i in range(steps + 2):
            _sync(device)
            start = clock()
            logits = model(token, past_key_values=cache).logits
            _sync(device)
            if i >= 2:
                times.append(clock() - start)
            token = logits[:, -1:].argmax(-1)
    return {"prefill_s": statistics.median(t[0] for t in timings), "compress_s": statistics.median(t[1] for t in timings),
            "decode_ms": statistics.median(times) * 1e3, "peak_bytes": peak.bytes, "kv_bytes": nbytes}


def summarize(rows: list[dict]) -> list[dict]:
    ours = {(r["method"], r["length"]): r for r in rows if r["side"] == "ours"}
    theirs = {(r["method"], r["length"]): r for r in rows if r["side"] == "kvpress"}
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    out = []
    for key, r in ours.items():
        row = {"method": r["method"], "length": r["length"], "prefill_s": r["prefill_s"],
               "compress_ms": r["compress_s"] * 1e3, "decode_ms": r["decode_ms"], "peak_mib": mib(r["peak_bytes"]),
               "kv_mib": mib(r["kv_bytes"])}
        t = theirs.get(key)
        if t:
            row.update({"kvpress_prefill_s": t["prefill_s"], "kvpress_compress_ms": t["compress_s"] * 1e3,
                        "kvpress_decode_ms": t["decode_ms"], "kvpress_peak_mib": mib(t["peak_bytes"]),
                        "kvpress_kv_mib": mib(t["kv_bytes"])})
            for name in ("compress_ms", "decode_ms", "peak_mib", "kv_mib"):
                a, b = row[name], row[f"kvpress_{name}"]
                row[f"{name} ours/kvpress"] = a / b if a is not None and b else None
        out.append(row)
    return out


COLUMNS = ["method", "length", "prefill_s", "compress_ms", "decode_ms", "peak_mib", "kv_mib",
           "compress_ms ours/kvpress", "decode_ms ours/kvpress", "peak_mib ours/kvpress", "kv_mib ours/kvpress"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, methods=["full", "knorm", "snapkv", "quantized:bits=4", "quanto:nbits=4"], out="speed",
               ratios=[0.5])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per median")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per median")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU seconds (steadier on a busy machine; pair with --threads 1)")
    args = parser.parse_args(argv)
    from .specs import quanto_available

    if not quanto_available() and any(m.startswith("quanto") for m in args.methods):
        print("optimum-quanto is not importable: quanto methods left out (make bench-deps installs it)")
        args.methods = [m for m in args.methods if not m.startswith("quanto")]
    run = setup(args, argv, "speed")
    from kvpress_rs.data import paul_graham_essays

    ids = run.tokenizer(paul_graham_essays(), add_special_tokens=False)["input_ids"]
    contexts = [{"length": n, "ids": ids[:n]} for n in args.lengths]
    rows = []
    for method in run.progress(run.methods, "speed methods"):
        for ctx in run.progress(contexts, method.label):
            r = measure(run, method, torch.tensor([ctx["ids"]], device=args.device), args.repeats, args.steps)
            rows.append({"side": "ours", "method": method.label, "length": ctx["length"], **r})
    twins = [m.kvpress_twin for m in run.methods if m.kvpress_twin]
    for r in run.kvpress("speed", twins, contexts=contexts, repeats=args.repeats, steps=args.steps, clock=args.clock) or []:
        rows.append({"side": "kvpress", "method": r["press"]["ours"], "length": r["length"],
                     "prefill_s": r["prefill_seconds"], "compress_s": r["compress_seconds"], "decode_ms": r["decode_ms"],
                     "peak_bytes": r["peak_bytes"], "kv_bytes": r["kv_bytes"]})

    from . import plots, results

    summary = summarize(rows)
    run.meta["clock"] = args.clock
    print(f"\nspeed (median of {args.repeats} prefills, {args.steps} decode steps; {args.clock} clock)")
    results.print_table(summary, COLUMNS)
    paths = results.write(args.out, "speed", rows, run.meta, COLUMNS, summary)
    paths["png"] = plots.speed_plots(summary, args.out / "speed.png", title=f"speed, {args.model}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
