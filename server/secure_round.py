"""The coordinator's side of secure aggregation: relay, collect, unmask the sum only.

Five message exchanges per round (see fedtune/core/secagg/protocol.py): round keys,
encrypted shares, masked inputs (the hospitals train in this stage), the survivors' signed
views of the round, unmasking. The coordinator holds
no secret at any point; it relays what hospitals send each other and, at the end, removes
the masks of the survivors from their sum. A hospital that refuses or drops out at any stage
is named and left out; if fewer than the threshold remain, the round is aborted and the
global adapter stays as it was. The strategy receives only (Σ wᵢ·Δᵢ, Σ wᵢ).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedtune.core.adapters import Adapter, adapter_norm
from fedtune.core.config import RunConfig
from fedtune.core.secagg.encoding import decode_aggregate, layout_size
from fedtune.core.secagg.fixed_point import FixedPointOverflow
from fedtune.core.secagg.primitives import round_context
from fedtune.core.secagg.protocol import (
    Advertisement,
    ProtocolAbort,
    UnmaskInputs,
    check_threshold,
    unmask_sum,
)
from fedtune.core.secagg.wire import (
    CONFIRM,
    INBOX,
    KEYS,
    MASKED,
    PARTICIPANTS,
    SHARES,
    SURVIVORS,
    UNMASK,
    VIEW_SIGNATURES,
    inbox_record,
    job_content,
    masked_payload_bytes,
    parse_advert,
    parse_masked,
    parse_outbox,
    parse_revealed,
    parse_view_signature,
    participants_record,
    survivors_record,
    view_signatures_record,
)
from fedtune.core.update_rules import honest_sum_norm_bound, secure_codec, uploaded
from fedtune.core.wire import (
    GLOBAL_ADAPTER,
    Job,
    adapter_to_record,
    parse_lineage,
    parse_optional_metrics,
    parse_validation,
)
from fedtune.server.collect import HospitalNames, Refusal, RoundCollection
from fedtune.server.exchange import HospitalGrid, Reply, exchange
from fedtune.server.views import ViewRecorder
from fedtune.strategies.aggregate import AggregateUpdate


class _Stage:
    """One secure-aggregation stage's exchange (server.exchange), its refusals and timing
    recorded in the round's collection."""

    def __init__(
        self,
        grid: HospitalGrid,
        names: HospitalNames,
        server_round: int,
        out: RoundCollection,
        max_reply_mb: float,
    ):
        self.grid, self.names, self.round, self.out = grid, names, server_round, out
        self.max_reply_mb = max_reply_mb

    def exchange(
        self,
        requests: dict[int, Any],
        message_type: str,
        timeout: float,
        parse: Callable[[Reply], Any],
    ) -> dict[str, tuple[int, Any, Reply]]:
        """hospital → (node id, parsed reply, reply) for every usable reply."""
        name = message_type.split(".")[-1]
        result = exchange(
            self.grid, self.names, requests, message_type, str(self.round), timeout,
            self.max_reply_mb, parse, stage=name.removeprefix("secagg_"),
            malformed=lambda exc: f"malformed {message_type} reply: {exc}",
        )
        self.out.refusals.extend(result.refusals)
        self.out.details[name + "_seconds"] = result.seconds
        return {h: (a.node_id, a.parsed, a.reply) for h, a in result.answers.items()}


