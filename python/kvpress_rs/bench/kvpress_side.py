"""Runs NVIDIA kvpress 0.5.5 presses on the same inputs as kvpress_rs, in kvpress's own
environment (transformers 5.2, kvpress importable; importing kvpress patches transformers'
attention globally, hence a separate process). Invoked by the benchmarks as

    python kvpress_side.py request.json result.json

This file imports neither kvpress_rs nor anything outside torch/transformers/kvpress: it is
run by path. The request names the local model folder, the mode (``needle``: answers to
needle tasks; ``ppl``: teacher-forced log-likelihoods through the decode path; ``speed``:
prefill, compression, decode and memory per context length), its inputs (token ids) and the
presses; the result holds one record per press and input.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def make_press(spec: dict):
    import kvpress

    name, ratio = spec["name"], spec["compression_ratio"]
    params = spec.get("params", {})
    simple = {
        "knorm": kvpress.KnormPress,
        "streaming_llm": kvpress.StreamingLLMPress,
        "random": kvpress.RandomPress,
        "snapkv": kvpress.SnapKVPress,
        "tova": kvpress.TOVAPress,
        "observed_attention": kvpress.ObservedAttentionPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
        "keydiff": kvpress.KeyDiffPress,
        "lagkv": kvpress.LagKVPress,
        "pyramidkv": kvpress.PyramidKVPress,
    }
    if name in simple:
        return simple[name](compression_ratio=ratio, **params)
    if name.startswith("adakv:"):
        return kvpress.AdaKVPress(simple[name.split(":", 1)[1]](compression_ratio=ratio, **params))
    if name.startswith("chunkkv:"):
        return kvpress.ChunkKVPress(simple[name.split(":", 1)[1]](compression_ratio=ratio, **params))
    raise ValueError(f"no kvpress press for {name!r}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_compress(press, log, clock=time.perf_counter):
    """Records the seconds spent in every compress() call of the press (and wrappers)."""
    target = press
    original = target.compress

    def compress(*args, **kwargs):
        start = clock()
        out = original(*args, **kwargs)
        log.append(clock() - start)
        return out

    target.compress = compress


def peak_rss_reset():
    """Resets the process's peak resident set to the current one (after returning freed
    heap memory to the OS, as kvpress_rs.bench.measure.PeakMemory does); returns it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        open("/proc/self/clear_refs", "w").write("5")
        return rss("VmRSS")
    except OSError:
        return None


def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def kv_bytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def prefill(model, press, ids, clock, device):
    """Prefill with the press active; returns the cache, the last logits, the seconds of
    the prefill and of each compress() call."""
    from transformers import DynamicCache

    log = []
    timed_compress(press, log, clock)
    cache = DynamicCache()
    sync(device)
    start = clock()
    with press(model):
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    sync(device)
    return cache, out.logits[0, -1], clock() - start, log


def run_needle(model, request, spec, clock, device, eos):
    results = []
    for task in request["tasks"]:
        context = torch.tensor([task["context_ids"]], device=device)
        question = torch.tensor([task["question_ids"]], device=device)
        cache, _, seconds, log = prefill(model, make_press(spec), context, clock, device)
        n_ctx = context.shape[1]
        nbytes = kv_bytes(cache)
        answer = []
        if request.get("max_new_tokens", 0) > 0:
            pos = torch.arange(n_ctx, n_ctx + question.shape[1], device=device)[None]
            out = model(input_ids=question, past_key_values=cache, position_ids=pos, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            answer.append(int(token))
            next_pos = pos[:, -1:] + 1
            for i in range(request["max_new_tokens"] - 1):
                out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=next_pos + i)
                token = out.logits[0, -1].argmax()
                answer.append(int(token))
                if int(token) in eos:
                    break
        results.append({"press": spec, "task": task.get("name"), "answer_ids": answer, "compress_seconds": log,
                        "prefill_seconds": seconds, "kv_bytes": nbytes})
    return results


def run_ppl(model, request, spec, clock, device):
    """Teacher-forced negative log-likelihood of each continuation, one decode step per
    token after a compressed prefill of the prefix."""
    results = []
    for sample in request["samples"]:
        prefix = torch.tensor([sample["prefix_ids"]], device=device)
        cont = sample["continuation_ids"]
        cache, logits, _, _ = prefill(model, make_press(spec), prefix, clock, device)
        nbytes = kv_bytes(cache)
        nll = []
        n = prefix.shape[1]
        for i, token in enumerate(cont):
            nll.append(float(-torch.log_softmax(logits.float(), -1)[token]))
            if i + 1 < len(cont):
                pos = torch.tensor([[n + i]], device=device)
                logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, position_ids=pos).logits[0, -1]
        results.append({"press": spec, "sample": sample["name"], "nll": nll, "kv_bytes": nbytes})
    return results


