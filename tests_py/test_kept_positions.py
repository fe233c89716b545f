"""Every policy × budget keeps, on SmolLM2, exactly the positions recorded before the press
pipeline was rebuilt (tests_py/kept_positions_fixture.py wrote the fixture)."""

from __future__ import annotations

import json

import pytest
import torch

from kept_positions_fixture import FIXTURE, configurations, kept

RECORDED = json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def smollm2_fp32():
    from kvpress_rs.models import load_smollm2

    return load_smollm2(dtype="float32")


def test_the_fixture_covers_every_configuration():
    assert set(RECORDED["kept"]) == set(configurations())


@pytest.mark.model
@pytest.mark.parametrize("name", list(configurations()))
def test_kept_positions_are_the_recorded_ones(smollm2_fp32, name):
    model, _ = smollm2_fp32
    ids = torch.tensor([RECORDED["ids"]])
    got = kept(model, ids, configurations()[name])
    differ = [i for i, (a, b) in enumerate(zip(got, RECORDED["kept"][name])) if a != b]
    assert not differ, f"{name}: layers {differ} keep other positions than recorded"
