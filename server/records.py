"""The coordinator's metrics log (metrics.jsonl) as typed records, written and read here only.

Each line of metrics.jsonl is one record; its `event` field names the type. Writers build a
record object and `RunDirectory.log` appends it; readers (`read_records`, `completed_rounds`)
get the objects back, so no module keys on `record.get("event")` or spells a field name by
hand, and a misspelt field is a type error instead of a silently missing key.

The log is the human- and tool-readable history (reports, model card, sweeps, benchmarks);
resuming a run does not replay it: the coordinator's state is `server/state.py`'s
`CoordinatorState`, saved with every checkpoint. The JSON format of each line is unchanged
from earlier releases, so old run directories stay readable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class RoundStarted:
    """Logged before any hospital is asked, so a resumed run never reuses an attempt."""

    EVENT: ClassVar[str] = "round-start"
    round: int
    attempt: int
    global_adapter_sha256: str


@dataclass(frozen=True)
class SumRevealed:
    """The coordinator computed a round's sum: one release for client-level accounting."""

    EVENT: ClassVar[str] = "sum-revealed"
    round: int
    hospitals_sampled: int
    hospitals_connected: int


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one adapter on one split, per hospital and example-weighted."""

    EVENT: ClassVar[str] = "evaluate"
    round: int
    split: str
    weighted: dict[str, float]
    per_hospital: dict[str, dict[str, float]]
    refused: dict[str, str]


@dataclass
class RoundRecord:
    """One attempt at a round: who was asked, who trained, who refused, and what came of it.

    Built up while the attempt runs (the audit trail reads it at each step); fields left
    None did not happen (an aborted round has no validation) and are not written.
    """

    EVENT: ClassVar[str] = "round"
    round: int
    attempt: int
    hospitals_asked: int
    hospitals_connected: int
    hospitals_sampled: int
    sampled_nodes: list[int]
    sampled_hospitals: list[str]
    hospitals_used: list[str]
    refused: dict[str, str]
    train: dict[str, dict[str, float]]
    train_phase_seconds: float
    secure_aggregation: dict[str, Any]
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)
    aborted: bool | None = None
    reason: str | None = None
    aggregate_seconds: float | None = None
    privacy_per_hospital: dict[str, dict[str, float]] | None = None
    client_level_privacy: dict[str, float] | None = None
    aggregate_norm: float | None = None
    global_adapter_sha256: str | None = None
    validation: dict[str, Any] | None = None  # {"weighted", "per_hospital", "refused"}
    seconds: float | None = None

    @property
    def completed(self) -> bool:
        return not self.aborted


@dataclass(frozen=True)
class EarlyStop:
    EVENT: ClassVar[str] = "early-stop"
    round: int
    best_round: int


@dataclass(frozen=True)
class Rollback:
    """`fedtune rollback`: later rounds moved aside; a resumed run continues from `to_round`."""

    EVENT: ClassVar[str] = "rollback"
    to_round: int
    moved_rounds: list[int]
    moved_to: str | None
    adapter_sha256: str


LogRecord = RoundStarted | SumRevealed | Evaluation | RoundRecord | EarlyStop | Rollback
_TYPES: dict[str, type[Any]] = {
    kind.EVENT: kind
    for kind in (RoundStarted, SumRevealed, Evaluation, RoundRecord, EarlyStop, Rollback)
}


class DamagedLog(ValueError):
    """A metrics.jsonl line is not a record this version of fedtune wrote."""


def record_to_json(record: LogRecord) -> dict[str, Any]:
    """The line's JSON object: `event` plus every field that is set."""
    values = {k: v for k, v in asdict(record).items() if v is not None}
    return {"event": record.EVENT, **values}


def record_from_json(line: dict[str, Any], where: str = "metrics.jsonl") -> LogRecord:
    """The typed record of one line; a line of unknown type or with missing fields is refused
    (naming where), never skipped: a history with holes would mislead its reader."""
    kind = _TYPES.get(str(line.get("event")))
    if kind is None:
        raise DamagedLog(f"{where}: unknown event {line.get('event')!r}")
    known = {f.name for f in fields(kind)}
    try:
        record: LogRecord = kind(**{k: v for k, v in line.items() if k in known})
    except TypeError as exc:
        raise DamagedLog(f"{where}: a {kind.EVENT!r} record is incomplete: {exc}") from None
    return record


def completed_rounds(records: list[LogRecord]) -> list[RoundRecord]:
    """The round attempts that produced a new global adapter, in log order."""
    return [r for r in records if isinstance(r, RoundRecord) and r.completed]
