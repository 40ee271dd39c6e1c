"""A hospital's privacy decision for one round: its budget, its ledger, this round's σ.

The hospital's settings are the hospital's. The coordinator's `[privacy]` section is a
request; a node whose admin set `privacy-epsilon-budget` in its node configuration trains
with DP even if the coordinator asks for none, calibrates to the smaller of the two targets,
and refuses any round that would take its ledger past its budget.

σ is calibrated once per run, before the run's first round, so that the target holds after
the *last planned* round, counting every DP step already in the ledger (earlier runs on
the same data included); it is stored in the ledger so a restarted node keeps using it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.dp_train import DPPlan, poisson_sample_rate
from fedtune.client.hospital import HospitalIdentity
from fedtune.client.node_settings import NodeSettings, node_key
from fedtune.client.privacy_ledger import (
    PrivacyLedger,
    RunPlan,
    calibrate_noise_multiplier,
    read_ledger_file,
)
from fedtune.client.train import planned_steps
from fedtune.core.config import ConfigError, RunConfig, refuse_adapter_without_dp_support
from fedtune.core.privacy_accounting import default_delta


@dataclass(frozen=True)
class RoundPrivacy:
    """Everything the DP training of one round needs, decided before it starts."""

    ledger: PrivacyLedger
    budget: float
    plan: DPPlan
    run_id: str


def choose_delta(requested: float, num_units: int, unit: str, path: Path) -> float:
    """δ for this hospital: never at or above 1/n, whatever the coordinator requests.

    With the automatic δ, an existing ledger keeps the δ it was started with (under this
    rule or the older "just below 1/n" one), so a hospital whose data grows past a power of
    ten is not locked out of its own ledger; `fedtune ledger` says when it is weaker than
    today's default.
    """
    units = f"{num_units} training {unit}s"
    if requested:
        if requested >= 1.0 / max(num_units, 1):
            raise ConfigError(
                f"privacy.target_delta = {requested:g} is not below 1/n = "
                f"{1.0 / max(num_units, 1):g} for this hospital's {units}; such a δ would "
                f"allow one {unit} to be exposed outright. Ask the coordinator for a smaller "
                "privacy.target_delta (or 0 for automatic)."
            )
        return requested
    if path.exists():
        stored = read_ledger_file(path).delta
        if stored < 1.0 / max(num_units, 1):
            return stored
    return default_delta(num_units)


def ledger_path(config: RunConfig, identity: HospitalIdentity, node: NodeSettings) -> Path:
    """Where this hospital's ledger lives: its admin's choice, else next to the simulation data."""
    if node.privacy_ledger is not None:
        return node.privacy_ledger
    if not identity.simulated:
        raise ConfigError(
            f"DP is on but this node has no '{node_key('privacy_ledger')}' in its node "
            "configuration: set it to a file on the hospital's disk where the privacy ledger "
            "is kept."
        )
    folder = config.privacy.ledger_dir or str(Path(config.data.simulation_root) / "privacy-ledgers")
    return Path(folder) / f"{identity.name}.json"


@contextlib.contextmanager
def ledger_lock(
    identity: HospitalIdentity, config: RunConfig, node: NodeSettings
) -> Iterator[None]:
    """Exclusive lock on the hospital's ledger (a `.lock` file beside it); none without DP."""
    if not config.privacy.enabled and node.privacy_epsilon_budget is None:
        yield
        return
    path = ledger_path(config, identity, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def plan_round(
    config: RunConfig,
    identity: HospitalIdentity,
    node: NodeSettings,
    num_units: int,
    num_records: int,
    run_id: str,
) -> RoundPrivacy | None:
    """Decide this round's DP parameters, or None when neither side asks for DP.

    `num_units` counts what `privacy.unit` protects (training patients or training records)
    and sets δ. q = 1/⌈records / batch_size⌉ is the chance that each unit joins a step: with
    patients as the unit a step then holds batch_size records in expectation, so it costs
    what a record-level step costs, and `train.batch_size` means records either way.

    Raises PrivacyBudgetExhausted when the round would exceed the budget (nothing trains),
    and LedgerError when the ledger on disk cannot be trusted.
    """
    own_budget = node.privacy_epsilon_budget
    settings = config.privacy
    if not settings.enabled and own_budget is None:
        return None
    if settings.enabled and own_budget is not None:
        budget = min(settings.target_epsilon, own_budget)
    else:
        budget = own_budget if own_budget is not None else settings.target_epsilon
    why = "this hospital trains with DP" if own_budget is not None else "privacy.enabled = true"
    refuse_adapter_without_dp_support(config.adapter, settings.grad_sample_mode, why)
    if config.train.grad_accumulation != 1:
        raise ConfigError(
            "train.grad_accumulation must be 1 with DP: raise train.batch_size instead (DP "
            "batches are Poisson-sampled; privacy.max_physical_batch_size bounds memory)."
        )
    path = ledger_path(config, identity, node)
    delta = choose_delta(settings.target_delta, num_units, settings.unit, path)
    ledger = PrivacyLedger.open(path, identity.name, settings.accountant, delta, settings.unit)
    sample_rate = poisson_sample_rate(config.train.batch_size, num_records)
    steps = planned_steps(config.train, num_records)
    run_plan = ledger.plan(run_id)
    if run_plan is None:
        try:
            sigma = settings.noise_multiplier or calibrate_noise_multiplier(
                target_epsilon=budget,
                delta=ledger.delta,
                sample_rate=sample_rate,
                steps=steps * config.federation.rounds,
                accountant=settings.accountant,
                prior=ledger.history(),
            )
        except ValueError as exc:  # no σ can meet the target: the plan must change
            raise ConfigError(f"cannot plan this run within ε = {budget:g}: {exc}") from None
        run_plan = RunPlan(
            noise_multiplier=sigma, sample_rate=sample_rate, steps_per_round=steps,
            planned_rounds=config.federation.rounds, target_epsilon=budget,
            num_units=num_units,
        )
        ledger.set_plan(run_id, run_plan)
    ledger.check_budget(budget, run_plan.noise_multiplier, sample_rate, steps)
    plan = DPPlan(
        noise_multiplier=run_plan.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        grad_sample_mode=settings.grad_sample_mode,
        max_physical_batch_size=settings.max_physical_batch_size,
    )
    return RoundPrivacy(ledger=ledger, budget=budget, plan=plan, run_id=run_id)
