"""Secure aggregation: upload size, masking and unmasking cost, share of a round's wall time.

Three measurements, side by side in one run:

1. Upload bytes. 10 hospitals, a 10 MB fp32 delta each (2,621,440 values in ten LoRA-like
   tensors: r=64 A/B pairs of a 4096-wide model on five layers). The pure protocol runs in
   memory and every hospital's five stage replies are built with the same wire helpers the
   ClientApp uses (`fedtune.core.secagg.wire`), then serialized the way Flower 1.41 ships a
   reply: the message is deflated into its object tree (Message → RecordDict → records →
   Arrays → 5 MB ArrayChunks, `get_all_nested_objects`), and the bytes of every object are
   summed. The plain-mode train reply (`fedtune.core.wire.train_reply_content`, same delta and
   metrics) is measured the same way. `recorddict_to_proto(...).ByteSize()` of the contents
   is shown as a cross-check.
2. Timing, same sizes, each hospital's work run one after another on this machine's CPU
   (in a federation each runs on its own machine): key setup (advertise, verify and share,
   decrypt the inbox), masking (`encode_input` + `protocol.mask`), and the coordinator's
   `unmask_sum` + `decode_aggregate` with no dropout and with one hospital dropped after
   sharing (its nine pairwise masks are regenerated from the reconstructed key). 3 complete
   rounds each: hospital times are the mean over all hospitals and rounds, the coordinator's
   the best of 9 (each round's inputs unmasked 3 times); the decoded sum is checked against
   the plain weighted sum every time.
3. Round share. The demo (3 hospitals, DP-SGD and secure aggregation on, 2 rounds) on the
   real Flower simulation engine; from the coordinator's metrics, per round, secure
   aggregation time = the four extra stage exchanges + unmask computation + the slowest
   hospital's own crypto time, against the whole round's wall time.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune.benchmarks.runner import BenchResult
from fedtune.core.adapters import Adapter
from fedtune.core.secagg import protocol
from fedtune.core.secagg.encoding import decode_aggregate, encode_input, flatten
from fedtune.core.secagg.fixed_point import FixedPointCodec, clip_to_norm
from fedtune.core.secagg.primitives import round_context
from fedtune.core.secagg.wire import (
    ADVERT,
    CONFIRM,
    KEYS,
    MASKED,
    MASKED_INPUT,
    OUTBOX,
    REVEALED,
    SHARES,
    UNMASK,
    VIEW_SIGNATURE,
    advert_record,
    masked_record,
    named,
    outbox_record,
    revealed_record,
    view_signature_record,
)
from fedtune.core.wire import METRICS, TRAIN, train_reply_content
from fedtune.ops.demo import DemoOptions, run_demo
from fedtune.server.records import completed_rounds
from fedtune.server.run_dir import RunDirectory

HOSPITALS = 10
THRESHOLD = HOSPITALS // 2 + 1
CLIP_NORM = 10.0  # the demo's clip norm
MAX_WEIGHT = 100_000  # fedtune's default secure_aggregation.max_weight
DELTA_NORM = 3.5  # measured demo deltas have norm 2.8-4.2: no clipping
REPEATS = 3  # complete rounds (fresh keys, shares and masks) per configuration
UNMASK_REPEATS = 3  # unmasking of each round's inputs, timed this often (best kept)
RUN_ID = "bench-secagg"
CONFIG_SHA256 = hashlib.sha256(b"bench run configuration").hexdigest()
ADAPTER_SHA256 = hashlib.sha256(b"bench global adapter").hexdigest()
# Five layers × (lora_A r=64 × 4096, lora_B 4096 × r=64) = 2,621,440 values = 10 MiB fp32.
SHAPES = {
    f"base_model.model.layers.{layer}.self_attn.q_proj.lora_{part}.weight": shape
    for layer in range(5)
    for part, shape in (("A", (64, 4096)), ("B", (4096, 64)))
}
PARAMETERS = sum(a * b for a, b in SHAPES.values())
# What a DP hospital reports with its update (values as in the demo's metrics).
TRAIN_METRICS = {
    "train-loss": 2.94, "train-steps": 15.0, "train-seconds": 30.4, "skipped-lines": 0.0,
    "dp": 1.0, "epsilon": 7.9964, "delta": 0.001, "epsilon-budget": 8.0,
    "noise-multiplier": 0.8212, "sample-rate": 0.25, "dp-steps": 15.0,
}


def bench_secagg(work_dir: Path) -> BenchResult:
    """Wire sizes and protocol timings in memory, then the demo's round share."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    assert PARAMETERS == 2_621_440
    rng = np.random.default_rng(0)
    reference: Adapter = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    names = [f"hospital-{k:02d}" for k in range(1, HOSPITALS + 1)]
    deltas = {name: _random_delta(rng) for name in names}
    weights = {name: 1200 + 37 * k for k, name in enumerate(names)}
    identities = {name: Ed25519PrivateKey.generate() for name in names}

    print(f"   {REPEATS} rounds of {HOSPITALS} hospitals × {PARAMETERS:,} values", flush=True)
    full = [_secure_round(identities, deltas, weights, reference, set(), r) for r in range(REPEATS)]
    print("   the same with one hospital dropped after sharing", flush=True)
    dropped = {names[-1]}
    one_out = [
        _secure_round(identities, deltas, weights, reference, dropped, r + REPEATS)
        for r in range(REPEATS)
    ]
    upload = _upload_sizes(full[0], deltas, weights)

    print("   demo: 3 hospitals, 2 rounds, DP + secure aggregation", flush=True)
    run_demo(DemoOptions(task="classify", hospitals=3, rounds=2, run_dir=work_dir / "demo"))
    shares = round_shares(RunDirectory(work_dir / "demo"))

    numbers = {
        "secagg_upload_ratio": upload["secure_total"] / upload["plain"],
        "secagg_upload_ratio_raw": upload["secure_total"] / (4 * PARAMETERS),
        "secagg_upload_bytes": upload["secure_total"],
        "secagg_setup_seconds": mean(s for r in full for s in r.setup_seconds.values()),
        "secagg_mask_seconds": mean(s for r in full for s in r.mask_seconds.values()),
        "secagg_unmask_seconds": min(r.unmask_seconds for r in full),
        "secagg_unmask_seconds_one_dropout": min(r.unmask_seconds for r in one_out),
        "secagg_round_share": mean(row["share"] for row in shares),
        # Stage 3b per hospital: sign the view + verify all survivors' views (in reveal).
        "secagg_consistency_ms": 1000 * mean(
            r.consistency_seconds[h] + r.reveal_seconds[h] for r in full
            for h in r.consistency_seconds
        ),
    }
    return BenchResult(numbers, _markdown(numbers, upload, full, one_out, shares))


