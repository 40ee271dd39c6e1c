"""The weighted sum of hospital deltas: the only thing a strategy ever sees.

Strategies receive (Σ wᵢ·Δᵢ, Σ wᵢ) — never a list of individual deltas — so the same
strategy code runs unchanged whether the sum was computed in clear (here) or recovered by
secure aggregation, where the coordinator cannot see any single Δᵢ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from fedtune.core.adapters import Adapter, UpdateRejected, check_update


@dataclass(frozen=True)
class AggregateUpdate:
    """Σ wᵢ·Δᵢ over the hospitals of one round and Σ wᵢ (wᵢ = number of training examples)."""

    weighted_delta_sum: Adapter
    weight_sum: float
    num_hospitals: int

    def mean_delta(self, dtype: DTypeLike = np.float32) -> Adapter:
        """The FedAvg direction: the example-weighted mean of the hospitals' deltas.

        float32 is the wire format; the server optimizers ask for float64 so that the
        pseudo-gradient is not rounded once more before it enters their moments.
        """
        if self.weight_sum <= 0:
            raise ValueError("cannot average: the total weight of the round is zero")
        return {
            name: (np.asarray(total, dtype=dtype) / self.weight_sum).astype(dtype)
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


def check_covers(update: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> None:
    """Refuse an aggregate that is not a non-empty subset of the global adapter's tensors.

    A subset is legitimate (FFA-LoRA uploads only the B matrices; the others stay as they
    are), but a tensor the global adapter lacks, a wrong shape or a NaN is not: refused
    before any tensor or optimizer moment changes.
    """
    if not update:
        raise UpdateRejected("the aggregate", "it holds no tensors")
    extra = sorted(set(update) - set(global_))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UpdateRejected("the aggregate", f"unexpected tensors {shown}")
    check_update(update, {name: global_[name] for name in update}, hospital="the aggregate")
