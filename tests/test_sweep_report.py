"""Sweep reporting: the result record, summary tables (CSV, Markdown) and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedtune.simulations.plots import (
    plot_hospital_epsilon,
    plot_metric_vs_round,
    plot_privacy_utility,
    write_plots,
)
from fedtune.simulations.results import ARMS, ArmResult, is_dp_arm, load_results, save_results
from fedtune.simulations.tables import render_markdown, summarize, write_csv, write_markdown

P1 = {"hospitals": 3, "alpha": 0.5}
P2 = {"hospitals": 5, "alpha": 0.1}


def _r(
    arm: str,
    seed: int,
    metric: float | None,
    *,
    point: dict | None = None,
    eps: float | None = None,
    status: str = "ok",
    seconds: float = 1.0,
) -> ArmResult:
    return ArmResult(
        point=dict(P1 if point is None else point),
        arm=arm,
        epsilon=eps,
        seed=seed,
        metric_name="accuracy",
        status=status,
        error="" if status == "ok" else "boom",
        final_metric=metric,
        seconds=seconds,
    )


# ---- results ----------------------------------------------------------------------------------


def test_is_dp_arm() -> None:
    assert [a for a in ARMS if is_dp_arm(a)] == [
        "centralized-dp",
        "local-only-dp",
        "federated-dp",
        "federated-dp-secagg",
    ]


def test_labels() -> None:
    assert _r("federated-dp", 0, 0.5, eps=8.0).label() == "federated-dp ε=8"
    assert _r("federated-dp", 0, 0.5, eps=0.5).label() == "federated-dp ε=0.5"
    assert _r("local-only", 0, 0.5).label() == "local-only"
    assert _r("local-only", 0, 0.5).point_label() == "alpha=0.5 hospitals=3"
    assert _r("local-only", 0, 0.5, point={}).point_label() == ""


def test_results_json_round_trip(tmp_path: Path) -> None:
    full = ArmResult(
        point={"hospitals": 3, "alpha": 0.5, "strategy": "fedavg", "lora_r": 8},
        arm="federated-dp-secagg",
        epsilon=3.0,
        seed=7,
        metric_name="exact-match",
        final_metric=0.42,
        curve=[(0, 0.1), (1, 0.3), (2, 0.42)],
        hospital_epsilon={"hospital-0": [(1, 1.2), (2, 2.9)], "hospital-1": [(1, 1.1)]},
        achieved_epsilon=2.9,
        test_fingerprint="ab" * 32,
        seconds=12.5,
        run_dir="runs/x",
    )
    bare = ArmResult(point={}, arm="centralized", epsilon=None, seed=0, metric_name="accuracy")
    failed = _r("local-only", 1, None, status="failed")
    path = tmp_path / "sub" / "results.json"
    save_results([full, bare, failed], path)

    assert isinstance(json.loads(path.read_text()), list)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left
    loaded = load_results(path)
    assert loaded == [full, bare, failed]
    assert isinstance(loaded[0].curve[0], tuple)
    assert isinstance(loaded[0].hospital_epsilon["hospital-0"][1], tuple)
    assert loaded[1].epsilon is None and loaded[1].final_metric is None
    assert loaded[1].achieved_epsilon is None
    assert loaded[2].status == "failed" and loaded[2].error == "boom"


def test_load_results_rejects_non_list(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{}")
    with pytest.raises(ValueError):
        load_results(path)


# ---- summary tables ---------------------------------------------------------------------------


def test_summarize_mean_and_sample_std() -> None:
    rows = summarize([_r("federated", 0, 0.5, seconds=2.0), _r("federated", 1, 0.7, seconds=4.0)])
    assert len(rows) == 1
    row = rows[0]
    assert row.arm == "federated" and row.epsilon is None and row.metric_name == "accuracy"
    assert row.mean == pytest.approx(0.6)
    assert row.std == pytest.approx(math.sqrt(0.02))  # 0.1414: ddof=1
    assert row.seeds_ok == 2 and row.seeds_failed == 0
    assert row.mean_seconds == pytest.approx(3.0)


def test_summarize_single_seed_and_failures() -> None:
    rows = summarize(
        [
            _r("local-only", 0, 0.4),
            _r("local-only", 1, None, status="failed"),
            # a failed seed that still reported a metric is not averaged
            _r("local-only", 2, 0.9, status="failed"),
            _r("centralized", 0, None, status="failed"),
        ]
    )
    by_arm = {row.arm: row for row in rows}
    assert by_arm["local-only"].mean == pytest.approx(0.4)
    assert by_arm["local-only"].std == 0.0
    assert (by_arm["local-only"].seeds_ok, by_arm["local-only"].seeds_failed) == (1, 2)
    assert by_arm["centralized"].mean is None and by_arm["centralized"].std is None
    assert (by_arm["centralized"].seeds_ok, by_arm["centralized"].seeds_failed) == (0, 1)


def test_summarize_groups_by_epsilon_and_orders() -> None:
    results = [
        _r("federated-dp", 0, 0.50, eps=8.0),
        _r("federated-dp", 0, 0.30, eps=1.0),
        _r("federated", 0, 0.70),
        _r("local-only", 0, 0.40, point=P2),
        _r("federated-dp", 1, 0.32, eps=1.0),
        _r("centralized", 0, 0.80),
        _r("federated-dp", 0, 0.40, eps=3.0),
        _r("federated-secagg", 0, 0.71),
        _r("centralized-dp", 0, 0.60, eps=3.0),
    ]
    rows = summarize(results)
    assert [(r.point, r.arm, r.epsilon) for r in rows] == [
        (P1, "centralized", None),
        (P1, "centralized-dp", 3.0),
        (P1, "federated", None),
        (P1, "federated-secagg", None),
        (P1, "federated-dp", 1.0),
        (P1, "federated-dp", 3.0),
        (P1, "federated-dp", 8.0),
        (P2, "local-only", None),
    ]
    eps1 = rows[4]
    assert eps1.seeds_ok == 2 and eps1.mean == pytest.approx(0.31)


def test_csv_round_trip(tmp_path: Path) -> None:
    results = [
        _r("federated-dp", 0, 0.5, eps=8.0),
        _r("federated-dp", 1, 0.7, eps=8.0),
        _r("federated", 0, 0.9, point={"hospitals": 5}),
        _r("local-only", 0, None, status="failed"),
    ]
    rows = summarize(results)
    path = tmp_path / "summary.csv"
    write_csv(rows, path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == [
        "alpha",
        "hospitals",
        "arm",
        "epsilon",
        "metric",
        "mean",
        "std",
        "seeds_ok",
        "seeds_failed",
        "mean_seconds",
    ]
    assert len(body) == len(rows) == 3
    parsed = [dict(zip(header, line, strict=True)) for line in body]
    failed, dp, fed = parsed  # local-only before federated-dp (ARMS order)
    assert dp["arm"] == "federated-dp" and float(dp["epsilon"]) == 8.0
    assert dp["alpha"] == "0.5" and dp["hospitals"] == "3" and dp["metric"] == "accuracy"
    assert float(dp["mean"]) == pytest.approx(0.6)
    assert float(dp["std"]) == pytest.approx(0.1414, abs=1e-4)
    assert dp["mean"] == "0.6000" and dp["std"] == "0.1414"
    assert int(dp["seeds_ok"]) == 2 and int(dp["seeds_failed"]) == 0
    assert failed["arm"] == "local-only" and failed["epsilon"] == "" and failed["mean"] == ""
    assert int(failed["seeds_failed"]) == 1
    assert fed["alpha"] == "" and fed["hospitals"] == "5" and float(fed["mean"]) == 0.9


def test_markdown(tmp_path: Path) -> None:
    rows = summarize(
        [
            _r("federated-dp", 0, 0.5, eps=8.0),
            _r("federated-dp", 1, 0.7, eps=8.0),
            _r("federated-dp", 2, None, eps=8.0, status="failed"),
            _r("centralized", 0, None, status="failed"),
        ]
    )
    text = render_markdown(rows, "ICD-10 sweep")
    lines = text.splitlines()
    assert "ICD-10 sweep" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, rows
    header = table[0]
    for column in ("alpha", "hospitals", "arm", "ε", "±", "seeds", "time"):
        assert column in header
    assert set(table[1].replace("|", "").split()) == {"---"}
    centralized, dp = table[2], table[3]
    assert "failed" in centralized and "±" not in centralized
    assert "0.6000 ± 0.1414" in dp and "2 ok, 1 failed" in dp and "| 8 |" in dp
    assert all(line.count("|") == header.count("|") for line in table)

    path = tmp_path / "summary.md"
    write_markdown(rows, path, "ICD-10 sweep")
    assert path.read_text() == text


# ---- plots ------------------------------------------------------------------------------------


def _synthetic() -> list[ArmResult]:
    """2 points × (centralized, local-only, federated, federated-dp at ε 1, 3, 8) × 2 seeds."""
    out = []
    for p, point in enumerate([P1, P2]):
        for seed in range(2):
            arms: list[tuple[str, float | None]] = [
                ("centralized", None),
                ("local-only", None),
                ("federated", None),
                *(("federated-dp", e) for e in (1.0, 3.0, 8.0)),
            ]
            for i, (arm, eps) in enumerate(arms):
                top = 0.9 - 0.05 * i - 0.1 * p + 0.02 * seed
                curve = [(k, 0.2 + (top - 0.2) * k / 3) for k in range(4)]
                hosp = {}
                if eps is not None:
                    hosp = {
                        f"hospital-{h}": [(k, eps * k / 3 * (0.9 + 0.05 * h)) for k in (1, 2, 3)]
                        for h in range(2)
                    }
                out.append(
                    ArmResult(
                        point=dict(point),
                        arm=arm,
                        epsilon=eps,
                        seed=seed,
                        metric_name="accuracy",
                        final_metric=curve[-1][1],
                        curve=curve,
                        hospital_epsilon=hosp,
                        achieved_epsilon=None if eps is None else eps * 0.95,
                        seconds=3.0,
                    )
                )
    return out


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5_000


def test_write_plots(tmp_path: Path) -> None:
    results = _synthetic()
    out_dir = tmp_path / "plots"
    written = write_plots(results, out_dir)
    names = ["metric_vs_round.png", "privacy_utility.png", "hospital_epsilon.png"]
    assert written == [out_dir / n for n in names]
    for path in written:
        _assert_png(path)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)


def test_plots_skip_without_data(tmp_path: Path) -> None:
    non_dp = [r for r in _synthetic() if not is_dp_arm(r.arm)]
    written = write_plots(non_dp, tmp_path)
    assert written == [tmp_path / "metric_vs_round.png"]
    assert not (tmp_path / "privacy_utility.png").exists()
    assert not (tmp_path / "hospital_epsilon.png").exists()

    assert write_plots([], tmp_path / "empty") == []
    assert not (tmp_path / "empty").exists()

    failed = [_r("federated-dp", 0, None, eps=3.0, status="failed")]
    assert plot_metric_vs_round(failed, tmp_path / "a.png") is None
    assert plot_privacy_utility(failed, tmp_path / "b.png") is None
    assert plot_hospital_epsilon(failed, tmp_path / "c.png") is None
    assert not any((tmp_path / n).exists() for n in ("a.png", "b.png", "c.png"))


def test_plots_close_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    write_plots(_synthetic(), tmp_path)
    assert len(plt.get_fignums()) == before
