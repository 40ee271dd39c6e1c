"""Secure aggregation end to end: real ClientApp, real tiny model, real crypto, in process.

Every test runs the coordinator's round loop (`run_federation`) on `InProcessGrid`, so the
four stages go through the hospitals' Flower handlers exactly as in a deployment; only the
transport is replaced. Failures are injected at the grid: hospitals that crash after a stage
(`drop_after`), and requests altered on their way (`tamper_request`: a malicious coordinator
or network).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_grid import SECURE_STAGES, InProcessGrid
from flwr.app import ConfigRecord, Message
from tiny import deployed_nodes, in_clear, replace_section

from fedtune.client.hospital import hospital_identity
from fedtune.client.node_settings import NodeSettings
from fedtune.client.session import data_for, model_for
from fedtune.core.adapters import Adapter, adapter_sha256
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.secagg.encoding import flatten, layout_size
from fedtune.core.secagg.fixed_point import FixedPointCodec
from fedtune.core.secagg.prg import add_mask
from fedtune.core.secagg.primitives import agree, new_x25519
from fedtune.core.secagg.protocol import MASK_PURPOSE, HospitalRound
from fedtune.core.secagg.wire import (
    CONFIRM,
    INBOX,
    KEYS,
    MASKED,
    MASKED_INPUT,
    PARTICIPANTS,
    SHARES,
    UNMASK,
)
from fedtune.core.wire import EVALUATE, GLOBAL_ADAPTER, JOB, TRAIN, Job
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

H1, H2, H3 = 1000, 1001, 1002  # node ids of simulated hospital-1, -2, -3
EPS32 = float(np.finfo(np.float32).eps)


def _run(
    config: RunConfig, grid: InProcessGrid, path: Path, lines: list[str] | None = None
) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.create(config)
    say = lines.append if lines is not None else (lambda _line: None)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=say)
    return run_dir


def _rounds(run_dir: RunDirectory) -> list[dict]:
    return [r for r in run_dir.read_metrics() if r["event"] == "round"]


def _secure(config: RunConfig, rounds: int = 1, **values: object) -> RunConfig:
    """One round (unless told), and a codec tight enough that its error bound is tiny
    (clip norm 1 is well above the tiny model's delta norm ≈ 0.45: nothing is clipped)."""
    config = replace_section(config, "federation", rounds=rounds, min_hospitals=2)
    return replace_section(
        config, "secure_aggregation", **{"clip_norm": 1.0, "max_weight": 64, **values}
    )


def _same(a: Adapter, b: Adapter) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _train_weights(config: RunConfig, hospitals: list[str]) -> dict[str, int]:
    """Each simulated hospital's training-example count (its FedAvg weight)."""
    handle = model_for(config)
    weights = {}
    for name in hospitals:
        partition = int(name.rsplit("-", 1)[1]) - 1
        identity = hospital_identity(NodeSettings(partition_id=partition), config.data)
        weights[name] = min(len(data_for(config, identity, handle).features["train"]),
                            config.secure_aggregation.max_weight)
    return weights


def _assert_secure_mean(
    run_dir: RunDirectory, config: RunConfig, views: Path, hospitals: list[str], mask_set: int
) -> None:
    """Round 1's update equals Σ wᵢΔᵢ / Σ wᵢ of the hospitals' recorded plaintext deltas,
    within the fixed-point error bound (plus float32 rounding of the adapter itself)."""
    start, end = run_dir.load_adapter(0), run_dir.load_adapter(1)
    weights = _train_weights(config, hospitals)
    plain = {h: np.load(views / "round-0001" / f"{h}.plaintext.npy") for h in hospitals}
    total = sum(weights.values())
    expected = sum(weights[h] * plain[h].astype(np.float64) for h in hospitals) / total
    settings = config.secure_aggregation
    codec = FixedPointCodec(settings.clip_norm, settings.max_weight, mask_set)
    g0, g1 = flatten(start, start), flatten(end, start)
    tolerance = codec.error_bound(len(hospitals)) / total + 2 * EPS32 * (np.abs(g0) + np.abs(g1))
    error = np.abs((g1 - g0) - expected)
    assert np.all(error <= tolerance), f"max error {error.max():.3g}"
    assert np.max(np.abs(expected)) > 1e3 * tolerance.max()  # the check is not vacuous


# --- a. secure and plain agree ------------------------------------------------------------


def test_secure_and_plain_rounds_give_the_same_weighted_mean(
    classify_config: RunConfig, tmp_path: Path
):
    """Unequal deployed hospitals (48 vs fewer training examples), so weighting matters;
    three of them, the fewest a deployed hospital unmasks with."""
    source = Path(classify_config.data.simulation_root)
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join((source / "hospital-2.jsonl").read_text().splitlines()[:30]) + "\n")
    nodes = deployed_nodes(tmp_path / "keys", {0: ("Big", str(source / "hospital-1.jsonl")),
                                               1: ("Small", str(small)),
                                               2: ("Third", str(source / "hospital-3.jsonl"))})
    for node in nodes.values():
        node["allow-plain-updates"] = True  # the plain arm of the comparison
    config = _secure(classify_config)
    plain_a = _run(in_clear(config), InProcessGrid(3, node_configs=nodes), tmp_path / "plain-a")
    plain_b = _run(in_clear(config), InProcessGrid(3, node_configs=nodes), tmp_path / "plain-b")
    secure = _run(config, InProcessGrid(3, node_configs=nodes), tmp_path / "secure")

    start, plain, masked = plain_a.load_adapter(0), plain_a.load_adapter(1), secure.load_adapter(1)
    assert _same(plain, plain_b.load_adapter(1))  # training is deterministic: compare exactly
    (record,) = _rounds(plain_a)
    weights = [record["train"][h]["num-examples"] for h in ("Big", "Small", "Third")]
    assert weights[0] > weights[1]
    (secure_record,) = _rounds(secure)
    assert secure_record["secure_aggregation"]["survivors"] == ["Big", "Small", "Third"]
    assert all(m["delta-clipped"] == 0 for m in secure_record["train"].values())
    bound = FixedPointCodec(1.0, 64, 3).error_bound(3) / sum(weights)
    for name in start:
        np.testing.assert_allclose(masked[name], plain[name], rtol=4 * EPS32, atol=bound + 1e-9)
    assert not _same(masked, start)


