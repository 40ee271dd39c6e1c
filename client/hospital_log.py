"""The hospital's own audit log: what its node sent, refused and checked (hashes only).

A deployed node appends to the hash-chained log named by its `audit-log` setting (by default
beside its privacy ledger): every update it sent (the SHA-256 of the exact bytes, never the
values), every evaluation it reported, every request it refused and why, the identifier
check of its data. An auditor compares the hospital's record with the coordinator's
audit.jsonl: the same rounds, the same fingerprints. Simulated hospitals keep no log.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from fedtune.client.node_settings import NodeSettings
from fedtune.core.audit import AuditLog

log = logging.getLogger("fedtune.hospital")


def record_hospital_event(node: NodeSettings, event: str, data: dict[str, Any]) -> None:
    """Append one event to this node's log, if it keeps one."""
    if node.audit_log is not None:
        AuditLog(node.audit_log).append(event, data)


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
