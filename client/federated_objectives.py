"""What a federated strategy changes in a hospital's local training (FedProx, FFA-LoRA).

- **FedProx** (Li et al. 2020): the local objective is loss + μ/2·‖w − w_global‖² over the
  adapter's trainable weights, w_global being the adapter loaded at the start of the round.
  Its gradient μ·(w − w_global) is added to each parameter's ``.grad`` by a step pre-hook on
  the underlying torch optimizer, i.e. right before the update. Under Opacus that is *after*
  per-example clipping and noise: the term does not depend on any patient's data, so it costs
  no privacy — and a term added to the loss would be silently dropped, because Opacus replaces
  ``.grad`` by the clipped per-example gradients of the modules. Without DP the hook is the
  same update as adding the term to the loss.
- **FFA-LoRA** (Sun et al. 2024): every LoRA A matrix stays at the shared initial values; only
  B (and saved heads such as a classifier) trains. A is frozen before the optimizer (and
  Opacus) are built, so neither gradients nor DP noise ever reach it, and unfrozen afterwards:
  the model object is cached and reused by rounds with other strategies. Every hospital also
  checks that the coordinator's A matrices are the shared initial ones, rebuilt locally from
  the run's seed (`check_shared_lora_a`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.errors import SharedInitMismatch

LORA_A_MARKER = ".lora_A."


@dataclass(frozen=True)
class LocalObjective:
    """How local training departs from plain loss minimization; built by `local_objective`."""

    proximal_mu: float = 0.0  # FedProx: weight μ of μ/2·‖w − w_global‖² (0 = none)
    freeze_lora_a: bool = False  # FFA-LoRA: LoRA A matrices are not trained

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0.0:  # also refuses NaN
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")


def local_objective(config: RunConfig) -> LocalObjective | None:
    """The local objective the run's strategy asks for; None means plain training."""
    federation = config.federation
    if federation.strategy == "fedprox" and federation.proximal_mu > 0.0:
        return LocalObjective(proximal_mu=federation.proximal_mu)
    if federation.strategy == "ffa-lora":
        return LocalObjective(freeze_lora_a=True)
    return None


def is_lora_a(name: str) -> bool:
    """True for LoRA A matrices, in parameter names and adapter (state-dict) names alike."""
    return LORA_A_MARKER in name


@contextlib.contextmanager
def objective_in_effect(
    model: torch.nn.Module,
    objective: LocalObjective | None,
    make_optimizer: Callable[[], torch.optim.Optimizer],
) -> Iterator[Any]:
    """Build the local optimizer with the objective applied; undo everything on exit.

    FFA-LoRA: A is frozen *before* `make_optimizer` runs (so the optimizer, and Opacus after
    it, only see B and saved heads) and requires_grad is restored afterwards. FedProx: the
    proximal gradient is added by a pre-step hook on the returned (torch) optimizer, anchored
    at the parameters' values now. With None this only calls `make_optimizer`.
    """
    frozen: list[torch.nn.Parameter] = []
    handle = None
    try:
        if objective is not None and objective.freeze_lora_a:
            for name, parameter in model.named_parameters():
                if is_lora_a(name) and parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen.append(parameter)
            if not frozen:
                raise ValueError("ffa-lora: the model has no trainable LoRA A matrices to freeze")
        optimizer = make_optimizer()
        if objective is not None and objective.proximal_mu > 0.0:
            handle = add_proximal_term(optimizer, objective.proximal_mu)
        yield optimizer
    finally:
        if handle is not None:
            handle.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)


def add_proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> Any:
    """Add μ·(w − w_anchor) to every parameter's gradient right before each optimizer step.

    w_anchor is each parameter's value now (the global adapter at the start of the round).
    Register it on the torch optimizer that Opacus wraps, never on the DPOptimizer: Opacus
    calls the wrapped optimizer's step after clipping, noise and scaling, and only on real
    (not skipped) logical steps. Returns the hook's handle (``.remove()``).
    """
    anchors: list[tuple[torch.Tensor, torch.Tensor]] = [
        (parameter, parameter.detach().clone())
        for group in optimizer.param_groups
        for parameter in group["params"]
    ]

    def proximal_gradient(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for parameter, anchor in anchors:
                pull = parameter.detach() - anchor
                if parameter.grad is None:
                    parameter.grad = pull.mul_(mu)
                else:
                    parameter.grad.add_(pull.to(parameter.grad.dtype), alpha=mu)

    return optimizer.register_step_pre_hook(proximal_gradient)


# ---- FFA-LoRA: the shared initial A matrices ------------------------------------------------

_shared_a_cache: dict[str, dict[str, np.ndarray]] = {}
_shared_a_lock = threading.Lock()


def shared_lora_a(config: RunConfig) -> dict[str, np.ndarray]:
    """The round-0 A matrices for this run, rebuilt locally exactly as the coordinator does.

    Cached per configuration (JSON) for the life of the process. The global random state is
    left as it was (the coordinator's builder seeds the global generator).
    """
    key = config.to_json()
    with _shared_a_lock:
        cached = _shared_a_cache.get(key)
        if cached is None:
            from fedtune.core.initial_adapter import initial_global_adapter  # heavy: the base model

            with torch.random.fork_rng(devices=[]):
                initial = initial_global_adapter(config)
            cached = {name: value for name, value in initial.items() if is_lora_a(name)}
            _shared_a_cache[key] = cached
    return cached


def check_shared_lora_a(global_adapter: Adapter, config: RunConfig) -> None:
    """Under ffa-lora, refuse a global adapter whose A matrices are not the shared initial ones.

    FFA-LoRA's guarantees (exact aggregation of B, noise only on B) rest on every hospital
    using the same fixed A. A coordinator that changed A — by mistake, another seed or
    another model — would have hospitals train B for a different A. No-op for other
    strategies (their A trains and moves every round).
    """
    if config.federation.strategy != "ffa-lora":
        return
    expected = shared_lora_a(config)
    received = {name for name in global_adapter if is_lora_a(name)}
    missing = sorted(set(expected) - received)
    extra = sorted(received - set(expected))
    if missing or extra:
        first = (missing or extra)[0]
        raise SharedInitMismatch(
            "ffa-lora: the coordinator's adapter does not have the LoRA A matrices this "
            f"hospital builds from the run's model and seed (first difference: {first}, "
            f"{len(missing)} missing, {len(extra)} unexpected). Check that the coordinator "
            "and this hospital use the same base model, LoRA settings and train.seed; "
            "this hospital will not train on it."
        )
    for name in sorted(expected):
        value = np.asarray(global_adapter[name])
        reference = expected[name]
        if value.shape != reference.shape or not np.array_equal(
            value.astype(np.float32, copy=False), reference
        ):
            raise SharedInitMismatch(
                "ffa-lora: the coordinator's LoRA A matrix "
                f"{name} differs from the shared initial one that this hospital rebuilt "
                f"from train.seed = {config.train.seed}. Under ffa-lora A must never change; "
                "the coordinator's adapter was modified, or it uses another base model, "
                "LoRA settings, seed or library version. This hospital will not train on it."
            )