def collect_secure(
    grid: HospitalGrid,
    node_ids: Sequence[int],
    global_adapter: Adapter,
    job: Job,
    names: HospitalNames,
    views: ViewRecorder | None = None,
) -> RoundCollection:
    """Run the four stages; the result holds only the unmasked sum (or why there is none).

    The sum covers the tensors hospitals upload under the strategy (`update_rules.uploaded`):
    all of the adapter, or all but LoRA A for FFA-LoRA.
    """
    reference = uploaded(global_adapter, job.config)
    config: RunConfig = job.config
    settings = config.secure_aggregation
    threshold = settings.threshold
    # min_hospitals decides whether a round starts (that many connected and sampled); once it
    # has started, hospitals that drop out do not stop it while `threshold` survive each stage.
    needed = threshold
    out = RoundCollection(details={"secure_aggregation": True})
    stage = _Stage(grid, names, job.server_round, out, config.federation.max_reply_mb)
    fast, slow = settings.stage_timeout_s, config.federation.round_timeout_s

    # Stage 1: signed round keys.
    adverts = stage.exchange({n: job_content(job) for n in node_ids}, KEYS, fast, parse_advert)
    for hospital, (_, advert, _) in list(adverts.items()):
        if advert.hospital != hospital:
            out.refusals.append(Refusal(hospital, f"advertised keys as {advert.hospital!r}"))
            del adverts[hospital]
    if reason := _too_few(len(adverts), needed, "sent round keys"):
        return _abort(out, reason)
    try:
        check_threshold(threshold, len(adverts))
        secure_codec(config, len(adverts))
    except (ProtocolAbort, ValueError) as exc:
        return _abort(out, str(exc))
    listed: list[Advertisement] = [adverts[h][1] for h in sorted(adverts)]
    node_of = {h: adverts[h][0] for h in adverts}

    # Stage 2: every hospital checks every signature, then sends encrypted shares.
    request = job_content(job, **{PARTICIPANTS: participants_record(listed)})
    outboxes = stage.exchange({node_of[h]: request for h in sorted(adverts)}, SHARES, fast,
                              parse_outbox)
    for hospital, (_, (outbox, _), _) in list(outboxes.items()):
        if set(outbox) != set(adverts) - {hospital}:
            out.refusals.append(Refusal(hospital, "sent key shares for the wrong hospitals"))
            del outboxes[hospital]
    mask_set = sorted(outboxes)
    if reason := _too_few(len(mask_set), needed, "exchanged key shares"):
        return _abort(out, reason)

    # Stage 3: each hospital gets its shares and the global adapter, trains, masks.
    length = layout_size(reference)
    requests = {}
    for hospital in mask_set:
        inbox = {s: outboxes[s][1][0][hospital] for s in mask_set if s != hospital}
        content = job_content(job, **{INBOX: inbox_record(mask_set, inbox)})
        content[GLOBAL_ADAPTER] = adapter_to_record(global_adapter)
        requests[node_of[hospital]] = content
    def masked_input(reply: Reply) -> np.ndarray:
        parse_lineage(reply)  # a malformed fingerprint or validation record refuses the
        parse_validation(reply)  # reply too
        return parse_masked(reply, length)

    masked = stage.exchange(requests, MASKED, slow, masked_input)
    for hospital, (_, _, reply) in masked.items():
        out.train_metrics[hospital] = parse_optional_metrics(reply)
        out.lineage[hospital] = parse_lineage(reply)
        if (validation := parse_validation(reply)) is not None:
            out.validation[hospital] = validation
        if views is not None:
            views.received(job.server_round, hospital, masked_payload_bytes(reply), "uint32")
    survivors = sorted(masked)
    dropped = sorted(set(mask_set) - set(survivors))
    if reason := _too_few(len(survivors), needed, "sent their masked update"):
        return _abort(out, reason)

    # Stage 3b: every survivor signs its view of the round (mask set, survivors, dropped,
    # threshold, configuration, global adapter); all must sign for anyone to reveal.
    request = job_content(job, **{SURVIVORS: survivors_record(survivors, dropped)})
    confirmed = stage.exchange({node_of[h]: request for h in survivors}, CONFIRM, fast,
                           parse_view_signature)
    unconfirmed = sorted(set(survivors) - set(confirmed))
    if unconfirmed:
        return _abort(out, f"{', '.join(unconfirmed)} did not confirm the round's view; "
                           "every survivor must, before any share is revealed")
    signatures = {h: signature for h, (_, signature, _) in confirmed.items()}

    # Stage 4: survivors reveal what removes the masks, and nothing more.
    request = job_content(job, **{SURVIVORS: survivors_record(survivors, dropped),
                                  VIEW_SIGNATURES: view_signatures_record(signatures)})
    revealed = stage.exchange({node_of[h]: request for h in survivors}, UNMASK, fast,
                              parse_revealed)
    if reason := _too_few(len(revealed), threshold, "answered the unmasking stage"):
        return _abort(out, reason)
    started = time.perf_counter()
    codec = secure_codec(config, len(mask_set))
    try:
        total = _unmask(job, threshold, adverts, mask_set, outboxes, masked, revealed)
        weighted_sum, weight_sum = decode_aggregate(total, len(survivors), codec, reference)
    except (ProtocolAbort, FixedPointOverflow) as exc:
        return _abort(out, f"the masked sum could not be recovered: {exc}")
    out.sum_revealed = True
    norm = adapter_norm(weighted_sum)
    rounding = codec.error_bound(len(survivors))
    bound = honest_sum_norm_bound(config, len(survivors), weight_sum, length - 1, rounding)
    if bound is not None and norm > bound * (1 + 1e-6):
        return _abort(
            out,
            f"the aggregate's norm {norm:.4g} exceeds what clipped hospitals can send "
            f"({bound:.4g}): a hospital ignored its clip bound",
        )
    out.details["unmask_compute_seconds"] = time.perf_counter() - started
    out.details.update({"survivors": survivors, "dropped": dropped, "threshold": threshold})
    out.update = AggregateUpdate(weighted_sum, float(weight_sum), len(survivors))
    return out


def _unmask(
    job: Job,
    threshold: int,
    adverts: dict[str, tuple[int, Advertisement, Reply]],
    mask_set: list[str],
    outboxes: dict[str, tuple[int, Any, Reply]],
    masked: dict[str, tuple[int, Any, Reply]],
    revealed: dict[str, tuple[int, Any, Reply]],
) -> np.ndarray:
    return unmask_sum(
        UnmaskInputs(
            context=round_context(job.run_id, job.server_round, job.attempt),
            threshold=threshold,
            adverts={h: a for h, (_, a, _) in adverts.items()},
            mask_set=mask_set,
            commitments={h: outboxes[h][1][1] for h in mask_set},
            masked={h: m for h, (_, m, _) in masked.items()},
            revealed={h: r for h, (_, r, _) in revealed.items()},
        )
    )


def _too_few(count: int, needed: int, what: str) -> str:
    if count >= needed:
        return ""
    return f"only {count} hospital(s) {what}; at least {needed} are needed"


def _abort(out: RoundCollection, reason: str) -> RoundCollection:
    out.abort_reason = reason
    out.update = None
    return out