@dataclass
class _Round:
    """One in-memory secure round: per-hospital timings, replies, and the coordinator's."""

    setup_seconds: dict[str, float] = field(default_factory=dict)
    mask_seconds: dict[str, float] = field(default_factory=dict)
    reveal_seconds: dict[str, float] = field(default_factory=dict)
    # Stage 3b: signing the view; verifying all survivors' signatures is part of `reveal`.
    consistency_seconds: dict[str, float] = field(default_factory=dict)
    unmask_seconds: float = 0.0
    replies: dict[str, dict[str, RecordDict]] = field(default_factory=dict)  # stage → name
    max_error: float = 0.0
    error_bound: float = 0.0
    relative_error: float = 0.0  # ‖decoded − exact‖ / ‖exact‖


def _secure_round(
    identities: dict[str, Ed25519PrivateKey],
    deltas: dict[str, Adapter],
    weights: dict[str, int],
    reference: Adapter,
    dropped: set[str],
    server_round: int,
) -> _Round:
    """Run the five stages for every hospital and unmask; raise if the sum is wrong."""
    out = _Round(replies={KEYS: {}, SHARES: {}, MASKED: {}, CONFIRM: {}, UNMASK: {}})
    names = sorted(identities)
    enrollment = {name: key.public_key() for name, key in identities.items()}
    codec = FixedPointCodec(CLIP_NORM, MAX_WEIGHT, len(names))
    states, adverts = {}, {}
    for name in names:
        started = time.perf_counter()
        states[name], adverts[name] = protocol.advertise(
            identities[name], name, RUN_ID, server_round, 1, CONFIG_SHA256
        )
        out.setup_seconds[name] = time.perf_counter() - started
        out.replies[KEYS][name] = named(RecordDict({ADVERT: advert_record(adverts[name])}), name)
    listed = [adverts[name] for name in names]
    outboxes, commitments = {}, {}
    for name in names:
        started = time.perf_counter()
        outboxes[name], commitments[name] = protocol.make_shares(
            states[name], listed, enrollment, THRESHOLD, minimum_threshold=2
        )
        out.setup_seconds[name] += time.perf_counter() - started
        content = RecordDict({OUTBOX: outbox_record(outboxes[name], commitments[name])})
        out.replies[SHARES][name] = named(content, name)
    survivors = [name for name in names if name not in dropped]
    masked = {}
    for name in survivors:
        inbox = {sender: outboxes[sender][name] for sender in names if sender != name}
        started = time.perf_counter()
        protocol.accept_shares(states[name], names, inbox)
        out.setup_seconds[name] += time.perf_counter() - started
        started = time.perf_counter()
        encoded = encode_input(deltas[name], reference, weights[name], codec)
        masked[name] = protocol.mask(states[name], encoded.ring, ADAPTER_SHA256)
        out.mask_seconds[name] = time.perf_counter() - started
        metrics: dict[str, int | float | list[int] | list[float]] = {
            **TRAIN_METRICS,
            "delta-clipped": float(encoded.clip.clipped),
            "weight-capped": 0.0,
            "secagg-seconds": out.setup_seconds[name] + out.mask_seconds[name],
        }
        content = RecordDict(
            {MASKED_INPUT: masked_record(masked[name]), METRICS: MetricRecord(metrics)}
        )
        out.replies[MASKED][name] = named(content, name)
    signatures = {}
    for name in survivors:  # stage 3b: each survivor signs its view of the round
        started = time.perf_counter()
        signatures[name] = protocol.confirm_view(states[name], identities[name], survivors,
                                                 sorted(dropped), minimum_survivors=3)
        out.consistency_seconds[name] = time.perf_counter() - started
        content = RecordDict({VIEW_SIGNATURE: view_signature_record(signatures[name])})
        out.replies[CONFIRM][name] = named(content, name)
    revealed = {}
    for name in survivors:
        started = time.perf_counter()
        revealed[name] = protocol.reveal(states[name], survivors, sorted(dropped), signatures,
                                         enrollment)
        out.reveal_seconds[name] = time.perf_counter() - started
        content = RecordDict({REVEALED: revealed_record(revealed[name])})
        out.replies[UNMASK][name] = named(content, name)

    inputs = protocol.UnmaskInputs(
        context=round_context(RUN_ID, server_round, 1),
        threshold=THRESHOLD,
        adverts=adverts,
        mask_set=names,
        commitments=commitments,
        masked=masked,
        revealed=revealed,
    )
    seconds = []
    for _ in range(UNMASK_REPEATS):  # pure: the same inputs unmask the same way each time
        started = time.perf_counter()
        total = protocol.unmask_sum(inputs)
        weighted_sum, weight_sum = decode_aggregate(total, len(survivors), codec, reference)
        seconds.append(time.perf_counter() - started)
    out.unmask_seconds = min(seconds)

    expected = sum(
        clip_to_norm(flatten(deltas[name], reference), CLIP_NORM).vector * weights[name]
        for name in survivors
    )
    got = flatten(weighted_sum, reference)
    error = np.abs(got - expected)
    # The codec's bound, plus the float32 rounding of the decoded adapter.
    allowed = codec.error_bound(len(survivors)) + np.abs(expected) * 2.0**-23
    out.max_error, out.error_bound = float(error.max()), codec.error_bound(len(survivors))
    out.relative_error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    if weight_sum != sum(weights[name] for name in survivors) or np.any(error > allowed):
        raise AssertionError(
            f"secure aggregation decoded a wrong sum (weight sum {weight_sum}, largest error "
            f"{error.max():.3g} > bound {codec.error_bound(len(survivors)):.3g})"
        )
    return out


