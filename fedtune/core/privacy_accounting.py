"""Privacy accounting math: ε of a DP-SGD history, and σ calibrated for a target ε.

Pure functions over (noise_multiplier, sample_rate, steps) groups, evaluated with Opacus'
accountants; the ledger (client.privacy_ledger) is the stateful record that feeds them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

ACCOUNTANTS = ("rdp", "prv")
# Calibration search range for σ. Above MAX_NOISE the update is pure noise: the hospital needs
# more examples (smaller q) or fewer rounds, not more noise.
MIN_NOISE, MAX_NOISE = 1e-2, 1e3
# Relative precision of the σ search; the result is always the side that satisfies ε ≤ target.
CALIBRATION_PRECISION = 1e-3

History = Sequence[tuple[float, float, int]]


class PrivacyBudgetExhausted(RuntimeError):
    """Training one more round would take the hospital past its ε budget."""

    def __init__(self, spent: float, budget: float, next_epsilon: float) -> None:
        self.spent, self.budget, self.next_epsilon = spent, budget, next_epsilon
        super().__init__(
            f"privacy budget exhausted (ε spent {spent:.3f} / ε budget {budget:.3f}; "
            f"the next round would reach {next_epsilon:.3f})"
        )


def check_step_group(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be a positive number, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number ≥ 1, got {steps!r}")


def compute_epsilon(history: History, delta: float, accountant: str) -> float:
    """ε after all (noise_multiplier, sample_rate, steps) groups in `history`, composed.

    Consecutive groups with the same σ and q are merged, exactly as Opacus's own `step()`
    builds its history, so the result equals an accountant that was driven step by step
    (and PRV, whose cost grows with the number of groups, stays fast).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown privacy accountant {accountant!r}; known: {ACCOUNTANTS}")
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        check_step_group(sigma, q, steps)
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((float(sigma), float(q), int(steps)))
    if not merged:
        return 0.0
    # Imported here: opacus pulls in torch (~2 s); importing this module stays cheap.
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = merged
    with warnings.catch_warnings():
        # RDP says when its best order is the largest tried: the ε it returns is still a
        # valid upper bound (only possibly loose), so hospital logs need not show it.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon = float(opacus_accountant.get_epsilon(delta=delta))
    # With very large noise and a large δ the RDP conversion can dip below zero; ε = 0 is
    # then the tightest meaningful statement (any ε at or above the bound holds).
    return max(0.0, epsilon)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: History = (),
) -> float:
    """Smallest σ (to ~0.1 %) so that `prior` plus `steps` more steps stays within ε target.

    Less noise means a better model, so we want the smallest σ; the search keeps the bracket
    `ε(low) > target ≥ ε(high)` and returns `high`, so rounding can only add privacy.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target ε must be a positive number, got {target_epsilon}")
    check_step_group(1.0, sample_rate, steps)  # σ is what we search for; check q and steps
    spent = compute_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExhausted(spent, target_epsilon, spent)

    def epsilon_with(sigma: float) -> float:
        return compute_epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    # Bracket the answer, ε(low) > target ≥ ε(high), starting from the common σ = 1.
    low, high = 0.0, 1.0
    if epsilon_with(high) <= target_epsilon:
        low = high / 2
        while epsilon_with(low) <= target_epsilon:
            if low <= MIN_NOISE:
                return low  # so generous a budget that almost no noise is needed
            high, low = low, low / 2
    else:
        while True:
            if high >= MAX_NOISE:
                raise ValueError(
                    f"even noise multiplier σ={MAX_NOISE:g} cannot keep ε ≤ {target_epsilon:g} "
                    f"(δ={delta:g}) for {steps} more steps at sample rate {sample_rate:g}; "
                    "the hospital needs more training examples or fewer rounds/steps."
                )
            low, high = high, min(high * 2, MAX_NOISE)
            if epsilon_with(high) <= target_epsilon:
                break
    while high / low - 1 > CALIBRATION_PRECISION:
        middle = math.sqrt(low * high)
        if epsilon_with(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def default_delta(num_units: int) -> float:
    """The largest power of ten at or below 1/(10·n), n counting patients or records.

    δ is the chance that the guarantee fails outright; with δ just under 1/n about one of the
    n patients could in expectation be exposed (n = 999 and δ = 1e-3 give n·δ = 0.999).
    1/(10·n) keeps that expectation at or below 0.1. Exact in integers: δ = 10^-k with
    10^(k-1) the smallest power of ten at or above n.
    """
    power = 0
    while 10**power < max(num_units, 1):
        power += 1
    return float(10.0 ** -(power + 1))
