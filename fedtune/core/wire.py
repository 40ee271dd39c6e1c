"""What travels between coordinator and hospitals: record names and conversions.

This is the one module on the shared side that knows Flower's record types. Every message of
a round carries named records (below); keeping the names here means the coordinator and the
hospitals cannot drift apart, and a reply of the wrong shape is refused with a clear reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.core.adapters import Adapter, as_float32
from fedtune.core.config import RunConfig

# Message types (Flower routes "train" to @app.train(), "evaluate" to @app.evaluate()).
TRAIN = "train"
EVALUATE = "evaluate"

# Record names inside a message's RecordDict.
GLOBAL_ADAPTER = "global-adapter"  # server -> hospital: the current global adapter
JOB = "job"  # server -> hospital: round number, run configuration, evaluation split
DELTA = "delta"  # hospital -> server: local adapter - global adapter
METRICS = "metrics"  # hospital -> server: counts, losses, timings (never data)
LINEAGE = "lineage"  # hospital -> server: fingerprints of its training data and base model
# hospital -> server: metrics of the adapter a request carried on the validation split, in a
# train reply or the final test evaluation's reply (Job.validate)
VALIDATION = "validation-of-received"
HOSPITAL = "hospital"  # hospital -> server: the hospital's name, as its admin configured it

# Evaluation splits a hospital holds locally.
SPLITS = ("validation", "test")


class MalformedReply(ValueError):
    """A hospital's reply does not have the records a reply of that type must have."""


def reply_size_bytes(message: Message) -> int:
    """Bytes a message's records carry (arrays, byte and text values, numbers)."""
    content = message.content
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for config in content.config_records.values():
        for value in config.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    for metrics in content.metric_records.values():
        total += 8 * len(metrics)
    return total


def check_reply_size(message: Message, limit_mb: float) -> None:
    """Refuse a reply larger than the run allows before parsing anything in it.

    A hospital's replies have a known size (an adapter delta, shares, metrics), so anything
    far larger is refused as malformed rather than parsed. A deployed reply is already
    bounded while it is pulled, before it is decoded (server/bounded_pull.py); this check
    also covers the simulation's replies, which are never pulled over the network.
    """
    size = reply_size_bytes(message)
    if size > limit_mb * 1024**2:
        raise MalformedReply(
            f"the reply carries {size / 1024**2:.1f} MB, more than federation.max_reply_mb = "
            f"{limit_mb:g}; it was not read"
        )


@dataclass(frozen=True)
class Job:
    """What the coordinator asks of a hospital in one message."""

    server_round: int
    config: RunConfig
    run_id: str  # the coordinator's run identity: hospitals' privacy ledgers key on it
    split: str = "validation"  # evaluate only
    # 1 for a round's first try; an aborted round is tried again with the next number, and
    # secure aggregation binds its keys to it (a retry never reuses a first try's keys).
    attempt: int = 1
    # Also evaluate the carried adapter on the validation split (evaluation.with_training).
    validate: bool = False

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": self.server_round,
                "attempt": self.attempt,
                "run-config": self.config.to_json(),
                "run-id": self.run_id,
                "split": self.split,
                "validate": self.validate,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Job:
        split = str(record["split"])
        if split not in SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; expected one of {SPLITS}")
        return cls(
            server_round=int(record["round"]),  # type: ignore[arg-type]
            config=RunConfig.from_json(str(record["run-config"])),
            run_id=str(record["run-id"]),
            split=split,
            attempt=int(record["attempt"]),  # type: ignore[arg-type]
            validate=bool(record["validate"]),
        )


def adapter_to_record(adapter: Adapter) -> ArrayRecord:
    """Adapter -> ArrayRecord, float32, names preserved."""
    return ArrayRecord({name: Array(value) for name, value in as_float32(adapter).items()})


def record_to_adapter(record: ArrayRecord) -> Adapter:
    """ArrayRecord -> adapter (float32 numpy arrays)."""
    return {name: np.asarray(array.numpy(), dtype=np.float32) for name, array in record.items()}


