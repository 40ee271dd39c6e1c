"""The hospital's own audit log: what its node sent, refused and checked (hashes only).

A deployed node appends to the hash-chained log named by its `audit-log` setting (by default
beside its privacy ledger): every update it sent (the SHA-256 of the exact bytes, never the
values), every evaluation it reported, every request it refused and why, the identifier
check of its data. An auditor compares the hospital's record with the coordinator's
audit.jsonl: the same rounds, the same fingerprints. Simulated hospitals keep no log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedtune.client.node_settings import DEFAULT_MAX_EVALUATIONS, NodeSettings
from fedtune.client.privacy_ledger import guarantee_sentence
from fedtune.core.audit import AuditLog

log = logging.getLogger("fedtune.hospital")


def privacy_statement(metrics: dict[str, float]) -> dict[str, Any] | None:
    """What this round's DP protected, for the hospital's own log (exact ε and δ included:
    the log stays at the hospital). None when the round trained without DP."""
    if not metrics.get("dp") or "epsilon" not in metrics:
        return None
    unit = "patient" if metrics.get("dp-patient-level") else "record"
    return {
        "protects": f"each {unit}",
        "epsilon": metrics["epsilon"],
        "delta": metrics["delta"],
        "meaning": guarantee_sentence(unit, metrics["epsilon"], metrics["delta"]),
    }


def record_hospital_event(node: NodeSettings, event: str, data: dict[str, Any]) -> None:
    """Append one event to this node's log, if it keeps one."""
    if node.audit_log is not None:
        AuditLog(node.audit_log).append(event, data)


class EvaluationLimitReached(PermissionError):
    """The coordinator asked this run for more evaluations than the hospital allows."""


def logged_events(node: NodeSettings, event: str) -> Iterator[dict[str, Any]]:
    """The data of every `event` record in this node's audit log (none without a log)."""
    if node.audit_log is None or not node.audit_log.is_file():
        return
    for line in node.audit_log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if record.get("event") == event:
                yield dict(record.get("data", {}))


def check_evaluation_allowed(node: NodeSettings, run_id: str) -> None:
    """Evaluation replies are not noised: a deployed hospital answers at most
    `max-evaluations` of them per run (default DEFAULT_MAX_EVALUATIONS), counted from the
    `sent-metrics` events of its own audit log (so the count survives restarts). A node
    without an audit log (simulated hospitals) is not limited."""
    if node.audit_log is None or node.data_path is None:
        return
    limit = node.max_evaluations if node.max_evaluations is not None else DEFAULT_MAX_EVALUATIONS
    sent = sum(1 for data in logged_events(node, "sent-metrics") if data.get("run_id") == run_id)
    if sent >= limit:
        raise EvaluationLimitReached(
            f"this hospital already answered {sent} evaluation request(s) of run {run_id}, "
            f"its limit (node setting max-evaluations = {limit}); evaluations are not "
            "covered by differential privacy, so it answers no more"
        )


def bytes_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class IdentifiersInData(ValueError):
    """The hospital's data holds likely direct identifiers its admin has not acknowledged."""


# file (path, mtime, size) -> the identifier report's text, or "" when nothing was found.
_checked: dict[tuple[str, int, int], str] = {}


def check_identifiers(data_path: Path, node: NodeSettings) -> None:
    """Before training: refuse data with likely identifiers unless the admin acknowledged
    them (`pii_acknowledged = true`); the report names kinds and lines, never the values.
    Checked once per file version in a process; the finding is written to the hospital's log.
    """
    from fedtune.client.pii_guard import scan_for_identifiers

    stat = data_path.stat()
    key = (str(data_path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _checked:
        report = scan_for_identifiers(data_path)
        _checked[key] = report.summary() if report.found else ""
        if report.found:
            record_hospital_event(node, "identifier-check", report.to_dict())
    if not _checked[key]:
        return
    if not node.pii_acknowledged:
        raise IdentifiersInData(_checked[key])
    log.warning("training on data with acknowledged identifiers: %s", data_path)


def record_sent_metrics(
    node: NodeSettings, server_round: int, run_id: str, split: str, adapter_sha256: str,
    metrics: dict[str, float],
) -> None:
    """The hospital's record of evaluation metrics it sent (what `max-evaluations` counts)."""
    record_hospital_event(node, "sent-metrics", {
        "round": server_round, "split": split, "run_id": run_id,
        "global_adapter_sha256": adapter_sha256, "metrics": metrics,
    })
