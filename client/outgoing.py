"""What a hospital does to its delta before it leaves: keep the uploaded tensors, clip, noise.

The same preparation runs whether the delta is then masked (secure aggregation) or sent in
clear, so the two modes differ only in transport. Without client-level DP the delta is
clipped to `secure_aggregation.clip_norm` (secure mode: the fixed-point range depends on it)
and weighted by the caller; with client-level DP it is clipped to `privacy.client_clip_norm`
and carries this hospital's share of the Gaussian noise (weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.core.adapters import Adapter
from fedtune.core.client_dp import clip_and_noise
from fedtune.core.config import RunConfig
from fedtune.core.secagg.encoding import flatten, unflatten
from fedtune.core.secagg.fixed_point import clip_to_norm
from fedtune.core.update_rules import client_dp_plan, uploaded


@dataclass(frozen=True)
class PreparedUpdate:
    """The values to send (flat, layout order of the uploaded tensors) and what was done."""

    values: np.ndarray  # float64: weight × (clipped delta [+ noise share])
    reference: Adapter  # the uploaded part of the global adapter (layout)
    metrics: dict[str, float]

    def as_adapter(self) -> Adapter:
        return unflatten(self.values, self.reference)


def prepare_update(
    delta: Adapter, global_adapter: Adapter, config: RunConfig, weight: int
) -> PreparedUpdate:
    """Uploaded tensors of the delta, clipped (and noised under client-level DP), weighted."""
    reference = uploaded(global_adapter, config)
    flat = flatten(uploaded(delta, config), reference)
    plan = client_dp_plan(config)
    if plan is not None:
        noisy, clipped, truncated = clip_and_noise(flat, plan)
        metrics = {"delta-clipped": float(clipped), "noise-truncated": float(truncated),
                   "client-dp": 1.0}
        return PreparedUpdate(noisy * weight, reference, metrics)
    if config.secure_aggregation.enabled:
        clip = clip_to_norm(flat, config.secure_aggregation.clip_norm)
        return PreparedUpdate(
            clip.vector * weight, reference, {"delta-clipped": float(clip.clipped)}
        )
    return PreparedUpdate(flat * weight, reference, {})
