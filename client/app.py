"""The hospital's Flower ClientApp: train and evaluate on local data, send only numbers.

`train`: load the coordinator's global adapter, train locally, reply with the adapter
*delta* (local − global), the example count and training metrics. `evaluate`: load the
global adapter and reply with metrics on the hospital's validation or test split.

A problem the hospital's admin must fix (bad data, a config this node cannot run) is
answered with an error reply that names the hospital and the reason, so the coordinator can
report it and carry on with the other hospitals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedtune.client.data import DataValidationError
from fedtune.client.dp_train import train_privately
from fedtune.client.evaluate import evaluate_classification, evaluate_generation
from fedtune.client.federated_objectives import (
    SharedInitMismatch,
    check_shared_lora_a,
    local_objective,
)
from fedtune.client.hospital_log import IdentifiersInData, check_identifiers, record_hospital_event
from fedtune.client.outgoing import prepare_update
from fedtune.client.privacy import ledger_lock, plan_round
from fedtune.client.privacy_ledger import LedgerError, PrivacyBudgetExhausted
from fedtune.client.secure_views import record_plaintext_view, refuse_recording_outside_simulation
from fedtune.client.session import (
    HospitalIdentity,
    apply_node_settings,
    data_for,
    hospital_identity,
    model_for,
)
from fedtune.client.train import train_locally
from fedtune.core.adapters import Adapter, adapter_delta, adapter_sha256
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.lineage import DataFingerprint, model_sha256
from fedtune.core.model import get_adapter, model_cache_root, resolve_model_source, set_adapter
from fedtune.core.secagg.fixed_point import FixedPointOverflow
from fedtune.core.secagg.identity import IdentityError
from fedtune.core.secagg.primitives import BadSignature, ShareRejected
from fedtune.core.secagg.protocol import ProtocolAbort
from fedtune.core.update_rules import uploaded
from fedtune.core.wire import (
    JOB,
    LINEAGE,
    Job,
    evaluate_reply_content,
    lineage_record,
    parse_request,
    train_reply_content,
)

log = logging.getLogger("fedtune.hospital")

# A deployed hospital's admin must opt in before its node ever sends a delta in clear.
NODE_ALLOW_PLAIN_KEY = "allow-plain-updates"
# The admin agrees to share the training data's example count and label histogram.
NODE_SHARE_SUMMARY_KEY = "share-data-summary"


class PlainUpdateRefused(PermissionError):
    """The coordinator asked for an unmasked update from a node that does not allow it."""


# Error codes in replies (Flower's Error.code is an int); the reason says the rest.
HOSPITAL_CONFIG_ERROR = 4001
HOSPITAL_DATA_ERROR = 4002
HOSPITAL_PRIVACY_BUDGET_EXHAUSTED = 4003
HOSPITAL_LEDGER_ERROR = 4004
HOSPITAL_SECURE_AGGREGATION_ABORT = 4005  # a protocol check failed: this hospital stops
HOSPITAL_UNEXPECTED_ERROR = 4099

# What a hospital's admin must fix, or a privacy rule: answered as an error reply naming the
# hospital (never a crash, never a silent skip).
_REFUSAL_CODES: dict[type[Exception], int] = {
    ConfigError: HOSPITAL_CONFIG_ERROR,
    DataValidationError: HOSPITAL_DATA_ERROR,
    IdentifiersInData: HOSPITAL_DATA_ERROR,
    PrivacyBudgetExhausted: HOSPITAL_PRIVACY_BUDGET_EXHAUSTED,
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


@dataclass(frozen=True)
class LocalUpdate:
    """What one round of local training produced at this hospital (before it is sent)."""

    hospital: HospitalIdentity
    delta: Adapter
    num_examples: int
    metrics: dict[str, float]
    lineage: dict[str, str | int]  # fingerprints that travel with the update (no data)


def train_local_update(global_adapter: Adapter, job: Job, context: Context) -> LocalUpdate:
    """Load the global adapter, train on local data (with DP when planned), return the delta.

    Shared by the plain `train` action and the masked-input stage of secure aggregation, so
    both train identically; only what is sent differs.
    """
    config = apply_node_settings(job.config, context.node_config)
    identity = hospital_identity(context.node_config, config.data)
    refuse_recording_outside_simulation(config, identity)
    if not identity.simulated:  # a deployed hospital's real file; simulations are generated
        check_identifiers(identity.data_path, context.node_config)
    handle = model_for(config)
    data = data_for(config, identity, handle)
    features = data.features["train"]
    seed = _round_seed(config.train.seed, job.server_round, identity.name)
    pad_id = int(handle.tokenizer.pad_token_id)
    task = config.model.task
    privacy_metrics: dict[str, float] = {"dp": 0.0, "train-last-loss": 0.0}
    # One DP training per ledger at a time: budget check, training and record are atomic, so
    # two processes of one node can never both spend the same remaining budget.
    with ledger_lock(identity, config, context.node_config):
        privacy = plan_round(config, identity, context.node_config, len(features), job.run_id)
        check_shared_lora_a(global_adapter, config)  # FFA-LoRA: A must be the shared init
        objective = local_objective(config)  # FedProx's proximal term, FFA-LoRA's frozen A
        set_adapter(handle.model, global_adapter)
        if privacy is None:
            result = train_locally(
                handle.model, features, config.train, pad_id, seed, task, objective=objective
            )
            privacy_metrics["train-last-loss"] = result.last_loss
        else:
            result = train_privately(
                handle.model, features, config.train, privacy.plan, pad_id, seed, task,
                objective=objective,
            )
            entry = privacy.ledger.record(
                privacy.run_id, job.server_round, privacy.plan.noise_multiplier,
                privacy.plan.sample_rate, result.steps,
            )
            # No last-batch loss under DP: a Poisson batch can be a handful of patients.
            privacy_metrics = {
                "dp": 1.0,
                "epsilon": entry.epsilon,
                "delta": entry.delta,
                "epsilon-budget": privacy.budget,
                "noise-multiplier": entry.noise_multiplier,
                "sample-rate": entry.sample_rate,
                "dp-steps": float(entry.steps),
            }
    delta = adapter_delta(get_adapter(handle.model), global_adapter)
    metrics = {
        "train-loss": result.mean_loss,
        "train-steps": float(result.steps),
        "train-seconds": result.seconds,
        "skipped-lines": float(len(data.dataset.skipped)),
        **privacy_metrics,
    }
    log.info("%s: round %d trained %d steps", identity.name, job.server_round, result.steps)
    if data.dataset.skipped:
        log.warning("%s: skipped %d invalid data line(s)", identity.name, len(data.dataset.skipped))
    record_plaintext_view(
        config,
        identity,
        job.server_round,
        uploaded(delta, config),
        uploaded(global_adapter, config),
    )
    return LocalUpdate(identity, delta, len(features), metrics,
                       lineage_of(config, identity, data.lineage, context.node_config))


def lineage_of(
    config: RunConfig, identity: HospitalIdentity, data: DataFingerprint,
    node_config: Mapping[str, Any],
) -> dict[str, str | int]:
    """The fingerprints this hospital sends: always the data and model hashes; its example
    count and label histogram only where its admin shares them (they reveal the data's size,
    which secure aggregation otherwise hides), or for simulated hospitals."""
    model_dir = resolve_model_source(config.model)[0]
    out: dict[str, str | int] = {
        "data_sha256": data.sha256,
        "model_sha256": model_sha256(model_dir, model_cache_root()),
    }
    if identity.simulated or bool(node_config.get(NODE_SHARE_SUMMARY_KEY, False)):
        out["data_examples"] = data.examples
        out["data_labels"] = json.dumps(data.labels, sort_keys=True)
    return out


@app.train()
@_refusing_on_problems
def train(msg: Message, context: Context) -> Message:
    """One round of local training with secure aggregation off: the delta travels in clear.

    The coordinator only sends this when its run sets secure_aggregation.enabled = false
    (research comparisons); it warns about it in its output.
    """
    global_adapter, job = parse_request(msg)
    identity = hospital_identity(context.node_config, job.config.data)
    if not identity.simulated and not context.node_config.get(NODE_ALLOW_PLAIN_KEY, False):
        raise PlainUpdateRefused(
            "the coordinator asked for this hospital's update in clear (secure aggregation "
            "off); this node only sends masked updates. For a research run on non-sensitive "
            f'data, its admin can allow it with --node-config "{NODE_ALLOW_PLAIN_KEY}=true"'
        )
    update = train_local_update(global_adapter, job, context)
    # Weighted by the coordinator (it sees the example count in this mode anyway).
    prepared = prepare_update(update.delta, global_adapter, job.config, weight=1)
    metrics = {"num-examples": float(update.num_examples), **update.metrics, **prepared.metrics}
    delta = prepared.as_adapter()
    content = train_reply_content(delta, metrics, update.hospital.name)
    content[LINEAGE] = lineage_record(update.lineage)
    record_hospital_event(context.node_config, "sent-update", {
        "round": job.server_round, "attempt": job.attempt, "run_id": job.run_id,
        "delta_sha256": adapter_sha256(delta), "mode": "in clear", "lineage": update.lineage,
    })
    return Message(content, reply_to=msg)


@app.evaluate()
@_refusing_on_problems
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global adapter on this hospital's validation or test split."""
    global_adapter, job = parse_request(msg)
    config = apply_node_settings(job.config, context.node_config)
    identity = hospital_identity(context.node_config, config.data)
    handle = model_for(config)
    data = data_for(config, identity, handle)
    set_adapter(handle.model, global_adapter)
    limit = config.evaluation.max_examples
    features = data.features[job.split][:limit]
    if not features:
        return _refuse(msg, HOSPITAL_DATA_ERROR, context, f"no {job.split} examples")
    batch_size = config.train.batch_size
    pad_id = int(handle.tokenizer.pad_token_id)
    if config.model.task == "classify":
        metrics = evaluate_classification(
            handle.model, features, len(config.model.labels), batch_size, pad_id
        )
    else:
        examples = list(getattr(data.splits, job.split))[:limit]
        metrics = evaluate_generation(
            handle.model,
            handle.tokenizer,
            features,
            examples,
            batch_size,
            config.evaluation.generation_examples,
            config.evaluation.max_new_tokens,
        )
    record_hospital_event(context.node_config, "sent-metrics", {
        "round": job.server_round, "split": job.split, "run_id": job.run_id,
        "global_adapter_sha256": adapter_sha256(global_adapter), "metrics": metrics,
    })
    return Message(evaluate_reply_content(metrics, identity.name), reply_to=msg)


