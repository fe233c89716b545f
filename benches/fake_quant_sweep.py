"""Where 2-bit KV error comes from: fake quantization in plain torch, no kvpress_rs kernels.

A `DynamicCache` whose layers store the prefill quantized and dequantized (the prefill
itself attends in full precision, as our cache does); the 256 continuation tokens are fed
one per forward and kept in full precision. Perplexity after an Austen prefix, as
``python -m kvpress_rs.bench quant ppl`` measures it, for designs the real cache may not
offer yet: keys or values alone, per-tensor group sizes, value groups spanning whole tokens,
outliers on one tensor, an MSE clipping search. Used to choose what to build. 2026-11-29 at
2k: keys alone x1.193, values alone x1.011; G64 + pre-RoPE + Hadamard + 4 sinks x1.056;
keys G128 + one outlier with values over token pairs (2.34 bits) x1.169 — worse.

    python benches/fake_quant_sweep.py 2048 fp keys-only values-only g64+had+sinks

A configuration name may add per-layer options, ``BASE|0,1:kbits=4`` (``each|kbits=16|BASE``
runs BASE once per layer with that layer's options changed), and the real cache's window,
``BASE@R/B``: the continuation's tokens are quantized too as they leave a window of R
tokens in blocks of B (the prompt's last tokens wait in it). 2026-11-29, G64 + pre-RoPE +
Hadamard + 4 sinks: @128/128 (whole-window flushes, as the real cache then did) x1.086 at
2k and x1.133 at 6k — the real cache's x1.083 / x1.127; @128/64 x1.070 / x1.088;
@96/64 x1.083, @88/64 x1.085, @64/64 x1.107 (2k). Keeping one layer's keys exact changed
the 2k ratio by under 0.4% for each of the first three layers (no layer dominates).

Options of a configuration (``SWEEP``): ``kbits``/``vbits`` (16 = not quantized), ``kG``/
``vG`` group sizes (a value group larger than head_dim spans whole tokens), ``vgrp``
("token" or "channel"), ``had`` (Hadamard on keys and values; ``khad`` overrides it for
keys), ``pre`` (keys quantized before RoPE), ``sinks`` (first tokens exact and outside every
group), ``kout``/``vout`` (exact outliers per group, by distance to the median), ``clip``
(per-group range shrunk to minimise squared error).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress_rs.data import austen_novels
from kvpress_rs.models import load_smollm2

SHRINKS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]

SWEEP = {
    "fp": dict(kbits=16, vbits=16),
    "g64": dict(kbits=2, vbits=2, kG=64, vG=64),
    "g64+had": dict(kbits=2, vbits=2, kG=64, vG=64, had=True),
    "g64+had+clip": dict(kbits=2, vbits=2, kG=64, vG=64, had=True, clip=True),
    "keys-only": dict(kbits=2, vbits=16, kG=64, had=True),
    "values-only": dict(kbits=16, vbits=2, vG=64, had=True),
    "values-by-channel": dict(kbits=16, vbits=2, vG=64, vgrp="channel", had=True),
    "g64+had+sinks": dict(kbits=2, vbits=2, kG=64, vG=64, had=True, sinks=4),
    "g64+had+sinks+kout": dict(kbits=2, vbits=2, kG=64, vG=64, had=True, sinks=4, kout=1),
    "g64+pre+sinks": dict(kbits=2, vbits=2, kG=64, vG=64, had=True, khad=False, pre=True, sinks=4),
    "g64+pre+had+sinks": dict(kbits=2, vbits=2, kG=64, vG=64, had=True, pre=True, sinks=4),
    # within 2.5 bits per element: keys G128 + one outlier (2.44), values over token pairs (2.25)
    "k128+kout,v128+pre+had+sinks": dict(kbits=2, vbits=2, kG=128, vG=128, kout=1, had=True, pre=True, sinks=4),
}


def hadamard_matrix(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def quantize_rows(x: torch.Tensor, bits: int, clip: bool = False, outliers: int = 0) -> torch.Tensor:
    """Each row of x (..., G) through asymmetric min/max codes with float16 scale/zero."""
    if outliers:
        centre = x.median(-1, keepdim=True).values
        idx = (x - centre).abs().topk(outliers, -1).indices
        exact = x.gather(-1, idx)
        rest = quantize_rows(x.scatter(-1, idx, centre.expand_as(exact).contiguous()), bits, clip)
        return rest.scatter(-1, idx, exact)
    levels = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)

    def through(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zero = ((hi - lo) / levels).half().float(), lo.half().float()
        codes = ((x - zero) / scale.clamp_min(1e-30)).round().clamp(0, levels)
        return torch.where(scale > 0, codes * scale + zero, zero.expand_as(x))

    best = through(lo, hi)
    if clip:
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        err = (best - x).pow(2).sum(-1, keepdim=True)
        for shrink in SHRINKS[1:]:
            y = through(centre - shrink * half, centre + shrink * half)
            e = (y - x).pow(2).sum(-1, keepdim=True)
            best, err = torch.where(e < err, y, best), torch.minimum(e, err)
    return best


def by_channel(x: torch.Tensor, bits: int, g: int, **kw) -> torch.Tensor:
    """Groups of one channel over g tokens; a last partial group of ≥ 2 tokens too."""
    b, h, t, d = x.shape
    n = t // g * g
    body = x[:, :, :n].reshape(b, h, n // g, g, d).transpose(-1, -2)
    body = quantize_rows(body, bits, **kw).transpose(-1, -2).reshape(b, h, n, d)
    tail = x[:, :, n:]
    if tail.shape[2] > 1:
        tail = quantize_rows(tail.transpose(-1, -2), bits, **kw).transpose(-1, -2)
    return torch.cat([body, tail], 2)


def by_token(x: torch.Tensor, bits: int, g: int, **kw) -> torch.Tensor:
    """Groups of g consecutive elements in (token, channel) order: g/head_dim whole tokens
    when g > head_dim (a last incomplete group stays exact)."""
    b, h, t, d = x.shape
    n = t // max(1, g // d) * max(1, g // d)
    body = quantize_rows(x[:, :, :n].reshape(b, h, n * d // g, g), bits, **kw).reshape(b, h, n, d)
    return torch.cat([body, x[:, :, n:]], 2)


def fake_quantize(k: torch.Tensor, v: torch.Tensor, cfg: dict, rope, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens at positions first.. through the configuration's codes."""
    k, v = k.float(), v.float()
    if cfg["kbits"] >= 16 and cfg["vbits"] >= 16:
        return k, v
    hm = hadamard_matrix(k.shape[-1])
    had, khad = cfg.get("had", False), cfg.get("khad", cfg.get("had", False))
    if cfg["kbits"] < 16:
        if cfg.get("pre"):
            cos, sin = (t[:, None] for t in rope(k, torch.arange(first, first + k.shape[2])[None]))
            k = k * cos - rotate_half(k) * sin  # back to pre-RoPE
        x = k @ hm if khad else k
        x = by_channel(x, cfg["kbits"], cfg["kG"], clip=cfg.get("clip", False), outliers=cfg.get("kout", 0))
        k = x @ hm.T if khad else x
        if cfg.get("pre"):
            k = k * cos + rotate_half(k) * sin
    if cfg["vbits"] < 16:
        x = v @ hm if had else v
        grouping = by_channel if cfg.get("vgrp") == "channel" else by_token
        x = grouping(x, cfg["vbits"], cfg["vG"], clip=cfg.get("clip", False), outliers=cfg.get("vout", 0))
        v = x @ hm.T if had else x
    return k, v


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def cache_factory(model, cfg: dict):
    class FakeQuantizedLayer(DynamicLayer):
        def __init__(self, idx: int):
            super().__init__()
            self.cfg = {**cfg, **cfg.get("layer", {}).get(idx, {})}

        def update(self, keys, values, *args, **kwargs):
            if "window" in self.cfg:
                return self.update_windowed(keys, values, *args, **kwargs)
            if self.is_initialized or keys.shape[2] == 1:
                return super().update(keys, values, *args, **kwargs)
            s = self.cfg.get("sinks", 0)
            kq, vq = fake_quantize(keys[:, :, s:], values[:, :, s:], self.cfg, model.model.rotary_emb, s)
            super().update(torch.cat([keys[:, :, :s], kq.to(keys.dtype)], 2),
                           torch.cat([values[:, :, :s], vq.to(values.dtype)], 2), *args, **kwargs)
            return keys, values  # the prefill attends in full precision

        def update_windowed(self, keys, values, *args, **kwargs):
            """The real cache's window: once `residual` tokens wait in full precision, the
            oldest `block` of them are quantized (the prompt's too; the continuation's as
            they leave the window)."""
            prefill = not self.is_initialized
            k, v = super().update(keys, values, *args, **kwargs)
            residual, block = self.cfg["window"]
            if prefill:
                self.done = self.cfg.get("sinks", 0)
            while k.shape[2] - self.done >= max(residual, 1) and k.shape[2] - self.done >= block:
                span = slice(self.done, self.done + block)
                kq, vq = fake_quantize(k[:, :, span], v[:, :, span], self.cfg, model.model.rotary_emb, self.done)
                self.keys[:, :, span], self.values[:, :, span] = kq.to(k.dtype), vq.to(v.dtype)
                self.done += block
            return (keys, values) if prefill else (self.keys, self.values)

    def make():
        cache = DynamicCache(config=model.config)
        cache.layers = [FakeQuantizedLayer(i) for i in range(len(cache.layers))]
        return cache

    return make


