"""Aggregation math against numpy references computed by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.core.adapters import UpdateRejected
from fedtune.core.config import FederationSettings
from fedtune.strategies.aggregate import weighted_sum
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.registry import UnknownStrategy, build_strategy, known_strategies


def _adapters(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            "a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32),
        }
        for _ in range(count)
    ]


def test_fedavg_of_deltas_equals_the_numpy_weighted_mean():
    rng = np.random.default_rng(0)
    global_ = _adapters(rng, 1)[0]
    deltas = _adapters(rng, 3)
    weights = [10.0, 30.0, 60.0]
    new = FedAvg(server_learning_rate=1.0).apply(global_, weighted_sum(deltas, weights))
    for name in global_:
        expected = global_[name] + np.average(
            np.stack([d[name] for d in deltas]), axis=0, weights=weights
        )
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-6)


def test_server_learning_rate_scales_the_mean_delta():
    rng = np.random.default_rng(1)
    global_ = _adapters(rng, 1)[0]
    deltas = _adapters(rng, 2)
    update = weighted_sum(deltas, [1.0, 1.0])
    half = FedAvg(0.5).apply(global_, update)
    for name in global_:
        expected = global_[name] + 0.5 * (deltas[0][name] + deltas[1][name]) / 2
        np.testing.assert_allclose(half[name], expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(0.5, 1000.0), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_weighted_mean_stays_within_the_hospitals_range(weights: list[float], seed: int):
    """A convex combination: each coordinate lies between the hospitals' min and max."""
    rng = np.random.default_rng(seed)
    deltas = _adapters(rng, len(weights))
    mean = weighted_sum(deltas, weights).mean_delta()
    for name in mean:
        stacked = np.stack([d[name] for d in deltas])
        assert np.all(mean[name] <= stacked.max(axis=0) + 1e-4)
        assert np.all(mean[name] >= stacked.min(axis=0) - 1e-4)


def test_an_aggregate_that_would_make_the_adapter_non_finite_is_refused():
    global_ = {"a": np.full(3, 3e38, np.float32)}
    delta = {"a": np.full(3, 3e38, np.float32)}
    with pytest.raises(UpdateRejected, match="NaN/infinite"):
        FedAvg(1.0).apply(global_, weighted_sum([delta], [1.0]))


def test_weighted_sum_refuses_empty_and_non_positive_weights():
    with pytest.raises(ValueError, match="no hospital updates"):
        weighted_sum([], [])
    with pytest.raises(ValueError, match="positive"):
        weighted_sum([{"a": np.zeros(2, np.float32)}], [0.0])


def test_registry_builds_fedavg_and_names_known_strategies_on_a_typo():
    assert build_strategy(FederationSettings(strategy="fedavg")).name == "fedavg"
    # The config refuses a typo itself; the registry must too, for settings built otherwise.
    with pytest.raises(UnknownStrategy, match="fedavgg.*known strategies: fedadagrad"):
        build_strategy(SimpleNamespace(strategy="fedavgg"))  # type: ignore[arg-type]
    assert "fedavg" in known_strategies()


def test_fedavg_state_refuses_another_strategys_checkpoint():
    strategy = FedAvg(1.0)
    strategy.load_state_dict(strategy.state_dict())
    with pytest.raises(ValueError, match="fedadam"):
        strategy.load_state_dict({"strategy": "fedadam"})


def test_fedavg_updates_the_tensors_an_aggregate_covers_and_copies_the_rest():
    global_ = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}
    new = FedAvg(1.0).apply(global_, weighted_sum([{"b": np.full(3, 2.0, np.float32)}], [4.0]))
    assert list(new) == ["a", "b"]
    np.testing.assert_array_equal(new["a"], global_["a"])
    assert new["a"] is not global_["a"]
    np.testing.assert_array_equal(new["b"], [3.0, 3.0, 3.0])
    with pytest.raises(UpdateRejected, match="unexpected tensors c"):
        FedAvg(1.0).apply(global_, weighted_sum([{"c": np.ones(1, np.float32)}], [1.0]))
