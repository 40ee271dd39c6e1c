"""Plots of a sweep: metric vs round, privacy–utility trade-off, per-hospital ε spent.

Every function takes the :class:`~simulations.results.ArmResult` list of a sweep, writes one
PNG and returns its path, or returns ``None`` (writing nothing) when there is nothing to plot.
Only seeds that finished (status ``"ok"``) are plotted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from fedtune.simulations.results import (
    ArmResult,
    arm_order,
    format_value,
    is_dp_arm,
    point_key,
    point_label,
)

DPI = 120
MAX_HOSPITAL_PANELS = 6
# Non-DP arms drawn as reference lines on the privacy–utility plot.
REFERENCE_ARMS = ("centralized", "local-only", "federated", "federated-secagg")

ARM_COLORS = {
    "centralized": "tab:blue",
    "centralized-dp": "tab:purple",
    "local-only": "tab:orange",
    "local-only-dp": "tab:brown",
    "federated": "tab:green",
    "federated-secagg": "tab:olive",
    "federated-dp": "tab:red",
    "federated-dp-secagg": "tab:pink",
}
_EXTRA_COLORS = ("tab:gray", "tab:cyan", "black")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

Group = tuple[str, str, float | None]  # (point key, arm, ε)


def plot_metric_vs_round(results: Sequence[ArmResult], path: Path) -> Path | None:
    """Test metric vs round: one subplot per grid point, one line per arm label.

    Each line is the mean over the ok seeds at every round, with a ±std band where more than
    one seed reached that round. ``None`` if no ok result has a curve.
    """
    runs = [r for r in results if r.status == "ok" and r.curve]
    if not runs:
        return None
    points = _points(runs)
    eps_by_arm = _epsilons_by_arm(runs)
    metric = _metric_name(runs)
    fig, axes = _panel_grid(len(points))
    try:
        for ax, (pk, point) in zip(axes, points, strict=False):
            seen_rounds: set[int] = set()
            for (_, arm, eps), members in _groups(r for r in runs if point_key(r.point) == pk):
                rounds, mean, std, count = _mean_curve([r.curve for r in members])
                seen_rounds.update(int(k) for k in rounds)
                style = _style(arm, eps, eps_by_arm)
                ax.plot(
                    rounds, mean, label=members[0].label(), linewidth=1.8, markersize=4, **style
                )
                if (count > 1).any():
                    ax.fill_between(
                        rounds, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0
                    )
            ax.set_title(point_label(point) or "all runs", fontsize=10)
            ax.set_xlabel("round")
            ax.set_ylabel(f"test {metric}")
            _round_ticks(ax, seen_rounds)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Test {metric} vs round (mean ± std over seeds)")
        _shared_legend(fig, axes)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_privacy_utility(results: Sequence[ArmResult], path: Path) -> Path | None:
    """Final test metric vs target ε (log scale), one subplot per grid point.

    One line per DP arm (mean over ok seeds, error bars = sample std); the non-DP arms of the
    same point (centralized, local-only, federated) are dashed horizontal references. ``None``
    if no DP arm finished at any ε.
    """
    dp = [r for r in results if is_dp_arm(r.arm) and r.epsilon is not None and r.ok]
    if not dp:
        return None
    points = _points(dp)
    metric = _metric_name(dp)
    all_eps = sorted({float(r.epsilon) for r in dp if r.epsilon is not None})
    fig, axes = _panel_grid(len(points))
    try:
        for ax, (pk, point) in zip(axes, points, strict=False):
            at_point = [r for r in results if r.ok and point_key(r.point) == pk]
            by_arm: dict[str, dict[float, list[float]]] = {}
            for r in at_point:
                if is_dp_arm(r.arm) and r.epsilon is not None and r.final_metric is not None:
                    by_arm.setdefault(r.arm, {}).setdefault(float(r.epsilon), []).append(
                        r.final_metric
                    )
            for i, arm in enumerate(sorted(by_arm, key=arm_order)):
                eps = sorted(by_arm[arm])
                means = [float(np.mean(by_arm[arm][e])) for e in eps]
                stds = [_std(by_arm[arm][e]) for e in eps]
                ax.errorbar(
                    eps,
                    means,
                    yerr=stds,
                    label=arm,
                    color=_arm_color(arm),
                    marker=_MARKERS[i % len(_MARKERS)],
                    capsize=3,
                    linewidth=1.8,
                    markersize=5,
                )
            present = {r.arm for r in at_point}
            for arm in REFERENCE_ARMS:
                if arm not in present or (arm == "federated-secagg" and "federated" in present):
                    continue
                values = [r.final_metric for r in at_point if r.arm == arm]
                mean = float(np.mean([v for v in values if v is not None]))
                ax.axhline(
                    mean,
                    color=_arm_color(arm),
                    linestyle="--",
                    linewidth=1.3,
                    label=f"{arm} (no DP)",
                )
            ax.set_xscale("log")
            ax.set_xticks(all_eps)
            ax.set_xticklabels([format_value(e) for e in all_eps])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("target ε (log scale)")
            ax.set_ylabel(f"final test {metric}")
            ax.set_title(point_label(point) or "all runs", fontsize=10)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Privacy–utility trade-off: final test {metric} vs ε (mean ± std)")
        _shared_legend(fig, axes)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_hospital_epsilon(results: Sequence[ArmResult], path: Path) -> Path | None:
    """Per-hospital ε spent vs round for the DP arms that record it (the federated DP arms).

    One subplot per (point, arm, target ε), at most :data:`MAX_HOSPITAL_PANELS` (the first
    ones in table order); each hospital's line is its mean over ok seeds, and a dashed line
    marks the target ε. ``None`` if no result records per-hospital ε.
    """
    runs = [r for r in results if r.status == "ok" and is_dp_arm(r.arm) and r.hospital_epsilon]
    runs = [r for r in runs if any(r.hospital_epsilon.values())]
    if not runs:
        return None
    groups = list(_groups(runs))
    shown = groups[:MAX_HOSPITAL_PANELS]
    hospitals = sorted({h for _, ms in shown for r in ms for h in r.hospital_epsilon}, key=_natural)
    cmap = plt.get_cmap("tab10" if len(hospitals) <= 10 else "tab20")
    colors = {h: cmap(i % cmap.N) for i, h in enumerate(hospitals)}
    fig, axes = _panel_grid(len(shown))
    try:
        for ax, ((_, _, eps), members) in zip(axes, shown, strict=False):
            names = sorted({h for r in members for h in r.hospital_epsilon}, key=_natural)
            seen_rounds: set[int] = set()
            for h in names:
                curves = [r.hospital_epsilon[h] for r in members if r.hospital_epsilon.get(h)]
                rounds, mean, _, _ = _mean_curve(curves)
                seen_rounds.update(int(k) for k in rounds)
                ax.plot(rounds, mean, color=colors[h], marker="o", markersize=3, label=h)
            if eps is not None:
                ax.axhline(eps, color="black", linestyle="--", linewidth=1.2, label="target ε")
            ax.set_title(f"{members[0].label()}\n{members[0].point_label()}".strip(), fontsize=10)
            ax.set_xlabel("round")
            ax.set_ylabel("ε spent")
            ax.set_ylim(bottom=0)
            _round_ticks(ax, seen_rounds)
            ax.grid(alpha=0.3)
        title = "Per-hospital privacy budget spent vs round"
        if len(groups) > len(shown):
            title += f" (first {len(shown)} of {len(groups)} arms)"
        fig.suptitle(title)
        _shared_legend(fig, axes)
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_plots(results: Sequence[ArmResult], out_dir: Path) -> list[Path]:
    """Write metric_vs_round.png, privacy_utility.png and hospital_epsilon.png (those that
    apply to ``results``) into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    plotters: list[tuple[str, Callable[[Sequence[ArmResult], Path], Path | None]]] = [
        ("metric_vs_round.png", plot_metric_vs_round),
        ("privacy_utility.png", plot_privacy_utility),
        ("hospital_epsilon.png", plot_hospital_epsilon),
    ]
    written = []
    for name, plot in plotters:
        out = plot(results, out_dir / name)
        if out is not None:
            written.append(out)
    return written


