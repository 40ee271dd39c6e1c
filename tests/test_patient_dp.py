"""Patient-level DP: each patient, with all of its records, is what (ε, δ) protects.

Checked against plain autograd on the real PEFT LoRA models, through `train_privately`
itself (the optimizer's pre-step hook reads what Opacus clipped and summed):

1. The per-patient clipped sum equals the autograd gradients of each patient's records,
   summed per patient and then clipped (classifier and causal LM).
2. Adding a patient with many records moves the pre-noise sum by at most the clip bound C
   (record-level DP would move it by up to (records) × C: checked too, so the test bites).
3. With σ = 0 and a huge C, the patient-level gradient is the plain gradient of the records.
4. The ε a patient-level round reports is recomputed from (σ, q over patients, steps) with
   a second accountant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_dp_training import Setup
from tiny import replace_section, save_tiny_bert, tiny_run_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedtune.client.dp_train import DPPlan, train_privately
from fedtune.client.hospital import hospital_identity
from fedtune.client.local_round import train_local_update
from fedtune.client.node_settings import NodeSettings
from fedtune.client.session import ModelHandle, data_for, model_for
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.privacy_accounting import compute_epsilon
from fedtune.core.wire import Job

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

# Patients of 1 to 6 records: the skew that makes record-level DP under-protect.
PATIENT_SIZES = (1, 3, 2, 6, 1, 4)


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_privately puts the model in training mode: without dropout, training is a
    deterministic function of the batches, which the autograd comparison needs."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=0.0)


@pytest.fixture(params=["classify", "instruct"])
def setup(
    request: pytest.FixtureRequest, no_dropout_bert: Path, tiny_llama_dir: Path,
    classify_data: tuple[Path, tuple[str, ...]], instruct_data: Path,
) -> Setup:
    if request.param == "classify":
        root, labels = classify_data
        return Setup(tiny_run_config(no_dropout_bert, "classify", root, labels))
    return Setup(tiny_run_config(tiny_llama_dir, "instruct", instruct_data))


def _patients(sizes: tuple[int, ...]) -> list[int]:
    return [patient for patient, size in enumerate(sizes) for _ in range(size)]


def _plan(sigma: float, clip: float, steps: int = 1, physical: int = 4) -> DPPlan:
    return DPPlan(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=1.0, steps=steps,
                  grad_sample_mode="hooks", max_physical_batch_size=physical)


def _captured_step(setup: Setup, features: list[Any], patients: list[int] | None,
                   plan: DPPlan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One train_privately step; returns (pre-noise clipped sums, gradient stepped with)."""
    names = {id(p): n for n, p in setup.trainable().items()}
    summed: dict[str, torch.Tensor] = {}
    stepped: dict[str, torch.Tensor] = {}

    def capture(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if id(parameter) in names and parameter.grad is not None:
                    summed[names[id(parameter)]] = parameter.summed_grad.detach().clone()
                    stepped[names[id(parameter)]] = parameter.grad.detach().clone()

    start = {n: p.detach().clone() for n, p in setup.trainable().items()}
    handle = register_optimizer_step_pre_hook(capture)
    try:
        train_privately(setup.model, features, _settings(setup), plan, setup.pad, 0, setup.task,
                        patients=patients)
    finally:
        handle.remove()
        with torch.no_grad():
            for name, parameter in setup.trainable().items():
                parameter.copy_(start[name])
    assert summed, "the optimizer never stepped"
    return summed, stepped


def _settings(setup: Setup) -> Any:
    from fedtune.core.config import TrainSettings

    return TrainSettings(local_steps=1, batch_size=4, learning_rate=1e-3)


def _record_gradients(setup: Setup, features: list[Any]) -> list[dict[str, torch.Tensor]]:
    """Plain autograd: each record's own loss, alone in its batch."""
    setup.model.train()
    out = []
    for feature in features:
        setup.model.zero_grad(set_to_none=True)
        setup.loss(setup.model, [feature]).backward()
        out.append({n: p.grad.detach().clone() for n, p in setup.trainable().items()})
    setup.model.zero_grad(set_to_none=True)
    return out


def _norm(gradient: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in gradient.values()))


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    difference = {n: a[n].double() - b[n].double() for n in b}
    return _norm(difference) / max(_norm(b), 1e-12)


