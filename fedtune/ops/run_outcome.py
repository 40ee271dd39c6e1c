"""What a finished run says last: did the federated model beat the base model, and how to
export and use it. Printed by both `fedtune demo` and `fedtune run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def verdict(summary: dict[str, Any]) -> str:
    """One sentence comparing base and final model on the held-out test split.

    Better means the headline metric did not fall and the loss fell; worse means the headline
    metric fell, or it stayed and the loss rose (as DP noise can do with too few rounds);
    anything else is said to be mixed, with the numbers.
    """
    metric = "accuracy" if summary["task"] == "classify" else "exact-match"
    base = summary.get("base_test", {}).get("weighted", {})
    final = summary.get("final_test", {}).get("weighted", {})
    if not base or not final:
        return ("No verdict: the base or the final model was not evaluated on held-out data "
                "(no hospital answered the test evaluation).")
    parts = [f"{name} {base[name]:.4f} → {final[name]:.4f}"
             for name in (metric, "loss") if name in base and name in final]
    numbers = ", ".join(parts)
    metric_change = final.get(metric, 0.0) - base.get(metric, 0.0)
    loss_change = final.get("loss", 0.0) - base.get("loss", 0.0)
    if metric_change >= 0 and loss_change < 0:
        return f"Global model is better than the base model on held-out data: {numbers}"
    if metric_change < 0 or (metric_change == 0 and loss_change > 0):
        return (f"Global model is WORSE than the base model on held-out data: {numbers}. "
                "Do not deploy it; more rounds, more data per hospital or a larger privacy "
                "budget may help (README, \"Differential privacy at each hospital\").")
    return (f"Global model is NOT clearly better than the base model on held-out data: "
            f"{numbers} (the {metric} and the loss disagree); check it on your own data with "
            "`fedtune evaluate` before using it.")


def export_hint(run_dir: Path) -> str:
    adapter = run_dir / "adapter"
    return (f"Export the adapter with: fedtune export {run_dir} --out {adapter}\n"
            f"Then use it: fedtune predict {adapter} --data new-records.jsonl "
            f"--out predictions.jsonl  (or fedtune evaluate {adapter} --data labelled.jsonl)")
