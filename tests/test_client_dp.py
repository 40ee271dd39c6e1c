"""Client-level DP for secure aggregation: noise shares, clipping, norm bound, accounting.

Statistical checks use fixed sample sizes and a 6-sigma margin: the sample std of n normals
has relative standard error ≈ 1/√(2n), so with n = 400,000 the margin is 0.67 %: wrong noise
scales (σC/t instead of σC/√t, a missing share, …) fail by far more, and the checks do not
flake (a 6-sigma miss has probability ~2e-9).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedtune.core import client_dp
from fedtune.core.client_dp import (
    ClientDPPlan,
    aggregate_noise_std,
    aggregate_norm_bound,
    automatic_client_delta,
    calibrate_client_noise,
    client_level_epsilon,
    clip_and_noise,
)
from fedtune.core.secagg.fixed_point import FixedPointCodec

SIZE = 400_000
MARGIN = 6 / math.sqrt(2 * SIZE)  # 6 standard errors of a sample std, relative


def assert_std(sample: np.ndarray, expected: float) -> None:
    measured = float(np.std(sample))
    assert abs(measured / expected - 1) < MARGIN, (measured, expected)


def shares(plan: ClientDPPlan, hospitals: int, size: int = SIZE) -> list[np.ndarray]:
    """Each hospital's output for a zero delta: its noise share alone."""
    return [clip_and_noise(np.zeros(size), plan)[0] for _ in range(hospitals)]


# --- noise shares --------------------------------------------------------------------------


def test_plan_share_std_and_bound():
    plan = ClientDPPlan(clip_norm=2.0, noise_multiplier=1.5, min_survivors=4)
    assert plan.share_std == pytest.approx(1.5)  # σC/√t = 3/2
    assert plan.coordinate_bound() == pytest.approx(2.0 + 10 * 1.5)
    assert aggregate_noise_std(plan, 4) == pytest.approx(3.0)
    assert aggregate_noise_std(plan, 9) == pytest.approx(3.0 * 1.5)
    assert math.isclose(client_dp.TRUNCATION_PROBABILITY, 1.5239706e-23, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0},
        {"clip_norm": math.inf},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": math.nan},
        {"min_survivors": 0},
        {"min_survivors": 2.0},
        {"min_survivors": True},
    ],
)
def test_plan_rejects_bad_values(kwargs):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_survivors": 2, **kwargs}
    with pytest.raises(ValueError):
        ClientDPPlan(**args)


def test_sum_of_threshold_shares_has_target_std():
    plan = ClientDPPlan(clip_norm=0.5, noise_multiplier=1.3, min_survivors=3)
    total = np.sum(shares(plan, 3), axis=0)
    assert_std(total, plan.noise_multiplier * plan.clip_norm)
    assert abs(float(np.std(total)) / 0.65 - 1) < 0.01


def test_sum_of_more_shares_has_more_noise():
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=0.8, min_survivors=2)
    total = np.sum(shares(plan, 5), axis=0)
    assert_std(total, 0.8 * math.sqrt(5 / 2))
    assert aggregate_noise_std(plan, 5) == pytest.approx(0.8 * math.sqrt(5 / 2))


def test_any_dropout_pattern_at_or_above_threshold_keeps_target_noise():
    """5 hospitals, threshold 3: every surviving subset of ≥ 3 carries std ≥ σC; fewer
    than 3 would be under-noised, which is why secure aggregation must abort that round."""
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.1, min_survivors=3)
    target = plan.noise_multiplier * plan.clip_norm
    outputs = shares(plan, 5)
    for count in range(1, 6):
        for survivors in itertools.combinations(range(5), count):
            total = np.sum([outputs[i] for i in survivors], axis=0)
            measured = float(np.std(total))
            assert_std(total, aggregate_noise_std(plan, count))
            if count >= plan.min_survivors:
                assert measured > target * (1 - MARGIN)
            else:
                assert measured < target * (1 - MARGIN)  # √(2/3) ≈ 0.82 of target at most


def test_noise_is_zero_mean():
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=2)
    noise = shares(plan, 1)[0]
    assert abs(float(np.mean(noise))) < 6 * plan.share_std / math.sqrt(SIZE)
    assert_std(noise, plan.share_std)


def test_noise_ignores_numpy_global_state():
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=2)
    delta = np.ones(1000)
    np.random.seed(0)
    expected_next = np.random.random()
    np.random.seed(0)
    first, _, _ = clip_and_noise(delta, plan)
    assert np.random.random() == expected_next  # the global stream was neither used nor moved
    np.random.seed(0)
    second, _, _ = clip_and_noise(delta, plan)
    assert not np.allclose(first, second)  # no seed reproduces it


