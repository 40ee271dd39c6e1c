"""Local training under Opacus DP-SGD: what lets a hospital promise (ε, δ) per record or
per patient.

One round = `steps` DP-SGD steps. Record level (`patients=None`): each step's logical batch
is Poisson-sampled (every example joins independently with probability q, as the accountant
assumes); each example's gradient (adapter parameters only — the base is frozen) is clipped
to `max_grad_norm`, the clipped gradients are summed, Gaussian noise N(0, σ²C²) is added,
and AdamW steps on the result. Large logical batches are split into physical batches by
Opacus' BatchMemoryManager, so memory stays bounded without changing the privacy analysis.
Patient level (`patients` given): the same with patients in place of examples
(`client.patient_dp`): q is over patients and each patient's summed gradient is clipped.

The PrivacyEngine made here is used for its wrappers only: the guarantee is composed by the
hospital's privacy ledger over every round it ever trained, so nothing resets per round.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedtune.client.federated_objectives import LocalObjective, objective_in_effect
from fedtune.client.frozen_prefix import EXAMPLE_INDEX, FrozenPrefix, collate_indexed, indexed
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.client.patient_dp import (
    PatientGradients,
    PatientIndex,
    patient_batches,
    patient_loader,
    physical_chunks,
)
from fedtune.client.train import TrainResult, adapter_optimizer, autocast_for, frozen_prefix_in_use
from fedtune.core.config import TrainSettings


@dataclass(frozen=True)
class DPPlan:
    """The DP parameters of one round, decided before training (and checked against the budget)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    grad_sample_mode: str
    max_physical_batch_size: int


