"""Server optimizers, FedProx/FFA-LoRA server sides and strategy state, against numpy by hand.

The references below restate Reddi et al. (2021), Algorithm 2, in the plainest numpy; the
strategies must match them bit for bit (same float64 operations), moments included.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedtune.core.adapters import UpdateRejected
from fedtune.core.config import STRATEGIES, FederationSettings
from fedtune.core.uploads import FROZEN_IN_FFA, lora_upload_bytes, uploaded_tensors
from fedtune.server.run_dir import RunDirectory
from fedtune.strategies.aggregate import AggregateUpdate, weighted_sum
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.registry import Strategy, UnknownStrategy, build_strategy, known_strategies
from fedtune.strategies.server_optimizers import FedAdam, FedAvgM

OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
SETTINGS = {
    "server_learning_rate": 0.05,
    "server_momentum": 0.8,
    "beta1": 0.85,
    "beta2": 0.95,
    "tau": 1e-2,
    "proximal_mu": 0.1,
}
A = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def _settings(strategy: str, **overrides: float) -> FederationSettings:
    return FederationSettings(strategy=strategy, **{**SETTINGS, **overrides})  # type: ignore[arg-type]


def _global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        A: rng.normal(size=(4, 6)).astype(np.float32),
        B: rng.normal(size=(6, 4)).astype(np.float32),
        HEAD: rng.normal(size=(3, 6)).astype(np.float32),
    }


def _update(rng: np.random.Generator, names: list[str], shapes: dict[str, tuple[int, ...]]):
    """A round of 3 hospitals with random deltas and example counts, summed like secure agg."""
    deltas = [
        {n: rng.normal(scale=0.1, size=shapes[n]).astype(np.float32) for n in names}
        for _ in range(3)
    ]
    return weighted_sum(deltas, [float(w) for w in rng.integers(5, 200, size=3)])


def _updates(seed: int, x0: dict[str, np.ndarray], subsets: list[list[str]]) -> list:
    rng = np.random.default_rng(seed)
    shapes = {n: v.shape for n, v in x0.items()}
    return [_update(rng, names, shapes) for names in subsets]


def _reference(kind: str, x0: dict[str, np.ndarray], updates: list[AggregateUpdate]):
    """Algorithm 2 of Reddi et al. in plain numpy: (adapters after each round, m, v)."""
    eta, tau = SETTINGS["server_learning_rate"], SETTINGS["tau"]
    b1, b2, beta = SETTINGS["beta1"], SETTINGS["beta2"], SETTINGS["server_momentum"]
    x = {n: a.copy() for n, a in x0.items()}
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    history = []
    for update in updates:
        for name, total in update.weighted_delta_sum.items():
            d = total.astype(np.float64) / update.weight_sum
            if kind == "fedavgm":
                v[name] = beta * v.get(name, np.zeros(d.shape)) + d
                step = v[name]
            else:
                m0 = m.get(name, np.zeros(d.shape))
                v0 = v.get(name, np.full(d.shape, tau**2))
                m[name] = b1 * m0 + (1 - b1) * d
                if kind == "fedadagrad":
                    v[name] = v0 + d**2
                elif kind == "fedadam":
                    v[name] = b2 * v0 + (1 - b2) * d**2
                else:
                    v[name] = v0 - (1 - b2) * d**2 * np.sign(v0 - d**2)
                step = m[name] / (np.sqrt(v[name]) + tau)
            x[name] = (x[name].astype(np.float64) + eta * step).astype(np.float32)
        history.append({n: a.copy() for n, a in x.items()})
    return history, m, v


def _moments(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's arrays regrouped as {slot: {tensor: array}}."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in strategy.state_dict()["arrays"].items():
        slot, name = key.split("/", 1)
        grouped.setdefault(slot, {})[name] = value
    return grouped


def _assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_server_optimizer_matches_algorithm_2_over_rounds(kind: str):
    x0 = _global(np.random.default_rng(0))
    everything = list(x0)
    updates = _updates(1, x0, [everything] * 5)
    history, m, v = _reference(kind, x0, updates)
    strategy = build_strategy(_settings(kind))
    x = x0
    for round_index, update in enumerate(updates):
        x = strategy.apply(x, update)
        _assert_same(x, history[round_index])
        assert list(x) == list(x0)  # the adapter keeps PEFT's tensor order
    moments = _moments(strategy)
    if kind == "fedavgm":
        _assert_same(moments["momentum"], v)
    else:
        _assert_same(moments["m"], m)
        _assert_same(moments["v"], v)
    assert strategy.state_dict()["meta"]["step"] == 5


def test_fedavgm_momentum_accumulates_by_hand():
    """Δ = 1 every round, β = 0.5, η = 1: steps 1, 1.5, 1.75, so x = 4.25."""
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.5)
    x = {"w": np.zeros(2, np.float32)}
    update = weighted_sum([{"w": np.ones(2, np.float32)}], [7.0])
    for _ in range(3):
        x = strategy.apply(x, update)
    np.testing.assert_array_equal(x["w"], [4.25, 4.25])
    np.testing.assert_array_equal(strategy.state_dict()["arrays"]["momentum/w"], [1.75, 1.75])


def test_fedadam_first_round_by_hand_moves_towards_the_hospitals():
    """m = (1−β₁)Δ, v = β₂τ² + (1−β₂)Δ², x += η·m/(√v + τ): added, not subtracted."""
    strategy = FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = strategy.apply({"w": np.zeros(1, np.float32)}, weighted_sum([{"w": np.ones(1)}], [1.0]))
    m, v = 0.1, 0.99e-6 + 0.01
    assert x["w"][0] == np.float32(0.1 * m / (np.sqrt(v) + 1e-3))
    assert x["w"][0] > 0


@pytest.mark.parametrize("kind", ("fedavg", "fedprox", "ffa-lora"))
def test_fedprox_and_ffa_lora_are_fedavg_on_the_server(kind: str):
    x0 = _global(np.random.default_rng(2))
    names = list(uploaded_tensors(x0, kind))
    updates = _updates(3, x0, [names] * 3)
    strategy = build_strategy(_settings(kind))
    fedavg, x, expected = FedAvg(SETTINGS["server_learning_rate"]), x0, x0
    for update in updates:
        x, expected = strategy.apply(x, update), fedavg.apply(expected, update)
        _assert_same(x, expected)
    for name in names:  # and FedAvg is x + η·mean delta
        mean = sum(u.weighted_delta_sum[name].astype(np.float64) / u.weight_sum for u in updates)
        np.testing.assert_allclose(x[name], x0[name] + 0.05 * mean, rtol=1e-5, atol=1e-6)
    assert strategy.state_dict() == {
        "meta": {
            "strategy": kind,
            "step": 3,
            "hyperparameters": {"server_learning_rate": 0.05}
            | ({"proximal_mu": 0.1} if kind == "fedprox" else {}),
        },
        "arrays": {},
    }


@pytest.mark.parametrize("kind", (*OPTIMIZERS, "fedavg"))
def test_a_subset_update_leaves_other_tensors_and_their_moments_unchanged(kind: str):
    x0 = _global(np.random.default_rng(4))
    full, only_b = list(x0), [B]
    updates = _updates(5, x0, [full, only_b, only_b, full])
    history, _, _ = _reference(kind, x0, updates) if kind != "fedavg" else ([], {}, {})
    strategy = build_strategy(_settings(kind))
    x = strategy.apply(x0, updates[0])
    after_first = strategy.state_dict()["arrays"]
    for update in updates[1:3]:
        new = strategy.apply(x, update)
        for name in (A, HEAD):
            np.testing.assert_array_equal(new[name], x[name])
            assert new[name] is not x[name]
        assert not np.array_equal(new[B], x[B])
        x = new
    arrays = strategy.state_dict()["arrays"]
    for key, value in after_first.items():
        if not key.endswith(B):
            np.testing.assert_array_equal(arrays[key], value)
    if kind != "fedavg":
        _assert_same(strategy.apply(x, updates[3]), history[3])


def test_moments_are_created_only_for_tensors_that_were_updated():
    strategy = build_strategy(_settings("fedyogi"))
    x0 = _global(np.random.default_rng(6))
    strategy.apply(x0, _updates(7, x0, [[B]])[0])
    assert sorted(strategy.state_dict()["arrays"]) == [f"m/{B}", f"v/{B}"]
    assert strategy.state_dict()["meta"]["tensors"] == [B]


@pytest.mark.parametrize("kind", (*OPTIMIZERS, "fedavg"))
def test_a_refused_aggregate_changes_neither_adapter_nor_state(kind: str):
    strategy = build_strategy(_settings(kind, server_learning_rate=1.0))
    x = {"w": np.zeros(3, np.float32), "u": np.zeros(2, np.float32)}
    x = strategy.apply(x, weighted_sum([{"w": np.ones(3, np.float32)}], [1.0]))
    before = strategy.state_dict()
    bad_updates = [
        weighted_sum([{"w": np.ones(3, np.float32), "z": np.ones(1, np.float32)}], [1.0]),
        weighted_sum([{"w": np.ones(4, np.float32)}], [1.0]),
        weighted_sum([{"w": np.array([1.0, np.nan, 1.0], np.float32)}], [1.0]),
        AggregateUpdate({}, 1.0, 1),
    ]
    for bad in bad_updates:
        with pytest.raises(UpdateRejected, match="the aggregate"):
            strategy.apply(x, bad)
    if kind in ("fedavg", "fedavgm"):  # adaptive steps are bounded by ~η: they cannot overflow
        near_max = {"w": np.full(3, 3e38, np.float32), "u": np.zeros(2, np.float32)}
        with pytest.raises(UpdateRejected, match="new global adapter.*NaN/infinite"):
            strategy.apply(near_max, weighted_sum([{"w": np.full(3, 3e38, np.float32)}], [1.0]))
    after = strategy.state_dict()
    assert after["meta"] == before["meta"]
    _assert_same(after["arrays"], before["arrays"])


def test_ffa_lora_refuses_an_aggregate_that_touches_lora_a():
    x0 = _global(np.random.default_rng(8))
    with pytest.raises(UpdateRejected, match="frozen"):
        build_strategy(_settings("ffa-lora")).apply(x0, _updates(9, x0, [[A, B]])[0])


@pytest.mark.parametrize("kind", STRATEGIES)
def test_state_through_the_run_directory_resumes_identically(kind: str, tmp_path):
    """Save after round 2, load into a fresh strategy, continue: same as never stopping."""
    run_dir = RunDirectory(tmp_path)
    x0 = _global(np.random.default_rng(10))
    names = list(uploaded_tensors(x0, kind))
    updates = _updates(11, x0, [names, [B], names, names, [B], names])
    uninterrupted, x = build_strategy(_settings(kind)), x0
    for server_round, update in enumerate(updates[:2], start=1):
        x = uninterrupted.apply(x, update)
        run_dir.save_strategy_state(server_round, uninterrupted.state_dict())
    saved = uninterrupted.state_dict()
    loaded = run_dir.load_strategy_state(2)
    assert loaded["meta"] == json.loads(json.dumps(saved["meta"]))
    _assert_same(loaded["arrays"], saved["arrays"])
    resumed = build_strategy(_settings(kind))
    resumed.load_state_dict(loaded)
    x_resumed = x
    for update in updates[2:]:
        x, x_resumed = uninterrupted.apply(x, update), resumed.apply(x_resumed, update)
        _assert_same(x_resumed, x)
    assert resumed.state_dict()["meta"] == uninterrupted.state_dict()["meta"]
    _assert_same(resumed.state_dict()["arrays"], uninterrupted.state_dict()["arrays"])
    latest = json.loads((tmp_path / "strategy-state.json").read_text())
    assert latest == json.loads((tmp_path / "strategy" / "round-0002.json").read_text())
    assert latest["round"] == 2
    assert (latest["arrays_file"] is None) == (kind in ("fedavg", "fedprox", "ffa-lora"))
    assert run_dir.strategy_rounds() == [1, 2]


def test_loading_a_round_that_was_never_saved_names_the_saved_ones(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.save_strategy_state(1, FedAvg(1.0).state_dict())
    with pytest.raises(FileNotFoundError, match="round 3; saved: 1"):
        run_dir.load_strategy_state(3)


def _trained(kind: str, **overrides: float) -> Strategy:
    strategy = build_strategy(_settings(kind, **overrides))
    x0 = _global(np.random.default_rng(12))
    strategy.apply(x0, _updates(13, x0, [list(x0)])[0])
    return strategy


@pytest.mark.parametrize(
    ("kind", "state_of", "message"),
    [
        ("fedyogi", lambda: _trained("fedadam").state_dict(), "fedadam"),
        ("fedadam", lambda: _trained("fedadam", beta2=0.9).state_dict(), "beta2: checkpoint 0.9"),
        ("fedavgm", lambda: _trained("fedavgm", server_momentum=0.5).state_dict(), "momentum"),
        ("fedprox", lambda: _trained("fedprox", proximal_mu=1.0).state_dict(), "proximal_mu"),
        ("fedavg", lambda: _trained("fedadagrad").state_dict(), "fedadagrad"),
        ("fedadam", lambda: _without(_trained("fedadam").state_dict(), f"v/{B}"), "missing"),
    ],
)
def test_a_foreign_or_mismatched_state_is_refused(kind: str, state_of: Any, message: str):
    strategy = build_strategy(_settings(kind))
    with pytest.raises(ValueError, match=message):
        strategy.load_state_dict(state_of())


def _without(state: dict[str, Any], key: str) -> dict[str, Any]:
    del state["arrays"][key]
    return state


def test_moments_for_tensors_the_adapter_lacks_stop_the_run_rather_than_a_round():
    strategy = build_strategy(_settings("fedadam"))
    strategy.load_state_dict(_trained("fedadam").state_dict())
    other = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="another run") as refused:
        strategy.apply(other, weighted_sum([{"w": np.ones(2, np.float32)}], [1.0]))
    assert not isinstance(refused.value, UpdateRejected)


def test_an_unknown_strategy_name_lists_every_known_one():
    assert known_strategies() == sorted(STRATEGIES)
    with pytest.raises(UnknownStrategy) as unknown:
        build_strategy(SimpleNamespace(strategy="fedadamw"))  # type: ignore[arg-type]
    assert "'fedadamw'" in str(unknown.value)
    for name in STRATEGIES:
        assert name in str(unknown.value)


def test_ffa_lora_uploads_half_of_a_lora_only_adapter():
    rank, dim = 8, 384
    adapter = {}
    for layer in range(3):
        for module in ("query", "value"):
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            adapter[f"{prefix}.lora_A.weight"] = np.zeros((rank, dim), np.float32)
            adapter[f"{prefix}.lora_B.weight"] = np.zeros((dim, rank), np.float32)
    sent = uploaded_tensors(adapter, "ffa-lora")
    assert sorted(sent) == sorted(n for n in adapter if "lora_B" in n)
    assert all(f".{FROZEN_IN_FFA}." not in name for name in sent)
    assert uploaded_tensors(adapter, "fedavg") == adapter
    assert lora_upload_bytes(adapter, "fedadam") == 4 * 2 * 6 * rank * dim
    assert lora_upload_bytes(adapter, "ffa-lora") / lora_upload_bytes(adapter, "fedavg") == 0.5
    with_head = {**adapter, HEAD: np.zeros((3, dim), np.float32)}
    assert HEAD in uploaded_tensors(with_head, "ffa-lora")  # only LoRA A stays home
