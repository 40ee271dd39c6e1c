"""Which connected hospitals take part in a round.

Cross-silo federations usually train with every hospital every round (fraction 1.0, the
default). Sampling a subset per round lowers each hospital's load and, under client-level
DP, amplifies privacy (the accountant uses the sampling rate). The draw is seeded by the
run's seed and the round number over the sorted node ids: the same nodes give the same
sample (Flower's simulation engine gives nodes new random ids per run, so a resumed
simulation may sample differently; metrics.jsonl records who was asked, by name).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedtune.core.config import FederationSettings


def hospitals_for_round(
    node_ids: Sequence[int], settings: FederationSettings, seed: int, server_round: int
) -> list[int]:
    """A sorted sample of node ids: the configured count or fraction, never below minimum."""
    available = sorted(node_ids)
    count = round_size(settings, len(available))
    if count == len(available):
        return available
    rng = random.Random(f"fedtune-sampling/{seed}/{server_round}")
    return sorted(rng.sample(available, count))


def round_size(settings: FederationSettings, connected: int) -> int:
    """How many hospitals a round asks when `connected` are available."""
    if settings.hospitals_per_round > 0:
        count = settings.hospitals_per_round
    else:
        count = math.ceil(settings.fraction_hospitals * connected)
    return min(connected, max(count, settings.min_hospitals))
