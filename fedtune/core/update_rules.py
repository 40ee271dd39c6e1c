"""How a hospital's update is shaped before it leaves, decided once for both sides.

The hospital and the coordinator must agree on which tensors travel (FFA-LoRA sends no LoRA
A), on each hospital's weight (its example count, or 1 under client-level DP so that one
hospital's influence on the sum is bounded), on the fixed-point codec of secure aggregation
and on the norm an honest sum can have. Deriving all of it from the run configuration in
one place keeps the two sides from drifting apart.
"""

from __future__ import annotations

import numpy as np

from fedtune.core.adapters import Adapter
from fedtune.core.client_dp import ClientDPPlan, aggregate_norm_bound
from fedtune.core.config import RunConfig
from fedtune.core.secagg.fixed_point import FixedPointCodec
from fedtune.core.uploads import uploaded_tensors


def client_dp_plan(config: RunConfig) -> ClientDPPlan | None:
    """Client-level DP settings, with noise shares sized for the fewest survivors allowed."""
    privacy = config.privacy
    if not privacy.client_level:
        return None
    # Client-level DP requires secure aggregation (RunConfig refuses it otherwise): shares
    # are sized so that any `threshold` survivors carry the full noise.
    threshold = config.secure_aggregation.threshold
    return ClientDPPlan(privacy.client_clip_norm, privacy.client_noise_multiplier, threshold)


def uploaded(adapter: Adapter, config: RunConfig) -> Adapter:
    """The tensors a hospital sends (and the coordinator expects) under this strategy."""
    return uploaded_tensors(adapter, config.federation.strategy)


def update_weight(config: RunConfig, num_examples: int) -> int:
    """A hospital's weight in the sum: its training examples (capped), or 1 under client DP."""
    if config.privacy.client_level:
        return 1
    return min(num_examples, config.secure_aggregation.max_weight)


def secure_codec(config: RunConfig, hospitals: int) -> FixedPointCodec:
    """The fixed-point codec for `hospitals` masked inputs under this configuration."""
    plan = client_dp_plan(config)
    if plan is not None:
        return FixedPointCodec(plan.coordinate_bound(), 1, hospitals)
    secure = config.secure_aggregation
    return FixedPointCodec(secure.clip_norm, secure.max_weight, hospitals)


def honest_sum_norm_bound(
    config: RunConfig, survivors: int, weight_sum: float, size: int, rounding: float
) -> float | None:
    """The largest ‖Σ wᵢΔᵢ‖ hospitals that clipped can produce (None: nothing is clipped).

    A larger sum means some hospital ignored its clip (or its payload was corrupted): the
    coordinator refuses it rather than let one hospital dominate the round.
    """
    plan = client_dp_plan(config)
    if plan is not None:
        return aggregate_norm_bound(plan, survivors, size) + rounding * float(np.sqrt(size))
    if config.secure_aggregation.enabled:
        clip = config.secure_aggregation.clip_norm
        return clip * weight_sum + rounding * float(np.sqrt(size))
    return None
