"""A hospital's local training data: loading, validation and splitting.

Patient text never leaves the hospital, so the hospital's IT admin is the only person who can
fix a bad export. Every problem is therefore reported as ``path:line: what is wrong`` and
training refuses to start on invalid data unless the admin opts into ``skip_bad_lines``.

Formats (JSONL, one object per line; blank lines are ignored; unknown extra keys such as an
``id`` column are ignored, but keys that belong to *another* format make the line an error):

- ``classification``: ``{"text": str, "label": str}``, or a ``.csv`` file with a header row
  containing the columns ``text`` and ``label`` (line numbers are physical file lines).
- ``instruction``: ``{"instruction": str, "input": str (optional), "output": str}``
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
  the last message is the assistant's response and at least one user message is required.
- ``completion``: ``{"prompt": str, "completion": str}``

Every format (CSV too, as a column) may carry ``patient_id`` (text or a whole number): the
patient the line is about. With ``privacy.unit = "patient"`` it is required on every line,
DP-SGD protects each patient as a whole, and the splits keep a patient's lines together.

Public API::

    load_hospital_data(path, fmt="auto", labels=None, skip_bad_lines=False,
                       require_patient_id=False) -> HospitalDataset
    split_examples(examples, seed, fractions=(0.8, 0.1, 0.1), by_patient=False) -> Splits
    patient_summary(examples) -> PatientSummary       # patients and lines per patient
    LabeledText(text, label, line)                    # classification examples
    PromptResponse(messages | prompt, response, line)  # instruction / chat / completion
    DataValidationError(path, problems)               # .problems: ["path:line: reason", ...]

Instruction and chat examples keep their prompt as ``(role, content)`` turns so that
``client.encoding`` can render them with the model's own chat template; completion examples
keep the raw prompt text because the hospital chose the exact string the model sees.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

MAX_PROBLEMS_SHOWN = 20
"""An export with a systematic error has thousands of bad lines; the first 20 show the pattern."""

CHAT_ROLES = ("system", "user", "assistant")


class DataFormat(StrEnum):
    """The shape of one hospital data file; selects validation and, later, the task head."""

    CLASSIFICATION = "classification"
    INSTRUCTION = "instruction"
    CHAT = "chat"
    COMPLETION = "completion"


# Keys that identify a format. Used to auto-detect the file's format and to reject a line that
# clearly belongs to another format (e.g. a chat line pasted into a classification file).
_FORMAT_KEYS: dict[DataFormat, frozenset[str]] = {
    DataFormat.CLASSIFICATION: frozenset({"text", "label"}),
    DataFormat.INSTRUCTION: frozenset({"instruction", "input", "output"}),
    DataFormat.CHAT: frozenset({"messages"}),
    DataFormat.COMPLETION: frozenset({"prompt", "completion"}),
}


class Turn(NamedTuple):
    """One prompt turn of a conversation: ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class LabeledText:
    """A classification example; ``line`` is where it sits in the hospital's file."""

    text: str
    label: str
    line: int
    patient: str | None = None  # the line's patient_id, when the file names patients


@dataclass(frozen=True)
class PromptResponse:
    """A generation example: a prompt and the response the model must learn to produce.

    Exactly one of ``messages`` (instruction/chat: the prompt turns, response excluded, rendered
    later with the model's chat template) and ``prompt`` (completion: raw text used verbatim) is
    set, so the encoder can never confuse a chat prompt with a raw one.
    """

    messages: tuple[Turn, ...] | None
    prompt: str | None
    response: str
    line: int
    patient: str | None = None  # the line's patient_id, when the file names patients

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("PromptResponse needs exactly one of `messages` and `prompt`")


Example = LabeledText | PromptResponse
E = TypeVar("E")