# ---- helpers ---------------------------------------------------------------------------------


def _points(results: Iterable[ArmResult]) -> list[tuple[str, dict[str, Any]]]:
    """The distinct grid points of ``results`` (key, point) in order of first appearance."""
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        seen.setdefault(point_key(r.point), r.point)
    return list(seen.items())


def _groups(results: Iterable[ArmResult]) -> list[tuple[Group, list[ArmResult]]]:
    """Results grouped by (point, arm, ε): points as first seen, then ARMS order, then ε."""
    point_index: dict[str, int] = {}
    groups: dict[Group, list[ArmResult]] = {}
    for r in results:
        pk = point_key(r.point)
        point_index.setdefault(pk, len(point_index))
        eps = None if r.epsilon is None else float(r.epsilon)
        groups.setdefault((pk, r.arm, eps), []).append(r)

    def order(g: Group) -> tuple[int, tuple[int, str], bool, float]:
        return (point_index[g[0]], arm_order(g[1]), g[2] is not None, g[2] or 0.0)

    return [(g, groups[g]) for g in sorted(groups, key=order)]


def _epsilons_by_arm(results: Iterable[ArmResult]) -> dict[str, list[float]]:
    out: dict[str, set[float]] = {}
    for r in results:
        if r.epsilon is not None:
            out.setdefault(r.arm, set()).add(float(r.epsilon))
    return {arm: sorted(eps) for arm, eps in out.items()}