# --- b. dropouts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_stage", "counted"),
    [
        (KEYS, ["hospital-1", "hospital-3"]),  # never in the masks
        (SHARES, ["hospital-1", "hospital-3"]),  # its pairwise masks removed via its s-shares
        # confirmed its view, then gone: its input is in the sum (the others reveal its b)
        (CONFIRM, ["hospital-1", "hospital-2", "hospital-3"]),
    ],
)
def test_a_hospital_dropping_after_a_stage_leaves_a_correct_round_of_the_others(
    classify_config: RunConfig, tmp_path: Path, last_stage: str, counted: list[str]
):
    views = tmp_path / "views"
    config = _secure(classify_config, record_views_dir=str(views))
    grid = InProcessGrid(3, drop_after={H2: last_stage})
    lines: list[str] = []
    run_dir = _run(config, grid, tmp_path / "run", lines)

    assert run_dir.saved_rounds() == [0, 1]
    (record,) = _rounds(run_dir)
    assert sorted(record["hospitals_used"]) == counted
    assert record["secure_aggregation"]["survivors"] == counted
    next_stage = {KEYS: "shares", SHARES: "masked", CONFIRM: "unmask"}[last_stage]
    # A silent hospital is named, with the stage it missed.
    assert record["refused"] == {"hospital-2": f"no reply in the {next_stage} stage (dropped out)"}
    mask_set = 2 if last_stage == KEYS else 3
    if last_stage == SHARES:
        assert record["secure_aggregation"]["dropped"] == ["hospital-2"]
        assert any("hospital-2 dropped out after sharing keys" in line for line in lines)
    else:
        assert record["secure_aggregation"]["dropped"] == []
    # hospital-2 got no request of the stages after the one it last answered.
    asked = {m.metadata.message_type for m in grid.replies if m.metadata.src_node_id == H2}
    assert asked & set(SECURE_STAGES) == set(SECURE_STAGES[: SECURE_STAGES.index(last_stage) + 1])
    _assert_secure_mean(run_dir, config, views, counted, mask_set)


