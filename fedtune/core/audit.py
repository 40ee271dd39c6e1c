"""An append-only, hash-chained audit log (JSON lines) of what a federated run did.

Governance asks "which hospitals took part in round 7, under which privacy settings, and which
global adapter came out?" long after the run. Each event is one JSON line::

    {"data":{...},"event":"aggregate","hash":"<sha256>","prev":"<sha256>","seq":7,
     "time":"2026-01-05T10:31:02.123456+00:00"}

- ``seq`` counts records from 0; ``time`` is UTC, ISO-8601.
- ``hash`` is the SHA-256 of the record's canonical JSON *without* ``hash`` (keys sorted,
  separators ``,`` and ``:``, UTF-8 without ``\\u`` escapes): an edited record no longer
  matches its hash.
- ``prev`` is the ``hash`` of the record before it (64 zeros for record 0). Since ``hash``
  covers every other field of that record, ``prev`` pins the whole previous line: a record
  removed, inserted or moved breaks the link at the first line after the change.

Every line is written in exactly that canonical form, so verification also refuses a line a
tool re-serialized (duplicate keys, other spacing): two JSON parsers must never disagree on
what a verified record says.

What a hash chain cannot do (read before relying on it):

- It holds no secret. Whoever can write the file can rewrite it from any record onwards and
  recompute every later hash; the result verifies. It proves the file is *internally*
  consistent, not who wrote it.
- Removing records from the *end* leaves a shorter chain that is still intact.

Both are closed by remembering the head somewhere the writer cannot change: pass the head
hash recorded there (the run summary, a hospital's own copy, a printed report) as
``expected_head``, and verification fails unless that exact record is still in the chain.
The head hash covers its ``seq``, so it pins the record count up to it as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

GENESIS_PREV = "0" * 64
"""The ``prev`` of record 0: no record precedes it."""

RECORD_FIELDS = frozenset({"seq", "time", "event", "data", "prev", "hash"})

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_EVENT_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*")


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that hashes are computed over.

    Sorted keys and fixed separators make equal values give equal text; NaN and infinity are
    refused because they are not JSON and other parsers would read them differently.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_sha256(value: Any) -> str:
    """SHA-256 (hex) of ``value``'s canonical JSON: a run configuration's fingerprint."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _record_hash(record: Mapping[str, Any]) -> str:
    return canonical_sha256({key: value for key, value in record.items() if key != "hash"})


class AuditLogError(Exception):
    """Appending was refused because the log's chain is already broken at ``line``."""

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f" at line {line}" if line is not None else ""
        super().__init__(
            f"{path}: refusing to append to this audit log, its chain is broken{where}: "
            f"{reason}. Appending would bury the break under valid records. Keep this file "
            "unchanged as evidence, tell whoever runs the federation, and point the audit log "
            "setting at a new file."
        )


@dataclass(frozen=True)
class AuditReport:
    """The result of verifying an audit log.

    ``records`` counts the records that verified, in order, before the first problem;
    ``head`` is the hash of the last of them (64 zeros when there is none), i.e. the ``prev``
    the next record must carry. ``first_bad_line`` (1-based) and ``first_bad_seq`` (the
    record number that line should hold) locate the first problem; both are None when the
    chain is intact, and when it is intact but does not contain the ``expected_head``.
    """

    path: Path
    records: int
    head: str
    reason: str | None = None
    first_bad_line: int | None = None
    first_bad_seq: int | None = None
    records_after_expected_head: int | None = None

    @property
    def intact(self) -> bool:
        return self.reason is None

    def summary(self) -> str:
        """One or two lines for the person running `fedtune audit verify`."""
        if self.intact:
            text = f"{self.path}: {self.records} records, chain intact (head {self.head})"
            later = self.records_after_expected_head
            if later:
                text += f"; {later} record(s) were appended after the expected head"
            return text
        if self.first_bad_line is None:
            return f"{self.path}: {self.reason}"
        return (
            f"{self.path}: chain broken at line {self.first_bad_line} "
            f"(record {self.first_bad_seq}): {self.reason}\n"
            f"  the {self.records} record(s) before it verify; nothing from line "
            f"{self.first_bad_line} on can be trusted"
        )


