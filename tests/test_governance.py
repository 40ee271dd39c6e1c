"""What a hospital can show an auditor: node-side approval, lineage, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_grid import InProcessGrid
from tiny import deployed_nodes, replace_section

from fedtune.client.approval import RunNotApproved, check_run_approved
from fedtune.client.data import load_hospital_data, split_examples
from fedtune.client.hospital import apply_node_settings
from fedtune.client.node_settings import parse_node_settings
from fedtune.client.privacy_ledger import read_ledger_file
from fedtune.client.session import example_record
from fedtune.core.adapters import adapter_sha256
from fedtune.core.app_code import APP_PACKAGES, app_code_sha256
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.lineage import data_fingerprint, model_fingerprint
from fedtune.server.export import export_adapter
from fedtune.server.model_card import pseudonym
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(config: RunConfig, grid: InProcessGrid, path: Path) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.create(config)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lambda _: None)
    return run_dir


def _nodes(tmp_path: Path, config: RunConfig, **pins: object) -> dict[int, dict[str, object]]:
    root = config.data.simulation_root
    sites = {0: ("St-Anna", f"{root}/hospital-1.jsonl"),
             1: ("Riverside", f"{root}/hospital-2.jsonl")}
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
)
def test_a_hospital_refuses_a_run_outside_what_its_admin_pinned(
    classify_config: RunConfig, tmp_path: Path, pins: dict[str, object], reason: str
):
    """The refusal comes at the first message (the key stage), names the pin, and the
    other hospital alone is too few: nothing is trained, the adapter is unchanged."""
    config = replace_section(classify_config, "federation", rounds=1)
    config = replace_section(config, "privacy", enabled=True, target_epsilon=8.0,
                             ledger_dir=str(tmp_path / "ledgers"))
    run_dir = _run(config, InProcessGrid(2, node_configs=_nodes(tmp_path, config, **pins)),
                   tmp_path / "run")
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert record["aborted"] and run_dir.saved_rounds() == [0]
    (refusal,) = record["refused"].values()  # named by the hospital itself
    assert refusal.startswith("St-Anna: ") and reason in refusal
    assert not (tmp_path / "ledgers" / "St-Anna.json").exists()  # it never trained


def test_pins_that_match_let_the_run_through(classify_config: RunConfig, tmp_path: Path):
    config = replace_section(classify_config, "privacy", enabled=True, target_epsilon=4.0)
    model_dir = Path(config.model.source)
    pins = parse_node_settings({
        "allowed-strategies": "fedavg, fedprox",
        "max-epsilon": 4.0,
        "allowed-model-sha256": model_fingerprint(model_dir).sha256,
        "allowed-app-sha256": app_code_sha256(),
    })
    check_run_approved(config, pins, model_dir, tmp_path / "cache")
    assert apply_node_settings(config, pins) == config
    with pytest.raises(RunNotApproved, match="without differential privacy"):
        check_run_approved(replace_section(config, "privacy", enabled=False), pins)


def test_the_app_hash_changes_with_any_line_of_the_code(tmp_path: Path):
    (tmp_path / "fedtune").mkdir()
    (tmp_path / "fedtune" / "__init__.py").write_text("x = 0\n")
    for package in APP_PACKAGES:
        (tmp_path.joinpath(*package.split("."))).mkdir()
        (tmp_path.joinpath(*package.split(".")) / "__init__.py").write_text("x = 1\n")
    before = app_code_sha256(tmp_path)
    (tmp_path / "fedtune" / "server" / "__init__.py").write_text("x = 2\n")
    assert app_code_sha256(tmp_path) != before


def test_lineage_travels_and_the_model_card_holds_the_ledgers_true_epsilon_and_hashes(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(classify_config, "federation", rounds=2)
    config = replace_section(config, "privacy", enabled=True, target_epsilon=6.0,
                             ledger_dir=str(tmp_path / "ledgers"))
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run")
    lineage = run_dir.summary()["lineage"]
    assert sorted(lineage) == ["hospital-1", "hospital-2", "hospital-3"]
    model_sha = model_fingerprint(Path(config.model.source)).sha256
    for k, hospital in enumerate(("hospital-1", "hospital-2", "hospital-3"), start=1):
        data = load_hospital_data(Path(config.data.simulation_root) / f"hospital-{k}.jsonl",
                                  labels=config.model.labels)
        train = split_examples(data.examples, seed=config.data.split_seed,
                               fractions=config.data.split).train
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
    for hospital in ("hospital-1", "hospital-2", "hospital-3"):
        ledger = read_ledger_file(tmp_path / "ledgers" / f"{hospital}.json")
        row = next(line for line in card.splitlines() if line.startswith(f"| {hospital} |"))
        assert f"| {ledger.epsilon_spent():.3f} |" in row
        assert row.startswith(f"| {hospital} | each record |")  # what its ε protects
        assert lineage[hospital]["data_sha256"] in row
    assert "secure aggregation | on (pairwise masking, threshold 2)" in card
    assert "Intended use and limitations" in card
    assert "(ε, δ) means: whether or not one such unit's data was used" in card

    hidden = tmp_path / "export-pseudonyms"
    export_adapter(run_dir, hidden, "best", merged=False, pseudonymize=True)
    text = (hidden / "README.md").read_text()
    assert "hospital-1" not in text and pseudonym("hospital-1", run_dir.run_id) in text


def test_the_coordinators_audit_trail_is_chained_and_pinned_by_the_summary(
    classify_config: RunConfig, tmp_path: Path
):
    from fedtune.core.audit import verify_audit_log

    config = replace_section(classify_config, "federation", rounds=2)
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run")
    audit = run_dir.path / "audit.jsonl"
    head = run_dir.summary()["audit_head"]
    report = verify_audit_log(audit, expected_head=head)
    assert report.intact and report.head == head
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "run-start" and events[-1] == "run-end"
    assert events.count("round-start") == 2 and events.count("checkpoint") == 2
    assert records[0]["data"]["code"]["app_code_sha256"] == app_code_sha256()
    checkpoints = [r["data"] for r in records if r["event"] == "checkpoint"]
    assert [c["adapter_sha256"] for c in checkpoints] == [
        adapter_sha256(run_dir.load_adapter(k)) for k in (1, 2)
    ]
    privacy = [r["data"] for r in records if r["event"] == "participants"]
    assert all(sorted(p["used"]) == ["hospital-1", "hospital-2", "hospital-3"] for p in privacy)
    # Cutting the last record leaves a chain that is intact on its own, but not with the head.
    audit.write_text("".join(audit.read_text().splitlines(keepends=True)[:-1]))
    assert not verify_audit_log(audit, expected_head=head).intact


def test_a_hospital_logs_what_it_sent_and_refused_and_guards_against_identifiers(
    classify_config: RunConfig, tmp_path: Path
):
    from fedtune.core.audit import verify_audit_log

    config = replace_section(classify_config, "federation", rounds=1)
    nodes = _nodes(tmp_path, config)
    logs = {k: tmp_path / f"node-{k}-audit.jsonl" for k in nodes}
    for k in nodes:
        nodes[k]["audit-log"] = str(logs[k])
    # St-Anna's export still holds a patient's e-mail and phone number on line 3.
    data = Path(str(nodes[0]["data-path"]))
    lines = data.read_text().splitlines()
    row = json.loads(lines[2])
    row["text"] += " contact jane.doe@example.org or (555) 123-4567"
    lines[2] = json.dumps(row)
    leaky = tmp_path / "st-anna.jsonl"
    leaky.write_text("\n".join(lines) + "\n")
    nodes[0]["data-path"] = str(leaky)

    run_dir = _run(config, InProcessGrid(2, node_configs=nodes), tmp_path / "run")
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    (refusal,) = [v for v in record["refused"].values() if v.startswith("St-Anna")]
    assert f"{leaky}:3: e-mail address" in refusal and "pii_acknowledged = true" in refusal
    assert "jane.doe" not in refusal  # the identifier itself is never repeated
    anna = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert verify_audit_log(logs[0]).intact
    check = next(r for r in anna if r["event"] == "identifier-check")
    assert check["data"]["counts"]["email"] == 1
    assert any(r["event"] == "refused" and "e-mail" in r["data"]["reason"] for r in anna)

    nodes[0]["pii-acknowledged"] = True
    run_dir = _run(config, InProcessGrid(2, node_configs=nodes), tmp_path / "run-acknowledged")
    (record,) = [r for r in run_dir.read_metrics() if r["event"] == "round"]
    assert sorted(record["hospitals_used"]) == ["Riverside", "St-Anna"]
    anna = [json.loads(line) for line in logs[0].read_text().splitlines()]
    sent = [r["data"] for r in anna if r["event"] == "sent-update"]
    assert len(sent) == 1 and sent[0]["mode"] == "masked"
    assert sent[0]["lineage"] == record["lineage"]["St-Anna"]  # both sides agree
    assert len(sent[0]["masked_input_sha256"]) == 64
    assert "data_examples" not in sent[0]["lineage"]  # a deployed node's size stays home
    assert any(r["event"] == "sent-metrics" for r in anna)


def test_a_node_file_carries_the_hospitals_pins_to_its_clientapp(tmp_path: Path):
    from fedtune.core.config import ConfigError
    from fedtune.ops.deployment import load_node_settings, node_config_string

    node = tmp_path / "node.toml"
    node.write_text(
        '[node]\nhospital = "st-anna"\ncoordinator = "127.0.0.1:9443"\ninsecure = true\n'
        'data = "ward.jsonl"\nprivacy_ledger = "ledger.json"\nprivacy_epsilon_budget = 8\n'
        'privacy_unit = "record"\n'
        f'allowed_model_sha256 = "{"a" * 64}"\nallowed_strategies = "fedavg,fedprox"\n'
        'max_epsilon = 4.0\npii_acknowledged = true\nsecagg_min_threshold = 3\n'
    )
    text = node_config_string(load_node_settings(node))
    for expected in (f'allowed-model-sha256="{"a" * 64}"', 'allowed-strategies="fedavg,fedprox"',
                     "max-epsilon=4.0", "pii-acknowledged=true",
                     f'audit-log="{tmp_path / "st-anna-audit.jsonl"}"'):
        assert expected in text, text
    # What the SuperNode parses from that string is what the ClientApp then reads, typed.
    from flwr.common.config import parse_config_args

    from fedtune.client.node_settings import parse_node_settings

    settings = parse_node_settings(parse_config_args([text]))
    assert settings.name == "st-anna" and settings.data_path == tmp_path / "ward.jsonl"
    assert settings.allowed_strategies == ("fedavg", "fedprox")
    assert settings.max_epsilon == 4.0 and settings.privacy_epsilon_budget == 8.0
    assert settings.pii_acknowledged and not settings.share_data_summary
    assert settings.allowed_model_sha256 == "a" * 64 and not settings.allow_plain_updates
    assert settings.secagg_min_threshold == 3
    text = node.read_text()
    node.write_text(text.replace("secagg_min_threshold = 3", "secagg_min_threshold = 1"))
    with pytest.raises(ConfigError, match="node.toml: .node. node setting secagg-min-threshold"):
        load_node_settings(node)
    node.write_text(text + "allowed_models = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key 'allowed_models'.*allowed_strategies"):
        load_node_settings(node)


def test_tensorboard_and_mlflow_receive_each_rounds_validation(
    classify_config: RunConfig, tmp_path: Path
):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = replace_section(classify_config, "federation", rounds=2)
    config = replace_section(config, "tracking", tensorboard_dir=str(tmp_path / "tb"),
                             mlflow_tracking_uri=uri, mlflow_experiment="ward-study")
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run")
    state = run_dir.load_state()  # each round's validation, however it travelled
    validated = [state.validation[r]["accuracy"] for r in sorted(state.validation)]
    assert len(validated) == 2

    (events,) = list((tmp_path / "tb" / run_dir.run_id).iterdir())
    board = EventAccumulator(str(events.parent))
    board.Reload()
    scalars = board.Scalars("validation/accuracy")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx(validated)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ward-study")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "validation_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(validated)
    assert run.data.params["federation.strategy"] == "fedavg"


def test_tracking_without_its_package_is_a_clear_configuration_error(monkeypatch):
    import builtins

    from fedtune.core.config import ConfigError, TrackingSettings
    from fedtune.server.tracking import ExperimentTracker

    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        ExperimentTracker(TrackingSettings(tensorboard_dir="/tmp/tb"), "run", {})


def test_a_node_file_limits_the_cpu_threads_of_its_training_processes(tmp_path: Path):
    """`cpu_threads` becomes the thread limits every ClientApp process of the node inherits;
    0 (the default) leaves all CPUs to it; a negative count is refused naming the key."""
    from fedtune.core.config import ConfigError
    from fedtune.ops.deployment import load_node_settings, thread_env

    node = tmp_path / "node.toml"
    base = ('[node]\nhospital = "st-anna"\ncoordinator = "127.0.0.1:9443"\ninsecure = true\n'
            'data = "ward.jsonl"\nprivacy_ledger = "ledger.json"\nprivacy_epsilon_budget = 8\n'
            'privacy_unit = "record"\n')
    node.write_text(base)
    assert load_node_settings(node).cpu_threads == 0 and thread_env(0) == {}
    node.write_text(base + "cpu_threads = 2\n")
    env = thread_env(load_node_settings(node).cpu_threads)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    node.write_text(base + "cpu_threads = -1\n")
    with pytest.raises(ConfigError, match="cpu_threads must be >= 1"):
        load_node_settings(node)