def run_speed(model, request, spec, clock, device):
    """Per context: prefill seconds and compression seconds (medians of ``repeats``), decode
    ms/token (median of ``steps`` greedy steps after 2 untimed ones), peak memory above the
    level before the prefill, KV bytes after it."""
    import statistics

    results = []
    for ctx in request["contexts"]:
        ids = torch.tensor([ctx["ids"]], device=device)
        n = ids.shape[1]
        prefill(model, make_press(spec), ids[:, : min(n, 256)], clock, device)  # warm-up
        prefills, compress = [], []
        for _ in range(request["repeats"]):
            cache, logits, seconds, log = prefill(model, make_press(spec), ids, clock, device)
            prefills.append(seconds)
            compress.append(sum(log))
            del cache
        base = peak_rss_reset() if not str(device).startswith("cuda") else None
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        cache, logits, _, _ = prefill(model, make_press(spec), ids, clock, device)
        nbytes = kv_bytes(cache)
        token = logits.argmax()
        steps = []
        for i in range(request["steps"] + 2):
            sync(device)
            start = clock()
            out = model(input_ids=token.view(1, 1), past_key_values=cache,
                        position_ids=torch.tensor([[n + i]], device=device))
            token = out.logits[0, -1].argmax()
            sync(device)
            if i >= 2:
                steps.append(clock() - start)
        if str(device).startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() - base
        else:
            hwm = rss("VmHWM")
            peak = None if base is None or hwm is None else max(0, hwm - base)
        results.append({"press": spec, "length": ctx["length"], "prefill_seconds": statistics.median(prefills),
                        "compress_seconds": statistics.median(compress), "decode_ms": statistics.median(steps) * 1e3,
                        "peak_bytes": peak, "kv_bytes": nbytes})
    return results


@torch.no_grad()
def run_decoding_ppl(request: dict, model) -> dict:
    """Teacher-forced perplexity of ``continuation_ids`` after ``prefix_ids``, fed one token
    per forward through kvpress's DecodingPress around each named scorer (the prefix is not
    compressed: DecodingPress acts in decoding steps only), and the mean ms per step."""
    import kvpress
    from transformers import DynamicCache

    prefix = torch.tensor([request["prefix_ids"]])
    cont = request["continuation_ids"]
    rows = []
    for spec in request["presses"]:
        base = make_press({"name": spec["name"], "compression_ratio": 0.0, "params": spec.get("params", {})})
        press = kvpress.DecodingPress(
            base_press=base, compression_interval=spec["interval"], target_size=spec["budget"],
            hidden_states_buffer_size=spec.get("buffer", 256),
        )
        cache = DynamicCache()
        nll, steps, seconds = 0.0, 0, 0.0
        with press(model):
            logits = model(input_ids=prefix, past_key_values=cache).logits[0, -1].float()
            for i, token in enumerate(cont):
                nll -= float(torch.log_softmax(logits, -1)[token])
                if i == len(cont) - 1:
                    break
                pos = torch.tensor([[prefix.shape[1] + i]])
                start = time.perf_counter()
                logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=pos).logits[0, -1].float()
                seconds += time.perf_counter() - start
                steps += 1
        rows.append({"press": spec, "nll": nll, "tokens": len(cont), "ms_per_token": 1000 * seconds / max(steps, 1),
                     "final_cache_tokens": int(cache.layers[0].keys.shape[-2])})
    return {"results": rows}


@torch.no_grad()
def run_overhead(model, request, clock, device):
    """Whole forwards of each input (logits of the last token only), plain and under each
    press, every one once per round: what a press adds to its forward."""
    from transformers import DynamicCache

    def forward(ids, spec=None):
        cache = DynamicCache()
        sync(device)
        start = clock()
        if spec is None:
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        else:
            with make_press(spec)(model):
                model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        sync(device)
        return clock() - start

    out = []
    for ids_list in request["inputs"]:
        ids = torch.tensor([ids_list], device=device)
        forward(ids)
        for spec in request["presses"]:  # warm-up
            forward(ids, spec)
        seconds = {"plain": [], **{spec["ours"]: [] for spec in request["presses"]}}
        for _ in range(request.get("rounds", 5)):
            seconds["plain"].append(forward(ids))
            for spec in request["presses"]:
                seconds[spec["ours"]].append(forward(ids, spec))
        out.append({"tokens": len(ids_list), "seconds": seconds})
    return out


@torch.no_grad()
def run(request: dict) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(request.get("threads", torch.get_num_threads()))
    if request.get("kind") == "decoding_ppl":
        model = AutoModelForCausalLM.from_pretrained(
            request["model_dir"], dtype=getattr(torch, request["dtype"]), attn_implementation=request.get("attn", "sdpa")
        ).eval()
        return run_decoding_ppl(request, model)
    clock = CLOCKS[request.get("clock", "wall")]
    device = request.get("device", "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=getattr(torch, request["dtype"]), attn_implementation=request.get("attn", "sdpa")
    ).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    mode = request.get("mode", "needle")
    if mode == "overhead":
        return {"results": run_overhead(model, request, clock, device), "errors": []}
    if mode == "needle" and request["presses"] and request["tasks"]:  # warm-up: first-call allocations, kernel choice
        with make_press(request["presses"][0])(model):
            model.model(input_ids=torch.tensor([request["tasks"][0]["context_ids"][:512]], device=device))
    runners = {"needle": lambda spec: run_needle(model, request, spec, clock, device, eos),
               "ppl": lambda spec: run_ppl(model, request, spec, clock, device),
               "speed": lambda spec: run_speed(model, request, spec, clock, device)}
    if mode not in runners:
        raise ValueError(f"unknown mode {mode!r}")
    results, errors = [], []
    for spec in request["presses"]:
        try:
            results += runners[mode](spec)
        except Exception as e:  # one press failing (a kvpress limitation) must not lose the others' results
            errors.append({"press": spec, "error": f"{type(e).__name__}: {e}"[:500]})
    return {"results": results, "errors": errors, "transformers": __import__("transformers").__version__,
            "kvpress": __import__("kvpress").__version__ if hasattr(__import__("kvpress"), "__version__") else "0.5.5"}


if __name__ == "__main__":
    request = json.loads(open(sys.argv[1]).read())
    json.dump(run(request), open(sys.argv[2], "w"))
