"""A hospital's last check before training: likely direct identifiers left in its data.

A model fine-tuned on text can reproduce it, and differential privacy bounds what one record
contributes, not whether an e-mail address is in the training set at all. Identifiers that
should have been removed by de-identification are therefore flagged before training starts,
with ``path:line`` so the admin can fix the export.

What is flagged (kinds, in report order):

- ``email``: an e-mail address anywhere in the text.
- ``phone``: US numbers (``555-123-4567``, ``(555) 123-4567``, ``+1 555.123.4567``),
  international numbers written with ``+`` (8–15 digits, e.g. ``+44 20 7946 0958``), and
  any 7–15 digit number labelled ``phone``/``tel``/``mobile``/``cell``/``fax``.
- ``ssn``: ``ddd-dd-dddd``, or 9 digits labelled ``SSN`` / ``social security number``.
- ``mrn``: 4–12 digits (optionally after up to 3 letters) labelled ``MRN``, ``MR#``,
  ``medical record number``, ``patient ID/number``, ``hospital number`` or ``chart number``.
- ``date-of-birth``: a date labelled ``DOB``, ``date of birth``, ``birth date`` or ``born``.

A JSON key or CSV column *named* like an identifier (``mrn``, ``patient_id``, ``ssn``,
``email``, ``phone``, ``dob``, ...) is flagged on every line where it holds a value, whatever
the value looks like: ``client.data`` ignores extra columns, so they would not be trained on,
but an export that carries them was not de-identified. A bare ``id`` column is not flagged:
it is usually a row number.

Unlabelled numbers are left alone on purpose: clinical text is full of them (ICD-10 codes
such as ``S72.001A``, blood pressures ``120/80``, doses ``0.5 mg/kg``, durations ``2 days``)
and a check that cries wolf on every line gets acknowledged without being read. Names,
street addresses and unlabelled dates are not detected at all: this is a tripwire, not
de-identification.

The report never prints the identifiers themselves, only where they are, so it can be pasted
into a ticket or a log without spreading them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.data import require_data_file

KINDS: dict[str, str] = {
    "email": "e-mail address",
    "phone": "phone number",
    "ssn": "SSN-like number",
    "mrn": "medical record number",
    "date-of-birth": "date of birth",
}
"""Each kind of finding and how the report names it."""
_KIND_ORDER = {kind: order for order, kind in enumerate(KINDS)}

MAX_EXAMPLES_PER_KIND = 5
"""A systematic leak (a whole MRN column) repeats on every line; a few show where it is."""

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DATE = (
    rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|\d{{4}}-\d{{1,2}}-\d{{1,2}}"
    rf"|\d{{1,2}}\s+{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
# No digit, letter or '-' right before/after a number, and no "digit." / "digit/" either, so
# parts of longer numbers, codes, decimals and ratios never match.
_NUMBER_START = r"(?<![\w+-])(?<!\d[./])"
_NUMBER_END = r"(?![\w-])(?![./]\d)"

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
)
_US_PHONE = re.compile(
    _NUMBER_START
    + r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"
    + _NUMBER_END
)
_INTERNATIONAL_PHONE = re.compile(r"(?<![\w+])\+\d[\d\s().-]{6,22}\d(?!\d)")
_LABELLED_PHONE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|fax)(?:\s*(?:no\.?|number|#))?\s*[:#.]?\s*"
    r"\+?\(?\d[\d\s().-]{5,20}\d(?!\d)",
    re.IGNORECASE,
)
_SSN = re.compile(_NUMBER_START + r"\d{3}-\d{2}-\d{4}" + _NUMBER_END)
_LABELLED_SSN = re.compile(
    r"\b(?:SSN|social\s+security(?:\s+(?:number|no\.?|#))?)\s*[:#]?\s*"
    r"\d{3}[\s-]?\d{2}[\s-]?\d{4}(?!\d)",
    re.IGNORECASE,
)
_LABELLED_MRN = re.compile(
    r"\b(?:MRN|MR\s*#|MR\s+(?:no\.?|number)|medical\s+record\s+(?:number|no\.?|#)"
    r"|patient\s+(?:id|identifier|number|no\.?)|hospital\s+(?:number|no\.?)"
    r"|chart\s+(?:number|no\.?|#))\s*[:#=.]?\s*(?:is\s+)?[A-Z]{0,3}-?\d{4,12}(?!\d)",
    re.IGNORECASE,
)
_LABELLED_DOB = re.compile(
    r"(?:\bDOB|\bD\.O\.B\.?|\bdate\s+of\s+birth|\bbirth\s*date|\bborn(?:\s+on)?)"
    r"\s*[:#-]?\s*" + _DATE + r"(?!\d)",
    re.IGNORECASE,
)

# (kind, pattern, allowed count of digits in a match, or None for any)
_TEXT_PATTERNS: tuple[tuple[str, re.Pattern[str], tuple[int, int] | None], ...] = (
    ("email", _EMAIL, None),
    ("phone", _US_PHONE, None),
    ("phone", _INTERNATIONAL_PHONE, (8, 15)),  # E.164 numbers have at most 15 digits
    ("phone", _LABELLED_PHONE, (7, 15)),
    ("ssn", _SSN, None),
    ("ssn", _LABELLED_SSN, None),
    ("mrn", _LABELLED_MRN, None),
    ("date-of-birth", _LABELLED_DOB, None),
)

# Field names (lowercase, letters and digits only) that are identifiers by name.
_IDENTIFIER_FIELDS: dict[str, str] = {
    **dict.fromkeys(("email", "emailaddress", "mail"), "email"),
    **dict.fromkeys(
        ("phone", "phonenumber", "telephone", "tel", "mobile", "cellphone", "fax"), "phone"
    ),
    **dict.fromkeys(("ssn", "socialsecurity", "socialsecuritynumber"), "ssn"),
    **dict.fromkeys(
        (
            "mrn",
            "medicalrecordnumber",
            "mrnumber",
            "patientid",
            "patientnumber",
            "hospitalnumber",
            "chartnumber",
        ),
        "mrn",
    ),
    **dict.fromkeys(("dob", "dateofbirth", "birthdate", "birthday"), "date-of-birth"),
}


# The one field fedtune reads to group a patient's lines (privacy.unit = "patient"). It is
# never model input and never leaves the node, so its value (often the MRN itself) is not a
# risk of the model repeating it: the check skips exactly this top-level field / CSV column.
PATIENT_FIELD = "patient_id"


def identifiers_in_text(text: str) -> set[str]:
    """The kinds of likely direct identifier in one piece of text."""
    kinds = set()
    for kind, pattern, digits in _TEXT_PATTERNS:
        if kind in kinds:
            continue
        for match in pattern.finditer(text):
            count = sum(char.isdigit() for char in match.group())
            if digits is None or digits[0] <= count <= digits[1]:
                kinds.add(kind)
                break
    return kinds


@dataclass(frozen=True)
class PiiFinding:
    """One kind of identifier on one line; ``field`` is the JSON key or CSV column, if any."""

    line: int
    kind: str
    field: str | None

    def location(self, path: Path) -> str:
        """``path:line: kind (field 'x')``: what an admin greps for and opens."""
        where = f" (field {self.field!r})" if self.field else ""
        return f"{path}:{self.line}: {KINDS[self.kind]}{where}"


@dataclass(frozen=True)
class PiiReport:
    """What `scan_for_identifiers` found in one file.

    ``counts`` has one ``(kind, findings)`` pair per kind found, in `KINDS` order;
    ``examples`` holds the first ``max_examples`` findings of each kind, in file order;
    ``flagged_lines`` counts lines with at least one finding, out of ``lines`` read.
    """

    path: Path
    lines: int
    flagged_lines: int
    counts: tuple[tuple[str, int], ...]
    examples: tuple[PiiFinding, ...]
    max_examples: int = MAX_EXAMPLES_PER_KIND

    @property
    def found(self) -> bool:
        return bool(self.counts)

    def count(self, kind: str) -> int:
        """Findings of ``kind`` (0 when none)."""
        if kind not in KINDS:
            raise ValueError(f"unknown identifier kind {kind!r}; known: {', '.join(KINDS)}")
        return dict(self.counts).get(kind, 0)

    def locations(self) -> list[str]:
        """``path:line: kind`` for every example finding, kind by kind."""
        return [finding.location(self.path) for finding in self.examples]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "lines": self.lines,
            "flagged_lines": self.flagged_lines,
            "counts": dict(self.counts),
            "examples": [{"line": f.line, "kind": f.kind, "field": f.field} for f in self.examples],
        }

    def summary(self) -> str:
        """Plain words for the hospital's admin: what was found, where, and what to do."""
        scope = (
            "This check looks for e-mail addresses, phone numbers, SSN-like numbers, labelled "
            "medical record numbers and labelled dates of birth; it does not find names, "
            "addresses or unlabelled dates, so it does not replace de-identification."
        )
        if not self.found:
            return (
                f"{self.path}: no likely direct identifiers found in {self.lines} line(s).\n{scope}"
            )
        total = sum(count for _, count in self.counts)
        text = [
            f"{self.path}: {total} likely direct identifier(s) on {self.flagged_lines} of "
            f"{self.lines} line(s). Training on them could let the model repeat them.",
        ]
        for kind, count in self.counts:
            text.append(f"  {KINDS[kind]}: {count}")
            shown = [f for f in self.examples if f.kind == kind]
            text += [f"    {finding.location(self.path)}" for finding in shown]
            if count > len(shown):
                text.append(f"    ... and {count - len(shown)} more")
        text += [
            "What to do: remove or mask these in the export (e.g. replace them with [EMAIL], "
            f"[PHONE], [MRN]) and run `fedtune check-pii {self.path}` again. If you have "
            "reviewed them and they are not about patients (e.g. a ward's public phone "
            "number), set `pii_acknowledged = true` in this node's settings to train anyway.",
            "The identifiers themselves are not printed, so this report is safe to share.",
            scope,
        ]
        return "\n".join(text)


