"""Checks on hospital updates: names, shapes and values, with the hospital named."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.core.adapters import (
    UpdateRejected,
    adapter_delta,
    adapter_norm,
    apply_delta,
    check_update,
)

REFERENCE = {"x.lora_A": np.zeros((2, 3), np.float32), "x.lora_B": np.zeros((3, 2), np.float32)}


def test_a_matching_update_passes():
    check_update({k: np.ones_like(v) for k, v in REFERENCE.items()}, REFERENCE, "St Mary")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_hospital_and_tensor(bad: float):
    update = {k: np.ones_like(v) for k, v in REFERENCE.items()}
    update["x.lora_B"][1, 1] = bad
    with pytest.raises(UpdateRejected) as caught:
        check_update(update, REFERENCE, "St Mary")
    assert caught.value.hospital == "St Mary"
    assert "x.lora_B" in str(caught.value) and "1 NaN/infinite" in str(caught.value)


def test_wrong_shape_missing_and_extra_tensors_are_refused():
    wrong_shape = {"x.lora_A": np.zeros((2, 4), np.float32), "x.lora_B": REFERENCE["x.lora_B"]}
    with pytest.raises(UpdateRejected, match=r"x.lora_A has shape \(2, 4\), expected \(2, 3\)"):
        check_update(wrong_shape, REFERENCE, "Riverside")
    with pytest.raises(UpdateRejected, match="missing tensors x.lora_B"):
        check_update({"x.lora_A": REFERENCE["x.lora_A"]}, REFERENCE, "Riverside")
    with pytest.raises(UpdateRejected, match="unexpected tensors y"):
        check_update({**REFERENCE, "y": np.zeros(1, np.float32)}, REFERENCE, "Riverside")


def test_delta_then_apply_recovers_the_local_adapter():
    rng = np.random.default_rng(0)
    global_ = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in REFERENCE.items()}
    local = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in global_.items()}
    delta = adapter_delta(local, global_)
    restored = apply_delta(global_, delta, scale=1.0)
    for name in local:
        np.testing.assert_allclose(restored[name], local[name], rtol=1e-6, atol=1e-6)
    assert adapter_norm(delta) == pytest.approx(
        np.sqrt(sum(np.sum((local[k] - global_[k]) ** 2) for k in local)), rel=1e-5
    )


def test_apply_delta_leaves_the_global_adapter_untouched():
    global_ = {k: v.copy() for k, v in REFERENCE.items()}
    apply_delta(global_, {k: np.ones_like(v) for k, v in REFERENCE.items()}, scale=1.0)
    for name in REFERENCE:
        np.testing.assert_array_equal(global_[name], REFERENCE[name])
