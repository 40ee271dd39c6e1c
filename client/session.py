"""A hospital's working set for a message: who it is, its model, its encoded data.

Flower may run each message in a fresh process (deployment) or reuse one process for many
virtual hospitals (simulation). Loading the base model and encoding the data dominate a
round's overhead, so both are cached per process, keyed by everything that affects them;
the adapter weights are always overwritten from the coordinator's message, so sharing the
model object between hospitals cannot leak one hospital's training into another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedtune.client.data import (
    Example,
    HospitalDataset,
    LabeledText,
    Splits,
    load_hospital_data,
    patient_of,
    split_examples,
)
from fedtune.client.encoding import encode_classification, encode_generation
from fedtune.client.hospital import HospitalIdentity
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.lineage import DataFingerprint, data_fingerprint
from fedtune.core.model import attach_adapter, load_base_model, select_device


@dataclass
class EncodedSplits:
    """A hospital's data, validated, split and tokenized."""

    dataset: HospitalDataset
    splits: Splits
    features: dict[str, list[Any]]  # split name -> encoded examples
    lineage: DataFingerprint  # of the training split: what the adapter learned from
    # privacy.unit = "patient": each training feature's patient, as 0..P-1 (else None)
    train_patients: tuple[int, ...] | None = None

    def privacy_units(self) -> int:
        """n for the privacy analysis: training patients, or training records."""
        if self.train_patients is not None:
            return len(set(self.train_patients))
        return len(self.features["train"])


@dataclass
class ModelHandle:
    """The base model with its LoRA adapter, and the tokenizer that goes with it."""

    model: PeftModel
    tokenizer: Any
    device: torch.device


_models: dict[str, ModelHandle] = {}
_data: dict[tuple[object, ...], EncodedSplits] = {}


def model_for(config: RunConfig) -> ModelHandle:
    """The adapted model this run needs, loaded once per process (one model kept at a time)."""
    sections = config.to_dict()
    key = repr([sections["model"], sections["lora"], sections["adapter"]])
    if key not in _models:
        _models.clear()  # a node serves one run at a time; free the previous model first
        device = select_device(config.model.device)
        base, tokenizer, fresh = load_base_model(config.model, config.model.labels, device)
        model = attach_adapter(base, config.adapter, config.lora, config.model.task, fresh)
        _models[key] = ModelHandle(model=model, tokenizer=tokenizer, device=device)
    return _models[key]


def data_for(config: RunConfig, identity: HospitalIdentity, handle: ModelHandle) -> EncodedSplits:
    """The hospital's encoded splits, re-read whenever its file changes."""
    path = identity.data_path
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{identity.name}: data file {path} does not exist.") from None
    key = (
        str(path.resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        config.data,
        config.model.labels,
        config.model.max_length,
        config.model.task,
        config.model.source,
        config.privacy.unit,
    )
    if key not in _data:
        _data[key] = _encode(config, path, handle)
    return _data[key]


def _encode(config: RunConfig, path: Path, handle: ModelHandle) -> EncodedSplits:
    labels = config.model.labels if config.model.task == "classify" else None
    by_patient = config.privacy.unit == "patient"
    dataset = load_hospital_data(
        path, config.data.format, labels=labels, skip_bad_lines=config.data.skip_bad_lines,
        require_patient_id=by_patient,
    )
    splits = split_examples(
        dataset.examples, seed=config.data.split_seed, fractions=config.data.split,
        by_patient=by_patient,
    )
    features: dict[str, list[Any]] = {}
    for split_name in ("train", "validation", "test"):
        examples = list(getattr(splits, split_name))
        encoded: list[Any]
        if config.model.task == "classify":
            label_to_id = {label: i for i, label in enumerate(config.model.labels)}
            encoded = list(
                encode_classification(
                    examples, handle.tokenizer, label_to_id, config.model.max_length
                )
            )
        else:
            encoded = list(encode_generation(examples, handle.tokenizer, config.model.max_length))
        features[split_name] = encoded
    lineage = data_fingerprint(example_record(e) for e in splits.train)
    train_patients = None
    if by_patient:
        index: dict[str, int] = {}
        train_patients = tuple(
            index.setdefault(patient_of(e), len(index)) for e in splits.train
        )
    return EncodedSplits(
        dataset=dataset, splits=splits, features=features, lineage=lineage,
        train_patients=train_patients,
    )


def example_record(example: Example) -> dict[str, Any]:
    """An example as the fields it was read from (its line number is not part of it)."""
    if isinstance(example, LabeledText):
        return {"text": example.text, "label": example.label}
    turns = [[t.role, t.content] for t in example.messages] if example.messages else None
    return {"messages": turns, "prompt": example.prompt, "response": example.response}
