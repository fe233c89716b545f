"""Left-padded batches: every row of a batch is scored, budgeted and attended over its own
tokens, so it keeps the positions it keeps alone (shifted by its padding) and generates the
same tokens; at ratio 0 a padded batch is DynamicCache token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kvpress_rs

from conftest import random_ids, tiny_llama_config
from settings import REGISTRY

LENGTHS = (44, 31, 19)  # three prompts of different lengths, left-padded to 44
NEW = 6


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # head_dim 32: quantization groups of 32 channels fit
        model = LlamaForCausalLM(tiny_llama_config(hidden_size=128))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
        ))
    return model.eval()


def prompts(vocab: int, seed: int = 7) -> list[torch.Tensor]:
    return [random_ids(1, n, vocab=vocab, seed=seed + i) for i, n in enumerate(LENGTHS)]


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1]:] = r[0]
        mask[b, width - r.shape[1]:] = 1
    return ids, mask


def generate(model, ids, mask, cache, n=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def real_positions(cache, layer: int, row: int, pad: int) -> list:
    """Row `row`'s kept original positions in layer `layer`, shifted by its padding: one
    sorted list per KV head (hidden slots, −1, left out)."""
    state = cache.layers[layer].state
    positions = state.kept_positions()
    batch, heads = state.batch_heads
    if isinstance(positions, torch.Tensor):
        per_head = [positions[row, h] for h in range(heads)]
    else:
        per_head = [positions[row * heads + h] for h in range(heads)]
    return [[int(p) - pad for p in head if p >= 0] for head in per_head]


def check_rows_as_alone(model, make_cache, rows: list[torch.Tensor], layers: int):
    ids, mask = left_padded(rows)
    batch_cache = make_cache()
    batch_out = generate(model, ids, mask, batch_cache)
    for b, row in enumerate(rows):
        pad = ids.shape[1] - row.shape[1]
        alone_cache = make_cache()
        alone_out = generate(model, row, torch.ones_like(row), alone_cache)
        assert torch.equal(batch_out[b, ids.shape[1]:], alone_out[0, row.shape[1]:]), f"row {b} generates otherwise"
        for layer in range(layers):
            assert real_positions(batch_cache, layer, b, pad) == real_positions(alone_cache, layer, 0, 0), (
                f"row {b}, layer {layer} keeps other positions"
            )
    return ids, mask, batch_out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("policy", list(REGISTRY))
def test_each_padded_row_keeps_and_generates_what_it_does_alone(kind, ratio, policy):
    model = tiny(kind)
    spec = REGISTRY[policy]
    make = lambda: spec.cache_class(model, compression_ratio=ratio, **spec.easy)  # noqa: E731
    ids, mask, out = check_rows_as_alone(model, make, prompts(128), 3)
    if ratio == 0.0:
        assert torch.equal(out, generate(model, ids, mask, DynamicCache(config=model.config)))


def test_pads_are_never_kept_while_a_real_token_is_evicted():
    """The issue's case: Knorm at 0.5 on rows of 120 and 70 tokens; pads score lowest."""
    model = tiny("llama")
    rows = [random_ids(1, 120, seed=1), random_ids(1, 70, seed=2)]
    ids, mask = left_padded(rows)
    # pads with small keys would win Knorm's ranking (score −‖k‖) if they were scored
    cache = kvpress_rs.KnormCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    for layer in range(3):
        state = cache.layers[layer].state
        positions = state.kept_positions()
        assert (positions[1] >= 50).logical_or(positions[1] == -1).all()  # no pad position (0..49) kept
        assert int((positions[1, 0] >= 0).sum()) == 35 and int((positions[0, 0] >= 0).sum()) == 60
        assert state.hidden == [0, 25]  # the short row keeps 35 real tokens, padded to 60 by 25 slots


@pytest.mark.parametrize("options", [
    dict(decoding_budget=24, decoding_interval=8),
    dict(compression_ratio=0.5, rerotate=True),
    dict(compression_ratio=0.5, quantization=kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=32)),
    dict(compression_ratio=0.5, quantization=kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=32), low_bits=4),
], ids=["decoding", "rerotate", "quantized", "low_bits"])
def test_padded_rows_generate_as_alone_with_every_cache_option(options):
    model = tiny("llama")
    make = lambda: kvpress_rs.SnapKVCache(model, window_size=4, **options)  # noqa: E731
    rows = prompts(128)
    ids, mask = left_padded(rows)
    out = generate(model, ids, mask, make(), n=30)
    for b, row in enumerate(rows):
        alone = generate(model, row, torch.ones_like(row), make(), n=30)
        assert torch.equal(out[b, ids.shape[1]:], alone[0, row.shape[1]:]), f"row {b}"


