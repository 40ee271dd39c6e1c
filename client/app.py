"""The hospital's Flower ClientApp: train and evaluate on local data, send only numbers.

`train`: load the coordinator's global adapter, train locally, reply with the adapter
*delta* (local − global), the example count and training metrics. `evaluate`: load the
global adapter and reply with metrics on the hospital's validation or test split.

A problem the hospital's admin must fix (bad data, a config this node cannot run) is
answered with an error reply that names the hospital and the reason, so the coordinator can
report it and carry on with the other hospitals.

Light at import: a deployed node answers every message in a fresh process (Flower 1.41 starts
one `flwr-clientapp` per message), and most messages of a secure round (keys, shares, the
survivor check, unmasking) need no model. So this module and the secure stages import nothing
of torch, transformers, peft or Opacus; only the handlers that train or evaluate import them,
when they run (`tests/test_light_stages.py` holds this).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedtune.client import secure_stages
from fedtune.client.data import DataValidationError
from fedtune.client.hospital import hospital_identity
from fedtune.client.hospital_log import (
    EvaluationLimitReached,
    IdentifiersInData,
    privacy_statement,
    record_hospital_event,
    record_sent_metrics,
)
from fedtune.client.node_settings import NodeSettings, node_key, parse_node_settings
from fedtune.client.outgoing import prepare_update
from fedtune.client.privacy_ledger import LedgerError, PrivacyBudgetExhausted
from fedtune.core.adapters import adapter_sha256
from fedtune.core.config import ConfigError
from fedtune.core.errors import SharedInitMismatch
from fedtune.core.secagg.fixed_point import FixedPointOverflow
from fedtune.core.secagg.identity import IdentityError
from fedtune.core.secagg.primitives import BadSignature, ShareRejected
from fedtune.core.secagg.protocol import ProtocolAbort
from fedtune.core.wire import (
    JOB,
    LINEAGE,
    VALIDATION,
    evaluate_reply_content,
    lineage_record,
    parse_request,
    train_reply_content,
    validation_record,
)

log = logging.getLogger("fedtune.hospital")

class PlainUpdateRefused(PermissionError):
    """The coordinator asked for an unmasked update from a node that does not allow it."""


# Error codes in replies (Flower's Error.code is an int); the reason says the rest.
HOSPITAL_CONFIG_ERROR = 4001
HOSPITAL_DATA_ERROR = 4002
HOSPITAL_PRIVACY_BUDGET_EXHAUSTED = 4003
HOSPITAL_LEDGER_ERROR = 4004
HOSPITAL_SECURE_AGGREGATION_ABORT = 4005  # a protocol check failed: this hospital stops
HOSPITAL_EVALUATION_LIMIT = 4006  # the run asked for more evaluations than the node allows
HOSPITAL_UNEXPECTED_ERROR = 4099

# What a hospital's admin must fix, or a privacy rule: answered as an error reply naming the
# hospital (never a crash, never a silent skip).
_REFUSAL_CODES: dict[type[Exception], int] = {
    ConfigError: HOSPITAL_CONFIG_ERROR,
    DataValidationError: HOSPITAL_DATA_ERROR,
    IdentifiersInData: HOSPITAL_DATA_ERROR,
    PrivacyBudgetExhausted: HOSPITAL_PRIVACY_BUDGET_EXHAUSTED,
    EvaluationLimitReached: HOSPITAL_EVALUATION_LIMIT,
    LedgerError: HOSPITAL_LEDGER_ERROR,
    IdentityError: HOSPITAL_CONFIG_ERROR,
    SharedInitMismatch: HOSPITAL_CONFIG_ERROR,
    PlainUpdateRefused: HOSPITAL_SECURE_AGGREGATION_ABORT,
    ProtocolAbort: HOSPITAL_SECURE_AGGREGATION_ABORT,
    BadSignature: HOSPITAL_SECURE_AGGREGATION_ABORT,
    ShareRejected: HOSPITAL_SECURE_AGGREGATION_ABORT,
    FixedPointOverflow: HOSPITAL_SECURE_AGGREGATION_ABORT,
}
_HOSPITAL_PROBLEMS = tuple(_REFUSAL_CODES)

Handler = Callable[[Message, Context], Message]

app = ClientApp()


def _refusing_on_problems(handler: Handler) -> Handler:
    """Answer every failure with an error reply that names the hospital and the reason.

    Problems the hospital's admin can fix (config, data, privacy budget, ledger) get their
    own codes; anything else is logged with its traceback at the hospital, and only its type
    and message travel (never data).
    """

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except _HOSPITAL_PROBLEMS as exc:
            return _refuse(msg, _code_for(exc), context, str(exc))
        except Exception as exc:
            log.exception("unexpected error while answering the coordinator")
            reason = f"unexpected error at the hospital: {type(exc).__name__}: {exc}"
            return _refuse(msg, HOSPITAL_UNEXPECTED_ERROR, context, reason)

    return answer


@app.train()
@_refusing_on_problems
def train(msg: Message, context: Context) -> Message:
    """One round of local training with secure aggregation off: the delta travels in clear.

    The coordinator only sends this when its run sets secure_aggregation.enabled = false
    (research comparisons); it warns about it in its output.
    """
    global_adapter, job = parse_request(msg)
    node = parse_node_settings(context.node_config)
    identity = hospital_identity(node, job.config.data)
    # A deployed hospital's admin must opt in before its node ever sends a delta in clear.
    if not identity.simulated and not node.allow_plain_updates:
        raise PlainUpdateRefused(
            "the coordinator asked for this hospital's update in clear (secure aggregation "
            "off); this node only sends masked updates. For a research run on non-sensitive "
            "data, its admin can allow it with --node-config "
            f'"{node_key("allow_plain_updates")}=true"'
        )
    from fedtune.client.local_round import train_local_update  # torch: only when training

    update = train_local_update(global_adapter, job, node)
    # Weighted by the coordinator (it sees the example count in this mode anyway).
    prepared = prepare_update(update.delta, global_adapter, job.config, weight=1)
    metrics = {"num-examples": float(update.num_examples), **update.metrics, **prepared.metrics}
    delta = prepared.as_adapter()
    content = train_reply_content(delta, metrics, update.hospital.name)
    content[LINEAGE] = lineage_record(update.lineage)
    if update.validation is not None:
        content[VALIDATION] = validation_record(update.validation)
        record_sent_metrics(node, job.server_round, job.run_id, "validation",
                            adapter_sha256(global_adapter), update.validation)
    record_hospital_event(node, "sent-update", {
        "round": job.server_round, "attempt": job.attempt, "run_id": job.run_id,
        "delta_sha256": adapter_sha256(delta), "mode": "in clear", "lineage": update.lineage,
        "privacy": privacy_statement(update.metrics),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
@_refusing_on_problems
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global adapter on this hospital's validation or test split."""
    from fedtune.client.local_evaluation import (  # torch: only when evaluating
        evaluate_adapter,
        validate_received,
    )

    global_adapter, job = parse_request(msg)
    node = parse_node_settings(context.node_config)
    digest = adapter_sha256(global_adapter)
    result = evaluate_adapter(global_adapter, job, node, job.split)
    record_sent_metrics(node, job.server_round, job.run_id, job.split, digest, result.metrics)
    content = evaluate_reply_content(result.metrics, result.hospital.name)
    # The final evaluation also validates the last round's adapter (if the limit allows).
    validation = validate_received(global_adapter, job, node) if job.validate else None
    if validation is not None:
        record_sent_metrics(node, job.server_round, job.run_id, "validation", digest, validation)
        content[VALIDATION] = validation_record(validation)
    return Message(content, reply_to=msg)


