"""Runs NVIDIA kvpress 0.5.5 presses on the same inputs as kvpress_rs, in kvpress's own
environment (transformers 5.2, kvpress importable; importing kvpress patches transformers'
attention globally, hence a separate process). Invoked by the benchmarks as

    python kvpress_side.py request.json result.json

This file imports neither kvpress_rs nor anything outside torch/transformers/kvpress: it is
run by path. The request names the local model folder, the tasks (token ids) and the
presses; the result holds, per press and task, the answer tokens, the kept-token counts
and the time spent in each layer's compression.
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
def run(request: dict) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(request.get("threads", torch.get_num_threads()))
    if request.get("kind") == "decoding_ppl":
        model = AutoModelForCausalLM.from_pretrained(
            request["model_dir"], dtype=getattr(torch, request["dtype"]), attn_implementation=request.get("attn", "sdpa")
        ).eval()
        return run_decoding_ppl(request, model)
    clock = CLOCKS[request.get("clock", "wall")]
    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=getattr(torch, request["dtype"]), attn_implementation=request.get("attn", "sdpa")
    ).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    if request["presses"] and request["tasks"]:  # warm-up: first-call allocations, kernel choice
        with make_press(request["presses"][0])(model):
            model.model(input_ids=torch.tensor([request["tasks"][0]["context_ids"][:512]]), past_key_values=DynamicCache())
    for spec in request["presses"]:
        press = make_press(spec)
        for task in request["tasks"]:
            context = torch.tensor([task["context_ids"]])
            question = torch.tensor([task["question_ids"]])
            log: list[float] = []
            timed_compress(press, log, clock)
            cache = DynamicCache()
            start = clock()
            with press(model):
                model.model(input_ids=context, past_key_values=cache)
            prefill = clock() - start
            n_ctx = context.shape[1]
            answer = []
            if request.get("max_new_tokens", 0) > 0:
                pos = torch.arange(n_ctx, n_ctx + question.shape[1])[None]
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
            results.append(
                {
                    "press": spec,
                    "task": task.get("name"),
                    "answer_ids": answer,
                    "compress_seconds": log,
                    "prefill_seconds": prefill,
                }
            )
            press = make_press(spec)
    return {"results": results, "transformers": __import__("transformers").__version__,
            "kvpress": __import__("kvpress").__version__ if hasattr(__import__("kvpress"), "__version__") else "0.5.5"}


if __name__ == "__main__":
    request = json.loads(open(sys.argv[1]).read())
    json.dump(run(request), open(sys.argv[2], "w"))
