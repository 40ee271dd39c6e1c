"""`evaluation.with_training`: a round's validation rides on the next message that carries
its adapter, and gives exactly the numbers of a separate evaluation message.

Two runs of the same federation (three hospitals, three rounds) on the real ClientApp, one
validating in separate evaluate messages and one with the training: the same global
adapters, the same per-hospital validation of every round, the same test metrics, and one
model-carrying message fewer per hospital and round. Deltas travel in clear here because
secure aggregation's stochastic rounding (CSPRNG) makes two secure runs differ in the last
bits; the secure path is played on 127.0.0.1 in tests/test_deployment.py.
"""

from __future__ import annotations

from pathlib import Path

from fake_grid import InProcessGrid
from tiny import in_clear, replace_section

from fedtune.core.adapters import adapter_sha256
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.wire import EVALUATE, TRAIN
from fedtune.server.records import Evaluation, RoundRecord
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory


def _run(config: RunConfig, path: Path) -> tuple[RunDirectory, InProcessGrid, list[str]]:
    grid = InProcessGrid(3)
    run_dir = RunDirectory(path)
    run_dir.create(config)
    lines: list[str] = []
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lines.append)
    return run_dir, grid, lines


def _validation_by_round(run_dir: RunDirectory) -> dict[int, dict[str, dict[str, float]]]:
    out = {}
    for record in run_dir.records():
        if isinstance(record, RoundRecord) and record.validation is not None:
            out[record.round] = record.validation["per_hospital"]
        elif isinstance(record, Evaluation) and record.split == "validation":
            out[record.round] = record.per_hospital
    return out


def test_validation_with_training_equals_the_separate_evaluation(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=3, min_hospitals=3)
    separate_config = replace_section(config, "evaluation", with_training=False)
    merged_config = replace_section(config, "evaluation", with_training=True)
    separate, separate_grid, separate_lines = _run(separate_config, tmp_path / "separate")
    merged, merged_grid, merged_lines = _run(merged_config, tmp_path / "merged")

    assert separate.saved_rounds() == merged.saved_rounds() == [0, 1, 2, 3]
    for server_round in (1, 2, 3):  # training is unchanged by evaluating first
        assert adapter_sha256(separate.load_adapter(server_round)) == adapter_sha256(
            merged.load_adapter(server_round))
    expected, got = _validation_by_round(separate), _validation_by_round(merged)
    assert sorted(expected) == sorted(got) == [1, 2, 3]
    for server_round in (1, 2, 3):
        assert sorted(got[server_round]) == ["hospital-1", "hospital-2", "hospital-3"]
        for hospital, metrics in expected[server_round].items():
            assert got[server_round][hospital] == metrics, (server_round, hospital)
    assert separate.load_state().validation == merged.load_state().validation
    assert separate.summary()["final_test"] == merged.summary()["final_test"]
    assert separate.summary()["best_round"] == merged.summary()["best_round"]

    def model_messages(grid: InProcessGrid) -> int:  # requests carrying an adapter
        kinds = (EVALUATE, TRAIN)
        return sum(1 for m in grid.sent if m.metadata.message_type in kinds)

    # base test + 3 × (training + validation) + final test, against one fewer per round
    assert model_messages(separate_grid) == 3 * (1 + 3 * 2 + 1)
    assert model_messages(merged_grid) == 3 * (1 + 3 + 1)
    # The round table prints the same lines, each once its validation is known.
    table = [line.split()[:4] for line in merged_lines if line.split()[:1] in (["1"], ["2"],
                                                                               ["3"])]
    assert table == [line.split()[:4] for line in separate_lines
                     if line.split()[:1] in (["1"], ["2"], ["3"])]
