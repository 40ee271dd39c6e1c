"""`fedtune predict` and `fedtune evaluate`: a hospital uses the exported adapter.

The export (`fedtune export`) is a plain PEFT adapter directory. It is loaded here exactly as
a user without fedtune would load it: the base model with transformers' `from_pretrained`
(from the directory the export names, or `--base`), the adapter with
`PeftModel.from_pretrained`, the tokenizer from the export. The one addition is the export's
`pooling = "mean"` for encoder classifiers: the weight-free mean pooler replaces the base's
pooler (`core.pooling.use_mean_pooling`, ten lines a user can copy), since the adapter was
trained on mean-pooled features.

New records are read with the same validation as training data (`client.data`, `file:line`
errors), without requiring the answer for `predict`. `evaluate` computes the metrics with
the same functions a hospital reports during a run (`client.evaluate`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.client.data import (
    HospitalDataset,
    LabeledText,
    PromptResponse,
    load_hospital_data,
)
from fedtune.client.encoding import (
    collate,
    encode_classification,
    encode_generation,
    prompt_token_ids,
)
from fedtune.client.evaluate import evaluate_classification, evaluate_generation
from fedtune.core.config import ModelSettings
from fedtune.core.errors import ConfigError
from fedtune.core.model import select_device
from fedtune.core.model_source import resolve_model_source
from fedtune.core.pooling import use_mean_pooling

EXPORT_INFO = "fedtune-export.json"
DEFAULT_MAX_LENGTH = ModelSettings().max_length  # exports made before it was recorded
_TASKS = ("classify", "instruct")


class ExportDirectoryError(ConfigError):
    """The folder is not a complete fedtune export; the message says what is missing."""


@dataclass
class LoadedExport:
    """An exported adapter on its base model, ready to predict."""

    model: PeftModel
    tokenizer: Any
    task: str
    labels: tuple[str, ...]
    max_length: int
    device: torch.device
    round: int


def read_export_info(export_dir: Path) -> dict[str, Any]:
    """The export's own description, checked before any model is loaded."""
    if not export_dir.is_dir():
        raise ExportDirectoryError(f"{export_dir} is not a folder; pass the folder that "
                                   "`fedtune export RUN_DIR --out FOLDER` wrote.")
    info_path = export_dir / EXPORT_INFO
    if not info_path.is_file():
        raise ExportDirectoryError(
            f"{export_dir} is not a fedtune export: it has no {EXPORT_INFO}. Export a run "
            "with `fedtune export RUN_DIR --out FOLDER`."
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportDirectoryError(f"{info_path} cannot be read ({exc}); export again.") from None
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors")
               if not (export_dir / f).is_file()]
    if missing:
        raise ExportDirectoryError(
            f"{export_dir} lacks {', '.join(missing)}: the adapter itself is missing or "
            "incomplete; export the run again."
        )
    if not isinstance(info, dict) or info.get("task") not in _TASKS:
        raise ExportDirectoryError(
            f"{info_path} names no task ({', '.join(_TASKS)}); export the run again.")
    if info["task"] == "classify":
        labels = info.get("labels")
        if not isinstance(labels, list) or not labels or not all(
                isinstance(x, str) for x in labels):
            raise ExportDirectoryError(
                f"{info_path} lists no labels, so predicted classes could not be named; "
                "export the run again with this fedtune version."
            )
    return info