def poisson_sample_rate(batch_size: int, num_examples: int) -> float:
    """q as Opacus derives it from a loader: 1 / number of batches per epoch."""
    batches = -(-num_examples // batch_size)  # ceil
    return 1.0 / batches


class LengthSortedPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler, each drawn batch listed from shortest to longest example.

    Why: Opacus cuts a logical batch into physical batches in the order the sampler lists it,
    and each physical batch is padded to its longest example. ICD-10 descriptions average 14
    tokens but a batch of 256 almost always holds one of 32, so in random order most of every
    pass is padding. Listing the batch by length gives each physical batch a width close to
    its own examples' lengths. Which examples are in the batch (all the privacy analysis
    depends on) is unchanged, and so is the noisy sum of their clipped gradients.
    """

    def __init__(
        self, *, lengths: Sequence[int], sample_rate: float, generator: torch.Generator
    ) -> None:
        super().__init__(num_samples=len(lengths), sample_rate=sample_rate, generator=generator)
        self.lengths = list(lengths)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in super().__iter__():
            yield sorted(indices, key=self.lengths.__getitem__)


def train_privately(
    model: torch.nn.Module,
    features: Sequence[Any],
    settings: TrainSettings,
    plan: DPPlan,
    pad_token_id: int,
    seed: int,
    task: str,
    objective: LocalObjective | None = None,
    *,
    patients: Sequence[int] | None,
) -> TrainResult:
    """Take exactly `plan.steps` DP-SGD steps on the adapter, in place.

    `patients` (no default: it decides what is protected): None for record-level DP; else
    the patient number (0..P-1) of each training feature, and `plan.sample_rate` is over P.

    `objective` (from `client.federated_objectives.local_objective`): FFA-LoRA freezes LoRA A
    before Opacus wraps anything, so A gets neither gradient nor noise; FedProx's proximal
    gradient is added by the wrapped optimizer's pre-step hook, after clipping and noise (it
    does not depend on any example, so it costs no privacy). None is plain DP-SGD.
    """
    if not features:
        raise ValueError("this hospital has no training examples")
    torch.manual_seed(seed)  # dropout only; nothing the privacy analysis relies on
    with objective_in_effect(
        model, objective, lambda: adapter_optimizer(model, settings)
    ) as optimizer:
        prefix = frozen_prefix_in_use(model, features, settings, pad_token_id)
        index = None if patients is None else PatientIndex.from_patients(patients)
        if index is not None and len(patients or ()) != len(features):
            raise ValueError("one patient number per training feature is needed")
        return _train_privately(
            model, features, plan, pad_token_id, task, optimizer, prefix, index
        )


def _train_privately(
    model: torch.nn.Module,
    features: Sequence[Any],
    plan: DPPlan,
    pad_token_id: int,
    task: str,
    optimizer: torch.optim.Optimizer,
    prefix: FrozenPrefix | None,
    index: PatientIndex | None,
) -> TrainResult:
    device = next(model.parameters()).device
    # The noise and the Poisson draws must be unpredictable to the coordinator: it knows
    # `seed` (train.seed, round, hospital name), and with a reproducible noise draw it could
    # regenerate the noise and subtract it. Both generators are seeded from the OS's CSPRNG.
    noise_generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    sampling_generator = torch.Generator().manual_seed(secrets.randbits(63))
    # Poisson sampling by our own loader (Opacus' sampler, our collate): each example joins a
    # batch with probability q, exactly the q the ledger records; an empty draw is handled.
    lengths = [len(feature["input_ids"]) for feature in features]
    loader: DataLoader[Any]
    if index is None:
        loader = DataLoader(
            indexed(features),  # type: ignore[arg-type]
            batch_sampler=LengthSortedPoissonSampler(
                lengths=lengths, sample_rate=plan.sample_rate, generator=sampling_generator,
            ),
            collate_fn=lambda items: _collate_or_empty(items, pad_token_id),
        )
    else:  # Poisson over patients: Opacus reads q·P as the expected batch from this loader
        loader = patient_loader(index.num_patients, plan.sample_rate, sampling_generator)
    criterion = PerExampleLoss(task)
    model.train()  # Opacus validates that the module is in training mode
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: its CSPRNG noise is for the threat of an
        # attacker who can observe floating-point noise bits; documented in the README.
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp")
        prepared = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples by Poisson
            noise_generator=noise_generator,
            grad_sample_mode=plan.grad_sample_mode,
        )
    if index is not None:
        # Opacus divides the noisy sum by the expected batch, int(q·P) patients: never by 0
        # (few patients with many records each and a small batch_size give q·P < 1).
        prepared[1].expected_batch_size = max(1, prepared[1].expected_batch_size)
    if plan.grad_sample_mode == "ghost":
        private_model, private_optimizer, dp_criterion, private_loader = prepared
    else:
        private_model, private_optimizer, private_loader = prepared
        dp_criterion = criterion
    started = time.perf_counter()
    losses: list[float] = []
    steps_taken = 0
    examples_seen = 0
    try:
        private_model.train()
        with prefix.in_effect() if prefix else contextlib.nullcontext():
            if index is None:
                steps_taken, examples_seen = _dp_steps(
                    private_model, private_loader, private_optimizer, dp_criterion, plan,
                    device, prefix, losses,
                )
            else:
                run = _PatientRun(private_model, private_optimizer, dp_criterion, device, prefix,
                                  features, index, lengths, plan, pad_token_id)
                steps_taken, examples_seen = _patient_steps(run, private_loader, losses)
    finally:
        _detach_opacus(private_model)
    model.eval()
    return TrainResult(
        steps=steps_taken,
        examples_seen=examples_seen,
        mean_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        seconds=time.perf_counter() - started,
    )


def _dp_steps(
    private_model: Any,
    private_loader: DataLoader[Any],
    private_optimizer: Any,
    dp_criterion: Any,
    plan: DPPlan,
    device: torch.device,
    prefix: FrozenPrefix | None,
    losses: list[float],
) -> tuple[int, int]:
    """The DP-SGD steps themselves; returns (steps taken, examples seen)."""
    steps_taken = 0
    examples_seen = 0
    while steps_taken < plan.steps:
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=private_loader,
                max_physical_batch_size=plan.max_physical_batch_size,
                optimizer=private_optimizer,
            ) as physical_batches,
        ):
            # Frozen embeddings: no module input needs a gradient, PyTorch says so per step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            step_loss, step_examples = 0.0, 0
            for batch in physical_batches:
                rows = batch.pop(EXAMPLE_INDEX)
                count = int(batch["input_ids"].shape[0])
                if prefix and count:
                    prefix.feed(rows, int(batch["input_ids"].shape[1]))
                batch = {k: v.to(device) for k, v in batch.items()}
                if count == 0:
                    # An empty Poisson draw (probability e^-(q·n)): the sampled Gaussian
                    # mechanism the accountant analyses still releases noise, so the step is
                    # a noise-only update. Stepping also takes this batch's end-of-batch
                    # signal off Opacus' queue; left there, it would end the next split
                    # batch after its first physical piece and merge the rest into the step
                    # after it, where one patient could count twice.
                    _noise_only_step(private_optimizer)
                    steps_taken += 1
                    if steps_taken == plan.steps:
                        break
                    continue
                with autocast_for(device):
                    logits = private_model(**model_inputs(batch)).logits
                    loss = dp_criterion(logits, batch["labels"])
                loss.backward()
                step_loss += float(loss.detach()) * count
                step_examples += count
                private_optimizer.step()
                private_optimizer.zero_grad(set_to_none=True)
                if not private_optimizer._is_last_step_skipped:
                    steps_taken += 1
                    losses.append(step_loss / step_examples)
                    examples_seen += step_examples
                    step_loss, step_examples = 0.0, 0
                    if steps_taken == plan.steps:
                        break
    return steps_taken, examples_seen


@dataclass(frozen=True)
class _PatientRun:
    """What a patient-level round steps with: the wrapped model and optimizer, the data."""

    model: Any
    optimizer: Any
    criterion: Any
    device: torch.device
    prefix: FrozenPrefix | None
    features: Sequence[Any]
    index: PatientIndex
    lengths: Sequence[int]
    plan: DPPlan
    pad_token_id: int


def _patient_steps(
    run: _PatientRun, private_loader: DataLoader[Any], losses: list[float]
) -> tuple[int, int]:
    """Patient-level DP-SGD steps; returns (steps taken, records seen)."""
    steps_taken = 0
    examples_seen = 0
    draws = patient_batches(private_loader)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while steps_taken < run.plan.steps:
            examples_seen += _patient_step(run, next(draws), losses)
            steps_taken += 1
    return steps_taken, examples_seen


def _patient_step(run: _PatientRun, sampled: list[int], losses: list[float]) -> int:
    """One patient-level DP-SGD step on the sampled patients; returns the records it used."""
    if not sampled:  # an empty draw still releases noise (see _dp_steps)
        _noise_only_step(run.optimizer)
        return 0
    chunks = physical_chunks(sampled, run.index, run.lengths, run.plan.max_physical_batch_size)
    gradients = PatientGradients(run.optimizer.params, len(sampled))
    step_loss, step_records = 0.0, 0
    for chunk in chunks:
        batch = collate_indexed([(r, run.features[r]) for r in chunk.rows], run.pad_token_id)
        rows = batch.pop(EXAMPLE_INDEX)
        if run.prefix:
            run.prefix.feed(rows, int(batch["input_ids"].shape[1]))
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with autocast_for(run.device):
            logits = run.model(**model_inputs(batch)).logits
            loss = run.criterion(logits, batch["labels"])
        loss.backward()
        gradients.add(chunk.slots)
        step_loss += float(loss.detach()) * len(chunk.rows)
        step_records += len(chunk.rows)
    gradients.hand_to_optimizer()
    run.optimizer.step()  # Opacus: clip each patient's row, add N(0, σ²C²), scale, step
    run.optimizer.zero_grad(set_to_none=True)
    losses.append(step_loss / step_records)
    return step_records


def _noise_only_step(private_optimizer: Any) -> None:
    """One DP-SGD step on an empty batch: zero clipped sum + N(0, σ²C²), then the optimizer.

    Zero per-example gradients (hooks, functorch) and a zero gradient (ghost clipping, which
    reads ``p.grad``): each Opacus optimizer then adds its noise to a zero sum."""
    for parameter in private_optimizer.params:
        parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
        parameter.grad = torch.zeros_like(parameter)
    private_optimizer.step()
    private_optimizer.zero_grad(set_to_none=True)


def _collate_or_empty(items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a Poisson batch; an empty draw becomes zero-row tensors the loop recognises."""
    if not items:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {
            "input_ids": empty, "attention_mask": empty, "labels": empty,
            EXAMPLE_INDEX: torch.zeros((0,), dtype=torch.long),
        }
    return collate_indexed(items, pad_token_id)


def _detach_opacus(private_model: Any) -> None:
    """Remove Opacus' hooks and per-sample buffers so the cached model is plain again."""
    close = getattr(private_model, "_close", None)
    if callable(close):
        close()
    for parameter in private_model.parameters():
        for attribute in ("grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(parameter, attribute):
                delattr(parameter, attribute)
