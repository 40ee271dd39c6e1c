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
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.core.adapters import (
    Adapter,
    UpdateRejected,
    adapter_norm,
    adapter_sha256,
    check_update,
)
from fedtune.core.config import RunConfig
from fedtune.core.secagg.encoding import flatten
from fedtune.core.update_rules import honest_sum_norm_bound, update_weight, uploaded
from fedtune.core.wire import (
    EVALUATE,
    TRAIN,
    Job,
    parse_lineage,
    parse_metrics,
    parse_train_reply,
    parse_validation,
    request_content,
)
from fedtune.server.audit_trail import CoordinatorAudit
from fedtune.server.client_privacy import client_level_guarantee
from fedtune.server.collect import EvaluationResult, HospitalNames, Refusal, RoundCollection
from fedtune.server.exchange import HospitalGrid, exchange, grid_node_ids
from fedtune.server.records import EarlyStop, Evaluation, RoundRecord, RoundStarted, SumRevealed
from fedtune.server.report import RoundReport, epsilon_bound, headline_metric
from fedtune.server.resume import restore_run
from fedtune.server.run_dir import RunDirectory
from fedtune.server.sampling import hospitals_for_round
from fedtune.server.secure_round import collect_secure
from fedtune.server.state import CoordinatorState
from fedtune.server.tracking import ExperimentTracker
from fedtune.server.versions import best_round, prune_versions
from fedtune.server.views import ViewRecorder
from fedtune.strategies.aggregate import weighted_sum
from fedtune.strategies.registry import Strategy, build_strategy


class NotEnoughHospitals(RuntimeError):
    """Fewer hospitals than `federation.min_hospitals` connected in time."""


