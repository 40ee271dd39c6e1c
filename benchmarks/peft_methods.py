"""PEFT methods side by side: accuracy, trained values, upload bytes, DP step ratio.

The accuracy comes from `simulations/peft_methods.toml` (every method federated, and
federated + DP at ε = 8 where DP-SGD can train it), run on Flower's simulation engine in
runs/simulations/peft_methods (a finished sweep there is reused, as `fedtune simulate`
resumes). Trained values and upload bytes are counted on the experiment's own model (the
embedded MiniLM with its 21-class head); a masked upload carries one uint32 per value plus
the weight. The DP step ratio times one DP-SGD step (Opacus hooks) against one plain step
on the same batch of 64 examples, side by side in this process, for the DP-capable methods.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from fedtune.benchmarks.runner import BenchResult
from fedtune.core.config import ADAPTER_METHODS, DP_ADAPTER_METHODS, AdapterSettings, RunConfig
from fedtune.core.model import attach_adapter, get_adapter, load_base_model
from fedtune.core.uploads import lora_upload_bytes
from fedtune.simulations.datasets import build_dataset
from fedtune.simulations.experiment import load_experiment
from fedtune.simulations.sweep import run_experiment

EXPERIMENT = Path(__file__).resolve().parent.parent / "simulations" / "peft_methods.toml"
SWEEP_DIR = Path("runs") / "simulations" / "peft_methods"
BATCH, REPEATS = 64, 5
_BYTES_PER_MASKED_VALUE = 4  # uint32 in the secure-aggregation ring


def _model(config: RunConfig, method: str, labels: list[str]) -> Any:
    torch.manual_seed(0)
    model_settings = dataclasses.replace(config.model, labels=tuple(labels))
    base, tokenizer, fresh = load_base_model(model_settings, tuple(labels), torch.device("cpu"))
    model = attach_adapter(base, AdapterSettings(method=method), config.lora, "classify", fresh)
    return model, tokenizer


def _step_seconds(model: Any, batch: dict[str, torch.Tensor], dp: bool) -> float:
    """Median seconds of one optimizer step (forward, backward, step) over REPEATS."""
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    net = model
    if dp:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(batch["input_ids"]), batch_size=BATCH)
        net, optimizer, _loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False,
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    for _ in range(REPEATS + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        logits = net(**inputs).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    if dp:
        net._close()
    return median(times[1:])  # the first step warms up


def bench_peft_methods(_work_dir: Path) -> BenchResult:
    """Accuracy per method from the sweep, then counts and DP step times on its model."""
    experiment = load_experiment(EXPERIMENT)
    started = time.monotonic()
    results = run_experiment(experiment, SWEEP_DIR)
    sweep_minutes = (time.monotonic() - started) / 60
    (labels_file,) = sorted((SWEEP_DIR / "data").glob("*/labels.json"))[:1]
    labels = json.loads(labels_file.read_text())
    metric: dict[tuple[str, str], float] = {}
    for result in results:
        if result.ok and result.final_metric is not None:
            metric[(result.point["adapter_method"], result.arm)] = result.final_metric

    data = build_dataset("icd10-chapters", BATCH, len(labels), seed=0)
    numbers: dict[str, float | str] = {"peft_methods_sweep_minutes": round(sweep_minutes, 2)}
    rows = []
    torch.set_num_threads(2)
    for method in ADAPTER_METHODS:
        model, tokenizer = _model(experiment.base, method, labels)
        adapter = get_adapter(model)
        own = sum(v.size for k, v in adapter.items() if "classifier" not in k)
        upload = lora_upload_bytes(adapter, "fedavg") + _BYTES_PER_MASKED_VALUE
        ratio = None
        if method in DP_ADAPTER_METHODS:
            texts = [e.record["text"] for e in data.pool][:BATCH]
            batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=32,
                                   return_tensors="pt"))
            batch["labels"] = torch.tensor([labels.index(e.record["label"])
                                            for e in data.pool][:BATCH])
            batch.pop("token_type_ids", None)
            model.train()
            plain = _step_seconds(model, batch, dp=False)
            model, _ = _model(experiment.base, method, labels)
            model.train()
            ratio = _step_seconds(model, batch, dp=True) / plain
        fed = metric.get((method, "federated"))
        fed_dp = metric.get((method, "federated-dp"))
        key = method.replace("-", "_")
        numbers[f"peft_method_{key}_trained_values"] = float(own)
        numbers[f"peft_method_{key}_upload_bytes"] = float(upload)
        if fed is not None:
            numbers[f"peft_method_{key}_metric"] = round(fed, 4)
        if fed_dp is not None:
            numbers[f"peft_method_{key}_dp_metric"] = round(fed_dp, 4)
        if ratio is not None:
            numbers[f"peft_method_{key}_dp_step_ratio"] = round(ratio, 3)
        dp_cell = _fmt(fed_dp) if method in DP_ADAPTER_METHODS else "refused"
        ratio_cell = "—" if ratio is None else f"{ratio:.2f}"
        head = sum(v.size for k, v in adapter.items() if "classifier" in k)
        rows.append(f"| `{method}` | {_fmt(fed)} | {dp_cell} | {own:,} | {upload:,} | "
                    f"{ratio_cell} |")
    markdown = "\n".join([
        "## PEFT methods (`fedtune bench peft-methods`)",
        "",
        f"`simulations/peft_methods.toml`: ICD-10-CM chapters (21 classes), embedded MiniLM, "
        f"3 hospitals (Dirichlet α = 1, 600 examples each), 3 rounds of 8 steps of 64, one "
        f"seed; accuracy on the 210-example test set (sweep: {sweep_minutes:.1f} min, 0 when "
        f"reused). Trained values exclude the 21-class head every method trains and sends "
        f"({head:,} values); the upload is the whole masked vector per hospital and round. DP "
        f"step ratio: one Opacus step / one plain step, batch {BATCH}, median of {REPEATS}.",
        "",
        "| method | federated accuracy | federated + DP (ε = 8) | trained values | upload bytes "
        "per round | DP step ratio |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    return BenchResult(numbers, markdown)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