def scan_for_identifiers(path: Path | str, max_examples: int = MAX_EXAMPLES_PER_KIND) -> PiiReport:
    """Scan a hospital's JSONL or CSV data file (by suffix), line by line.

    Line numbers are physical file lines, as in `client.data`'s error messages. JSONL string
    values are scanned after JSON decoding (so an escaped ``\\u0040`` is still an ``@``); a
    line that is not JSON is scanned as raw text rather than skipped, since a broken line can
    hold identifiers too. Bytes that are not UTF-8 are replaced, not fatal: `fedtune
    check-data` reports encoding problems, this check only looks for identifiers.
    """
    path = require_data_file(path)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    is_csv = path.suffix.lower() == ".csv"
    counts: Counter[str] = Counter()
    examples: list[PiiFinding] = []
    flagged: set[int] = set()
    lines = 0
    scanned = _csv_fields(path) if is_csv else _jsonl_fields(path)
    for line, seen, findings in scanned:
        lines = max(lines, seen)
        for finding in sorted(findings, key=lambda f: (_KIND_ORDER[f.kind], f.field or "")):
            counts[finding.kind] += 1
            flagged.add(line)
            if counts[finding.kind] <= max_examples:
                examples.append(finding)
    ordered_examples = sorted(examples, key=lambda f: (_KIND_ORDER[f.kind], f.line))
    return PiiReport(
        path=path,
        lines=lines,
        flagged_lines=len(flagged),
        counts=tuple((kind, counts[kind]) for kind in KINDS if counts[kind]),
        examples=tuple(ordered_examples),
        max_examples=max_examples,
    )