def run_federation(
    grid: HospitalGrid,
    config: RunConfig,
    run_dir: RunDirectory,
    initial_adapter: Adapter,
    say: Callable[[str], None] = print,
    resume: bool = False,
) -> dict[str, Any]:
    """Run all planned rounds; return (and save) the summary.

    With `resume`, continue a run directory that stopped early from its saved coordinator
    state (server/state.py): the global adapter and the strategy's state (e.g. FedAdam's
    moments) of its last completed round, its attempts, releases and base-model evaluation.
    """
    strategy = build_strategy(config.federation)
    settings = config.federation
    report = RoundReport(task=config.model.task, say=say)
    names = HospitalNames()

    views = _view_recorder(config, initial_adapter)
    if not config.secure_aggregation.enabled:
        say(
            "WARNING: secure aggregation is OFF (secure_aggregation.enabled = false): the "
            "coordinator receives every hospital's adapter delta in clear. Use this only for "
            "research comparisons, never with real patient data."
        )
    else:
        config.secure_aggregation.require_threshold()
    if resume:
        state, global_adapter = restore_run(run_dir, strategy, say)
    else:
        state, global_adapter = CoordinatorState(), initial_adapter
        run_dir.save_adapter(0, global_adapter)
        _wait_for_hospitals(grid, settings.min_hospitals, settings.wait_for_hospitals_s, say)
        base, _ = _evaluate(grid, global_adapter, config, run_dir.run_id, 0, "test", names)
        report.evaluation("base model (before round 1), test split", base.per_hospital)
        _log_refusals(base.refusals, say)
        run_dir.log(_evaluation_record(base, 0, "test"))
        state.base_test = _flat(base)
        run_dir.save_state(state)

    federation = _Federation(grid, config, run_dir, strategy, names, views, report, say, state)
    federation.audit.run_start(config, run_dir.run_id, resume)
    for server_round in range(state.completed_round + 1, settings.rounds + 1):
        # An aborted round is tried again (`federation.round_retries`) from the same global
        # adapter, once enough hospitals are connected: a hospital that dropped out and came
        # back takes part. Every try is a new attempt with fresh secure-aggregation keys.
        for _ in range(settings.round_retries + 1):
            attempt = state.next_attempt(server_round)
            if attempt > 1:
                say(f"Round {server_round}: attempt {attempt} (the previous one was aborted).")
            updated = federation.try_round(server_round, attempt, global_adapter)
            if updated is not None:
                global_adapter = updated
                break
        else:
            say(
                f"Round {server_round} could not be completed in {settings.round_retries + 1} "
                f"attempt(s); the global adapter stays that of round {state.completed_round} "
                "(federation.round_retries sets how often an aborted round is tried again)."
            )
            continue
        best = best_round(run_dir)
        prune_versions(run_dir, settings.keep_adapters, {best} if best is not None else set())
        patience = settings.early_stopping_patience
        # With evaluation.with_training, round r's validation arrives with round r + 1.
        validated = max(state.validation, default=0)
        if patience and best is not None and validated - best >= patience:
            say(f"Early stopping after round {server_round}: the validation "
                f"{headline_metric(config.model.task)} has not improved for {patience} "
                f"round(s); the best is round {best} (what `fedtune export` takes).")
            run_dir.log(EarlyStop(round=server_round, best_round=best))
            federation.audit.event("early-stop", {"round": server_round, "best_round": best})
            break

    last = state.completed_round
    validate = federation.asks_validation(last)
    final, last_validation = _evaluate(grid, global_adapter, config, run_dir.run_id,
                                       settings.rounds, "test", names, validate=validate)
    _log_refusals(final.refusals, say)
    if validate:
        federation.validated(last, EvaluationResult(per_hospital=last_validation))
    federation.report_unvalidated()
    run_dir.log(_evaluation_record(final, settings.rounds, "test"))
    client_level = client_level_guarantee(config, state.participation, state.connected)
    summary = {
        "task": config.model.task,
        "rounds": settings.rounds,
        "final_round": max(run_dir.saved_rounds()),
        "best_round": best_round(run_dir),
        "lineage": state.lineage,
        "base_test": state.base_test,
        "final_test": _flat(final),
        "privacy": {
            "accountant": config.privacy.accountant,
            "per_hospital": state.guarantees,
            "client_level": client_level,
        },
    }
    federation.audit.event("run-end", {"final_round": summary["final_round"],
                                       "best_round": summary["best_round"],
                                       "final_test": final.weighted})
    # The head pins the whole chain: a log cut after this record no longer verifies with it.
    summary["audit_head"] = federation.audit.head
    federation.tracker.close()
    run_dir.save_summary(summary)
    report.summary(state.base_test.get("per_hospital", {}), final.per_hospital)
    report.privacy(state.guarantees, config.privacy.accountant)
    report.client_privacy(client_level)
    return summary


