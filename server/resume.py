"""Resuming a stopped run: the last saved round's adapter, strategy state and base metrics."""

from __future__ import annotations

from collections.abc import Callable

from fedtune.core.adapters import Adapter
from fedtune.server.collect import EvaluationResult
from fedtune.server.run_dir import RunDirectory
from fedtune.strategies.registry import Strategy


def restore_run(
    run_dir: RunDirectory, strategy: Strategy, say: Callable[[str], None]
) -> tuple[int, Adapter, EvaluationResult]:
    """The round to start at, the global adapter and the base evaluation of a stopped run."""
    last = max(run_dir.saved_rounds(), default=-1)
    if last < 0:
        raise FileNotFoundError(f"{run_dir.path} has no saved round to resume from")
    if last > 0:
        strategy.load_state_dict(run_dir.load_strategy_state(last))
    base = EvaluationResult()
    for record in run_dir.read_metrics():
        if record.get("event") == "evaluate" and record.get("round") == 0:
            base.per_hospital = record.get("per_hospital", {})
    say(f"Resuming {run_dir.path} after round {last}: global adapter and "
        f"{strategy.name} state restored.")
    return last + 1, run_dir.load_adapter(last), base


def attempts_started(run_dir: RunDirectory) -> dict[int, int]:
    """Round → the highest attempt a run already started at it (from its round-start events).

    A resumed run tries a round under the next attempt number, so no secure-aggregation
    keys of a try the crashed coordinator started are ever asked for again.
    """
    started: dict[int, int] = {}
    for record in run_dir.read_metrics():
        if record.get("event") == "round-start":
            server_round = int(record["round"])
            started[server_round] = max(started.get(server_round, 0), int(record["attempt"]))
    return started
