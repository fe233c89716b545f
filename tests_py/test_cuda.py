"""The CUDA path: every operation on CUDA tensors gives what it gives on the CPU, and the
caches run inside ``model.generate`` with the model on the GPU, holding their tensors there.

These tests need a CUDA device, so they run on a GPU machine (``make test-cuda``; the last
run is recorded in docs/results/cuda.md) and are skipped where torch sees none, such as CI.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs.errors import DeviceError
from settings import REGISTRY

from conftest import random_ids

# KVPRESS_RS_TEST_DEVICE=cpu runs the same assertions CPU against CPU (checks the tests)
CUDA = torch.device(os.environ.get("KVPRESS_RS_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (make test-cuda)")
POLICIES = [name for name in REGISTRY if name not in ("pyramidkv", "adakv", "cake")]
BUDGETS = {"uniform": {}, "pyramid": {"layer_budget": "pyramid"}, "adakv": {"head_budget": "adakv"},
           "cake": {"layer_budget": "cake"}}


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    # TF32 would make CUDA float32 products differ from the CPU's by ~1e-3
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def generate(model, ids, cache, n=4):
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)


def cache_tensors(cache):
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                yield t


# ----------------------------------------------------------------------------------------
# Functional operations: CUDA results equal CPU results.


@pytest.mark.parametrize("policy", ["knorm", "streaming_llm", "random", "keydiff", "lagkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_value_scorers_agree_with_the_cpu(policy, dtype):
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 90, 32, generator=gen).to(dtype)
    values = torch.randn(2, 3, 90, 32, generator=gen).to(dtype)
    cpu = ops.score(policy, keys, values)
    gpu = ops.score(policy, keys.to(CUDA), values.to(CUDA))
    assert gpu.device.type == CUDA.type
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    kept = ops.kept_indices(policy, keys.to(CUDA), values.to(CUDA), compression_ratio=0.5)
    assert torch.equal(kept.cpu(), ops.kept_indices(policy, keys, values, compression_ratio=0.5))


def test_top_k_ties_and_gather_agree_with_the_cpu():
    scores = torch.randint(0, 3, (2, 4, 300)).float()  # many ties: the earlier token wins on both
    x = torch.randn(2, 4, 300, 16).bfloat16()
    idx = ops.top_k(scores.to(CUDA), 77)
    assert torch.equal(idx.cpu(), ops.top_k(scores, 77))
    assert torch.equal(ops.gather(x.to(CUDA), idx).cpu(), ops.gather(x, idx.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_apply_invert_shift_agree_with_the_cpu(dtype):
    rope = kvpress_rs.Rope(64, rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)
    x = torch.randn(1, 4, 50, 64).to(dtype)
    pos = torch.arange(100_000, 100_050)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    for op, arg in ((rope.apply, pos), (rope.invert, pos), (rope.shift, 12345)):
        gpu = op(x.to(CUDA), arg.to(CUDA) if isinstance(arg, torch.Tensor) else arg)
        assert gpu.device.type == CUDA.type and gpu.dtype == dtype
        torch.testing.assert_close(gpu.cpu().float(), op(x, arg).float(), **tol)
    back = rope.shift(rope.shift(x.float().to(CUDA), 777), -777)
    torch.testing.assert_close(back.cpu(), x.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_quantize_gives_the_cpu_codes(grouping):
    x = torch.randn(2, 4, 256, 64, dtype=torch.bfloat16)
    kwargs = dict(bits=2, group_size=32, grouping=grouping)
    cpu, gpu = ops.quantize(x, **kwargs), ops.quantize(x.to(CUDA), **kwargs)
    for name in ["codes", "scales", "zeros"]:
        assert getattr(gpu, name).device.type == CUDA.type
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    assert gpu.nbytes == cpu.nbytes
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())


@pytest.mark.skipif(CUDA.type == "cpu", reason="needs two devices")
def test_mixed_devices_raise_a_clear_error():
    keys = torch.randn(1, 2, 16, 8, device=CUDA)
    with pytest.raises(DeviceError, match="values"):
        ops.score("keydiff", keys, torch.randn(1, 2, 16, 8))


# ----------------------------------------------------------------------------------------
# Caches inside model.generate with the model on the GPU.


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("rerotate", [False, True])
def test_every_policy_and_budget_generates_on_cuda_keeping_what_the_cpu_keeps(tiny_llama, policy, budget, rerotate):
    model = tiny_llama()
    ids = random_ids(1, 48)
    spec = REGISTRY[policy]
    make = lambda ratio: spec.cache_class(model, compression_ratio=ratio, rerotate=rerotate, **BUDGETS[budget],
                                          **spec.easy)
    cpu_cache = make(0.5)
    cpu_out = generate(model, ids, cpu_cache)
    model.to(CUDA)
    if budget == "uniform":
        assert torch.equal(generate(model, ids.to(CUDA), make(0.0)), generate(model, ids.to(CUDA), DynamicCache(config=model.config)))
    cache = make(0.5)
    out = generate(model, ids.to(CUDA), cache)
    assert out.shape == cpu_out.shape
    assert all(t.device.type == CUDA.type for t in cache_tensors(cache))
    assert cache.stats()["tokens_kept"] == cpu_cache.stats()["tokens_kept"]
    assert cache.nbytes == cpu_cache.nbytes
    for layer in range(len(cache.layers)):
        gpu_kept, cpu_kept = cache.kept_positions(layer), cpu_cache.kept_positions(layer)
        if isinstance(gpu_kept, list):
            assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu_kept, cpu_kept))
        else:
            assert torch.equal(gpu_kept.cpu(), cpu_kept.cpu()), (policy, budget, layer)


@pytest.mark.parametrize("kwargs", [dict(bits=4), dict(bits=2, hadamard=True), dict(bits=3, outlier_fraction=0.02, sink_tokens=4)])
def test_quantized_cache_decodes_on_cuda_like_on_the_cpu(tiny_llama, kwargs):
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids, step = random_ids(1, 150, seed=3), random_ids(1, 1, seed=4)

    def run(device):
        model.to(device)
        cache = kvpress_rs.QuantizedKVCache(model, group_size=32, residual_length=32, **kwargs)
        with torch.no_grad():
            model(ids.to(device), past_key_values=cache)
            logits = model(step.to(device), past_key_values=cache).logits
        return cache, logits

    cpu_cache, cpu_logits = run("cpu")
    gpu_cache, gpu_logits = run(CUDA)
    assert gpu_logits.device.type == CUDA.type
    assert gpu_cache.nbytes == cpu_cache.nbytes
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=0, atol=1e-4)
    out = generate(model, ids.to(CUDA), kvpress_rs.QuantizedKVCache(model, residual_length=32, **kwargs), n=8)
    assert out.shape == (1, 158)


@pytest.mark.parametrize("bits", [3, 8])
def test_pre_rope_quantized_keys_decode_on_cuda_like_on_the_cpu(tiny_llama, bits):
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids, step = random_ids(1, 150, seed=3), random_ids(1, 1, seed=4)
    logits = {}
    for device in ("cpu", CUDA):
        model.to(device)
        cache = kvpress_rs.QuantizedKVCache(model, bits=bits, residual_length=32, pre_rope_keys=True)
        with torch.no_grad():
            model(ids.to(device), past_key_values=cache)
            logits[str(device)] = model(step.to(device), past_key_values=cache).logits.cpu()
    torch.testing.assert_close(logits[str(CUDA)], logits["cpu"], rtol=0, atol=1e-4)


def test_eviction_then_quantization_on_cuda(tiny_llama):
    model = tiny_llama(head_dim=32, hidden_size=128).to(CUDA)
    ids = random_ids(1, 96).to(CUDA)
    quant = kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32)
    pre = kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32, pre_rope_keys=True)
    for kwargs in (dict(quantization=quant), dict(quantization=quant, low_bits=2), dict(quantization=pre)):
        cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=8, **kwargs)
        out = generate(model, ids, cache, n=6)
        assert out.shape == (1, 102) and out.device.type == CUDA.type
        assert cache.get_seq_length() == 101  # tokens seen: positions continue there


def test_retrieval_heads_decode_on_cuda_like_on_the_cpu(tiny_llama):
    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=2)
    ids, step = random_ids(1, 150, seed=3), random_ids(1, 1, seed=4)
    retrieval = torch.tensor([[True, False], [False, True]])
    logits, nbytes = {}, {}
    for device in ("cpu", CUDA):
        model.to(device)
        cache = kvpress_rs.RetrievalHeadsCache(model, retrieval_heads=retrieval, window=16, heavy_hitters=8,
                                               quantization=kvpress_rs.QuantConfig(bits=4, group_size=32, residual_length=32))
        with torch.no_grad():
            model(ids.to(device), past_key_values=cache)
            logits[str(device)] = model(step.to(device), past_key_values=cache).logits.cpu()
        nbytes[str(device)] = cache.nbytes
        heads, keys, *_ = cache.layers[0].state.head_parts(None, 1, model.config.num_attention_heads)[-1]
        assert keys.device.type == torch.device(device).type
    torch.testing.assert_close(logits[str(CUDA)], logits["cpu"], rtol=0, atol=1e-4)
    assert nbytes[str(CUDA)] == nbytes["cpu"]


def test_chunk_reuse_on_cuda_equals_full_prefill_for_one_chunk(tiny_llama, tmp_path):
    model = tiny_llama().to(CUDA)
    doc, question = random_ids(1, 40, seed=5)[0], random_ids(1, 6, seed=6)
    store = kvpress_rs.ChunkStore(model, backend=tmp_path)
    cache = store.assemble([doc])
    ids = torch.cat([cache.input_ids.to(CUDA), question.to(CUDA)], dim=1)
    reused = generate(model, ids, cache, n=5)
    full = generate(model, ids, DynamicCache(config=model.config), n=5)
    assert torch.equal(reused, full)
    shifted = store.assemble([random_ids(1, 20, seed=7)[0], doc], recompute_ratio=0.2)
    assert all(t.device.type == CUDA.type for t in cache_tensors(shifted))
