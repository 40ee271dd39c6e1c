"""Fingerprints that travel instead of data: stable under reordering, changed by any edit."""

from __future__ import annotations

import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

from fedtune.client.data import load_hospital_data
from fedtune.core.lineage import data_fingerprint, model_fingerprint, normalize_text

WARD = [
    {"text": "Chest pain radiating to the left arm", "label": "cardio"},
    {"text": "Atrial fibrillation with rapid ventricular response", "label": "cardio"},
    {"text": "Ischemic stroke, left MCA territory", "label": "neuro"},
    {"text": "Essential hypertension", "label": "cardio"},
    {"text": "Migraine without aura", "label": "neuro"},
]


@pytest.mark.parametrize("seed", range(5))
def test_the_same_records_in_another_order_give_the_same_fingerprint(seed: int):
    shuffled = list(WARD)
    random.Random(seed).shuffle(shuffled)
    assert data_fingerprint(shuffled) == data_fingerprint(WARD)


def test_key_order_inside_a_record_does_not_matter():
    reversed_keys = [{"label": r["label"], "text": r["text"]} for r in WARD]
    assert data_fingerprint(reversed_keys).sha256 == data_fingerprint(WARD).sha256


@pytest.mark.parametrize("index", range(len(WARD)))
@pytest.mark.parametrize("field", ["text", "label"])
def test_one_changed_character_changes_the_fingerprint(index: int, field: str):
    changed = [dict(r) for r in WARD]
    value = changed[index][field]
    changed[index][field] = value[:-1] + ("X" if value[-1] != "X" else "Y")
    assert data_fingerprint(changed).sha256 != data_fingerprint(WARD).sha256


def test_added_removed_or_duplicated_records_change_the_fingerprint():
    base = data_fingerprint(WARD).sha256
    assert data_fingerprint(WARD[:-1]).sha256 != base
    assert data_fingerprint([*WARD, WARD[0]]).sha256 != base  # a multiset, not a set
    assert data_fingerprint([*WARD, {"text": "Syncope", "label": "cardio"}]).sha256 != base


def test_swapping_values_between_fields_changes_the_fingerprint():
    record = {"text": "cardio", "label": "neuro"}
    swapped = {"text": "neuro", "label": "cardio"}
    assert data_fingerprint([record]).sha256 != data_fingerprint([swapped]).sha256


def test_whitespace_and_unicode_form_do_not_change_the_fingerprint():
    decomposed = unicodedata.normalize("NFD", "Ménière disease")
    messy = [{"text": f"  {decomposed}\r\n  with   vertigo ", "label": " neuro "}]
    clean = [{"text": "Ménière disease with vertigo", "label": "neuro"}]
    assert decomposed != "Ménière disease"  # the test really compares two encodings
    assert data_fingerprint(messy) == data_fingerprint(clean)
    assert normalize_text(f" a\t\n b  {decomposed} ") == "a b Ménière disease"
    assert data_fingerprint([{"text": "ménière disease with vertigo", "label": "neuro"}]) != (
        data_fingerprint(clean)
    )  # case is content


def test_count_and_label_histogram_are_exact():
    fingerprint = data_fingerprint(WARD)
    assert fingerprint.examples == 5
    assert fingerprint.labels == {"cardio": 3, "neuro": 2}
    as_dict = fingerprint.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # travels as JSON
    assert as_dict["sha256"] == fingerprint.sha256 and len(fingerprint.sha256) == 64


def test_generation_records_have_no_labels_and_still_fingerprint():
    records = [{"messages": [["user", "Code: chest pain"]], "prompt": None, "response": "R07.9"}]
    fingerprint = data_fingerprint(records)
    assert fingerprint.examples == 1 and fingerprint.labels == {}
    changed = [{**records[0], "response": "R07.8"}]
    assert data_fingerprint(changed).sha256 != fingerprint.sha256


