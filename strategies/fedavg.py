"""FedAvg on adapter deltas (McMahan et al. 2017) with a server learning rate.

new_global = global + η · (Σ wᵢ·Δᵢ / Σ wᵢ). With η = 1 this is exactly the example-weighted
average of the hospitals' local adapters; η < 1 damps a round, η > 1 extrapolates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtune.adapters import Adapter, apply_delta
from strategies.aggregate import AggregateUpdate


class FedAvg:
    """Stateless: the weighted mean of the deltas, scaled by the server learning rate."""

    name = "fedavg"

    def __init__(self, server_learning_rate: float) -> None:
        if server_learning_rate <= 0:
            raise ValueError("server_learning_rate must be > 0")
        self.server_learning_rate = server_learning_rate

    def apply(self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate) -> Adapter:
        """The next global adapter, computed on a copy and checked finite."""
        return apply_delta(global_adapter, update.mean_delta(), self.server_learning_rate)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no state between rounds; the checkpoint records its name only."""
        return {"strategy": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse the state of another strategy rather than silently mixing them."""
        if state.get("strategy") != self.name:
            raise ValueError(f"checkpoint holds state of {state.get('strategy')!r}, not fedavg")
