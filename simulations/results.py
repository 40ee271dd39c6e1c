"""The record of one sweep arm run, and its JSON persistence.

A research sweep runs *arms* (centralized, local-only, federated, with or without DP and
secure aggregation) on every *point* of a grid of swept values, for several seeds, and DP arms
at several target ε. Each run leaves one :class:`ArmResult`; a sweep keeps them all in one
JSON file (:func:`save_results` / :func:`load_results`) from which tables and plots are made.

This module is pure (standard library only) so that it can be imported anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARMS = (
    "centralized",
    "centralized-dp",
    "local-only",
    "local-only-dp",
    "federated",
    "federated-secagg",
    "federated-dp",
    "federated-dp-secagg",
)


def is_dp_arm(arm: str) -> bool:
    """Whether ``arm`` trains with differential privacy (``...-dp`` or ``...-dp-...``)."""
    return arm.endswith("-dp") or "-dp-" in arm


def format_value(value: Any) -> str:
    """A compact, human-readable form of a swept value (floats without trailing zeros)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class ArmResult:
    """One run of one arm, at one grid point, one seed (and one target ε for DP arms)."""

    point: dict[str, Any]
    arm: str
    epsilon: float | None
    seed: int
    metric_name: str
    status: str = "ok"
    error: str = ""
    final_metric: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    hospital_epsilon: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    achieved_epsilon: float | None = None
    test_fingerprint: str = ""
    seconds: float = 0.0
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run finished and produced a final metric."""
        return self.status == "ok" and self.final_metric is not None

    def label(self) -> str:
        """The arm with its target ε, e.g. ``"federated-dp ε=8"`` or ``"local-only"``."""
        if self.epsilon is None:
            return self.arm
        return f"{self.arm} ε={format_value(float(self.epsilon))}"

    def point_label(self) -> str:
        """The grid point as ``"alpha=0.5 hospitals=3"`` (sorted keys; ``""`` if empty)."""
        return point_label(self.point)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists; :meth:`from_json` restores them)."""
        return {
            "point": dict(self.point),
            "arm": self.arm,
            "epsilon": self.epsilon,
            "seed": self.seed,
            "metric_name": self.metric_name,
            "status": self.status,
            "error": self.error,
            "final_metric": self.final_metric,
            "curve": [[int(r), float(m)] for r, m in self.curve],
            "hospital_epsilon": {
                str(h): [[int(r), float(e)] for r, e in spent]
                for h, spent in self.hospital_epsilon.items()
            },
            "achieved_epsilon": self.achieved_epsilon,
            "test_fingerprint": self.test_fingerprint,
            "seconds": float(self.seconds),
            "run_dir": self.run_dir,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArmResult:
        """The inverse of :meth:`to_json`; optional fields may be missing."""
        return cls(
            point=dict(d.get("point") or {}),
            arm=str(d["arm"]),
            epsilon=_opt_float(d.get("epsilon")),
            seed=int(d["seed"]),
            metric_name=str(d.get("metric_name", "")),
            status=str(d.get("status", "ok")),
            error=str(d.get("error", "")),
            final_metric=_opt_float(d.get("final_metric")),
            curve=[(int(r), float(m)) for r, m in d.get("curve") or []],
            hospital_epsilon={
                str(h): [(int(r), float(e)) for r, e in spent]
                for h, spent in (d.get("hospital_epsilon") or {}).items()
            },
            achieved_epsilon=_opt_float(d.get("achieved_epsilon")),
            test_fingerprint=str(d.get("test_fingerprint", "")),
            seconds=float(d.get("seconds", 0.0)),
            run_dir=str(d.get("run_dir", "")),
        )


def point_label(point: dict[str, Any]) -> str:
    """A grid point as ``"key=value ..."`` with sorted keys (``""`` for the empty point)."""
    return " ".join(f"{k}={format_value(point[k])}" for k in sorted(point))


def point_key(point: dict[str, Any]) -> str:
    """A canonical, hashable key of a grid point (for grouping results)."""
    return json.dumps(point, sort_keys=True, default=str)


def arm_order(arm: str) -> tuple[int, str]:
    """Sort key putting arms in :data:`ARMS` order (unknown arms last, by name)."""
    return (ARMS.index(arm) if arm in ARMS else len(ARMS), arm)


def save_results(results: Sequence[ArmResult], path: Path) -> None:
    """Write ``results`` as a JSON list to ``path`` atomically (temporary file + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: Path) -> list[ArmResult]:
    """Read the results written by :func:`save_results`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of arm results, got {type(data).__name__}")
    return [ArmResult.from_json(d) for d in data]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
