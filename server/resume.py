"""Resuming a stopped run: its saved coordinator state, and the adapter and strategy state of
the state's last completed round (nothing is replayed from metrics.jsonl)."""

from __future__ import annotations

from collections.abc import Callable

from fedtune.core.adapters import Adapter
from fedtune.server.run_dir import RunDirectory
from fedtune.server.state import CoordinatorState
from fedtune.strategies.registry import Strategy


def restore_run(
    run_dir: RunDirectory, strategy: Strategy, say: Callable[[str], None]
) -> tuple[CoordinatorState, Adapter]:
    """The coordinator state of a stopped run and its global adapter; the strategy's state
    (e.g. FedAdam's moments) is loaded into `strategy`."""
    state = run_dir.load_state()
    last = state.completed_round
    adapter = run_dir.load_adapter(last)  # names the saved rounds if this one is missing
    if last > 0:
        strategy.load_state_dict(run_dir.load_strategy_state(last))
    say(f"Resuming {run_dir.path} after round {last}: global adapter and "
        f"{strategy.name} state restored.")
    return state, adapter
