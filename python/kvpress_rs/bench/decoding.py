"""Decoding-time compression and block-wise prefill on SmolLM2-135M-Instruct (bf16).

Parts (``python -m kvpress_rs.bench decoding <part> [options]``):

- ``ppl``: perplexity of a teacher-forced Austen continuation (``--continuation`` tokens,
  default 4096) after a ``--prefix`` (default 1024) fed one token per forward through a
  cache held to ``--budget`` tokens (default 1024, interval 128), per policy, with the mean
  decode ms/token; the full cache (DynamicCache) and kvpress 0.5.5's ``DecodingPress``
  around the same-named scorer run in the same invocation (kvpress in its own venv, see
  ``kvpress_env.py``). TriAttention runs with statistics of the queries it sees
  (``online``) and, with ``--calibration FILE``, from a calibration file. With
  ``--quant-bits b`` every policy also runs over a b-bit quantized cache (``knorm+q4``:
  evictions keep the kept tokens' codes), and every row reports its KV bytes at the end.
- ``memory``: the prefill's peak memory above the loaded model (VmHWM reset after loading,
  one fresh process per run; on CUDA the allocator's peak) and peak cache bytes for
  ``--lengths`` prompts (default 8192 16384 32768), full prefill vs ``kvpress_rs.prefill``
  in blocks of ``--block`` tokens with ``--budget``. ``--config config.json`` builds the
  same architecture with random weights (memory does not depend on the weights' values)
  and ``--device cuda`` runs it on a GPU.
- ``needle``: answer accuracy of the needle task at ``--needle-length`` (8192) tokens,
  full cache vs block-wise prefill into SnapKV/TriAttention caches of ``--budget`` tokens.

Every figure is relative to a baseline measured in the same run. Results go to
``--out`` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

OURS = ["knorm", "streaming_llm", "snapkv", "expected_attention", "triattention"]
KVPRESS = ["knorm", "streaming_llm", "snapkv", "expected_attention"]  # DecodingPress-capable scorers


def austen(tokenizer: Any, n: int, start: int = 2000) -> list[int]:
    from kvpress_rs.data import austen_novels

    ids = tokenizer(austen_novels()[0], add_special_tokens=False)["input_ids"]
    if len(ids) < start + n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {start + n}")
    return ids[start : start + n]


def make_cache(model: Any, policy: str, budget: int, interval: int, calibration: str | None = None, window: int = 64) -> Any:
    import kvpress_rs
    from transformers import DynamicCache

    if policy == "full":
        return DynamicCache(config=model.config)
    kwargs: dict[str, Any] = {"decoding_budget": budget, "decoding_interval": interval, "protect_prompt": False}
    # "knorm+q4": the same policy over a 4-bit KIVI cache (keys per channel, values per token,
    # 128-token full-precision residual window); evictions keep the kept tokens' codes
    policy, _, bits = policy.partition("+q")
    if bits:
        kwargs["quantization"] = kvpress_rs.QuantConfig(bits=int(bits), group_size=32, residual_length=128)
    if policy.startswith("triattention") and calibration:
        kwargs["query_stats"] = calibration
    if policy.startswith("snapkv"):
        kwargs["window_size"] = window
    if policy == "snapkv:position":  # kvpress's pooling over storage neighbours, for comparison
        kwargs["decoding_pooling"] = "position"
    return kvpress_rs.KVCache(model, policy.split(":")[0], **kwargs)


@torch.no_grad()
def teacher_forced(model: Any, cache: Any, prefix: list[int], cont: list[int]) -> dict:
    """NLL of ``cont`` fed one token per forward after ``prefix``, and ms per step."""
    logits = model(torch.tensor([prefix]), past_key_values=cache).logits[0, -1].float()
    nll, seconds = 0.0, 0.0
    peak = 0
    for i, token in enumerate(cont):
        nll -= float(torch.log_softmax(logits, -1)[token])
        if i == len(cont) - 1:
            break
        start = time.perf_counter()
        logits = model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1].float()
        seconds += time.perf_counter() - start
        peak = max(peak, _stored(cache))
    return {"nll": nll, "tokens": len(cont), "ppl": float(torch.tensor(nll / len(cont)).exp()),
            "ms_per_token": 1000 * seconds / max(len(cont) - 1, 1), "max_cache_tokens_after_step": peak,
            "kv_bytes_at_end": _kv_bytes(cache)}


def _stored(cache: Any) -> int:
    layer = cache.layers[0]
    state = getattr(layer, "state", None)  # a kvpress_rs layer, quantized or not
    return int(state.stored) if state is not None else int(layer.keys.shape[-2])


def _kv_bytes(cache: Any) -> int:
    """Bytes of every layer's keys and values (codes, scales/zeros, … once quantized)."""
    nbytes = getattr(cache, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_ppl(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    from kvpress_rs.bench.kvpress_env import run_kvpress
    from kvpress_rs.models import smollm2_dir

    ids = austen(tokenizer, args.prefix + args.continuation, start=args.start)
    prefix, cont = ids[: args.prefix], ids[args.prefix :]
    policies = args.policies or OURS
    rows: dict[str, dict] = {}
    quantized = [f"{p}+q{args.quant_bits}" for p in policies] if args.quant_bits else []
    configs = ([] if args.no_full else ["full"]) + [*policies, *quantized] + (["triattention:calibrated"] if args.calibration else [])
    for name in configs:
        start = time.perf_counter()
        cache = make_cache(model, name, args.budget, args.interval, args.calibration if name.endswith("calibrated") else None,
                           args.window)
        rows[f"ours:{name}" if name != "full" else "full"] = teacher_forced(model, cache, prefix, cont)
        print(f"  ours {name:<26} ppl {rows.get('full' if name == 'full' else f'ours:{name}')['ppl']:8.3f}  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    kv = [p for p in policies if p in KVPRESS]
    if kv and not args.no_kvpress:
        request = {"kind": "decoding_ppl", "model_dir": str(smollm2_dir()), "dtype": "bfloat16",
                   "threads": torch.get_num_threads(), "prefix_ids": prefix, "continuation_ids": cont,
                   "presses": [{"name": p, "budget": args.budget, "interval": args.interval,
                                "params": {"window_size": args.window} if p == "snapkv" else {}} for p in kv]}
        for row in run_kvpress(request)["results"]:
            r = {"nll": row["nll"], "tokens": row["tokens"], "ppl": float(torch.tensor(row["nll"] / row["tokens"]).exp()),
                 "ms_per_token": row["ms_per_token"], "final_cache_tokens": row["final_cache_tokens"]}
            rows[f"kvpress:{row['press']['name']}"] = r
            print(f"  kvpress {row['press']['name']:<23} ppl {r['ppl']:8.3f}", flush=True)
    full = rows.get("full")
    print(f"\n{'config':<30}{'ppl':>9}{'/ full':>8}{'/ kvpress':>10}{'ms/tok':>9}{'x full ms':>10}{'KV MB':>8}{'/ full':>8}")
    for name, r in rows.items():
        # without the full cache (--no-full) the "/ full" columns read as 1.0 of nothing: NaN
        r["ppl_vs_full"] = r["ppl"] / full["ppl"] if full else float("nan")
        r["ms_vs_full"] = r["ms_per_token"] / full["ms_per_token"] if full else float("nan")
        # the same scorer's kvpress row ("ours:snapkv:position" is compared with kvpress:snapkv)
        twin = rows.get("kvpress:" + name.split(":")[1]) if name.startswith("ours:") else None
        r["ppl_vs_kvpress"] = r["ppl"] / twin["ppl"] if twin else None
        vs = f"{r['ppl_vs_kvpress']:10.3f}" if r["ppl_vs_kvpress"] else f"{'-':>10}"
        kv = r.get("kv_bytes_at_end")
        r["kv_bytes_vs_full"] = kv / full["kv_bytes_at_end"] if kv and full else None
        mem = f"{kv / 2**20:8.2f}{r['kv_bytes_vs_full'] or float('nan'):8.3f}" if kv else f"{'-':>8}{'-':>8}"
        print(f"{name:<30}{r['ppl']:9.3f}{r['ppl_vs_full']:8.3f}{vs}{r['ms_per_token']:9.1f}{r['ms_vs_full']:10.2f}{mem}")
    total = args.prefix + args.continuation
    return {"start": args.start, "prefix": args.prefix, "continuation": args.continuation, "budget": args.budget, "interval": args.interval,
            "full_cache_tokens_at_end": total, "x_smaller_cache": total / (args.budget + args.interval), "rows": rows}


def memory_one(length: int, mode: str, budget: int, block: int, config: str | None = None, device: str = "cpu") -> dict:
    """One run in a fresh process (ru_maxrss and the CUDA allocator's peak are high-water
    marks). With ``config`` (a SmolLM2 ``config.json``), the model is built from that
    configuration with random weights and the prompt is random ids: memory depends only on
    the architecture, the dtype and the token count, and the run needs neither the weights
    nor the text (this is how the GPU machine, which cannot receive the weights, runs it)."""
    import kvpress_rs
    from kvpress_rs.bench.measure import PeakMemory
    from kvpress_rs.cache import CompressedLayer

    if config is None:
        from kvpress_rs.models import load_smollm2

        model, tokenizer = load_smollm2("bfloat16")
        ids = torch.tensor([austen(tokenizer, length, start=0)])
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(config)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, length))
    model, ids = model.to(device), ids.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_cuda = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    peaks: dict[int, int] = {}
    attend = CompressedLayer.attend

    def recording(self, *a, **k):  # the cache's high-water mark: inside the forward, before compression
        peaks[self.layer_idx] = max(peaks.get(self.layer_idx, 0), self.state.nbytes)
        return attend(self, *a, **k)

    CompressedLayer.attend = recording
    start = time.perf_counter()
    try:
        with torch.no_grad(), PeakMemory(device) as above_loaded:
            if mode == "full":
                cache = kvpress_rs.KnormCache(model)  # compression_ratio 0: the full cache, no copy
                model(ids, past_key_values=cache, logits_to_keep=1)
            else:
                cache = kvpress_rs.KnormCache(model, decoding_budget=budget, decoding_interval=min(128, budget))
                kvpress_rs.prefill(model, ids, cache, block_size=block)
    finally:
        CompressedLayer.attend = attend
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"length": length, "mode": mode, "weights": "random (architecture only)" if config else "SmolLM2",
           # ru_maxrss after PeakMemory's VmHWM reset: the absolute resident peak during the prefill
           "device": device, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_prefill_mib": base / 1024,
           # the prefill's own peak: VmHWM reset after loading (ru_maxrss keeps the loading's peak)
           "peak_above_loaded_mib": None if above_loaded.bytes is None else above_loaded.bytes / 2**20,
           "peak_cache_bytes": sum(peaks.values()),
           "cache_bytes_after": cache.nbytes, "seconds": seconds}
    if device.startswith("cuda"):
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["cuda_before_prefill_mib"] = base_cuda / 2**20
    return row


