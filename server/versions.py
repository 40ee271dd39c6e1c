"""Versions of a run's global adapter: listing, best-round choice, rollback and retention.

Every round's global adapter is a version (`adapters/round-NNNN.safetensors`). A coordinator
lists them with their validation metrics (`fedtune versions`), exports any of them
(`fedtune export --round k`, by default the best), and rolls a run back to round k
(`fedtune server|run --resume RUN --from-round k`). Rolling back never deletes: the later
rounds' adapters and strategy states move to `rolled-back/<time>/`, because they were
released and an auditor may ask for them; hospitals' privacy ledgers keep what those rounds
cost, as they must.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedtune.core.adapters import adapter_sha256
from fedtune.server.audit_trail import CoordinatorAudit
from fedtune.server.records import Rollback
from fedtune.server.report import headline_metric
from fedtune.server.run_dir import RunDirectory


class VersionError(ValueError):
    """A requested version does not exist or cannot be rolled back to."""


@dataclass(frozen=True)
class AdapterVersion:
    """One saved global adapter and what the run knows about it."""

    server_round: int
    sha256: str
    validation: dict[str, float]  # weighted over the hospitals' validation splits
    saved_at: str


def _validation_by_round(run_dir: RunDirectory) -> dict[int, dict[str, float]]:
    """Weighted validation per completed round, from the coordinator state (none before the
    run's first evaluation)."""
    if not run_dir.state_file.is_file():
        return {}
    return run_dir.load_state().validation


def list_versions(run_dir: RunDirectory) -> list[AdapterVersion]:
    """Every saved global adapter, in round order, with its validation metrics (if any)."""
    validation = _validation_by_round(run_dir)
    versions = []
    for server_round in run_dir.saved_rounds():
        path = run_dir.adapters_dir / f"round-{server_round:04d}.safetensors"
        saved_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        versions.append(
            AdapterVersion(
                server_round=server_round,
                sha256=adapter_sha256(run_dir.load_adapter(server_round)),
                validation=validation.get(server_round, {}),
                saved_at=saved_at.isoformat(timespec="seconds"),
            )
        )
    return versions


def validation_score(task: str, weighted: dict[str, float]) -> tuple[float, float] | None:
    """How good a round's validation is: the headline metric (higher is better), then the
    loss (lower is better: it separates rounds while a small model's exact match is all 0)."""
    metric = headline_metric(task)
    if metric not in weighted:
        return None
    return float(weighted[metric]), -float(weighted.get("loss", 0.0))


def best_round(run_dir: RunDirectory) -> int | None:
    """The saved round with the best weighted validation (ties: the earliest)."""
    task = run_dir.config().model.task
    validation = _validation_by_round(run_dir)
    scored = []
    for server_round in run_dir.saved_rounds():  # no hashing: this runs after every round
        score = validation_score(task, validation.get(server_round, {}))
        if score is not None:
            scored.append((score, -server_round))
    return -max(scored)[1] if scored else None


def format_versions(run_dir: RunDirectory) -> str:
    """The table `fedtune versions` prints."""
    versions = list_versions(run_dir)
    if not versions:
        return f"{run_dir.path}: no saved adapters"
    metric = headline_metric(run_dir.config().model.task)
    best = best_round(run_dir)
    lines = [f"{'round':>5}  {'val ' + metric:>14}  {'val loss':>9}  saved (UTC)                "
             "adapter SHA-256"]
    for v in versions:
        score = v.validation.get(metric)
        loss = v.validation.get("loss")
        shown = "-" if score is None else f"{score:.4f}"
        shown_loss = "-" if loss is None else f"{loss:.4f}"
        mark = "  ← best" if v.server_round == best else ""
        label = "initial" if v.server_round == 0 else str(v.server_round)
        lines.append(f"{label:>5}  {shown:>14}  {shown_loss:>9}  {v.saved_at}  "
                     f"{v.sha256[:16]}…{mark}")
    return "\n".join(lines)


def roll_back(run_dir: RunDirectory, to_round: int) -> list[int]:
    """Make `to_round` the run's latest version; return the rounds moved aside.

    The adapters and strategy states of later rounds go to `rolled-back/<time>/` (never
    deleted), and metrics.jsonl gets a `rollback` record, so a resumed run continues from
    `to_round` and its history still shows what happened.
    """
    saved = run_dir.saved_rounds()
    if to_round not in saved:
        raise VersionError(
            f"round {to_round} has no saved adapter in {run_dir.path}; saved rounds: "
            f"{', '.join(map(str, saved)) or 'none'} (see `fedtune versions {run_dir.path}`)"
        )
    later = [r for r in saved if r > to_round]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = run_dir.path / "rolled-back" / stamp
    for server_round in later:
        stem = f"round-{server_round:04d}"
        for source in (
            run_dir.adapters_dir / f"{stem}.safetensors",
            run_dir.strategy_dir / f"{stem}.json",
            run_dir.strategy_dir / f"{stem}.safetensors",
        ):
            if source.exists():
                target = aside / source.parent.name / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
    if to_round > 0:
        state = run_dir.strategy_dir / f"round-{to_round:04d}.json"
        if state.is_file():
            (run_dir.path / "strategy-state.json").write_bytes(state.read_bytes())
    record = Rollback(
        to_round=to_round,
        moved_rounds=later,
        moved_to=str(aside.relative_to(run_dir.path)) if later else None,
        adapter_sha256=adapter_sha256(run_dir.load_adapter(to_round)),
    )
    if run_dir.state_file.is_file():  # a resumed run continues from to_round
        coordinator = run_dir.load_state()
        coordinator.rolled_back(to_round)
        run_dir.save_state(coordinator)
    run_dir.log(record)
    CoordinatorAudit(run_dir).event("rollback", asdict(record))
    return later


def prune_versions(run_dir: RunDirectory, keep: int, protect: set[int]) -> list[int]:
    """Retention: keep the initial adapter, the last `keep` rounds and `protect` (the best);
    delete the other adapter files (their SHA-256 stays in metrics.jsonl). 0 = keep all."""
    if keep <= 0:
        return []
    rounds = [r for r in run_dir.saved_rounds() if r > 0]
    kept = {0, *rounds[-keep:], *protect}
    removed = [r for r in rounds if r not in kept]
    for server_round in removed:
        Path(run_dir.adapters_dir / f"round-{server_round:04d}.safetensors").unlink()
    return removed
