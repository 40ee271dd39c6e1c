"""Pooling: what the classifier sees, CLS pooler vs mean pooling, on the embedded MiniLM.

Backs the claims behind `model.pooling = "mean"` and `model.head_init = "label-names"`.
Data: the classification experiment's own pool and test set (`simulations.datasets`,
ICD-10-CM description → chapter, 3 × 2,000 pooled examples, the 420-example test set). The
encoder is frozen and loaded by fedtune's own `fedtune.core.model.load_base_model` both ways; then
- *untrained head from the label names* (mean pooling only): `fedtune.core.pooling`'s start;
- *linear probe*: a linear head fit on the frozen features (full batch, Adam, 300 steps),
  the best a head alone can do on those features; fine-tuning LoRA starts from here.
No DP here: this measures the features, not the privacy cost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedtune.benchmarks.runner import BenchResult
from fedtune.core.config import ModelSettings
from fedtune.core.model import load_base_model
from fedtune.core.pooling import init_head_from_label_names
from fedtune.simulations.datasets import build_dataset

POOL, TEST, MAX_LENGTH, PROBE_STEPS = 6000, 420, 32, 300


@torch.no_grad()
def _features(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    encoder = getattr(model, model.base_model_prefix)
    out = []
    for start in range(0, len(texts), 128):
        batch = tokenizer(
            texts[start : start + 128], padding=True, truncation=True,
            max_length=MAX_LENGTH, return_tensors="pt",
        )
        out.append(encoder(**batch, return_dict=True).pooler_output)
    return torch.cat(out)


def _probe(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    torch.manual_seed(0)
    head = torch.nn.Linear(train.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(train), y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(test).argmax(1) == y_test).float().mean())


def bench_pooling(_work_dir: Path) -> BenchResult:
    """Zero-shot and linear-probe accuracy of CLS-pooled vs mean-pooled MiniLM features."""
    data = build_dataset("icd10-chapters", POOL, TEST, seed=0)
    labels = list(data.labels)
    texts = [e.record["text"] for e in data.pool]
    test_texts = [e.record["text"] for e in data.test]
    y = torch.tensor([labels.index(e.record["label"]) for e in data.pool])
    y_test = torch.tensor([labels.index(e.record["label"]) for e in data.test])
    numbers: dict[str, float | str] = {}
    started = time.monotonic()
    for pooling in ("cls", "mean"):
        settings = ModelSettings(
            source="embedded:minilm", labels=tuple(labels), max_length=MAX_LENGTH,
            device="cpu", pooling=pooling,
        )
        model, tokenizer, _ = load_base_model(settings, tuple(labels), torch.device("cpu"))
        model.eval()
        train_x = _features(model, tokenizer, texts)
        test_x = _features(model, tokenizer, test_texts)
        numbers[f"pooling_{pooling}_linear_probe_accuracy"] = _probe(train_x, y, test_x, y_test)
        if pooling == "mean":
            init_head_from_label_names(model, tokenizer, labels, MAX_LENGTH)
            with torch.no_grad():
                logits = model.classifier(test_x)  # type: ignore[operator]
            numbers["pooling_mean_label_names_untrained_accuracy"] = float(
                (logits.argmax(1) == y_test).float().mean()
            )
    seconds = time.monotonic() - started
    cls_probe = numbers["pooling_cls_linear_probe_accuracy"]
    mean_probe = numbers["pooling_mean_linear_probe_accuracy"]
    mean_start = numbers["pooling_mean_label_names_untrained_accuracy"]
    markdown = f"""## Pooling: what the classifier sees (`fedtune bench pooling`)

Embedded MiniLM, frozen; ICD-10-CM description → chapter ({len(labels)} classes), the
classification experiment's pool ({POOL} examples) and its {TEST}-example test set. Accuracy
on the test set ({seconds:.0f} s); the probe is {PROBE_STEPS} full-batch Adam steps:

| features | untrained head from the label names | linear probe |
|---|---|---|
| CLS pooler (`model.pooling = "cls"`) | - | {cls_probe:.3f} |
| mean pooling (`model.pooling = "mean"`) | {mean_start:.3f} | {mean_probe:.3f} |

A fresh random head scores about 1/{len(labels)} = {1 / len(labels):.3f} before training.
"""
    return BenchResult(numbers=numbers, markdown=markdown)
