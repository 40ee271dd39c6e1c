"""A hospital's node settings: parsed once, typed, and a mistake named instead of ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_grid import InProcessGrid
from tiny import in_clear, replace_section

from fedtune.client.node_settings import NodeSettings, NodeSettingsError, parse_node_settings
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory


def test_a_deployed_nodes_settings_are_typed_and_round_trip(tmp_path: Path):
    raw = {
        "hospital-name": " St-Anna ", "data-path": str(tmp_path / "ward.jsonl"),
        "privacy-ledger": "~/ledger.json", "privacy-epsilon-budget": 8,
        "allowed-strategies": "fedavg, fedprox,", "max-epsilon": 4.0,
        "secagg-min-threshold": 3, "allow-plain-updates": False, "pii-acknowledged": True,
        "device": "cpu",
    }
    settings = parse_node_settings(raw)
    assert settings.name == "St-Anna" and settings.display_name == "St-Anna"
    assert settings.data_path == tmp_path / "ward.jsonl" and not settings.simulated
    assert settings.privacy_ledger == Path("~/ledger.json").expanduser()
    assert settings.privacy_epsilon_budget == 8.0 and isinstance(
        settings.privacy_epsilon_budget, float)
    assert settings.allowed_strategies == ("fedavg", "fedprox")
    assert settings.secagg_min_threshold == 3 and settings.pii_acknowledged
    assert parse_node_settings(settings.to_node_config()) == settings


def test_a_simulated_hospital_is_named_by_its_partition():
    settings = parse_node_settings({"partition-id": 4, "num-partitions": 10})
    assert settings.simulated and settings.display_name == "hospital-5"
    assert parse_node_settings({}) == NodeSettings()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"privacy-epsilon-budgt": 3.0}, "unknown node setting.*'privacy-epsilon-budgt'.*"
                                         "privacy-epsilon-budget"),
        ({"allow-plain-updates": "false"}, "allow-plain-updates must be true or false"),
        ({"privacy-epsilon-budget": "eight"}, "privacy-epsilon-budget must be a number"),
        ({"privacy-epsilon-budget": True}, "privacy-epsilon-budget must be a number"),
        ({"privacy-epsilon-budget": 0}, "privacy-epsilon-budget must be > 0"),
        ({"max-epsilon": -1.0}, "max-epsilon must be > 0"),
        ({"secagg-min-threshold": 1}, "secagg-min-threshold must be a whole number >= 2"),
        ({"secagg-min-threshold": 2.5}, "secagg-min-threshold must be a whole number"),
        ({"data-path": "  "}, "data-path must be a path"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"secagg-min-survivors": 1}, "secagg-min-survivors must be a whole number >= 2"),
    ],
)
def test_a_wrong_node_setting_is_refused_by_name(raw: dict, message: str):
    with pytest.raises(NodeSettingsError, match=message):
        parse_node_settings(raw)


def test_a_misspelt_budget_is_refused_by_the_node_not_ignored(
    classify_config: RunConfig, tmp_path: Path
):
    """A typo in the budget's key must not mean "no budget": the node refuses the round and
    says which key it does not know; the other hospital trains and the round goes on."""
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=1)
    nodes = {0: {"partition-id": 0, "privacy-epsilon-budgt": 1.0}, 1: {"partition-id": 1}}
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    run_federation(InProcessGrid(2, node_configs=nodes), config, run_dir,
                   initial_global_adapter(config), say=lambda line: None)
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert record["hospitals_used"] == ["hospital-2"]
    (reason,) = record["refused"].values()  # keyed by node id: it never named itself before
    assert reason.startswith("hospital-1: unknown node setting(s) 'privacy-epsilon-budgt'")
