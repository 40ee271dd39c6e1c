"""Fingerprints that travel instead of data: what a model was trained on, provably, by hash.

A hospital computes the fingerprint of its training data and of the base model's files; only
the fingerprints leave it, and they go into the coordinator's audit log and the model card.
An auditor holding the same file (at the hospital) recomputes the same hash; nobody can
recover a record from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def normalize_text(value: str) -> str:
    """NFC, trimmed, internal whitespace collapsed: the same record written by two tools
    (CRLF vs LF, a stray double space, composed vs decomposed accents) hashes the same."""
    return " ".join(unicodedata.normalize("NFC", value).split())


def _normalized(record: Mapping[str, Any]) -> Any:
    if isinstance(record, Mapping):
        return {str(k): _normalized(v) for k, v in sorted(record.items())}
    if isinstance(record, list | tuple):
        return [_normalized(v) for v in record]
    if isinstance(record, str):
        return normalize_text(record)
    return record


@dataclass(frozen=True)
class DataFingerprint:
    """SHA-256 of a hospital's normalized training records, their count and label counts."""

    sha256: str
    examples: int
    labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_fingerprint(records: Iterable[Mapping[str, Any]]) -> DataFingerprint:
    """Fingerprint of records such as `{"text", "label"}` or `{"instruction", "output"}`.

    Order-independent: each normalized record is hashed and the sorted record hashes are
    hashed again, so a shuffled or re-split copy of the same data gives the same
    fingerprint, while any changed, added or removed record changes it.
    """
    hashes: list[bytes] = []
    labels: Counter[str] = Counter()
    for record in records:
        canonical = json.dumps(_normalized(record), sort_keys=True, ensure_ascii=False,
                               separators=(",", ":"))
        hashes.append(hashlib.sha256(canonical.encode("utf-8")).digest())
        if "label" in record and record["label"] is not None:
            labels[normalize_text(str(record["label"]))] += 1
    digest = hashlib.sha256(b"fedtune-data-v1\n")
    for item in sorted(hashes):
        digest.update(item)
    return DataFingerprint(digest.hexdigest(), len(hashes), dict(sorted(labels.items())))


@dataclass(frozen=True)
class ModelFingerprint:
    """SHA-256 over a model directory's files (relative path, size and bytes of each)."""

    sha256: str
    files: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_fingerprint(directory: Path) -> ModelFingerprint:
    """Every regular file under `directory` counts (weights, config, tokenizer), in path
    order, streamed in 1 MiB chunks; a renamed, added or changed file changes the hash.
    Linked folders are followed (a Hugging Face cache snapshot is links); Python caches
    (`__pycache__`) are skipped: imports rewrite them, so they are not part of a model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    digest = hashlib.sha256(b"fedtune-model-v1\n")
    count = total = 0
    for path in _model_files(directory):
        relative = path.relative_to(directory).as_posix()
        size = path.stat().st_size
        digest.update(f"{relative}\n{size}\n".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        count, total = count + 1, total + size
    return ModelFingerprint(digest.hexdigest(), count, total)


def _model_files(directory: Path) -> list[Path]:
    found = []
    for root, folders, files in os.walk(directory, followlinks=True):
        folders[:] = [f for f in folders if f != "__pycache__"]
        found += [Path(root) / name for name in files if (Path(root) / name).is_file()]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def model_sha256(directory: Path, cache_dir: Path) -> str:
    """The base model's fingerprint, cached by the files' sizes and modification times
    (hashing a multi-GB model for every message would dominate a node's round)."""
    stamp = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        info = path.stat()
        stamp.update(f"{path.relative_to(directory)}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    key = hashlib.sha256(f"{directory.resolve()}\n{stamp.hexdigest()}".encode()).hexdigest()
    cached = cache_dir / "model-fingerprints" / f"{key}.json"
    if cached.is_file():
        return str(json.loads(cached.read_text())["sha256"])
    sha = model_fingerprint(directory).sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"directory": str(directory), "sha256": sha}))
    os.replace(tmp, cached)
    return sha
