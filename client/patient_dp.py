"""Patient-level DP-SGD: each step samples patients and clips each patient's whole gradient.

A patient with k records, trained record by record, is protected only at about k·ε. Here the
unit of the privacy analysis is the patient: every step Poisson-samples *patients* (each joins
independently with probability q; q = 1/⌈records / batch_size⌉, so a step holds batch_size
records on average and costs what a record-level step costs), the per-example gradients
Opacus computes for all of a sampled patient's records are summed into one gradient per
patient, that sum is clipped to
`max_grad_norm`, and Gaussian noise N(0, σ²C²) is added to the sum of the clipped patient
gradients. Adding or removing one patient therefore changes the pre-noise sum by at most C,
which is exactly the sampled Gaussian mechanism the accountant composes (with q_patients).

Opacus' own per-sample gradients (hooks or functorch) do the per-example work; this module
only regroups rows by patient before Opacus' DPOptimizer clips, noises and steps. Physical
batches hold whole patients where they fit; a patient with more records than one physical
batch holds is spread over several, and its rows are summed across them before clipping, so
no patient is ever clipped twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PatientIndex:
    """Which training rows belong to each patient (patients numbered 0..P-1)."""

    rows_of: tuple[tuple[int, ...], ...]

    @classmethod
    def from_patients(cls, patients: Sequence[int]) -> PatientIndex:
        """Group row positions by the patient number of each training row."""
        if not patients:
            raise ValueError("patient-level DP needs at least one training record")
        count = max(patients) + 1
        rows: list[list[int]] = [[] for _ in range(count)]
        for row, patient in enumerate(patients):
            rows[patient].append(row)
        if any(not group for group in rows):
            raise ValueError("patients must be numbered 0..P-1 with every number used")
        return cls(tuple(tuple(group) for group in rows))

    @property
    def num_patients(self) -> int:
        """P: the population the sampling rate q is over."""
        return len(self.rows_of)


@dataclass(frozen=True)
class Chunk:
    """One physical batch: training rows and, for each, its position among the step's patients."""

    rows: tuple[int, ...]
    slots: tuple[int, ...]


def physical_chunks(
    sampled: Sequence[int], index: PatientIndex, lengths: Sequence[int], limit: int
) -> list[Chunk]:
    """Pack the sampled patients' rows into physical batches of at most `limit` rows.

    Patients are packed whole, in order of their records' mean length, so a batch is padded
    to lengths close to its own; a patient larger than `limit` takes several batches of its
    own. `slots[i]` is the sampled patient (0..len(sampled)-1) that row `rows[i]` belongs to.
    """
    if limit < 1:
        raise ValueError("a physical batch holds at least one record")

    def mean_length(slot: int) -> float:
        rows = index.rows_of[sampled[slot]]
        return sum(lengths[r] for r in rows) / len(rows)

    chunks: list[Chunk] = []
    rows: list[int] = []
    slots: list[int] = []
    for slot in sorted(range(len(sampled)), key=mean_length):
        patient_rows = sorted(index.rows_of[sampled[slot]], key=lengths.__getitem__)
        if len(rows) + len(patient_rows) > limit and rows:
            chunks.append(Chunk(tuple(rows), tuple(slots)))
            rows, slots = [], []
        for row in patient_rows:
            if len(rows) == limit:
                chunks.append(Chunk(tuple(rows), tuple(slots)))
                rows, slots = [], []
            rows.append(row)
            slots.append(slot)
    if rows:
        chunks.append(Chunk(tuple(rows), tuple(slots)))
    return chunks


class PatientGradients:
    """Per-patient sums of Opacus' per-example gradients, accumulated over physical batches."""

    def __init__(self, params: Sequence[torch.nn.Parameter], num_sampled: int) -> None:
        self.params = list(params)
        self.sums = [
            torch.zeros((num_sampled, *p.shape), dtype=torch.float32, device=p.device)
            for p in self.params
        ]

    def add(self, slots: Sequence[int]) -> None:
        """Add this physical batch's `p.grad_sample` rows to their patients' sums, then drop
        them (so Opacus starts the next batch afresh instead of keeping a list)."""
        for param, total in zip(self.params, self.sums, strict=True):
            sample = param.grad_sample  # type: ignore[attr-defined]
            if sample is None or isinstance(sample, list):
                raise RuntimeError("expected one per-example gradient tensor per batch")
            where = torch.as_tensor(list(slots), device=total.device)
            total.index_add_(0, where, sample.to(device=total.device, dtype=torch.float32))
            param.grad_sample = None  # type: ignore[attr-defined]

    def hand_to_optimizer(self) -> None:
        """Put the per-patient sums where Opacus' DPOptimizer clips per row: one row = one
        patient, so clipping, noise and scaling are Opacus' own, per patient."""
        for param, total in zip(self.params, self.sums, strict=True):
            param.grad_sample = total.to(param.dtype)  # type: ignore[attr-defined]


def patient_batches(private_loader: Any) -> Iterator[list[int]]:
    """The Poisson draws of patients, epoch after epoch, for as many steps as asked."""
    while True:
        yielded = False
        for sampled in private_loader:
            yielded = True
            yield [int(patient) for patient in sampled]
        if not yielded:  # an empty loader would spin forever
            raise RuntimeError("the patient sampler produced no batch")


def patient_loader(
    num_patients: int, sample_rate: float, generator: torch.Generator
) -> torch.utils.data.DataLoader[Any]:
    """A loader whose batches are Poisson draws over patient numbers (Opacus' sampler).

    Opacus reads the expected batch size (q·P patients: what it divides the noisy sum by)
    from it; its items are patient numbers, which `physical_chunks` turns into records.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return torch.utils.data.DataLoader(
        list(range(num_patients)),  # type: ignore[arg-type]
        batch_sampler=UniformWithReplacementSampler(
            num_samples=num_patients, sample_rate=sample_rate, generator=generator
        ),
        collate_fn=list,
    )
