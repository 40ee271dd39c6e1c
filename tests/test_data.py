"""Hospital data loading: every bad line is reported as path:line, good data loads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client.data import (
    DataFormat,
    DataValidationError,
    LabeledText,
    PromptResponse,
    Turn,
    load_hospital_data,
    split_examples,
)


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Write objects as JSON lines; plain strings are written verbatim (bad or blank lines)."""
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(rendered) + "\n", encoding="utf-8")
    return path


def test_classification_jsonl_loads_with_line_numbers_and_skips_blank_lines(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "notes.jsonl",
        [
            {"text": "chest pain", "label": "cardio", "id": 7},
            "",
            {"text": "cough", "label": "resp"},
        ],
    )
    dataset = load_hospital_data(path)
    assert dataset.format is DataFormat.CLASSIFICATION
    assert dataset.labeled_texts() == (
        LabeledText("chest pain", "cardio", 1),
        LabeledText("cough", "resp", 3),
    )
    assert dataset.skipped == ()
    with pytest.raises(TypeError):
        dataset.prompt_responses()


def test_every_bad_line_is_reported_with_path_line_and_reason(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "notes.jsonl",
        [
            {"text": "ok", "label": "cardio"},
            "{not json",
            {"text": "no label here"},
            {"text": 5, "label": "cardio"},
            {"text": "   ", "label": "cardio"},
            {"text": "x", "label": "oncology"},
            {"messages": [{"role": "user", "content": "hi"}]},
            "[1, 2]",
        ],
    )
    with pytest.raises(DataValidationError) as caught:
        load_hospital_data(path, labels=["cardio", "resp"])
    problems = caught.value.problems
    assert [problem.split(": ")[0] for problem in problems] == [
        f"{path}:{line}" for line in (2, 3, 4, 5, 6, 7, 8)
    ]
    assert "not valid JSON" in problems[0]
    assert "missing field 'label'" in problems[1]
    assert "'text' must be text, got number" in problems[2]
    assert "'text' is empty" in problems[3]
    assert "unknown label 'oncology'" in problems[4] and "'cardio', 'resp'" in problems[4]
    assert "messages" in problems[5] and "another format" in problems[5]
    assert "JSON object" in problems[6]
    assert "skip_bad_lines = true" in str(caught.value)


def test_skip_bad_lines_keeps_valid_examples_and_returns_the_problems(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, "oops"])
    dataset = load_hospital_data(path, skip_bad_lines=True)
    assert len(dataset.examples) == 1
    assert len(dataset.skipped) == 1 and dataset.skipped[0].startswith(f"{path}:2: ")


def test_error_message_shows_twenty_problems_and_counts_the_rest(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] + ["bad"] * 25)
    with pytest.raises(DataValidationError) as caught:
        load_hospital_data(path)
    message = str(caught.value)
    assert len(caught.value.problems) == 25
    assert f"{path}:21:" in message and f"{path}:22:" not in message
    assert "and 5 more" in message


def test_empty_file_and_all_bad_file_are_errors_even_when_skipping(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="empty") as caught:
        load_hospital_data(empty, skip_bad_lines=True)
    assert "skip_bad_lines" not in str(caught.value)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", "{}"])
    with pytest.raises(DataValidationError, match="no line is valid"):
        load_hospital_data(bad, skip_bad_lines=True)


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_hospital_data(tmp_path / "missing.jsonl")


def test_instruction_chat_and_completion_become_prompt_responses(tmp_path: Path):
    instruction = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "Code this", "input": "chest pain", "output": "R07"},
            {"instruction": "Say hi", "output": "hi"},
            {"instruction": "x", "input": 3, "output": "y"},
        ],
    )
    with pytest.raises(DataValidationError, match=r"i.jsonl:3: field 'input' must be text"):
        load_hospital_data(instruction)
    dataset = load_hospital_data(instruction, skip_bad_lines=True)
    assert dataset.format is DataFormat.INSTRUCTION
    assert dataset.prompt_responses()[0] == PromptResponse(
        (Turn("user", "Code this\n\nchest pain"),), None, "R07", 1
    )
    assert dataset.prompt_responses()[1].messages == (Turn("user", "Say hi"),)

    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Code?"},
                    {"role": "assistant", "content": "I21"},
                ]
            },
            {"messages": [{"role": "user", "content": "Q"}]},
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            {
                "messages": [
                    {"role": "doctor", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
        ],
    )
    with pytest.raises(DataValidationError) as caught:
        load_hospital_data(chat, fmt="chat")
    problems = caught.value.problems
    assert "c.jsonl:2: the last message must be the assistant's response" in problems[0]
    assert "c.jsonl:3: a chat needs at least one message with role 'user'" in problems[1]
    assert "c.jsonl:4: message 1 has role 'doctor'" in problems[2]
    first = load_hospital_data(chat, skip_bad_lines=True).prompt_responses()[0]
    assert first.messages == (Turn("system", "Be brief."), Turn("user", "Code?"))
    assert first.response == "I21"

    completion = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Dx: ", "completion": "flu"}])
    example = load_hospital_data(completion).prompt_responses()[0]
    assert (example.messages, example.prompt, example.response) == (None, "Dx: ", "flu")


def test_csv_uses_physical_line_numbers_and_quoted_multiline_text(tmp_path: Path):
    path = tmp_path / "notes.csv"
    path.write_text(
        'text,label\n"chest pain,\nradiating",cardio\n\ncough,resp,extra\nfever,\n',
        encoding="utf-8",
    )
    with pytest.raises(DataValidationError) as caught:
        load_hospital_data(path)
    assert caught.value.problems[0].startswith(f"{path}:5: expected 2 columns")
    assert caught.value.problems[1] == f"{path}:6: field 'label' is empty"
    dataset = load_hospital_data(path, skip_bad_lines=True)
    assert dataset.labeled_texts() == (LabeledText("chest pain,\nradiating", "cardio", 2),)


def test_csv_without_the_needed_columns_is_refused(tmp_path: Path):
    path = tmp_path / "notes.csv"
    path.write_text("note,diagnosis\nx,y\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="lacks column"):
        load_hospital_data(path)


def test_explicit_format_rejects_lines_of_another_format(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "b"}])
    with pytest.raises(DataValidationError, match=r"d\.jsonl:1: has field"):
        load_hospital_data(path, fmt="completion")
    with pytest.raises(ValueError, match="Unknown data format"):
        load_hospital_data(path, fmt="tabular")


def test_split_is_deterministic_disjoint_and_complete():
    examples = list(range(100))
    first = split_examples(examples, seed=3)
    assert first == split_examples(examples, seed=3)
    assert first != split_examples(examples, seed=4)
    assert (len(first.train), len(first.validation), len(first.test)) == (80, 10, 10)
    assert sorted(first.train + first.validation + first.test) == examples


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_split_of_tiny_datasets_keeps_train_and_evaluation_sets_non_empty(size: int):
    splits = split_examples(list(range(size)), seed=0)
    assert len(splits.train) >= 1
    assert sorted(splits.train + splits.validation + splits.test) == list(range(size))
    if size >= 3:
        assert len(splits.validation) >= 1 and len(splits.test) >= 1


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        split_examples([1, 2, 3], seed=0, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match=">= 0"):
        split_examples([1, 2, 3], seed=0, fractions=(1.2, -0.1, -0.1))
    assert split_examples([1, 2, 3], seed=0, fractions=(1.0, 0.0, 0.0)).train != ()