def _code_for(exc: Exception) -> int:
    return next(code for kind, code in _REFUSAL_CODES.items() if isinstance(exc, kind))


def _refuse(msg: Message, code: int, context: Context, reason: str) -> Message:
    """An error reply that names the hospital; nothing is trained or sent."""
    node = _settings_for_refusal(context)
    name = node.display_name if node.name or node.partition_id is not None else (
        f"node {context.node_id}")
    log.error("%s refused the request: %s", name, reason)
    try:  # the hospital's own record of what it refused and why
        job = msg.content.config_records.get(JOB)
        record_hospital_event(node, "refused", {
            "request": msg.metadata.message_type, "reason": reason,
            "round": int(job["round"]) if job is not None else None,  # type: ignore[arg-type]
        })
    except Exception:  # a log that cannot be written must not hide the refusal itself
        log.exception("%s could not write its audit log", name)
    return Message(Error(code=code, reason=f"{name}: {reason}"), reply_to=msg)


def _settings_for_refusal(context: Context) -> NodeSettings:
    """The node's settings to name it in a refusal, even when they are what was refused: then
    only its name and audit log are taken (as given), so the refusal still names the hospital
    and lands in its own log."""
    try:
        return parse_node_settings(context.node_config)
    except ConfigError:
        raw = context.node_config
        name, log_path = raw.get("hospital-name"), raw.get("audit-log")
        partition = raw.get("partition-id")
        return NodeSettings(
            name=name.strip() if isinstance(name, str) else "",
            partition_id=partition if isinstance(partition, int) and partition >= 0 else None,
            audit_log=Path(log_path).expanduser() if isinstance(log_path, str) and log_path
            else None,
        )


# The secure-aggregation stages.

app.train("secagg_keys")(_refusing_on_problems(secure_stages.advertise_keys))
app.train("secagg_shares")(_refusing_on_problems(secure_stages.share_keys))
app.train("secagg_masked")(_refusing_on_problems(secure_stages.masked_input))
app.train("secagg_confirm")(_refusing_on_problems(secure_stages.confirm_view))
app.train("secagg_unmask")(_refusing_on_problems(secure_stages.reveal_shares))
