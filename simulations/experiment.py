"""An experiment file: what to compare, on which data split how, over which grid.

One TOML file holds the experiment's own sections and, beside them, the fedtune run
configuration that every arm shares (``[model]``, ``[lora]``, ``[train]``, ``[federation]``,
``[privacy]``, ``[secure_aggregation]``, ``[evaluation]``, exactly as for ``fedtune run``)::

    [experiment]   name, seeds, arms, secure_aggregation_threshold, run_timeout_s
    [dataset]      name, examples_per_hospital, test_examples, seed
    [partition]    method, alpha, hospitals, min_examples
    [resources]    client_cpus, client_gpus (per virtual hospital, for Flower's engine)
    [sweep]        lists: epsilon, hospitals, alpha, strategy, lora_r, adapter_method

Unknown keys are errors that name the allowed ones, as in every fedtune file: a typo in a
sweep must never silently run the wrong grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.core.config import (
    ConfigError,
    RunConfig,
    adapter_section_as_written,
    parse_run_config,
    resolve_paths,
)
from fedtune.core.toml_files import check_tables, read_toml, scalar
from fedtune.simulations.datasets import DATASETS, TASK_OF
from fedtune.simulations.partition import PARTITION_METHODS
from fedtune.simulations.results import ARMS, is_dp_arm

_REQUIRED = object()  # marks a key that has no default
SWEEP_KEYS = ("epsilon", "hospitals", "alpha", "strategy", "lora_r", "adapter_method")
_EXPERIMENT_SECTIONS = ("experiment", "dataset", "partition", "resources", "sweep")
_RUN_SECTIONS = (
    "model", "lora", "adapter", "train", "federation", "privacy", "secure_aggregation",
    "evaluation",
)
# [data] is the runner's: it writes the hospitals' files and points the run at them.
_ALLOWED = {
    "experiment": {"name", "description", "seeds", "arms", "secure_aggregation_threshold",
                   "run_timeout_s"},
    "dataset": {"name", "examples_per_hospital", "test_examples", "seed"},
    "partition": {"method", "alpha", "hospitals", "min_examples"},
    "resources": {"client_cpus", "client_gpus"},
    "sweep": set(SWEEP_KEYS),
}


@dataclass(frozen=True)
class Experiment:
    """A parsed, validated experiment file."""

    name: str
    description: str
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    dataset: str
    examples_per_hospital: int
    test_examples: int
    dataset_seed: int
    partition_method: str
    min_examples: int
    client_cpus: int
    client_gpus: float
    run_timeout_s: float
    # "majority" or a number; required whenever an arm uses secure aggregation.
    secure_aggregation_threshold: str | int | None
    sweep: dict[str, tuple[Any, ...]]  # every SWEEP_KEY, single-valued when not swept
    swept: tuple[str, ...]  # keys the file listed in [sweep] (epsilon excluded): table columns
    base: RunConfig  # the shared run configuration (data section filled in per run)
    path: Path

    @property
    def task(self) -> str:
        return TASK_OF[self.dataset]

    @property
    def metric_name(self) -> str:
        """The headline metric, higher is better, the same one for every arm."""
        return "accuracy" if self.task == "classify" else "exact-match"

    def points(self) -> list[dict[str, Any]]:
        """The grid (all sweep keys except ε, which DP arms iterate themselves)."""
        keys = [k for k in SWEEP_KEYS if k != "epsilon"]
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(self.sweep[k] for k in keys))
        ]

    def epsilons(self) -> tuple[float, ...]:
        return tuple(float(e) for e in self.sweep["epsilon"])

    def threshold_for(self, hospitals: int) -> int:
        """The secure-aggregation threshold for a federation of this size (as configured)."""
        choice = self.secure_aggregation_threshold
        if choice is None:
            raise ConfigError(
                f"{self.path}: [experiment] secure_aggregation_threshold is required when an "
                'arm uses secure aggregation: "majority" or a number of hospitals.'
            )
        return hospitals // 2 + 1 if choice == "majority" else int(choice)


def load_experiment(path: Path) -> Experiment:
    """Read and validate an experiment file; relative paths are relative to its folder."""
    raw = read_toml(path, "experiment file")
    known = (*_EXPERIMENT_SECTIONS, *_RUN_SECTIONS)
    check_tables(str(path), raw, {section: _ALLOWED.get(section) for section in known})
    run_raw = {section: dict(raw[section]) for section in _RUN_SECTIONS if section in raw}
    run_raw = adapter_section_as_written(run_raw, str(path))
    base = resolve_paths(parse_run_config(run_raw, origin=str(path)), path.parent)
    tables = {name: raw.get(name, {}) for name in _EXPERIMENT_SECTIONS}
    exp, data, part, res = (tables[n] for n in ("experiment", "dataset", "partition", "resources"))

    def get(table: dict[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
        value = table.get(key, default)
        if value is _REQUIRED:
            raise ConfigError(f"{path}: [{where}] {key} is required.")
        return scalar(str(path), where, key, value, kind)

    name = get(exp, "experiment", "name", str, path.stem)
    seeds = tuple(get(exp, "experiment", "seeds", list, [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: [experiment] seeds must be a non-empty list of integers.")
    arms = tuple(get(exp, "experiment", "arms", list, _REQUIRED))
    for arm in arms:
        if arm not in ARMS:
            raise ConfigError(f"{path}: arm {arm!r} is not one of: {', '.join(ARMS)}.")
    if not arms or len(set(arms)) != len(arms):
        raise ConfigError(f"{path}: [experiment] arms must list distinct arms.")
    threshold = exp.get("secure_aggregation_threshold")
    if threshold is not None and threshold != "majority" and (
        not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2
    ):
        raise ConfigError(
            f'{path}: [experiment] secure_aggregation_threshold must be "majority" or a '
            f"whole number >= 2, got {threshold!r}."
        )
    dataset = get(data, "dataset", "name", str, _REQUIRED)
    if dataset not in DATASETS:
        raise ConfigError(f"{path}: dataset {dataset!r} is not one of: {', '.join(DATASETS)}.")
    if base.model.task != TASK_OF[dataset]:
        raise ConfigError(
            f"{path}: dataset {dataset!r} is a '{TASK_OF[dataset]}' task but [model] task is "
            f"'{base.model.task}'."
        )
    method = get(part, "partition", "method", str, _REQUIRED)
    if method not in PARTITION_METHODS:
        raise ConfigError(
            f"{path}: partition method {method!r} is not one of: {', '.join(PARTITION_METHODS)}."
        )
    sweep_raw = tables["sweep"]
    defaults = {
        "epsilon": [base.privacy.target_epsilon],
        "hospitals": [get(part, "partition", "hospitals", int, _REQUIRED)],
        "alpha": [get(part, "partition", "alpha", float, 0.5)],
        "strategy": [base.federation.strategy],
        "lora_r": [base.lora.r],
        "adapter_method": [base.adapter.method],
    }
    sweep: dict[str, tuple[Any, ...]] = {}
    for key in SWEEP_KEYS:
        values = sweep_raw.get(key, defaults[key])
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: [sweep] {key} must be a non-empty list.")
        sweep[key] = tuple(values)
    _check_sweep(path, sweep)
    if not any(is_dp_arm(arm) for arm in arms) and "epsilon" in sweep_raw:
        raise ConfigError(f"{path}: [sweep] epsilon is set but no arm uses DP.")
    experiment = Experiment(
        name=name,
        description=get(exp, "experiment", "description", str, ""),
        seeds=seeds,
        arms=arms,
        dataset=dataset,
        examples_per_hospital=get(data, "dataset", "examples_per_hospital", int, _REQUIRED),
        test_examples=get(data, "dataset", "test_examples", int, _REQUIRED),
        dataset_seed=get(data, "dataset", "seed", int, 0),
        partition_method=method,
        min_examples=get(part, "partition", "min_examples", int, 10),
        client_cpus=get(res, "resources", "client_cpus", int, 1),
        client_gpus=get(res, "resources", "client_gpus", float, 0.0),
        run_timeout_s=get(exp, "experiment", "run_timeout_s", float, 3600.0),
        secure_aggregation_threshold=threshold,
        sweep=sweep,
        swept=tuple(k for k in SWEEP_KEYS if k in sweep_raw and k != "epsilon"),
        base=base,
        path=path,
    )
    if any(arm.endswith("secagg") for arm in arms):
        for hospitals in sweep["hospitals"]:
            experiment.threshold_for(hospitals)  # raises when the threshold is missing
    return experiment


def _check_sweep(path: Path, sweep: dict[str, tuple[Any, ...]]) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: [sweep] {key} {why}, got {list(sweep[key])}.")

    if not all(isinstance(e, int | float) and not isinstance(e, bool) and e > 0
               for e in sweep["epsilon"]):
        raise bad("epsilon", "must be positive numbers")
    for key in ("hospitals", "lora_r"):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sweep[key]):
            raise bad(key, "must be whole numbers >= 1")
    if not all(isinstance(a, int | float) and not isinstance(a, bool) and a > 0
               for a in sweep["alpha"]):
        raise bad("alpha", "must be positive numbers")
    from fedtune.core.config import ADAPTER_METHODS, STRATEGIES

    if not all(s in STRATEGIES for s in sweep["strategy"]):
        raise bad("strategy", f"must be among {', '.join(STRATEGIES)}")
    if not all(m in ADAPTER_METHODS for m in sweep["adapter_method"]):
        raise bad("adapter_method", f"must be among {', '.join(ADAPTER_METHODS)}")
    for key, values in sweep.items():
        if len(set(values)) != len(values):
            raise bad(key, "has repeated values")