def run_memory(args: argparse.Namespace) -> dict:
    rows = []
    for length in args.lengths:
        for mode in ("full", "block"):
            cmd = [sys.executable, "-m", "kvpress_rs.bench.decoding", "_memory_one", str(length), mode,
                   str(args.budget), str(args.block), args.config or "-", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:])
                rows.append({"length": length, "mode": mode, "error": done.stderr[-300:]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            cuda = f"  peak CUDA {row['peak_cuda_mib']:8.0f} MiB" if "peak_cuda_mib" in row else ""
            above = row.get("peak_above_loaded_mib")
            print(f"  {length:>6} {mode:<6} prefill peak {above if above is not None else float('nan'):8.0f} MiB above the loaded model"
                  f"  process RSS peak during the prefill {row['peak_rss_mib']:8.0f} MiB"
                  f"{cuda}  peak cache {row['peak_cache_bytes'] / 2**20:8.1f} MiB  ({row['seconds']:.0f}s)", flush=True)
    return {"budget": args.budget, "block": args.block, "config": args.config, "device": args.device, "rows": rows}


@torch.no_grad()
def run_needle(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    import kvpress_rs
    from kvpress_rs.data import needle_prompt
    from transformers import DynamicCache

    results = {}
    for name in ["full", *args.needle_policies]:
        found = 0
        for depth in args.depths:
            p = needle_prompt(tokenizer, context_tokens=args.needle_length, depth=depth)
            full = torch.cat([p.context_ids, p.question_ids], dim=1)  # the question is in the prompt
            if name == "full":
                cache = DynamicCache(config=model.config)
                model(full[:, :-1], past_key_values=cache)
            else:
                cache = kvpress_rs.KVCache(model, name, decoding_budget=args.budget, decoding_interval=128)
                kvpress_rs.prefill(model, full[:, :-1], cache, block_size=args.block)
            out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=cache, max_new_tokens=16,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            found += p.is_correct(tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True))
        results[name] = {"found": found, "tasks": len(args.depths)}
        print(f"  needle {args.needle_length} {name:<20} {found}/{len(args.depths)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_memory_one":
        config = None if argv[5] == "-" else argv[5]
        print(json.dumps(memory_one(int(argv[1]), argv[2], int(argv[3]), int(argv[4]), config, argv[6])))
        return {}
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench decoding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ppl", "memory", "needle", "all"])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=4096)
    parser.add_argument("--start", type=int, default=2000,
                        help="ppl: where the prefix starts in the first Austen novel (tokens; repeat at other starts "
                             "to see whether a difference between two policies is systematic)")
    parser.add_argument("--no-full", action="store_true", help="ppl: leave out the full-cache row")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--interval", type=int, default=128)
    parser.add_argument("--policies", nargs="+", default=None, help=f"default: {' '.join(OURS)}")
    parser.add_argument("--window", type=int, default=64, help="SnapKV window_size, both sides")
    parser.add_argument("--calibration", default=None, help="TriAttention calibration file (python -m kvpress_rs.calibrate)")
    parser.add_argument("--no-kvpress", action="store_true", help="leave out the kvpress 0.5.5 side")
    parser.add_argument("--quant-bits", type=int, default=None, choices=[2, 3, 4, 8],
                        help="ppl: also run every policy over a quantized cache at these bits ('knorm+q4'; "
                             "a policy spec like 'knorm+q4' in --policies works too)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--config", default=None,
                        help="memory: build the model from this config.json with random weights (architecture only)")
    parser.add_argument("--device", default="cpu", help="memory: where the model and the cache live")
    parser.add_argument("--needle-length", type=int, default=8192)
    parser.add_argument("--needle-policies", nargs="+", default=["snapkv", "triattention"])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_results/decoding.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"threads": torch.get_num_threads(), "args": vars(args)}
    parts = ["ppl", "memory", "needle"] if args.part == "all" else [args.part]
    model = tokenizer = None
    if parts != ["memory"]:
        from kvpress_rs.models import load_smollm2

        model, tokenizer = load_smollm2("bfloat16")
    for part in parts:
        print(f"\n== {part} ==", flush=True)
        if part == "ppl":
            results[part] = run_ppl(model, tokenizer, args)
        elif part == "memory":
            results[part] = run_memory(args)
        else:
            results[part] = run_needle(model, tokenizer, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
