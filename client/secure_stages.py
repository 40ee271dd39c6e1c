"""The hospital's side of secure aggregation: five ClientApp actions around one protocol.

Each handler reads the stage's request, runs the pure protocol step, keeps the round's
secrets in the node's own `context.state` (they never leave the hospital) and replies.
Only the masked-input stage trains; the others import nothing heavy, so a deployed node,
which answers each message in a fresh process, answers them in well under a second.
Any failed check (a bad signature, a tampered share, an inconsistent survivor list) raises,
and the ClientApp answers with an error naming this hospital: it takes no further part in
the round, so nothing of its data can be unmasked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client.hospital import HospitalIdentity, apply_node_settings, hospital_identity
from fedtune.client.hospital_log import (
    bytes_sha256,
    logged_events,
    privacy_statement,
    record_hospital_event,
    record_sent_metrics,
)
from fedtune.client.node_settings import NodeSettings, node_key, parse_node_settings
from fedtune.client.outgoing import prepare_update
from fedtune.client.secure_views import refuse_recording_outside_simulation
from fedtune.core.adapters import adapter_sha256
from fedtune.core.audit import canonical_sha256
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.secagg import protocol
from fedtune.core.secagg.encoding import encode_values
from fedtune.core.secagg.identity import (
    load_enrollment,
    load_identity_key,
    simulated_identity_paths,
)
from fedtune.core.secagg.primitives import raw_public
from fedtune.core.secagg.wire import (
    ADVERT,
    MASKED_INPUT,
    OUTBOX,
    REVEALED,
    VIEW_SIGNATURE,
    advert_record,
    masked_record,
    named,
    outbox_record,
    parse_inbox,
    parse_participants,
    parse_survivors,
    parse_view_signatures,
    revealed_record,
    view_signature_record,
)
from fedtune.core.update_rules import secure_codec, update_weight
from fedtune.core.wire import (
    JOB,
    LINEAGE,
    METRICS,
    VALIDATION,
    Job,
    lineage_record,
    parse_request,
    validation_record,
)

_STATE = "secagg-round"  # context.state record holding this round's secrets
_USED = "secagg-attempts"  # context.state record: every (run, round, attempt) keyed so far
# Training metrics that reveal the number of training examples (the masked weight).
SIZE_REVEALING_METRICS = ("sample-rate", "noise-multiplier", "dp-steps", "train-steps")
# What a deployed hospital's masked-input reply carries, and nothing else (README, threat
# model; tested): a metric not listed stays at the hospital. Its exact ε and δ after a round
# are functions of its data size (q = B/n with σ known from the plan), and so is its training
# time: they stay in its ledger and log; the coordinator learns the run's planned ε bound.
DEPLOYED_MASKED_METRICS = ("dp", "dp-patient-level", "epsilon-target", "train-loss",
                           "train-last-loss",
                           "skipped-lines", "delta-clipped", "weight-capped",
                           "noise-truncated", "client-dp", "secagg-seconds")

log = logging.getLogger("fedtune.hospital")


def advertise_keys(msg: Message, context: Context) -> Message:
    """Stage 1: fresh round keys, signed with this hospital's identity key."""
    started = time.perf_counter()
    job = _job(msg)
    node = parse_node_settings(context.node_config)
    apply_node_settings(job.config, node)  # refused before any key is made
    identity = hospital_identity(node, job.config.data)
    refuse_recording_outside_simulation(job.config, identity)
    signing_key, _ = hospital_keys(node, job.config, identity)
    _refuse_reused_attempt(context, node, job)
    state, advert = protocol.advertise(
        signing_key, identity.name, job.run_id, job.server_round, job.attempt,
        canonical_sha256(job.config.to_dict()),
    )
    _save(context, state, job, time.perf_counter() - started)
    return _reply(msg, identity, {ADVERT: advert_record(advert)})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: check every hospital's signed keys, send each an encrypted share pair."""
    started = time.perf_counter()
    job = _job(msg)
    node = parse_node_settings(context.node_config)
    identity = hospital_identity(node, job.config.data)
    _, enrollment = hospital_keys(node, job.config, identity)
    state, spent = _load(context, job)
    adverts = parse_participants(msg)
    try:  # refuse impossible settings now, not after training
        secure_codec(job.config, len(adverts))
    except ValueError as exc:
        raise ConfigError(f"secure aggregation: {exc}") from None
    outbox, commitment = protocol.make_shares(
        state, adverts, enrollment, job.config.secure_aggregation.threshold,
        minimum_threshold(node, identity, enrollment),
    )
    _save(context, state, job, spent + time.perf_counter() - started)
    return _reply(msg, identity, {OUTBOX: outbox_record(outbox, commitment)})


