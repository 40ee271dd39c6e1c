"""The ICD-10-CM demo datasets: correct chapters, reproducible, disjoint, non-IID, loadable."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from fedtune.client.data import DataFormat, load_hospital_data
from fedtune.ops.icd10 import (
    CHAPTERS,
    INSTRUCTION,
    chapter_of,
    load_icd10_codes,
    write_hospital_datasets,
)


@pytest.mark.parametrize(
    ("code", "chapter"),
    [
        ("A00", 1), ("B99", 1), ("C00", 2), ("D49", 2), ("D3A.0", 2), ("D50", 3), ("D89", 3),
        ("E00", 4), ("H59", 7), ("H60", 8), ("I21.4", 9), ("O99", 15), ("O9A", 15),
        ("P00", 16), ("S00", 19), ("T88", 19), ("V00", 20), ("Y99", 20), ("Z99", 21),
        ("U07.1", 22), ("m1a011", 13),
    ],
)
def test_chapter_of_boundary_codes(code: str, chapter: int):
    assert chapter_of(code) == chapter


@pytest.mark.parametrize("code", ["F00", "U99", "123", "I2", ""])
def test_codes_outside_every_chapter_are_refused(code: str):
    with pytest.raises(ValueError, match=r"chapter|not an ICD-10-CM code"):
        chapter_of(code)


def test_chapters_are_22_ordered_non_overlapping_ranges():
    assert len(CHAPTERS) == 22
    ordered = [chapter for chapter in CHAPTERS if chapter.first != "U00"]
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.first <= earlier.last < later.first


def test_shipped_codes_all_map_to_a_chapter():
    codes = load_icd10_codes()
    assert len(codes) > 70_000
    assert ("I214", "Non-ST elevation (NSTEMI) myocardial infarction") in codes
    assert len(load_icd10_codes(billable_only=False)) > len(codes)
    assert {chapter_of(code) for code, _ in codes} == set(range(1, 22))


def read_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_classify_datasets_are_reproducible_disjoint_non_iid_and_loadable(tmp_path: Path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    paths = write_hospital_datasets(first, 3, "classify", 300, seed=7, test_examples=100)
    write_hospital_datasets(second, 3, "classify", 300, seed=7, test_examples=100)
    write_hospital_datasets(other, 3, "classify", 300, seed=8, test_examples=100)
    assert [path.name for path in paths] == [
        "hospital-1.jsonl",
        "hospital-2.jsonl",
        "hospital-3.jsonl",
    ]
    assert read_files(first) == read_files(second)
    assert read_files(first)["hospital-1.jsonl"] != read_files(other)["hospital-1.jsonl"]
    assert sorted(read_files(first)) == sorted(
        [path.name for path in paths] + ["labels.json", "manifest.json", "test.jsonl"]
    )

    labels = json.loads((first / "labels.json").read_text())
    assert labels == [chapter.title for chapter in CHAPTERS[:21]]
    texts_by_file = {}
    histograms = []
    for path in [*paths, first / "test.jsonl"]:
        dataset = load_hospital_data(path, labels=labels)
        assert dataset.format is DataFormat.CLASSIFICATION and dataset.skipped == ()
        examples = dataset.labeled_texts()
        texts_by_file[path.name] = Counter(example.text for example in examples)
        histograms.append(Counter(example.label for example in examples))
    assert [sum(h.values()) for h in histograms] == [300, 300, 300, 100]

    # Every hospital sees every chapter, but each one's top chapters are its own specialty.
    manifest = json.loads((first / "manifest.json").read_text())
    for histogram, entry in zip(histograms, manifest["hospitals"], strict=False):
        assert set(histogram) == set(labels)
        assert entry["chapter_histogram"] == dict(histogram)
        top = {label for label, _ in histogram.most_common(len(entry["specialty_chapters"]))}
        assert top == set(entry["specialty_chapters"])
    specialties = [frozenset(entry["specialty_chapters"]) for entry in manifest["hospitals"]]
    assert len(set(specialties)) == 3 and not specialties[0] & specialties[1]


def codes_by_description() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for code, text in load_icd10_codes():
        found.setdefault(text, []).append(code)
    return found


def assert_codes_used_at_most_once(held: list[str]) -> None:
    """A description may repeat only as often as distinct codes carry it (a few do)."""
    codes = codes_by_description()
    for text, count in Counter(held).items():
        assert count <= len(codes[text]), f"{text!r} given {count} times"


def test_no_code_is_held_by_two_hospitals(tmp_path: Path):
    paths = write_hospital_datasets(tmp_path, 4, "instruct", 250, seed=1, test_examples=50)
    codes = codes_by_description()
    held: list[str] = []
    for path in [*paths, tmp_path / "test.jsonl"]:
        dataset = load_hospital_data(path)
        assert dataset.format is DataFormat.INSTRUCTION and dataset.skipped == ()
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["instruction"] == INSTRUCTION
            assert record["output"] in {code[:3] for code in codes[record["input"]]}
            held.append(record["input"])
    assert len(held) == 4 * 250 + 50
    assert_codes_used_at_most_once(held)
    assert not (tmp_path / "labels.json").exists()


def test_scarce_chapters_are_filled_from_others_without_reuse(tmp_path: Path):
    # 20 hospitals x 600 examples: specialty chapters with few codes run out.
    paths = write_hospital_datasets(tmp_path, 20, "instruct", 600, seed=0)
    lines = [line for path in paths for line in path.read_text().splitlines()]
    assert len(lines) == 12_000
    assert_codes_used_at_most_once([json.loads(line)["input"] for line in lines])
    with pytest.raises(ValueError, match="billable codes"):
        write_hospital_datasets(tmp_path, 2, "classify", 50_000, seed=0)
