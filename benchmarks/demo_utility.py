"""Utility of DP: the demo's held-out metric with DP (ε = 8) and without, same rounds.

Both arms run the demo configuration on the real Flower simulation engine, on identical
data (same seed), one after the other in one `fedtune bench demo` run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedtune.benchmarks.runner import BenchResult
from fedtune.ops.demo import DemoOptions, run_demo


def bench_demo(work_dir: Path) -> BenchResult:
    """Run the classification demo with and without DP; report held-out accuracy of each."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    arms = {}
    for name, privacy in (("dp", True), ("nodp", False)):
        summary = run_demo(
            DemoOptions(task="classify", hospitals=3, privacy=privacy, epsilon=8.0,
                        run_dir=work_dir / name)
        )
        arms[name] = summary
    dp, nodp = arms["dp"], arms["nodp"]
    epsilons = {h: v["epsilon"] for h, v in dp["privacy"]["per_hospital"].items()}
    numbers = {
        "demo_metric_dp": dp["final_test"]["weighted"]["accuracy"],
        "demo_metric_nodp": nodp["final_test"]["weighted"]["accuracy"],
        "demo_metric_base": nodp["base_test"]["weighted"]["accuracy"],
        "demo_loss_dp": dp["final_test"]["weighted"]["loss"],
        "demo_loss_nodp": nodp["final_test"]["weighted"]["loss"],
        "demo_epsilon_max": max(epsilons.values()),
    }
    base_loss = nodp["base_test"]["weighted"]["loss"]
    eps_text = ", ".join(f"{h} ε={e:.2f}" for h, e in sorted(epsilons.items()))
    markdown = f"""## Demo utility with and without DP (`fedtune bench demo`)

Classification demo (3 hospitals, MiniLM + LoRA, ICD-10 chapter, {dp["rounds"]} rounds), held-out
test splits at the hospitals, example-weighted:

| arm | accuracy | loss |
|---|---|---|
| base model (before round 1) | {numbers["demo_metric_base"]:.4f} | {base_loss:.4f} |
| federated, no DP | {numbers["demo_metric_nodp"]:.4f} | {numbers["demo_loss_nodp"]:.4f} |
| federated, DP (target ε = 8) | {numbers["demo_metric_dp"]:.4f} | {numbers["demo_loss_dp"]:.4f} |

Privacy spent by the DP arm (rdp accountant): {eps_text}.
"""
    return BenchResult(numbers=numbers, markdown=markdown)
