"""Server optimizers: FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2).

The example-weighted mean delta of a round is used as a pseudo-gradient

    Δ = Σ wᵢ·Δᵢ / Σ wᵢ        (Δᵢ = hospital i's local adapter − global adapter)

and the server keeps per-tensor moments across rounds. Δ points where the hospitals moved,
so the server *adds* the step. Per tensor x, with η = server_learning_rate:

    fedavgm     v ← β·v + Δ                               x ← x + η·v        (v₀ = 0)
    fedadagrad  m ← β₁·m + (1−β₁)·Δ;  v ← v + Δ²          x ← x + η·m/(√v + τ)
    fedadam     m ← β₁·m + (1−β₁)·Δ;  v ← β₂·v + (1−β₂)·Δ²
                                                           x ← x + η·m/(√v + τ)
    fedyogi     m ← β₁·m + (1−β₁)·Δ;  v ← v − (1−β₂)·Δ²·sign(v − Δ²)
                                                           x ← x + η·m/(√v + τ)

with m₀ = 0 and v₀ = τ² for the adaptive three and no bias correction, exactly as in the
paper (all operations elementwise; β = server_momentum). Only the aggregate (Σ wᵢΔᵢ, Σ wᵢ)
is used, so these run unchanged under secure aggregation.

Precision: Δ, the moments and the step are computed in float64 and the moments are *kept*
in float64 (so FedAdagrad's ever-growing sum does not lose small Δ² terms to float32
rounding, and a resumed run is bit-identical to an uninterrupted one); the new adapter is
cast to float32, the wire format. LoRA adapters are small, so the doubled memory is cheap.

Tensors of the global adapter that an aggregate does not cover (FFA-LoRA sends no LoRA A)
are returned unchanged and their moments are not touched (nor created). A round is applied
all or nothing: the moments are committed only once the new adapter is known to be finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedtune.core.adapters import Adapter, UpdateRejected, check_update
from fedtune.strategies.aggregate import AggregateUpdate, check_covers
from fedtune.strategies.state import check_meta, make_state

Moments = dict[str, np.ndarray]  # slot ("m", "v", "momentum") → float64 array


class ServerOptimizer:
    """Per-tensor moments and the all-or-nothing round; subclasses give the update rule."""

    name: str
    slots: ClassVar[tuple[str, ...]]

    def __init__(self, server_learning_rate: float) -> None:
        if server_learning_rate <= 0:
            raise ValueError("server_learning_rate must be > 0")
        self.server_learning_rate = server_learning_rate
        self.step = 0
        self._moments: dict[str, Moments] = {}  # tensor name → its moments

    def hyperparameters(self) -> dict[str, float]:
        """What a checkpoint must agree on to be resumed by this strategy."""
        return {"server_learning_rate": self.server_learning_rate}

    def _initial(self, shape: tuple[int, ...]) -> Moments:
        raise NotImplementedError

    def _updated(self, delta: np.ndarray, moments: Moments) -> Moments:
        raise NotImplementedError

    def _direction(self, moments: Moments) -> np.ndarray:
        raise NotImplementedError

    def apply(self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate) -> Adapter:
        """The next global adapter (float32, checked finite); commits the moments on success."""
        self._check_moments_fit(global_adapter)
        delta = update.mean_delta(np.float64)
        check_covers(delta, global_adapter)
        new_moments: dict[str, Moments] = {}
        changed: Adapter = {}
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite is refused just below
            for name, pseudo_gradient in delta.items():
                previous = self._moments.get(name) or self._initial(pseudo_gradient.shape)
                moments = self._updated(pseudo_gradient, previous)
                step = self.server_learning_rate * self._direction(moments)
                x = np.asarray(global_adapter[name], dtype=np.float64)
                changed[name] = (x + step).astype(np.float32)
                new_moments[name] = moments
        for name, moments in new_moments.items():
            for slot, value in moments.items():
                if not np.all(np.isfinite(value)):
                    raise UpdateRejected(
                        "the aggregate", f"{self.name} moment {slot} of {name} would be non-finite"
                    )
        new = {
            name: changed[name] if name in changed else np.array(value, np.float32, copy=True)
            for name, value in global_adapter.items()
        }
        check_update(new, global_adapter, hospital="the new global adapter")
        self._moments.update(new_moments)
        self.step += 1
        return new

    def _check_moments_fit(self, global_adapter: Mapping[str, np.ndarray]) -> None:
        """Moments for tensors this adapter lacks mean the state came from another run.

        A plain ValueError, not UpdateRejected: it is not this round's fault, and skipping
        rounds would not fix it.
        """
        misfits = sorted(
            name
            for name, moments in self._moments.items()
            if name not in global_adapter
            or next(iter(moments.values())).shape != np.shape(global_adapter[name])
        )
        if misfits:
            raise ValueError(
                f"{self.name} state holds moments for {len(misfits)} tensor(s) missing from or "
                f"shaped differently in the global adapter (first: {misfits[0]}); was the "
                "strategy state saved by another run?"
            )

    def state_dict(self) -> dict[str, Any]:
        """meta (name, step, hyperparameters, tensor names) + float64 arrays "<slot>/<tensor>"."""
        arrays = {
            f"{slot}/{name}": value
            for name, moments in self._moments.items()
            for slot, value in moments.items()
        }
        return make_state(
            self.name,
            self.step,
            self.hyperparameters(),
            arrays,
            tensors=sorted(self._moments),
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly; refuse another strategy, other hyperparameters or a torn state."""
        meta, arrays = check_meta(state, self.name, self.hyperparameters())
        tensors = meta.get("tensors", [])
        if not isinstance(tensors, list) or not all(isinstance(n, str) for n in tensors):
            raise ValueError(f"{self.name} checkpoint has an invalid tensor list")
        expected = {f"{slot}/{name}" for name in tensors for slot in self.slots}
        if set(arrays) != expected:
            missing = sorted(expected - set(arrays))
            extra = sorted(set(arrays) - expected)
            raise ValueError(
                f"{self.name} checkpoint arrays do not match its tensor names "
                f"(missing: {missing[:3]}, unexpected: {extra[:3]})"
            )
        restored: dict[str, Moments] = {}
        for name in tensors:
            moments = {slot: np.array(arrays[f"{slot}/{name}"], np.float64) for slot in self.slots}
            if len({value.shape for value in moments.values()}) != 1:
                raise ValueError(f"{self.name} checkpoint moments of {name} differ in shape")
            if not all(np.all(np.isfinite(value)) for value in moments.values()):
                raise ValueError(f"{self.name} checkpoint moments of {name} are not finite")
            restored[name] = moments
        self._moments = restored
        self.step = int(meta["step"])


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): v ← β·v + Δ; x ← x + η·v."""

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, server_learning_rate: float, server_momentum: float) -> None:
        super().__init__(server_learning_rate)
        _unit_interval("server_momentum", server_momentum)
        self.server_momentum = server_momentum

    def hyperparameters(self) -> dict[str, float]:
        return {**super().hyperparameters(), "server_momentum": self.server_momentum}

    def _initial(self, shape: tuple[int, ...]) -> Moments:
        return {"momentum": np.zeros(shape, np.float64)}

    def _updated(self, delta: np.ndarray, moments: Moments) -> Moments:
        return {"momentum": self.server_momentum * moments["momentum"] + delta}

    def _direction(self, moments: Moments) -> np.ndarray:
        return moments["momentum"]


class _Adaptive(ServerOptimizer):
    """m ← β₁·m + (1−β₁)·Δ; v by the subclass; x ← x + η·m/(√v + τ); m₀ = 0, v₀ = τ²."""

    slots = ("m", "v")

    def __init__(self, server_learning_rate: float, beta1: float, tau: float) -> None:
        super().__init__(server_learning_rate)
        _unit_interval("beta1", beta1)
        if tau <= 0:
            raise ValueError("tau must be > 0")
        self.beta1 = beta1
        self.tau = tau

    def hyperparameters(self) -> dict[str, float]:
        return {**super().hyperparameters(), "beta1": self.beta1, "tau": self.tau}

    def _initial(self, shape: tuple[int, ...]) -> Moments:
        return {"m": np.zeros(shape, np.float64), "v": np.full(shape, self.tau**2, np.float64)}

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _updated(self, delta: np.ndarray, moments: Moments) -> Moments:
        m = self.beta1 * moments["m"] + (1.0 - self.beta1) * delta
        v = self._second_moment(moments["v"], np.square(delta))
        return {"m": m, "v": v}

    def _direction(self, moments: Moments) -> np.ndarray:
        result: np.ndarray = moments["m"] / (np.sqrt(moments["v"]) + self.tau)
        return result


class FedAdagrad(_Adaptive):
    """v ← v + Δ²: the step shrinks for coordinates that kept moving."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return v + delta_squared


class _WithBeta2(_Adaptive):
    def __init__(self, server_learning_rate: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(server_learning_rate, beta1, tau)
        _unit_interval("beta2", beta2)
        self.beta2 = beta2

    def hyperparameters(self) -> dict[str, float]:
        return {**super().hyperparameters(), "beta2": self.beta2}


class FedAdam(_WithBeta2):
    """v ← β₂·v + (1−β₂)·Δ²: an exponential average of the squared pseudo-gradient."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_squared


class FedYogi(_WithBeta2):
    """v ← v − (1−β₂)·Δ²·sign(v − Δ²): like Adam, but v grows fast and shrinks slowly."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        result: np.ndarray = v - (1.0 - self.beta2) * delta_squared * np.sign(v - delta_squared)
        return result


def _unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
