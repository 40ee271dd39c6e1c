"""`fedtune simulate`: run an experiment's grid of arms and seeds, then tables and plots.

For every grid point and seed the runner partitions the dataset into hospital files (printed
and saved as ``partition.json``), then runs each arm:

- federated arms through Flower's simulation engine with the same ServerApp and ClientApp
  hospitals deploy (``fedtune.launch``), one virtual hospital per file, secure aggregation
  on for the ``*-secagg`` arms only; afterwards every saved round's global adapter is scored
  on the shared test set;
- centralized and local-only arms in this process (``simulations.baselines``).

Runs that do not depend on a swept value are run once and shared (the centralized baseline
does not depend on the federated strategy). A run that fails is reported with its log and
the sweep goes on; finished runs are kept in ``results.json`` and reused when the same
experiment is started again in the same output folder, so an interrupted sweep resumes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from fedtune.core.config import DP_ADAPTER_METHODS, ConfigError, LoraSettings, RunConfig
from fedtune.simulations.datasets import LABELS_FILE, TEST_FILE, build_dataset, write_hospital_files
from fedtune.simulations.experiment import Experiment
from fedtune.simulations.partition import (
    format_partition_summary,
    make_partition,
    partition_summary,
)
from fedtune.simulations.results import ArmResult, is_dp_arm, load_results, save_results

FEDERATED_ARMS = ("federated", "federated-secagg", "federated-dp", "federated-dp-secagg")
_ROUND_ROW = re.compile(r"^\s*(\d+)\s+\S+\s+\S+")  # server.report's per-round row
_PER_RUN_OVERHEAD_UNITS = 40.0  # a federated run's start-up, in training-step units


@dataclass(frozen=True)
class RunSpec:
    """One run to execute; several grid points may share it (see module doc)."""

    key: str
    arm: str
    epsilon: float | None
    seed: int
    hospitals: int
    alpha: float
    strategy: str
    lora_r: int
    adapter_method: str = "lora"

    @property
    def federated(self) -> bool:
        return self.arm in FEDERATED_ARMS

    def cost_units(self, experiment: Experiment) -> float:
        """Training steps the run takes (for the ETA); DP steps count double."""
        steps = self.hospitals * experiment.base.train.local_steps
        units = steps * experiment.base.federation.rounds * (2.0 if is_dp_arm(self.arm) else 1.0)
        return units + (_PER_RUN_OVERHEAD_UNITS if self.federated else 0.0)


def plan_runs(experiment: Experiment) -> list[tuple[dict[str, Any], RunSpec]]:
    """Every (grid point, run) pair, in execution order: each seed's baselines first.

    DP arms run at every ε of the sweep, except ``federated-dp-secagg``, which runs at the
    largest ε only: it must match ``federated-dp`` (secure aggregation changes nothing but
    who can see the deltas), and one ε shows that. A PEFT method that cannot be trained
    under DP (`DP_ADAPTER_METHODS`) runs its non-DP arms only; `dp_skipped` names it.
    """
    pairs: list[tuple[dict[str, Any], RunSpec]] = []
    epsilons = experiment.epsilons()
    for point in experiment.points():
        for seed in experiment.seeds:
            for arm in experiment.arms:
                if is_dp_arm(arm) and point.get("adapter_method", "lora") in dp_skipped(
                    experiment
                ):
                    continue
                if arm == "federated-dp-secagg":
                    arm_epsilons: tuple[float | None, ...] = (max(epsilons),)
                elif is_dp_arm(arm):
                    arm_epsilons = epsilons
                else:
                    arm_epsilons = (None,)
                for epsilon in arm_epsilons:
                    pairs.append((point, _spec(arm, epsilon, seed, point)))
    return pairs


def _lora_for(spec: RunSpec, lora_alpha: int, base: RunConfig) -> dict[str, Any]:
    """The run's [lora] keys: the swept shape for lora/dora; for the other methods the
    defaults (they do not read r, alpha or dropout; ia3 reads target_modules)."""
    if spec.adapter_method in ("lora", "dora"):
        return {"r": spec.lora_r, "alpha": lora_alpha}
    defaults = dataclasses.asdict(LoraSettings())
    if spec.adapter_method == "ia3":
        defaults["target_modules"] = list(base.lora.target_modules)
    return defaults


def dp_skipped(experiment: Experiment) -> tuple[str, ...]:
    """The swept PEFT methods whose DP arms are not run: Opacus has no correct per-sample
    gradients for them (see fedtune.core.config.DP_ADAPTER_METHODS)."""
    return tuple(m for m in experiment.sweep["adapter_method"] if m not in DP_ADAPTER_METHODS)


def _spec(arm: str, epsilon: float | None, seed: int, point: dict[str, Any]) -> RunSpec:
    hospitals, alpha, strategy, r = (point[k] for k in ("hospitals", "alpha", "strategy", "lora_r"))
    method = point.get("adapter_method", "lora")
    parts = [arm]
    if epsilon is not None:
        parts.append(f"eps{epsilon:g}")
    parts += [f"h{hospitals}", f"a{alpha:g}", f"r{r}"]
    if arm in FEDERATED_ARMS:
        parts.append(strategy)
    if method != "lora":  # LoRA runs keep their earlier keys: their results still resume
        parts.append(method)
    parts.append(f"s{seed}")
    return RunSpec("-".join(parts), arm, epsilon, seed, hospitals, float(alpha), strategy, r,
                   method)


def run_config_for(
    experiment: Experiment, spec: RunSpec, data_dir: Path, run_dir: Path
) -> RunConfig:
    """The fedtune run configuration of one run: the experiment's base plus the run's values."""
    base = experiment.base
    lora_alpha = max(1, round(base.lora.alpha * spec.lora_r / base.lora.r))
    secure = spec.arm.endswith("secagg")
    changes: dict[str, dict[str, Any]] = {
        "data": {"simulation_root": str(data_dir), "split_seed": spec.seed},
        "federation": {"min_hospitals": spec.hospitals, "strategy": spec.strategy},
        "lora": _lora_for(spec, lora_alpha, experiment.base),
        "adapter": {"method": spec.adapter_method},
        "train": {"seed": base.train.seed + spec.seed},
        "privacy": {
            "enabled": is_dp_arm(spec.arm),
            "target_epsilon": spec.epsilon or base.privacy.target_epsilon,
            "ledger_dir": str(run_dir / "ledgers"),  # a fresh ledger per run: runs are separate
        },
        "secure_aggregation": {
            "enabled": secure,
            "threshold": experiment.threshold_for(spec.hospitals) if secure else 0,
        },
    }
    if experiment.task == "classify":  # the dataset's classes, in head order
        labels = json.loads((data_dir / LABELS_FILE).read_text(encoding="utf-8"))
        changes["model"] = {"labels": labels, "labels_file": ""}
    return base.with_overrides(**changes)


class ProgressDisplay:
    """A progress bar for the current run and the sweep's ETA, on one console line.

    On a terminal the line is redrawn in place; elsewhere (CI logs, files) a line is printed
    only when a run's progress changes, so logs stay readable.
    """

    def __init__(self, total_units: float, total_runs: int, stream: TextIO = sys.stderr) -> None:
        self.total_units, self.total_runs, self.stream = total_units, total_runs, stream
        self.done_units, self.done_runs = 0.0, 0
        self.measured_units, self.measured_seconds = 0.0, 0.0
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self._last = ""

    def eta_seconds(self, current_fraction: float, current_units: float) -> float | None:
        """Remaining time at the measured seconds per unit of the runs executed so far."""
        if self.measured_units <= 0:
            return None
        rate = self.measured_seconds / self.measured_units
        remaining = self.total_units - self.done_units - current_fraction * current_units
        return max(0.0, remaining * rate)

    def update(self, label: str, done: int, total: int, units: float) -> None:
        fraction = done / total if total else 0.0
        width = 20
        bar = "#" * round(width * fraction) + "." * (width - round(width * fraction))
        eta = self.eta_seconds(fraction, units)
        eta_text = _duration(eta) if eta is not None else "after the first run"
        line = (
            f"[{bar}] run {self.done_runs + 1}/{self.total_runs} {label}: {done}/{total} "
            f"rounds | sweep ETA {eta_text}"
        )
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        elif line.split(" | ")[0] != self._last.split(" | ")[0]:
            self.stream.write(line + "\n")
        self._last = line
        self.stream.flush()

    def finish_run(self, units: float, seconds: float, executed: bool) -> None:
        self.done_units += units
        self.done_runs += 1
        if executed:
            self.measured_units += units
            self.measured_seconds += seconds
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_experiment(
    experiment: Experiment,
    out_dir: Path,
    say: Callable[[str], None] = print,
    progress_stream: TextIO = sys.stderr,
) -> list[ArmResult]:
    """Run the whole grid; write results.json, results.csv, results.md and the plots."""
    from fedtune.simulations.plots import write_plots
    from fedtune.simulations.tables import summarize, write_csv, write_markdown

    out_dir = out_dir.resolve()  # run configs live in sub-folders: paths must be absolute
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    previous = {r.run_dir: r for r in load_results(results_path)} if results_path.exists() else {}
    pairs = plan_runs(experiment)
    unique: dict[str, RunSpec] = {}
    for _point, spec in pairs:
        unique.setdefault(spec.key, spec)
    say(
        f"Experiment '{experiment.name}': {len(experiment.points())} grid point(s) × "
        f"{len(experiment.seeds)} seed(s), arms {', '.join(experiment.arms)}: "
        f"{len(unique)} run(s). Output: {out_dir}"
    )
    if dp_skipped(experiment) and any(is_dp_arm(arm) for arm in experiment.arms):
        say(f"Not run under DP: adapter_method {', '.join(dp_skipped(experiment))} (Opacus "
            "computes no correct per-sample gradients for them); their other arms run.")
    display = ProgressDisplay(
        sum(s.cost_units(experiment) for s in unique.values()), len(unique), progress_stream
    )
    done: dict[str, ArmResult] = {}
    results: list[ArmResult] = []
    for point, spec in pairs:
        if spec.key not in done:
            run_dir = out_dir / "runs" / spec.key
            reused = previous.get(str(run_dir))
            started = time.monotonic()
            executed = reused is None or reused.status != "ok"
            if reused is not None and not executed:
                say(f"- {spec.key}: done in an earlier sweep, reused")
                done[spec.key] = reused
            else:
                done[spec.key] = _execute(experiment, spec, out_dir, run_dir, display, say)
            display.finish_run(spec.cost_units(experiment), time.monotonic() - started, executed)
        results.append(dataclasses.replace(done[spec.key], point=_shown(experiment, point)))
        save_results(results, results_path)
    rows = summarize(results)
    write_csv(rows, out_dir / "results.csv")
    write_markdown(rows, out_dir / "results.md", f"{experiment.name}: {experiment.metric_name}")
    plots = write_plots(results, out_dir / "plots")
    _report_secagg_twins(results, out_dir, say)
    failed = sorted({r.run_dir for r in results if r.status != "ok"})
    say(f"Results: {out_dir / 'results.md'} and {out_dir / 'results.csv'} (all runs: "
        f"{results_path})")
    for plot in plots:
        say(f"Plot: {plot}")
    if failed:
        say(f"{len(failed)} run(s) failed; their logs: " + ", ".join(
            str(Path(f) / "log.txt") for f in failed))
    return results


def _report_secagg_twins(
    results: list[ArmResult], out_dir: Path, say: Callable[[str], None]
) -> None:
    """Check federated-secagg against federated (round 1, fixed-point bound); record it."""
    from fedtune.simulations.secagg_check import compare_twins

    comparisons = compare_twins(results)
    if not comparisons:
        return
    (out_dir / "secagg_check.json").write_text(
        json.dumps([c.to_json() for c in comparisons], indent=2) + "\n", encoding="utf-8"
    )
    lines = ["", "Secure aggregation vs plain sum (round-1 global adapter, same setting):", ""]
    for c in comparisons:
        verdict = "equal within fixed-point error" if c.equal else "DIFFERENT: check the runs"
        lines.append(
            f"- {Path(c.secure_run).name}: max |difference| {c.max_abs_difference:.2e}, "
            f"bound {c.bound:.2e}: {verdict}"
        )
    with (out_dir / "results.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    for line in lines[1:]:
        if line:
            say(line)


def _shown(experiment: Experiment, point: dict[str, Any]) -> dict[str, Any]:
    """The grid point as tables show it: only the keys the experiment sweeps."""
    return {key: point[key] for key in experiment.swept}


def _execute(
    experiment: Experiment,
    spec: RunSpec,
    out_dir: Path,
    run_dir: Path,
    display: ProgressDisplay,
    say: Callable[[str], None],
) -> ArmResult:
    """One run; any failure becomes a failed result (the sweep goes on)."""
    result = ArmResult(
        point={}, arm=spec.arm, epsilon=spec.epsilon, seed=spec.seed,
        metric_name=experiment.metric_name, run_dir=str(run_dir),
    )
    started = time.monotonic()
    if run_dir.exists():  # a failed or unfinished earlier attempt: start it afresh
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "log.txt"
    units = spec.cost_units(experiment)
    rounds = experiment.base.federation.rounds
    display.update(spec.key, 0, rounds, units)
    try:
        with log_path.open("w", encoding="utf-8") as log:
            data_dir = _prepare_data(experiment, spec, out_dir, say)
            config = run_config_for(experiment, spec, data_dir, run_dir)
            test_path = data_dir.parent / TEST_FILE

            def on_round(done: int, total: int) -> None:
                display.update(spec.key, done, total, units)

            if spec.federated:
                _run_federated(experiment, spec, config, run_dir, test_path, log, on_round, result)
            else:
                _run_baseline(spec, config, data_dir, test_path, on_round, result)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the sweep continues; the failure is reported and kept
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        with log_path.open("a", encoding="utf-8") as log:
            log.write(traceback.format_exc())
        if display.tty:
            display.stream.write("\n")
        say(f"✗ {spec.key} failed: {result.error.splitlines()[0][:300]} (log: {log_path})")
    result.seconds = time.monotonic() - started
    if result.status == "ok":
        final = f"{result.final_metric:.4f}" if result.final_metric is not None else "n/a"
        eps = f", ε spent {result.achieved_epsilon:.2f}" if result.achieved_epsilon else ""
        if display.tty:
            display.stream.write("\n")
        say(f"✓ {spec.key}: {experiment.metric_name} {final}{eps} ({_duration(result.seconds)})")
    return result


def _prepare_data(
    experiment: Experiment, spec: RunSpec, out_dir: Path, say: Callable[[str], None]
) -> Path:
    """Partition the pool for (hospitals, α, seed) once; print and save its summary."""
    data_dir = out_dir / "data" / f"h{spec.hospitals}-a{spec.alpha:g}-s{spec.seed}"
    summary_path = data_dir / "partition.json"
    if summary_path.exists():
        return data_dir
    dataset = build_dataset(
        experiment.dataset,
        pool_size=experiment.examples_per_hospital * spec.hospitals,
        test_size=experiment.test_examples,
        seed=experiment.dataset_seed,
    )
    partition = make_partition(
        experiment.partition_method, num_hospitals=spec.hospitals, seed=spec.seed,
        labels=dataset.strata(), keys=dataset.strata(), alpha=spec.alpha,
        min_examples=experiment.min_examples,
    )
    write_hospital_files(dataset, partition.hospitals, data_dir)
    # One test file for the whole experiment (it depends on the dataset seed only).
    shared_test = out_dir / "data" / TEST_FILE
    shared_test.write_bytes((data_dir / TEST_FILE).read_bytes())
    summary = partition_summary(partition, dataset.strata())
    summary["dataset"] = experiment.dataset
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    say(format_partition_summary(summary))
    return data_dir


def _run_baseline(
    spec: RunSpec,
    config: RunConfig,
    data_dir: Path,
    test_path: Path,
    on_round: Callable[[int, int], None],
    result: ArmResult,
) -> None:
    from fedtune.client.session import model_for
    from fedtune.core.initial_adapter import initial_global_adapter
    from fedtune.simulations.baselines import load_test_set, run_centralized, run_local_only

    files = sorted(data_dir.glob("hospital-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    initial = initial_global_adapter(config)
    test = load_test_set(config, test_path, model_for(config))
    run = run_centralized if spec.arm.startswith("centralized") else run_local_only
    outcome = run(config, files, initial, test, spec.epsilon, on_round)
    result.curve = outcome.curve
    result.final_metric = outcome.curve[-1][1]
    result.achieved_epsilon = outcome.achieved_epsilon
    result.test_fingerprint = test.fingerprint


def _run_federated(
    experiment: Experiment,
    spec: RunSpec,
    config: RunConfig,
    run_dir: Path,
    test_path: Path,
    log: TextIO,
    on_round: Callable[[int, int], None],
    result: ArmResult,
) -> None:
    from fedtune.client.session import model_for
    from fedtune.ops.launch import LaunchPlan, launch
    from fedtune.server.records import completed_rounds
    from fedtune.server.run_dir import RunDirectory
    from fedtune.simulations.baselines import load_test_set, score

    config_path = run_dir / "run.toml"
    with config_path.open("wb") as stream:
        tomli_w.dump(config.to_dict(), stream)
    rounds = config.federation.rounds

    def say_to_log(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        match = _ROUND_ROW.match(line)
        if match and 1 <= int(match.group(1)) <= rounds:
            on_round(int(match.group(1)), rounds)

    plan = LaunchPlan(
        config_path=config_path, run_dir=run_dir, num_hospitals=spec.hospitals,
        client_cpus=experiment.client_cpus, client_gpus=experiment.client_gpus,
        timeout_s=experiment.run_timeout_s,
    )
    launch(plan, say=say_to_log)
    directory = RunDirectory(run_dir)
    handle = model_for(config)
    test = load_test_set(config, test_path, handle)
    result.curve = [
        (r, score(config, handle, directory.load_adapter(r), test))
        for r in directory.saved_rounds()
    ]
    if len(result.curve) < 2:
        raise ConfigError("no round completed (every round was aborted); see the run's log")
    result.final_metric = result.curve[-1][1]
    result.test_fingerprint = test.fingerprint
    for record in completed_rounds(directory.records()):
        for hospital, privacy in (record.privacy_per_hospital or {}).items():
            result.hospital_epsilon.setdefault(hospital, []).append(
                (record.round, float(privacy["epsilon"]))
            )
    spent = [eps for points in result.hospital_epsilon.values() for _r, eps in points]
    result.achieved_epsilon = max(spent) if spent else None


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
