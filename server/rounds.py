"""The coordinator's round loop, top to bottom, on any Flower `Grid`.

Per round: send the global adapter to every connected hospital, collect their deltas,
refuse any update that does not fit (named hospital, reason), aggregate the rest with the
configured strategy on a copy, check the result, swap it in, save a checkpoint, and evaluate
at the hospitals. Test metrics are taken before round 1 (the base model) and after the last
round, so the summary shows what federation gained on held-out data.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.adapters import Adapter, UpdateRejected, adapter_norm, check_update
from fedtune.config import RunConfig
from fedtune.secagg.encoding import flatten
from fedtune.wire import (
    EVALUATE,
    TRAIN,
    Job,
    MalformedReply,
    parse_metrics,
    parse_train_reply,
    request_content,
)
from server.collect import HospitalNames, Refusal, RoundCollection
from server.report import RoundReport, weighted_metrics
from server.run_dir import RunDirectory
from server.secure_round import collect_secure
from server.views import ViewRecorder
from strategies.aggregate import weighted_sum
from strategies.registry import build_strategy


class NotEnoughHospitals(RuntimeError):
    """Fewer hospitals than `federation.min_hospitals` connected in time."""


@dataclass
class EvaluationResult:
    """Metrics per hospital for one split, and the example-weighted mean."""

    per_hospital: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def weighted(self) -> dict[str, float]:
        return weighted_metrics(self.per_hospital)


def run_federation(
    grid: Grid,
    config: RunConfig,
    run_dir: RunDirectory,
    initial_adapter: Adapter,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run all planned rounds; return (and save) the summary."""
    strategy = build_strategy(config.federation)
    settings = config.federation
    global_adapter = initial_adapter
    run_dir.save_adapter(0, global_adapter)
    report = RoundReport(task=config.model.task, say=say)
    names = HospitalNames()
    guarantees: dict[str, dict[str, float]] = {}  # latest (ε, δ) each hospital reported

    views = _view_recorder(config, initial_adapter)
    if not config.secure_aggregation.enabled:
        say(
            "WARNING: secure aggregation is OFF (secure_aggregation.enabled = false): the "
            "coordinator receives every hospital's adapter delta in clear. Use this only for "
            "research comparisons, never with real patient data."
        )
    else:
        config.secure_aggregation.require_threshold()
    _wait_for_hospitals(grid, settings.min_hospitals, settings.wait_for_hospitals_s, say)
    base = _evaluate(grid, global_adapter, config, run_dir.run_id, 0, "test", names)
    report.evaluation("base model (before round 1), test split", base.per_hospital)
    _log_refusals(base.refusals, say)
    run_dir.append_metrics({"event": "evaluate", "round": 0, "split": "test", **_flat(base)})

    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        node_ids = _wait_for_hospitals(
            grid, settings.min_hospitals, settings.wait_for_hospitals_s, say
        )
        job = Job(server_round, config, run_dir.run_id)
        if config.secure_aggregation.enabled:
            collected = collect_secure(grid, node_ids, global_adapter, job, names, views)
        else:
            collected = _collect_plain(grid, node_ids, global_adapter, job, names, views)
        train_metrics, refusals = collected.train_metrics, collected.refusals
        train_phase_seconds = time.perf_counter() - started
        _log_refusals(refusals, say)
        for hospital, metrics in sorted(train_metrics.items()):
            if metrics.get("dp", 0.0) > 0:
                guarantees[hospital] = {
                    key: metrics[key] for key in ("epsilon", "delta", "epsilon-budget")
                }
            if metrics.get("skipped-lines", 0) > 0:
                say(f"  note: {hospital} skipped {int(metrics['skipped-lines'])} invalid data "
                    "line(s) (data.skip_bad_lines = true)")  # fmt: skip
            if metrics.get("delta-clipped", 0) > 0:
                say(f"  note: {hospital}'s update was longer than secure_aggregation.clip_norm "
                    f"= {config.secure_aggregation.clip_norm:g} and was clipped to it")  # fmt: skip
            if metrics.get("weight-capped", 0) > 0:
                say(f"  note: {hospital}'s weight was capped at secure_aggregation.max_weight "
                    f"= {config.secure_aggregation.max_weight}")  # fmt: skip
        record: dict[str, Any] = {
            "event": "round",
            "round": server_round,
            "hospitals_asked": len(node_ids),
            "hospitals_used": sorted(train_metrics),
            "refused": {r.hospital: r.reason for r in refusals},
            "train": train_metrics,
            "train_phase_seconds": train_phase_seconds,
            "secure_aggregation": collected.details,
        }
        if collected.update is None:
            say(f"Round {server_round} aborted: {collected.abort_reason}. "
                "The global adapter is unchanged.")  # fmt: skip
            run_dir.append_metrics({**record, "aborted": True, "reason": collected.abort_reason})
            continue
        update = collected.update
        if collected.details.get("dropped"):
            say(f"  note: {', '.join(collected.details['dropped'])} dropped out after sharing "
                "keys; their masks were removed with the other hospitals' shares")  # fmt: skip
        try:
            global_adapter = strategy.apply(global_adapter, update)
            record["aggregate_seconds"] = time.perf_counter() - started - train_phase_seconds
        except UpdateRejected as exc:
            say(f"Round {server_round} aborted: {exc}. The global adapter is unchanged.")
            run_dir.append_metrics({**record, "aborted": True, "reason": str(exc)})
            continue
        run_dir.save_adapter(server_round, global_adapter)
        run_dir.save_strategy_state(server_round, strategy.state_dict())
        validation = _evaluate(
            grid, global_adapter, config, run_dir.run_id, server_round, "validation", names
        )
        _log_refusals(validation.refusals, say)
        seconds = time.perf_counter() - started
        record.update(
            {
                "aggregate_norm": adapter_norm(update.mean_delta()),
                "validation": _flat(validation),
                "seconds": seconds,
            }
        )
        run_dir.append_metrics(record)
        report.round(server_round, train_metrics, validation.per_hospital, seconds)

    final = _evaluate(grid, global_adapter, config, run_dir.run_id, settings.rounds, "test", names)
    _log_refusals(final.refusals, say)
    run_dir.append_metrics(
        {"event": "evaluate", "round": settings.rounds, "split": "test", **_flat(final)}
    )
    summary = {
        "task": config.model.task,
        "rounds": settings.rounds,
        "final_round": max(run_dir.saved_rounds()),
        "base_test": _flat(base),
        "final_test": _flat(final),
        "privacy": {
            "accountant": config.privacy.accountant,
            "per_hospital": guarantees,
        },
    }
    run_dir.save_summary(summary)
    report.summary(base.per_hospital, final.per_hospital)
    report.privacy(guarantees, config.privacy.accountant)
    return summary


