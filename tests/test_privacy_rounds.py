"""DP in the federated loop: ε composed over rounds and runs, budgets enforced at the node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_grid import InProcessGrid
from tiny import in_clear, replace_section

from fedtune.client import session
from fedtune.client.privacy_ledger import compute_epsilon, read_ledger_file
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory


def _run(config: RunConfig, grid: InProcessGrid, run_path: Path, lines: list[str]) -> dict:
    run_dir = RunDirectory(run_path)
    run_dir.create(config)
    return run_federation(grid, config, run_dir, initial_global_adapter(config), say=lines.append)


def _dp(config: RunConfig, ledger_dir: Path, **privacy: object) -> RunConfig:
    values = {"enabled": True, "target_epsilon": 4.0, "ledger_dir": str(ledger_dir), **privacy}
    return replace_section(config, "privacy", **values)


def _rounds(run_path: Path) -> list[dict]:
    return [r for r in RunDirectory(run_path).read_metrics() if r["event"] == "round"]


def test_epsilon_is_composed_over_rounds_and_stays_within_the_target(
    classify_config: RunConfig, tmp_path: Path
):
    config = _dp(replace_section(classify_config, "federation", rounds=3), tmp_path / "ledgers")
    lines: list[str] = []
    summary = _run(config, InProcessGrid(2), tmp_path / "run", lines)
    epsilons = [r["train"]["hospital-1"]["epsilon"] for r in _rounds(tmp_path / "run")]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3  # strictly increasing
    assert epsilons[-1] <= 4.0 + 1e-9
    assert epsilons[-1] > 3.5  # σ was calibrated for the whole run, not per round
    ledger = read_ledger_file(tmp_path / "ledgers" / "hospital-1.json")
    assert [e.server_round for e in ledger.entries] == [1, 2, 3]
    assert ledger.epsilon_spent() == pytest.approx(
        compute_epsilon(ledger.history(), ledger.delta, "rdp"), rel=1e-12
    )
    assert summary["privacy"]["per_hospital"]["hospital-2"]["epsilon"] <= 4.0
    assert any("hospital-1: protects each record, (ε = " in line for line in lines)
    assert any("ε ≤" in line for line in lines)  # the round table shows ε


def test_a_node_stops_training_at_the_round_its_budget_allows(
    classify_config: RunConfig, tmp_path: Path
):
    """Explicit σ from the coordinator; hospital-1's admin set a small budget."""
    sigma, budget, rounds = 0.9, 3.0, 6
    config = _dp(replace_section(classify_config, "federation", rounds=rounds, min_hospitals=1),
                 tmp_path / "ledgers", noise_multiplier=sigma, target_epsilon=50.0)
    nodes = {0: {"partition-id": 0, "privacy-epsilon-budget": budget}, 1: {"partition-id": 1}}
    lines: list[str] = []
    _run(config, InProcessGrid(2, node_configs=nodes), tmp_path / "run", lines)

    ledger = read_ledger_file(tmp_path / "ledgers" / "hospital-1.json")
    step = ledger.history()[0]
    allowed = max(k for k in range(rounds + 1)
                  if compute_epsilon([step] * k, ledger.delta, "rdp") <= budget)
    assert 0 < allowed < rounds
    assert len(ledger.entries) == allowed
    assert ledger.epsilon_spent() <= budget
    records = _rounds(tmp_path / "run")
    trained = [r["round"] for r in records if "hospital-1" in r["hospitals_used"]]
    assert trained == list(range(1, allowed + 1))
    refused = records[allowed]["refused"]["hospital-1"]
    assert "privacy budget exhausted" in refused and f"{budget:.3f}" in refused
    assert all("hospital-2" in r["hospitals_used"] for r in records)  # the others carry on


