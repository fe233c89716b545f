"""The kept positions of every policy × budget on SmolLM2, as a regression fixture.

``python tests_py/kept_positions_fixture.py`` records them into
``tests_py/data/kept_positions_smollm2.json``; ``test_kept_positions.py`` recomputes them
and compares. The file was recorded before the press pipeline was rebuilt (issue 22), so
the test shows that the rebuild keeps exactly the tokens the earlier code kept. Positions
are stored as one SHA-256 per layer (a mismatch names the configuration and the layer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).with_name("data") / "kept_positions_smollm2.json"
N_TOKENS = 320
SCORERS = ["knorm", "streaming_llm", "random", "snapkv", "tova", "observed_attention", "keydiff", "lagkv",
           "expected_attention", "triattention", "cake"]


def configurations() -> dict[str, dict]:
    """Name -> KVCache keyword arguments (besides the model)."""
    configs: dict[str, dict] = {}
    for policy in SCORERS:
        extra = {"layer_budget": "cake"} if policy == "cake" else {}
        configs[f"{policy}/ratio0.5"] = {"policy": policy, "compression_ratio": 0.5, **extra}
        configs[f"{policy}/max_tokens100"] = {"policy": policy, "max_tokens": 100, **extra}
        if policy != "cake":
            configs[f"{policy}/pyramid"] = {"policy": policy, "compression_ratio": 0.5, "layer_budget": "pyramid"}
            configs[f"{policy}/cake_budget"] = {"policy": policy, "compression_ratio": 0.5, "layer_budget": "cake"}
        configs[f"{policy}/adakv"] = {"policy": policy, "compression_ratio": 0.5, "head_budget": "adakv", **extra}
    for policy in ("knorm", "snapkv", "tova", "observed_attention", "expected_attention", "triattention", "keydiff"):
        configs[f"{policy}/decoding"] = {"policy": policy, "decoding_budget": 192, "decoding_interval": 64, "protect_prompt": False,
                                         "generate": 80}
    return configs


def token_ids(tokenizer) -> list[int]:
    from kvpress_rs.data import paul_graham_essays

    return tokenizer(paul_graham_essays()[:4000], add_special_tokens=False).input_ids[:N_TOKENS]


def digests(cache, n_layers: int) -> list[str]:
    out = []
    for layer in range(n_layers):
        positions = cache.kept_positions(layer)
        if isinstance(positions, torch.Tensor):
            rows = [positions.reshape(-1, positions.shape[-1])[i] for i in range(positions.shape[0] * positions.shape[1])]
        else:  # AdaKV: per head, (batch, n) or per batch row
            rows = [r for head in positions for r in (head if isinstance(head, list) else list(head))]
        h = hashlib.sha256()
        for r in rows:
            h.update(str(r.tolist()).encode())
        out.append(h.hexdigest()[:16])
    return out


def kept(model, ids: torch.Tensor, config: dict) -> list[str]:
    import kvpress_rs

    config = dict(config)
    policy = config.pop("policy")
    n_new = config.pop("generate", 0)
    cache = kvpress_rs.KVCache(model, policy, **config)
    with torch.no_grad():
        if n_new:
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        else:
            model(ids, past_key_values=cache)
    return digests(cache, model.config.num_hidden_layers)


def record() -> None:
    from kvpress_rs.models import load_smollm2

    model, tokenizer = load_smollm2(dtype="float32")
    ids = token_ids(tokenizer)
    tensor = torch.tensor([ids])
    result = {"ids": ids, "dtype": "float32", "kept": {}}
    for name, config in configurations().items():
        result["kept"][name] = kept(model, tensor, config)
        print(name, result["kept"][name][:2])
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(result, indent=0) + "\n")


if __name__ == "__main__":
    record()
