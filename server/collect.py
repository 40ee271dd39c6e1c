"""What a round collects from hospitals, whichever way it was sent (in clear or masked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from fedtune.core.wire import reply_hospital
from fedtune.server.report import weighted_metrics
from fedtune.strategies.aggregate import AggregateUpdate


class HospitalNames:
    """Node id → the name its hospital reports, so even an error reply names the hospital."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def known(self, node_id: int) -> str:
        """The name a node reported earlier, or its node id (a node that never answered)."""
        return self._names.get(node_id, f"node {node_id}")

    def of(self, reply: Message) -> str:
        node_id = reply.metadata.src_node_id
        fallback = self._names.get(node_id, f"node {node_id}")
        if reply.has_error():
            return fallback
        name = reply_hospital(reply, fallback)
        if any(other == name for nid, other in self._names.items() if nid != node_id):
            name = f"{name} (node {node_id})"  # two sites chose the same name: keep both
        self._names.setdefault(node_id, name)
        return self._names[node_id]


@dataclass
class Refusal:
    """A hospital whose reply was not used this round, and why."""

    hospital: str
    reason: str


@dataclass
class RoundCollection:
    """The outcome of a round's training stage(s): the sum, or why there is none."""

    update: AggregateUpdate | None = None
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    abort_reason: str = ""
    # The coordinator computed (saw) the round's sum, even if it then refused it: it counts
    # as a release for client-level privacy accounting.
    sum_revealed: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # e.g. secure-aggregation timings
    # Per hospital: fingerprints of its training data and base model (fedtune.lineage).
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per hospital: the round's starting adapter on its validation split (Job.validate).
    validation: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Metrics per hospital for one split, and the example-weighted mean."""

    per_hospital: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def weighted(self) -> dict[str, float]:
        return weighted_metrics(self.per_hospital)
