"""Client-level (hospital-level) differential privacy that works under secure aggregation.

DP-FedAvg (McMahan et al., ICLR 2018) with the Gaussian noise *distributed* over the
hospitals: the coordinator only ever sees the masked sum, so it cannot add the noise itself,
and no single hospital may be trusted to add all of it. Instead every hospital

1. clips its whole adapter delta to L2 norm C and uses weight 1, so the presence of its delta
   moves the sum by at most C (the sensitivity);
2. adds its *share* of Gaussian noise, N(0, (σ·C)²/t) per coordinate, before masking.

Secure aggregation aborts a round with fewer than t survivors (t = its threshold), so every
released sum is over s ≥ t hospitals and carries noise of variance s·(σC)²/t ≥ (σC)²: a
Gaussian mechanism with noise multiplier at least σ, however many hospitals dropped out.
Below t the noise would fall under target, which is one more reason such a round must abort.

What ε means here (the accountants' add/remove analysis with sensitivity C):
- **Zero-out adjacency.** The released sums are nearly as likely whether a hospital sent its
  real delta or a zero delta. Who took part is not hidden (the coordinator knows every
  round's survivors); what is protected is what the hospital's data contributed. Swapping one
  hospital's data for another's is two such changes (group privacy: 2ε).
- **Honest survivors.** Survivors that collude with the coordinator can subtract their own
  shares. To tolerate c colluders, size the shares for t − c survivors (`min_survivors`).
- **Sampling.** `sample_rate` q < 1 amplifies privacy only against observers who do not know
  which hospitals were sampled (e.g. whoever receives the final adapter). The coordinator
  does know; against it, account with q = 1 over the rounds the hospital took part in.
- **Floating point.** Like Opacus without `secure_mode`, the noise is floating-point
  Gaussian; the fixed-point encoding's unbiased rounding (≤ s/scale per coordinate) comes on
  top. Neither is covered by the formal analysis, which is of the real-valued mechanism.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedtune.core.privacy_accounting import calibrate_noise_multiplier, compute_epsilon
from fedtune.core.secagg.fixed_point import clip_to_norm

# Noise is clamped at this many share standard deviations beyond the clip norm.
TRUNCATION_SIGMAS = 10.0
# P(|N(0, 1)| > 10) = erfc(10/√2) ≈ 1.52e-23: the chance one coordinate's noise is clamped.
# For a hospital's whole delta it is at most size × this (union bound): 1.5e-14 for 10⁹
# parameters. The released sum differs from the untruncated Gaussian mechanism only on that
# event, so truncation costs at most size × hospitals × rounds × 1.52e-23 of extra δ.
TRUNCATION_PROBABILITY = math.erfc(TRUNCATION_SIGMAS / math.sqrt(2))
# ‖N(0, τ²·I_d)‖ ≤ τ·(√d + k) except with probability exp(−k²/2) (Gaussian concentration of
# the 1-Lipschitz norm): k = 8 gives 1.3e-14, so an honest sum is refused about never.
NORM_TAIL_SIGMAS = 8.0
NORM_TAIL_PROBABILITY = math.exp(-(NORM_TAIL_SIGMAS**2) / 2)


@dataclass(frozen=True)
class ClientDPPlan:
    """How each hospital clips and noises its delta so that any ≥ t survivors' sum is DP."""

    clip_norm: float  # C: each hospital's delta is clipped to this L2 norm (its sensitivity)
    noise_multiplier: float  # σ: the noise in a released sum has std ≥ σ·C per coordinate
    min_survivors: int  # t: shares are sized so that t of them already make σ·C

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip norm must be a positive number, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise multiplier must be a positive number, got {self.noise_multiplier}"
            )
        _check_count("min_survivors", self.min_survivors)

    @property
    def share_std(self) -> float:
        """σ·C/√t: t independent shares add up to variance (σC)², the target."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_survivors)

    def coordinate_bound(self) -> float:
        """C + 10·share_std: a bound on every coordinate of a clipped, noised delta.

        A clipped delta has |xᵢ| ≤ C, and its noise exceeds 10 share stds with probability
        erfc(10/√2) ≈ 1.5e-23 per coordinate (`TRUNCATION_PROBABILITY`); the rare excess is
        clamped. Use it as the fixed-point codec's `clip_norm` (with `max_weight` = 1).
        """
        return self.clip_norm + TRUNCATION_SIGMAS * self.share_std


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")


def _generator() -> np.random.Generator:
    """A fresh generator seeded by the OS CSPRNG: never numpy's global state, never the
    run's seed (which the coordinator knows and could use to regenerate the noise)."""
    return np.random.default_rng(secrets.randbits(128))