def _upload_sizes(
    secure: _Round, deltas: dict[str, Adapter], weights: dict[str, int]
) -> dict[str, float]:
    """Mean bytes per hospital of each stage's reply and of the plain train reply."""
    sizes: dict[str, float] = {}
    for stage, replies in secure.replies.items():
        sizes[stage] = mean(_wire_bytes(content, stage) for content in replies.values())
        sizes[stage + ".proto"] = mean(
            recorddict_to_proto(content).ByteSize() for content in replies.values()
        )
    sizes["secure_total"] = sum(sizes[stage] for stage in secure.replies)
    sizes["secure_total.proto"] = sum(sizes[stage + ".proto"] for stage in secure.replies)
    plain = [
        train_reply_content(delta, {"num-examples": float(weights[name]), **TRAIN_METRICS}, name)
        for name, delta in deltas.items()
    ]
    sizes["plain"] = mean(_wire_bytes(content, TRAIN) for content in plain)
    sizes["plain.proto"] = mean(recorddict_to_proto(content).ByteSize() for content in plain)
    return sizes


def _wire_bytes(content: RecordDict, message_type: str) -> int:
    """Bytes Flower 1.41 pushes for a reply with this content: its deflated object tree."""
    metadata = Metadata(
        run_id=2**63 - 25,
        message_id="",  # set by the SuperLink
        src_node_id=2**63 - 7,
        dst_node_id=1,
        reply_to_message_id=hashlib.sha256(message_type.encode()).hexdigest(),
        group_id="1",
        created_at=time.time(),
        ttl=43_200.0,
        message_type=message_type,
    )
    message = make_message(metadata, content)
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def round_shares(run_dir: RunDirectory) -> list[dict[str, Any]]:
    """Per round of a finished secure run: secure-aggregation seconds against wall seconds."""
    rows = []
    for record in completed_rounds(run_dir.records()):
        details = record.secure_aggregation
        if not details.get("secure_aggregation"):
            raise ValueError(f"round {record.round} did not use secure aggregation")
        stages = ("keys", "shares", "confirm", "unmask")
        exchanges = sum(details[f"secagg_{stage}_seconds"] for stage in stages)
        hospitals = max(float(m["secagg-seconds"]) for m in record.train.values())
        secure = exchanges + details["unmask_compute_seconds"] + hospitals
        wall = float(record.seconds or 0.0)
        rows.append({"round": record.round, "exchanges": exchanges,
                     "unmask": details["unmask_compute_seconds"], "hospitals": hospitals,
                     "secure": secure, "wall": wall, "share": secure / wall})
    if not rows:
        raise ValueError("the demo run finished no round")
    return rows


