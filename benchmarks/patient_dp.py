"""Patient-level vs record-level DP: the utility cost at ε = 8 and the step-time ratio.

Utility: the medical classification experiment (`simulations/medical_classification.toml`:
ICD-10-CM chapters, embedded MiniLM + LoRA, 3 hospitals, Dirichlet α = 1, 4 rounds of 8
DP-SGD steps) run twice on the same generated files (each hospital line names a synthetic
patient: about 3 diagnoses per patient, skewed) with the federated-dp arm at ε = 8: once
protecting each record, once each patient; both with 512 records per step in expectation
(each patient joins a step with the probability a record would: same data, same compute).
The metric is test accuracy on the shared test set.

Step time: one hospital file of 1,500 lines on the embedded MiniLM (the demo's model and
LoRA), `train_privately` itself, record level against patient level, both at q = 64 / records
(64 records per step in expectation); 12 steps each, alternating three times; the
median over the three of the seconds per step.
"""

from __future__ import annotations

import statistics
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.benchmarks.runner import BenchResult

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "medical_classification.toml"
BATCH = 512  # the experiment's records per step
STEP_RECORDS, STEPS, REPEATS = 64, 12, 3


def bench_patient_dp(work_dir: Path) -> BenchResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    step = _step_times(work_dir / "steps")
    record = _experiment_accuracy(work_dir / "record", "record")
    patient = _experiment_accuracy(work_dir / "patient", "patient")
    delta = patient["accuracy"] - record["accuracy"]
    ratio = step["patient_s"] / step["record_s"]
    numbers = {
        "dp_patient_vs_record_metric_delta": delta,
        "dp_patient_accuracy": patient["accuracy"],
        "dp_record_accuracy": record["accuracy"],
        "dp_patient_step_ratio": ratio,
        "dp_patient_step_ratio_per_record": ratio * step["record_rows"] / step["patient_rows"],
    }
    markdown = f"""## Patient-level vs record-level DP (`fedtune bench patient-dp`)

Same generated data (each hospital line names a synthetic patient: mean
{step['lines_per_patient']:.2f} lines per patient, skewed; `fedtune.ops.synthetic_patients`),
same compute. **Utility**: the medical classification experiment's federated-dp arm at ε = 8
(4 rounds × 8 steps, 3 hospitals, Dirichlet α = 1), {BATCH} records per step in expectation
for both units.

| unit | σ | test accuracy | ε spent |
|---|---|---|---|
| record | {record['sigma']:.3f} | {record['accuracy']:.4f} | {record['epsilon']:.2f} |
| patient | {patient['sigma']:.3f} | {patient['accuracy']:.4f} | {patient['epsilon']:.2f} |

`dp_patient_vs_record_metric_delta` = **{delta:+.4f}** (patient − record). The record-level
figure protects a patient with k records only at about k·ε; the patient-level one protects
every patient at ε = 8. One seed each (the experiment varies by about ±2 points between
seeds). σ is lower at patient level because δ counts patients: δ ≤ 1/(10·n) is 1e-4 for
the hospitals' few hundred training patients and 1e-5 for their 1,500-odd records.

**Step time** (`train_privately` on the embedded MiniLM, LoRA r = 8, one hospital of 1,500
lines), q = {STEP_RECORDS} / records for both: record level {step['record_s'] * 1000:.0f} ms
per step (mean {step['record_rows']:.1f} records), patient level
{step['patient_s'] * 1000:.0f} ms (mean {step['patient_rows']:.1f} records); per-step time
of {STEPS} steps, median over {REPEATS} alternations. `dp_patient_step_ratio` = **{ratio:.2f}**
(per record: {numbers['dp_patient_step_ratio_per_record']:.2f}).
"""
    return BenchResult(numbers=numbers, markdown=markdown)


def _experiment_accuracy(out: Path, unit: str) -> dict[str, float]:
    """Run the experiment's federated-dp arm at ε = 8 with this privacy unit."""
    from fedtune.simulations.experiment import load_experiment
    from fedtune.simulations.sweep import run_experiment

    raw: dict[str, Any] = tomllib.loads((REPO / "simulations" / EXPERIMENT).read_text())
    raw["experiment"]["arms"] = ["federated-dp"]
    raw["experiment"]["name"] = f"patient-dp-bench-{unit}"
    raw["sweep"] = {"epsilon": [8.0]}
    raw["train"]["batch_size"] = BATCH
    raw["privacy"]["unit"] = unit
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment.toml"
    path.write_text(tomli_w.dumps(raw))
    (result,) = run_experiment(load_experiment(path), out / "results")
    if result.status != "ok" or result.final_metric is None:
        raise RuntimeError(f"the {unit}-level run failed: see {result.run_dir}/log.txt")
    sigma = _sigma(Path(result.run_dir))
    return {"accuracy": float(result.final_metric), "epsilon": float(result.achieved_epsilon or 0),
            "sigma": sigma}


def _sigma(run_dir: Path) -> float:
    """σ the hospitals used (from the round records of the run)."""
    import json

    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for metrics in record.get("train", {}).values():
            if "noise-multiplier" in metrics:
                return float(metrics["noise-multiplier"])
    return float("nan")


def _step_times(work_dir: Path) -> dict[str, float]:
    import json

    import torch

    from fedtune.client.dp_train import DPPlan, poisson_sample_rate, train_privately
    from fedtune.client.hospital import hospital_identity
    from fedtune.client.node_settings import NodeSettings
    from fedtune.client.session import data_for, model_for
    from fedtune.core.config import parse_run_config
    from fedtune.core.model import get_adapter, set_adapter
    from fedtune.ops.icd10 import write_hospital_datasets

    write_hospital_datasets(work_dir, 1, "classify", 1500, seed=0)
    labels = json.loads((work_dir / "labels.json").read_text(encoding="utf-8"))
    config = parse_run_config({
        "model": {"source": "embedded:minilm", "task": "classify", "max_length": 40,
                  "labels": labels},
        "data": {"simulation_root": str(work_dir)},
        "privacy": {"enabled": True, "unit": "patient"},
    }, origin="bench")
    handle = model_for(config)
    data = data_for(config, hospital_identity(NodeSettings(partition_id=0), config.data), handle)
    features, patients = data.features["train"], list(data.train_patients or ())
    pad = int(handle.tokenizer.pad_token_id)
    start = get_adapter(handle.model)
    units = {"record": len(features), "patient": len(set(patients))}
    times: dict[str, list[float]] = {"record": [], "patient": []}
    rows: dict[str, list[float]] = {"record": [], "patient": []}
    torch.manual_seed(0)
    for _ in range(REPEATS):
        for unit in ("record", "patient"):
            plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0,
                          sample_rate=poisson_sample_rate(STEP_RECORDS, len(features)),
                          steps=STEPS, grad_sample_mode="hooks", max_physical_batch_size=64)
            set_adapter(handle.model, start)
            result = train_privately(handle.model, features, config.train, plan, pad, 0,
                                     "classify", patients=patients if unit == "patient" else None)
            times[unit].append(result.seconds / result.steps)
            rows[unit].append(result.examples_seen / result.steps)
    set_adapter(handle.model, start)
    return {
        "record_s": statistics.median(times["record"]),
        "patient_s": statistics.median(times["patient"]),
        "record_rows": statistics.mean(rows["record"]),
        "patient_rows": statistics.mean(rows["patient"]),
        "lines_per_patient": len(features) / units["patient"],
    }
