"""The files generated from the Rust registry (the named caches in policies.py, the
registry block of _native.pyi, the README's methods tables) are up to date, and the
registry reaches users: unknown names list every name, parameters keep their declared
defaults, a parameter of a stage that is not selected is refused naming that stage."""

from __future__ import annotations

import inspect

import pytest

import kvpress_rs
from kvpress_rs import _generate, _native
from kvpress_rs.policies import CACHES


def test_generated_files_are_up_to_date():
    stale = [str(path) for path, text in _generate.generated_files().items() if path.read_text() != text]
    assert not stale, f"run `python -m kvpress_rs._generate`: stale {stale}"


def test_unknown_names_list_every_name_of_their_kind():
    scorers = [s["name"] for s in _native.registry() if s["kind"] == "scorer"]
    assert {"expected_attention", "triattention", "cake"} <= set(scorers)
    with pytest.raises(kvpress_rs.InvalidArgumentError) as e:
        _native.Press("snapkvv")
    assert all(name in str(e.value) for name in scorers) and "policy" in str(e.value)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="explicit"):
        _native.Press("knorm", layer_budget="pyramids")


def test_named_caches_spell_out_every_parameter_with_its_registry_default():
    stages = {(s["kind"], s["name"]): s for s in _native.registry()}
    for preset in _native.presets():
        signature = inspect.signature(CACHES[preset["name"]].__init__).parameters
        # explicit keyword arguments, no **kwargs (but for AdaKV's scorer parameters)
        has_var_keyword = any(p.kind == p.VAR_KEYWORD for p in signature.values())
        assert has_var_keyword == (preset["scorer"] is None), preset["class"]
        if preset["scorer"]:
            for p in stages[("scorer", preset["scorer"])]["params"]:
                assert signature[p["name"]].default == p["default"], (preset["class"], p["name"])
    snapkv = inspect.signature(kvpress_rs.SnapKVCache.__init__).parameters
    assert [snapkv[n].default for n in ("window_size", "kernel_size")] == [64, 5]
    cake = inspect.signature(kvpress_rs.CAKECache.__init__).parameters
    assert (cake["tau1"].default, cake["tau2"].default) == (1.6, 0.6)


def test_a_parameter_of_a_stage_not_selected_is_refused_naming_it(tiny_llama):
    model = tiny_llama()
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="pyramid"):
        kvpress_rs.KnormCache(model, compression_ratio=0.5, beta=4.0)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="window_size"):
        kvpress_rs.KVCache(model, "knorm", compression_ratio=0.5, window_size=8)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="beta"):
        kvpress_rs.PyramidKVCache(model, compression_ratio=0.5, beta=0.5)  # out of range: >= 1
