"""The coordinator's round loop with the real ClientApp, in process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_grid import InProcessGrid
from flwr.app import Array, Message
from tiny import deployed_nodes, in_clear, replace_section

from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.wire import DELTA, TRAIN
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory


def _run(config: RunConfig, grid: InProcessGrid, tmp_path, lines: list[str]) -> dict:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    return run_federation(grid, config, run_dir, initial_global_adapter(config), say=lines.append)


def test_classification_rounds_improve_held_out_loss_and_save_every_round(
    classify_config: RunConfig, tmp_path
):
    config = replace_section(classify_config, "train", local_steps=8)
    config = replace_section(config, "federation", rounds=2, min_hospitals=3)
    lines: list[str] = []
    summary = _run(config, InProcessGrid(3), tmp_path, lines)
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.saved_rounds() == [0, 1, 2]
    assert summary["final_test"]["weighted"]["loss"] < summary["base_test"]["weighted"]["loss"]
    assert set(summary["final_test"]["per_hospital"]) == {"hospital-1", "hospital-2", "hospital-3"}
    rounds = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["hospitals_used"]) == ["hospital-1", "hospital-2", "hospital-3"]
               for r in rounds)
    changed = [
        name for name, value in run_dir.load_adapter(2).items()
        if not np.array_equal(value, run_dir.load_adapter(0)[name])
    ]
    assert any("lora_B" in name for name in changed)
    assert any("classifier" in name for name in changed)
    assert any("held-out" in line for line in lines)


def test_global_adapter_is_the_example_weighted_mean_of_local_adapters(
    classify_config: RunConfig, tmp_path
):
    """With η = 1 the new global adapter is Σ nᵢ·localᵢ / Σ nᵢ (FedAvg of weights)."""
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    grid = InProcessGrid(2)
    _run(config, grid, tmp_path, [])
    run_dir = RunDirectory(tmp_path / "run")
    start, end = run_dir.load_adapter(0), run_dir.load_adapter(1)
    replies = [m for m in grid.sent if m.metadata.message_type == TRAIN]
    assert len(replies) == 2
    # Recompute each hospital's local training by replaying the same request in process.
    from fedtune.client.app import app as client_app

    deltas, weights = [], []
    for message in replies:
        reply = client_app(message, grid.contexts[message.metadata.dst_node_id])
        record = reply.content.array_records[DELTA]
        deltas.append({k: v.numpy() for k, v in record.items()})
        weights.append(reply.content.metric_records["metrics"]["num-examples"])
    for name in start:
        expected = start[name] + sum(
            w * d[name] for w, d in zip(weights, deltas, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(end[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("corruption", "reason"),
    [
        ("nan", "NaN/infinite"),
        ("shape", "has shape"),
        ("missing", "missing tensors"),
    ],
)
def test_a_bad_update_is_refused_with_the_hospital_named(
    classify_config: RunConfig, tmp_path, corruption: str, reason: str
):
    def tamper(node_id: int, reply: Message) -> Message:
        if node_id != 1001 or reply.metadata.message_type != TRAIN:
            return reply
        record = reply.content.array_records[DELTA]
        name = next(n for n in record if "lora_B" in n)
        value = record[name].numpy()
        if corruption == "nan":
            value = value.copy()
            value[0, 0] = np.nan
            record[name] = Array(value)
        elif corruption == "shape":
            record[name] = Array(np.zeros((value.shape[0] + 1, value.shape[1]), np.float32))
        else:
            del record[name]
        return reply

    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    lines: list[str] = []
    _run(config, InProcessGrid(3, tamper=tamper), tmp_path, lines)
    run_dir = RunDirectory(tmp_path / "run")
    (round_record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert list(round_record["refused"]) == ["hospital-2"]
    assert reason in round_record["refused"]["hospital-2"]
    assert sorted(round_record["hospitals_used"]) == ["hospital-1", "hospital-3"]
    assert any("hospital-2" in line and reason in line for line in lines)
    assert np.all([np.all(np.isfinite(v)) for v in run_dir.load_adapter(1).values()])


def test_a_round_below_the_minimum_is_aborted_and_the_adapter_kept(
    classify_config: RunConfig, tmp_path
):
    def poison(node_id: int, reply: Message) -> Message:
        if reply.metadata.message_type == TRAIN and node_id != 1000:
            record = reply.content.array_records[DELTA]
            name = next(iter(record))
            record[name] = Array(np.full(record[name].numpy().shape, np.inf, np.float32))
        return reply

    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    lines: list[str] = []
    _run(config, InProcessGrid(3, tamper=poison), tmp_path, lines)
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.saved_rounds() == [0]
    assert any("Round 1 aborted" in line and "unchanged" in line for line in lines)


def test_a_hospital_with_bad_data_is_reported_and_the_others_continue(
    classify_config: RunConfig, tmp_path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "chest pain", "label": "Not a chapter"}\n{"text": ""}\n')
    good = classify_config.data.simulation_root
    configs = deployed_nodes(tmp_path / "keys", {
        0: ("St-Mary", f"{good}/hospital-1.jsonl"),
        1: ("Broken-General", str(bad)),
        2: ("Riverside", f"{good}/hospital-3.jsonl"),
        3: ("Lakeside", f"{good}/hospital-2.jsonl"),  # 3 survivors: a deployed node's floor
    })
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=2)
    config = replace_section(config, "secure_aggregation", threshold=3)
    lines: list[str] = []
    _run(config, InProcessGrid(4, node_configs=configs), tmp_path, lines)
    run_dir = RunDirectory(tmp_path / "run")
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert sorted(record["hospitals_used"]) == ["Lakeside", "Riverside", "St-Mary"]
    (reason,) = record["refused"].values()
    assert "Broken-General" in reason and f"{bad}:1:" in reason and f"{bad}:2:" in reason
    assert run_dir.saved_rounds() == [0, 1]


def test_instruction_tuning_rounds_run_and_report_generation_metrics(
    instruct_config: RunConfig, tmp_path
):
    config = replace_section(instruct_config, "federation", rounds=1, min_hospitals=2)
    summary = _run(config, InProcessGrid(2), tmp_path, [])
    final = summary["final_test"]["weighted"]
    assert {"loss", "perplexity", "exact-match"} <= set(final)
    assert final["loss"] < summary["base_test"]["weighted"]["loss"]


def test_skipped_bad_lines_are_counted_and_reported(classify_config: RunConfig, tmp_path):
    source = classify_config.data.simulation_root
    messy = tmp_path / "messy.jsonl"
    lines_in = (Path(source) / "hospital-1.jsonl").read_text().splitlines()
    messy.write_text("\n".join([*lines_in, "{not json", '{"text": "x", "label": "nope"}']) + "\n")
    configs = deployed_nodes(
        tmp_path / "keys", {0: ("Messy", str(messy)), 1: ("Clean", f"{source}/hospital-2.jsonl")}
    )
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=2)
    config = replace_section(config, "data", skip_bad_lines=True)
    lines: list[str] = []
    _run(config, InProcessGrid(2, node_configs=configs), tmp_path, lines)
    (record,) = [r for r in RunDirectory(tmp_path / "run").read_metrics() if r["event"] == "round"]
    assert record["train"]["Messy"]["skipped-lines"] == 2
    assert record["train"]["Clean"]["skipped-lines"] == 0
    assert any("Messy skipped 2 invalid data line(s)" in line for line in lines)


def test_a_nan_example_count_is_refused_for_that_hospital_only(
    classify_config: RunConfig, tmp_path
):
    from flwr.app import MetricRecord

    def nan_count(node_id: int, reply: Message) -> Message:
        if node_id == 1000 and reply.metadata.message_type == TRAIN:
            metrics = dict(reply.content.metric_records["metrics"])
            metrics["num-examples"] = float("nan")
            reply.content.metric_records["metrics"] = MetricRecord(metrics)
        return reply

    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    _run(config, InProcessGrid(3, tamper=nan_count), tmp_path, [])
    (record,) = [r for r in RunDirectory(tmp_path / "run").read_metrics() if r["event"] == "round"]
    assert "not a positive number" in record["refused"]["hospital-1"]
    assert sorted(record["hospitals_used"]) == ["hospital-2", "hospital-3"]


def test_an_unexpected_error_at_a_hospital_is_reported_with_its_name(
    classify_config: RunConfig, tmp_path, monkeypatch
):
    import fedtune.client.local_round as client_app_module

    real = client_app_module.train_locally

    def broken(*args, **kwargs):
        if kwargs.get("seed", args[4] if len(args) > 4 else None) is not None and broken.calls:
            raise RuntimeError("disk full while training")
        broken.calls += 1
        return real(*args, **kwargs)

    broken.calls = 0
    monkeypatch.setattr(client_app_module, "train_locally", broken)
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=1)
    _run(config, InProcessGrid(2), tmp_path, [])
    (record,) = [r for r in RunDirectory(tmp_path / "run").read_metrics() if r["event"] == "round"]
    assert record["hospitals_used"] == ["hospital-1"]
    assert (
        "hospital-2: unexpected error at the hospital: RuntimeError: disk full"
        in (record["refused"]["hospital-2"])
    )


def test_two_hospitals_with_the_same_name_are_both_counted(classify_config: RunConfig, tmp_path):
    """Plain mode (nodes that allow it): with secure aggregation names must be enrolled."""
    source = classify_config.data.simulation_root
    nodes = {
        0: {
            "hospital-name": "General",
            "data-path": f"{source}/hospital-1.jsonl",
            "allow-plain-updates": True,
        },
        1: {
            "hospital-name": "General",
            "data-path": f"{source}/hospital-2.jsonl",
            "allow-plain-updates": True,
        },
    }
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    _run(config, InProcessGrid(2, node_configs=nodes), tmp_path, [])
    (record,) = [r for r in RunDirectory(tmp_path / "run").read_metrics() if r["event"] == "round"]
    assert sorted(record["hospitals_used"]) == ["General", "General (node 1001)"]
    assert record["refused"] == {}


def test_a_deployed_node_refuses_to_send_its_update_in_clear_unless_its_admin_allows_it(
    classify_config: RunConfig, tmp_path
):
    source = classify_config.data.simulation_root
    sites = {0: ("North", f"{source}/hospital-1.jsonl"), 1: ("South", f"{source}/hospital-2.jsonl")}
    nodes = deployed_nodes(tmp_path / "keys", sites)
    nodes[1]["allow-plain-updates"] = True
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=1)
    _run(config, InProcessGrid(2, node_configs=nodes), tmp_path, [])
    (record,) = [r for r in RunDirectory(tmp_path / "run").read_metrics() if r["event"] == "round"]
    assert record["hospitals_used"] == ["South"]
    assert (
        "North: the coordinator asked for this hospital's update in clear"
        in (record["refused"]["North"])
    )
    assert "allow-plain-updates=true" in record["refused"]["North"]
