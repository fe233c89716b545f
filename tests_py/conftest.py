"""Shared fixtures: tiny random Llama models (no download) and the real SmolLM2."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# transformers 5.2x deprecates `past_key_values=` in generate in favour of `cache=`; both work.
warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_llama():
    """A factory of tiny random Llama models: tiny_llama(dtype=..., attn=...)."""

    def make(dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()
        model.set_attn_implementation(attn)
        return model

    return make


@pytest.fixture(scope="session")
def smollm2_bf16():
    from kvpress_rs.models import load_smollm2

    return load_smollm2(dtype="bfloat16")


@pytest.fixture(scope="session")
def smollm2_fp32_eager():
    from kvpress_rs.models import load_smollm2

    return load_smollm2(dtype="float32", attn_implementation="eager")


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)
