"""``python -m kvpress_rs.bench overhead``: what a cache adds to a whole prefill, as a user
feels it. One forward of a T-token prompt (bf16 SmolLM2, logits of the last token only)
with a plain ``DynamicCache``, with our cache keeping everything (ratio 0), and with our
compressing caches; in kvpress 0.5.5's environment, the same forward plain and under each
press of the same policy. Forwards run in interleaved rounds (every method once per round),
and what a cache adds is the median over rounds of (its forward − the plain forward of that
round). Printed and written as JSON:

- ``ratio0 / plain``: our cache at ratio 0 against DynamicCache (target: no slower);
- ``ours added / kvpress added``: what our compressing cache adds over what kvpress's press
  of the same policy adds, each against its own plain forward (target: ≤ 0.5).

>>> main(["--model", "tiny", "--lengths", "64", "--rounds", "1", "--no-kvpress"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_POLICIES = ["knorm", "snapkv", "expected_attention"]
KVPRESS = {"knorm": "knorm", "snapkv": "snapkv", "expected_attention": "expected_attention",
           "streaming_llm": "streaming_llm", "tova": "tova", "keydiff": "keydiff", "lagkv": "lagkv",
           "random": "random", "pyramidkv": "pyramidkv"}


def prompt(tokenizer: Any, n: int) -> list[int]:
    from kvpress_rs.data import paul_graham_essays

    ids = tokenizer(paul_graham_essays(), add_special_tokens=False).input_ids
    return ids[:n]


@torch.no_grad()
def timed_forward(model: Any, ids: torch.Tensor, make_cache: Callable[[], Any], clock: Callable[[], float]) -> float:
    cache = make_cache()
    start = clock()
    model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    return clock() - start


def measure_ours(model: Any, inputs: dict[int, list[int]], policies: list[str], ratio: float, rounds: int,
                 clock: Callable[[], float]) -> dict[int, dict[str, list[float]]]:
    from transformers import DynamicCache

    from kvpress_rs.policies import CACHES

    makers: dict[str, Callable[[], Any]] = {
        "plain": lambda: DynamicCache(config=model.config),
        "ratio0": lambda: CACHES["knorm"](model, compression_ratio=0.0),
    }
    for policy in policies:
        makers[policy] = lambda p=policy: CACHES[p](model, compression_ratio=ratio)
    out: dict[int, dict[str, list[float]]] = {}
    for n, ids_list in inputs.items():
        ids = torch.tensor([ids_list])
        for make in makers.values():  # warm-up: first-call allocations, kernel choice
            timed_forward(model, ids, make, clock)
        times: dict[str, list[float]] = {name: [] for name in makers}
        for _ in range(rounds):
            for name, make in makers.items():
                times[name].append(timed_forward(model, ids, make, clock))
        out[n] = times
    return out


def added(times: dict[str, list[float]], name: str, plain: str = "plain") -> float:
    """Median over rounds of (name's forward − the plain forward of the same round), seconds."""
    return statistics.median(a - b for a, b in zip(times[name], times[plain]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch and rayon threads on both sides")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                        help="cpu: process CPU seconds (steadier on a shared machine with one thread)")
    parser.add_argument("--no-kvpress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_results/overhead.json"))
    args = parser.parse_args(argv)

    from kvpress_rs.bench.measure import set_threads
    from kvpress_rs.bench.results import run_metadata
    from kvpress_rs.models import load_model, model_dir

    set_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, tokenizer = load_model(args.model, dtype="bfloat16")
    inputs = {n: prompt(tokenizer, n) for n in args.lengths}
    ours = measure_ours(model, inputs, args.policies, args.ratio, args.rounds, clock)

    theirs: dict[int, dict[str, list[float]]] = {}
    twins = [p for p in args.policies if p in KVPRESS]
    if not args.no_kvpress and twins:
        from .kvpress_env import kvpress_python, run_kvpress

        if kvpress_python() is None:
            print("kvpress 0.5.5 is not installed (make bench-deps): its columns are left out", flush=True)
        else:
            request = {"model_dir": str(model_dir(args.model)), "dtype": "bfloat16", "mode": "overhead",
                       "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
                       "inputs": list(inputs.values()),
                       "presses": [{"name": KVPRESS[p], "compression_ratio": args.ratio, "ours": p} for p in twins]}
            for entry in run_kvpress(request)["results"]:
                theirs[entry["tokens"]] = entry["seconds"]

    rows = []
    header = (f"{'T':>6} {'policy':<20} {'plain ms':>9} {'ratio0/plain':>12} {'ours +ms':>9} {'kvpress +ms':>11} "
              f"{'ours/kvpress':>12}")
    print("\n" + header + "\n" + "-" * len(header))
    for n, times in ours.items():
        plain = statistics.median(times["plain"])
        ratio0 = statistics.median(times["ratio0"]) / plain
        for policy in args.policies:
            row = {"tokens": n, "policy": policy, "plain_ms": plain * 1e3, "ratio0_over_plain": ratio0,
                   "ours_added_ms": added(times, policy) * 1e3, "ours_rounds_ms": [t * 1e3 for t in times[policy]],
                   "plain_rounds_ms": [t * 1e3 for t in times["plain"]],
                   "ratio0_rounds_ms": [t * 1e3 for t in times["ratio0"]]}
            other = theirs.get(n)
            if other and policy in other:
                row["kvpress_added_ms"] = added(other, policy) * 1e3
                row["kvpress_plain_ms"] = statistics.median(other["plain"]) * 1e3
                row["added_ratio"] = row["ours_added_ms"] / row["kvpress_added_ms"] if row["kvpress_added_ms"] > 0 else None
            rows.append(row)
            kv = f"{row['kvpress_added_ms']:>11.1f}" if "kvpress_added_ms" in row else f"{'-':>11}"
            ratio = f"{row['added_ratio']:>12.2f}" if row.get("added_ratio") is not None else f"{'-':>12}"
            print(f"{n:>6} {policy:<20} {plain * 1e3:>9.1f} {ratio0:>12.3f} {row['ours_added_ms']:>9.1f} {kv} {ratio}",
                  flush=True)
    payload = {"rows": rows, "meta": run_metadata(["overhead", *(argv or [])], model=args.model, dtype="bfloat16"),
               "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
