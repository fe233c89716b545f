"""``python -m kvpress_rs.bench chunks``: reusable chunk caches on SmolLM2 (bf16), a prompt
of a chat header, ``--docs`` documents of ``--doc-tokens`` tokens (Paul Graham essays) and
a question:

- time to first token (median of ``--repeats`` after a warm-up): full prefill (one forward
  over the whole prompt) vs reuse (``ChunkStore.assemble`` from a local directory — read,
  checksum-verified, shifted, concatenated — then the question's forward) vs reuse +
  recomputation of 10% / 20% of the chunk tokens; the chunks are already stored, as when
  documents recur;
- disk bytes per chunk, uncompressed, evicted by a policy (``--policy``, ``--ratio``) and
  quantized (``--quant-bits``, pre-RoPE keys, ``--group-size``), and the time to first
  token of reuse from quantized chunks;
- a multi-document needle task: ``--docs`` documents of ``--needle-doc-tokens`` tokens, a
  passcode in one of them (each document in turn, at ``--depths``), answered greedily after
  full prefill, plain reuse, reuse + recomputation, and reuse of quantized chunks
  (``--needle-quant-bits``).

Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .measure import median_seconds

MARK = "\u2063DOCS\u2063"


def documents(tokenizer: Any, n_docs: int, doc_tokens: int, start: int = 0) -> list[str]:
    """``n_docs`` consecutive stretches of the essays of about ``doc_tokens`` tokens each."""
    from kvpress_rs.data import paul_graham_essays

    ids = tokenizer(paul_graham_essays(), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n_docs):
        lo = start + i * doc_tokens
        out.append(tokenizer.decode(ids[lo : lo + doc_tokens - 4]).strip() + "\n\n")
    return out


def with_needle(doc: str, passcode: str, depth: float) -> str:
    """The document with the needle sentence at the sentence boundary nearest ``depth``."""
    cut = int(len(doc) * depth)
    boundary = doc.rfind(". ", 0, cut)
    cut = boundary + 1 if boundary > 0 else cut
    return doc[:cut] + f" The secret passcode is {passcode}. Remember it. " + doc[cut:]


def prompt_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The chat header before the documents and the question after them, as ids."""
    from kvpress_rs.data import QUESTION

    rendered = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(MARK)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(QUESTION + after)


@torch.no_grad()
def first_token_full(model: Any, ids: torch.Tensor) -> int:
    from transformers import DynamicCache

    # logits of the last token only, as generate asks for them
    return int(model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1).logits[0, -1].argmax())


@torch.no_grad()
def first_token_reuse(model: Any, store: Any, prefix: list[int], docs: list[list[int]], question: list[int], ratio: float) -> int:
    cache = store.assemble(docs, prefix=prefix, recompute_ratio=ratio)
    return int(model(torch.tensor([question]), past_key_values=cache, logits_to_keep=1).logits[0, -1].argmax())