def test_noise_is_seeded_by_the_os_csprng(monkeypatch):
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=2)
    monkeypatch.setattr(client_dp.secrets, "randbits", lambda bits: 12345)
    first, _, _ = clip_and_noise(np.zeros(100), plan)
    second, _, _ = clip_and_noise(np.zeros(100), plan)
    np.testing.assert_array_equal(first, second)


# --- clipping and truncation ----------------------------------------------------------------


def fixed_noise(monkeypatch, seed: int = 7) -> None:
    monkeypatch.setattr(client_dp, "_generator", lambda: np.random.default_rng(seed))


def test_long_delta_is_scaled_to_the_clip_norm(monkeypatch):
    plan = ClientDPPlan(clip_norm=2.0, noise_multiplier=0.5, min_survivors=2)
    fixed_noise(monkeypatch)
    delta = np.random.default_rng(1).normal(size=5000) * 3  # norm ≈ 212
    out, clipped, truncated = clip_and_noise(delta, plan)
    noise = np.random.default_rng(7).normal(0.0, plan.share_std, size=delta.size)
    before_noise = out - noise
    assert clipped and not truncated
    assert np.linalg.norm(before_noise) == pytest.approx(2.0, rel=1e-9)
    np.testing.assert_allclose(before_noise, delta * 2.0 / np.linalg.norm(delta), rtol=1e-9)


def test_short_delta_is_untouched(monkeypatch):
    plan = ClientDPPlan(clip_norm=2.0, noise_multiplier=0.5, min_survivors=2)
    fixed_noise(monkeypatch)
    delta = np.full(100, 0.1)  # norm 1.0
    out, clipped, truncated = clip_and_noise(delta, plan)
    noise = np.random.default_rng(7).normal(0.0, plan.share_std, size=delta.size)
    assert not clipped and not truncated
    np.testing.assert_allclose(out - noise, delta, rtol=0, atol=1e-12)


def test_extreme_noise_is_clamped_and_reported(monkeypatch):
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=4)

    class Extreme:
        def normal(self, loc, scale, size):
            noise = np.zeros(size)
            noise[3], noise[5] = 13 * scale, -50 * scale  # C + 10·scale = 6 < 6.5
            return noise

    monkeypatch.setattr(client_dp, "_generator", Extreme)
    out, clipped, truncated = clip_and_noise(np.zeros(10), plan)
    assert truncated and not clipped
    assert out[3] == plan.coordinate_bound() and out[5] == -plan.coordinate_bound()


@pytest.mark.parametrize("delta", [np.zeros((3, 3)), np.array([1.0, np.nan])])
def test_rejects_non_flat_or_non_finite_deltas(delta):
    with pytest.raises(ValueError):
        clip_and_noise(delta, ClientDPPlan(1.0, 1.0, 2))


def test_outputs_fit_the_fixed_point_codec():
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=3)
    codec = FixedPointCodec(clip_norm=plan.coordinate_bound(), max_weight=1, num_hospitals=4)
    rng = np.random.default_rng(3)
    outputs = [clip_and_noise(rng.normal(size=2000) * 5, plan)[0] for _ in range(4)]
    assert all(np.max(np.abs(out)) <= plan.coordinate_bound() for out in outputs)
    ring = np.zeros(2000, dtype=np.uint32)
    for out in outputs:
        ring += codec.encode(out)  # uint32 addition wraps mod 2^32, as the masks do
    decoded = codec.decode_sum(ring, hospitals=4)
    np.testing.assert_allclose(decoded, np.sum(outputs, axis=0), atol=codec.error_bound(4))


# --- the coordinator's norm check -----------------------------------------------------------