class DataValidationError(ValueError):
    """The hospital's data file has problems; ``problems`` holds one ``path:line: reason`` each.

    ``skippable`` is False when skipping lines cannot help (empty file, no valid line), so the
    message does not suggest ``skip_bad_lines`` in vain.
    """

    def __init__(self, path: Path, problems: Sequence[str], *, skippable: bool = True) -> None:
        self.path = path
        self.problems = list(problems)
        self.skippable = skippable
        super().__init__(self._message())

    def _message(self) -> str:
        count = len(self.problems)
        lines = [f"{self.path}: {count} problem(s) in the hospital data:"]
        lines += [f"  {problem}" for problem in self.problems[:MAX_PROBLEMS_SHOWN]]
        if count > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {count - MAX_PROBLEMS_SHOWN} more")
        if self.skippable:
            lines.append(
                "Fix these lines, or set `skip_bad_lines = true` in the hospital's config to "
                "train on the valid lines only (the number skipped is reported)."
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class HospitalDataset:
    """The validated examples of one file; ``skipped`` lists problems of lines left out."""

    path: Path
    format: DataFormat
    examples: tuple[Example, ...]
    skipped: tuple[str, ...] = ()

    def labeled_texts(self) -> tuple[LabeledText, ...]:
        """The examples as classification examples (typed), refusing other formats."""
        return tuple(self._narrow(LabeledText))

    def prompt_responses(self) -> tuple[PromptResponse, ...]:
        """The examples as generation examples (typed), refusing classification data."""
        return tuple(self._narrow(PromptResponse))

    def _narrow(self, kind: type[E]) -> list[E]:
        narrowed: list[E] = []
        for example in self.examples:
            if isinstance(example, kind):
                narrowed.append(example)
        if len(narrowed) != len(self.examples):
            raise TypeError(f"{self.path} holds {self.format} data, not {kind.__name__}")
        return narrowed


def require_data_file(path: Path | str) -> Path:
    """The hospital's data file, or an error that says where the admin pointed the node."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Hospital data file {path} {where} (resolved: {path.resolve()}); "
            "check the data path in the hospital's config."
        )
    return path


class _LineProblem(Exception):
    """A reason why one line is invalid; collected, never shown to the user on its own."""


_Record = dict[str, Any] | _LineProblem


def load_hospital_data(
    path: Path | str,
    fmt: DataFormat | str = "auto",
    labels: Sequence[str] | None = None,
    skip_bad_lines: bool = False,
    require_patient_id: bool = False,
    answers: bool = True,
) -> HospitalDataset:
    """Load and validate a hospital's data file, all problems at once.

    Collecting every problem before failing saves the admin one round trip per bad line.
    ``labels`` (classification only) restricts the allowed labels; a label outside the model's
    label set would otherwise crash training or silently shift class ids.
    ``require_patient_id`` (privacy.unit = "patient"): a line without a patient cannot be
    grouped with that patient's other lines, so the patient-level guarantee would not hold.
    ``answers = False`` (new records to predict on): the label, output or completion may be
    absent (read as ""), and a chat may end with the user's turn (all of it is the prompt).
    """
    path = require_data_file(path)
    if fmt != "auto" and fmt not in set(DataFormat):
        allowed = ", ".join(["auto", *DataFormat])
        raise ValueError(f"Unknown data format {fmt!r}; allowed: {allowed}")
    data_format = None if fmt == "auto" else DataFormat(fmt)
    if path.suffix.lower() == ".csv":
        if data_format not in (None, DataFormat.CLASSIFICATION):
            raise ValueError(f"{path}: CSV files hold classification data, not {data_format}")
        data_format = DataFormat.CLASSIFICATION
    if labels is not None and data_format not in (None, DataFormat.CLASSIFICATION):
        raise ValueError(f"labels only apply to classification data, not {data_format}")
    allowed_labels = None if labels is None else frozenset(labels)

    raw = path.read_bytes()
    if path.suffix.lower() == ".csv":
        records = _csv_records(path, raw, require_patient_id, answers)
    else:
        records = _jsonl_records(raw)
    problems: list[str] = []
    examples: list[Example] = []
    for line, record in records:
        try:
            if isinstance(record, _LineProblem):
                raise record
            data_format = data_format or _detect_format(record)
            example = _parse_example(record, data_format, line, allowed_labels, answers)
            patient = _patient_field(record, require_patient_id)
            examples.append(dataclasses.replace(example, patient=patient) if patient else example)
        except _LineProblem as problem:
            problems.append(f"{path}:{line}: {problem}")

    if not examples:
        reason = "the file is empty" if not problems else "no line is valid"
        raise DataValidationError(path, [f"{path}: {reason}", *problems], skippable=False)
    if problems and not skip_bad_lines:
        raise DataValidationError(path, problems)
    if data_format is None:  # unreachable: detection precedes the first valid example
        raise RuntimeError(f"{path}: data format was not determined")
    if labels is not None and data_format is not DataFormat.CLASSIFICATION:
        raise ValueError(f"{path}: labels only apply to classification data, not {data_format}")
    return HospitalDataset(path, data_format, tuple(examples), tuple(problems))


def _jsonl_records(raw: bytes) -> list[tuple[int, _Record]]:
    """Parse each non-blank line; a line that is not a JSON object becomes a problem."""
    records: list[tuple[int, _Record]] = []
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        record: _Record
        try:
            text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
            if not text.strip():
                continue
            value = json.loads(text)
            kind = type(value).__name__
            record = (
                value
                if isinstance(value, dict)
                else _LineProblem(f"expected a JSON object {{...}}, got {kind}")
            )
        except UnicodeDecodeError:
            record = _LineProblem("not UTF-8 text; save the file as UTF-8")
        except json.JSONDecodeError as error:
            record = _LineProblem(f"not valid JSON ({error.msg}, column {error.colno})")
        records.append((number, record))
    return records


def _csv_records(
    path: Path, raw: bytes, require_patient_id: bool, answers: bool = True
) -> list[tuple[int, _Record]]:
    """Read a ``text,label`` CSV; quoted fields may span lines, so we track where rows start."""
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        problem = f"{path}:{line}: not UTF-8 text; save the file as UTF-8"
        raise DataValidationError(path, [problem], skippable=False) from None
    reader = csv.reader(io.StringIO(content, newline=""))
    header: list[str] | None = None
    records: list[tuple[int, _Record]] = []
    row_start = 1
    try:
        for row in reader:
            line, row_start = row_start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                required = ("text", *(("label",) if answers else ()),
                            *(("patient_id",) if require_patient_id else ()))
                missing = ", ".join(name for name in required if name not in header)
                if missing:
                    problem = f"{path}:{line}: the header row lacks column(s) {missing}"
                    raise DataValidationError(path, [problem], skippable=False)
            elif len(row) == len(header):
                records.append((line, dict(zip(header, row, strict=True))))
            else:
                columns = ",".join(header)
                problem = f"expected {len(header)} columns ({columns}), found {len(row)}"
                hint = "; put text containing commas in double quotes"
                records.append((line, _LineProblem(problem + hint)))
    except csv.Error as error:
        records.append((row_start, _LineProblem(f"unreadable CSV ({error})")))
    return records


def _detect_format(record: dict[str, Any]) -> DataFormat:
    """The single format whose identifying keys the record has."""
    matches = [fmt for fmt, keys in _FORMAT_KEYS.items() if keys & record.keys()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        expected = "; ".join(
            f"{fmt}: {', '.join(sorted(keys))}" for fmt, keys in _FORMAT_KEYS.items()
        )
        raise _LineProblem(
            f"no known fields (found {', '.join(sorted(record)) or 'none'}); "
            f"expected the keys of one format ({expected})"
        )
    raise _LineProblem(f"mixes the fields of formats {', '.join(matches)}; use one format")


def _parse_example(
    record: dict[str, Any],
    data_format: DataFormat,
    line: int,
    allowed_labels: frozenset[str] | None,
    answers: bool = True,
) -> Example:
    """Validate one record against the file's format and build the example."""

    def answer(name: str) -> str:
        return _text_field(record, name) if answers or name in record else ""

    foreign = [
        key
        for fmt, keys in _FORMAT_KEYS.items()
        if fmt is not data_format
        for key in sorted(keys & record.keys())
    ]
    if foreign:
        raise _LineProblem(
            f"has field(s) {', '.join(foreign)} of another format, but the file "
            f"holds {data_format} data"
        )
    if data_format is DataFormat.CLASSIFICATION:
        text, label = _text_field(record, "text"), answer("label")
        if allowed_labels is not None and label and label not in allowed_labels:
            shown = ", ".join(repr(name) for name in sorted(allowed_labels)[:10])
            more = f" and {len(allowed_labels) - 10} more" if len(allowed_labels) > 10 else ""
            raise _LineProblem(f"unknown label {label!r}; allowed labels: {shown}{more}")
        return LabeledText(text, label, line)
    if data_format is DataFormat.INSTRUCTION:
        instruction = _text_field(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _LineProblem(f"field 'input' must be text, got {_json_type(extra)}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return PromptResponse((Turn("user", user),), None, answer("output"), line)
    if data_format is DataFormat.COMPLETION:
        prompt = _text_field(record, "prompt")
        return PromptResponse(None, prompt, answer("completion"), line)
    return _parse_chat(record, line, answers)


def _parse_chat(record: dict[str, Any], line: int, answers: bool = True) -> PromptResponse:
    """A chat line: prompt turns plus a final assistant response (without `answers`, a chat
    that ends with the user's turn is all prompt)."""
    messages = record.get("messages")
    if messages is None:
        raise _LineProblem("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise _LineProblem("field 'messages' must be a non-empty list of {role, content}")
    turns: list[Turn] = []
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise _LineProblem(f"{where} must be an object with 'role' and 'content'")
        role = _text_field(message, "role", where)
        if role not in CHAT_ROLES:
            raise _LineProblem(f"{where} has role {role!r}; allowed: {', '.join(CHAT_ROLES)}")
        turns.append(Turn(role, _text_field(message, "content", where)))
    if not answers and turns[-1].role == "user":
        return PromptResponse(tuple(turns), None, "", line)  # the model answers the user
    if turns[-1].role != "assistant":
        raise _LineProblem(
            "the last message must be the assistant's response (role "
            f"'assistant'), found role {turns[-1].role!r}"
        )
    if not any(turn.role == "user" for turn in turns):
        raise _LineProblem("a chat needs at least one message with role 'user'")
    return PromptResponse(tuple(turns[:-1]), None, turns[-1].content, line)


def _patient_field(record: dict[str, Any], required: bool) -> str | None:
    """The line's patient_id as text; missing is an error only when patients are the unit."""
    value = record.get("patient_id")
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _LineProblem(
                "missing field 'patient_id': privacy.unit = 'patient' needs the patient of "
                "every line, so that all of a patient's lines are protected together"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _LineProblem(
            f"field 'patient_id' must be text or a whole number, got {_json_type(value)}"
        )
    return str(value).strip()


def _text_field(record: dict[str, Any], name: str, where: str = "") -> str:
    """A required, non-blank string field; the error names the field."""
    prefix = f"{where}: " if where else ""
    if name not in record:
        raise _LineProblem(f"{prefix}missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise _LineProblem(f"{prefix}field {name!r} must be text, got {_json_type(value)}")
    if not value.strip():
        raise _LineProblem(f"{prefix}field {name!r} is empty")
    return value


def _json_type(value: object) -> str:
    """The JSON name of a value's type, as the admin sees it in the file."""
    names = {bool: "true/false", int: "number", float: "number", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Splits(Generic[E]):
    """Disjoint train/validation/test parts of a hospital's examples."""

    train: tuple[E, ...]
    validation: tuple[E, ...]
    test: tuple[E, ...]


def split_examples(
    examples: Sequence[E],
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    by_patient: bool = False,
) -> Splits[E]:
    """Split examples by a seeded permutation: the same seed always gives the same split.

    Rounding alone would leave tiny datasets without validation or test examples, so from 3
    examples on each requested (non-zero) split gets at least one, and train is never empty.
    ``by_patient``: patients, not lines, are split (the fractions count patients), so no
    patient is in training and in evaluation at once and a patient's lines stay together.
    """
    if by_patient:
        groups = patient_groups(examples)
        split = split_examples(groups, seed, fractions)
        return Splits(
            train=tuple(e for group in split.train for e in group),
            validation=tuple(e for group in split.validation for e in group),
            test=tuple(e for group in split.test for e in group),
        )
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"split fractions must be 3 numbers >= 0, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6) or fractions[0] <= 0:
        raise ValueError(f"split fractions must sum to 1 with train > 0, got {fractions}")
    total = len(examples)
    if total == 0:
        raise ValueError("cannot split an empty list of examples")
    sizes = [round(total * fraction) for fraction in fractions[1:]]
    if total >= 3:
        sizes = [
            max(size, 1) if fraction > 0 else 0
            for size, fraction in zip(sizes, fractions[1:], strict=True)
        ]
    while sum(sizes) > total - 1:  # give train at least one example, taking from the largest
        sizes[sizes.index(max(sizes))] -= 1
    order = list(range(total))
    random.Random(seed).shuffle(order)
    shuffled = tuple(examples[index] for index in order)
    n_validation, n_test = sizes
    n_train = total - n_validation - n_test
    return Splits(
        train=shuffled[:n_train],
        validation=shuffled[n_train : n_train + n_validation],
        test=shuffled[n_train + n_validation :],
    )


def patient_of(example: object) -> str:
    """The example's patient_id; an error naming the line when it has none."""
    patient = getattr(example, "patient", None)
    if patient is None:
        raise ValueError(f"line {getattr(example, 'line', '?')} has no patient_id")
    return str(patient)


def patient_groups(examples: Sequence[E]) -> list[tuple[E, ...]]:
    """The examples grouped by patient, patients in order of their first line."""
    groups: dict[str, list[E]] = {}
    for example in examples:
        groups.setdefault(patient_of(example), []).append(example)
    return [tuple(group) for group in groups.values()]


@dataclass(frozen=True)
class PatientSummary:
    """How a file's lines spread over patients: what a privacy officer checks first."""

    patients: int
    lines: int
    lines_without_patient: int
    min_lines: int
    median_lines: float
    max_lines: int

    def describe(self) -> str:
        """One line for `fedtune check-data`."""
        if not self.patients:
            return "no line names a patient (patient_id): only privacy.unit = 'record' applies"
        text = (
            f"{self.patients} patients; lines per patient: min {self.min_lines}, "
            f"median {self.median_lines:g}, max {self.max_lines}"
        )
        if self.lines_without_patient:
            text += (
                f"; {self.lines_without_patient} line(s) without patient_id (refused with "
                "privacy.unit = 'patient')"
            )
        return text


def patient_summary(examples: Sequence[Example]) -> PatientSummary:
    """Patients and lines per patient (min, median, max) of validated examples."""
    counts: dict[str, int] = {}
    without = 0
    for example in examples:
        if example.patient is None:
            without += 1
        else:
            counts[example.patient] = counts.get(example.patient, 0) + 1
    sizes = sorted(counts.values())
    if not sizes:
        return PatientSummary(0, len(examples), without, 0, 0.0, 0)
    middle = len(sizes) // 2
    median = sizes[middle] if len(sizes) % 2 else (sizes[middle - 1] + sizes[middle]) / 2
    return PatientSummary(len(sizes), len(examples), without, sizes[0], float(median), sizes[-1])