@torch.no_grad()
def answer(model: Any, tokenizer: Any, ids: torch.Tensor, cache: Any, max_new_tokens: int) -> str:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench chunks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recompute", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--policy", default="knorm")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio of the compressed chunks")
    parser.add_argument("--quant-bits", type=int, nargs="*", default=[4, 2], help="quantized chunk variants")
    parser.add_argument("--needle-quant-bits", type=int, nargs="*", default=[4])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.3, 0.7])
    parser.add_argument("--needle-doc-tokens", type=int, default=500,
                        help="document length of the needle task (SmolLM2-135M finds a needle at ~2K tokens of context)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--store", type=Path, default=None, help="chunk directory (default: a fresh temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/chunks.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import kvpress_rs
    from kvpress_rs.models import load_smollm2

    if args.threads:
        # On an oversubscribed machine, torch's intra-op thread pool can turn a 0.2 ms copy
        # into 90 ms (threads waiting for descheduled peers): fewer threads measure better.
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2(dtype="bfloat16")
    root = args.store or Path(tempfile.mkdtemp(prefix="kvpress_rs_chunks_"))
    store = kvpress_rs.ChunkStore(model, tokenizer, backend=root / "plain")
    qstores = {
        b: kvpress_rs.ChunkStore(model, tokenizer, backend=root / f"q{b}", quantization=kvpress_rs.QuantConfig(
            bits=b, group_size=args.group_size, residual_length=args.group_size))
        for b in sorted(set(args.quant_bits) | set(args.needle_quant_bits), reverse=True)
    }
    prefix, question = prompt_parts(tokenizer)
    texts = documents(tokenizer, args.docs, args.doc_tokens)
    docs = [store.token_ids(t).tolist() for t in texts]
    full_ids = torch.tensor([prefix + sum(docs, []) + question])
    n_tokens = full_ids.shape[1]
    print(f"prompt: {len(prefix)} header + {[len(d) for d in docs]} document + {len(question)} question tokens "
          f"= {n_tokens}; threads {torch.get_num_threads()}", flush=True)

    # -- time to first token ------------------------------------------------------------
    store.assemble(docs, prefix=prefix)  # the documents are stored before the timed runs
    reference = first_token_full(model, full_ids)
    ttft = {"full_prefill": median_seconds(lambda: first_token_full(model, full_ids), args.repeats)}
    same_first = {}
    for ratio in [0.0, *args.recompute]:
        name = "reuse" if ratio == 0 else f"reuse+recompute{int(round(ratio * 100))}%"
        run = lambda r=ratio: first_token_reuse(model, store, prefix, docs, question, r)  # noqa: E731
        ttft[name] = median_seconds(run, args.repeats)
        same_first[name] = run() == reference
    for b in args.quant_bits:
        name, qstore = f"reuse {b}-bit", qstores[b]
        qstore.assemble(docs, prefix=prefix)  # stored before the timed runs
        run = lambda q=qstore: first_token_reuse(model, q, prefix, docs, question, 0.0)  # noqa: E731
        ttft[name] = median_seconds(run, args.repeats)
        same_first[name] = run() == reference
    rows = []
    print(f"\n{'time to first token':<26} {'median s':>9} {'speed-up':>9} {'same 1st token':>15}")
    for name, seconds in ttft.items():
        speedup = ttft["full_prefill"] / seconds
        rows.append({"method": name, "ttft_s": seconds, "speedup": speedup, "same_first_token": same_first.get(name, True)})
        print(f"{name:<26} {seconds:>9.3f} {speedup:>8.2f}x {str(same_first.get(name, '-')):>15}", flush=True)

    # -- disk bytes per chunk -------------------------------------------------------------
    compressed = kvpress_rs.ChunkStore(model, tokenizer, backend=root / "compressed",
                                       compression={"policy": args.policy, "compression_ratio": args.ratio})
    sizes = []
    for d in docs:
        compressed.encode(d)
        sizes.append({"tokens": len(d), "plain": store.entry_nbytes(d), "compressed": compressed.entry_nbytes(d),
                      **{f"{b}-bit": qstores[b].entry_nbytes(d) for b in args.quant_bits}})
    plain_mean = statistics.mean(s["plain"] for s in sizes)
    comp_mean = statistics.mean(s["compressed"] for s in sizes)
    print(f"\ndisk bytes per chunk (~{args.doc_tokens} tokens): plain {plain_mean:,.0f} "
          f"({plain_mean / statistics.mean(s['tokens'] for s in sizes):,.0f}/token), {args.policy} {args.ratio}: "
          f"{comp_mean:,.0f} ({comp_mean / plain_mean:.3f} of plain)", flush=True)
    for b in args.quant_bits:
        q_mean = statistics.mean(s[f"{b}-bit"] for s in sizes)
        print(f"  quantized {b}-bit (pre-RoPE keys, group {args.group_size}): {q_mean:,.0f} "
              f"({q_mean / plain_mean:.3f} of plain)", flush=True)

    # -- multi-document needle ------------------------------------------------------------
    methods = ["full_prefill", "reuse", *[f"reuse+recompute{int(round(r * 100))}%" for r in args.recompute],
               *[f"reuse {b}-bit" for b in args.needle_quant_bits]]
    texts = documents(tokenizer, args.docs, args.needle_doc_tokens, start=args.docs * args.doc_tokens)
    docs = [store.token_ids(t).tolist() for t in texts]
    found = {m: 0 for m in methods}
    tasks = []
    for which in range(args.docs):
        for depth in args.depths:
            passcode = str(4817263 + 1111 * len(tasks))
            needle_docs = list(docs)
            needle_docs[which] = store.token_ids(with_needle(texts[which], passcode, depth)).tolist()
            ids = torch.tensor([prefix + sum(needle_docs, []) + question])
            answers = {"full_prefill": answer(model, tokenizer, ids, None, args.max_new_tokens)}
            for ratio in [0.0, *args.recompute]:
                name = "reuse" if ratio == 0 else f"reuse+recompute{int(round(ratio * 100))}%"
                cache = store.assemble(needle_docs, prefix=prefix, recompute_ratio=ratio)
                answers[name] = answer(model, tokenizer, ids, cache, args.max_new_tokens)
            for b in args.needle_quant_bits:
                cache = qstores[b].assemble(needle_docs, prefix=prefix)
                answers[f"reuse {b}-bit"] = answer(model, tokenizer, ids, cache, args.max_new_tokens)
            correct = {m: passcode in a.replace(",", "").replace(" ", "") for m, a in answers.items()}
            for m in methods:
                found[m] += correct[m]
            tasks.append({"doc": which, "depth": depth, "passcode": passcode, "answers": answers, "correct": correct})
            print(f"needle in doc {which} of {len(ids[0])} tokens at {depth}: " + ", ".join(f"{m} {'ok' if correct[m] else 'miss'}" for m in methods),
                  flush=True)
    print(f"\n{'needle accuracy':<26} {'found':>7}")
    for m in methods:
        print(f"{m:<26} {found[m]:>4}/{len(tasks)}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "prompt_tokens": n_tokens, "threads": torch.get_num_threads(), "ttft": rows, "disk_bytes": sizes,
        "needle": {"found": found, "tasks": tasks}, "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
