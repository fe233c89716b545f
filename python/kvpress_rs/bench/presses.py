"""``python -m kvpress_rs.bench presses``: eviction policies side by side with NVIDIA
kvpress 0.5.5's presses of the same name, on SmolLM2 and the same inputs, in one run, in
one table (``needle`` and ``speed`` measure each side in more detail):

- compression overhead: the time spent scoring and evicting during one prefill (every
  layer), ours vs kvpress's ``compress()``, as a ratio;
- needle-in-a-haystack answers at several context lengths, depths and ratios.

kvpress runs in its own environment (``make bench-deps``) in a subprocess; both sides get
the same token ids. Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .measure import CLOCKS, compression_timer
from .needle import make_tasks
from .specs import KVPRESS_NAMES, our_cache, parse_spec  # noqa: F401 - parse_spec: the spec syntax, re-exported


@torch.no_grad()
def run_ours(model: Any, tokenizer: Any, tasks: list[dict], policy: str, ratio: float, max_new_tokens: int,
             clock=time.perf_counter) -> list[dict]:
    out = []
    for task in tasks:
        context = torch.tensor([task["context_ids"]])
        full = torch.tensor([task["context_ids"] + task["question_ids"]])
        cache = our_cache(model, policy, ratio)
        log: list[float] = []
        with compression_timer(log, clock):
            start = clock()
            model(context, past_key_values=cache)
            prefill = clock() - start
        answer_ids: list[int] = []
        if max_new_tokens:
            gen = model.generate(
                full, attention_mask=torch.ones_like(full), past_key_values=cache, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.eos_token_id,
            )
            answer_ids = gen[0, full.shape[1] :].tolist()
        out.append({"task": task["name"], "answer_ids": answer_ids, "compress_seconds": log, "prefill_seconds": prefill})
    return out


def summarize(results: list[dict], tokenizer: Any, tasks: list[dict]) -> dict:
    by_name = {t["name"]: t for t in tasks}
    found, overhead = {}, {}
    for r in results:
        task = by_name[r["task"]]
        text = tokenizer.decode(r["answer_ids"], skip_special_tokens=True).replace(",", "").replace(" ", "")
        found.setdefault(task["length"], []).append(task["passcode"] in text)
        overhead.setdefault(task["length"], []).append(sum(r["compress_seconds"]))
    return {
        "found": {k: sum(v) for k, v in found.items()},
        "tasks": {k: len(v) for k, v in found.items()},
        "overhead_ms": {k: statistics.median(v) * 1e3 for k, v in overhead.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench presses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(KVPRESS_NAMES),
                        help="policy or named cache, optionally with cache arguments: snapkv:head_budget=adakv,window_size=32")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 6000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--max-new-tokens", type=int, default=24, help="0: overhead only, no answers")
    parser.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    parser.add_argument("--no-kvpress", action="store_true", help="run our side only")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU seconds (steadier on a busy machine; pair with --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch and rayon threads on both sides")
    parser.add_argument("--out", type=Path, default=Path("bench_results/presses.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        import os

        torch.set_num_threads(args.threads)
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when rayon's pool starts
    clock = CLOCKS[args.clock]

    from kvpress_rs.bench.kvpress_env import run_kvpress
    from kvpress_rs.models import load_smollm2, smollm2_dir

    model, tokenizer = load_smollm2(dtype="bfloat16")
    tasks = make_tasks(tokenizer, args.lengths, args.depths, args.query_aware)
    # warm-up: first-call allocations and kernel selection
    run_ours(model, tokenizer, tasks[:1], "knorm", 0.5, 1, clock)

    ours: dict[tuple[str, float], dict] = {}
    for policy in args.policies:
        for ratio in args.ratios:
            ours[(policy, ratio)] = summarize(run_ours(model, tokenizer, tasks, policy, ratio, args.max_new_tokens, clock), tokenizer, tasks)
            print(f"ours   {policy:<20} {ratio:.2f} {ours[(policy, ratio)]}", flush=True)

    theirs: dict[tuple[str, float], dict] = {}
    if not args.no_kvpress:
        # a policy spec with keyword arguments has no kvpress twin
        presses = [{"name": KVPRESS_NAMES[p], "compression_ratio": r, "ours": p} for p in args.policies if p in KVPRESS_NAMES for r in args.ratios]
        request = {"model_dir": str(smollm2_dir()), "dtype": "bfloat16", "tasks": tasks, "presses": presses,
                   "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "clock": args.clock}
        eager = [p for p in presses if p["name"] == "observed_attention"]
        result = run_kvpress({**request, "presses": [p for p in presses if p not in eager]})["results"]
        if eager:
            result += run_kvpress({**request, "presses": eager, "attn": "eager"})["results"]
        grouped: dict[tuple[str, float], list] = {}
        for r in result:
            grouped.setdefault((r["press"]["ours"], r["press"]["compression_ratio"]), []).append(r)
        for key, rs in grouped.items():
            theirs[key] = summarize(rs, tokenizer, tasks)

    rows = []
    header = f"{'policy':<20} {'ratio':>5} {'T':>6} {'ours found':>10} {'kvpress found':>13} {'ours ms':>9} {'kvpress ms':>10} {'ratio':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for (policy, ratio), mine in ours.items():
        other = theirs.get((policy, ratio))
        for length in args.lengths:
            n = mine["tasks"][length]
            row = {"policy": policy, "ratio": ratio, "length": length, "ours_found": mine["found"][length], "tasks": n,
                   "ours_ms": mine["overhead_ms"][length]}
            if other:
                row.update(kvpress_found=other["found"][length], kvpress_ms=other["overhead_ms"][length])
            rows.append(row)
            kv_found = f"{row['kvpress_found']}/{n}" if other else "-"
            kv_ms = f"{row['kvpress_ms']:.1f}" if other else "-"
            speed = f"{row['ours_ms'] / row['kvpress_ms']:.2f}" if other and row["kvpress_ms"] > 0 else "-"
            print(f"{policy:<20} {ratio:>5.2f} {length:>6} {row['ours_found']:>8}/{n} {kv_found:>13} {row['ours_ms']:>9.1f} {kv_ms:>10} {speed:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
