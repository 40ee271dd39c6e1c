"""Versions of the global adapter: best round, early stopping, retention, rollback, listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_grid import InProcessGrid
from flwr.app import Message
from tiny import in_clear, replace_section

from fedtune.core.adapters import adapter_sha256
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.wire import EVALUATE, METRICS, TRAIN, VALIDATION
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory
from fedtune.server.versions import (
    VersionError,
    best_round,
    format_versions,
    list_versions,
    roll_back,
)


def _run(config: RunConfig, grid: InProcessGrid, path: Path, resume: bool = False) -> list[str]:
    run_dir = RunDirectory(path)
    if not resume:
        run_dir.create(config)
    lines: list[str] = []
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lines.append,
                   resume=resume)
    return lines


def _validation_accuracy(per_round: dict[int, float]):  # type: ignore[no-untyped-def]
    """Hospitals' validation replies report this accuracy for each round's adapter (a
    scripted curve), wherever the validation travels: in its own evaluate reply, or
    (evaluation.with_training) with the next round's training reply or the final test's."""
    trained = {"round": 0}  # the last round a training reply came for

    def tamper(_node_id: int, reply: Message) -> Message:
        if reply.has_error():
            return reply
        kind, group = reply.metadata.message_type, reply.metadata.group_id
        metrics, validated = None, None
        if kind == TRAIN:
            trained["round"] = int(group)
            validated = int(group) - 1
        elif kind == EVALUATE:
            validated = trained["round"]
        if kind == EVALUATE and group.endswith("-validation"):
            metrics, validated = reply.content.metric_records[METRICS], int(group.split("-")[0])
        elif VALIDATION in reply.content.metric_records:
            metrics = reply.content.metric_records[VALIDATION]
        if metrics is not None and validated in per_round:
            metrics["accuracy"] = per_round[validated]
            metrics["loss"] = 1.0
        return reply

    return tamper


def _rounds_run(run_dir: RunDirectory) -> list[int]:
    return [r["round"] for r in run_dir.read_metrics() if r["event"] == "round"]


@pytest.mark.parametrize("with_training", [False, True])
def test_early_stopping_stops_after_patience_rounds_without_improvement(
    classify_config: RunConfig, tmp_path: Path, with_training: bool
):
    config = replace_section(in_clear(classify_config), "federation", rounds=6,
                             early_stopping_patience=2)
    config = replace_section(config, "evaluation", with_training=with_training)
    curve = {1: 0.6, 2: 0.5, 3: 0.55, 4: 0.9, 5: 0.9, 6: 0.9}
    grid = InProcessGrid(2, tamper=_validation_accuracy(curve))
    lines = _run(config, grid, tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    # Round 1 stayed best for 2 more rounds; validated with the next round's training, round
    # 3's validation is known one round later, so the run stops one round later.
    last = 4 if with_training else 3
    assert _rounds_run(run_dir) == list(range(1, last + 1))
    # ...and then the final evaluation validates round 4 (0.9): the best of the run.
    best = 4 if with_training else 1
    assert best_round(run_dir) == best
    assert run_dir.summary()["best_round"] == best
    assert any(line.startswith(f"Early stopping after round {last}") and "round 1" in line
               for line in lines)
    assert set(run_dir.load_state().validation) == set(range(1, last + 1))


def test_retention_keeps_the_initial_the_last_and_the_best_adapters(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=4, keep_adapters=1)
    grid = InProcessGrid(2, tamper=_validation_accuracy({1: 0.2, 2: 0.7, 3: 0.3, 4: 0.4}))
    _run(config, grid, tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.saved_rounds() == [0, 2, 4]
    hashes = {r["round"]: r["global_adapter_sha256"] for r in run_dir.read_metrics()
              if r["event"] == "round"}
    assert hashes[2] == adapter_sha256(run_dir.load_adapter(2))  # the record stays true
    assert set(hashes) == {1, 2, 3, 4}


def test_versions_lists_every_round_with_its_metrics_and_marks_the_best(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=3)
    _run(config, InProcessGrid(2, tamper=_validation_accuracy({1: 0.25, 2: 0.75, 3: 0.5})),
         tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    versions = list_versions(run_dir)
    assert [v.server_round for v in versions] == [0, 1, 2, 3]
    assert [v.validation.get("accuracy") for v in versions] == [None, 0.25, 0.75, 0.5]
    assert versions[2].sha256 == adapter_sha256(run_dir.load_adapter(2))
    table = format_versions(run_dir).splitlines()
    assert "initial" in table[1]
    (best_line,) = [line for line in table if "← best" in line]
    assert best_line.split()[0] == "2" and "0.7500" in best_line


def test_rollback_moves_later_rounds_aside_and_a_resume_continues_from_round_k(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=3)
    grid = InProcessGrid(2)
    _run(config, grid, tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    before = {r: run_dir.load_adapter(r) for r in run_dir.saved_rounds()}

    assert roll_back(run_dir, 1) == [2, 3]
    assert run_dir.saved_rounds() == [0, 1]
    (aside,) = list((run_dir.path / "rolled-back").iterdir())
    moved = {p.name for p in (aside / "adapters").iterdir()}
    assert moved == {"round-0002.safetensors", "round-0003.safetensors"}
    assert (aside / "strategy" / "round-0002.json").is_file()
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "rollback"]
    assert record["to_round"] == 1 and record["moved_rounds"] == [2, 3]
    assert record["adapter_sha256"] == adapter_sha256(before[1])

    _run(config, grid, tmp_path / "run", resume=True)
    assert run_dir.saved_rounds() == [0, 1, 2, 3]
    starts = [(r["round"], r["attempt"], r["global_adapter_sha256"])
              for r in run_dir.read_metrics() if r["event"] == "round-start"]
    assert starts[-2][:2] == (2, 2)  # a new attempt at round 2, from round 1's adapter
    assert starts[-2][2] == adapter_sha256(before[1])
    assert all(np.array_equal(run_dir.load_adapter(1)[k], before[1][k]) for k in before[1])


def test_rollback_to_a_round_that_was_not_kept_names_the_saved_ones(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(in_clear(classify_config), "federation", rounds=1)
    _run(config, InProcessGrid(2), tmp_path / "run")
    with pytest.raises(VersionError, match="round 5 has no saved adapter .* saved rounds: 0, 1"):
        roll_back(RunDirectory(tmp_path / "run"), 5)


def test_negative_patience_or_retention_is_refused(classify_config: RunConfig):
    for key in ("early_stopping_patience", "keep_adapters", "round_retries"):
        with pytest.raises(ConfigError, match=f"federation.{key} must be >= 0"):
            replace_section(classify_config, "federation", **{key: -1})


def test_after_a_rollback_export_of_round_k_is_exactly_the_adapter_saved_at_round_k(
    classify_config: RunConfig, tmp_path: Path
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.core.model import get_adapter
    from fedtune.server.export import export_adapter

    config = replace_section(in_clear(classify_config), "federation", rounds=3)
    _run(config, InProcessGrid(2), tmp_path / "run")
    run_dir = RunDirectory(tmp_path / "run")
    saved = {r: run_dir.load_adapter(r) for r in (1, 2)}
    roll_back(run_dir, 1)
    out = tmp_path / "export"
    assert export_adapter(run_dir, out, "final", merged=False) == 1  # the latest is round 1 now
    base = AutoModelForSequenceClassification.from_pretrained(
        config.model.source, num_labels=len(config.model.labels)
    )
    exported = get_adapter(PeftModel.from_pretrained(base, str(out)))
    assert set(exported) == set(saved[1])
    assert all(np.array_equal(exported[k], saved[1][k]) for k in saved[1])
    assert not all(np.array_equal(exported[k], saved[2][k]) for k in saved[2])
    assert adapter_sha256(saved[1]) in (out / "README.md").read_text()