# Each scanner yields (line, physical lines read so far, findings of that line).
_Scanned = Iterator[tuple[int, int, set[PiiFinding]]]


def _jsonl_fields(path: Path) -> _Scanned:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace")
            findings: set[PiiFinding] = set()
            if text.strip():
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = text
                if isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k != PATIENT_FIELD}
                for field, kind in _identifiers_in_value(value, None):
                    findings.add(PiiFinding(number, kind, field))
            yield number, number, findings


def _identifiers_in_value(value: Any, field: str | None) -> Iterator[tuple[str | None, str]]:
    """(field, kind) for each identifier in a decoded JSON value, keys named by dotted path."""
    if isinstance(value, str):
        for kind in identifiers_in_text(value):
            yield field, kind
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key) if field is None else f"{field}.{key}"
            by_name = _IDENTIFIER_FIELDS.get(re.sub(r"[^a-z0-9]", "", str(key).lower()))
            if by_name and _has_value(item):
                yield name, by_name
            yield from _identifiers_in_value(item, name)
    elif isinstance(value, list):
        for item in value:
            yield from _identifiers_in_value(item, field)


def _has_value(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return value is not None and value is not False and value != [] and value != {}


def _csv_fields(path: Path) -> _Scanned:
    """Rows of a CSV file; quoted cells may span lines, so each row reports its first line."""
    from fedtune.client.data import DataValidationError

    content = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(content, newline=""))
    header: list[str] | None = None
    row_start = 1
    try:
        for row in reader:
            line, row_start = row_start, reader.line_num + 1
            if header is None or not any(cell.strip() for cell in row):
                if any(cell.strip() for cell in row):
                    header = [cell.strip() for cell in row]
                yield line, reader.line_num, set()
                continue
            findings: set[PiiFinding] = set()
            for index, cell in enumerate(row):
                column = header[index] if index < len(header) else f"column {index + 1}"
                if column == PATIENT_FIELD:
                    continue
                by_name = _IDENTIFIER_FIELDS.get(re.sub(r"[^a-z0-9]", "", column.lower()))
                if by_name and cell.strip():
                    findings.add(PiiFinding(line, by_name, column))
                for kind in identifiers_in_text(cell):
                    findings.add(PiiFinding(line, kind, column))
            yield line, reader.line_num, findings
    except csv.Error as error:
        problem = f"{path}:{row_start}: unreadable CSV ({error}); fix it, then check again"
        raise DataValidationError(path, [problem], skippable=False) from None
