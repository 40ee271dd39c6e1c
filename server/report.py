"""What the coordinator prints: a per-round table and a base-vs-final summary.

Numbers only: the coordinator never sees examples. The headline metric is accuracy for
classification and exact match (else response loss) for instruction tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


def headline_metric(task: str) -> str:
    """The metric the tables lead with (higher is better)."""
    return "accuracy" if task == "classify" else "exact-match"


def weighted_metrics(per_hospital: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of every metric the hospitals reported; the plain mean over
    hospitals when any of them keeps its count to itself (deployed, secure aggregation)."""
    if per_hospital and any("num-examples" not in m for m in per_hospital.values()):
        names = sorted({k for m in per_hospital.values() for k in m if k != "num-examples"})
        return {
            name: sum(m[name] for m in per_hospital.values()) / len(per_hospital)
            for name in names
            if all(name in m for m in per_hospital.values())
        }
    total = sum(m.get("num-examples", 0.0) for m in per_hospital.values())
    if total <= 0:
        return {}
    names = sorted({k for m in per_hospital.values() for k in m if k != "num-examples"})
    weighted = {
        name: sum(m.get(name, 0.0) * m.get("num-examples", 0.0) for m in per_hospital.values())
        / total
        for name in names
        if all(name in m for m in per_hospital.values())
    }
    weighted["num-examples"] = total
    return weighted


def epsilon_bound(metrics: Mapping[str, float]) -> float | None:
    """The ε a hospital reported: its exact ε (simulated, or plain mode), else its run's
    planned bound (a deployed hospital under secure aggregation); None without DP."""
    if "epsilon" in metrics:
        return float(metrics["epsilon"])
    if "epsilon-target" in metrics:
        return float(metrics["epsilon-target"])
    return None


@dataclass
class RoundReport:
    """Prints rows as rounds finish, so a person watching sees progress."""

    task: str
    say: Callable[[str], None]
    _header_done: bool = False

    def round(
        self,
        server_round: int,
        train: Mapping[str, Mapping[str, float]],
        validation: Mapping[str, Mapping[str, float]],
        seconds: float,
    ) -> None:
        metric = headline_metric(self.task)
        hospitals = sorted(validation)
        if not self._header_done:
            columns = " ".join(f"{h[-12:]:>12}" for h in hospitals)
            self.say(
                f"{'round':>5} {'train loss':>10} {'val loss':>9} {'val ' + metric:>16} "
                f"{columns} {'seconds':>8}"
            )
            self._header_done = True
        train_loss = _mean(m.get("train-loss") for m in train.values())
        bounds = (epsilon_bound(m) for m in train.values())
        epsilons = [e for e in bounds if e is not None]
        privacy = f"  ε ≤ {max(epsilons):.2f}" if epsilons else ""
        weighted = weighted_metrics(validation)
        cells = " ".join(f"{_fmt(validation[h].get(metric)):>12}" for h in hospitals)
        self.say(
            f"{server_round:>5} {_fmt(train_loss):>10} {_fmt(weighted.get('loss')):>9} "
            f"{_fmt(weighted.get(metric)):>16} {cells} {seconds:>8.1f}{privacy}"
        )

    def evaluation(self, title: str, per_hospital: Mapping[str, Mapping[str, float]]) -> None:
        metric = headline_metric(self.task)
        weighted = weighted_metrics(per_hospital)
        self.say(
            f"{title}: {metric} {_fmt(weighted.get(metric))}, loss {_fmt(weighted.get('loss'))} "
            f"over {int(weighted.get('num-examples', 0))} held-out examples"
        )

    def summary(
        self,
        base: Mapping[str, Mapping[str, float]],
        final: Mapping[str, Mapping[str, float]],
    ) -> None:
        metric = headline_metric(self.task)
        self.say("")
        self.say("Held-out test split at each hospital: base model vs federated adapter")
        self.say(
            f"{'hospital':>14} {'base ' + metric:>18} {'final ' + metric:>18} "
            f"{'base loss':>10} {'final loss':>10}"
        )
        for hospital in sorted(set(base) | set(final)):
            b, f = base.get(hospital, {}), final.get(hospital, {})
            self.say(
                f"{hospital:>14} {_fmt(b.get(metric)):>18} {_fmt(f.get(metric)):>18} "
                f"{_fmt(b.get('loss')):>10} {_fmt(f.get('loss')):>10}"
            )
        wb, wf = weighted_metrics(base), weighted_metrics(final)
        self.say(
            f"{'all (weighted)':>14} {_fmt(wb.get(metric)):>18} {_fmt(wf.get(metric)):>18} "
            f"{_fmt(wb.get('loss')):>10} {_fmt(wf.get('loss')):>10}"
        )

    def privacy(self, guarantees: Mapping[str, Mapping[str, float]], accountant: str) -> None:
        """Each hospital's guarantee for everything it trained in this run, naming what it
        protects (each patient or each record) and what (ε, δ) means."""
        if not guarantees:
            self.say("Differential privacy: off (no hospital trained with DP in this run).")
            return
        self.say(f"Differential privacy per hospital ({accountant} accountant); (ε, δ) means: "
                 "whether or not one patient's (or record's) data was used, every update the "
                 "hospital sent is almost equally likely (within e^ε), except with "
                 "probability δ. Not covered: reported losses and metrics, and which rounds "
                 "were run.")
        for hospital, values in sorted(guarantees.items()):
            unit = "each patient" if values.get("dp-patient-level", 0.0) > 0 else "each record"
            if "epsilon" not in values:  # a deployed hospital keeps its exact ε, δ at home
                self.say(
                    f"  {hospital}: protects {unit}, ε ≤ {values['epsilon-target']:.3f} (its "
                    "plan for this run, "
                    "enforced by its own ledger; the exact ε and δ stay at the hospital: they "
                    "would reveal its data size)"
                )
                continue
            self.say(
                f"  {hospital}: protects {unit}, (ε = {values['epsilon']:.3f}, "
                f"δ = {values['delta']:.0e}), "
                f"budget ε = {values['epsilon-budget']:.3f}"
            )

    def client_privacy(self, guarantee: Mapping[str, float]) -> None:
        """The client-level guarantee: what the model reveals about any one hospital."""
        if not guarantee:
            return
        self.say(
            f"Client-level differential privacy (each hospital as a whole): "
            f"(ε = {guarantee['epsilon']:.3f}, δ = {guarantee['delta']:.0e}) after "
            f"{int(guarantee['rounds'])} round(s), σ = {guarantee['noise_multiplier']:g}, "
            f"hospital sampling rate {guarantee['sample_rate']:.2f}"
            + (
                f" (against the coordinator, which knows who was sampled: "
                f"ε = {guarantee['epsilon_vs_coordinator']:.3f})"
                if guarantee["sample_rate"] < 1.0
                else ""
            )
        )


def _mean(values: object) -> float | None:
    numbers = [float(v) for v in values if v is not None]  # type: ignore[attr-defined]
    return sum(numbers) / len(numbers) if numbers else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