def verify_audit_log(path: Path | str, expected_head: str | None = None) -> AuditReport:
    """Verify every record's hash, sequence number and link, and name the first bad record.

    Detects an edited, removed, inserted or reordered record anywhere except at the end; a
    removed *last* record (or several) is only detected with ``expected_head`` (see the
    module docstring). Verification stops at the first problem: once a link is broken, the
    records after it prove nothing.
    """
    path = Path(path)
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Audit log {path} {where} (resolved: {path.resolve()}).")
    return _verify_bytes(path, path.read_bytes(), _parse_head(expected_head))


def _parse_head(expected_head: str | None) -> str | None:
    if expected_head is None:
        return None
    head = expected_head.strip().lower()
    if not _SHA256_HEX.fullmatch(head):
        raise ValueError(
            f"expected head {expected_head!r} is not a record hash (64 hexadecimal digits, as "
            "printed by `fedtune audit verify`)"
        )
    return head


class _BadLine(Exception):
    """Why one line breaks the chain; turned into the report, never shown on its own."""


def _verify_bytes(path: Path, raw: bytes, expected_head: str | None) -> AuditReport:
    lines = raw.split(b"\n")
    terminated = lines[-1] == b""  # the writer ends every record with a line break
    if terminated:
        lines.pop()
    head, head_line = GENESIS_PREV, 0
    for number, line in enumerate(lines, start=1):
        seq = number - 1
        try:
            record = _check_line(number, line, head)
            if number == len(lines) and not terminated:
                raise _BadLine(
                    f"line {number} is incomplete: it does not end with a line break (a "
                    "write was cut off, or the file was edited)"
                )
        except _BadLine as bad:
            return AuditReport(path, seq, head, str(bad), number, seq)
        head = record["hash"]
        if head == expected_head:
            head_line = number
    records = len(lines)
    if expected_head is None:
        return AuditReport(path, records, head)
    if not head_line:
        return AuditReport(
            path,
            records,
            head,
            (
                f"the expected head {expected_head} is not any record of this log, which ends at "
                f"record {records - 1} (head {head}): records were removed from its end, it was "
                "rewritten, or the hash belongs to another log"
            ),
        )
    return AuditReport(path, records, head, records_after_expected_head=records - head_line)


def _check_line(number: int, line: bytes, prev_hash: str) -> dict[str, Any]:
    """The record on ``line`` if it is well formed and follows the record hashed ``prev_hash``."""
    expected_seq = number - 1
    if not line.strip():
        raise _BadLine(f"line {number} is blank; the audit log never writes blank lines")
    try:
        text = line.decode("utf-8")
        record = json.loads(text)
    except UnicodeDecodeError:
        raise _BadLine(f"line {number} is not UTF-8 text (damaged or edited)") from None
    except json.JSONDecodeError:
        raise _BadLine(f"line {number} is not valid JSON (cut off or edited)") from None
    if not isinstance(record, dict):
        raise _BadLine(f"line {number} is not a JSON object, so not an audit record")
    _check_fields(number, record)
    seq = record["seq"]
    if _record_hash(record) != record["hash"]:
        raise _BadLine(
            f"record {seq} (line {number}) was edited: its hash does not match its content"
        )
    if seq > expected_seq:
        raise _BadLine(
            f"record {expected_seq} is missing or the records were reordered: the record at "
            f"line {number} has seq {seq}, expected {expected_seq}"
        )
    if seq < expected_seq:
        raise _BadLine(
            f"the records were reordered or a record was inserted: the record at line "
            f"{number} has seq {seq}, expected {expected_seq}"
        )
    if record["prev"] != prev_hash:
        if number == 1:
            raise _BadLine(
                "record 0 (line 1) does not start a chain: its prev is not 64 zeros (records "
                "before it were removed, or the file is the tail of another log)"
            )
        raise _BadLine(
            f"record {seq} (line {number}) does not follow line {number - 1}: its prev does "
            f"not match the hash of line {number - 1} (a record was inserted, removed or "
            "replaced before it)"
        )
    if canonical_json(record) != text:
        raise _BadLine(
            f"record {seq} (line {number}) was rewritten: its content matches its hash, but "
            "the line is not in the form the audit log writes (re-saved by another tool?)"
        )
    return record


