"""Local training at a hospital for one round.

Reads like the algorithm: shuffle the hospital's training examples with a seed that depends
on the round (so rounds see different orders but a rerun is reproducible), take
``local_steps`` optimizer steps of ``batch_size × grad_accumulation`` examples with AdamW and
a linear warm-up, and report what happened. Only the adapter's parameters are given to the
optimizer; the base model is frozen by PEFT and stays bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedtune.client.federated_objectives import LocalObjective, objective_in_effect
from fedtune.client.frozen_prefix import (
    EXAMPLE_INDEX,
    FrozenPrefix,
    collate_indexed,
    frozen_prefix_for,
    indexed,
)
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.core.config import TrainSettings

ROWS_PER_PASS = 256
"""A step's batch goes through the model in passes of at most this many examples, sorted by
length so that each pass is padded only to its own longest example (short clinical texts in
random order are mostly padding otherwise). The gradient is the same: each pass's mean loss
is weighted by its share of the batch."""


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did (sent to the coordinator as metrics)."""

    steps: int
    examples_seen: int
    mean_loss: float
    last_loss: float
    seconds: float


def planned_steps(settings: TrainSettings, num_examples: int) -> int:
    """Optimizer steps this round: `local_steps`, or enough for `local_epochs` passes."""
    if settings.local_steps > 0:
        return settings.local_steps
    per_step = settings.batch_size * settings.grad_accumulation
    return max(1, math.ceil(settings.local_epochs * num_examples / per_step))


def train_locally(
    model: torch.nn.Module,
    features: Sequence[Any],
    settings: TrainSettings,
    pad_token_id: int,
    seed: int,
    task: str,
    objective: LocalObjective | None = None,
) -> TrainResult:
    """Train the adapter in place on the encoded training examples (no DP).

    `objective` (from `client.federated_objectives.local_objective`) adds FedProx's proximal
    term or freezes LoRA A for FFA-LoRA; None is plain training.
    """
    if not features:
        raise ValueError("this hospital has no training examples")
    torch.manual_seed(seed)  # LoRA dropout draws: a rerun of a round is reproducible
    with objective_in_effect(
        model, objective, lambda: adapter_optimizer(model, settings)
    ) as optimizer:
        return _train(model, features, settings, pad_token_id, seed, task, optimizer)


def _train(
    model: torch.nn.Module,
    features: Sequence[Any],
    settings: TrainSettings,
    pad_token_id: int,
    seed: int,
    task: str,
    optimizer: torch.optim.Optimizer,
) -> TrainResult:
    device = next(model.parameters()).device
    warmup = settings.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    steps = planned_steps(settings, len(features))
    criterion = PerExampleLoss(task)
    batches = _endless_batches(features, settings.batch_size, pad_token_id, seed)
    prefix = frozen_prefix_in_use(model, features, settings, pad_token_id)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    examples_seen = 0
    with prefix.in_effect() if prefix else contextlib.nullcontext():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(settings.grad_accumulation):
                batch = next(batches)
                total = int(batch["input_ids"].shape[0])
                for part in length_sorted_passes(batch, ROWS_PER_PASS):
                    rows = part.pop(EXAMPLE_INDEX)
                    if prefix:
                        prefix.feed(rows, int(part["input_ids"].shape[1]))
                    part = {k: v.to(device) for k, v in part.items()}
                    share = part["input_ids"].shape[0] / total / settings.grad_accumulation
                    with autocast_for(device):
                        logits = model(**model_inputs(part)).logits
                        loss = criterion(logits, part["labels"]) * share
                    loss.backward()
                    step_loss += float(loss.detach())
                examples_seen += total
            optimizer.step()
            schedule.step()
            losses.append(step_loss)
    model.eval()
    return TrainResult(
        steps=steps,
        examples_seen=examples_seen,
        mean_loss=float(sum(losses) / len(losses)),
        last_loss=losses[-1],
        seconds=time.perf_counter() - started,
    )


def length_sorted_passes(
    batch: dict[str, torch.Tensor], rows_per_pass: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The batch in passes of at most `rows_per_pass` rows, shortest examples first, each
    pass cut to its own longest example (right padding: real tokens come first)."""
    lengths = batch["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    passes = math.ceil(len(order) / rows_per_pass)
    for rows in torch.tensor_split(order, passes):
        width = max(1, int(lengths[rows].max()))
        part = {}
        for key, value in batch.items():
            value = value[rows]
            part[key] = value[:, :width] if value.dim() == 2 else value
        yield part


def frozen_prefix_in_use(
    model: torch.nn.Module, features: Sequence[Any], settings: TrainSettings, pad_token_id: int
) -> FrozenPrefix | None:
    """The frozen-layer cache when `train.cache_frozen_layers` asks for it and it can help."""
    if not settings.cache_frozen_layers:
        return None
    return frozen_prefix_for(model, features, pad_token_id)


def adapter_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable (adapter) parameters only; the frozen base is never given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )


def _endless_batches(
    features: Sequence[Any], batch_size: int, pad_token_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Reshuffled passes over the data, as many as the step budget needs (rows indexed)."""
    generator = torch.Generator().manual_seed(seed)
    loader: DataLoader[Any] = DataLoader(
        indexed(features),  # type: ignore[arg-type]
        batch_size=min(batch_size, len(features)),
        shuffle=True,
        generator=generator,
        collate_fn=lambda items: collate_indexed(items, pad_token_id),
    )
    while True:
        yield from loader


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (halves activation memory, fp32 master weights); none on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
