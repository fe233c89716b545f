"""Our presses keep the tokens kvpress 0.5.5's presses of the same name keep.

Runs in kvpress's own environment (``make test-kvpress``: transformers 5.2, kvpress 0.5.5,
this checkout's ``python/`` on the path), on SmolLM2 in float32 and an Austen passage of
about 1,200 tokens. kvpress's presses gather kept keys unchanged, so each of its kept keys
is found among the full cache's keys by exact match, which gives its kept positions; ours
come from ``kvpress_rs.from_press(press, model).kept_positions(layer)``. The overlap of a press is the mean over layers
and KV heads of |ours ∩ kvpress| / |kvpress|; every press must reach 0.98. The overlaps
are written to ``bench_results/kept_agreement.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import DynamicCache  # noqa: E402

import kvpress_rs  # noqa: E402
from kvpress_rs.data import austen_novels  # noqa: E402
from kvpress_rs.models import load_smollm2  # noqa: E402

N_TOKENS = 1200
THRESHOLD = 0.98
OUT = Path(__file__).resolve().parent.parent / "bench_results" / "kept_agreement.json"
RESULTS: dict[str, float] = {}


def presses(ratio: float) -> dict:
    """Name -> kvpress press; ours is ``kvpress_rs.from_press`` of it."""
    p = kvpress
    return {
        "knorm": p.KnormPress(ratio),
        "streaming_llm": p.StreamingLLMPress(ratio),
        "snapkv": p.SnapKVPress(ratio),
        "tova": p.TOVAPress(ratio),
        "keydiff": p.KeyDiffPress(ratio),
        "lagkv": p.LagKVPress(ratio, lag_size=64),
        "expected_attention": p.ExpectedAttentionPress(ratio),
        "pyramidkv": p.PyramidKVPress(ratio),
        "chunkkv(snapkv)": p.ChunkKVPress(p.SnapKVPress(ratio)),
        "chunkkv(knorm)": p.ChunkKVPress(p.KnormPress(ratio)),
        "chunkkv(expected_attention)": p.ChunkKVPress(p.ExpectedAttentionPress(ratio), chunk_length=10),
        "composed([snapkv])": p.ComposedPress([p.SnapKVPress(ratio)]),
        "entropy_gated_chunkkv(snapkv)": p.EntropyGatedChunkKVPress(p.SnapKVPress(ratio)),
        "entropy_gated_chunkkv(knorm)": p.EntropyGatedChunkKVPress(p.KnormPress(ratio)),
    }


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_smollm2(dtype="float32")
    text = austen_novels()[0]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, 2000 : 2000 + N_TOKENS]
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    return model, ids, [layer.keys for layer in full.layers]


def kvpress_positions(kept: torch.Tensor, full: torch.Tensor) -> list[list[int]]:
    """Positions (per head) of kept keys (1, H, n, D) among full keys (1, H, T, D), exactly."""
    out = []
    for h in range(full.shape[1]):
        dist = torch.cdist(kept[0, h].double(), full[0, h].double(), compute_mode="donot_use_mm_for_euclid_dist")
        best = dist.argmin(-1)
        assert torch.all(dist.gather(-1, best[:, None]) == 0), "a kept key is not one of the prompt's keys"
        out.append(sorted(best.tolist()))
    return out


def overlap(ours: torch.Tensor, theirs: list[list[int]]) -> float:
    fractions = [len(set(ours[h].tolist()) & set(t)) / max(len(t), 1) for h, t in enumerate(theirs)]
    return sum(fractions) / len(fractions)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("name", list(presses(0.5)))
def test_kept_positions_agree_with_kvpress(setup, name, ratio):
    model, ids, full_keys = setup
    press = presses(ratio)[name]
    theirs_cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=theirs_cache)
    ours_cache = kvpress_rs.from_press(press, model)
    with torch.no_grad():
        model(ids, past_key_values=ours_cache)
    per_layer = []
    for layer, keys in enumerate(full_keys):
        theirs = kvpress_positions(theirs_cache.layers[layer].keys, keys)
        per_layer.append(overlap(ours_cache.kept_positions(layer)[0], theirs))
    value = sum(per_layer) / len(per_layer)
    RESULTS[f"{name}@{ratio}"] = round(value, 4)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"tokens": N_TOKENS, "overlap": RESULTS}, indent=1))
    print(f"{name} ratio {ratio}: overlap {value:.4f} (min layer {min(per_layer):.4f})")
    assert value >= THRESHOLD, (name, ratio, [round(x, 3) for x in per_layer])