def _collect_plain(
    grid: Grid,
    node_ids: list[int],
    reference: Adapter,
    job: Job,
    names: HospitalNames,
    views: ViewRecorder | None,
) -> RoundCollection:
    """Secure aggregation off: every delta arrives in clear and is summed here."""
    messages = [
        Message(
            request_content(reference, job),
            dst_node_id=node_id,
            message_type=TRAIN,
            group_id=str(job.server_round),
        )
        for node_id in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=job.config.federation.round_timeout_s)
    out = RoundCollection(details={"secure_aggregation": False})
    deltas: list[Adapter] = []
    weights: list[float] = []
    for reply in replies:
        hospital = names.of(reply)
        if reply.has_error():
            out.refusals.append(
                Refusal(hospital, reply.error.reason or f"error {reply.error.code}")
            )
            continue
        try:
            delta, reply_metrics = parse_train_reply(reply)
            check_update(delta, reference, hospital)
        except (MalformedReply, UpdateRejected) as exc:
            reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
            out.refusals.append(Refusal(hospital, reason))
            continue
        if hospital in out.train_metrics:
            out.refusals.append(Refusal(hospital, "sent more than one update this round"))
            continue
        if views is not None:
            buffer = io.BytesIO()
            np.save(buffer, flatten(delta, reference).astype(np.float32))
            views.received(job.server_round, hospital, buffer.getvalue(), "float32")
        deltas.append(delta)
        weights.append(reply_metrics["num-examples"])
        out.train_metrics[hospital] = reply_metrics
    needed = job.config.federation.min_hospitals
    if len(deltas) < needed:
        out.abort_reason = f"{len(deltas)} usable update(s), at least {needed} needed"
        return out
    out.update = weighted_sum(deltas, weights)
    return out


def _view_recorder(config: RunConfig, reference: Adapter) -> ViewRecorder | None:
    root = config.secure_aggregation.record_views_dir
    if not root:
        return None
    mode = "secure-aggregation" if config.secure_aggregation.enabled else "plain"
    return ViewRecorder(Path(root), reference, mode)


def _evaluate(
    grid: Grid,
    adapter: Adapter,
    config: RunConfig,
    run_id: str,
    server_round: int,
    split: str,
    names: HospitalNames,
) -> EvaluationResult:
    messages = [
        Message(
            request_content(adapter, Job(server_round, config, run_id, split=split)),
            dst_node_id=node_id,
            message_type=EVALUATE,
            group_id=f"{server_round}-{split}",
        )
        for node_id in grid.get_node_ids()
    ]
    result = EvaluationResult()
    for reply in grid.send_and_receive(messages, timeout=config.federation.round_timeout_s):
        hospital = names.of(reply)
        if reply.has_error():
            result.refusals.append(Refusal(hospital, reply.error.reason or "evaluation failed"))
            continue
        try:
            result.per_hospital[hospital] = parse_metrics(reply)
        except MalformedReply as exc:
            result.refusals.append(Refusal(hospital, str(exc)))
    return result


def _wait_for_hospitals(
    grid: Grid, minimum: int, timeout_s: float, say: Callable[[str], None]
) -> list[int]:
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() > deadline:
            raise NotEnoughHospitals(
                f"only {len(node_ids)} hospital node(s) connected within {timeout_s:.0f} s; "
                f"federation.min_hospitals = {minimum}."
            )
        if not announced:
            say(f"Waiting for hospitals: {len(node_ids)} of at least {minimum} connected...")
            announced = True
        time.sleep(1.0)


def _flat(result: EvaluationResult) -> dict[str, Any]:
    return {
        "weighted": result.weighted,
        "per_hospital": result.per_hospital,
        "refused": {r.hospital: r.reason for r in result.refusals},
    }


def _log_refusals(refusals: list[Refusal], say: Callable[[str], None]) -> None:
    for refusal in refusals:
        say(f"  ! {refusal.hospital}: {refusal.reason}")
