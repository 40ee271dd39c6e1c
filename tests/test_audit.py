"""The hash-chained audit log: every kind of tampering is found at the first record it touches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from fedtune.core.audit import (
    GENESIS_PREV,
    AuditLog,
    AuditLogError,
    canonical_json,
    canonical_sha256,
    verify_audit_log,
)
from fedtune.ops.cli import main

RECORDS = 10
EVENTS = [
    "run-start",
    "round-start",
    "participants",
    "privacy",
    "aggregate",
    "validation",
    "checkpoint",
    "round-start",
    "aggregate",
    "export",
]


def write_log(path: Path) -> list[dict[str, Any]]:
    log = AuditLog(path)
    return [
        log.append(event, {"round": seq // 3, "hospitals": ["h-1", "h-2"], "note": f"é {seq}"})
        for seq, event in enumerate(EVENTS)
    ]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    return path


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def forged(seq: int, prev: str, data: dict[str, Any]) -> str:
    """A record as someone who knows the format (but holds no secret) would write it."""
    record: dict[str, Any] = {
        "seq": seq,
        "time": "2026-01-01T00:00:00.000000+00:00",
        "event": "aggregate",
        "data": data,
        "prev": prev,
    }
    record["hash"] = canonical_sha256(record)
    return canonical_json(record)


def assert_broken_at(path: Path, line: int, words: str) -> None:
    report = verify_audit_log(path)
    assert not report.intact
    assert report.first_bad_line == line, report.reason
    assert report.first_bad_seq == line - 1
    assert report.records == line - 1
    assert words in str(report.reason), report.reason


def test_a_fresh_chain_verifies_and_links_every_record(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    records = write_log(path)
    report = verify_audit_log(path)
    assert report.intact and report.reason is None
    assert report.records == RECORDS and report.head == records[-1]["hash"]
    assert [r["seq"] for r in records] == list(range(RECORDS))
    assert records[0]["prev"] == GENESIS_PREV
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for record, line in zip(records, lines_of(path), strict=True):
        assert json.loads(line) == record  # what append returns is what was stored
        assert line == canonical_json(record)
        unhashed = {key: value for key, value in record.items() if key != "hash"}
        expected = hashlib.sha256(canonical_json(unhashed).encode("utf-8")).hexdigest()
        assert record["hash"] == expected
        assert record["time"].endswith("+00:00")


def test_a_new_writer_continues_the_chain_of_an_existing_file(log_path: Path):
    head = verify_audit_log(log_path).head
    record = AuditLog(log_path).append("export", {"round": 3})
    assert record["seq"] == RECORDS and record["prev"] == head
    assert verify_audit_log(log_path).records == RECORDS + 1


@pytest.mark.parametrize("seq", range(RECORDS))
def test_an_edited_record_is_found_at_its_line(log_path: Path, seq: int):
    lines = lines_of(log_path)
    record = json.loads(lines[seq])
    record["data"]["hospitals"] = ["h-1"]  # drop a participant, keep the old hash
    lines[seq] = canonical_json(record)
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 1, f"record {seq} (line {seq + 1}) was edited")


@pytest.mark.parametrize("seq", range(RECORDS))
def test_an_edit_in_place_by_text_replacement_is_found(log_path: Path, seq: int):
    lines = lines_of(log_path)
    lines[seq] = lines[seq].replace(f"é {seq}", f"e {seq}")
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 1, "was edited")


@pytest.mark.parametrize("seq", range(RECORDS - 1))
def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(log_path: Path, seq: int):
    lines = lines_of(log_path)
    original = json.loads(lines[seq])
    lines[seq] = forged(seq, original["prev"], {"round": 99})
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 2, f"does not follow line {seq + 1}")


def test_rewriting_the_last_record_is_only_caught_with_the_expected_head(log_path: Path):
    lines = lines_of(log_path)
    old_head = json.loads(lines[-1])["hash"]
    lines[-1] = forged(RECORDS - 1, json.loads(lines[-1])["prev"], {"round": 99})
    write_lines(log_path, lines)
    assert verify_audit_log(log_path).intact  # the documented limitation of a bare chain
    report = verify_audit_log(log_path, expected_head=old_head)
    assert not report.intact and old_head in str(report.reason)


@pytest.mark.parametrize("seq", range(RECORDS - 1))
def test_a_deleted_record_is_found_where_it_is_missing(log_path: Path, seq: int):
    lines = lines_of(log_path)
    del lines[seq]
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 1, f"record {seq} is missing")


def test_a_deleted_last_record_is_caught_by_the_expected_head(log_path: Path):
    head = verify_audit_log(log_path).head
    write_lines(log_path, lines_of(log_path)[:-1])
    shortened = verify_audit_log(log_path)
    assert shortened.intact and shortened.records == RECORDS - 1  # a chain alone cannot tell
    report = verify_audit_log(log_path, expected_head=head)
    assert not report.intact and report.first_bad_line is None
    assert "records were removed from its end" in str(report.reason)
    assert f"ends at record {RECORDS - 2}" in str(report.reason)


def test_an_expected_head_followed_by_later_records_verifies(log_path: Path):
    head = verify_audit_log(log_path).head
    log = AuditLog(log_path)
    log.append("round-start", {"round": 4})
    log.append("aggregate", {"round": 4})
    report = verify_audit_log(log_path, expected_head=head.upper())
    assert report.intact and report.records == RECORDS + 2
    assert report.records_after_expected_head == 2
    assert "2 record(s) were appended after the expected head" in report.summary()


def test_a_malformed_expected_head_is_refused(log_path: Path):
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        verify_audit_log(log_path, expected_head="abc")


@pytest.mark.parametrize(("first", "second"), [(0, 1), (2, 7), (4, 5), (8, 9)])
def test_swapped_records_are_found_at_the_first_moved_one(log_path: Path, first: int, second: int):
    lines = lines_of(log_path)
    lines[first], lines[second] = lines[second], lines[first]
    write_lines(log_path, lines)
    assert_broken_at(log_path, first + 1, "reordered")


@pytest.mark.parametrize("position", range(RECORDS + 1))
def test_an_inserted_record_with_a_stale_hash_is_found_at_its_line(log_path: Path, position: int):
    lines = lines_of(log_path)
    donor = json.loads(lines[3])
    donor["data"] = {"round": 99, "hospitals": ["forged"]}
    lines.insert(position, canonical_json(donor))
    write_lines(log_path, lines)
    assert_broken_at(log_path, position + 1, "was edited")


@pytest.mark.parametrize("position", range(1, RECORDS + 1))
def test_a_well_forged_inserted_record_breaks_the_chain_right_after_it(
    log_path: Path, position: int
):
    lines = lines_of(log_path)
    prev = json.loads(lines[position - 1])["hash"]
    lines.insert(position, forged(position, prev, {"round": 99}))
    write_lines(log_path, lines)
    if position == RECORDS:  # appended at the end, with a valid link: that is an append
        assert verify_audit_log(log_path).intact
        return
    assert_broken_at(log_path, position + 2, "a record was inserted")


@pytest.mark.parametrize("seq", range(1, RECORDS))
def test_a_replayed_record_is_found(log_path: Path, seq: int):
    lines = lines_of(log_path)
    lines.insert(seq, lines[seq - 1])  # the same record twice in a row
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 1, f"has seq {seq - 1}, expected {seq}")


def test_a_first_record_that_does_not_start_a_chain_is_found(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    write_lines(path, [forged(0, "1" * 64, {"round": 0})])
    assert_broken_at(path, 1, "does not start a chain")


@pytest.mark.parametrize("seq", range(RECORDS))
def test_a_cut_off_line_is_found(log_path: Path, seq: int):
    lines = lines_of(log_path)
    lines[seq] = lines[seq][: len(lines[seq]) // 2]
    write_lines(log_path, lines)
    assert_broken_at(log_path, seq + 1, f"line {seq + 1} is not valid JSON")


def test_a_cut_off_end_of_file_is_found(log_path: Path):
    raw = log_path.read_bytes()
    log_path.write_bytes(raw[:-40])
    assert_broken_at(log_path, RECORDS, "not valid JSON")
    log_path.write_bytes(raw[:-1])  # only the final line break lost
    assert_broken_at(log_path, RECORDS, "is incomplete")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda line: "", "is blank"),
        (lambda line: "[1, 2]", "not a JSON object"),
        (lambda line: line.replace('"seq":4,', '"seq":4,"extra":1,'), "unexpected extra"),
        (lambda line: line.replace(',"seq":4', ""), "missing seq"),
        (lambda line: line.replace('"seq":4', '"seq":"4"'), "seq is not a whole number"),
        (lambda line: line.replace("+00:00", "+02:00"), "time is not a UTC"),
        (lambda line: line.replace(":", ": ", 1), "was rewritten"),
    ],
)
def test_malformed_lines_are_explained(log_path: Path, change: Any, words: str):
    lines = lines_of(log_path)
    lines[4] = change(lines[4])
    write_lines(log_path, lines)
    assert_broken_at(log_path, 5, words)


def test_appending_to_a_broken_log_is_refused_and_leaves_it_unchanged(log_path: Path):
    lines = lines_of(log_path)
    lines[6] = lines[6].replace('"round":2', '"round":7')
    write_lines(log_path, lines)
    before = log_path.read_bytes()
    with pytest.raises(AuditLogError) as caught:
        AuditLog(log_path).append("export", {"round": 3})
    assert caught.value.line == 7 and caught.value.path == log_path
    assert str(log_path) in str(caught.value) and "line 7" in str(caught.value)
    assert "record 6 (line 7) was edited" in str(caught.value)
    assert log_path.read_bytes() == before


def test_the_log_file_is_readable_by_its_owner_only(tmp_path: Path):
    previous = os.umask(0)  # even a permissive umask must not widen the log
    try:
        path = tmp_path / "audit.jsonl"
        AuditLog(path).append("run-start", {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("event", "data", "error"),
    [
        ("Round Start", {}, "lowercase words"),
        ("", {}, "lowercase words"),
        ("aggregate", {"loss": float("nan")}, "not plain JSON"),
        ("aggregate", {"when": object()}, "not plain JSON"),
    ],
)
def test_bad_events_are_refused_before_the_file_is_touched(
    tmp_path: Path, event: str, data: dict[str, Any], error: str
):
    path = tmp_path / "audit.jsonl"
    with pytest.raises(ValueError, match=error):
        AuditLog(path).append(event, data)
    assert not path.exists()


def test_a_missing_folder_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AuditLog(tmp_path / "nowhere" / "audit.jsonl").append("run-start", {})


def test_canonical_sha256_ignores_key_order_and_sees_every_value():
    config = {"train": {"lr": 0.001, "steps": 3}, "name": "ward-é"}
    same = {"name": "ward-é", "train": {"steps": 3, "lr": 0.001}}
    assert canonical_sha256(config) == canonical_sha256(same)
    expected = '{"name":"ward-é","train":{"lr":0.001,"steps":3}}'
    assert canonical_sha256(config) == hashlib.sha256(expected.encode("utf-8")).hexdigest()
    assert canonical_sha256(config) != canonical_sha256({**config, "name": "ward-e"})


def test_cli_verify_prints_the_head_of_an_intact_log(
    log_path: Path, capsys: pytest.CaptureFixture[str]
):
    head = verify_audit_log(log_path).head
    assert main(["audit", "verify", str(log_path), "--expected-head", head]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{log_path}: {RECORDS} records, chain intact (head {head})"
    )


def test_cli_verify_names_the_first_bad_record_and_exits_1(
    log_path: Path, capsys: pytest.CaptureFixture[str]
):
    lines = lines_of(log_path)
    del lines[3]
    write_lines(log_path, lines)
    assert main(["audit", "verify", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert f"{log_path}: chain broken at line 4 (record 3)" in out
    assert "record 3 is missing" in out


def test_cli_verify_catches_a_removed_tail_with_the_expected_head(
    log_path: Path, capsys: pytest.CaptureFixture[str]
):
    head = verify_audit_log(log_path).head
    write_lines(log_path, lines_of(log_path)[:-2])
    assert main(["audit", "verify", str(log_path), "--expected-head", head]) == 1
    assert "removed from its end" in capsys.readouterr().out


def test_cli_verify_explains_user_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as caught:
        main(["audit", "verify", str(tmp_path / "x.jsonl"), "--expected-head", "zz"])
    assert caught.value.code == 2
    assert "64 hexadecimal digits" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["audit"], ["audit", "verify"], ["check-pii"]])
def test_governance_commands_answer_help(command: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main([*command, "--help"])
    assert caught.value.code == 0
    assert "usage: fedtune" in capsys.readouterr().out