def test_a_node_budget_applies_even_when_the_coordinator_asks_for_no_dp(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(classify_config, "privacy", enabled=False,
                             ledger_dir=str(tmp_path / "ledgers"))
    nodes = {0: {"partition-id": 0, "privacy-epsilon-budget": 2.0}, 1: {"partition-id": 1}}
    _run(config, InProcessGrid(2, node_configs=nodes), tmp_path / "run", [])
    train = _rounds(tmp_path / "run")[-1]["train"]
    assert train["hospital-1"]["dp"] == 1.0 and train["hospital-1"]["epsilon"] <= 2.0
    assert train["hospital-2"]["dp"] == 0.0 and "epsilon" not in train["hospital-2"]


def test_a_restarted_node_continues_its_ledger_into_the_next_run(
    classify_config: RunConfig, tmp_path: Path
):
    config = _dp(replace_section(classify_config, "federation", rounds=2), tmp_path / "ledgers",
                 target_epsilon=6.0)
    _run(config, InProcessGrid(2), tmp_path / "run1", [])
    first = read_ledger_file(tmp_path / "ledgers" / "hospital-1.json")
    session._models.clear()  # a node restart: nothing survives in memory
    session._data.clear()
    _run(config, InProcessGrid(2), tmp_path / "run2", [])
    second = read_ledger_file(tmp_path / "ledgers" / "hospital-1.json")
    assert second.entries[:2] == first.entries
    assert len(second.entries) == 4
    assert second.epsilon_spent() > first.epsilon_spent()
    assert second.epsilon_spent() <= 6.0 + 1e-9  # the budget covers both runs together
    plans = list(second.plans.values())
    assert plans[1].noise_multiplier > plans[0].noise_multiplier  # prior spend was counted


def test_a_tampered_ledger_is_refused_and_never_reset(classify_config: RunConfig, tmp_path: Path):
    config = _dp(replace_section(classify_config, "federation", rounds=1, min_hospitals=1),
                 tmp_path / "ledgers")
    _run(config, InProcessGrid(2), tmp_path / "run1", [])
    path = tmp_path / "ledgers" / "hospital-1.json"
    document = json.loads(path.read_text())
    document["entries"][0]["epsilon"] = 0.01  # someone "resets" the spend by hand
    path.write_text(json.dumps(document))
    tampered = path.read_bytes()
    _run(config, InProcessGrid(2), tmp_path / "run2", [])
    (record,) = _rounds(tmp_path / "run2")
    assert record["hospitals_used"] == ["hospital-2"]
    assert "checksum" in record["refused"]["hospital-1"]
    assert path.read_bytes() == tampered


def test_a_hospital_refuses_a_delta_that_would_let_a_record_leak(
    classify_config: RunConfig, tmp_path: Path
):
    """δ ≥ 1/n is refused whatever the coordinator asks; the automatic δ is below 1/n."""
    one = in_clear(classify_config)  # one hospital: no sum to hide it in
    config = _dp(replace_section(one, "federation", rounds=1, min_hospitals=1),
                 tmp_path / "ledgers", target_delta=0.5)
    _run(config, InProcessGrid(1), tmp_path / "run", [])
    (record,) = _rounds(tmp_path / "run")
    assert record["hospitals_used"] == []
    assert "privacy.target_delta = 0.5 is not below 1/n" in record["refused"]["hospital-1"]
    assert not (tmp_path / "ledgers" / "hospital-1.json").exists()

    automatic = _dp(replace_section(one, "federation", rounds=1, min_hospitals=1),
                    tmp_path / "ledgers2")
    _run(automatic, InProcessGrid(1), tmp_path / "run2", [])
    (record,) = _rounds(tmp_path / "run2")
    n = record["train"]["hospital-1"]["num-examples"]
    assert record["train"]["hospital-1"]["delta"] < 1 / n
    assert "train-last-loss" not in record["train"]["hospital-1"]  # not released under DP


def test_the_ledger_is_locked_from_budget_check_to_record(
    classify_config: RunConfig, tmp_path: Path
):
    """A second holder (another process of the node) cannot take the lock meanwhile."""
    import fcntl

    from fedtune.client.hospital import hospital_identity
    from fedtune.client.node_settings import NodeSettings
    from fedtune.client.privacy import ledger_lock, ledger_path

    config = _dp(classify_config, tmp_path / "ledgers")
    node = NodeSettings(partition_id=0)
    identity = hospital_identity(node, config.data)
    lock_file = ledger_path(config, identity, node).with_suffix(".json.lock")
    with (
        ledger_lock(identity, config, node),
        lock_file.open("a") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with lock_file.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards


def test_the_automatic_delta_of_an_existing_ledger_is_kept(tmp_path: Path):
    from fedtune.client.privacy import choose_delta, default_delta
    from fedtune.client.privacy_ledger import PrivacyLedger

    path = tmp_path / "h.json"
    ledger = PrivacyLedger.open(path, "h", "rdp", default_delta(1200), "record")
    ledger.record("run", 1, 1.0, 0.05, 10)
    assert ledger.delta == 1e-5
    assert default_delta(90) == 1e-3  # the data shrank: a fresh default would differ
    assert choose_delta(0.0, 90, "record", path) == 1e-5  # ...but the ledger's δ stays
    assert choose_delta(0.0, 90, "record", tmp_path / "new.json") == 1e-3
    with pytest.raises(ConfigError, match="not below 1/n"):
        choose_delta(0.02, 90, "patient", path)


@pytest.mark.parametrize(("units", "delta"), [
    (1, 1e-1), (9, 1e-2), (10, 1e-2), (11, 1e-3), (90, 1e-3), (999, 1e-4), (1000, 1e-4),
    (1001, 1e-5), (1200, 1e-5), (10**6, 1e-7),
])
def test_default_delta_is_at_most_one_tenth_of_one_over_n(units: int, delta: float):
    from fedtune.client.privacy import default_delta

    assert default_delta(units) == delta
    assert default_delta(units) * units * 10 <= 1.0 + 1e-12
    assert default_delta(units) * 10 * units * 10 > 1.0  # the largest such power of ten


def test_an_old_rule_ledger_keeps_its_delta_and_is_flagged_weaker(tmp_path: Path):
    """A ledger begun under the old rule (δ just below 1/n: n = 999 gave 1e-3) keeps its δ,
    and `fedtune ledger` says it is weaker than today's default."""
    import json

    from fedtune.client.privacy import choose_delta
    from fedtune.client.privacy_ledger import (
        OLD_DELTA_RULE,
        PrivacyLedger,
        _checksum,
        describe_ledger,
    )

    path = tmp_path / "old.json"
    ledger = PrivacyLedger.open(path, "h", "rdp", 1e-3, "record")
    ledger.record("run", 1, 1.0, 0.05, 10)
    document = json.loads(path.read_text())
    body = {k: v for k, v in document.items() if k not in ("checksum", "unit", "delta_rule")}
    path.write_text(json.dumps({**body, "checksum": _checksum(body)}))  # as old code wrote it
    assert choose_delta(0.0, 999, "record", path) == 1e-3  # kept: ε is not re-stated
    reopened = PrivacyLedger.open(path, "h", "rdp", 1e-3, "record")
    assert reopened.delta_rule == OLD_DELTA_RULE and reopened.unit == "record"
    assert "WEAKER THAN TODAY'S DEFAULT" in describe_ledger(path)
    fresh = tmp_path / "new.json"
    assert choose_delta(0.0, 999, "record", fresh) == 1e-4
    new = PrivacyLedger.open(fresh, "h", "rdp", 1e-4, "record")
    new.record("run", 1, 1.0, 0.05, 10)
    assert "WEAKER" not in describe_ledger(fresh)
