"""Split a pooled dataset into virtual hospitals for research simulations.

Real hospitals never hold identically distributed data: a cardiology centre sees different
diagnoses than a paediatric one (label skew), a university hospital has far more records
than a rural clinic (quantity skew), and a specialty owns whole groups of cases (natural
split). Federated methods are only worth comparing under such heterogeneity, so these
partitioners recreate it from one pooled dataset, on purpose and measurably.

Every partitioner is seeded with ``numpy.random.default_rng(seed)`` so a simulation can be
re-run exactly (research reproducibility; nothing here is a security control). Pure Python
and numpy only, so partitions can be made and inspected without torch or Flower.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PARTITION_METHODS",
    "Partition",
    "PartitionError",
    "format_partition_summary",
    "label_histograms",
    "label_skew",
    "make_partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "partition_quantity",
    "partition_summary",
]

PARTITION_METHODS = ("iid", "dirichlet", "quantity", "natural")

# Dirichlet label skew can leave a hospital (nearly) empty; resampling a bounded number of
# times keeps the result deterministic for a seed and fails clearly instead of looping.
_DIRICHLET_MAX_TRIES = 100
_LABEL_WIDTH = 24


class PartitionError(ValueError):
    """A partition cannot be made as asked; message says why and what to change."""


@dataclass(frozen=True)
class Partition:
    """Which pooled examples each virtual hospital holds.

    ``hospitals[k]`` are the sorted indices into the pool held by hospital ``k + 1``; sorted
    so that two partitions compare equal exactly when they assign the same examples, and so
    a hospital's data keeps the pool's order. ``method`` and ``seed`` are kept so a result
    table can say how its hospitals were made and the split can be reproduced.
    """

    method: str
    seed: int
    hospitals: tuple[tuple[int, ...], ...]

    def sizes(self) -> list[int]:
        """Examples per hospital, in hospital order (quantity skew at a glance)."""
        return [len(indices) for indices in self.hospitals]


# ---- validation ----------------------------------------------------------------------------


def _check_hospitals(num_examples: int, num_hospitals: int) -> None:
    """Every hospital must be able to hold at least one example, or the split is meaningless."""
    if num_examples < 1:
        raise PartitionError("the pool is empty: give at least one example to partition")
    if num_hospitals < 1:
        raise PartitionError(f"num_hospitals must be at least 1, got {num_hospitals}")
    if num_hospitals > num_examples:
        raise PartitionError(
            f"{num_hospitals} hospitals cannot share only {num_examples} examples: "
            "use fewer hospitals or more data"
        )


def _check_alpha(alpha: float) -> None:
    """A Dirichlet concentration must be a positive finite number."""
    try:
        valid = math.isfinite(float(alpha)) and float(alpha) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise PartitionError(
            f"alpha must be a positive finite number, got {alpha!r}: smaller alpha "
            "(e.g. 0.1) means more skew, larger alpha (e.g. 100) means nearly IID"
        )


def _check_min_examples(num_examples: int, num_hospitals: int, min_examples: int) -> None:
    """Fail early when the minimum per hospital cannot be met by any split."""
    if min_examples < 0:
        raise PartitionError(f"min_examples must be 0 or more, got {min_examples}")
    if num_hospitals * min_examples > num_examples:
        raise PartitionError(
            f"{num_hospitals} hospitals with at least min_examples={min_examples} each need "
            f"{num_hospitals * min_examples} examples, but the pool has {num_examples}: "
            "lower min_examples or use fewer hospitals"
        )


def _finish(method: str, seed: int, parts: Sequence[Sequence[int] | np.ndarray]) -> Partition:
    """Freeze per-hospital index lists into a Partition with sorted plain-int indices."""
    hospitals = tuple(tuple(sorted(int(i) for i in part)) for part in parts)
    return Partition(method=method, seed=seed, hospitals=hospitals)


# ---- partitioners --------------------------------------------------------------------------


def partition_iid(num_examples: int, num_hospitals: int, seed: int) -> Partition:
    """Shuffle the pool and deal it into near-equal parts (sizes differ by at most 1).

    The IID split is the control: differences from it measure what heterogeneity costs.
    """
    _check_hospitals(num_examples, num_hospitals)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_examples)
    return _finish("iid", seed, np.array_split(order, num_hospitals))


def _dirichlet(rng: np.random.Generator, alpha: float, size: int) -> np.ndarray:
    """Proportions ~ Dir(alpha * ones(size)), guarded against numerical underflow.

    For very small alpha every gamma draw can underflow to 0, giving NaN proportions; then
    all mass goes to one (seeded) hospital, which is the limit the distribution tends to.
    """
    p = np.nan_to_num(rng.dirichlet(np.full(size, alpha)), nan=0.0)
    total = float(p.sum())
    if total <= 0.0:
        p = np.zeros(size)
        p[int(rng.integers(size))] = 1.0
        return p
    return p / total


def _group_indices(values: Sequence[str]) -> dict[str, list[int]]:
    """Pool indices per distinct value, in sorted value order (independent of input order)."""
    groups: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    return {value: groups[value] for value in sorted(groups)}


def partition_dirichlet(
    labels: Sequence[str],
    num_hospitals: int,
    alpha: float,
    seed: int,
    min_examples: int = 2,
) -> Partition:
    """Label skew: each label is spread over hospitals by proportions ~ Dir(alpha).

    The standard non-IID benchmark split (Hsu et al. 2019; Yurochkin et al. 2019), so results
    compare with the literature: for every label, proportions are drawn from
    Dir(alpha * ones(num_hospitals)) and that label's shuffled examples are cut accordingly.
    Small alpha (0.1) gives hospitals few dominant labels; large alpha (100) is nearly IID.
    A draw leaving any hospital with fewer than ``min_examples`` is redrawn from the same
    generator (at most 100 times, so the result stays deterministic for a seed) because a
    hospital without data cannot train or be evaluated.
    """
    num_examples = len(labels)
    _check_hospitals(num_examples, num_hospitals)
    _check_alpha(alpha)
    _check_min_examples(num_examples, num_hospitals, min_examples)
    rng = np.random.default_rng(seed)
    by_label = _group_indices(labels)
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_hospitals)]
        for indices in by_label.values():
            shuffled = rng.permutation(np.asarray(indices))
            proportions = _dirichlet(rng, alpha, num_hospitals)
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_examples:
            return _finish("dirichlet", seed, parts)
    raise PartitionError(
        f"no Dirichlet label split with alpha={alpha} gave all {num_hospitals} hospitals at "
        f"least min_examples={min_examples} examples in {_DIRICHLET_MAX_TRIES} tries: raise "
        "alpha, lower min_examples, use fewer hospitals or more data"
    )


def _largest_remainder(proportions: np.ndarray, total: int) -> list[int]:
    """Integer shares of ``total`` closest to ``proportions * total`` that sum exactly to it."""
    exact = proportions * total
    shares = np.floor(exact).astype(int)
    leftover = total - int(shares.sum())
    # Largest fractional parts first; a stable sort breaks ties by hospital order.
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:leftover]] += 1
    return [int(s) for s in shares]


def partition_quantity(
    num_examples: int,
    num_hospitals: int,
    alpha: float,
    seed: int,
    min_examples: int = 2,
) -> Partition:
    """Quantity skew: hospital sizes follow Dir(alpha) proportions; labels stay IID.

    Separates "some hospitals have little data" from label skew. Every hospital first gets
    ``min_examples`` (guaranteed, no resampling), the rest of the shuffled pool is shared by
    Dirichlet proportions; smaller alpha gives more unequal sizes.
    """
    _check_hospitals(num_examples, num_hospitals)
    _check_alpha(alpha)
    _check_min_examples(num_examples, num_hospitals, min_examples)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_examples)
    proportions = _dirichlet(rng, alpha, num_hospitals)
    extra = _largest_remainder(proportions, num_examples - num_hospitals * min_examples)
    sizes = [min_examples + e for e in extra]
    return _finish("quantity", seed, np.split(order, np.cumsum(sizes)[:-1]))


def partition_natural(keys: Sequence[str], num_hospitals: int, seed: int) -> Partition:
    """Natural split: every key group (e.g. an ICD-10 chapter = a specialty) goes whole to one
    hospital, as a specialty centre holds all of its own cases and none of the others'.

    Groups are assigned largest first to the currently smallest hospital so hospitals stay
    balanced in size (the skew studied is then which groups a hospital holds, not how much);
    equal-sized groups are taken in a seeded shuffled order, the lowest-numbered hospital
    wins ties in size.
    """
    num_examples = len(keys)
    _check_hospitals(num_examples, num_hospitals)
    groups = _group_indices(keys)
    if len(groups) < num_hospitals:
        raise PartitionError(
            f"a natural split needs at least one distinct key per hospital: {len(groups)} "
            f"distinct keys for {num_hospitals} hospitals; use fewer hospitals or a finer key"
        )
    rng = np.random.default_rng(seed)
    names = list(groups)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    ordered = sorted(shuffled, key=lambda name: len(groups[name]), reverse=True)  # stable
    parts: list[list[int]] = [[] for _ in range(num_hospitals)]
    for name in ordered:
        smallest = min(range(num_hospitals), key=lambda k: len(parts[k]))
        parts[smallest].extend(groups[name])
    return _finish("natural", seed, parts)


def make_partition(
    method: str,
    *,
    num_hospitals: int,
    seed: int,
    labels: Sequence[str],
    keys: Sequence[str] | None = None,
    alpha: float = 0.5,
    min_examples: int = 2,
) -> Partition:
    """Make a partition by method name, so configurations and sweeps can choose it by string.

    ``labels`` (one per pooled example) fixes the pool size for every method; ``keys`` (one
    per example) is needed only for ``natural``. ``alpha`` is checked (> 0) for the methods
    that use it (``dirichlet``, ``quantity``), ``min_examples`` likewise.
    """
    if method not in PARTITION_METHODS:
        raise PartitionError(
            f"unknown partition method {method!r}: choose one of {', '.join(PARTITION_METHODS)}"
        )
    num_examples = len(labels)
    _check_hospitals(num_examples, num_hospitals)
    if method in ("dirichlet", "quantity"):
        _check_alpha(alpha)
    if method == "iid":
        return partition_iid(num_examples, num_hospitals, seed)
    if method == "dirichlet":
        return partition_dirichlet(labels, num_hospitals, alpha, seed, min_examples)
    if method == "quantity":
        return partition_quantity(num_examples, num_hospitals, alpha, seed, min_examples)
    if keys is None:
        raise PartitionError(
            "the natural partition needs keys (one per example, e.g. the ICD-10 chapter)"
        )
    if len(keys) != num_examples:
        raise PartitionError(
            f"keys and labels must describe the same pool: {len(keys)} keys for "
            f"{num_examples} labels"
        )
    return partition_natural(keys, num_hospitals, seed)


# ---- measuring and reporting ---------------------------------------------------------------


def label_histograms(partition: Partition, labels: Sequence[str]) -> list[dict[str, int]]:
    """Per hospital, label -> count (sorted by label), to see and report what each one holds."""
    histograms: list[dict[str, int]] = []
    for indices in partition.hospitals:
        if indices and (indices[0] < 0 or indices[-1] >= len(labels)):
            raise PartitionError(
                f"the partition refers to example {indices[-1]} but only {len(labels)} "
                "labels were given: pass the labels of the pool that was partitioned"
            )
        counts = Counter(labels[i] for i in indices)
        histograms.append({label: counts[label] for label in sorted(counts)})
    return histograms


def label_skew(partition: Partition, labels: Sequence[str]) -> float:
    """Mean total-variation distance between each hospital's label mix and the pool's.

    One number for how non-IID a split is: 0 when every hospital has the pooled label
    distribution, approaching 1 when hospitals hold disjoint rare labels. Hospitals without
    examples have no distribution and are left out of the mean.
    """
    histograms = label_histograms(partition, labels)
    pooled: Counter[str] = Counter()
    for hist in histograms:
        pooled.update(hist)
    total = sum(pooled.values())
    if total == 0:
        return 0.0
    distances: list[float] = []
    for hist in histograms:
        size = sum(hist.values())
        if size == 0:
            continue
        distance = 0.5 * sum(
            abs(hist.get(label, 0) / size - count / total) for label, count in pooled.items()
        )
        distances.append(distance)
    return float(sum(distances) / len(distances)) if distances else 0.0


def partition_summary(partition: Partition, labels: Sequence[str]) -> dict[str, Any]:
    """A JSON-able record of a partition, to store next to a run's results and print."""
    histograms = label_histograms(partition, labels)
    return {
        "method": partition.method,
        "seed": partition.seed,
        "label_skew": round(label_skew(partition, labels), 6),
        "hospitals": [
            {"hospital": f"hospital-{k}", "examples": sum(hist.values()), "labels": hist}
            for k, hist in enumerate(histograms, start=1)
        ],
    }


