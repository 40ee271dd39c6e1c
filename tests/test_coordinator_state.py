"""The coordinator's state is one object saved with each change; resume loads it, not logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_grid import CrashAtRound, InProcessGrid
from tiny import in_clear, replace_section

from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.server.records import (
    DamagedLog,
    Evaluation,
    RoundRecord,
    RoundStarted,
    SumRevealed,
    completed_rounds,
)
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory
from fedtune.server.state import CoordinatorState, StateError


def _run(config: RunConfig, grid: InProcessGrid, path: Path, resume: bool = False,
         lines: list[str] | None = None) -> RunDirectory:
    run_dir = RunDirectory(path)
    if not resume:
        run_dir.create(config)
    run_federation(grid, config, run_dir, initial_global_adapter(config),
                   say=(lines.append if lines is not None else lambda _line: None), resume=resume)
    return run_dir


def test_the_state_round_trips_and_damage_is_refused():
    state = CoordinatorState()
    assert state.next_attempt(1) == 1 and state.next_attempt(1) == 2
    state.released(1, sampled=3, connected=4)
    state.guarantees["St-Anna"] = {"epsilon": 1.5, "delta": 1e-5, "epsilon-budget": 8.0}
    state.completed(1, {"accuracy": 0.5, "loss": 1.0}, {"St-Anna": {"data_sha256": "ab"}})
    state.base_test = {"weighted": {"accuracy": 0.1}, "per_hospital": {}, "refused": {}}
    saved = json.loads(json.dumps(state.state_dict()))  # what is on disk
    again = CoordinatorState()
    again.load_state_dict(saved)
    assert again == state and again.participation == [3] and again.connected == [4]
    again.rolled_back(0)
    assert again.completed_round == 0 and again.validation == {}
    assert again.releases == state.releases and again.attempts == {1: 2}  # they happened
    with pytest.raises(StateError, match="version 99"):
        CoordinatorState().load_state_dict({**saved, "version": 99})
    with pytest.raises(StateError, match="damaged"):
        CoordinatorState().load_state_dict({**saved, "releases": [[1, 2]]})


def test_a_resumed_run_continues_from_its_state_without_the_metrics_log(
    classify_config: RunConfig, tmp_path: Path
):
    """Killed at round 3 and metrics.jsonl lost: the resumed run still ends bit-identical to
    one that never stopped, under a new attempt number, with the first start's base metrics."""
    config = in_clear(replace_section(classify_config, "federation", rounds=3, min_hospitals=2,
                                      strategy="fedadam", server_learning_rate=0.05))
    straight = _run(config, InProcessGrid(3), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(config, CrashAtRound(3, crash_round=3), tmp_path / "resumed")
    stopped = RunDirectory(tmp_path / "resumed")
    saved = stopped.load_state()
    assert saved.completed_round == 2 and saved.attempts == {1: 1, 2: 1, 3: 1}
    stopped.metrics_file.rename(tmp_path / "metrics-lost.jsonl")

    lines: list[str] = []
    _run(config, InProcessGrid(3), tmp_path / "resumed", resume=True, lines=lines)
    assert any("after round 2" in line for line in lines)
    for name, value in straight.load_adapter(3).items():
        np.testing.assert_array_equal(stopped.load_adapter(3)[name], value)
    state = stopped.load_state()
    assert state.completed_round == 3 and state.attempts[3] == 2  # never attempt 1 again
    assert stopped.summary()["base_test"] == straight.summary()["base_test"]
    assert set(state.validation) == {1, 2, 3}
    (resumed_round,) = completed_rounds(stopped.records())  # the new log has round 3 only
    assert (resumed_round.round, resumed_round.attempt) == (3, 2)


def test_a_run_without_state_is_refused_with_a_reason(classify_config: RunConfig, tmp_path):
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(classify_config)
    with pytest.raises(StateError, match="no coordinator-state.json"):
        _run(classify_config, InProcessGrid(2), tmp_path / "run", resume=True)
    run_dir.state_file.write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        run_dir.load_state()


@pytest.mark.parametrize("with_training", [False, True])
def test_the_metrics_log_reads_back_as_typed_records(
    classify_config: RunConfig, tmp_path, with_training: bool
):
    config = replace_section(in_clear(classify_config), "federation", rounds=2, min_hospitals=2)
    config = replace_section(config, "evaluation", with_training=with_training)
    run_dir = _run(config, InProcessGrid(2), tmp_path / "run")
    records = run_dir.records()
    if with_training:  # each round's validation arrives with the next message carrying it
        expected = [Evaluation, RoundStarted, SumRevealed, RoundRecord,
                    RoundStarted, Evaluation, SumRevealed, RoundRecord, Evaluation, Evaluation]
    else:
        expected = [Evaluation, RoundStarted, SumRevealed, RoundRecord,
                    RoundStarted, SumRevealed, RoundRecord, Evaluation]
    assert [type(r) for r in records] == expected
    rounds = completed_rounds(records)
    assert [r.round for r in rounds] == [1, 2]
    # round 2 starts from round 1's adapter
    assert rounds[0].global_adapter_sha256 == records[4].global_adapter_sha256
    state = run_dir.load_state()
    if with_training:
        validations = [r for r in records if isinstance(r, Evaluation)
                       and r.split == "validation"]
        assert [v.round for v in validations] == [1, 2]
        assert state.validation[2] == validations[1].weighted
        assert rounds[1].validation is None
    else:
        assert rounds[0].validation is not None and "weighted" in rounds[0].validation
        assert state.validation[2] == rounds[1].validation["weighted"]
    with run_dir.metrics_file.open("a") as handle:
        handle.write(json.dumps({"event": "teleport", "round": 3}) + "\n")
    line = len(expected) + 1
    with pytest.raises(DamagedLog, match=rf"metrics.jsonl:{line}: unknown event 'teleport'"):
        run_dir.records()


def test_a_hospital_that_never_answers_a_plain_round_is_named(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    run_dir = _run(config, InProcessGrid(3, silent={1002}), tmp_path / "run")
    (record,) = completed_rounds(run_dir.records())
    assert record.hospitals_used == ["hospital-1", "hospital-2"]
    assert record.refused == {"node 1002": "no reply in the training stage (dropped out)"}
