"""What a hospital can show an auditor: node-side approval, lineage, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_grid import InProcessGrid
from tiny import deployed_nodes, replace_section

from client.approval import RunNotApproved, app_code_sha256, check_run_approved
from client.data import load_hospital_data, split_examples
from client.privacy_ledger import read_ledger_file
from client.session import apply_node_settings, example_record
from fedtune.adapters import adapter_sha256
from fedtune.config import RunConfig
from fedtune.lineage import data_fingerprint, model_fingerprint
from server.export import export_adapter
from server.initial import initial_global_adapter
from server.model_card import pseudonym
from server.rounds import run_federation
from server.run_dir import RunDirectory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(config: RunConfig, grid: InProcessGrid, path: Path) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.create(config)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lambda _: None)
    return run_dir


def _nodes(tmp_path: Path, config: RunConfig, **pins: object) -> dict[int, dict[str, object]]:
    root = config.data.simulation_root
    sites = {0: ("St-Anna", f"{root}/hospital-1.jsonl"),
             1: ("Riverside", f"{root}/hospital-2.jsonl")}  # fmt: skip
    nodes = deployed_nodes(tmp_path / "keys", sites)
    nodes[0].update(pins)
    return nodes


@pytest.mark.parametrize(
    ("pins", "reason"),
    [
        ({"allowed-strategies": "fedprox,ffa-lora"},
         "strategy 'fedavg', but this hospital only allows fedprox, ffa-lora"),
        ({"max-epsilon": 2.0}, "ε = 8, above this hospital's maximum ε = 2"),
        ({"allowed-model-sha256": "0" * 64}, "this hospital approved (node setting "
                                             "'allowed-model-sha256')"),
        ({"allowed-app-sha256": "f" * 64}, "not the ffffffffffffffff… its admin approved"),
    ],
)  # fmt: skip
def test_a_hospital_refuses_a_run_outside_what_its_admin_pinned(
    classify_config: RunConfig, tmp_path: Path, pins: dict[str, object], reason: str
):
    """The refusal comes at the first message (the key stage), names the pin, and the
    other hospital alone is too few: nothing is trained, the adapter is unchanged."""
    config = replace_section(classify_config, "federation", rounds=1)
    config = replace_section(config, "privacy", enabled=True, target_epsilon=8.0,
                             ledger_dir=str(tmp_path / "ledgers"))  # fmt: skip
    run_dir = _run(config, InProcessGrid(2, node_configs=_nodes(tmp_path, config, **pins)),
                   tmp_path / "run")  # fmt: skip
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert record["aborted"] and run_dir.saved_rounds() == [0]
    (refusal,) = record["refused"].values()  # named by the hospital itself
    assert refusal.startswith("St-Anna: ") and reason in refusal
    assert not (tmp_path / "ledgers" / "St-Anna.json").exists()  # it never trained


def test_pins_that_match_let_the_run_through(classify_config: RunConfig, tmp_path: Path):
    config = replace_section(classify_config, "privacy", enabled=True, target_epsilon=4.0)
    model_dir = Path(config.model.source)
    pins = {
        "allowed-strategies": "fedavg, fedprox",
        "max-epsilon": 4.0,
        "allowed-model-sha256": model_fingerprint(model_dir).sha256,
        "allowed-app-sha256": app_code_sha256(),
    }
    check_run_approved(config, pins, model_dir, tmp_path / "cache")
    assert apply_node_settings(config, pins) == config
    with pytest.raises(RunNotApproved, match="without differential privacy"):
        check_run_approved(replace_section(config, "privacy", enabled=False), pins)


def test_the_app_hash_changes_with_any_line_of_the_code(tmp_path: Path):
    for package in ("client", "fedtune", "server", "strategies"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("x = 1\n")
    before = app_code_sha256(tmp_path)
    (tmp_path / "server" / "__init__.py").write_text("x = 2\n")
    assert app_code_sha256(tmp_path) != before


def test_lineage_travels_and_the_model_card_holds_the_ledgers_true_epsilon_and_hashes(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(classify_config, "federation", rounds=2)
    config = replace_section(config, "privacy", enabled=True, target_epsilon=6.0,
                             ledger_dir=str(tmp_path / "ledgers"))  # fmt: skip
    run_dir = _run(config, InProcessGrid(2), tmp_path / "run")
    lineage = run_dir.summary()["lineage"]
    assert sorted(lineage) == ["hospital-1", "hospital-2"]
    model_sha = model_fingerprint(Path(config.model.source)).sha256
    for k, hospital in enumerate(("hospital-1", "hospital-2"), start=1):
        data = load_hospital_data(Path(config.data.simulation_root) / f"hospital-{k}.jsonl",
                                  labels=config.model.labels)  # fmt: skip
        train = split_examples(data.examples, seed=config.data.split_seed,
                               fractions=config.data.split).train  # fmt: skip
        truth = data_fingerprint(example_record(e) for e in train)
        assert lineage[hospital]["data_sha256"] == truth.sha256
        assert lineage[hospital]["data_examples"] == truth.examples  # simulated: shared
        assert json.loads(lineage[hospital]["data_labels"]) == truth.labels
        assert lineage[hospital]["model_sha256"] == model_sha

    out = tmp_path / "export"
    exported = export_adapter(run_dir, out, "2", merged=False)
    card = (out / "README.md").read_text()
    assert exported == 2 and card.startswith("---\nlibrary_name: peft\n")
    assert model_sha in card
    assert adapter_sha256(run_dir.load_adapter(2)) in card
    for hospital in ("hospital-1", "hospital-2"):
        ledger = read_ledger_file(tmp_path / "ledgers" / f"{hospital}.json")
        row = next(line for line in card.splitlines() if line.startswith(f"| {hospital} |"))
        assert f"| {ledger.epsilon_spent():.3f} |" in row
        assert lineage[hospital]["data_sha256"] in row
    assert "secure aggregation | on (pairwise masking, threshold 2)" in card
    assert "Intended use and limitations" in card

    hidden = tmp_path / "export-pseudonyms"
    export_adapter(run_dir, hidden, "best", merged=False, pseudonymize=True)
    text = (hidden / "README.md").read_text()
    assert "hospital-1" not in text and pseudonym("hospital-1", run_dir.run_id) in text