def load_export(export_dir: Path, device: str = "auto", base: Path | None = None) -> LoadedExport:
    """The exported adapter on its base model (plain transformers + PEFT), in eval mode."""
    info = read_export_info(export_dir)
    base_dir, gguf_file = _base_model(info, base)
    task = info["task"]
    labels = tuple(info.get("labels") or ())
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if task == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **kwargs)
        if info.get("pooling") == "mean":
            use_mean_pooling(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    chosen = select_device(device)
    peft_model = PeftModel.from_pretrained(model, str(export_dir)).to(chosen).eval()
    return LoadedExport(peft_model, tokenizer, task, labels,
                        int(info.get("max_length") or DEFAULT_MAX_LENGTH), chosen,
                        int(info.get("round", -1)))


def _base_model(info: dict[str, Any], base: Path | None) -> tuple[Path, str]:
    """The base model's folder: `--base`, else the one the export names, else the embedded
    model of that name installed on this machine (exports travel between machines)."""
    gguf = str(info.get("gguf_file") or "")
    if base is not None:
        if not base.is_dir():
            raise ExportDirectoryError(f"--base {base} is not a folder.")
        return base, gguf
    named = Path(str(info.get("base_model_dir") or ""))
    if str(named) and named.is_dir():
        return named, gguf
    source = str(info.get("base_model") or "")
    if source.startswith("embedded:"):
        directory, embedded_gguf = resolve_model_source(ModelSettings(source=source))
        return directory, gguf or embedded_gguf
    raise ExportDirectoryError(
        f"the export's base model {named} is not on this machine; pass its folder with "
        "--base (the same model the run trained on)."
    )


def read_records(path: Path, loaded: LoadedExport, answers: bool) -> HospitalDataset:
    """New records in any training format, validated (file:line errors); `answers` also
    requires each line's label or response (for `evaluate`)."""
    labels = loaded.labels if loaded.task == "classify" else None
    dataset = load_hospital_data(path, "auto", labels=labels, answers=answers)
    wanted = LabeledText if loaded.task == "classify" else PromptResponse
    if dataset.examples and not isinstance(dataset.examples[0], wanted):
        kind = "classification" if loaded.task == "classify" else "generation"
        raise ConfigError(f"{path} holds {dataset.format} data, but this export is a {kind} "
                          "model; use a file in one of its formats (see README, Data).")
    return dataset


# ---- predict --------------------------------------------------------------------------------

def predict_file(loaded: LoadedExport, data: Path, out: Path, batch_size: int = 16,
                 max_new_tokens: int = 32, progress: bool = True) -> int:
    """Write one JSON line per record of `data` to `out`; return how many."""
    dataset = read_records(data, loaded, answers=False)
    rows = (classify_rows(loaded, dataset.labeled_texts(), batch_size, progress)
            if loaded.task == "classify"
            else generate_rows(loaded, dataset.prompt_responses(), batch_size, max_new_tokens,
                               progress))
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


@torch.no_grad()
def classify_rows(loaded: LoadedExport, examples: Sequence[LabeledText], batch_size: int,
                  progress: bool = False) -> Iterator[dict[str, Any]]:
    """Per record: its line, the predicted label and every label's probability."""
    label_ids = {label: i for i, label in enumerate(loaded.labels)}
    # Labels are not needed to predict; a placeholder id keeps the encoder's format.
    unlabeled = [LabeledText(e.text, e.label or loaded.labels[0], e.line) for e in examples]
    features = list(encode_classification(unlabeled, loaded.tokenizer, label_ids,
                                          loaded.max_length))
    pad = int(loaded.tokenizer.pad_token_id)
    for start in _batches(len(features), batch_size, progress):
        chunk = features[start:start + batch_size]
        batch = collate(chunk, pad)
        batch.pop("labels", None)
        logits = loaded.model(**{k: v.to(loaded.device) for k, v in batch.items()}).logits
        probabilities = torch.softmax(logits.float(), dim=-1).cpu()
        for example, row in zip(examples[start:start + batch_size], probabilities, strict=True):
            best = int(row.argmax())
            yield {"line": example.line, "label": loaded.labels[best],
                   "probabilities": {label: round(float(p), 6)
                                     for label, p in zip(loaded.labels, row, strict=True)}}


@torch.no_grad()
def generate_rows(loaded: LoadedExport, examples: Sequence[PromptResponse], batch_size: int,
                  max_new_tokens: int, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Per record: its line and the greedy answer, prompts rendered as in training and
    whole (as the hospitals' exact-match evaluation generates; max_length bounds training
    sequences, not prompts)."""
    tokenizer = loaded.tokenizer
    pad = int(tokenizer.pad_token_id)
    prompts = [prompt_token_ids(e, tokenizer) for e in examples]
    for start in _batches(len(prompts), batch_size, progress):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding: every prompt ends where its answer begins.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device=loaded.device)
        output = loaded.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad,
        )
        for example, row in zip(examples[start:start + batch_size], output, strict=True):
            answer = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
            yield {"line": example.line, "answer": answer}


def _batches(total: int, batch_size: int, progress: bool) -> Iterator[int]:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    starts = range(0, total, batch_size)
    if not progress:
        yield from starts
        return
    from tqdm import tqdm  # transformers' own dependency

    yield from tqdm(starts, total=math.ceil(total / batch_size), unit="batch", file=sys.stderr)


# ---- evaluate -------------------------------------------------------------------------------

def evaluate_file(loaded: LoadedExport, data: Path, batch_size: int = 16,
                  max_new_tokens: int = 32, generation_examples: int | None = None
                  ) -> dict[str, float]:
    """The metrics a hospital reports during a run, on a labelled file."""
    dataset = read_records(data, loaded, answers=True)
    if loaded.task == "classify":
        examples = dataset.labeled_texts()
        label_ids = {label: i for i, label in enumerate(loaded.labels)}
        features = list(encode_classification(examples, loaded.tokenizer, label_ids,
                                              loaded.max_length))
        return evaluate_classification(loaded.model, features, len(loaded.labels), batch_size,
                                       int(loaded.tokenizer.pad_token_id))
    generation = dataset.prompt_responses()
    encoded = list(encode_generation(generation, loaded.tokenizer, loaded.max_length))
    scored = len(generation) if generation_examples is None else generation_examples
    return evaluate_generation(loaded.model, loaded.tokenizer, encoded, generation, batch_size,
                               scored, max_new_tokens)


def metrics_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    for name, value in metrics.items():
        shown = f"{int(value)}" if name == "num-examples" else f"{value:.4f}"
        lines.append(f"{name.ljust(width)}  {shown}")
    return "\n".join(lines)
