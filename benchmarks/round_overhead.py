"""Round overhead: how much of a round is not the hospitals' training.

Runs the demo configuration (3 hospitals, embedded MiniLM, ICD-10-CM) on the real Flower
simulation engine and reads the coordinator's metrics: for each round, the train phase's wall
time (send the global adapter → all deltas received and checked) against the slowest
hospital's own training time. Overhead = (wall − slowest training) / wall: message
serialization, scheduling, adapter loading, delta computation and transport.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from statistics import mean

from fedtune.benchmarks.runner import BenchResult
from fedtune.ops.demo import DemoOptions, run_demo
from fedtune.server.records import completed_rounds
from fedtune.server.run_dir import RunDirectory


def bench_round(work_dir: Path) -> BenchResult:
    """Run the demo once and compute the per-round overhead ratios."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    run_demo(DemoOptions(task="classify", hospitals=3, run_dir=work_dir / "demo"))
    return round_overhead(RunDirectory(work_dir / "demo"))


def round_overhead(run_dir: RunDirectory) -> BenchResult:
    """Overhead ratios from a finished run's metrics (its configuration is described)."""
    config = run_dir.config()
    rows = []
    for record in completed_rounds(run_dir.records()):
        wall = float(record.train_phase_seconds)
        slowest = max(float(m["train-seconds"]) for m in record.train.values())
        rows.append((record.round, wall, slowest, (wall - slowest) / wall))
    steady = [ratio for number, _, _, ratio in rows if number > 1] or [rows[0][3]]
    numbers = {
        "round_overhead_ratio": mean(steady),
        "round_overhead_ratio_first_round": rows[0][3],
        "round_train_phase_seconds": mean(wall for _, wall, _, _ in rows),
    }
    table = "\n".join(
        f"| {number} | {wall:.2f} | {slowest:.2f} | {ratio:.3f} |"
        for number, wall, slowest, ratio in rows
    )
    markdown = f"""## Round overhead (`fedtune bench round`)

Demo configuration: 3 simulated hospitals training concurrently, all-MiniLM-L6-v2 + LoRA
r={config.lora.r}, {config.train.local_steps} local steps of batch {config.train.batch_size} per
round, DP-SGD {"on" if config.privacy.enabled else "off"}, Flower simulation engine (Ray) on
this machine.

| round | train phase wall (s) | slowest hospital training (s) | overhead ratio |
|---|---|---|---|
{table}

`round_overhead_ratio` (rounds 2+, goal ≤ 0.05) = **{numbers["round_overhead_ratio"]:.3f}**;
first round (includes each worker's first use of the cached model and data) =
{numbers["round_overhead_ratio_first_round"]:.3f}.
"""
    return BenchResult(numbers=numbers, markdown=markdown)
