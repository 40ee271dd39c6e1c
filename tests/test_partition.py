"""Virtual-hospital partitioners: every example placed once, skew as asked, reproducible."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.simulations.partition import (
    PARTITION_METHODS,
    Partition,
    PartitionError,
    format_partition_summary,
    label_histograms,
    label_skew,
    make_partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_quantity,
    partition_summary,
)

N = 2000
NUM_LABELS = 10
NUM_KEYS = 12


def synthetic_pool(n: int = N, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Labels with uneven (Zipf-like) frequencies and keys (e.g. chapters) over the pool."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, NUM_LABELS + 1)
    label_ids = rng.choice(NUM_LABELS, size=n, p=weights / weights.sum())
    key_weights = rng.uniform(0.5, 2.0, size=NUM_KEYS)
    key_ids = rng.choice(NUM_KEYS, size=n, p=key_weights / key_weights.sum())
    labels = [f"label-{i}" for i in label_ids]
    keys = [f"chapter-{i:02d}" for i in key_ids]
    return labels, keys


LABELS, KEYS = synthetic_pool()


def assert_exact_cover(partition: Partition, n: int, num_hospitals: int) -> None:
    assert len(partition.hospitals) == num_hospitals
    flat = [i for hospital in partition.hospitals for i in hospital]
    assert len(flat) == n, "an example was duplicated or dropped"
    assert sorted(flat) == list(range(n))
    for hospital in partition.hospitals:
        assert list(hospital) == sorted(hospital)
        assert all(type(i) is int for i in hospital)
    assert sum(partition.sizes()) == n


@pytest.mark.parametrize("method", PARTITION_METHODS)
@pytest.mark.parametrize("num_hospitals", [1, 3, 7])
def test_every_method_assigns_every_example_exactly_once(method: str, num_hospitals: int):
    partition = make_partition(
        method, num_hospitals=num_hospitals, seed=3, labels=LABELS, keys=KEYS, alpha=0.3
    )
    assert partition.method == method
    assert partition.seed == 3
    assert_exact_cover(partition, N, num_hospitals)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_skew(alpha: float) -> float:
        return statistics.mean(
            label_skew(partition_dirichlet(LABELS, 5, alpha, seed), LABELS) for seed in range(5)
        )

    high, mid, low = mean_skew(100.0), mean_skew(1.0), mean_skew(0.1)
    assert high < mid < low
    assert high < 0.1
    assert low > 0.4


def test_iid_is_close_to_the_pool_and_sizes_differ_by_at_most_one():
    for n, hospitals in [(N, 7), (10, 3), (5, 5), (1, 1)]:
        sizes = partition_iid(n, hospitals, seed=0).sizes()
        assert max(sizes) - min(sizes) <= 1
        assert sum(sizes) == n
    assert label_skew(partition_iid(N, 5, seed=0), LABELS) < 0.1


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_partition_different_seed_different(method: str):
    def make(seed: int) -> Partition:
        return make_partition(method, num_hospitals=5, seed=seed, labels=LABELS, alpha=0.5)

    assert make(11) == make(11)
    assert make(11).hospitals != make(12).hospitals


def test_natural_is_reproducible_and_the_seed_only_breaks_ties():
    assert partition_natural(KEYS, 4, seed=1) == partition_natural(KEYS, 4, seed=1)
    # Equal-sized groups: their order (hence placement) depends on the seed.
    tied = [f"k{i}" for i in range(6) for _ in range(10)]
    placements = {partition_natural(tied, 4, seed=s).hospitals for s in range(10)}
    assert len(placements) > 1


def coefficient_of_variation(sizes: list[int]) -> float:
    return statistics.pstdev(sizes) / statistics.mean(sizes)


def test_quantity_sizes_spread_more_at_small_alpha_and_respect_min_examples():
    def mean_cv(alpha: float) -> float:
        return statistics.mean(
            coefficient_of_variation(partition_quantity(N, 8, alpha, seed, min_examples=5).sizes())
            for seed in range(5)
        )

    assert mean_cv(0.1) > mean_cv(100.0)
    assert mean_cv(100.0) < 0.2
    for seed in range(20):
        sizes = partition_quantity(N, 8, 0.05, seed, min_examples=5).sizes()
        assert min(sizes) >= 5
        assert sum(sizes) == N
    # The minimum is met even when it uses up the whole pool.
    assert partition_quantity(20, 4, 0.01, seed=0, min_examples=5).sizes() == [5, 5, 5, 5]


def test_quantity_keeps_labels_iid():
    partition = partition_quantity(N, 4, 1.0, seed=2, min_examples=100)
    assert label_skew(partition, LABELS) < 0.1


def test_dirichlet_respects_min_examples():
    for seed in range(5):
        sizes = partition_dirichlet(LABELS, 10, 0.05, seed, min_examples=20).sizes()
        assert min(sizes) >= 20


def test_natural_keeps_each_key_at_one_hospital_and_balances_sizes():
    partition = partition_natural(KEYS, 4, seed=0)
    assert_exact_cover(partition, N, 4)
    owner: dict[str, int] = {}
    for hospital, indices in enumerate(partition.hospitals):
        for key in {KEYS[i] for i in indices}:
            assert key not in owner, f"{key} split across hospitals {owner[key]} and {hospital}"
            owner[key] = hospital
    assert set(owner) == set(KEYS)
    sizes = partition.sizes()
    largest_group = max(KEYS.count(k) for k in set(KEYS))
    assert max(sizes) - min(sizes) <= largest_group
    assert max(sizes) / min(sizes) < 1.5


def test_natural_with_as_many_hospitals_as_keys_gives_one_key_each():
    partition = partition_natural(KEYS, NUM_KEYS, seed=0)
    assert [len({KEYS[i] for i in h}) for h in partition.hospitals] == [1] * NUM_KEYS


def test_natural_needs_at_least_one_key_per_hospital():
    with pytest.raises(PartitionError, match=r"12 distinct keys for 13 hospitals"):
        partition_natural(KEYS, NUM_KEYS + 1, seed=0)


def test_natural_needs_keys_matching_the_labels():
    with pytest.raises(PartitionError, match="needs keys"):
        make_partition("natural", num_hospitals=3, seed=0, labels=LABELS)
    with pytest.raises(PartitionError, match="same pool"):
        make_partition("natural", num_hospitals=3, seed=0, labels=LABELS, keys=KEYS[:-1])


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(PartitionError) as excinfo:
        make_partition("shards", num_hospitals=3, seed=0, labels=LABELS)
    message = str(excinfo.value)
    assert "shards" in message
    for method in PARTITION_METHODS:
        assert method in message


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["dirichlet", "quantity"])
def test_alpha_must_be_positive(method: str, alpha: float):
    with pytest.raises(PartitionError, match="alpha"):
        make_partition(method, num_hospitals=3, seed=0, labels=LABELS, alpha=alpha)


@pytest.mark.parametrize("num_hospitals", [0, -2, N + 1])
def test_number_of_hospitals_must_fit_the_pool(num_hospitals: int):
    with pytest.raises(PartitionError, match="hospitals"):
        make_partition("iid", num_hospitals=num_hospitals, seed=0, labels=LABELS)


def test_impossible_min_examples_is_a_clear_error():
    with pytest.raises(PartitionError, match=r"min_examples=300.*3000"):
        partition_quantity(N, 10, 1.0, seed=0, min_examples=300)
    with pytest.raises(PartitionError, match=r"min_examples=300"):
        partition_dirichlet(LABELS, 10, 1.0, seed=0, min_examples=300)


def test_dirichlet_gives_up_with_a_message_naming_alpha_hospitals_and_minimum():
    # One label only: with tiny alpha one hospital gets (nearly) everything on every draw.
    labels = ["a"] * 100
    with pytest.raises(PartitionError) as excinfo:
        partition_dirichlet(labels, 5, 0.001, seed=0, min_examples=10)
    message = str(excinfo.value)
    assert "alpha=0.001" in message
    assert "5 hospitals" in message
    assert "min_examples=10" in message


def test_label_histograms_and_skew_bounds():
    partition = partition_dirichlet(LABELS, 4, 0.5, seed=0)
    histograms = label_histograms(partition, LABELS)
    assert len(histograms) == 4
    for hist, indices in zip(histograms, partition.hospitals, strict=True):
        assert list(hist) == sorted(hist)
        assert sum(hist.values()) == len(indices)
    assert 0.0 <= label_skew(partition, LABELS) <= 1.0
    # Disjoint single-label hospitals of equal size: TV distance 1 - 1/2 = 0.5 each.
    split = Partition("natural", 0, ((0, 1), (2, 3)))
    assert label_skew(split, ["a", "a", "b", "b"]) == pytest.approx(0.5)
    with pytest.raises(PartitionError, match="labels"):
        label_histograms(split, ["a", "a"])


def test_summary_is_json_able_counts_sum_to_n_and_formats_every_hospital():
    long_labels = [label + " of the circulatory and respiratory systems" for label in LABELS]
    partition = partition_dirichlet(long_labels, 6, 0.3, seed=4)
    summary = partition_summary(partition, long_labels)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["method"] == "dirichlet"
    assert summary["seed"] == 4
    assert summary["label_skew"] == pytest.approx(label_skew(partition, long_labels), abs=1e-6)
    assert sum(h["examples"] for h in summary["hospitals"]) == N
    assert sum(sum(h["labels"].values()) for h in summary["hospitals"]) == N
    text = format_partition_summary(summary, max_labels=3)
    lines = text.splitlines()
    assert len(lines) == 2 + 6
    assert "dirichlet" in lines[0] and "seed 4" in lines[0]
    for k in range(1, 7):
        assert any(line.startswith(f"hospital-{k} ") for line in lines)
    assert all(len(line) < 200 for line in lines)
    assert "circulatory and respiratory" not in text  # long names are truncated
    assert "+" in text  # more labels than shown are counted


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=300),
    hospitals=st.integers(min_value=1, max_value=12),
    alpha=st.floats(min_value=1e-3, max_value=1e3),
    method=st.sampled_from(PARTITION_METHODS),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    num_labels=st.integers(min_value=1, max_value=8),
)
def test_property_every_example_assigned_exactly_once(
    n: int, hospitals: int, alpha: float, method: str, seed: int, num_labels: int
):
    hospitals = min(hospitals, n)
    labels = [f"l{(i * 7) % num_labels}" for i in range(n)]
    keys = [f"k{i % max(hospitals, 3)}" for i in range(n)]
    partition = make_partition(
        method,
        num_hospitals=hospitals,
        seed=seed,
        labels=labels,
        keys=keys,
        alpha=alpha,
        min_examples=0,
    )
    assert_exact_cover(partition, n, hospitals)
