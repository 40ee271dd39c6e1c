"""The research experiment of record: `simulations/medical_classification.toml`.

Runs the experiment end to end with `fedtune simulate` (Flower's simulation engine for the
federated arms, in-process baselines), then reports its arms' final test metrics on the
shared test set under the keys the issue tracker names, its wall time, and its table.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fedtune.benchmarks.runner import BenchResult
from fedtune.simulations.experiment import Experiment, load_experiment
from fedtune.simulations.results import ArmResult
from fedtune.simulations.sweep import run_experiment

EXPERIMENT = Path(__file__).resolve().parent.parent / "simulations" / "medical_classification.toml"


def bench_simulation(work_dir: Path) -> BenchResult:
    """Run the experiment in a fresh folder; return the sim_* keys and its Markdown."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    experiment = load_experiment(EXPERIMENT)
    started = time.monotonic()
    results = run_experiment(experiment, work_dir)
    minutes = (time.monotonic() - started) / 60

    def final(arm: str, epsilon: float | None = None) -> float:
        values = [r.final_metric for r in results if r.arm == arm and r.epsilon == epsilon
                  and r.status == "ok" and r.final_metric is not None]
        if not values:
            raise RuntimeError(f"the {arm} arm (ε={epsilon}) did not finish; see {work_dir}")
        return sum(values) / len(values)

    numbers: dict[str, Any] = {
        "sim_metric_name": experiment.metric_name,
        "sim_centralized_metric": final("centralized"),
        "sim_local_only_metric": final("local-only"),
        "sim_federated_metric": final("federated"),
        "sim_experiment_minutes": minutes,
    }
    for epsilon in experiment.epsilons():
        numbers[f"sim_federated_dp{epsilon:g}_metric"] = final("federated-dp", epsilon)
        numbers[f"sim_centralized_dp{epsilon:g}_metric"] = final("centralized-dp", epsilon)
    top = max(experiment.epsilons())
    numbers[f"sim_federated_dp{top:g}_secagg_metric"] = final("federated-dp-secagg", top)
    table = (work_dir / "results.md").read_text(encoding="utf-8")
    markdown = _markdown(experiment, results, numbers, table, minutes)
    return BenchResult(numbers=numbers, markdown=markdown)


def _setup(experiment: Experiment) -> str:
    """The model and training plan, read from the experiment (never restated by hand)."""
    base = experiment.base
    pooling = "mean pooling" if base.model.pooling == "mean" else "CLS pooler"
    head = ", head started from the label names" if base.model.head_init == "label-names" else ""
    targets = ", ".join(base.lora.target_modules) or "the default modules"
    cache = (
        " (frozen layers' outputs computed once per example: `train.cache_frozen_layers`)"
        if base.train.cache_frozen_layers
        else ""
    )
    return (
        f"MiniLM ({pooling}{head}) + LoRA r = {base.lora.r} on {targets}{cache}, "
        f"{base.federation.rounds} rounds × {base.train.local_steps} steps of "
        f"{base.train.batch_size} examples per hospital"
    )


def _federated_note(numbers: dict[str, Any]) -> str:
    """Say so when federated beats centralized, and how the two arms' steps differ."""
    if numbers["sim_federated_metric"] <= numbers["sim_centralized_metric"]:
        return ""
    return (
        ", above centralized (per round, centralized takes `local_steps` steps on the pooled "
        "batch, the federation averages `local_steps` steps taken at each hospital: "
        "simulations/README.md)"
    )


def _markdown(
    experiment: Experiment,
    results: list[ArmResult],
    numbers: dict[str, Any],
    table: str,
    minutes: float,
) -> str:
    name = experiment.name
    gap = numbers["sim_centralized_metric"] - numbers.get("sim_federated_dp8_metric", 0.0)
    over_local = numbers.get("sim_federated_dp8_metric", 0.0) - numbers["sim_local_only_metric"]
    dp_cost = numbers["sim_federated_metric"] - numbers.get("sim_federated_dp8_metric", 0.0)
    failed = sum(r.status != "ok" for r in results)
    return f"""## Simulation: `simulations/{name}.toml`

`fedtune simulate simulations/{name}.toml` ({minutes:.1f} min on this machine, {failed}
failed run(s)): 3 virtual hospitals, ICD-10-CM description → chapter (21 classes), Dirichlet
α = 1 label skew, {_setup(experiment)}. Every
arm is scored on the same 420-example held-out test set ({numbers["sim_metric_name"]}, higher
is better; final round).

{table.replace("## ", "### ", 1)}
Goal: federated + DP at ε = 8 within 3 points of centralized non-DP, and clearly above
local-only. Measured: {gap * 100:.1f} points below centralized
({"met" if gap <= 0.03 else "NOT met"}); {abs(over_local) * 100:.1f} points
{"above" if over_local >= 0 else "below"} local-only (non-DP)
({"met" if over_local > 0.02 else "NOT met"}). Federated without DP reached
{numbers["sim_federated_metric"]:.3f}{_federated_note(numbers)}; federated + DP at ε = 8 is
{dp_cost * 100:.1f} points below it (what DP costs the federation).

Plots (`runs/bench/simulation/plots/`): `metric_vs_round.png` (test {numbers["sim_metric_name"]}
per round for every arm), `privacy_utility.png` (final metric vs ε for federated + DP and
centralized + DP, with the non-DP arms as reference lines), `hospital_epsilon.png` (ε spent
by each hospital after each round, against its target).
"""