@torch.no_grad()
def perplexity(model, tokenizer, make, n: int) -> float:
    ids = tokenizer(austen_novels()[0], add_special_tokens=False)["input_ids"][2000 : 2000 + n + 256]
    ids = torch.tensor([ids])
    prefix, cont = ids[:, :n], ids[:, n:]
    cache = make()
    logits = [model(prefix, past_key_values=cache).logits[:, -1:]]
    logits += [model(cont[:, i : i + 1], past_key_values=cache).logits for i in range(cont.shape[1] - 1)]
    return float(torch.nn.functional.cross_entropy(torch.cat(logits, 1).float()[0], cont[0]).exp())


def parse(name: str) -> dict:
    """``BASE`` or ``BASE|L,L:opt=v,opt=v|...``: layers L get their own options (e.g.
    ``g64+pre+had+sinks|0,1:kbits=4``)."""
    base, *parts = name.split("@")[0].split("|")
    cfg = {**SWEEP[base], "layer": {}}
    for part in parts:
        layers, opts = part.split(":")
        for idx in layers.split(","):
            cfg["layer"][int(idx)] = {k: int(v) for k, v in (o.split("=") for o in opts.split(","))}
    return with_window(cfg, name)


def with_window(cfg: dict, name: str) -> dict:
    """``...@R/B``: the real cache's residual window of R tokens leaving in blocks of B."""
    if "@" in name:
        r, b = name.split("@")[1].split("/")
        cfg["window"] = (int(r), int(b))
    return cfg


def expand(name: str, n_layers: int) -> list[str]:
    """``each|opt=v|BASE`` → one configuration per layer with that layer's options changed."""
    if not name.startswith("each|"):
        return [name]
    _, opts, base = name.split("|", 2)
    return [f"{base}|{i}:{opts}" for i in range(n_layers)]


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 2048
    model, tokenizer = load_smollm2()
    names = [e for name in argv[1:] or list(SWEEP) for e in expand(name, model.config.num_hidden_layers)]
    fp = perplexity(model, tokenizer, cache_factory(model, SWEEP["fp"]), n)
    for name in names:
        start = time.perf_counter()
        p = fp if name == "fp" else perplexity(model, tokenizer, cache_factory(model, parse(name)), n)
        print(f"{n} {name:<32} ppl {p:8.3f}  ratio {p / fp:.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
