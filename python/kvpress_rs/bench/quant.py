"""``python -m kvpress_rs.bench quant <part> [options]``: quantized KV caches side by side with
the full-precision cache and transformers' ``QuantizedCache`` (optimum-quanto backend, when
installed: ``make bench-deps``), on SmolLM2-135M-Instruct in bfloat16, in one process.

Parts (``all`` runs every one):

- ``ppl``: perplexity of 256 teacher-forced continuation tokens after Austen prefixes
  (Emma, from token 2000 on). The prefix is the prefill (every cache attends in full
  precision there); the continuation is fed one token per forward, as ``generate`` feeds
  its tokens, so every cache holds what it would hold while decoding (ours: the last
  ``residual_length`` tokens in full precision, the rest quantized once). With
  ``--one-forward`` it is ONE forward of 255 tokens instead, where ours quantizes the
  continuation's own tokens (in blocks) before they are attended to — stricter than
  decoding. Printed as ratios to the fp cache, with the KV bytes held after the prefill and
  their mean and peak over the continuation's forwards (bf16 bytes / bytes).
- ``decode``: decode ms/token (median of ``--steps`` greedy steps after warm-up) after a
  prefill of each length, the configurations taking turns step by step; the cache's own
  cost is that minus the ms/token of a DynamicCache at a 128-token context in the same turns.
- ``kernels``: quantize and dequantize throughput on a (1, 8, 8192, 128) tensor against
  ``tensor.clone()`` of the same bytes, each kernel timed in alternation with clone()
  (medians of ``--repeats``; the clone() printed is the median over all of them).
- ``bytes``: KV bytes held after a prefill vs the formula (bits + 32/G)/16 of float16 for
  the quantized tokens plus the full-precision residual window and sinks.
- ``frontier``: memory-matched configurations (low bits with eviction, mixed precision,
  retrieval heads) at >= 10x less KV memory than the bf16 cache: bytes ratio, perplexity
  ratio and needle-in-a-haystack answers (5 depths per ``--passcodes``) at each length. The
  answer is opened with "The secret passcode is" (as RULER's needle tasks do;
  ``--no-answer-prefix`` leaves it to the model, which at 6K then misses most needles even
  with the full cache).

Example: ``python -m kvpress_rs.bench quant ppl --lengths 2048 6144``. Results are printed
and written as JSON (``--out``). Set ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824`` for stable timings (see the README).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from kvpress_rs.data import ANSWER_PREFIX, PASSCODE

from .measure import paired_median_seconds
from .specs import kv_bytes, quanto_available

BF16_NOTE = "SmolLM2-135M-Instruct, bfloat16, CPU"

# Our configurations: name -> QuantizedKVCache keyword arguments.
OURS = {
    "ours-8b": dict(bits=8),
    "ours-4b": dict(bits=4),
    "ours-4b-g128": dict(bits=4, group_size=128, value_grouping="channel"),  # head_dim 64 < 128
    "ours-3b": dict(bits=3),
    "ours-3b+had": dict(bits=3, hadamard=True),
    "ours-2b": dict(bits=2),
    "ours-2b-g64": dict(bits=2, group_size=64),
    "ours-2b-g64+had": dict(bits=2, group_size=64, hadamard=True),
    "ours-2b-g64+sink": dict(bits=2, group_size=64, sink_tokens=4),
    "ours-2b-g64+out": dict(bits=2, group_size=64, outlier_fraction=1 / 64),
    "ours-2b-g64+all": dict(bits=2, group_size=64, hadamard=True, sink_tokens=4, outlier_fraction=1 / 64),
    "ours-2b-g32+all": dict(bits=2, group_size=32, hadamard=True, sink_tokens=4, outlier_fraction=1 / 32),
    # At most quanto 2-bit's memory (2.5 bits per element): groups of 128 (both tensors
    # grouped per channel: head_dim 64 < 128), Hadamard, one exact outlier per group.
    "ours-2b-g128+had": dict(bits=2, group_size=128, value_grouping="channel", hadamard=True),
    "ours-2b-g128+had+out": dict(bits=2, group_size=128, value_grouping="channel", hadamard=True, outlier_fraction=1 / 128),
    "ours-2b-g64+had+out": dict(bits=2, group_size=64, hadamard=True, outlier_fraction=1 / 64),
    # Attention sinks kept exact: the first token's key stretches every channel group it is
    # in; 4 tokens cost +1.1% of quanto-2b's peak bytes at 2k.
    "ours-2b-g64+had+sink": dict(bits=2, group_size=64, hadamard=True, sink_tokens=4),
    # ... and keys quantized before RoPE too (rotated back per tile, then RoPE)
    "ours-2b-g64+pre+had+sink": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, sink_tokens=4),
    "ours-2b-g64+pre+had": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True),
    # with a 64-token full-precision window: at most quanto-2b's memory while decoding
    "ours-2b-g64+pre+had+sink-r64": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, sink_tokens=4,
                                         residual_length=64),
    # A sliding window at the same peak bytes: blocks of 64 leave the 128-token window, so
    # the 64 most recent tokens are always in full precision (a whole-window flush leaves
    # none right after it)
    "ours-2b-g64+pre+had+sink+b64": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, sink_tokens=4,
                                         block_length=64),
    "ours-2b-g64+pre+had+b64": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, block_length=64),
    # ... with a window of 92: 28..91 tokens + 4 sinks, on average the 63.5 full-precision
    # tokens quanto-2b holds (0..127)
    "ours-2b-g64+pre+had+sink+r92b64": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, sink_tokens=4,
                                            residual_length=92, block_length=64),
    # ... and 88 (24..87 + 4 sinks: 4 tokens fewer, for the positions and the cos/sin table)
    "ours-2b-g64+pre+had+sink+r88b64": dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True, sink_tokens=4,
                                            residual_length=88, block_length=64),
    "ours-2b-g64+had+b64": dict(bits=2, group_size=64, hadamard=True, block_length=64),
    # KVQuant: keys quantized before RoPE (per-channel outliers stay in their channels)
    "ours-4b+pre": dict(bits=4, pre_rope_keys=True),
    "ours-4b+pre+sink": dict(bits=4, pre_rope_keys=True, sink_tokens=4),
    "ours-4b+pre+out": dict(bits=4, pre_rope_keys=True, outlier_fraction=1 / 32),
    "ours-3b+pre": dict(bits=3, pre_rope_keys=True),
    "ours-3b+pre+sink": dict(bits=3, pre_rope_keys=True, sink_tokens=4),
    "ours-2b-g64+pre": dict(bits=2, group_size=64, pre_rope_keys=True),
    "ours-2b-g32+pre+out": dict(bits=2, group_size=32, pre_rope_keys=True, sink_tokens=4, outlier_fraction=1 / 32),
}

# Memory-matched configurations: name -> (policy, compression_ratio, QuantConfig kwargs,
# low_bits or None). No residual window (its allocation would dominate at 2k tokens).
FRONTIER = {
    "snapkv0.6+2b-g64+had": ("snapkv", 0.6, dict(bits=2, group_size=64, hadamard=True, sink_tokens=4, residual_length=0), None),
    "snapkv0.7+3b-g64+had": ("snapkv", 0.7, dict(bits=3, group_size=64, hadamard=True, sink_tokens=4, residual_length=0), None),
    "snapkv0.8+4b-g64": ("snapkv", 0.8, dict(bits=4, group_size=64, sink_tokens=4, residual_length=0), None),
    "mikv:snapkv0.5+4b/2b-g64": ("snapkv", 0.5, dict(bits=4, group_size=64, sink_tokens=4, residual_length=0), 2),
    "snapkv0.65+3b-pre": ("snapkv", 0.65, dict(bits=3, pre_rope_keys=True, sink_tokens=4, residual_length=0), None),
    "snapkv0.75+4b-pre": ("snapkv", 0.75, dict(bits=4, pre_rope_keys=True, sink_tokens=4, residual_length=0), None),
    "mikv:snapkv0.6+3b-pre/2b": ("snapkv", 0.6, dict(bits=3, pre_rope_keys=True, sink_tokens=4, residual_length=0), 2),
    # Issue 3's "ratio 0.5 with low-bit keeping of evicted tokens": half the tokens at 8
    # bits (near-lossless), the evicted half at 4 or 2 bits instead of dropped.
    "mikv:snapkv0.5+8b/4b": ("snapkv", 0.5, dict(bits=8, sink_tokens=4, residual_length=0), 4),
    "mikv:snapkv0.5+8b/2b": ("snapkv", 0.5, dict(bits=8, sink_tokens=4, residual_length=0), 2),
}


# Head-wise: the highest-scoring fraction of KV heads (retrieval_head_scores) keeps every
# token quantized; the others keep 4 sink tokens, SnapKV's heavy hitters and a window.
RETRIEVAL_HEADS = {
    # name -> (retrieval_fraction, window, heavy_hitters, QuantConfig kwargs)
    "heads0.3+3b-g64": (0.3, 64, 0, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.25+3b-g64+w48hh48": (0.25, 48, 48, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.25+3b-g64+w48hh64": (0.25, 48, 64, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.2+3b-g64+w48hh64": (0.2, 48, 64, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.3+3b-g64+w48hh64": (0.3, 48, 64, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.35+3b-g64+w48hh64": (0.35, 48, 64, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.35+3b-g64+w64hh128": (0.35, 64, 128, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    "heads0.25+3b-g64+w64hh256": (0.25, 64, 256, dict(bits=3, group_size=64, sink_tokens=4, residual_length=0)),
    # More heads at 2 bits (keys before RoPE, Hadamard): at 6k the 0.35 heads lose needles
    # even in full precision, so the budget goes to heads rather than bits.
    "heads0.5+2b-g64+pre+had+w48hh64": (0.5, 48, 64, dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True,
                                                          sink_tokens=4, residual_length=0)),
    "heads0.45+2b-g64+pre+had+w64hh128": (0.45, 64, 128, dict(bits=2, group_size=64, pre_rope_keys=True, hadamard=True,
                                                              sink_tokens=4, residual_length=0)),
}


def cache_factory(model: Any, name: str) -> Callable[[], Any]:
    """A function that builds a fresh cache of configuration ``name``."""
    import kvpress_rs
    from transformers import DynamicCache, QuantizedCache

    if name == "fp":
        return lambda: DynamicCache(config=model.config)
    if name.startswith("quanto-"):
        bits = int(name.split("-")[1].rstrip("b"))
        return lambda: QuantizedCache("quanto", model.config, nbits=bits)
    if name in OURS:
        return lambda: kvpress_rs.QuantizedKVCache(model, **OURS[name])
    if name in FRONTIER:
        policy, ratio, qkw, low_bits = FRONTIER[name]
        return lambda: kvpress_rs.KVCache(
            model, policy, compression_ratio=ratio, quantization=kvpress_rs.QuantConfig(**qkw), low_bits=low_bits
        )
    if name in RETRIEVAL_HEADS:
        fraction, window, heavy, qkw = RETRIEVAL_HEADS[name]
        return lambda: kvpress_rs.RetrievalHeadsCache(
            model, retrieval_fraction=fraction, window=window, sink_tokens=4, heavy_hitters=heavy,
            quantization=kvpress_rs.QuantConfig(**qkw),
        )
    known = ", ".join([*OURS, *FRONTIER, *RETRIEVAL_HEADS])
    raise SystemExit(f"unknown configuration {name!r}; known: fp, quanto-2b, quanto-4b, {known}")


def austen_ids(tokenizer: Any, n: int, start: int = 2000) -> torch.Tensor:
    from kvpress_rs.data import austen_novels

    ids = tokenizer(austen_novels()[0], add_special_tokens=False)["input_ids"]
    if len(ids) < start + n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {start + n}")
    return torch.tensor([ids[start : start + n]])


@torch.no_grad()
def perplexity(
    model: Any, make: Callable[[], Any], prefix: torch.Tensor, cont: torch.Tensor, stepwise: bool = True
) -> tuple[float, dict[str, float]]:
    """Perplexity of ``cont`` after ``prefix``, and the KV bytes held: after the prefill,
    and the mean and peak over the forwards of the continuation.

    ``stepwise``: the continuation is fed one token per forward, as ``generate`` feeds its
    tokens (each enters the cache as decoding would store it); otherwise in ONE forward,
    where a quantized cache quantizes the continuation's own tokens before they are
    attended to (stricter than decoding).

    The bytes after the prefill alone flatter a cache that quantizes the whole prompt
    (quanto) over one whose full-precision window holds the prompt's last tokens (ours with
    sink tokens: blocks start after the sinks); while decoding both windows fill and empty
    alike, so the mean and peak compare what each holds in use."""
    cache = make()
    last = model(prefix, past_key_values=cache).logits[:, -1:]
    held = [kv_bytes(cache)]
    rest = []
    steps = [cont[:, i : i + 1] for i in range(cont.shape[1] - 1)] if stepwise else [cont[:, :-1]]
    for ids in steps:
        rest.append(model(ids, past_key_values=cache).logits)
        held.append(kv_bytes(cache))
    logits = torch.cat([last, *rest], dim=1).float()
    nll = torch.nn.functional.cross_entropy(logits[0], cont[0])
    nbytes = {"after_prefill": held[0], "mean": statistics.fmean(held), "peak": max(held)}
    return float(nll.exp()), nbytes


def bf16_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2


def run_ppl(model: Any, tokenizer: Any, configs: list[str], lengths: list[int], stepwise: bool = True) -> dict:
    results: dict = {}
    per_token = bf16_bytes_per_token(model)
    for n in lengths:
        ids = austen_ids(tokenizer, n + 256)
        prefix, cont = ids[:, :n], ids[:, n:]
        # bf16 bytes of the tokens held at each forward: n after the prefill, then one more
        # per continuation forward.
        last = n + cont.shape[1] - 1
        held = list(range(n, last + 1)) if stepwise else [n, last]
        bf16_mean, bf16_peak = per_token * statistics.fmean(held), per_token * max(held)
        rows = {}
        for name in configs:
            start = time.perf_counter()
            ppl, nbytes = perplexity(model, cache_factory(model, name), prefix, cont, stepwise)
            rows[name] = {
                "ppl": ppl,
                "kv_bytes": nbytes["after_prefill"],
                "kv_bytes_mean": nbytes["mean"],
                "kv_bytes_peak": nbytes["peak"],
                "x_smaller_than_bf16": per_token * n / nbytes["after_prefill"],
                "x_smaller_mean": bf16_mean / nbytes["mean"],
                "x_smaller_peak": bf16_peak / nbytes["peak"],
            }
            print(
                f"  ppl {n:>6} {name:<26} {ppl:8.3f}  bytes/bf16 after prefill {nbytes['after_prefill'] / (per_token * n):.3f}"
                f" mean {nbytes['mean'] / bf16_mean:.3f} peak {nbytes['peak'] / bf16_peak:.3f}"
                f"  ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
        fp = rows.get("fp", {}).get("ppl")
        for row in rows.values():
            row["ppl_ratio"] = row["ppl"] / fp if fp else None
        results[n] = rows
    fed = "one token per forward" if stepwise else "in one forward"
    print(f"\nperplexity of 256 continuation tokens fed {fed} ({BF16_NOTE}); ratio to fp; KV memory x smaller than bf16"
          " after the prefill / on average over the continuation's forwards / at the peak")
    print(f"{'config':<26}" + "".join(f"{f'{n} ppl':>12}{'ratio':>8}{'x mem':>20}" for n in lengths))
    for name in configs:
        line = f"{name:<26}"
        for n in lengths:
            r = results[n][name]
            ratio = f"{r['ppl_ratio']:.3f}" if r["ppl_ratio"] else "-"
            mem = f"{r['x_smaller_than_bf16']:.2f}/{r['x_smaller_mean']:.2f}/{r['x_smaller_peak']:.2f}"
            line += f"{r['ppl']:12.3f}{ratio:>8}{mem:>20}"
        print(line)
    return results


@torch.no_grad()
def decode_ms(
    model: Any, runs: dict[str, tuple[Callable[[], Any], torch.Tensor]], steps: int, warmup: int = 3
) -> dict[str, float]:
    """Median ms of one greedy decode step for each ``name -> (cache factory, prefix)``,
    after its prefill. The configurations take turns step by step, so that the machine's
    drift (other processes, clock changes) falls on all of them alike."""
    caches = {name: make() for name, (make, _) in runs.items()}
    tokens = {
        name: model(prefix, past_key_values=caches[name]).logits[:, -1:].argmax(-1) for name, (_, prefix) in runs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, cache in caches.items():
            start = time.perf_counter()
            logits = model(tokens[name], past_key_values=cache).logits
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            tokens[name] = logits.argmax(-1)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_decode(model: Any, tokenizer: Any, configs: list[str], lengths: list[int], steps: int) -> dict:
    ids = austen_ids(tokenizer, max(lengths), start=0)
    base = "DynamicCache at 128"
    results: dict = {}
    for n in lengths:
        runs = {base: (cache_factory(model, "fp"), ids[:, :128])}
        runs.update({name: (cache_factory(model, name), ids[:, :n]) for name in configs})
        ms = decode_ms(model, runs, steps)
        print(f"  decode {n:>6} {base}: {ms[base]:.1f} ms/token (the model's own cost)", flush=True)
        rows = {}
        for name in configs:
            rows[name] = {"ms_per_token": ms[name], "cache_ms": ms[name] - ms[base]}
            print(f"  decode {n:>6} {name:<16} {ms[name]:7.1f} ms/token  cache's own {ms[name] - ms[base]:6.1f}", flush=True)
        fp = rows.get("fp")
        for row in rows.values():
            row["ratio_to_dynamic"] = row["ms_per_token"] / fp["ms_per_token"] if fp else None
        results[n] = {"model_ms_at_128": ms[base], "configs": rows}
    print(f"\ndecode ms/token ({BF16_NOTE}, median of {steps}, configurations in turn step by step); "
          "cache's own = minus the DynamicCache at 128 tokens of the same run")
    print(f"{'config':<16}" + "".join(f"{f'{n} ms':>10}{'own':>8}{'/fp':>7}" for n in lengths))
    for name in configs:
        line = f"{name:<16}"
        for n in lengths:
            r = results[n]["configs"][name]
            ratio = f"{r['ratio_to_dynamic']:.2f}" if r["ratio_to_dynamic"] else "-"
            line += f"{r['ms_per_token']:10.1f}{r['cache_ms']:8.1f}{ratio:>7}"
        print(line)
    return results


def run_kernels(repeats: int) -> dict:
    from kvpress_rs import ops

    results: dict = {}
    torch.manual_seed(0)
    print("\nquantize / dequantize throughput on (1, 8, 8192, 128), GB/s of the float tensor, ratio to clone()")
    print(f"{'dtype':<10}{'kernel':<28}{'quant GB/s':>12}{'/clone':>8}{'deq GB/s':>10}{'/clone':>8}")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, 8, 8192, 128).to(dtype)
        gb = x.nbytes / 1e9
        clones: list[float] = []
        rows: dict = {}
        kernels: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {}
        for bits in (2, 4):
            for grouping in ("channel", "token"):
                kernels[f"ours {bits}b {grouping} G32"] = (
                    lambda bits=bits, grouping=grouping: ops.quantize(x, bits=bits, group_size=32, grouping=grouping),
                    lambda q: q.dequantize(),
                )
        if quanto_available():
            from transformers.cache_utils import QuantoQuantizedLayer

            for bits in (2, 4):
                layer = QuantoQuantizedLayer(nbits=bits, axis_key=0, q_group_size=64)
                kernels[f"quanto {bits}b axis0 G64"] = (lambda layer=layer: layer._quantize(x, axis=0), lambda q: q.dequantize())
        for name, (quant, deq) in kernels.items():
            q = quant()
            # Each kernel alternates with clone() of the same bytes: the ratio is to the
            # copy's bandwidth at that moment (this machine's clone() drifts by 1.5x).
            sq, cq = paired_median_seconds(quant, lambda: x.clone(), repeats)
            sd, cd = paired_median_seconds(lambda: deq(q), lambda: x.clone(), repeats)
            tq, td = gb / sq, gb / sd
            clones += [gb / cq, gb / cd]
            rows[name] = {"quantize_gbps": tq, "dequantize_gbps": td, "quantize_vs_clone": cq / sq,
                          "dequantize_vs_clone": cd / sd, "clone_gbps_with_quantize": gb / cq,
                          "clone_gbps_with_dequantize": gb / cd}
            print(f"{str(dtype).split('.')[1]:<10}{name:<28}{tq:12.2f}{cq / sq:8.2f}{td:10.2f}{cd / sd:8.2f}")
        clone = statistics.median(clones)
        rows["clone_gbps"] = clone
        print(f"{str(dtype).split('.')[1]:<10}{'clone()':<28}{clone:12.2f}")
        results[str(dtype)] = rows
    return results


@torch.no_grad()
def run_bytes(model: Any, tokenizer: Any, lengths: list[int]) -> dict:
    import kvpress_rs

    results: dict = {}
    c = model.config
    fp16_per_token = bf16_bytes_per_token(model)  # bf16 and fp16 are both 2 bytes
    print("\nKV bytes held after a prefill vs the formula (bits + 32/G)/16 of fp16 for quantized tokens + fp tokens")
    print(f"{'config':<22}{'tokens':>8}{'measured':>12}{'formula':>12}{'ratio':>8}{'x vs bf16':>10}")
    for n in lengths:
        ids = austen_ids(tokenizer, n)
        for name in ("ours-4b", "ours-4b-g128", "ours-3b", "ours-2b", "ours-2b-g64", "ours-2b-g64+out"):
            cache = kvpress_rs.QuantizedKVCache(model, **OURS[name])
            model(ids, past_key_values=cache)
            s = cache.stats()
            cfg = cache.quant_config
            bits = cfg.bits + 32 / cfg.group_size  # the formula (outliers come on top)
            quantized = sum(s["quantized_tokens"])
            # sinks, and the tokens of the residual window (no spare capacity)
            full = sum(s["sink_tokens"]) + sum(s["residual_tokens"])
            per_layer_token = fp16_per_token / c.num_hidden_layers
            formula = quantized * per_layer_token * bits / 16 + full * per_layer_token
            measured = s["nbytes"]
            results.setdefault(n, {})[name] = {"measured": measured, "formula": formula, "ratio": measured / formula,
                                               "bits_per_element": bits, "x_smaller_than_bf16": fp16_per_token * n / measured}
            print(f"{name:<22}{n:>8}{measured:>12}{formula:>12.0f}{measured / formula:8.3f}{fp16_per_token * n / measured:10.2f}")
    return results


@torch.no_grad()
def needle(
    model: Any, tokenizer: Any, make: Callable[[], Any], length: int, depths: list[float], query_aware: bool,
    passcodes: tuple[str, ...] = (PASSCODE,), answer_prefix: str = "",
) -> dict[str, int]:
    """Needles found per passcode, over ``depths``."""
    from kvpress_rs.data import needle_prompt

    found = dict.fromkeys(passcodes, 0)
    for passcode, depth in itertools.product(passcodes, depths):
        p = needle_prompt(tokenizer, context_tokens=length, depth=depth, passcode=passcode, answer_prefix=answer_prefix)
        ctx, q = p.context_ids, p.question_ids
        if query_aware:  # the question is compressed with the context; its last token follows
            ctx, q = torch.cat([ctx, q[:, :-1]], dim=1), q[:, -1:]
        cache = make()
        model(ctx, past_key_values=cache)
        full = torch.cat([ctx, q], dim=1)
        out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=cache, max_new_tokens=24,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        found[passcode] += p.is_correct(tokenizer.decode(out[0, full.shape[1] :], skip_special_tokens=True))
    return found


def run_frontier(
    model: Any, tokenizer: Any, configs: list[str], lengths: list[int], depths: list[float], query_aware: bool,
    stepwise: bool = True, passcodes: tuple[str, ...] = (PASSCODE,), answer_prefix: str = "",
) -> dict:
    per_token = bf16_bytes_per_token(model)
    results: dict = {}
    for n in lengths:
        ids = austen_ids(tokenizer, n + 256)
        prefix, cont = ids[:, :n], ids[:, n:]
        fp_ppl, _ = perplexity(model, cache_factory(model, "fp"), prefix, cont, stepwise)
        rows = {}
        for name in configs:
            make = cache_factory(model, name)
            ppl, held = perplexity(model, make, prefix, cont, stepwise)
            nbytes = held["after_prefill"]
            per_passcode = needle(model, tokenizer, make, n, depths, query_aware, passcodes, answer_prefix)
            found, tasks = sum(per_passcode.values()), len(depths) * len(passcodes)
            rows[name] = {"ppl": ppl, "ppl_ratio": ppl / fp_ppl, "kv_bytes": nbytes,
                          "x_smaller_than_bf16": per_token * n / nbytes, "needle_found": found, "needle_tasks": tasks,
                          "needle_found_per_passcode": per_passcode}
            print(f"  frontier {n:>6} {name:<26} x{per_token * n / nbytes:5.2f} smaller  ppl x{ppl / fp_ppl:.3f}  "
                  f"needle {found}/{tasks} ({', '.join(map(str, per_passcode.values()))} of {len(depths)})", flush=True)
        results[n] = {"fp_ppl": fp_ppl, "configs": rows}
    print(f"\nfrontier ({BF16_NOTE}; needle {'question compressed with the context' if query_aware else 'question after compression'}"
          f"{f', answer opened with {answer_prefix!r}' if answer_prefix else ''})")
    print(f"{'config':<26}" + "".join(f"{f'{n} x mem':>11}{'ppl ratio':>10}{'needle':>8}" for n in lengths))
    for name in configs:
        line = f"{name:<26}"
        for n in lengths:
            r = results[n]["configs"][name]
            line += f"{r['x_smaller_than_bf16']:11.2f}{r['ppl_ratio']:10.3f}{r['needle_found']:>6}/{r['needle_tasks']}"
        print(line)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench quant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ppl", "decode", "kernels", "bytes", "frontier", "all"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="context lengths (default: 2048 6144; decode: 2048 6144 16384)")
    parser.add_argument("--configs", nargs="+", default=None, help="configurations (default: per part)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per configuration")
    parser.add_argument("--repeats", type=int, default=7, help="kernel timings per median")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--passcodes", nargs="+", default=[PASSCODE],
                        help="frontier needle: one run per passcode and depth (several passcodes tell a cache's "
                             "losses from the model's own misses at one)")
    parser.add_argument("--no-answer-prefix", action="store_true",
                        help="frontier needle: the answer starts right after the assistant header (default: opened "
                             "with data.ANSWER_PREFIX, as RULER does; without it the model itself misses most 6K needles)")
    parser.add_argument("--question-after", action="store_true",
                        help="frontier needle: compress the context alone (default: with the question)")
    parser.add_argument("--one-forward", action="store_true",
                        help="ppl/frontier: feed the continuation in one forward (default: one token per forward, "
                             "as generate does)")
    parser.add_argument("--threads", type=int, default=None, help="torch and rayon threads (default: theirs)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/quant.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from .measure import set_threads

    set_threads(args.threads)  # torch's and rayon's: our kernels and clone() on the same cores
    quanto = ["quanto-2b", "quanto-4b"] if quanto_available() else []
    if not quanto:
        print("optimum-quanto is not importable: the quanto columns are left out (make bench-deps installs it)")
    results: dict = {"note": BF16_NOTE, "threads": torch.get_num_threads()}
    parts = ["kernels", "bytes", "ppl", "decode", "frontier"] if args.part == "all" else [args.part]
    model = tokenizer = None
    if parts != ["kernels"]:
        from kvpress_rs.models import load_smollm2

        model, tokenizer = load_smollm2("bfloat16")
    for part in parts:
        lengths = args.lengths or ([2048, 6144, 16384] if part == "decode" else [2048, 6144])
        print(f"\n== {part} ==", flush=True)
        if part == "kernels":
            results[part] = run_kernels(args.repeats)
        elif part == "bytes":
            results[part] = run_bytes(model, tokenizer, lengths)
        elif part == "ppl":
            configs = args.configs or ["fp", *OURS, *quanto]
            results[part] = run_ppl(model, tokenizer, configs, lengths, not args.one_forward)
        elif part == "decode":
            configs = args.configs or ["fp", "ours-4b", "ours-2b-g64", *quanto[1:]]
            results[part] = run_decode(model, tokenizer, configs, lengths, args.steps)
        else:
            configs = args.configs or ["fp", *quanto, *FRONTIER, "heads0.25+3b-g64+w48hh48", "heads0.25+3b-g64+w64hh256"]
            results[part] = run_frontier(model, tokenizer, configs, lengths, args.depths, not args.question_after,
                                         not args.one_forward, tuple(args.passcodes),
                                         "" if args.no_answer_prefix else ANSWER_PREFIX)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten to {args.out}")
    return results


if __name__ == "__main__":
    main()