@pytest.mark.parametrize(
    ("threshold", "drop_after", "reason"),
    [
        (3, {H2: KEYS}, "only 2 hospital(s) exchanged key shares; at least 3 are needed"),
        (3, {H2: MASKED}, "hospital-2 did not confirm the round's view; every survivor must"),
        (3, {H2: CONFIRM}, "only 2 hospital(s) answered the unmasking stage; at least 3"),
        (2, {H2: SHARES, H3: SHARES}, "only 1 hospital(s) sent their masked update"),
    ],
)
def test_too_few_hospitals_left_aborts_the_round_and_keeps_the_adapter(
    classify_config: RunConfig,
    tmp_path: Path,
    threshold: int,
    drop_after: dict[int, str],
    reason: str,
):
    config = _secure(classify_config, threshold=threshold)
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(3, drop_after=drop_after), tmp_path / "run", lines)
    assert run_dir.saved_rounds() == [0]
    (record,) = _rounds(run_dir)
    assert record["aborted"] and reason in record["reason"]
    assert any(
        line.startswith("Round 1 aborted") and reason in line and "unchanged" in line
        for line in lines
    )


# --- c. what the coordinator sees ---------------------------------------------------------


def test_the_coordinator_never_receives_a_delta_in_clear(
    classify_config: RunConfig, tmp_path: Path
):
    views = tmp_path / "views"
    config = _secure(classify_config, record_views_dir=str(views))
    grid = InProcessGrid(3)
    run_dir = _run(config, grid, tmp_path / "run")
    start = run_dir.load_adapter(0)
    length = layout_size(start)
    assert run_dir.saved_rounds() == [0, 1]

    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {*SECURE_STAGES, EVALUATE}  # never a plain `train` request
    assert TRAIN not in {m.metadata.message_type for m in grid.replies}
    stage_requests = [m for m in grid.sent if m.metadata.message_type in SECURE_STAGES]
    for message in stage_requests:  # out: only the global adapter, as it is
        arrays = message.content.array_records
        if message.metadata.message_type == MASKED:
            assert list(arrays) == [GLOBAL_ADAPTER]
            sent = {k: v.numpy() for k, v in arrays[GLOBAL_ADAPTER].items()}
            assert _same(sent, start)
        else:
            assert not arrays
        _assert_no_bulk_bytes(message)

    masked: dict[str, np.ndarray] = {}
    for reply in (m for m in grid.replies if m.metadata.message_type in SECURE_STAGES):
        assert not reply.has_error()
        _assert_no_bulk_bytes(reply)
        arrays = reply.content.array_records
        if reply.metadata.message_type != MASKED:
            assert not arrays
            continue
        assert list(arrays) == [MASKED_INPUT] and list(arrays[MASKED_INPUT]) == ["masked"]
        array = arrays[MASKED_INPUT]["masked"]
        assert array.dtype == "uint32" and tuple(array.shape) == (length,)
        name = str(reply.content.config_records["hospital"]["name"])
        masked[name] = array.numpy()
    assert sorted(masked) == ["hospital-1", "hospital-2", "hospital-3"]

    # Each masked input looks nothing like the hospital's fixed-point encoded plaintext, nor
    # does it with only the self-mask removed; with the hospital's own secrets (kept in its
    # node state, never sent) removing every mask gives back exactly that encoding.
    weights = _train_weights(config, sorted(masked))
    codec = FixedPointCodec(1.0, 64, 3)
    node_of = {f"hospital-{k + 1}": node_id for k, node_id in enumerate(grid.node_ids)}
    for name, values in masked.items():
        delta = np.load(views / "round-0001" / f"{name}.plaintext.npy").astype(np.float64)
        encoded = np.round(delta * weights[name] * codec.scale).astype(np.int64).astype(np.uint32)
        assert _near(values[:-1], encoded) < 0.01  # unmasked, it would be within ±1 everywhere
        assert values[-1] != weights[name]  # the weight is masked too
        state = _hospital_round(grid, node_of[name])
        unmasked = values.copy()
        add_mask(unmasked, state.self_seed, -1)
        assert _near(unmasked[:-1], encoded) < 0.01  # the pairwise masks hide it as well
        for peer in state.mask_set:
            if peer != name:
                seed = agree(state.s_secret, state.participants[peer][1], MASK_PURPOSE,
                             state.context, (name, peer))
                add_mask(unmasked, seed, -1 if name < peer else 1)
        assert _near(unmasked[:-1], encoded) == 1.0 and unmasked[-1] == weights[name]


