"""Does secure aggregation change the model? Compare a federated run with its masked twin.

Secure aggregation must change *who can see* the hospitals' deltas, not the result: the
coordinator decodes Σ wᵢ·Δᵢ from fixed point, and the only difference from the plain sum
is the encoding's rounding, at most ``codec.error_bound(n)`` per coordinate of the sum, so
at most ``η · error_bound / Σ wᵢ`` per coordinate of the next global adapter.

Only round 1 can be compared exactly: both runs start from the same global adapter, but
from round 2 on the hospitals train from adapters that differ by that rounding, and training
amplifies any difference. With DP the twins draw different (fresh, unpredictable) noise, so
``federated-dp`` and ``federated-dp-secagg`` are compared by their metrics only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.core.update_rules import secure_codec
from fedtune.server.records import RoundRecord
from fedtune.server.run_dir import RunDirectory
from fedtune.simulations.results import ArmResult

_FLOAT32_SLACK = 1e-6  # adapters travel and are stored as float32


@dataclass(frozen=True)
class SecaggComparison:
    """Round-1 global adapters of a plain and a secure-aggregation run of the same setting."""

    plain_run: str
    secure_run: str
    max_abs_difference: float
    bound: float

    @property
    def equal(self) -> bool:
        return self.max_abs_difference <= self.bound

    def to_json(self) -> dict[str, Any]:
        return {
            "plain_run": self.plain_run,
            "secure_run": self.secure_run,
            "max_abs_difference": self.max_abs_difference,
            "bound": self.bound,
            "equal_within_fixed_point_error": self.equal,
        }


def compare_round_one(plain_dir: Path, secure_dir: Path) -> SecaggComparison:
    """Max |difference| of the round-1 global adapters, and the fixed-point bound on it."""
    plain, secure = RunDirectory(plain_dir), RunDirectory(secure_dir)
    a, b = plain.load_adapter(1), secure.load_adapter(1)
    if set(a) != set(b):
        raise ValueError(f"{plain_dir} and {secure_dir} have different adapter tensors")
    difference = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    config = secure.config()
    first = next(r for r in plain.records() if isinstance(r, RoundRecord))
    used = first.hospitals_used
    weight_sum = sum(first.train[h]["num-examples"] for h in used)
    weight_sum = min(weight_sum, len(used) * config.secure_aggregation.max_weight)
    codec = secure_codec(config, len(used))
    step = config.federation.server_learning_rate
    bound = step * codec.error_bound(len(used)) / weight_sum + _FLOAT32_SLACK
    return SecaggComparison(str(plain_dir), str(secure_dir), difference, bound)


def compare_twins(results: Sequence[ArmResult]) -> list[SecaggComparison]:
    """Every (federated, federated-secagg) pair of finished runs with the same setting."""
    by_dir = {r.run_dir: r for r in results if r.status == "ok"}
    comparisons = []
    for run_dir, result in sorted(by_dir.items()):
        if result.arm != "federated-secagg":
            continue
        plain_dir = run_dir.replace("/federated-secagg-", "/federated-")
        if plain_dir in by_dir:
            comparisons.append(compare_round_one(Path(plain_dir), Path(run_dir)))
    return comparisons
