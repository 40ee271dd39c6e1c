"""Summary tables of a sweep: mean ± std over seeds per (grid point, arm, ε), in CSV or Markdown."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.simulations.results import ArmResult, arm_order, format_value, point_key


@dataclass(frozen=True)
class SummaryRow:
    """The seeds of one (grid point, arm, ε) group, summarized."""

    point: dict[str, Any]
    arm: str
    epsilon: float | None
    metric_name: str
    mean: float | None  # over ok seeds; None if no seed finished
    std: float | None  # sample std (ddof=1); 0.0 with one ok seed; None if no ok seed
    seeds_ok: int
    seeds_failed: int
    mean_seconds: float  # over ok seeds (over all seeds when none finished)


def summarize(results: Sequence[ArmResult]) -> list[SummaryRow]:
    """Group ``results`` by (point, arm, ε) and summarize each group over its seeds.

    Rows come by point (in order of first appearance), then in :data:`ARMS` order, then by
    ε ascending (``None`` first). A seed counts as ok when its status is ``"ok"`` and it has a
    final metric; the others count as failed and are left out of the mean and std.
    """
    point_index: dict[str, int] = {}
    groups: dict[tuple[str, str, float | None], list[ArmResult]] = {}
    for r in results:
        pk = point_key(r.point)
        point_index.setdefault(pk, len(point_index))
        eps = None if r.epsilon is None else float(r.epsilon)
        groups.setdefault((pk, r.arm, eps), []).append(r)

    def order(key: tuple[str, str, float | None]) -> tuple[int, tuple[int, str], int, float]:
        pk, arm, eps = key
        return (point_index[pk], arm_order(arm), eps is not None, eps or 0.0)

    rows = []
    for key in sorted(groups, key=order):
        members = groups[key]
        ok = [r for r in members if r.ok]
        metrics = [float(r.final_metric) for r in ok if r.final_metric is not None]
        mean: float | None = None
        std: float | None = None
        if metrics:
            mean = statistics.fmean(metrics)
            std = statistics.stdev(metrics) if len(metrics) > 1 else 0.0
        timed = ok or members
        names = [r.metric_name for r in ok or members if r.metric_name]
        rows.append(
            SummaryRow(
                point=dict(members[0].point),
                arm=key[1],
                epsilon=key[2],
                metric_name=names[0] if names else "",
                mean=mean,
                std=std,
                seeds_ok=len(ok),
                seeds_failed=len(members) - len(ok),
                mean_seconds=statistics.fmean(float(r.seconds) for r in timed),
            )
        )
    return rows


def point_columns(rows: Sequence[SummaryRow]) -> list[str]:
    """The swept keys of ``rows`` (the union of their points' keys), sorted."""
    return sorted({k for row in rows for k in row.point})


def write_csv(rows: Sequence[SummaryRow], path: Path) -> None:
    """Write ``rows`` as CSV: the swept keys, then arm, epsilon, metric, mean, std, seeds, time.

    Floats have 4 decimals; a missing value (ε of a non-DP arm, mean of a group with no ok
    seed, a swept key a point lacks) is an empty cell.
    """
    keys = point_columns(rows)
    header = [
        *keys,
        "arm",
        "epsilon",
        "metric",
        "mean",
        "std",
        "seeds_ok",
        "seeds_failed",
        "mean_seconds",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                [
                    *(format_value(row.point[k]) if k in row.point else "" for k in keys),
                    row.arm,
                    _f4(row.epsilon),
                    row.metric_name,
                    _f4(row.mean),
                    _f4(row.std),
                    row.seeds_ok,
                    row.seeds_failed,
                    _f4(row.mean_seconds),
                ]
            )


def render_markdown(rows: Sequence[SummaryRow], title: str) -> str:
    """A Markdown section: ``title`` as a heading, then one table row per summary row."""
    keys = point_columns(rows)
    names = sorted({row.metric_name for row in rows if row.metric_name})
    single_metric = len(names) == 1
    metric_header = f"{names[0]} (mean ± std)" if single_metric else "metric (mean ± std)"
    header = [*keys, "arm", "ε", metric_header, "seeds", "time"]
    lines = [f"## {title}", ""]
    lines.append(_md_row(header))
    lines.append(_md_row(["---"] * len(header)))
    for row in rows:
        if row.mean is None:
            metric = "failed"
        else:
            metric = f"{row.mean:.4f} ± {(row.std or 0.0):.4f}"
            if not single_metric and row.metric_name:
                metric = f"{row.metric_name} {metric}"
        if row.seeds_failed:
            seeds = f"{row.seeds_ok} ok, {row.seeds_failed} failed"
        else:
            seeds = str(row.seeds_ok)
        cells = [
            *(format_value(row.point[k]) if k in row.point else "" for k in keys),
            row.arm,
            "-" if row.epsilon is None else format_value(float(row.epsilon)),
            metric,
            seeds,
            _duration(row.mean_seconds),
        ]
        lines.append(_md_row(cells))
    if not rows:
        lines.append("")
        lines.append("_No results._")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[SummaryRow], path: Path, title: str) -> None:
    """Write :func:`render_markdown` of ``rows`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(rows, title), encoding="utf-8")


def _f4(value: float | None) -> str:
    return "" if value is None else f"{float(value):.4f}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