class _Federation:
    """One run's collaborators around its `CoordinatorState`; `try_round` is one attempt at a
    round, top to bottom."""

    def __init__(
        self,
        grid: HospitalGrid,
        config: RunConfig,
        run_dir: RunDirectory,
        strategy: Strategy,
        names: HospitalNames,
        views: ViewRecorder | None,
        report: RoundReport,
        say: Callable[[str], None],
        state: CoordinatorState,
    ) -> None:
        self.grid, self.config, self.run_dir, self.strategy = grid, config, run_dir, strategy
        self.names, self.views, self.report, self.say = names, views, report, say
        self.state = state
        self.audit = CoordinatorAudit(run_dir)
        self.tracker = ExperimentTracker(config.tracking, run_dir.run_id, config.to_dict())
        # evaluation.with_training: rounds whose table line waits for their validation
        self._unreported: dict[int, tuple[dict[str, dict[str, float]], float, list[float]]] = {}

    def asks_validation(self, server_round: int) -> bool:
        """Whether the next message that carries round `server_round`'s adapter also asks
        for its validation: with evaluation.with_training, once per round after the first."""
        return (self.config.evaluation.with_training and server_round >= 1
                and not self.state.validation.get(server_round))

    def validated(self, server_round: int, validation: EvaluationResult) -> None:
        """Round `server_round`'s adapter was validated: record, track, report it."""
        if not validation.per_hospital:
            return
        state, run_dir = self.state, self.run_dir
        state.validation[server_round] = dict(validation.weighted)
        run_dir.save_state(state)
        run_dir.log(_evaluation_record(validation, server_round, "validation"))
        self.audit.validation(server_round, dict(validation.weighted))
        train, seconds, epsilons = self._unreported.pop(server_round, ({}, 0.0, []))
        self._track(server_round, validation, seconds, len(train), epsilons)
        self.report.round(server_round, train, validation.per_hospital, seconds)

    def report_unvalidated(self) -> None:
        """Table lines of rounds whose validation never came (no hospital sent it)."""
        for server_round in sorted(self._unreported):
            train, seconds, _ = self._unreported.pop(server_round)
            self.report.round(server_round, train, {}, seconds)

    def _track(self, server_round: int, validation: EvaluationResult, seconds: float,
               hospitals: int, epsilons: list[float]) -> None:
        self.tracker.log_round(server_round, {
            **{f"validation/{k}": float(v) for k, v in validation.weighted.items()},
            "round/seconds": seconds, "round/hospitals": float(hospitals),
            **({"privacy/max_epsilon": max(epsilons)} if epsilons else {}),
        })

    def try_round(self, server_round: int, attempt: int, global_adapter: Adapter) -> Adapter | None:
        """Train, aggregate, check, save and validate; None (adapter untouched) if aborted."""
        config, settings, run_dir, say = self.config, self.config.federation, self.run_dir, self.say
        state = self.state
        started = time.perf_counter()
        available = _wait_for_hospitals(
            self.grid, settings.min_hospitals, settings.wait_for_hospitals_s, say
        )
        node_ids = hospitals_for_round(available, settings, config.train.seed, server_round)
        job = Job(server_round, config, run_dir.run_id, attempt=attempt,
                  validate=self.asks_validation(server_round - 1))
        # Saved before anyone is asked: a resumed run continues the attempt numbering.
        run_dir.save_state(state)
        run_dir.log(RoundStarted(round=server_round, attempt=attempt,
                                 global_adapter_sha256=adapter_sha256(global_adapter)))
        self.audit.round_start(server_round, attempt, global_adapter,
                               [self.names.known(n) for n in node_ids])
        if config.secure_aggregation.enabled:
            collected = collect_secure(
                self.grid, node_ids, global_adapter, job, self.names, self.views
            )
        else:
            collected = _collect_plain(
                self.grid, node_ids, global_adapter, job, self.names, self.views
            )
        train_metrics, refusals = collected.train_metrics, collected.refusals
        train_phase_seconds = time.perf_counter() - started
        _log_refusals(refusals, say)
        if job.validate:  # the round's starting adapter, validated with the training replies
            self.validated(server_round - 1, EvaluationResult(per_hospital=collected.validation))
        self._note_hospital_reports(train_metrics)
        record = RoundRecord(
            round=server_round,
            attempt=attempt,
            hospitals_asked=len(node_ids),
            hospitals_connected=len(available),
            hospitals_sampled=len(node_ids),
            sampled_nodes=node_ids,
            sampled_hospitals=[self.names.known(n) for n in node_ids],
            hospitals_used=sorted(train_metrics),
            refused={r.hospital: r.reason for r in refusals},
            train=train_metrics,
            train_phase_seconds=train_phase_seconds,
            secure_aggregation=collected.details,
            lineage=collected.lineage,
        )
        self.audit.participants(record)
        if collected.sum_revealed:
            # Saved before anything else can fail: a crash after this line and a resumed
            # run that redoes the round count as two releases, as they are.
            state.released(server_round, len(node_ids), len(available))
            run_dir.save_state(state)
            run_dir.log(SumRevealed(round=server_round, hospitals_sampled=len(node_ids),
                                    hospitals_connected=len(available)))
        if collected.update is None:
            self._abort(record, collected.abort_reason)
            return None
        update = collected.update
        if collected.details.get("dropped"):
            say(f"  note: {', '.join(collected.details['dropped'])} dropped out after sharing "
                "keys; their masks were removed with the other hospitals' shares")
        try:
            global_adapter = self.strategy.apply(global_adapter, update)
            record.aggregate_seconds = time.perf_counter() - started - train_phase_seconds
        except UpdateRejected as exc:
            self._abort(record, str(exc))
            return None
        self.audit.aggregate(server_round, update.mean_delta(), update.num_hospitals)
        # State first: a saved adapter always has its strategy state (resume trusts it).
        run_dir.save_strategy_state(server_round, self.strategy.state_dict())
        run_dir.save_adapter(server_round, global_adapter)
        self.audit.checkpoint(server_round, global_adapter)
        record.privacy_per_hospital = {
            h: state.guarantees[h] for h in train_metrics if h in state.guarantees
        }
        client_level = client_level_guarantee(config, state.participation, state.connected)
        if client_level:
            record.client_level_privacy = client_level
        self.audit.privacy(server_round, record.privacy_per_hospital, client_level)
        bounds = (epsilon_bound(g) for g in record.privacy_per_hospital.values())
        epsilons = [e for e in bounds if e is not None]
        record.aggregate_norm = adapter_norm(update.mean_delta())
        record.global_adapter_sha256 = adapter_sha256(global_adapter)
        if config.evaluation.with_training:
            # Validated by the next message that carries this adapter (next round's training
            # or the final evaluation); the resume point is saved now.
            state.completed(server_round, {}, collected.lineage)
            run_dir.save_state(state)
            record.seconds = time.perf_counter() - started
            run_dir.log(record)
            self._unreported[server_round] = (train_metrics, record.seconds, epsilons)
            return global_adapter
        validation, _ = _evaluate(
            self.grid, global_adapter, config, run_dir.run_id, server_round, "validation",
            self.names,
        )
        _log_refusals(validation.refusals, say)
        # The new resume point: its adapter and strategy state are on disk.
        state.completed(server_round, validation.weighted, collected.lineage)
        run_dir.save_state(state)
        seconds = time.perf_counter() - started
        record.validation = _flat(validation)
        record.seconds = seconds
        run_dir.log(record)
        self.audit.validation(server_round, dict(validation.weighted))
        self._track(server_round, validation, seconds, len(train_metrics), epsilons)
        self.report.round(server_round, train_metrics, validation.per_hospital, seconds)
        return global_adapter

    def _abort(self, record: RoundRecord, reason: str) -> None:
        self.say(f"Round {record.round} aborted: {reason}. The global adapter is unchanged.")
        record.aborted, record.reason = True, reason
        self.run_dir.log(record)
        self.audit.aborted(record, reason)

    def _note_hospital_reports(self, train_metrics: dict[str, dict[str, float]]) -> None:
        secure = self.config.secure_aggregation
        clip, cap = secure.clip_norm, secure.max_weight
        for hospital, metrics in sorted(train_metrics.items()):
            if metrics.get("dp", 0.0) > 0:
                keys = ("epsilon", "delta", "epsilon-budget", "epsilon-target",
                        "dp-patient-level")
                self.state.guarantees[hospital] = {k: metrics[k] for k in keys if k in metrics}
            if metrics.get("skipped-lines", 0) > 0:
                self.say(f"  note: {hospital} skipped {int(metrics['skipped-lines'])} invalid "
                         "data line(s) (data.skip_bad_lines = true)")
            if metrics.get("delta-clipped", 0) > 0:
                self.say(f"  note: {hospital}'s update was longer than secure_aggregation."
                         f"clip_norm = {clip:g} and was clipped to it")
            if metrics.get("weight-capped", 0) > 0:
                self.say(f"  note: {hospital}'s weight was capped at "
                         f"secure_aggregation.max_weight = {cap}")