def _check_fields(number: int, record: dict[str, Any]) -> None:
    missing = sorted(RECORD_FIELDS - record.keys())
    unexpected = sorted(record.keys() - RECORD_FIELDS)
    if missing or unexpected:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise _BadLine(f"line {number} does not hold an audit record ({'; '.join(parts)})")
    seq, time, event = record["seq"], record["time"], record["event"]
    problems = []
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        problems.append("seq is not a whole number >= 0")
    if not isinstance(event, str) or not event:
        problems.append("event is not a non-empty text")
    if not isinstance(record["data"], dict):
        problems.append("data is not a JSON object")
    for name in ("prev", "hash"):
        if not isinstance(record[name], str) or not _SHA256_HEX.fullmatch(record[name]):
            problems.append(f"{name} is not a SHA-256 hash (64 lowercase hex digits)")
    if not isinstance(time, str) or not _is_utc_timestamp(time):
        problems.append("time is not a UTC ISO-8601 timestamp")
    if problems:
        raise _BadLine(f"line {number} is malformed: {'; '.join(problems)}")


def _is_utc_timestamp(text: str) -> bool:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    return moment.utcoffset() == timedelta(0)


class AuditLog:
    """Appends chained records to one JSON-lines file; see the module docstring.

    Each ``append`` locks the file, re-verifies the whole chain and only then writes: a
    process must never extend a chain it cannot vouch for, and a run writes tens of records
    per round, so re-reading the file costs milliseconds. The file is created owner-only
    (mode 0600): its records describe who took part in what, which is nobody else's
    business on a shared machine. The lock (``fcntl.flock``) serializes appends from several
    processes on one machine; it is POSIX-only, like the rest of fedtune's deployment.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)

    @property
    def path(self) -> Path:
        return self._path

    def verify(self, expected_head: str | None = None) -> AuditReport:
        """Verify this log (see `verify_audit_log`)."""
        return verify_audit_log(self._path, expected_head)

    def append(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record for ``event`` and return it as stored (``seq``, ``hash``, ...).

        The write is one ``write`` of the whole line followed by ``fsync``: after a crash
        the record is either on disk or (rarely) cut off, and a cut-off line is reported
        by verification rather than silently continued.
        """
        import fcntl

        if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
            raise ValueError(
                f"audit event name {event!r} must be lowercase words joined by '-', "
                "e.g. 'round-start'"
            )
        if not isinstance(data, Mapping):
            raise TypeError(f"audit data for event {event!r} must be a mapping, got {data!r}")
        try:
            payload = json.loads(canonical_json(dict(data)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"audit data for event {event!r} is not plain JSON: {error}") from None
        if not self._path.parent.is_dir():
            raise FileNotFoundError(
                f"The folder of audit log {self._path} does not exist ({self._path.parent}); "
                "create it or correct the audit log path."
            )
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        created = not self._path.exists()
        fd = os.open(self._path, flags, 0o600)  # a umask can only narrow a new file's mode
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            report = _verify_bytes(self._path, _read_all(fd), None)
            if not report.intact:
                raise AuditLogError(self._path, report.first_bad_line, str(report.reason))
            record: dict[str, Any] = {
                "seq": report.records,
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
                "data": payload,
                "prev": report.head,
            }
            record["hash"] = _record_hash(record)
            _write_all(fd, (canonical_json(record) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        if created:
            _fsync_directory(self._path.parent)
        return record


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable too, or a crash could lose the whole log."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