def clip_and_noise(delta: np.ndarray, plan: ClientDPPlan) -> tuple[np.ndarray, bool, bool]:
    """A hospital's flat delta → (clipped delta + its noise share, was_clipped, was_truncated).

    The delta is scaled down to L2 norm C if longer (never up), then N(0, share_std²) noise is
    added to every coordinate and each coordinate is clamped to ±`coordinate_bound()`, so the
    result always fits the fixed-point codec. `was_truncated` reports a clamp, which honest
    noise causes with probability ≤ size × 1.5e-23 (see `TRUNCATION_PROBABILITY`).
    """
    values = np.asarray(delta, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"the delta must be a flat vector, got shape {values.shape}")
    clipped = clip_to_norm(values, plan.clip_norm)  # refuses NaN / infinite values
    noised = clipped.vector + _generator().normal(0.0, plan.share_std, size=values.shape)
    bound = plan.coordinate_bound()
    truncated = bool(values.size) and float(np.max(np.abs(noised))) > bound
    if truncated:
        noised = np.clip(noised, -bound, bound)
    return noised, clipped.clipped, truncated


def aggregate_noise_std(plan: ClientDPPlan, survivors: int) -> float:
    """σC·√(s/t): the noise std per coordinate of the sum of `survivors` hospitals' shares.

    It is ≥ σC exactly when s ≥ t; for fewer survivors the sum is under-noised and must not
    be released (secure aggregation aborts such a round anyway).
    """
    _check_count("survivors", survivors)
    return plan.noise_multiplier * plan.clip_norm * math.sqrt(survivors / plan.min_survivors)


def aggregate_norm_bound(plan: ClientDPPlan, survivors: int, size: int) -> float:
    """s·C + aggregate_noise_std·(√size + 8): what honest hospitals' sum stays below.

    The clipped deltas add at most s·C (triangle inequality); the summed noise is
    N(0, τ²·I_size) with τ = `aggregate_noise_std`, whose norm exceeds τ·(√size + 8) with
    probability ≤ exp(−32) ≈ 1.3e-14. A longer sum means that a hospital ignored its clip: the
    coordinator refuses it. (A decoded fixed-point sum may additionally be off by the codec's
    `error_bound(s)` per coordinate; a caller comparing decoded sums adds error_bound·√size.)
    """
    _check_count("size", size)
    noise = aggregate_noise_std(plan, survivors)
    return survivors * plan.clip_norm + noise * (math.sqrt(size) + NORM_TAIL_SIGMAS)


def client_level_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε at the hospital level after `rounds` rounds of the distributed Gaussian mechanism.

    Each round releases a sum with noise std ≥ σ·C and sensitivity C, each hospital taking
    part with probability q = `sample_rate` (Poisson; 1.0 = every hospital every round): the
    subsampled Gaussian mechanism, composed over rounds by Opacus's RDP or PRV accountant.
    See the module docstring for the adjacency, and why q < 1 does not help against the
    coordinator.
    """
    with np.errstate(divide="ignore"):  # Opacus's PRV takes log(1 − q) = log 0 at q = 1
        return compute_epsilon([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def calibrate_client_noise(
    target_epsilon: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The smallest σ (to ~0.1 %, rounded up) with `client_level_epsilon` ≤ target."""
    with np.errstate(divide="ignore"):  # as in client_level_epsilon
        return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, rounds, accountant)


def automatic_client_delta(total_hospitals: int) -> float:
    """The largest power of ten strictly below 1/N, for N hospitals: 10 → 1e-2, 9 → 1e-1.

    δ bounds the chance that the guarantee fails outright; a mechanism that publishes one
    random hospital's delta in the clear is (0, 1/N)-DP, so δ must be below 1/N to mean
    anything. "Strictly below" rules out δ = 1/N itself when N is a power of ten, and is the
    same rule each hospital applies to its own records (README, sample-level DP). With few
    hospitals this δ is large (0.1 for 5 hospitals): pass a smaller one when that matters.
    """
    _check_count("total_hospitals", total_hospitals)
    # 10^k > N ≥ 10^(k-1) for k = the number of decimal digits of N: exact, no float log.
    return 10.0 ** -len(str(total_hospitals))