def _collect_plain(
    grid: HospitalGrid,
    node_ids: list[int],
    reference: Adapter,
    job: Job,
    names: HospitalNames,
    views: ViewRecorder | None,
) -> RoundCollection:
    """Secure aggregation off: every delta arrives in clear and is summed here."""
    global_adapter, reference = reference, uploaded(reference, job.config)

    def parse(reply: Any) -> tuple[Adapter, dict[str, float], dict[str, Any],
                                   dict[str, float] | None]:
        delta, reply_metrics = parse_train_reply(reply)
        lineage = parse_lineage(reply)
        check_update(delta, reference, names.of(reply))
        return delta, reply_metrics, lineage, parse_validation(reply)

    content = request_content(global_adapter, job)
    result = exchange(
        grid, names, dict.fromkeys(node_ids, content), TRAIN, str(job.server_round),
        job.config.federation.round_timeout_s, job.config.federation.max_reply_mb, parse,
        stage="training",
    )
    out = RoundCollection(details={"secure_aggregation": False}, refusals=result.refusals)
    deltas: list[Adapter] = []
    weights: list[float] = []
    for hospital, answer in result.answers.items():
        delta, reply_metrics, lineage, validation = answer.parsed
        if validation is not None:
            out.validation[hospital] = validation
        if views is not None:
            buffer = io.BytesIO()
            np.save(buffer, flatten(delta, reference).astype(np.float32))
            views.received(job.server_round, hospital, buffer.getvalue(), "float32")
        deltas.append(delta)
        weights.append(update_weight(job.config, int(reply_metrics["num-examples"])))
        out.train_metrics[hospital] = reply_metrics
        out.lineage[hospital] = lineage
    needed = job.config.federation.min_hospitals
    if len(deltas) < needed:
        out.abort_reason = f"{len(deltas)} usable update(s), at least {needed} needed"
        return out
    update = weighted_sum(deltas, weights)
    out.sum_revealed = True
    size = sum(int(v.size) for v in reference.values())
    bound = honest_sum_norm_bound(job.config, len(deltas), update.weight_sum, size, 0.0)
    norm = adapter_norm(update.weighted_delta_sum)
    if bound is not None and norm > bound * (1 + 1e-6):
        out.abort_reason = (
            f"the aggregate's norm {norm:.4g} exceeds what clipped hospitals can send "
            f"({bound:.4g}): a hospital ignored its clip bound"
        )
        return out
    out.update = update
    return out


