"""The weighted sum of hospital deltas: the only thing a strategy ever sees.

Strategies receive (Σ wᵢ·Δᵢ, Σ wᵢ) — never a list of individual deltas — so the same
strategy code runs unchanged whether the sum was computed in clear (here) or recovered by
secure aggregation, where the coordinator cannot see any single Δᵢ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.adapters import Adapter


@dataclass(frozen=True)
class AggregateUpdate:
    """Σ wᵢ·Δᵢ over the hospitals of one round and Σ wᵢ (wᵢ = number of training examples)."""

    weighted_delta_sum: Adapter
    weight_sum: float
    num_hospitals: int

    def mean_delta(self) -> Adapter:
        """The FedAvg direction: the example-weighted mean of the hospitals' deltas."""
        if self.weight_sum <= 0:
            raise ValueError("cannot average: the total weight of the round is zero")
        return {
            name: (total / self.weight_sum).astype(np.float32)
            for name, total in self.weighted_delta_sum.items()
        }


def weighted_sum(
    deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> AggregateUpdate:
    """Sum wᵢ·Δᵢ in float64 (no precision loss from summation order), returned as float32."""
    if not deltas:
        raise ValueError("no hospital updates to aggregate")
    if len(deltas) != len(weights):
        raise ValueError("one weight per delta is required")
    if any(w <= 0 for w in weights):
        raise ValueError("hospital weights must be positive")
    names = list(deltas[0])
    totals = {name: np.zeros(deltas[0][name].shape, dtype=np.float64) for name in names}
    for delta, weight in zip(deltas, weights, strict=True):
        for name in names:
            totals[name] += float(weight) * delta[name].astype(np.float64)
    return AggregateUpdate(
        weighted_delta_sum={n: t.astype(np.float32) for n, t in totals.items()},
        weight_sum=float(sum(weights)),
        num_hospitals=len(deltas),
    )
