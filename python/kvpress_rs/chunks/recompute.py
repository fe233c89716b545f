"""Selective recomputation of an assembled cache (after CacheBlend, Yao et al., 2024).

Reused chunks lack the attention of their tokens to the segments before them. Layer 0 is
exact anyway (a token's layer-0 KV depends on the token and its position only); from layer
1 on, each token's KV drifts from a full prefill's by how much it would have attended
across segments. The criterion, as CacheBlend:

1. probe: run the model over the whole assembled prompt through layers 0..``probe_layer``
   only (a forward stopped when layer probe_layer + 1 asks the cache for its keys; 2 of
   SmolLM2's 30 layers by default). Those layers now hold the exact KV of every token and
   replace the reused KV there.
2. choose: the ``n`` tokens (outside the first segment, which is exact) with the largest
   value deviation Σ_{head, channel} (v_fresh − v_reused)² at the probe layer
   (``_native.select_deviating``, Rust). Value rather than key deviation because the value
   is what a token contributes to later tokens' outputs, and it is what CacheBlend ranks by.
3. recompute: one forward of the chosen tokens only, at their global positions, attending
   over the assembled cache with a custom 4D mask: each chosen token sees the reused
   tokens before it (except the chosen ones, whose stale KV it replaces) and the chosen
   ones up to itself. Their fresh KV then overwrites theirs in every layer
   (``LayerStore.overwrite_tokens``, Rust).

Cost: the probe is (probe_layer + 1)/n_layers of a full prefill; the recompute forward is
the chosen fraction of one, with attention over the whole cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from .._native import select_deviating


class _ProbeDone(Exception):
    """Raised by the probe cache to stop the forward after the probe layer."""


class _ProbeCache(DynamicCache):
    """A DynamicCache that stops the forward when a layer past ``last_layer`` updates."""

    def __init__(self, config: Any, last_layer: int):
        super().__init__(config=config)
        self._last_layer = last_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx > self._last_layer:
            raise _ProbeDone
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def recompute(model: Any, cache: Any, n: int, candidates: torch.Tensor, probe_layer: int = 1) -> torch.Tensor:
    """Recomputes ``n`` tokens of the assembled ``cache`` in place (see the module doc);
    returns their positions (int64, ascending)."""
    ids = cache.input_ids.to(model.device)
    total = ids.shape[1]
    stores = cache.layer_states()
    probe = _ProbeCache(model.config, probe_layer)
    try:
        model(ids, past_key_values=probe, use_cache=True)
    except _ProbeDone:
        pass
    everything = torch.arange(total)
    reused_values = stores[probe_layer].values()
    fresh = [(probe.layers[i].keys, probe.layers[i].values) for i in range(probe_layer + 1)]
    chosen = select_deviating(reused_values, fresh[probe_layer][1], candidates, n) if n else everything[:0]
    for i, (k, v) in enumerate(fresh):
        stores[i].overwrite_tokens(everything.to(k.device), k, v)
    if n == 0:
        return chosen

    # The chosen tokens attend over the cache through a plain DynamicCache holding views of
    # the assembled keys/values (its update concatenates: the stores are not touched).
    work = DynamicCache(config=model.config)
    for i, store in enumerate(stores):
        work.update(store.keys(), store.values(), i)
    positions = chosen.to(model.device)
    dtype = next(model.parameters()).dtype
    cached_pos = torch.arange(total, device=model.device)
    stale = torch.zeros(total, dtype=torch.bool, device=model.device)
    stale[positions] = True
    sees_cached = (cached_pos[None, :] < positions[:, None]) & ~stale[None, :]
    sees_new = positions[None, :] <= positions[:, None]
    allowed = torch.cat([sees_cached, sees_new], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=model.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    model(
        ids[:, positions],
        attention_mask=mask[None, None],
        position_ids=positions[None, :],
        past_key_values=work,
        use_cache=True,
    )
    for i, store in enumerate(stores):
        k, v = work.layers[i].keys[:, :, total:], work.layers[i].values[:, :, total:]
        store.overwrite_tokens(positions, k, v)
    return chosen