def _near(values: np.ndarray, encoded: np.ndarray) -> float:
    """Fraction of ring elements within ±1 of the encoding (stochastic rounding's range)."""
    return float(np.mean(np.abs((values - encoded).view(np.int32).astype(np.int64)) <= 1))


def _hospital_round(grid: InProcessGrid, node_id: int) -> HospitalRound:
    """The round secrets a hospital keeps in its node state (white-box, for checking)."""
    record = grid.contexts[node_id].state.config_records["secagg-round"]
    secrets = record["secrets"]
    assert isinstance(secrets, bytes)
    return HospitalRound.from_bytes(secrets)


def _assert_no_bulk_bytes(message: Message) -> None:
    """No byte string or list in config/metric records big enough to carry a delta."""
    content = message.content
    records: list[dict[str, Any]] = [dict(r) for r in content.config_records.values()]
    records += [dict(r) for r in content.metric_records.values()]
    for record in records:
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            assert len(items) < 100, key
            assert all(len(v) < 1024 for v in items if isinstance(v, bytes)), key


# --- d. a malicious coordinator or network ---------------------------------------------------


def _column(record: ConfigRecord, key: str) -> list[Any]:
    value = record[key]
    assert isinstance(value, list)
    return list(value)


def _flip_ciphertext_from(message: Message, sender: str, replacement: bytes | None = None) -> None:
    """Flip one byte of the ciphertext from `sender` in a stage-3 inbox (or replace it)."""
    record = message.content.config_records[INBOX]
    senders = [str(s) for s in _column(record, "senders")]
    ciphertexts = [bytes(c) for c in _column(record, "ciphertexts")]
    k = senders.index(sender)
    if replacement is None:
        middle = len(ciphertexts[k]) // 2
        replacement = ciphertexts[k][:middle] + bytes([ciphertexts[k][middle] ^ 1]) \
            + ciphertexts[k][middle + 1 :]
    ciphertexts[k] = replacement
    record["ciphertexts"] = ciphertexts


@pytest.mark.parametrize("threshold", [2, 3])
def test_a_tampered_share_is_refused_naming_its_sender(
    classify_config: RunConfig, tmp_path: Path, threshold: int
):
    def tamper(node_id: int, message: Message) -> Message:
        if node_id == H2 and message.metadata.message_type == MASKED:
            _flip_ciphertext_from(message, "hospital-1")
        return message

    config = _secure(classify_config, threshold=threshold)
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(3, tamper_request=tamper), tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    refusal = record["refused"]["hospital-2"]
    assert refusal.startswith("hospital-2: ")
    assert "from hospital-1 failed authentication" in refusal
    assert list(record["refused"]) == ["hospital-2"]
    if threshold == 2:
        assert record["secure_aggregation"]["survivors"] == ["hospital-1", "hospital-3"]
        assert record["secure_aggregation"]["dropped"] == ["hospital-2"]
        assert run_dir.saved_rounds() == [0, 1]
        assert not _same(run_dir.load_adapter(1), run_dir.load_adapter(0))
    else:
        assert record["aborted"]
        assert run_dir.saved_rounds() == [0]
        assert any(line.startswith("Round 1 aborted") and "unchanged" in line for line in lines)