def _short(label: str, width: int = _LABEL_WIDTH) -> str:
    """Cut a long label (ICD-10 chapter titles are long) so a console line stays readable."""
    return label if len(label) <= width else label[: width - 3] + "..."


def format_partition_summary(summary: Mapping[str, Any], max_labels: int = 6) -> str:
    """Render ``partition_summary`` output as a console table: one line per hospital.

    Each line shows the hospital, its example count and its ``max_labels`` most frequent
    labels with counts (ties by label name), so the skew of a split is visible at a glance.
    """
    hospitals = list(summary.get("hospitals", []))
    lines = [
        f"partition {summary.get('method')} (seed {summary.get('seed')}): "
        f"{len(hospitals)} hospitals, label skew {float(summary.get('label_skew', 0.0)):.3f}"
    ]
    name_width = max([len("hospital")] + [len(str(h["hospital"])) for h in hospitals])
    lines.append(f"{'hospital':<{name_width}}  {'examples':>8}  top labels")
    for entry in hospitals:
        counts: Mapping[str, int] = entry.get("labels", {})
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{_short(label)} {n}" for label, n in ranked[:max_labels])
        if len(ranked) > max_labels:
            shown += f", +{len(ranked) - max_labels} more"
        lines.append(f"{entry['hospital']:<{name_width}}  {entry['examples']:>8}  {shown}")
    return "\n".join(lines)
