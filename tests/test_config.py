"""Configuration: unknown keys name the allowed ones; wrong types and values are explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.core.config import (
    ConfigError,
    RunConfig,
    load_run_config,
    parse_run_config,
    resolve_paths,
)


def test_defaults_round_trip_through_the_json_sent_to_hospitals():
    config = RunConfig()
    assert RunConfig.from_json(config.to_json()) == config


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as caught:
        parse_run_config({"train": {"learning_rte": 0.1}}, origin="run.toml")
    message = str(caught.value)
    assert "run.toml" in message and "'learning_rte'" in message
    assert "learning_rate" in message and "local_steps" in message


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; allowed: adapter, data"):
        parse_run_config({"trian": {}}, origin="run.toml")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"batch_size": "16"}}, "train.batch_size must be a whole number"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
        ({"data": {"skip_bad_lines": 1}}, "data.skip_bad_lines must be true or false"),
        ({"data": {"split": [0.5, 0.5]}}, "data.split must have 3 items"),
        ({"data": {"split": [0.5, 0.4, 0.2]}}, "summing to 1"),
        ({"model": {"task": "summarize"}}, "model.task = 'summarize' is not one of"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout must be in [0, 1)"),
        ({"train": {"local_steps": 0}}, "Set train.local_steps"),
    ],
)
def test_wrong_values_are_explained(raw: dict, fragment: str):
    with pytest.raises(ConfigError) as caught:
        parse_run_config(raw, origin="run.toml")
    assert fragment in str(caught.value)


def test_ints_are_accepted_for_floats():
    config = parse_run_config({"train": {"learning_rate": 1}}, origin="x")
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


def test_load_reports_missing_file_and_bad_toml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlocal_steps = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_run_config(broken)


def test_labels_file_is_inlined_relative_to_the_config(tmp_path: Path):
    (tmp_path / "labels.json").write_text(json.dumps(["Cardiology", "Oncology"]))
    config = parse_run_config({"model": {"labels_file": "labels.json"}}, origin="x")
    resolved = resolve_paths(config, tmp_path)
    assert resolved.model.labels == ("Cardiology", "Oncology")
    assert resolved.model.labels_file == ""
    (tmp_path / "labels.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="must hold a JSON list"):
        resolve_paths(config, tmp_path)


def test_relative_simulation_root_is_resolved_against_the_config_folder(tmp_path: Path):
    config = parse_run_config({"data": {"simulation_root": "../data"}}, origin="x")
    resolved = resolve_paths(config, tmp_path / "configs")
    assert resolved.data.simulation_root == str((tmp_path / "data").resolve())
    absolute = parse_run_config({"data": {"simulation_root": "/srv/data"}}, origin="x")
    assert resolve_paths(absolute, tmp_path).data.simulation_root == "/srv/data"


@pytest.mark.parametrize(
    ("kind", "text", "section"),
    [("run", "[train]\nlearning_rte = 0.1\n", "train"),
     ("node", "[node]\nhospital_nam = 'x'\n", "node"),
     ("experiment", "[dataset]\nnmae = 'x'\n", "dataset")],
)
def test_every_file_kind_refuses_a_typo_missing_file_and_bad_toml_in_the_same_words(
    tmp_path: Path, kind: str, text: str, section: str
):
    """Run configuration, node file and experiment file share one reader (core/toml_files)."""
    from fedtune.ops.deployment import load_node_settings
    from fedtune.simulations.experiment import load_experiment

    load = {"run": load_run_config, "node": load_node_settings, "experiment": load_experiment}[kind]
    path = tmp_path / f"{kind}.toml"
    path.write_text(text)
    key = text.split("\n")[1].split(" ")[0]
    with pytest.raises(ConfigError, match=rf"{kind}.toml: unknown key '{key}' in \[{section}\]; "
                                          r"allowed: \w"):
        load(path)
    path.write_text("[oops]\nx = 1\n" if kind != "node" else "[node]\nx = \n")
    with pytest.raises(ConfigError, match=rf"{kind}.toml: (unknown section \[oops\]; allowed: "
                                          r"\w|not valid TOML)"):
        load(path)
    with pytest.raises(ConfigError, match=r"missing.toml: .* not found\."):
        load(tmp_path / "missing.toml")
