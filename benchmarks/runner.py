"""`fedtune bench`: run named benchmarks, update RESULTS.md and results.json in place.

Each benchmark returns flat numeric keys and a Markdown section. `results.json` keeps every
key ever measured (a later run of one benchmark replaces only its own keys) together with
the machine and library versions of the latest run; `RESULTS.md` keeps one section per
benchmark between markers, so figures from different issues live side by side.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class BenchResult:
    """What one benchmark measured."""

    numbers: Mapping[str, float | str]  # a few keys name things, e.g. sim_metric_name
    markdown: str


Benchmark = Callable[[Path], BenchResult]


def _registry() -> dict[str, Benchmark]:
    from fedtune.benchmarks.demo_utility import bench_demo
    from fedtune.benchmarks.deployment import bench_deployment
    from fedtune.benchmarks.dp_overhead import bench_dp
    from fedtune.benchmarks.frozen_cache import bench_frozen_cache
    from fedtune.benchmarks.gpu_check import bench_gpu
    from fedtune.benchmarks.patient_dp import bench_patient_dp
    from fedtune.benchmarks.peft_methods import bench_peft_methods
    from fedtune.benchmarks.pooling import bench_pooling
    from fedtune.benchmarks.round_overhead import bench_round
    from fedtune.benchmarks.secagg import bench_secagg
    from fedtune.benchmarks.simulation import bench_simulation
    from fedtune.benchmarks.strategies import bench_strategies

    return {
        "round": bench_round,
        "dp": bench_dp,
        "patient-dp": bench_patient_dp,
        "demo": bench_demo,
        "secagg": bench_secagg,
        "strategies": bench_strategies,
        "pooling": bench_pooling,
        "peft-methods": bench_peft_methods,
        "frozen-cache": bench_frozen_cache,
        "simulation": bench_simulation,
        "deployment": bench_deployment,
        "gpu": bench_gpu,
    }


def run_benchmarks(names: Sequence[str], out_dir: Path) -> dict[str, float | str]:
    """Run the named benchmarks (all when empty) and write both result files."""
    registry = _registry()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {', '.join(sorted(registry))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    measured: dict[str, float | str] = {}
    # The GPU check needs a CUDA machine: it runs only when named (`fedtune bench gpu`).
    for name in names or [n for n in sorted(registry) if n != "gpu"]:
        print(f"== benchmark {name}", flush=True)
        result = registry[name](Path("runs") / "bench" / name)
        measured.update(result.numbers)
        _update_markdown(out_dir / "RESULTS.md", name, result.markdown)
        _update_json(out_dir / "results.json", result.numbers)
        for key, value in result.numbers.items():
            print(f"{key} = {value:.4g}" if isinstance(value, float) else f"{key} = {value}")
    return measured


def machine_description() -> dict[str, str]:
    """The machine and the versions that produced the numbers."""
    versions = {}
    for package in ("torch", "transformers", "peft", "opacus", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        **versions,
    }


def _update_json(path: Path, numbers: Mapping[str, float | str]) -> None:
    existing = json.loads(path.read_text()) if path.is_file() else {}
    merged = {k: v for k, v in existing.items() if k != "machine"}
    merged.update(numbers)
    merged["machine"] = machine_description()
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def _update_markdown(path: Path, name: str, section: str) -> None:
    header = (
        "# Benchmark results\n\nWritten by `fedtune bench` (`make bench`); each section is the "
        "latest output of one benchmark, measured side by side in one run.\n"
    )
    text = path.read_text() if path.is_file() else header
    machine = ", ".join(f"{k} {v}" for k, v in machine_description().items())
    block = (
        f"<!-- bench:{name} -->\n{section.strip()}\n\n_Machine: {machine}_\n<!-- /bench:{name} -->"
    )
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    path.write_text(text)
