"""FedAvg on adapter deltas (McMahan et al. 2017) with a server learning rate, and FedProx.

new_global = global + η · (Σ wᵢ·Δᵢ / Σ wᵢ). With η = 1 this is exactly the example-weighted
average of the hospitals' local adapters; η < 1 damps a round, η > 1 extrapolates.

The aggregate may cover only some of the global adapter's tensors (FFA-LoRA uploads only
the LoRA B matrices): those are updated, the others are returned unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtune.core.adapters import Adapter, apply_delta
from fedtune.strategies.aggregate import AggregateUpdate, check_covers
from fedtune.strategies.state import check_meta, make_state


def apply_delta_subset(
    global_: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], scale: float
) -> Adapter:
    """global + scale·delta on the tensors delta covers; the rest copied unchanged.

    Every new tensor is computed on a copy and checked finite (``apply_delta``) before the
    caller swaps the result in, exactly as for a full update.
    """
    check_covers(delta, global_)
    updated = apply_delta({name: global_[name] for name in delta}, delta, scale)
    return {
        name: updated[name] if name in updated else np.array(value, dtype=np.float32, copy=True)
        for name, value in global_.items()
    }


class FedAvg:
    """Stateless apart from a round counter: the weighted mean delta times η."""

    name = "fedavg"

    def __init__(self, server_learning_rate: float) -> None:
        if server_learning_rate <= 0:
            raise ValueError("server_learning_rate must be > 0")
        self.server_learning_rate = server_learning_rate
        self.step = 0

    def hyperparameters(self) -> dict[str, float]:
        """What a checkpoint must agree on to be resumed by this strategy."""
        return {"server_learning_rate": self.server_learning_rate}

    def apply(self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate) -> Adapter:
        """The next global adapter, computed on a copy and checked finite."""
        new = apply_delta_subset(global_adapter, update.mean_delta(), self.server_learning_rate)
        self.step += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        """No moments: the checkpoint is metadata only (``arrays`` is empty)."""
        return make_state(self.name, self.step, self.hyperparameters())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse the state of another strategy rather than silently mixing them."""
        meta, arrays = check_meta(state, self.name, self.hyperparameters())
        if arrays:
            raise ValueError(f"{self.name} keeps no arrays, but the checkpoint holds {len(arrays)}")
        self.step = int(meta.get("step", 0))


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): the server side is FedAvg.

    The proximal term μ/2·‖w − w_global‖² is added to each hospital's local loss; μ is
    recorded here only so that a checkpoint cannot be resumed under a different μ.
    """

    name = "fedprox"

    def __init__(self, server_learning_rate: float, proximal_mu: float) -> None:
        super().__init__(server_learning_rate)
        if proximal_mu < 0:
            raise ValueError("proximal_mu must be >= 0")
        self.proximal_mu = proximal_mu

    def hyperparameters(self) -> dict[str, float]:
        return {**super().hyperparameters(), "proximal_mu": self.proximal_mu}
