"""Strategies by config name. An unknown name is an error listing the known ones.

fedavg, fedprox and ffa-lora are FedAvg on the server (FedProx's proximal term and
FFA-LoRA's frozen A live at the hospitals); fedavgm, fedadagrad, fedadam and fedyogi are the
server optimizers of Reddi et al. (2021), see ``strategies.server_optimizers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from fedtune.core.adapters import Adapter
from fedtune.core.config import FederationSettings
from fedtune.strategies.aggregate import AggregateUpdate
from fedtune.strategies.fedavg import FedAvg, FedProx
from fedtune.strategies.ffa_lora import FFALoRA
from fedtune.strategies.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi


class Strategy(Protocol):
    """What the coordinator needs from a strategy: the sum in, the next adapter out."""

    name: str

    def apply(
        self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate
    ) -> Adapter: ...

    def state_dict(self) -> dict[str, Any]:
        """{"meta": JSON-able, "arrays": {key: float64 ndarray}}; see strategies.state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


_BUILDERS: dict[str, Callable[[FederationSettings], Strategy]] = {
    "fedavg": lambda s: FedAvg(s.server_learning_rate),
    "fedprox": lambda s: FedProx(s.server_learning_rate, s.proximal_mu),
    "ffa-lora": lambda s: FFALoRA(s.server_learning_rate),
    "fedavgm": lambda s: FedAvgM(s.server_learning_rate, s.server_momentum),
    "fedadagrad": lambda s: FedAdagrad(s.server_learning_rate, s.beta1, s.tau),
    "fedadam": lambda s: FedAdam(s.server_learning_rate, s.beta1, s.beta2, s.tau),
    "fedyogi": lambda s: FedYogi(s.server_learning_rate, s.beta1, s.beta2, s.tau),
}


class UnknownStrategy(ValueError):
    """The config names a strategy that does not exist."""


def known_strategies() -> list[str]:
    """Names accepted in `federation.strategy`."""
    return sorted(_BUILDERS)


def build_strategy(settings: FederationSettings) -> Strategy:
    """The strategy named in the federation settings."""
    try:
        builder = _BUILDERS[settings.strategy]
    except KeyError:
        raise UnknownStrategy(
            f"federation.strategy = {settings.strategy!r} is not known; "
            f"known strategies: {', '.join(known_strategies())}."
        ) from None
    return builder(settings)