def request_content(adapter: Adapter, job: Job) -> RecordDict:
    """Content of a train or evaluate request."""
    return RecordDict({GLOBAL_ADAPTER: adapter_to_record(adapter), JOB: job.to_record()})


def parse_request(message: Message) -> tuple[Adapter, Job]:
    """The global adapter and the job of a request (at the hospital)."""
    content = message.content
    return record_to_adapter(content.array_records[GLOBAL_ADAPTER]), Job.from_record(
        content.config_records[JOB]
    )


def train_reply_content(delta: Adapter, metrics: dict[str, float], hospital: str) -> RecordDict:
    """Content of a hospital's train reply: the delta, its metrics and its name."""
    return RecordDict(
        {
            DELTA: adapter_to_record(delta),
            METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
            HOSPITAL: ConfigRecord({"name": hospital}),
        }
    )


def evaluate_reply_content(metrics: dict[str, float], hospital: str) -> RecordDict:
    """Content of a hospital's evaluate reply: metrics only, never data or predictions."""
    return RecordDict(
        {
            METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
            HOSPITAL: ConfigRecord({"name": hospital}),
        }
    )


def reply_hospital(message: Message, fallback: str) -> str:
    """The hospital name a reply carries, or the fallback (node id) when it has none."""
    if message.has_content() and HOSPITAL in message.content.config_records:
        return str(message.content.config_records[HOSPITAL].get("name", fallback))
    return fallback


def parse_train_reply(message: Message) -> tuple[Adapter, dict[str, float]]:
    """The delta and metrics of a train reply; a reply missing either is malformed."""
    content = message.content
    if DELTA not in content.array_records:
        raise MalformedReply(f"the reply has no '{DELTA}' record")
    metrics = parse_metrics(message)
    count = metrics.get("num-examples", 0.0)
    if not (math.isfinite(count) and count > 0):
        raise MalformedReply(f"the reply's example count {count!r} is not a positive number")
    return record_to_adapter(content.array_records[DELTA]), metrics


def parse_metrics(message: Message) -> dict[str, float]:
    """The metrics record of a reply; a reply without one is malformed."""
    content = message.content
    if METRICS not in content.metric_records:
        raise MalformedReply(f"the reply has no '{METRICS}' record")
    return {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]


def parse_optional_metrics(message: Message) -> dict[str, float]:
    """The metrics record of a reply, or {} when it sent none (a masked-input reply may)."""
    if METRICS not in message.content.metric_records:
        return {}
    return parse_metrics(message)


def validation_record(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def parse_validation(message: Message) -> dict[str, float] | None:
    """The validation metrics of the adapter the request carried, or None when the reply has
    none (not asked, or the hospital reached its evaluation limit); non-finite is malformed."""
    record = message.content.metric_records.get(VALIDATION)
    if record is None:
        return None
    metrics = {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise MalformedReply(f"its validation metrics {', '.join(bad)} are not finite")
    return metrics


def lineage_record(lineage: dict[str, str | int]) -> ConfigRecord:
    """A hospital's fingerprints (hashes, and counts only where its admin shares them)."""
    return ConfigRecord(dict(lineage))


def parse_lineage(message: Message) -> dict[str, str | int]:
    """The fingerprints a train reply carries; {} for a reply without them. Only hex hashes,
    counts and a JSON label histogram are accepted: nothing else may travel in this record."""
    record = message.content.config_records.get(LINEAGE)
    if record is None:
        return {}
    allowed = {"data_sha256", "model_sha256", "data_examples", "data_labels"}
    out: dict[str, str | int] = {}
    for key, value in record.items():
        if key not in allowed:
            raise MalformedReply(f"the lineage record holds an unexpected field {key!r}")
        if key.endswith("sha256"):
            text = str(value)
            if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
                raise MalformedReply(f"lineage {key} is not a SHA-256 hex digest")
            out[key] = text
        elif key == "data_examples":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedReply("lineage data_examples is not a count")
            out[key] = value
        else:
            out[key] = str(value)
    return out