def _view_recorder(config: RunConfig, reference: Adapter) -> ViewRecorder | None:
    root = config.secure_aggregation.record_views_dir
    if not root:
        return None
    mode = "secure-aggregation" if config.secure_aggregation.enabled else "plain"
    return ViewRecorder(Path(root), reference, mode)


def _evaluate(
    grid: HospitalGrid,
    adapter: Adapter,
    config: RunConfig,
    run_id: str,
    server_round: int,
    split: str,
    names: HospitalNames,
    validate: bool = False,
) -> tuple[EvaluationResult, dict[str, dict[str, float]]]:
    """Every connected hospital evaluates `adapter` on `split`; with `validate`, also on
    its validation split, in the same message (returned second, per hospital)."""
    job = Job(server_round, config, run_id, split=split, validate=validate)
    content = request_content(adapter, job)

    def parse(reply: Any) -> tuple[dict[str, float], dict[str, float] | None]:
        return parse_metrics(reply), parse_validation(reply)

    result = exchange(
        grid, names, dict.fromkeys(grid_node_ids(grid), content), EVALUATE,
        f"{server_round}-{split}", config.federation.round_timeout_s,
        config.federation.max_reply_mb, parse, stage=f"{split} evaluation",
    )
    per_hospital = {hospital: answer.parsed[0] for hospital, answer in result.answers.items()}
    validation = {hospital: answer.parsed[1] for hospital, answer in result.answers.items()
                  if answer.parsed[1] is not None}
    return EvaluationResult(per_hospital=per_hospital, refusals=result.refusals), validation


def _wait_for_hospitals(
    grid: HospitalGrid, minimum: int, timeout_s: float, say: Callable[[str], None]
) -> list[int]:
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        node_ids = grid_node_ids(grid)
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


def _evaluation_record(result: EvaluationResult, server_round: int, split: str) -> Evaluation:
    return Evaluation(round=server_round, split=split, **_flat(result))


def _flat(result: EvaluationResult) -> dict[str, Any]:
    return {
        "weighted": result.weighted,
        "per_hospital": result.per_hospital,
        "refused": {r.hospital: r.reason for r in result.refusals},
    }


def _log_refusals(refusals: list[Refusal], say: Callable[[str], None]) -> None:
    for refusal in refusals:
        say(f"  ! {refusal.hospital}: {refusal.reason}")