def _random_delta(rng: np.random.Generator) -> Adapter:
    delta = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values())))
    return {name: value * np.float32(DELTA_NORM / norm) for name, value in delta.items()}


def _markdown(
    numbers: dict[str, float],
    upload: dict[str, float],
    full: list[_Round],
    one_out: list[_Round],
    shares: list[dict[str, Any]],
) -> str:
    stage_rows = "\n".join(
        f"| {label} (`{stage}`) | {upload[stage]:,.0f} | {upload[stage + '.proto']:,.0f} |"
        for label, stage in (("1 round keys", KEYS), ("2 encrypted shares", SHARES),
                             ("3 masked input + metrics", MASKED),
                             ("3b signed view of the round", CONFIRM),
                             ("4 revealed shares", UNMASK))
    )
    reveal = mean(s for r in full for s in r.reveal_seconds.values())
    share_rows = "\n".join(
        f"| {row['round']} | {row['exchanges']:.3f} | {row['unmask']:.3f} | "
        f"{row['hospitals']:.3f} | {row['secure']:.3f} | {row['wall']:.1f} | {row['share']:.4f} |"
        for row in shares
    )
    error = max(r.max_error for r in full + one_out)
    bound = min(r.error_bound for r in full + one_out)
    relative = max(r.relative_error for r in full + one_out)
    timings = [
        ("hospital key setup: keys, signatures, verify 10, Shamir + encrypt shares, "
         "decrypt inbox", numbers["secagg_setup_seconds"]),
        ("hospital masking: clip, weight, fixed-point encode, self + 9 pairwise ChaCha20 "
         "masks", numbers["secagg_mask_seconds"]),
        ("hospital signing its view of the round (consistency check)",
         mean(s for r in full for s in r.consistency_seconds.values())),
        ("hospital verifying every survivor's signed view, then revealing its shares", reveal),
        ("coordinator unmask + decode, no dropout", numbers["secagg_unmask_seconds"]),
        ("coordinator unmask + decode, one hospital dropped after sharing",
         numbers["secagg_unmask_seconds_one_dropout"]),
    ]
    timing_rows = "\n".join(f"| {label} | {1000 * seconds:.2f} |" for label, seconds in timings)
    return f"""## Secure aggregation (`fedtune bench secagg`)

**Upload.** {HOSPITALS} hospitals, each with a 10 MiB fp32 delta ({PARAMETERS:,} values in
{len(SHAPES)} LoRA-like tensors, r=64 × 4096). Each hospital's five stage replies are built
with the ClientApp's wire helpers from an in-memory protocol run and sized as Flower 1.41
ships them (the reply's deflated object tree: message, records, arrays, 5 MiB chunks);
the plain-mode train reply (same delta and metrics) likewise. Protobuf `ByteSize()` of the
contents as a cross-check. Mean bytes per hospital:

| reply | bytes on the wire | content protobuf bytes |
|---|---|---|
{stage_rows}
| **all five secure stages** | {upload["secure_total"]:,.0f} | {upload["secure_total.proto"]:,.0f} |
| plain train reply (fp32 delta) | {upload["plain"]:,.0f} | {upload["plain.proto"]:,.0f} |
| raw fp32 delta (4 × {PARAMETERS:,}) | {4 * PARAMETERS:,} | |

`secagg_upload_ratio` (secure / plain, goal ≤ 1.05) = **{numbers["secagg_upload_ratio"]:.4f}**;
against the raw fp32 delta, `secagg_upload_ratio_raw` = {numbers["secagg_upload_ratio_raw"]:.4f}.
The masked input is one uint32 per parameter plus one for the weight, in one array where
the plain reply has one per tensor; keys and shares add a few kB at 10 hospitals (growing
linearly with the number of hospitals).

**Computation**, {HOSPITALS} hospitals × {PARAMETERS:,} values, threshold {THRESHOLD}, each
hospital's work run in turn on this machine's CPU, {REPEATS} complete rounds with fresh keys.
Hospital times: mean over all hospitals and rounds; the coordinator's: best of
{REPEATS * UNMASK_REPEATS} (each round's inputs unmasked {UNMASK_REPEATS} times). The decoded
sum matched the plain weighted sum every time (largest error {error:.2e}, codec bound
{bound:.2e} per coordinate; relative L2 error of the sum {relative:.1e}):

| step | milliseconds |
|---|---|
{timing_rows}

`secagg_setup_seconds` = {numbers["secagg_setup_seconds"]:.4f};
`secagg_mask_seconds` = **{numbers["secagg_mask_seconds"]:.3f}** (per hospital);
`secagg_unmask_seconds` (goal ≤ 1 s) = **{numbers["secagg_unmask_seconds"]:.3f}**;
`secagg_unmask_seconds_one_dropout` = **{numbers["secagg_unmask_seconds_one_dropout"]:.3f}**;
`secagg_consistency_ms` (the consistency check per hospital: signing its view, then
verifying all {HOSPITALS} survivors' signed views before revealing) =
**{numbers["secagg_consistency_ms"]:.2f}**; its reply is the "3b" row above.

**Round share.** The demo (3 hospitals, all-MiniLM-L6-v2 + LoRA r=8, DP-SGD and secure
aggregation on, 2 rounds) on the Flower simulation engine. Per round, secure-aggregation
time = the key, share, confirm and unmask stage exchanges + the coordinator's unmask
computation +
the slowest hospital's own crypto time (key setup, share decryption, encoding and masking);
wall = the whole round, evaluation included:

| round | 4 extra exchanges (s) | unmask (s) | hospital crypto (s) | total (s) | wall (s) | share |
|---|---|---|---|---|---|---|
{share_rows}

`secagg_round_share` (mean over rounds, goal ≤ 0.02) = **{numbers["secagg_round_share"]:.4f}**.
The four extra exchanges dominate it, and they are dominated by the simulation engine's
message polling: Flower's `InMemoryGrid` checks for replies every 0.1 s (`pull_interval`),
so each exchange costs about one interval whatever its payload. The cryptography itself
takes milliseconds for the demo's small adapter.
"""