def masked_input(msg: Message, context: Context) -> Message:
    """Stage 3: accept the relayed shares, train, and send the masked, weighted delta."""
    started = time.perf_counter()
    global_adapter, job = parse_request(msg)
    node = parse_node_settings(context.node_config)
    identity = hospital_identity(node, job.config.data)
    state, spent = _load(context, job)
    mask_set, inbox = parse_inbox(msg)
    protocol.accept_shares(state, mask_set, inbox)
    spent += time.perf_counter() - started
    # The one stage that trains, and the only one that imports torch (see client/app.py).
    from fedtune.client.local_round import train_local_update

    update = train_local_update(global_adapter, job, node)
    started = time.perf_counter()
    config = job.config
    weight = update_weight(config, update.num_examples)
    prepared = prepare_update(update.delta, global_adapter, config, weight)
    codec = secure_codec(config, len(mask_set))
    masked = protocol.mask(state, encode_values(prepared.values, weight, codec),
                           adapter_sha256(global_adapter))
    spent += time.perf_counter() - started
    _save(context, state, job, spent)
    if weight < update.num_examples and not config.privacy.client_level:
        log.warning("%s: weight capped at secure_aggregation.max_weight = %d",
                    identity.name, config.secure_aggregation.max_weight)
    # The weight is masked; metrics from which the coordinator could read this hospital's
    # data size (DP sampling rate, σ calibrated from it, step counts) stay here.
    shown = {k: v for k, v in update.metrics.items() if k not in SIZE_REVEALING_METRICS}
    shown = {**shown, **prepared.metrics, "secagg-seconds": spent}
    metrics: dict[str, int | float | list[int] | list[float]] = dict(
        shown if identity.simulated else deployed_view(shown))
    record_hospital_event(node, "sent-update", {
        "round": job.server_round, "attempt": job.attempt, "run_id": job.run_id,
        "masked_input_sha256": bytes_sha256(masked.tobytes()), "mode": "masked",
        "lineage": update.lineage, "privacy": privacy_statement(update.metrics),
    })
    records: dict[str, Any] = {MASKED_INPUT: masked_record(masked),
                               METRICS: MetricRecord(metrics),
                               LINEAGE: lineage_record(update.lineage)}
    if update.validation is not None:  # of the adapter this message carried (Job.validate)
        records[VALIDATION] = validation_record(update.validation)
        record_sent_metrics(node, job.server_round, job.run_id, "validation",
                            adapter_sha256(global_adapter), update.validation)
    return _reply(msg, identity, records)


def confirm_view(msg: Message, context: Context) -> Message:
    """Stage 3b: check who the coordinator says survived, and sign this hospital's view."""
    stage = _SurvivorStage.of(msg, context)
    signature = protocol.confirm_view(stage.state, stage.signing_key, stage.survivors,
                                      stage.dropped, minimum_survivors(stage.node, stage.identity))
    return stage.reply({VIEW_SIGNATURE: view_signature_record(signature)})


def reveal_shares(msg: Message, context: Context) -> Message:
    """Stage 4: shares of survivors' self-masks and dropped hospitals' mask keys, once, and
    only after every survivor's signed view of the round matches this hospital's."""
    stage = _SurvivorStage.of(msg, context)
    shares = protocol.reveal(stage.state, stage.survivors, stage.dropped,
                             parse_view_signatures(msg), stage.enrollment)
    return stage.reply({REVEALED: revealed_record(shares)})