def test_per_patient_clipped_sums_equal_autograd_sums_then_clipped(setup: Setup):
    patients = _patients(PATIENT_SIZES)
    features = setup.mixed_lengths(len(patients))
    per_record = _record_gradients(setup, features)
    per_patient = []
    for patient in range(len(PATIENT_SIZES)):
        rows = [r for r, p in enumerate(patients) if p == patient]
        per_patient.append({n: sum(per_record[r][n] for r in rows) for n in per_record[0]})
    norms = sorted(_norm(g) for g in per_patient)
    clip = norms[len(norms) // 2]  # about half the patients are clipped, half are not
    expected: dict[str, torch.Tensor] = {n: torch.zeros_like(per_record[0][n])
                                         for n in per_record[0]}
    clipped = 0
    for gradient in per_patient:
        factor = min(1.0, clip / (_norm(gradient) + 1e-6))
        clipped += factor < 1.0
        for name in expected:
            expected[name] += factor * gradient[name]
    assert 0 < clipped < len(per_patient)
    # Physical batches of 4 rows: the 6-record patient spans two of them and must be summed
    # across them before it is clipped.
    summed, _ = _captured_step(setup, features, patients, _plan(0.0, clip, physical=4))
    assert _relative_error(summed, expected) <= 1e-4


def test_one_patient_moves_the_pre_noise_sum_by_at_most_the_clip_bound(setup: Setup):
    clip = 0.05
    base_sizes = (2, 1, 3)
    heavy = 8  # the added patient's records
    patients = _patients(base_sizes)
    features = setup.mixed_lengths(len(patients) + heavy)
    without, _ = _captured_step(setup, features[: len(patients)], patients, _plan(0.0, clip))
    with_heavy, _ = _captured_step(
        setup, features, [*patients, *[len(base_sizes)] * heavy], _plan(0.0, clip)
    )
    change = _norm({n: with_heavy[n] - without[n] for n in without})
    assert change <= clip * (1 + 1e-4)
    # The same records counted one by one (record-level DP) move it by far more than C:
    # without grouping, this patient would be protected only at about 8·ε.
    records, _ = _captured_step(setup, features, None, _plan(0.0, clip))
    records_without, _ = _captured_step(setup, features[: len(patients)], None, _plan(0.0, clip))
    assert _norm({n: records[n] - records_without[n] for n in records}) > 2 * clip


def test_without_noise_and_clipping_a_patient_step_is_the_plain_step(setup: Setup):
    patients = _patients(PATIENT_SIZES)
    features = setup.mixed_lengths(len(patients))
    plain = {n: sum(g[n] for g in _record_gradients(setup, features))
             for n in setup.trainable()}
    _, stepped = _captured_step(setup, features, patients, _plan(0.0, 1e6))
    # Opacus divides the sum by the expected number of patients per step (q·P = P here).
    scaled = {n: g * len(PATIENT_SIZES) for n, g in stepped.items()}
    assert _relative_error(scaled, plain) <= 1e-4


def _patient_file(path: Path, labels: tuple[str, ...], patients: int, seed: int) -> Path:
    """A classification file with patient ids: 1 to 5 records per patient."""
    import random

    rng = random.Random(seed)
    words = ["fracture", "asthma", "diabetes", "otitis", "migraine", "anemia", "sepsis"]
    lines = []
    for patient in range(patients):
        for _ in range(rng.randint(1, 5)):
            label = rng.choice(labels)
            text = f"{rng.choice(words)} of the {rng.choice(words)} {rng.randint(1, 99)}"
            lines.append(json.dumps({"text": text, "label": label,
                                     "patient_id": f"P{patient:04d}"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _patient_config(root: Path, bert: Path, labels: tuple[str, ...]) -> RunConfig:
    config = tiny_run_config(bert, "classify", root, labels)
    return replace_section(
        config, "privacy", enabled=True, unit="patient", target_epsilon=4.0,
        ledger_dir=str(root / "ledgers"),
    )


def test_reported_epsilon_is_recomputed_from_patient_sampling_with_a_second_accountant(
    tmp_path: Path, no_dropout_bert: Path, classify_data: tuple[Path, tuple[str, ...]],
):
    _, labels = classify_data
    _patient_file(tmp_path / "hospital-1.jsonl", labels, patients=40, seed=3)
    config = _patient_config(tmp_path, no_dropout_bert, labels)
    node = NodeSettings(partition_id=0)
    update = train_local_update(initial_global_adapter(config), Job(1, config, "run-p"), node)
    metrics = update.metrics
    assert metrics["dp-patient-level"] == 1.0
    # Independently: the patients of the training split; each joins a step with probability
    # q = 1 / ceil(records / batch_size), so a step holds batch_size records on average.
    identity = hospital_identity(node, config.data)
    splits = data_for(config, identity, model_for(config)).splits
    patients = {example.patient for example in splits.train}
    assert len(patients) < len(splits.train)  # several records per patient
    evaluated = {e.patient for e in (*splits.validation, *splits.test)}
    assert not patients & evaluated  # no patient both trains and is evaluated
    q = 1.0 / math.ceil(len(splits.train) / config.train.batch_size)
    assert metrics["sample-rate"] == pytest.approx(q)
    history = [(metrics["noise-multiplier"], q, int(metrics["dp-steps"]))]
    rdp = compute_epsilon(history, metrics["delta"], "rdp")
    prv = compute_epsilon(history, metrics["delta"], "prv")
    assert metrics["epsilon"] == pytest.approx(rdp, rel=1e-9)
    # RDP's conversion is an upper bound; PRV is numerically tight: within their known gap.
    assert prv <= rdp * 1.02 and rdp <= prv * 1.5
    # δ ≤ 1/(10·P), counted over patients.
    assert metrics["delta"] <= 1.0 / (10 * len(patients))


def test_patient_level_round_refuses_a_line_without_patient(
    tmp_path: Path, no_dropout_bert: Path, classify_data: tuple[Path, tuple[str, ...]],
):
    from fedtune.client.data import DataValidationError

    _, labels = classify_data
    path = _patient_file(tmp_path / "hospital-1.jsonl", labels, patients=10, seed=4)
    lines = path.read_text().splitlines()
    record = json.loads(lines[4])
    del record["patient_id"]
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    config = _patient_config(tmp_path, no_dropout_bert, labels)
    with pytest.raises(DataValidationError, match=rf"{path}:5: missing field 'patient_id'"):
        train_local_update(initial_global_adapter(config), Job(1, config, "run-q"),
                           NodeSettings(partition_id=0))
    assert not (tmp_path / "ledgers" / "hospital-1.json").exists()  # nothing was spent


def test_patient_gradients_leave_no_opacus_state_on_the_model(setup: Setup):
    patients = _patients((2, 2))
    features = setup.mixed_lengths(4)
    handle = ModelHandle(model=setup.model, tokenizer=None, device=torch.device("cpu"))
    train_privately(handle.model, features, _settings(setup), _plan(1.0, 1.0, steps=2),
                    setup.pad, 0, setup.task, patients=patients)
    assert not any(hasattr(p, "grad_sample") for p in setup.model.parameters())


def test_check_data_reports_patients_and_refuses_lines_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from fedtune.ops.cli import main

    data = tmp_path / "ward.jsonl"
    lines = [
        {"text": "chest pain", "label": "cardio", "patient_id": "A"},
        {"text": "angina", "label": "cardio", "patient_id": "A"},
        {"text": "fever", "label": "infect", "patient_id": 17},
        {"text": "cough", "label": "infect", "patient_id": "A"},
        {"text": "rash", "label": "derm", "patient_id": "B"},
    ]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["check-data", str(data), "--unit", "patient"]) == 0
    out = capsys.readouterr().out
    assert "3 patients; lines per patient: min 1, median 1, max 3" in out
    lines.insert(2, {"text": "syncope", "label": "cardio"})
    lines.append({"text": "eczema", "label": "derm", "patient_id": ["B"]})
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["check-data", str(data)]) == 2  # a list is no patient id, whatever the unit
    capsys.readouterr()
    assert main(["check-data", str(data), "--unit", "patient"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: missing field 'patient_id'" in err
    assert f"{data}:7: field 'patient_id' must be text or a whole number" in err


def test_csv_patient_column_and_a_split_that_keeps_patients_together(tmp_path: Path):
    from fedtune.client.data import DataValidationError, load_hospital_data, split_examples

    data = tmp_path / "ward.csv"
    rows = ["text,label,patient_id"]
    rows += [f"note {i},{'a' if i % 2 else 'b'},P{i % 13}" for i in range(60)]
    data.write_text("\n".join(rows) + "\n")
    examples = load_hospital_data(data, require_patient_id=True).examples
    assert {e.patient for e in examples} == {f"P{i}" for i in range(13)}
    split = split_examples(examples, seed=1, by_patient=True)
    parts = [{e.patient for e in part} for part in (split.train, split.validation, split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(p) for p in parts) == 13 and all(parts)
    headless = tmp_path / "old.csv"
    headless.write_text("text,label\nnote,a\n")
    with pytest.raises(DataValidationError, match="lacks column.s. patient_id"):
        load_hospital_data(headless, require_patient_id=True)


def test_a_patient_level_node_stays_patient_level_whatever_the_run_asks(
    no_dropout_bert: Path, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path,
):
    from fedtune.client.hospital import apply_node_settings
    from fedtune.client.node_settings import NodeSettingsError, parse_node_settings

    root, labels = classify_data
    config = replace_section(tiny_run_config(no_dropout_bert, "classify", root, labels),
                             "privacy", unit="record")
    node = parse_node_settings({"partition-id": 0, "privacy-unit": "patient"})
    assert apply_node_settings(config, node).privacy.unit == "patient"
    asked = replace_section(config, "privacy", unit="patient")
    lenient = parse_node_settings({"partition-id": 0, "privacy-unit": "record"})
    assert apply_node_settings(asked, lenient).privacy.unit == "patient"  # the stronger wins
    with pytest.raises(NodeSettingsError, match="privacy-unit must be 'record' or 'patient'"):
        parse_node_settings({"privacy-unit": "visit"})


def test_ghost_clipping_cannot_be_patient_level():
    from fedtune.core.config import ConfigError, PrivacySettings

    with pytest.raises(ConfigError, match="ghost clipping never forms them"):
        PrivacySettings(unit="patient", grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="privacy.unit = 'visit' is not one of"):
        PrivacySettings(unit="visit")


def test_the_node_file_must_say_what_its_epsilon_protects(tmp_path: Path):
    from fedtune.core.config import ConfigError
    from fedtune.ops.deployment import hospital_node_settings, load_node_settings

    base = ('[node]\nhospital = "st-anna"\ncoordinator = "127.0.0.1:9443"\ninsecure = true\n'
            'data = "ward.jsonl"\nprivacy_ledger = "ledger.json"\nprivacy_epsilon_budget = 8\n')
    node = tmp_path / "node.toml"
    node.write_text(base)
    with pytest.raises(ConfigError, match="needs privacy_unit"):
        load_node_settings(node)
    node.write_text(base + 'privacy_unit = "visit"\n')
    with pytest.raises(ConfigError, match="privacy-unit must be 'record' or 'patient'"):
        load_node_settings(node)
    node.write_text(base + 'privacy_unit = "patient"\n')
    assert hospital_node_settings(load_node_settings(node)).privacy_unit == "patient"


def test_generated_hospital_files_name_patients_with_several_skewed_diagnoses(tmp_path: Path):
    from collections import Counter

    from fedtune.client.data import load_hospital_data, patient_summary
    from fedtune.ops.icd10 import write_hospital_datasets
    from fedtune.ops.synthetic_patients import synthetic_patient_ids

    assert synthetic_patient_ids(500, "s", "h") == synthetic_patient_ids(500, "s", "h")
    sizes = sorted(Counter(synthetic_patient_ids(3000, "s", "h")).values())
    assert 2.0 < 3000 / len(sizes) < 4.5  # about 3 lines per patient on average
    assert sizes[len(sizes) // 2] == 1 and sizes[-1] >= 10  # most have one, a tail has many
    (path,) = write_hospital_datasets(tmp_path, 1, "classify", 300, seed=0, test_examples=30)
    summary = patient_summary(load_hospital_data(path, require_patient_id=True).examples)
    assert summary.lines == 300 and summary.lines_without_patient == 0
    assert summary.patients < 200 and summary.max_lines > summary.min_lines
    test_lines = (tmp_path / "test.jsonl").read_text().splitlines()
    assert all("patient_id" not in json.loads(line) for line in test_lines)
