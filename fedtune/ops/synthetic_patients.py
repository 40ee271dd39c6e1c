"""Synthetic patients for generated hospital files: several diagnoses per patient, skewed.

Real hospital exports hold many lines per patient (diagnoses, notes, visits): most patients
have one or two, a few have a dozen or more. Simulated hospitals must look the same, or
patient-level DP (`privacy.unit = "patient"`) would be measured on data where it costs
nothing. Lines per patient follow a truncated power law, P(k) ∝ k^-1.8 for k = 1..30
(mean ≈ 3 lines, about 60 % of patients with a single line, a tail beyond 10), and the
lines are shuffled so a patient's records are scattered through the file as in an export.
"""

from __future__ import annotations

import random

MAX_LINES_PER_PATIENT = 30
SKEW = 1.8


def synthetic_patient_ids(lines: int, seed: str, prefix: str) -> list[str]:
    """A patient id for each of `lines` lines (same arguments, same ids)."""
    if lines < 0:
        raise ValueError("the number of lines cannot be negative")
    rng = random.Random(f"fedtune-patients/{seed}")
    sizes = list(range(1, MAX_LINES_PER_PATIENT + 1))
    weights = [size**-SKEW for size in sizes]
    ids: list[str] = []
    patient = 0
    while len(ids) < lines:
        (count,) = rng.choices(sizes, weights)
        ids += [f"{prefix}-{patient:05d}"] * count
        patient += 1
    ids = ids[:lines]
    rng.shuffle(ids)
    return ids