def test_jsonl_and_csv_exports_of_the_same_data_give_the_same_fingerprint(tmp_path: Path):
    jsonl = tmp_path / "ward.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in reversed(WARD)), encoding="utf-8")
    csv_file = tmp_path / "ward.csv"
    rows = "".join(f'"{r["text"]}",{r["label"]}\n' for r in WARD)
    csv_file.write_text("text,label\n" + rows, encoding="utf-8")
    fingerprints = [
        data_fingerprint(
            {"text": e.text, "label": e.label} for e in load_hospital_data(path).labeled_texts()
        )
        for path in (jsonl, csv_file)
    ]
    assert fingerprints[0] == fingerprints[1] == data_fingerprint(WARD)


def make_model_dir(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 32}', encoding="utf-8")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nchest\n", encoding="utf-8")
    # Larger than the 1 MiB read chunk, so streaming across chunks is exercised.
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 8192 + b"tail")
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


def test_model_fingerprint_counts_every_file_and_ignores_where_the_folder_is(
    model_dir: Path, tmp_path: Path
):
    fingerprint = model_fingerprint(model_dir)
    assert fingerprint.files == 3
    assert fingerprint.bytes == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    copy = make_model_dir(tmp_path / "elsewhere")
    assert model_fingerprint(copy) == fingerprint
    assert json.loads(json.dumps(fingerprint.to_dict())) == fingerprint.to_dict()


@pytest.mark.parametrize("name", ["config.json", "tokenizer/vocab.txt", "model.safetensors"])
@pytest.mark.parametrize("where", [0, -1])
def test_one_changed_byte_changes_the_model_fingerprint(model_dir: Path, name: str, where: int):
    before = model_fingerprint(model_dir).sha256
    path = model_dir / name
    content = bytearray(path.read_bytes())
    content[where] ^= 0x01
    path.write_bytes(bytes(content))
    assert model_fingerprint(model_dir).sha256 != before


def test_renamed_added_or_removed_files_change_the_model_fingerprint(model_dir: Path):
    before = model_fingerprint(model_dir).sha256
    (model_dir / "config.json").rename(model_dir / "config2.json")
    renamed = model_fingerprint(model_dir).sha256
    assert renamed != before
    (model_dir / "config2.json").rename(model_dir / "config.json")
    assert model_fingerprint(model_dir).sha256 == before
    (model_dir / "extra.bin").write_bytes(b"")  # even an empty file counts
    assert model_fingerprint(model_dir).sha256 != before
    (model_dir / "extra.bin").unlink()
    (model_dir / "tokenizer" / "vocab.txt").unlink()
    assert model_fingerprint(model_dir).sha256 != before


def test_moving_bytes_across_a_file_boundary_changes_the_model_fingerprint(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a").write_bytes(b"bc")
    (first / "b").write_bytes(b"d")
    (second / "a").write_bytes(b"b")
    (second / "b").write_bytes(b"cd")
    assert model_fingerprint(first).sha256 != model_fingerprint(second).sha256


def test_a_hugging_face_cache_snapshot_fingerprints_like_a_plain_copy(
    model_dir: Path, tmp_path: Path
):
    """Hugging Face's cache keeps files in blobs/ and symlinks them from snapshots/<rev>/."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (snapshot / "tokenizer").mkdir(parents=True)
    for path in (p for p in model_dir.rglob("*") if p.is_file()):
        blob = blobs / path.name
        blob.write_bytes(path.read_bytes())
        os.symlink(blob, snapshot / path.relative_to(model_dir))
    assert model_fingerprint(snapshot) == model_fingerprint(model_dir)


def test_a_missing_model_directory_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_fingerprint(tmp_path / "no-model")


def test_model_fingerprint_follows_a_linked_folder(tmp_path: Path) -> None:
    """A model folder whose weights sit in a linked sub-folder (as in Hugging Face caches)
    counts those weights: changing them changes the fingerprint."""
    from fedtune.core.lineage import model_fingerprint

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "model.safetensors").write_bytes(b"weights-1")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights").symlink_to(blobs, target_is_directory=True)
    before = model_fingerprint(model)
    assert before.files == 2
    (blobs / "model.safetensors").write_bytes(b"weights-2")
    assert model_fingerprint(model).sha256 != before.sha256
