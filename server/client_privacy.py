"""The client-level (ε, δ) the coordinator reports: what the models reveal about a hospital.

Every round whose sum the coordinator computed is one Gaussian mechanism on that sum
(sensitivity C, noise std ≥ σ·C thanks to the hospitals' noise shares), with hospitals sampled
at the round's rate; the accountant composes them. Rounds are counted from the
`sum-revealed` events in metrics.jsonl, so a resumed run counts exactly what happened.
"""

from __future__ import annotations

from fedtune.core.client_dp import automatic_client_delta, client_level_epsilon
from fedtune.core.config import RunConfig


def client_level_guarantee(
    config: RunConfig, participation: list[int], connected: list[int]
) -> dict[str, float]:
    """Client-level (ε, δ) after the completed rounds, or {} when client-level DP is off.

    Each completed round is one Gaussian mechanism on the sum (sensitivity C, noise ≥ σ·C)
    with hospitals sampled at the round's rate; the accountant composes them.
    """
    privacy = config.privacy
    if not privacy.client_level or not participation:
        return {}
    total = max(connected)
    rate = min(1.0, max(p / max(c, 1) for p, c in zip(participation, connected, strict=True)))
    delta = privacy.client_target_delta or automatic_client_delta(total)
    sigma, rounds = privacy.client_noise_multiplier, len(participation)
    epsilon = client_level_epsilon(sigma, rate, rounds, delta, privacy.accountant)
    # The coordinator knows who was sampled: against it, sampling does not amplify privacy.
    known = (
        epsilon
        if rate >= 1.0
        else client_level_epsilon(sigma, 1.0, rounds, delta, privacy.accountant)
    )
    return {
        "epsilon": epsilon,
        "epsilon_vs_coordinator": known,
        "delta": delta,
        "noise_multiplier": sigma,
        "clip_norm": privacy.client_clip_norm,
        "sample_rate": rate,
        "rounds": float(rounds),
    }