def test_decoding_compression_of_a_quantized_padded_batch_keeps_each_rows_budget_and_no_pad():
    """A quantized store pads rows with their hidden slots only (no filler slots): while
    another row keeps more, a row keeps more of its own tokens than alone — never fewer
    than its budget, never a pad."""
    model = tiny("llama")
    q = kvpress_rs.QuantConfig(bits=8, group_size=32, residual_length=32)
    rows = prompts(128)
    ids, mask = left_padded(rows)
    budget, interval = 40, 16
    cache = kvpress_rs.SnapKVCache(model, window_size=4, decoding_budget=budget, decoding_interval=interval,
                                   quantization=q)
    out = generate(model, ids, mask, cache, n=60)
    assert out.shape[1] == ids.shape[1] + 60
    for layer in cache.layer_states():
        assert layer.is_quantized and layer.quantized_stats()["evicted"] > 0
        stored = layer.stored
        for b, row in enumerate(rows):
            visible = stored - layer.hidden[b]
            assert min(budget, row.shape[1] + 59) <= visible <= budget + interval
            assert layer.hidden[b] <= ids.shape[1] - row.shape[1]  # hidden slots are the row's pads only


def test_padded_rows_with_retrieval_heads_and_quantized_caches_generate_as_alone():
    model = tiny("llama")
    retrieval = torch.tensor([[True, False], [False, False], [False, True]])
    makers = {
        "quantized": lambda: kvpress_rs.QuantizedKVCache(model, bits=8, group_size=32, residual_length=32),
        "heads": lambda: kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=retrieval, window=8, sink_tokens=2,
                                                         heavy_hitters=4, observation_window=4),
    }
    rows = prompts(128)
    ids, mask = left_padded(rows)
    for name, make in makers.items():
        out = generate(model, ids, mask, make(), n=20)
        for b, row in enumerate(rows):
            alone = generate(model, row, torch.ones_like(row), make(), n=20)
            assert torch.equal(out[b, ids.shape[1]:], alone[0, row.shape[1]:]), f"{name}: row {b}"


def test_block_prefill_of_a_padded_batch_keeps_what_each_row_keeps_alone():
    model = tiny("llama")
    rows = prompts(128)
    ids, mask = left_padded(rows)
    make = lambda: kvpress_rs.KnormCache(model, decoding_budget=16, decoding_interval=8)  # noqa: E731
    cache = make()
    kvpress_rs.prefill(model, ids, cache, block_size=8, attention_mask=mask)
    width = ids.shape[1]
    for b, row in enumerate(rows):
        # the row alone, in the same blocks of the padded sequence (its pads left out)
        pad = width - row.shape[1]
        edges = sorted({max(0, e - pad) for e in [*range(0, width, 8), width]})
        alone = make()
        with torch.no_grad():
            for start, end in zip(edges, edges[1:]):
                model(row[:, start:end], past_key_values=alone)
        for layer in range(3):
            assert real_positions(cache, layer, b, pad) == real_positions(alone, layer, 0, 0), f"row {b}, layer {layer}"


def test_right_padding_is_refused_naming_the_mask():
    model = tiny("llama")
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="attention_mask"):
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=kvpress_rs.KnormCache(model, compression_ratio=0.5))


@pytest.fixture(scope="module")
def smollm2_fp32():
    from kvpress_rs.models import load_smollm2

    return load_smollm2(dtype="float32")


SMOLLM2_CACHES = {
    "streaming_llm": lambda model, ratio: kvpress_rs.StreamingLLMCache(model, compression_ratio=ratio),
    "knorm": lambda model, ratio: kvpress_rs.KnormCache(model, compression_ratio=ratio),
    "snapkv": lambda model, ratio: kvpress_rs.SnapKVCache(model, compression_ratio=ratio, window_size=4),
    "expected_attention": lambda model, ratio: kvpress_rs.ExpectedAttentionCache(model, compression_ratio=ratio),
    "quantized_4bit": lambda model, ratio: kvpress_rs.QuantizedKVCache(model, bits=4, group_size=32, residual_length=32),
}


def smollm2_rows(tokenizer) -> list[torch.Tensor]:
    texts = [
        "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find some food "
        "for its young, who wait in the den beneath the old oak tree near the river bank.",
        "Paris is the capital of France. The Eiffel Tower was built for the 1889 World's Fair.",
        "Water boils at one hundred degrees.",
    ]
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids for t in texts]


@pytest.mark.model
@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("name", ["streaming_llm", "knorm", "snapkv", "expected_attention"])
def test_smollm2_padded_rows_keep_and_generate_what_they_do_alone(smollm2_fp32, name, ratio):
    model, tokenizer = smollm2_fp32
    make = lambda: SMOLLM2_CACHES[name](model, ratio)  # noqa: E731
    ids, mask, out = check_rows_as_alone(model, make, smollm2_rows(tokenizer), model.config.num_hidden_layers)
    if ratio == 0.0:
        assert torch.equal(out, generate(model, ids, mask, DynamicCache(config=model.config)))


@pytest.mark.model
def test_smollm2_padded_rows_of_a_4bit_cache_generate_what_they_do_alone(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    rows = smollm2_rows(tokenizer)
    ids, mask = left_padded(rows)
    make = lambda: SMOLLM2_CACHES["quantized_4bit"](model, 0.0)  # noqa: E731
    out = generate(model, ids, mask, make(), n=NEW)
    for b, row in enumerate(rows):
        alone = generate(model, row, torch.ones_like(row), make(), n=NEW)
        assert torch.equal(out[b, ids.shape[1]:], alone[0, row.shape[1]:]), f"row {b}"
