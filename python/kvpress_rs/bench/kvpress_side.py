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


def timed_compress(press, log):
    """Records the seconds spent in every compress() call of the press (and wrappers)."""
    target = press
    original = target.compress

    def compress(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        log.append(time.perf_counter() - start)
        return out

    target.compress = compress


@torch.no_grad()
def run(request: dict) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(request.get("threads", torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=getattr(torch, request["dtype"]), attn_implementation=request.get("attn", "sdpa")
    ).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    for spec in request["presses"]:
        press = make_press(spec)
        for task in request["tasks"]:
            context = torch.tensor([task["context_ids"]])
            question = torch.tensor([task["question_ids"]])
            log: list[float] = []
            timed_compress(press, log)
            cache = DynamicCache()
            start = time.perf_counter()
            with press(model):
                model.model(input_ids=context, past_key_values=cache)
            prefill = time.perf_counter() - start
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