def test_norm_bound_holds_for_honest_sums_and_catches_an_unclipped_delta():
    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, min_survivors=3)
    hospitals, size = 6, 2000
    rng = np.random.default_rng(11)
    for _ in range(50):
        survivors = int(rng.integers(plan.min_survivors, hospitals + 1))
        # Worst case for the sum: long deltas (all clipped) pointing the same way.
        direction = rng.normal(size=size)
        deltas = [direction * rng.uniform(0.1, 20) + rng.normal(size=size) * 0.01]
        deltas += [rng.normal(size=size) * rng.uniform(0.001, 1) for _ in range(survivors - 1)]
        total = np.sum([clip_and_noise(d, plan)[0] for d in deltas], axis=0)
        assert np.linalg.norm(total) <= aggregate_norm_bound(plan, survivors, size)

    for survivors in (plan.min_survivors, hospitals):
        cheat = rng.choice([-1.0, 1.0], size=size) * 100 * plan.clip_norm / math.sqrt(size)
        # Every coordinate fits the codec: only the norm check can catch it.
        assert np.max(np.abs(cheat)) < plan.coordinate_bound()
        honest = [clip_and_noise(rng.normal(size=size), plan)[0] for _ in range(survivors - 1)]
        total = cheat + np.sum(honest, axis=0)
        assert np.linalg.norm(total) > aggregate_norm_bound(plan, survivors, size)


# --- accounting -----------------------------------------------------------------------------


def test_epsilon_decreases_with_noise_and_grows_with_rounds_and_sample_rate():
    eps = [client_level_epsilon(s, 0.1, 50, 1e-5) for s in (0.6, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4
    eps = [client_level_epsilon(1.0, 0.1, r, 1e-5) for r in (1, 10, 100, 1000)]
    assert eps == sorted(eps) and len(set(eps)) == 4
    eps = [client_level_epsilon(1.0, q, 20, 1e-5) for q in (0.01, 0.1, 0.5, 1.0)]
    assert eps == sorted(eps) and len(set(eps)) == 4


@pytest.mark.parametrize(
    ("sigma", "q", "rounds", "delta"),
    [(1.0, 1.0, 4, 1e-2), (2.0, 0.1, 100, 1e-5), (0.8, 0.5, 30, 1e-3)],
)
def test_epsilon_matches_opacus_rdp_accountant(sigma, q, rounds, delta):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    expected = accountant.get_epsilon(delta=delta)
    assert client_level_epsilon(sigma, q, rounds, delta) == pytest.approx(expected, rel=1e-9)


def test_both_accountants_bound_the_exact_gaussian_epsilon():
    """σ = 1, every hospital every round, 4 rounds: a Gaussian mechanism with μ = √4/σ = 2,
    whose exact ε at δ = 1e-2 solves Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) = δ (ε ≈ 5.998)."""
    mu, delta = 2.0, 1e-2

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    low, high = 0.0, 50.0
    for _ in range(200):
        eps = (low + high) / 2
        if phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) > delta:
            low = eps
        else:
            high = eps
    exact = high
    assert exact == pytest.approx(5.998, abs=1e-3)
    rdp = client_level_epsilon(1.0, 1.0, 4, delta, "rdp")
    prv = client_level_epsilon(1.0, 1.0, 4, delta, "prv")
    assert exact <= prv <= exact * 1.01  # PRV is nearly exact
    assert prv < rdp <= exact * 1.2  # RDP is looser (6.93)


@pytest.mark.parametrize(
    ("target", "q", "rounds", "delta", "accountant"),
    [(2.0, 1.0, 10, 1e-2, "rdp"), (8.0, 0.2, 50, 1e-3, "rdp"), (4.0, 1.0, 20, 1e-2, "prv")],
)
def test_calibration_round_trips(target, q, rounds, delta, accountant):
    sigma = calibrate_client_noise(target, q, rounds, delta, accountant)
    eps = client_level_epsilon(sigma, q, rounds, delta, accountant)
    assert eps <= target
    assert eps > 0.97 * target
    assert client_level_epsilon(sigma / 1.003, q, rounds, delta, accountant) > target


@pytest.mark.parametrize(
    "args",
    [(0.0, 1.0, 4, 1e-2), (1.0, 0.0, 4, 1e-2), (1.0, 1.5, 4, 1e-2), (1.0, 1.0, 0, 1e-2),
     (1.0, 1.0, 4, 0.0), (1.0, 1.0, 4, 1.0)],
)
def test_epsilon_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        client_level_epsilon(*args)
    with pytest.raises(ValueError):
        client_level_epsilon(1.0, 1.0, 4, 1e-2, accountant="gdp?")


def test_automatic_delta_is_the_largest_power_of_ten_below_one_over_n():
    assert [automatic_client_delta(n) for n in (1, 5, 9, 10, 11, 99, 100, 250)] == [
        0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001,
    ]
    for n in range(1, 3000):
        delta = automatic_client_delta(n)
        assert delta < 1 / n <= delta * 10 * (1 + 1e-12)
        assert math.log10(delta) == pytest.approx(round(math.log10(delta)))
    with pytest.raises(ValueError):
        automatic_client_delta(0)
