"""The identifier check: planted identifiers are found at their lines, clinical numbers are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client.pii_guard import KINDS, identifiers_in_text, scan_for_identifiers
from fedtune.ops.cli import main

CLEAN = {"text": "S72.001A closed fracture of right femoral neck", "label": "injury"}

# line number -> (line as written, kind expected there, field it is in)
PLANTED: dict[int, tuple[str, str, str | None]] = {
    2: (json.dumps({"text": "Referred by john.doe@example.org", "label": "x"}), "email", "text"),
    4: (json.dumps({"text": "Call back on (555) 123-4567", "label": "x"}), "phone", "text"),
    6: (json.dumps({"text": "Daughter: +44 20 7946 0958", "label": "x"}), "phone", "text"),
    7: (json.dumps({"text": "SSN 123-45-6789 on file", "label": "x"}), "ssn", "text"),
    8: (json.dumps({"text": "MRN: 00482913, fall at home", "label": "x"}), "mrn", "text"),
    9: (json.dumps({"text": "DOB 03/12/1954, chest pain", "label": "x"}), "date-of-birth", "text"),
    10: ('{"text": "broken line, mail jane@clinic.example.com", "label"', "email", None),
    11: (json.dumps({"text": "Syncope", "label": "cardio", "mrn": 12345678}), "mrn", "mrn"),
    12: (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "I am at a.b@example.net"},
                    {"role": "assistant", "content": "Noted"},
                ]
            }
        ),
        "email",
        "messages.content",
    ),
    13: ('{"text": "escaped pat\\u0040example.org", "label": "x"}', "email", "text"),
    14: (
        json.dumps({"text": "Medical record number 4455667 reviewed", "label": "x"}),
        "mrn",
        "text",
    ),
    15: (json.dumps({"text": "Tel: 020 7946 0958 (ward)", "label": "x"}), "phone", "text"),
}
CLINICAL = [
    "S72.001A closed fracture of right femoral neck",
    "I21.4 non-ST elevation myocardial infarction",
    "ICD-10 E11.9 and Z79.4",
    "BP 120/80 mmHg, HR 72, RR 16",
    "BP 130/85, 125/82 and 118/76 over three visits",
    "fever for 2 days, cough for 3 weeks",
    "metoprolol 25 mg twice daily; enoxaparin 1 mg/kg q12h",
    "paracetamol 500 mg 1-2 tablets every 4-6 hours, max 4000 mg/24 h",
    "Na+ 140 K+ 4.0 Cl- 102",
    "+2 mm ST elevation in V2-V4",
    "admitted 2023-01-15, discharged 01/19/2023",
    "born at 32 weeks, birth weight 1650 g",
    "WBC 12.5 x 10^9/L, platelets 250 x 10^9/L",
    "troponin 0.04 ng/mL at 10:30, repeat at 13:30",
    "GCS 15/15, SpO2 98% on 2 L",
    "cell count 5000 per microliter",
    "reference range 3.5-5.0 mmol/L",
    "case 1234567890 in the registry of trials",
    "weight 72.5 kg, height 180 cm, BMI 22.4",
    "specimen 123-45-67890 sent to pathology",  # longer than an SSN
    "batch 555-123-45678 of the vaccine",  # longer than a phone number
]


def planted_file(path: Path) -> Path:
    lines = [json.dumps(CLEAN)] * 15
    for number, (line, _kind, _field) in PLANTED.items():
        lines[number - 1] = line
    lines[2] = json.dumps({"text": "BP 120/80, HR 72 for 2 days", "label": "cardio"})
    lines[4] = ""  # a blank line still counts as a line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_planted_identifiers_are_found_at_their_exact_lines(tmp_path: Path):
    path = planted_file(tmp_path / "ward.jsonl")
    report = scan_for_identifiers(path, max_examples=10)
    found = {(f.line, f.kind, f.field) for f in report.examples}
    assert found == {(line, kind, field) for line, (_, kind, field) in PLANTED.items()}
    assert report.lines == 15 and report.flagged_lines == len(PLANTED)
    assert dict(report.counts) == {"email": 4, "phone": 3, "ssn": 1, "mrn": 3, "date-of-birth": 1}
    assert f"{path}:4: phone number (field 'text')" in report.locations()
    assert f"{path}:10: e-mail address" in report.locations()  # raw text of a non-JSON line
    assert f"{path}:11: medical record number (field 'mrn')" in report.locations()


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_numbers_are_not_identifiers(text: str):
    assert identifiers_in_text(text) == set()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to Pat.O'Neil@example.org", "email"),
        ("call 555-123-4567.", "phone"),
        ("cell: 555.123.4567", "phone"),
        ("+1 (555) 123-4567", "phone"),
        ("+33 1 23 45 67 89", "phone"),
        ("mobile 07700 900123", "phone"),
        ("social security number: 123456789", "ssn"),
        ("MR# 8812345", "mrn"),
        ("patient ID A1234567", "mrn"),
        ("hospital number: 99887766", "mrn"),
        ("date of birth 12 March 1954", "date-of-birth"),
        ("D.O.B.: 1954-03-12", "date-of-birth"),
        ("born on March 3, 1954", "date-of-birth"),
    ],
)
def test_each_kind_of_identifier_is_recognised(text: str, kind: str):
    assert identifiers_in_text(text) == {kind}


def test_a_file_of_clinical_text_is_clean(tmp_path: Path):
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in CLINICAL))
    report = scan_for_identifiers(path)
    assert not report.found and report.lines == len(CLINICAL) and report.examples == ()
    assert all(report.count(kind) == 0 for kind in KINDS)
    assert "no likely direct identifiers found in 21 line(s)" in report.summary()


def test_examples_are_capped_per_kind_but_counts_are_complete(tmp_path: Path):
    path = tmp_path / "ward.jsonl"
    lines = [json.dumps({"text": f"reach me at p{n}@example.org", "label": "x"}) for n in range(8)]
    lines.append(json.dumps({"text": "SSN 123-45-6789", "label": "x"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = scan_for_identifiers(path, max_examples=3)
    assert report.count("email") == 8 and report.count("ssn") == 1
    assert [(f.line, f.kind) for f in report.examples] == [
        (1, "email"),
        (2, "email"),
        (3, "email"),
        (9, "ssn"),
    ]
    assert "... and 5 more" in report.summary()


def test_the_summary_says_what_where_and_how_to_acknowledge_without_the_identifiers(
    tmp_path: Path,
):
    path = planted_file(tmp_path / "ward.jsonl")
    summary = scan_for_identifiers(path).summary()
    assert summary.startswith(f"{path}: 12 likely direct identifier(s) on 12 of 15 line(s)")
    assert "  e-mail address: 4" in summary and f"    {path}:2: e-mail address" in summary
    assert "pii_acknowledged = true" in summary and f"fedtune check-pii {path}" in summary
    for secret in ("john.doe@example.org", "123-45-6789", "00482913", "7946 0958"):
        assert secret not in summary


def test_csv_rows_report_their_first_physical_line_and_identifier_columns(tmp_path: Path):
    path = tmp_path / "ward.csv"
    path.write_text(
        "text,label,mrn\n"  # line 1
        "Chest pain for 2 days,cardio,\n"  # line 2: no id in this row
        '"Multi-line note:\nBP 120/80",cardio,\n'  # lines 3-4
        '"Call (555) 123-4567 re results",cardio,\n'  # line 5
        "Syncope,cardio,A-778812\n",  # line 6
        encoding="utf-8",
    )
    report = scan_for_identifiers(path)
    assert {(f.line, f.kind, f.field) for f in report.examples} == {
        (5, "phone", "text"),
        (6, "mrn", "mrn"),
    }
    assert report.lines == 6 and report.flagged_lines == 2


def test_the_patient_id_fedtune_groups_by_is_not_flagged_but_other_id_fields_are(tmp_path: Path):
    """patient_id is read only to group a patient's lines (privacy.unit = "patient"): never
    model input, never sent. A text that names an MRN, or another id field, is still found."""
    jsonl = tmp_path / "ward.jsonl"
    jsonl.write_text(
        '{"text": "chest pain", "label": "cardio", "patient_id": "MRN 00482913"}\n'
        '{"text": "MRN: 00482913 seen", "label": "cardio", "patient_id": "P1"}\n'
        '{"text": "fever", "label": "infect", "patient_id": "P2", "mrn": "A-1"}\n',
        encoding="utf-8",
    )
    report = scan_for_identifiers(jsonl)
    assert {(f.line, f.field) for f in report.examples} == {(2, "text"), (3, "mrn")}
    csv_file = tmp_path / "ward.csv"
    csv_file.write_text("text,label,patient_id\nSyncope,cardio,A-778812\n", encoding="utf-8")
    assert not scan_for_identifiers(csv_file).found


def test_bytes_that_are_not_utf8_do_not_stop_the_scan(tmp_path: Path):
    path = tmp_path / "ward.jsonl"
    path.write_bytes(
        b'{"text": "caf\xe9", "label": "x"}\n{"text": "x@example.org", "label": "x"}\n'
    )
    report = scan_for_identifiers(path)
    assert [(f.line, f.kind) for f in report.examples] == [(2, "email")]


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_for_identifiers(tmp_path / "nothing.jsonl")


def test_cli_exits_1_and_names_path_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = planted_file(tmp_path / "ward.jsonl")
    assert main(["check-pii", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:7: SSN-like number (field 'text')" in out
    assert f"{path}:9: date of birth (field 'text')" in out
    assert "123-45-6789" not in out


def test_cli_exits_0_on_clean_data_and_2_on_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps(CLEAN) + "\n", encoding="utf-8")
    assert main(["check-pii", str(path)]) == 0
    assert "no likely direct identifiers" in capsys.readouterr().out
    assert main(["check-pii", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
