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

from client.encoding import collate
from client.federated_objectives import LocalObjective, objective_in_effect
from client.losses import PerExampleLoss, model_inputs
from fedtune.config import TrainSettings


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
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    examples_seen = 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(settings.grad_accumulation):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with autocast_for(device):
                logits = model(**model_inputs(batch)).logits
                loss = criterion(logits, batch["labels"]) / settings.grad_accumulation
            loss.backward()
            step_loss += float(loss.detach())
            examples_seen += int(batch["input_ids"].shape[0])
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


def adapter_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable (adapter) parameters only; the frozen base is never given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )


def _endless_batches(
    features: Sequence[Any], batch_size: int, pad_token_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Reshuffled passes over the data, as many as the step budget needs."""
    generator = torch.Generator().manual_seed(seed)
    loader: DataLoader[Any] = DataLoader(
        list(features),  # type: ignore[arg-type]
        batch_size=min(batch_size, len(features)),
        shuffle=True,
        generator=generator,
        collate_fn=lambda items: collate(items, pad_token_id),
    )
    while True:
        yield from loader


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (halves activation memory, fp32 master weights); none on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
