"""``kvpress_rs.from_press`` without kvpress installed: stand-ins with kvpress 0.5.5's class
names and fields (from its source) map to the expected cache arguments, the caches built
from them keep what the same cache built by hand keeps, and presses without an equivalent
are refused by name. ``make test-kvpress`` runs the real presses (tests_kvpress/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import kvpress_rs
from kvpress_rs.kvpress_compat import cache_arguments

from conftest import random_ids


@dataclass
class KnormPress:
    compression_ratio: float = 0.0


@dataclass
class SnapKVPress:
    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5


@dataclass
class PyramidKVPress:
    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    beta: int = 20


@dataclass
class RandomPress:
    compression_ratio: float = 0.0
    seed: int | None = None


@dataclass
class LeverageScorePress:
    compression_ratio: float = 0.0
    sketch_dimension: int = 48


@dataclass
class ThinKPress:
    key_channel_compression_ratio: float = 0.0
    window_size: int = 32


@dataclass
class QFilterPress:
    compression_ratio: float = 0.0


@dataclass
class ChunkKVPress:
    press: Any
    chunk_length: int = 20


@dataclass
class EntropyGatedChunkKVPress(ChunkKVPress):
    chunk_length: int = 10
    low_entropy_chunk_length: int = 4


@dataclass
class AdaKVPress:
    press: Any
    alpha_safeguard: float = 0.20


@dataclass
class KeyRerotationPress:
    press: Any


@dataclass
class PerLayerCompressionPress:
    press: Any
    compression_ratios: list


@dataclass
class DecodingPress:
    base_press: Any
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256


@dataclass
class CompressionRatioDecodingPress:
    base_press: Any
    compression_interval: int = 512
    hidden_states_buffer_size: int = 256
    target_compression_ratio: float = 0.5
    target_size: int = field(default=1, init=False)


@dataclass
class PrefillDecodingPress:
    prefilling_press: Any = None
    decoding_press: Any = None


@dataclass
class ComposedPress:
    presses: list


def test_scorer_presses_map_to_their_caches_with_their_parameters():
    assert cache_arguments(SnapKVPress(0.5, window_size=16)) == {
        "policy": "snapkv", "compression_ratio": 0.5, "window_size": 16, "kernel_size": 5}
    assert cache_arguments(PyramidKVPress(0.25, beta=10)) == {
        "policy": "snapkv", "layer_budget": "pyramid", "compression_ratio": 0.25, "window_size": 64, "kernel_size": 5,
        "beta": 10}
    assert cache_arguments(RandomPress(0.5)) == {"policy": "random", "compression_ratio": 0.5}
    assert cache_arguments(RandomPress(0.5, seed=3)) == {"policy": "random", "compression_ratio": 0.5, "seed": 3}
    assert cache_arguments(LeverageScorePress(0.5)) == {"policy": "leverage", "compression_ratio": 0.5}


def test_wrappers_map_to_stages_and_options():
    assert cache_arguments(KeyRerotationPress(ChunkKVPress(SnapKVPress(0.5), chunk_length=8))) == {
        "policy": "snapkv", "compression_ratio": 0.5, "window_size": 64, "kernel_size": 5, "selector": "chunks",
        "chunk_length": 8, "rerotate": True}
    assert cache_arguments(EntropyGatedChunkKVPress(KnormPress(0.5))) == {
        "policy": "knorm", "compression_ratio": 0.5, "selector": "entropy_chunks", "entropy_chunk_length": 10,
        "low_entropy_chunk_length": 4}
    assert cache_arguments(AdaKVPress(KnormPress(0.5), alpha_safeguard=0.3)) == {
        "policy": "knorm", "compression_ratio": 0.5, "head_budget": "adakv", "alpha_safeguard": 0.3}
    assert cache_arguments(PerLayerCompressionPress(KnormPress(0.5), [0.1, 0.2])) == {
        "policy": "knorm", "layer_budget": "explicit", "layer_ratios": [0.1, 0.2]}
    assert cache_arguments(DecodingPress(KnormPress(0.5), compression_interval=16, target_size=64)) == {
        "policy": "knorm", "decoding_interval": 16, "decoding_budget": 64}
    assert cache_arguments(CompressionRatioDecodingPress(KnormPress(), 32, target_compression_ratio=0.75)) == {
        "policy": "knorm", "decoding_interval": 32, "decoding_ratio": 0.25}
    both = PrefillDecodingPress(SnapKVPress(0.5), DecodingPress(SnapKVPress(), 16, 64))
    assert cache_arguments(both) == {"policy": "snapkv", "compression_ratio": 0.5, "window_size": 64, "kernel_size": 5,
                                     "decoding_interval": 16, "decoding_budget": 64}
    assert cache_arguments(ComposedPress([ChunkKVPress(KnormPress(0.5))])) == cache_arguments(ChunkKVPress(KnormPress(0.5)))


def test_presses_without_an_equivalent_are_refused_by_name():
    with pytest.raises(kvpress_rs.UnsupportedError, match="QFilterPress.*hub"):
        cache_arguments(QFilterPress(0.5))
    with pytest.raises(kvpress_rs.UnsupportedError, match="ThinKPress has no kvpress_rs equivalent"):
        cache_arguments(ThinKPress(0.5))
    with pytest.raises(kvpress_rs.UnsupportedError, match="ComposedPress of 2 presses"):
        cache_arguments(ComposedPress([KnormPress(0.5), SnapKVPress(0.5)]))
    with pytest.raises(kvpress_rs.UnsupportedError, match="differ in"):
        cache_arguments(PrefillDecodingPress(SnapKVPress(0.5), DecodingPress(KnormPress())))
    with pytest.raises(kvpress_rs.UnsupportedError, match="PerLayerCompressionPress sets layer_budget"):
        cache_arguments(PerLayerCompressionPress(PyramidKVPress(0.5), [0.5, 0.5]))
    with pytest.raises(kvpress_rs.UnsupportedError, match="press: expected a kvpress press"):
        cache_arguments("snapkv")


def test_from_press_keeps_what_the_same_cache_built_by_hand_keeps(tiny_llama):
    model = tiny_llama()
    ids = random_ids(1, 60)
    by_press = kvpress_rs.from_press(KeyRerotationPress(ChunkKVPress(SnapKVPress(0.5, window_size=8), 4)), model)
    by_hand = kvpress_rs.ChunkKVCache(model, "snapkv", compression_ratio=0.5, window_size=8, chunk_length=4,
                                      rerotate=True)
    outs = [model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=c, max_new_tokens=5,
                           min_new_tokens=5, do_sample=False, pad_token_id=0) for c in (by_press, by_hand)]
    assert torch.equal(outs[0], outs[1])
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(by_press.kept_positions(layer), by_hand.kept_positions(layer))
    assert by_press.nbytes == by_hand.nbytes
