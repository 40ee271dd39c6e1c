"""Run a fedtune configuration on Flower's simulation engine, from the command line.

Used by `fedtune run` and `fedtune demo`: writes the Flower app bundle, starts the engine
with N virtual hospitals (each reading `<data.simulation_root>/hospital-<k>.jsonl`), streams
the coordinator's output, and stops every process it started when the run ends or fails.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedtune.core.config import ConfigError, RunConfig, load_run_config, resolve_paths
from fedtune.core.secagg.identity import ensure_simulation_identities
from fedtune.core.secagg.protocol import ProtocolAbort, check_threshold
from fedtune.core.update_rules import secure_codec
from fedtune.ops.flower_app import write_app_bundle
from fedtune.ops.simulation import SimulationSpec, run_simulation
from fedtune.server.sampling import round_size

# Flower prefixes forwarded app output with its log level; we show the coordinator's lines.
_FLOWER_PREFIX = re.compile(
    r"^\s*(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:)?(INFO|WARNING|ERROR|DEBUG)\s*:\s*"
)
_NOISE = (
    "Successfully started run",
    "Starting logstream",
    "Run finished",
    "Federation `",
    "To change federation size",
    "flwr federation simulation-config",
    "Successfully installed fedtune-app",
    "Starting Flower Simulation",
    "Using SuperLink:",
    "default simulated SuperNodes changed",
    "Manually terminating ClientAppActor",  # Ray stopping the virtual hospitals at the end
    "Ray deduplicates logs",
)


@dataclass(frozen=True)
class LaunchPlan:
    """One simulated federated run."""

    config_path: Path
    run_dir: Path
    num_hospitals: int
    client_cpus: int = 1
    client_gpus: float = 0.0
    timeout_s: float | None = None
    # Security research only: save each hospital's plaintext delta and the coordinator's view.
    record_views: Path | None = None
    resume: bool = False  # continue the stopped run in run_dir


def check_simulation_data(config: RunConfig, num_hospitals: int) -> None:
    """Fail before starting Flower when a virtual hospital's data file is missing."""
    root = config.data.simulation_root
    if not root:
        raise ConfigError("data.simulation_root must name the folder with hospital-<k>.jsonl.")
    missing = [
        str(Path(root) / f"hospital-{k}.jsonl")
        for k in range(1, num_hospitals + 1)
        if not (Path(root) / f"hospital-{k}.jsonl").is_file()
    ]
    if missing:
        raise ConfigError("Missing hospital data file(s): " + ", ".join(missing))


def prepare_secure_aggregation(
    config: RunConfig, num_hospitals: int, say: Callable[[str], None]
) -> None:
    """Check the threshold against the federation and give each virtual hospital its identity.

    Simulated hospitals get Ed25519 identity keys and one enrollment list, as real ones get
    from `fedtune keys`; existing keys are kept, so a resumed or repeated run reuses them.
    """
    secure = config.secure_aggregation
    if not secure.enabled:
        say("WARNING: secure aggregation is OFF: the coordinator will see every hospital's "
            "adapter delta in clear (research comparisons only).")
        return
    secure.require_threshold()
    per_round = round_size(config.federation, num_hospitals)
    if secure.threshold > per_round:
        raise ConfigError(
            f"secure_aggregation.threshold = {secure.threshold} but rounds have "
            f"{per_round} hospital(s): no round could complete."
        )
    try:
        check_threshold(secure.threshold, per_round)
        secure_codec(config, per_round)
    except (ProtocolAbort, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    keys_dir = Path(
        secure.simulation_keys_dir or Path(config.data.simulation_root) / "hospital-keys"
    )
    ensure_simulation_identities(keys_dir, num_hospitals)


def launch(plan: LaunchPlan, say: Callable[[str], None] = print) -> None:
    """Run the plan to completion; raises SimulationError or ConfigError on failure."""
    config = resolve_paths(load_run_config(plan.config_path), plan.config_path.parent)
    check_simulation_data(config, plan.num_hospitals)
    if config.federation.min_hospitals > plan.num_hospitals:
        raise ConfigError(
            f"federation.min_hospitals = {config.federation.min_hospitals} but only "
            f"{plan.num_hospitals} hospitals are simulated."
        )
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = plan.config_path.resolve()
    if plan.record_views is not None:
        views = str(plan.record_views.resolve())
        secure = dataclasses.replace(config.secure_aggregation, record_views_dir=views)
        config = dataclasses.replace(config, secure_aggregation=secure)
        # The coordinator reads its config from a file: write the effective one, self-contained.
        config_path = plan.run_dir.resolve() / "run-effective.toml"
        with config_path.open("wb") as handle:
            tomli_w.dump(config.to_dict(), handle)
        say(f"Recording each hospital's plaintext delta and the coordinator's view in {views} "
            "(simulation only, for security research).")
    prepare_secure_aggregation(config, plan.num_hospitals, say)
    work = plan.run_dir / ".flower"
    app_dir = write_app_bundle(work / "app")
    spec = SimulationSpec(
        app_dir=app_dir,
        num_hospitals=plan.num_hospitals,
        run_config={
            "config-path": str(config_path),
            "run-dir": str(plan.run_dir.resolve()),
            "resume": plan.resume,
        },
        work_dir=work,
        client_cpus=plan.client_cpus,
        client_gpus=plan.client_gpus,
        timeout_s=plan.timeout_s,
        ray_num_cpus=plan.num_hospitals * plan.client_cpus,
    )
    run_simulation(spec, on_line=lambda line: show_flower_line(line, say))


def show_flower_line(line: str, say: Callable[[str], None]) -> None:
    if ":DEBUG:" in line:  # Flower's own debug log, forwarded from the simulation
        return
    text = _FLOWER_PREFIX.sub("", line.rstrip())
    if text and not any(noise in text for noise in _NOISE):
        say(text)