@dataclass
class _SurvivorStage:
    """What stages 3b and 4 both read: the node, its keys, the round's secrets and the
    coordinator's survivor list; `reply` saves the secrets and answers."""

    msg: Message
    context: Context
    job: Job
    node: NodeSettings
    identity: HospitalIdentity
    signing_key: Ed25519PrivateKey
    enrollment: dict[str, Ed25519PublicKey]
    state: protocol.HospitalRound
    spent: float
    survivors: list[str]
    dropped: list[str]

    @classmethod
    def of(cls, msg: Message, context: Context) -> _SurvivorStage:
        job = _job(msg)
        node = parse_node_settings(context.node_config)
        identity = hospital_identity(node, job.config.data)
        signing_key, enrollment = hospital_keys(node, job.config, identity)
        state, spent = _load(context, job)
        survivors, dropped = parse_survivors(msg)
        return cls(msg, context, job, node, identity, signing_key, enrollment, state, spent,
                   survivors, dropped)

    def reply(self, records: dict[str, Any]) -> Message:
        _save(self.context, self.state, self.job, self.spent)
        return _reply(self.msg, self.identity, records)


def minimum_threshold(
    node: NodeSettings, identity: HospitalIdentity, enrollment: Mapping[str, Any]
) -> int:
    """The lowest threshold this hospital accepts, whatever the coordinator asks.

    A deployed hospital requires a majority of its enrolled hospitals unless its admin sets
    `secagg-min-threshold` (e.g. lower, for federations that sample hospitals per round; it
    is never below 2). Simulated hospitals are the researcher's own: 2.
    """
    if node.secagg_min_threshold is not None:  # >= 2, checked when parsed
        return node.secagg_min_threshold
    if identity.simulated:
        return 2
    return max(2, len(enrollment) // 2 + 1)


def deployed_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """A deployed hospital's metrics as the coordinator may see them: only those listed in
    DEPLOYED_MASKED_METRICS, with ε as the run's planned bound ("epsilon-target")."""
    renamed = {**metrics, **({"epsilon-target": metrics["epsilon-budget"]}
                             if "epsilon-budget" in metrics else {})}
    return {k: v for k, v in renamed.items() if k in DEPLOYED_MASKED_METRICS}


def minimum_survivors(node: NodeSettings, identity: HospitalIdentity) -> int:
    """The fewest survivors with which this hospital lets a round be unmasked.

    Two survivors could each compute the other's update from the next global adapter, so a
    deployed hospital needs 3 unless its admin sets `secagg-min-survivors` (2 accepts that
    risk, e.g. for two partners who trust each other). Simulated hospitals are the
    researcher's own: 2.
    """
    if node.secagg_min_survivors is not None:  # >= 2, checked when parsed
        return node.secagg_min_survivors
    return 2 if identity.simulated else 3


def hospital_keys(
    node: NodeSettings, config: RunConfig, identity: HospitalIdentity
) -> tuple[Ed25519PrivateKey, dict[str, Ed25519PublicKey]]:
    """This hospital's identity key and the enrolled hospitals' public keys."""
    if identity.simulated:
        folder = config.secure_aggregation.simulation_keys_dir or str(
            Path(config.data.simulation_root) / "hospital-keys"
        )
        key_path, enrollment_path = simulated_identity_paths(Path(folder), identity.name)
    else:
        if node.identity_key is None or node.enrollment is None:
            missing = [node_key(field) for field in ("identity_key", "enrollment")
                       if getattr(node, field) is None]
            raise ConfigError(
                f"secure aggregation needs this node's identity key and the enrollment list, "
                f"but its node configuration has no {' or '.join(repr(k) for k in missing)}; "
                f"create a key with `fedtune keys generate`, get the enrollment file from the "
                f"coordinator, and start the node with --node-config "
                f"\"{node_key('identity_key')}='/path/hospital.key' "
                f"{node_key('enrollment')}='/path/enrollment.json' ...\""
            )
        key_path, enrollment_path = node.identity_key, node.enrollment
    signing_key, enrollment = load_identity_key(key_path), load_enrollment(enrollment_path)
    # Local set-up mistakes are reported as such here, not later as a peer's bad signature.
    if identity.name not in enrollment:
        raise ConfigError(
            f"this hospital's name {identity.name!r} is not in the enrollment list "
            f"{enrollment_path}; set the node setting '{node_key('name')}' to the name this "
            f"hospital was enrolled with (enrolled: {', '.join(sorted(enrollment))})"
        )
    if raw_public(signing_key.public_key()) != raw_public(enrollment[identity.name]):
        raise ConfigError(
            f"the identity key {key_path} is not the key enrolled for {identity.name!r} in "
            f"{enrollment_path}; check the node setting '{node_key('identity_key')}' (or enroll "
            "this key's .pub file with the coordinator)"
        )
    return signing_key, enrollment


def _job(msg: Message) -> Job:
    return Job.from_record(msg.content.config_records[JOB])


def _refuse_reused_attempt(context: Context, node: NodeSettings, job: Job) -> None:
    """Key each (run, round, attempt) once: a retried round must come with a new attempt.

    A coordinator that asked again under an attempt this hospital already keyed could pair
    the new masked input with secrets revealed for the old one (the dropout recovery of an
    aborted try); refusing the repeat keeps every revealed secret tied to one try only. The
    node's context forgets on restart, so a deployed node also checks (and records) each
    keyed attempt in its own audit log.
    """
    label = f"{job.run_id}/{job.server_round}/{job.attempt}"
    record = context.state.config_records.get(_USED)
    used = [str(x) for x in record["labels"]] if record is not None else []  # type: ignore[union-attr]
    used += [str(data.get("attempt_label")) for data in logged_events(node, "secagg-keyed")]
    if label in used:
        raise protocol.ProtocolAbort(
            f"the coordinator asked again for round {job.server_round}, attempt {job.attempt}, "
            "which this hospital already took part in; a retried round must be a new attempt"
        )
    context.state[_USED] = ConfigRecord({"labels": [*used, label]})
    record_hospital_event(node, "secagg-keyed", {"attempt_label": label, "run_id": job.run_id,
                                                 "round": job.server_round,
                                                 "attempt": job.attempt})


def _save(context: Context, state: protocol.HospitalRound, job: Job, seconds: float) -> None:
    context.state[_STATE] = ConfigRecord(
        {
            "run-id": job.run_id,
            "round": job.server_round,
            "attempt": job.attempt,
            "secrets": state.to_bytes(),
            "seconds": seconds,
        }
    )


def _load(context: Context, job: Job) -> tuple[protocol.HospitalRound, float]:
    """This round's secrets; a stage for a round this hospital never advertised, or under
    another run configuration than it advertised with, is refused."""
    record = context.state.config_records.get(_STATE)
    if (
        record is None
        or record.get("run-id") != job.run_id
        or record.get("round") != job.server_round
        or record.get("attempt") != job.attempt
    ):
        raise protocol.ProtocolAbort(
            f"asked for a secure-aggregation stage of round {job.server_round} (attempt "
            f"{job.attempt}) that this hospital has no keys for (it did not take part in that "
            "key stage)"
        )
    secrets = record["secrets"]
    assert isinstance(secrets, bytes)
    state = protocol.HospitalRound.from_bytes(secrets)
    protocol.check_run_config(state, canonical_sha256(job.config.to_dict()))
    return state, float(record["seconds"])  # type: ignore[arg-type]


def _reply(msg: Message, identity: HospitalIdentity, records: dict[str, Any]) -> Message:
    return Message(named(RecordDict(records), identity.name), reply_to=msg)