def _metric_name(results: Iterable[ArmResult]) -> str:
    names = sorted({r.metric_name for r in results if r.metric_name})
    return " / ".join(names) if names else "metric"


def _mean_curve(
    curves: Sequence[Sequence[tuple[int, float]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per round: mean, sample std (0 with one value) and count over ``curves``."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for rnd, value in curve:
            by_round.setdefault(int(rnd), []).append(float(value))
    rounds = sorted(by_round)
    mean = np.array([np.mean(by_round[k]) for k in rounds], dtype=float)
    std = np.array([_std(by_round[k]) for k in rounds], dtype=float)
    count = np.array([len(by_round[k]) for k in rounds], dtype=int)
    return np.array(rounds, dtype=int), mean, std, count


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _arm_color(arm: str) -> str:
    if arm in ARM_COLORS:
        return ARM_COLORS[arm]
    return _EXTRA_COLORS[sum(map(ord, arm)) % len(_EXTRA_COLORS)]


def _style(arm: str, eps: float | None, eps_by_arm: dict[str, list[float]]) -> dict[str, Any]:
    """Line style of an arm label: the arm's colour; DP arms dashed, with a marker per ε and
    a lighter shade for a smaller ε."""
    base = to_rgb(_arm_color(arm))
    if eps is None:
        return {"color": base, "linestyle": "-", "marker": None}
    values = eps_by_arm.get(arm, [eps])
    rank = values.index(eps) if eps in values else 0
    # Smallest ε lightest (mixed 50% with white), largest ε the full colour.
    light = 0.5 * (1 - rank / (len(values) - 1)) if len(values) > 1 else 0.0
    color = tuple(c + (1 - c) * light for c in base)
    return {"color": color, "linestyle": "--", "marker": _MARKERS[rank % len(_MARKERS)]}


def _panel_grid(n: int) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` subplots in a grid of at most 3 columns (spare ones hidden)."""
    ncols = min(3, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, grid = plt.subplots(
        nrows,
        ncols,
        figsize=(5.4 * ncols, 3.9 * nrows + 1.0),
        squeeze=False,
        layout="constrained",
    )
    axes: list[Axes] = list(grid.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _round_ticks(ax: Axes, rounds: set[int]) -> None:
    """Integer round ticks: every round when there are few, else a few integer ones."""
    if 0 < len(rounds) <= 12:
        ax.set_xticks(sorted(rounds))
        if len(rounds) == 1:
            only = next(iter(rounds))
            ax.set_xlim(only - 1, only + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _shared_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the subplots with every distinct label of ``axes``."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(4, len(handles)),
            fontsize=9,
            frameon=False,
        )


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # keeps the shared legend whole
    return path


def _natural(name: str) -> list[Any]:
    """Sort key ordering "hospital-2" before "hospital-10"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]
