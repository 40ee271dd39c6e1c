"""Privacy ledger: ε equals Opacus's own accounting, survives restarts, and refuses to reset."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.client.privacy_ledger import (
    LedgerError,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    RunPlan,
    calibrate_noise_multiplier,
    compute_epsilon,
    describe_ledger,
    read_ledger_file,
)

DELTA = 1e-5
# Four rounds with varying σ and q; the first two are identical, as in a steady run.
ROUNDS = [(1.1, 0.05, 20), (1.1, 0.05, 20), (0.9, 0.04, 15), (1.3, 0.06, 10)]


def open_ledger(path: Path, accountant: str = "rdp", hospital: str = "st-mary") -> PrivacyLedger:
    return PrivacyLedger.open(path, hospital=hospital, accountant=accountant, delta=DELTA,
                              unit="record")


def stepped_epsilon(accountant: RDPAccountant | PRVAccountant, rounds: list) -> float:
    """Drive a fresh Opacus accountant one DP-SGD step at a time, as the PrivacyEngine does."""
    for sigma, q, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return float(accountant.get_epsilon(delta=DELTA))


@pytest.mark.parametrize(
    ("accountant", "factory", "rounds", "rel"),
    [("rdp", RDPAccountant, ROUNDS, 1e-9), ("prv", PRVAccountant, ROUNDS[1:3], 1e-3)],
)
def test_cumulative_epsilon_equals_opacus_driven_step_by_step(
    tmp_path: Path, accountant: str, factory: Callable, rounds: list, rel: float
):
    ledger = open_ledger(tmp_path / "ledger.json", accountant)
    previous = 0.0
    for number, (sigma, q, steps) in enumerate(rounds, start=1):
        entry = ledger.record("run-a", number, sigma, q, steps)
        expected = stepped_epsilon(factory(), rounds[:number])
        assert entry.epsilon == pytest.approx(expected, rel=rel)
        assert ledger.epsilon_spent() == pytest.approx(expected, rel=rel)
        assert entry.epsilon > previous
        previous = entry.epsilon


def test_compute_epsilon_empty_history_and_unknown_accountant():
    assert compute_epsilon([], DELTA, "rdp") == 0.0
    with pytest.raises(ValueError, match="rdp.*prv"):
        compute_epsilon(ROUNDS, DELTA, "gdp")


def test_calibrated_noise_is_safe_and_tight():
    target, q, steps = 8.0, 0.05, 100
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, "rdp")
    assert compute_epsilon([(sigma, q, steps)], DELTA, "rdp") <= target
    assert compute_epsilon([(sigma * (1 - 2e-3), q, steps)], DELTA, "rdp") > target
    reference = get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert sigma == pytest.approx(reference, rel=1e-2)


def test_calibration_accounts_for_prior_rounds():
    target, q, steps = 8.0, 0.05, 100
    prior = [(1.0, 0.05, 100)]
    alone = calibrate_noise_multiplier(target, DELTA, q, steps, "rdp")
    after_prior = calibrate_noise_multiplier(target, DELTA, q, steps, "rdp", prior=prior)
    assert after_prior > alone
    assert compute_epsilon([*prior, (after_prior, q, steps)], DELTA, "rdp") <= target
    assert compute_epsilon([*prior, (after_prior * (1 - 2e-3), q, steps)], DELTA, "rdp") > target


def test_calibration_with_prv_respects_target():
    sigma = calibrate_noise_multiplier(4.0, DELTA, 0.05, 50, "prv")
    assert compute_epsilon([(sigma, 0.05, 50)], DELTA, "prv") <= 4.0


def test_calibration_refuses_spent_budget_and_impossible_targets():
    prior = [(0.8, 0.1, 500)]
    spent = compute_epsilon(prior, DELTA, "rdp")
    with pytest.raises(PrivacyBudgetExhausted) as raised:
        calibrate_noise_multiplier(spent * 0.9, DELTA, 0.1, 10, "rdp", prior=prior)
    assert raised.value.spent == pytest.approx(spent)
    with pytest.raises(ValueError, match="more training examples or fewer rounds"):
        calibrate_noise_multiplier(0.01, DELTA, 1.0, 1000, "rdp")


def test_ledger_continues_across_a_restart(tmp_path: Path):
    path = tmp_path / "ledger.json"
    first = open_ledger(path)
    first.set_plan("run-a", RunPlan(1.1, 0.05, 20, planned_rounds=3, target_epsilon=8.0))
    for number, (sigma, q, steps) in enumerate(ROUNDS[:2], start=1):
        first.record("run-a", number, sigma, q, steps)

    reopened = open_ledger(path)
    assert reopened.plan("run-a") == RunPlan(1.1, 0.05, 20, 3, 8.0)
    assert reopened.plan("run-b") is None
    entry = reopened.record("run-a", 3, *ROUNDS[2])
    assert len(reopened.history()) == 3
    assert reopened.history() == ROUNDS[:3]
    assert entry.epsilon == pytest.approx(compute_epsilon(ROUNDS[:3], DELTA, "rdp"), rel=1e-12)
    assert len(open_ledger(path).entries) == 3


def test_missing_file_is_a_new_empty_ledger_not_yet_written(tmp_path: Path):
    ledger = open_ledger(tmp_path / "nested" / "ledger.json")
    assert ledger.entries == [] and ledger.epsilon_spent() == 0.0
    assert not (tmp_path / "nested").exists()


@pytest.fixture
def recorded_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.json"
    ledger = open_ledger(path)
    for number, (sigma, q, steps) in enumerate(ROUNDS[:2], start=1):
        ledger.record("run-a", number, sigma, q, steps)
    return path


def _halve_first_epsilon(original: bytes) -> bytes:
    document = json.loads(original)
    document["entries"][0]["epsilon"] /= 2  # checksum deliberately left as it was
    return json.dumps(document, indent=2).encode()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_halve_first_epsilon, "checksum mismatch.*edited by hand or corrupted"),
        (lambda original: original[: len(original) // 2], "not a valid"),
        (lambda original: b"\x00\xffgarbage", "not a valid"),
        (lambda original: b"", "not a valid"),
        (lambda original: b'{"entries": []}', "not a valid"),
        (lambda original: original.replace(b"ledger/1", b"ledger/9"), "unknown ledger format"),
    ],
    ids=["edited", "truncated", "garbage", "empty", "no-format", "future-format"],
)
def test_untrustworthy_file_is_refused_and_left_untouched(
    recorded_ledger: Path, corrupt: Callable[[bytes], bytes], message: str
):
    recorded_ledger.write_bytes(corrupt(recorded_ledger.read_bytes()))
    before = recorded_ledger.read_bytes()
    with pytest.raises(LedgerError, match=message):
        open_ledger(recorded_ledger)
    with pytest.raises(LedgerError, match=message):
        describe_ledger(recorded_ledger)
    assert recorded_ledger.read_bytes() == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hospital": "north-clinic"}, "belongs to 'st-mary', not 'north-clinic'"),
        ({"delta": 1e-6}, "δ=1e-05"),
        ({"accountant": "prv"}, "accountant='rdp'"),
        ({"unit": "patient"}, "protects each record, but the run asks for privacy.unit"),
    ],
)
def test_foreign_or_restated_ledger_is_refused_and_left_untouched(
    recorded_ledger: Path, settings: dict, message: str
):
    before = recorded_ledger.read_bytes()
    wanted = {"hospital": "st-mary", "accountant": "rdp", "delta": DELTA, "unit": "record",
              **settings}
    with pytest.raises(LedgerError, match=message):
        PrivacyLedger.open(recorded_ledger, **wanted)
    assert recorded_ledger.read_bytes() == before


def test_check_budget_refuses_the_round_that_would_exceed(tmp_path: Path):
    ledger = open_ledger(tmp_path / "ledger.json")
    ledger.record("run-a", 1, *ROUNDS[0])
    spent = ledger.epsilon_spent()
    after = ledger.epsilon_after(*ROUNDS[1])
    assert ledger.check_budget(after, *ROUNDS[1]) == pytest.approx(after)  # exact fit passes
    with pytest.raises(PrivacyBudgetExhausted) as raised:
        ledger.check_budget((spent + after) / 2, *ROUNDS[1])
    assert f"ε spent {spent:.3f} / ε budget {(spent + after) / 2:.3f}" in str(raised.value)
    assert raised.value.next_epsilon == pytest.approx(after)


def test_fixed_noise_run_stops_exactly_when_the_budget_runs_out(tmp_path: Path):
    sigma, q, steps = 1.0, 0.05, 50

    def independent_epsilon(rounds: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, steps * rounds)]
        return float(accountant.get_epsilon(delta=DELTA))

    budget = (independent_epsilon(4) + independent_epsilon(5)) / 2
    allowed = max(k for k in range(11) if independent_epsilon(k) <= budget)
    ledger = open_ledger(tmp_path / "ledger.json")
    stopped_at = None
    for server_round in range(1, 11):
        try:
            ledger.check_budget(budget, sigma, q, steps)
        except PrivacyBudgetExhausted:
            stopped_at = server_round
            break
        ledger.record("run-a", server_round, sigma, q, steps)
    assert allowed == 4
    assert len(ledger.entries) == allowed
    assert stopped_at == allowed + 1
    assert ledger.epsilon_spent() <= budget


def test_file_is_private_atomic_and_exports_a_recomputable_history(recorded_ledger: Path):
    assert stat.S_IMODE(os.stat(recorded_ledger).st_mode) == 0o600
    assert os.listdir(recorded_ledger.parent) == [recorded_ledger.name]
    ledger = read_ledger_file(recorded_ledger)
    assert ledger.hospital == "st-mary" and ledger.accountant == "rdp" and ledger.delta == DELTA
    history = ledger.history_json()
    assert [set(item) for item in history] == [
        {
            "round",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "epsilon",
            "delta",
            "accountant",
            "run_id",
        }
    ] * 2
    rebuilt = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history]
    assert compute_epsilon(rebuilt, DELTA, "rdp") == pytest.approx(history[-1]["epsilon"])


def test_failed_save_leaves_file_and_memory_as_they_were(
    recorded_ledger: Path, monkeypatch: pytest.MonkeyPatch
):
    ledger = open_ledger(recorded_ledger)
    before = recorded_ledger.read_bytes()

    def disk_full(source: str, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ledger.record("run-a", 3, *ROUNDS[2])
    assert recorded_ledger.read_bytes() == before
    assert os.listdir(recorded_ledger.parent) == [recorded_ledger.name]
    assert len(ledger.entries) == 2


def test_describe_ledger_in_plain_words(recorded_ledger: Path):
    text = describe_ledger(recorded_ledger)
    ledger = read_ledger_file(recorded_ledger)
    assert "st-mary" in text
    assert f"ε spent: {ledger.epsilon_spent():.3f}" in text
    round_lines = [line for line in text.splitlines() if line.startswith("run run-a round ")]
    assert len(round_lines) == 2
    assert "run run-a round 2: σ=1.10, q=0.050, 20 steps → ε=" in text
    assert "protects: each record" in text and "about k·ε" in text  # what is not covered
    assert "meaning: whether or not any one record's data was used" in text