def _code_for(exc: Exception) -> int:
    return next(code for kind, code in _REFUSAL_CODES.items() if isinstance(exc, kind))


def _refuse(msg: Message, code: int, context: Context, reason: str) -> Message:
    """An error reply that names the hospital; nothing is trained or sent."""
    name = str(context.node_config.get("hospital-name", f"node {context.node_id}"))
    if "partition-id" in context.node_config:
        name = f"hospital-{int(context.node_config['partition-id']) + 1}"
    log.error("%s refused the request: %s", name, reason)
    try:  # the hospital's own record of what it refused and why
        job = msg.content.config_records.get(JOB)
        record_hospital_event(context.node_config, "refused", {
            "request": msg.metadata.message_type, "reason": reason,
            "round": int(job["round"]) if job is not None else None,  # type: ignore[arg-type]
        })
    except Exception:  # a log that cannot be written must not hide the refusal itself
        log.exception("%s could not write its audit log", name)
    return Message(Error(code=code, reason=f"{name}: {reason}"), reply_to=msg)


def _round_seed(base_seed: int, server_round: int, hospital: str) -> int:
    """Different but reproducible shuffling and dropout per round and hospital."""
    digest = hashlib.sha256(f"{base_seed}/{server_round}/{hospital}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)


# The secure-aggregation stages (imported last: they use the helpers above).
from fedtune.client import secure_stages  # noqa: E402

app.train("secagg_keys")(_refusing_on_problems(secure_stages.advertise_keys))
app.train("secagg_shares")(_refusing_on_problems(secure_stages.share_keys))
app.train("secagg_masked")(_refusing_on_problems(secure_stages.masked_input))
app.train("secagg_unmask")(_refusing_on_problems(secure_stages.reveal_shares))
