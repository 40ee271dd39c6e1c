"""Strategies by config name. An unknown name is an error listing the known ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from fedtune.adapters import Adapter
from fedtune.config import FederationSettings
from strategies.aggregate import AggregateUpdate
from strategies.fedavg import FedAvg


class Strategy(Protocol):
    """What the coordinator needs from a strategy: the sum in, the next adapter out."""

    name: str

    def apply(
        self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate
    ) -> Adapter: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


_BUILDERS: dict[str, Callable[[FederationSettings], Strategy]] = {
    "fedavg": lambda settings: FedAvg(settings.server_learning_rate),
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