def test_a_share_replayed_from_an_earlier_round_is_refused(
    classify_config: RunConfig, tmp_path: Path
):
    kept: dict[str, bytes] = {}

    def replay(node_id: int, message: Message) -> Message:
        if node_id != H2 or message.metadata.message_type != MASKED:
            return message
        record = message.content.config_records[INBOX]
        inbox = dict(zip(_column(record, "senders"), _column(record, "ciphertexts"), strict=True))
        if message.metadata.group_id == "1":
            kept["hospital-1"] = bytes(inbox["hospital-1"])
        else:
            _flip_ciphertext_from(message, "hospital-1", replacement=kept["hospital-1"])
        return message

    config = _secure(classify_config, rounds=2)
    run_dir = _run(config, InProcessGrid(3, tamper_request=replay), tmp_path / "run")
    first, second = _rounds(run_dir)
    assert first["refused"] == {} and len(first["hospitals_used"]) == 3
    assert "from hospital-1 failed authentication" in second["refused"]["hospital-2"]
    assert "replayed from another round" in second["refused"]["hospital-2"]
    assert second["secure_aggregation"]["survivors"] == ["hospital-1", "hospital-3"]
    assert run_dir.saved_rounds() == [0, 1, 2]


def test_a_substituted_round_key_is_refused_by_every_hospital(
    classify_config: RunConfig, tmp_path: Path
):
    def substitute(node_id: int, message: Message) -> Message:
        if message.metadata.message_type == SHARES:
            record = message.content.config_records[PARTICIPANTS]
            names = [str(n) for n in _column(record, "hospitals")]
            keys = [bytes(k) for k in _column(record, "s-public")]
            keys[names.index("hospital-2")] = new_x25519()[1]
            record["s-public"] = keys
        return message

    config = _secure(classify_config)
    lines: list[str] = []
    grid = InProcessGrid(3, tamper_request=substitute)
    run_dir = _run(config, grid, tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    assert sorted(record["refused"]) == ["hospital-1", "hospital-2", "hospital-3"]
    for hospital, reason in record["refused"].items():
        assert reason.startswith(f"{hospital}: ")
        assert "presented for hospital-2 are not signed by hospital-2" in reason
    assert record["aborted"] and run_dir.saved_rounds() == [0]
    assert any(line.startswith("Round 1 aborted") and "unchanged" in line for line in lines)
    assert MASKED not in {m.metadata.message_type for m in grid.sent}  # no one trained


def test_a_coordinator_lowering_the_threshold_is_refused_by_the_hospitals(
    classify_config: RunConfig, tmp_path: Path
):
    """The coordinator checks its own threshold; the hospitals check the one they are sent
    (from the first stage on: a configuration changed later in the round is refused too)."""

    def lower(node_id: int, message: Message) -> Message:
        if message.metadata.message_type in (KEYS, SHARES):
            job = Job.from_record(message.content.config_records[JOB])
            forged = replace_section(job.config, "secure_aggregation", threshold=1)
            message.content.config_records[JOB]["run-config"] = forged.to_json()
        return message

    config = _secure(classify_config)
    run_dir = _run(config, InProcessGrid(3, tamper_request=lower), tmp_path / "run")
    (record,) = _rounds(run_dir)
    assert sorted(record["refused"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert all("threshold 1 is too low for 3 hospitals" in r for r in record["refused"].values())
    assert run_dir.saved_rounds() == [0]


# --- e. record_views ----------------------------------------------------------------------


def test_record_views_saves_plaintext_and_exactly_what_the_coordinator_received(
    classify_config: RunConfig, tmp_path: Path
):
    views = tmp_path / "views"
    config = _secure(classify_config, record_views_dir=str(views))
    grid = InProcessGrid(3)
    run_dir = _run(config, grid, tmp_path / "run")
    length = layout_size(run_dir.load_adapter(0))
    index = json.loads((views / "index.json").read_text())
    assert index["mode"] == "secure-aggregation"
    hospitals = ["hospital-1", "hospital-2", "hospital-3"]
    assert sorted(index["rounds"]["1"]) == hospitals
    replies = {str(m.content.config_records["hospital"]["name"]):
               m.content.array_records[MASKED_INPUT]["masked"]
               for m in grid.replies if m.metadata.message_type == MASKED}
    payloads = {h: bytes(array.data) for h, array in replies.items()}
    masked = {h: array.numpy() for h, array in replies.items()}
    for hospital in hospitals:
        entry = index["rounds"]["1"][hospital]
        received = (views / entry["received"]).read_bytes()
        assert received == payloads[hospital]  # exactly the wire bytes (.npy framing)
        assert len(received) == entry["received_bytes"]
        values = np.load(io.BytesIO(received))
        assert entry["received_dtype"] == "uint32" and values.dtype == np.uint32
        assert values.shape == (length,) and values.nbytes == 4 * length  # 4 B per parameter
        assert np.array_equal(values, masked[hospital])
        plaintext = np.load(views / entry["plaintext"])
        assert plaintext.dtype == np.float32 and plaintext.shape == (length - 1,)
        assert np.any(plaintext != 0)
    _assert_secure_mean(run_dir, config, views, hospitals, 3)


def test_a_deployed_hospital_refuses_to_record_views(classify_config: RunConfig, tmp_path: Path):
    source = classify_config.data.simulation_root
    nodes = deployed_nodes(
        tmp_path / "keys",
        {
            0: ("St-Mary", f"{source}/hospital-1.jsonl"),
            1: ("Riverside", f"{source}/hospital-2.jsonl"),
        },
    )
    views = tmp_path / "views"
    config = _secure(classify_config, record_views_dir=str(views))
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(2, node_configs=nodes), tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    assert sorted(record["refused"]) == ["Riverside", "St-Mary"]
    for hospital, reason in record["refused"].items():
        assert reason.startswith(f"{hospital}: this run asks hospitals to record their plaintext")
        assert "simulation-only" in reason and "refuses it" in reason
    assert run_dir.saved_rounds() == [0]
    assert not list(views.rglob("*.plaintext.npy"))


# --- f. configuration mistakes ------------------------------------------------------------


def test_a_deployed_node_without_identity_key_is_told_how_to_make_one(
    classify_config: RunConfig, tmp_path: Path
):
    source = classify_config.data.simulation_root
    nodes: dict[int, dict[str, object]] = {
        k: {"hospital-name": f"Site-{k}", "data-path": f"{source}/hospital-{k + 1}.jsonl"}
        for k in range(2)
    }
    grid = InProcessGrid(2, node_configs=nodes)
    run_dir = _run(_secure(classify_config), grid, tmp_path / "run")
    (record,) = _rounds(run_dir)
    assert sorted(record["refused"]) == ["Site-0", "Site-1"]
    for reason in record["refused"].values():
        assert "'identity-key'" in reason and "'enrollment'" in reason
        assert "fedtune keys generate" in reason
    errors = [m.error.code for m in grid.replies if m.metadata.message_type == KEYS]
    assert errors == [4001, 4001]
    assert "only 0 hospital(s) sent round keys" in record["reason"]
    assert run_dir.saved_rounds() == [0]


def test_a_threshold_too_low_for_the_hospitals_aborts_with_the_value_to_set(
    classify_config: RunConfig, tmp_path: Path
):
    source = classify_config.data.simulation_root
    nodes = deployed_nodes(
        tmp_path / "keys",
        {k: (f"Site-{k}", f"{source}/hospital-{k % 3 + 1}.jsonl") for k in range(4)},
    )
    grid = InProcessGrid(4, node_configs=nodes)
    lines: list[str] = []
    run_dir = _run(_secure(classify_config, threshold=2), grid, tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    assert "threshold 2 is too low for 4 hospitals" in record["reason"]
    assert "set secure_aggregation.threshold to 3 or more" in record["reason"]
    assert any(line.startswith("Round 1 aborted") and "threshold to 3" in line for line in lines)
    assert {m.metadata.message_type for m in grid.sent} & set(SECURE_STAGES) == {KEYS}
    assert run_dir.saved_rounds() == [0]


# --- g. the warning when off --------------------------------------------------------------


def test_secure_aggregation_off_warns_that_deltas_travel_in_clear(
    classify_config: RunConfig, tmp_path: Path
):
    lines: list[str] = []
    _run(in_clear(_secure(classify_config)), InProcessGrid(2), tmp_path / "plain", lines)
    warnings = [line for line in lines if line.startswith("WARNING: secure aggregation is OFF")]
    assert len(warnings) == 1 and "delta in clear" in warnings[0]
    secure_lines: list[str] = []
    grid = InProcessGrid(2)
    _run(_secure(classify_config), grid, tmp_path / "secure", secure_lines)
    assert not any("WARNING" in line for line in secure_lines)
    assert UNMASK in {m.metadata.message_type for m in grid.sent}


def test_fixed_point_settings_that_cannot_fit_are_refused_before_anyone_trains(
    classify_config: RunConfig, tmp_path: Path
):
    """n · max_weight · clip_norm must fit in 31 bits: checked at launch and before training."""
    from fedtune.core.config import ConfigError
    from fedtune.ops.launch import prepare_secure_aggregation

    config = _secure(classify_config, clip_norm=1e6, max_weight=100_000)
    with pytest.raises(ConfigError, match="do not fit in 32-bit fixed point"):
        prepare_secure_aggregation(config, 3, say=lambda line: None)
    grid = InProcessGrid(3)
    lines: list[str] = []
    run_dir = _run(config, grid, tmp_path / "run", lines)
    assert run_dir.saved_rounds() == [0]
    assert any("Round 1 aborted" in line and "fixed point" in line for line in lines)
    assert not [m for m in grid.sent if m.metadata.message_type == MASKED]  # nobody trained


def test_local_key_setup_mistakes_are_reported_as_such_at_the_node(
    classify_config: RunConfig, tmp_path: Path
):
    """A hospital name that is not enrolled, or a key that is not the enrolled one, is the
    node's own set-up mistake: said so, with the setting to fix, not as a peer's attack."""
    from fedtune.core.secagg.identity import generate_identity

    source = classify_config.data.simulation_root
    sites = {0: ("North", f"{source}/hospital-1.jsonl"), 1: ("South", f"{source}/hospital-2.jsonl"),
             2: ("East", f"{source}/hospital-3.jsonl")}
    nodes = deployed_nodes(tmp_path / "keys", sites)
    nodes[0]["hospital-name"] = "Nort"  # a typo
    other_key, _ = generate_identity("South", tmp_path / "other")
    nodes[1]["identity-key"] = str(other_key)  # not the enrolled key
    lines: list[str] = []
    run_dir = _run(_secure(classify_config), InProcessGrid(3, node_configs=nodes),
                   tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    refused = record["refused"]
    assert "'Nort' is not in the enrollment list" in refused["Nort"]
    assert "hospital-name" in refused["Nort"] and "East, North, South" in refused["Nort"]
    assert "is not the key enrolled for 'South'" in refused["South"]
    assert "identity-key" in refused["South"]
    assert run_dir.saved_rounds() == [0]  # one hospital left: aborted


@pytest.mark.parametrize("secure", [True, False])
def test_replies_over_the_size_limit_are_refused_unread(
    classify_config: RunConfig, tmp_path: Path, secure: bool
):
    """A reply larger than federation.max_reply_mb is refused, naming the hospital; with
    every reply refused the round is aborted and the global adapter stays as it was."""
    config = _secure(classify_config)
    config = replace_section(
        config if secure else in_clear(config), "federation", max_reply_mb=1e-4
    )  # ~100 bytes: every reply is larger
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    assert record["aborted"] and run_dir.saved_rounds() == [0]
    assert sorted(record["refused"]) == ["hospital-1", "hospital-2", "hospital-3"]
    for reason in record["refused"].values():
        assert "more than federation.max_reply_mb = 0.0001; it was not read" in reason
    assert any(line.startswith("Round 1 aborted") and "unchanged" in line for line in lines)


def _attempts(run_dir: RunDirectory) -> list[tuple[int, int, bool]]:
    """(round, attempt, aborted) of every round record, in order."""
    return [(r["round"], r["attempt"], bool(r.get("aborted"))) for r in _rounds(run_dir)]


def test_a_round_aborted_below_the_threshold_is_retried_from_the_same_adapter(
    classify_config: RunConfig, tmp_path: Path
):
    """Two of three hospitals crash after sharing keys in round 1's first attempt (1 left,
    threshold 2): that attempt is aborted, the adapter is untouched, and the retry, with
    everyone back, completes from the same adapter under new keys."""
    config = replace_section(_secure(classify_config, threshold=2), "federation", round_retries=1)
    grid = InProcessGrid(3, drop_after={H2: SHARES, H3: SHARES}, only_in={(1, 1)})
    lines: list[str] = []
    run_dir = _run(config, grid, tmp_path / "run", lines)
    assert _attempts(run_dir) == [(1, 1, True), (1, 2, False)]
    assert run_dir.saved_rounds() == [0, 1]
    starts = [r for r in run_dir.read_metrics() if r["event"] == "round-start"]
    assert [(r["round"], r["attempt"]) for r in starts] == [(1, 1), (1, 2)]
    initial = adapter_sha256(run_dir.load_adapter(0))
    assert {r["global_adapter_sha256"] for r in starts} == {initial}
    assert _rounds(run_dir)[1]["global_adapter_sha256"] == adapter_sha256(run_dir.load_adapter(1))
    assert sorted(_rounds(run_dir)[1]["hospitals_used"]) == [
        "hospital-1",
        "hospital-2",
        "hospital-3",
    ]
    assert any(line.startswith("Round 1 aborted") and "unchanged" in line for line in lines)
    assert any(line.startswith("Round 1: attempt 2") for line in lines)
    keys = [m for m in grid.sent if m.metadata.message_type == KEYS]
    assert {int(m.content.config_records[JOB]["attempt"]) for m in keys} == {1, 2}


def test_a_round_that_keeps_failing_is_tried_round_retries_plus_one_times(
    classify_config: RunConfig, tmp_path: Path
):
    config = replace_section(
        _secure(classify_config, rounds=2, threshold=2), "federation", round_retries=2
    )
    grid = InProcessGrid(3, drop_after={H2: SHARES, H3: SHARES}, only_in={(1, 1), (1, 2), (1, 3)})
    lines: list[str] = []
    run_dir = _run(config, grid, tmp_path / "run", lines)
    assert _attempts(run_dir) == [(1, 1, True), (1, 2, True), (1, 3, True), (2, 1, False)]
    assert any("Round 1 could not be completed in 3 attempt(s)" in line for line in lines)
    assert run_dir.saved_rounds() == [0, 2]  # round 2 trained from the initial adapter
    (start,) = [r for r in run_dir.read_metrics() if r["event"] == "round-start"
                and r["round"] == 2]
    assert start["global_adapter_sha256"] == adapter_sha256(run_dir.load_adapter(0))


def test_a_hospital_refuses_to_key_the_same_attempt_twice(
    classify_config: RunConfig, tmp_path: Path
):
    """A coordinator that asks again under an attempt a hospital already took part in is
    refused by every hospital, so no revealed secret can be paired with a new input."""

    def reuse_attempt_one(node_id: int, message: Message) -> Message:
        job = message.content.config_records[JOB]
        if int(job["attempt"]) == 2:
            job["attempt"] = 1
        return message

    config = replace_section(_secure(classify_config, threshold=2), "federation", round_retries=1)
    grid = InProcessGrid(
        3, drop_after={H2: SHARES, H3: SHARES}, only_in={(1, 1)}, tamper_request=reuse_attempt_one
    )
    run_dir = _run(config, grid, tmp_path / "run")
    first, retry = _rounds(run_dir)
    assert first["aborted"] and retry["aborted"] and run_dir.saved_rounds() == [0]
    assert sorted(retry["refused"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert all("already took part in" in reason for reason in retry["refused"].values())


def test_a_resumed_run_tries_an_aborted_round_under_a_new_attempt(
    classify_config: RunConfig, tmp_path: Path
):
    """The coordinator stopped after an aborted attempt; restarted with resume, it asks
    the same hospitals (who remember attempt 1) for attempt 2, and the round completes."""
    config = _secure(classify_config, threshold=2)
    grid = InProcessGrid(3, drop_after={H2: SHARES, H3: SHARES}, only_in={(1, 1)})
    run_dir = _run(config, grid, tmp_path / "run")
    assert _attempts(run_dir) == [(1, 1, True)]
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lambda _: None,
                   resume=True)
    assert _attempts(run_dir) == [(1, 1, True), (1, 2, False)]
    assert run_dir.saved_rounds() == [0, 1]
