"""A malicious coordinator against the hospitals' secure aggregation: each test plays one
attack and fails if it works.

Protocol level (pure functions, real cryptography): the mask-set attack of issue 19 with
n = 5, t = 3 and no colluder, and with n = 3, t = 2 and one colluding hospital. ClientApp
level (the real handlers through `InProcessGrid`, requests altered on their way as a
coordinator that chooses every message would): the same mask-set attack, a different
learning rate or global adapter for one hospital, a configuration changed mid-round, and a
round left with two deployed survivors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import InProcessGrid
from flwr.app import Message
from tiny import deployed_nodes, replace_section

from fedtune.client.hospital import HospitalIdentity
from fedtune.client.node_settings import NodeSettings
from fedtune.client.secure_stages import minimum_survivors
from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.secagg import primitives as p
from fedtune.core.secagg import protocol as P
from fedtune.core.secagg.prg import add_mask
from fedtune.core.secagg.wire import (
    CONFIRM,
    INBOX,
    KEYS,
    MASKED,
    REVEALED,
    SHARES,
    SURVIVORS,
    UNMASK,
    inbox_record,
    parse_inbox,
    survivors_record,
)
from fedtune.core.wire import GLOBAL_ADAPTER, JOB, Job, adapter_to_record
from fedtune.server.records import Evaluation, RoundRecord
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

CONFIG, ADAPTER = "c1" * 32, "a1" * 32
V, W, X, Y, Z = "hospital-1", "hospital-2", "hospital-3", "hospital-4", "hospital-5"
# What the coordinator tells each hospital (issue 19, hole 2): X that only Y and Z mask with
# it; V and W that Y and Z dropped; Y that Z dropped; Z that Y dropped. Then V, W and X give
# it b_X; V, W and Z give s_Y; V, W and Y give s_Z: X's input, unmasked.
MASK_SETS = {X: [X, Y, Z]}
VIEWS = {
    V: ([V, W, X], [Y, Z]), W: ([V, W, X], [Y, Z]), X: ([X, Y, Z], []),
    Y: ([V, W, X, Y], [Z]), Z: ([V, W, X, Z], [Y]),
}


def _advertised_and_shared(names: list[str], threshold: int, identities) -> tuple[dict, dict, dict]:
    enrollment = {n: k.public_key() for n, k in identities.items()}
    states, adverts = {}, {}
    for name in names:
        states[name], adverts[name] = P.advertise(identities[name], name, "run", 1, 1, CONFIG)
    outboxes = {}
    for name in names:
        outboxes[name], _ = P.make_shares(states[name], list(adverts.values()), enrollment,
                                          threshold, minimum_threshold=2)
    return states, adverts, outboxes


def test_different_mask_sets_for_different_hospitals_reveal_nothing():
    """n = 5, t = 3, the coordinator alone. The shares it asks for would rebuild X's input
    exactly (checked below from the hospitals' own inboxes); every hospital refuses to give
    them, because the survivors' signed views of the round differ."""
    names = [V, W, X, Y, Z]
    identities = {n: Ed25519PrivateKey.generate() for n in names}
    enrollment = {n: k.public_key() for n, k in identities.items()}
    states, adverts, outboxes = _advertised_and_shared(names, 3, identities)
    rng = np.random.default_rng(7)
    inputs = {n: rng.integers(0, 2**32, 16, dtype=np.uint32) for n in names}
    masked = {}
    for name in names:
        mask_set = MASK_SETS.get(name, names)
        P.accept_shares(states[name], mask_set,
                        {s: outboxes[s][name] for s in mask_set if s != name})
        masked[name] = P.mask(states[name], inputs[name], ADAPTER)

    # The attack's arithmetic is right: with those shares, X's input comes out.
    index = P.positions(names)
    def rebuild(peer: str, kind: int, holders: list[str]) -> bytes:
        return p.combine_shares({index[h]: states[h].inbox[peer][kind] for h in holders})
    b_x = rebuild(X, 0, [V, W, X])
    s_secret = {Y: rebuild(Y, 1, [V, W, Z]), Z: rebuild(Z, 1, [V, W, Y])}
    recovered = masked[X].copy()
    add_mask(recovered, b_x, -1)
    for peer in (Y, Z):
        seed = p.agree(s_secret[peer], adverts[X].s_public, P.MASK_PURPOSE, states[X].context,
                       (peer, X))
        add_mask(recovered, seed, -(1 if peer > X else -1))
    np.testing.assert_array_equal(recovered, inputs[X])

    # Every hospital checks and signs the story it was told (each is consistent on its own)...
    signatures = {n: P.confirm_view(states[n], identities[n], *VIEWS[n], minimum_survivors=3)
                  for n in names}
    # ...and none reveals anything, whatever signatures the coordinator relays.
    for name in names:
        with pytest.raises(P.ProtocolAbort, match="signed view of this round differs"):
            P.reveal(states[name], *VIEWS[name], signatures, enrollment)
        assert states[name].stage == "confirmed"  # no share left the hospital


def test_a_colluding_hospital_cannot_shrink_the_round_to_two():
    """n = 3, t = 2, hospital C colludes: X is told its mask set is {X, C}; C signs X's view.
    A deployed hospital needs three survivors, so X refuses before signing."""
    names, colluder = ["C", X, Y], "C"
    identities = {n: Ed25519PrivateKey.generate() for n in names}
    states, _, outboxes = _advertised_and_shared(names, 2, identities)
    P.accept_shares(states[X], [X, colluder], {colluder: outboxes[colluder][X]})
    P.mask(states[X], np.arange(8, dtype=np.uint32), ADAPTER)
    deployed = HospitalIdentity(X, Path("/data/x.jsonl"), simulated=False)
    floor = minimum_survivors(NodeSettings(data_path=Path("/data/x.jsonl")), deployed)
    assert floor == 3
    with pytest.raises(P.ProtocolAbort, match="only 2 hospitals survived; this hospital needs "
                                              "at least 3"):
        P.confirm_view(states[X], identities[X], [X, colluder], [], minimum_survivors=floor)
    assert states[X].stage == "masked"


# --- through the real ClientApp -----------------------------------------------------------


def _five_hospitals(config: RunConfig, tmp_path: Path) -> RunConfig:
    """The tiny data for five simulated hospitals (hospitals 4 and 5 copy 1 and 2)."""
    source = Path(config.data.simulation_root)
    root = tmp_path / "five"
    root.mkdir()
    for k in range(1, 6):
        shutil.copy(source / f"hospital-{((k - 1) % 3) + 1}.jsonl", root / f"hospital-{k}.jsonl")
    shutil.copy(source / "labels.json", root / "labels.json")
    config = replace_section(config, "data", simulation_root=str(root))
    config = replace_section(config, "secure_aggregation", threshold=3, clip_norm=1.0,
                             max_weight=64, simulation_keys_dir=str(source / "hospital-keys"))
    return replace_section(config, "federation", rounds=1, min_hospitals=3, round_retries=0)


def _secure_round(config: RunConfig, grid: InProcessGrid, path: Path) -> RoundRecord:
    run_dir = RunDirectory(path)
    run_dir.create(config)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lambda _: None)
    (record,) = [r for r in run_dir.records() if isinstance(r, RoundRecord)]
    assert run_dir.saved_rounds() == [0]  # the global adapter is unchanged
    return record


def _nothing_revealed(grid: InProcessGrid) -> None:
    assert not any(REVEALED in r.content.config_records for r in grid.replies
                   if r.has_content())


def _hospital(node_id: int) -> str:
    return f"hospital-{node_id - 999}"


def test_the_mask_set_attack_through_the_clientapp_is_refused(
    classify_config: RunConfig, tmp_path: Path
):
    def tell_stories(node_id: int, message: Message) -> Message:
        name = _hospital(node_id)
        kind = message.metadata.message_type
        if kind == MASKED and name in MASK_SETS:
            _, inbox = parse_inbox(message)
            members = MASK_SETS[name]
            message.content.config_records[INBOX] = inbox_record(
                members, {s: c for s, c in inbox.items() if s in members})
        if kind in (CONFIRM, UNMASK):
            message.content.config_records[SURVIVORS] = survivors_record(*VIEWS[name])
        return message

    grid = InProcessGrid(5, tamper_request=tell_stories)
    record = _secure_round(_five_hospitals(classify_config, tmp_path), grid, tmp_path / "run")
    assert record.aborted
    assert sorted(record.refused) == [V, W, X, Y, Z]
    assert all("signed view of this round differs" in reason for reason in record.refused.values())
    _nothing_revealed(grid)


def _with_config(message: Message, change: Mapping[str, object]) -> Message:
    job = Job.from_record(message.content.config_records[JOB])
    forged = replace_section(job.config, "train", **change)
    message.content.config_records[JOB]["run-config"] = forged.to_json()
    return message


def test_a_different_learning_rate_for_everyone_but_one_hospital_is_refused(
    classify_config: RunConfig, tmp_path: Path
):
    """Everyone but X trains at learning rate 1e-30 from the first stage on: the "sum"
    would be X's update alone. The survivors' signed views (configuration hash) differ."""
    def isolate(node_id: int, message: Message) -> Message:
        if _hospital(node_id) != X and message.metadata.message_type.startswith("train."):
            return _with_config(message, {"learning_rate": 1e-30})
        return message

    grid = InProcessGrid(5, tamper_request=isolate)
    record = _secure_round(_five_hospitals(classify_config, tmp_path), grid, tmp_path / "run")
    assert record.aborted and sorted(record.refused) == [V, W, X, Y, Z]
    assert all("signed view of this round differs" in r for r in record.refused.values())
    _nothing_revealed(grid)


def test_a_configuration_changed_after_the_keys_stage_is_refused(
    classify_config: RunConfig, tmp_path: Path
):
    def change_at_training(node_id: int, message: Message) -> Message:
        if message.metadata.message_type == MASKED and _hospital(node_id) != X:
            return _with_config(message, {"learning_rate": 1e-30})
        return message

    grid = InProcessGrid(5, tamper_request=change_at_training)
    record = _secure_round(_five_hospitals(classify_config, tmp_path), grid, tmp_path / "run")
    assert record.aborted
    refused = {h: r for h, r in record.refused.items() if h != X}
    assert sorted(refused) == [V, W, Y, Z]
    assert all("changed the run configuration in the middle of a secure round" in r
               for r in refused.values())
    _nothing_revealed(grid)


def test_a_different_global_adapter_for_one_hospital_is_refused(
    classify_config: RunConfig, tmp_path: Path
):
    config = _five_hospitals(classify_config, tmp_path)
    other: Adapter = {k: v + 0.5 for k, v in initial_global_adapter(config).items()}

    def swap_adapter(node_id: int, message: Message) -> Message:
        if message.metadata.message_type == MASKED and _hospital(node_id) == X:
            message.content.array_records[GLOBAL_ADAPTER] = adapter_to_record(other)
        return message

    grid = InProcessGrid(5, tamper_request=swap_adapter)
    record = _secure_round(config, grid, tmp_path / "run")
    assert record.aborted and sorted(record.refused) == [V, W, X, Y, Z]
    assert all("signed view of this round differs" in r for r in record.refused.values())
    _nothing_revealed(grid)


def test_two_deployed_survivors_abort_the_round(classify_config: RunConfig, tmp_path: Path):
    """Three deployed hospitals, one gone after sharing keys: the two left could each compute
    the other's update from the next global adapter, so both refuse to unmask."""
    source = Path(classify_config.data.simulation_root)
    nodes = deployed_nodes(tmp_path / "keys", {
        k: (name, str(source / f"hospital-{k + 1}.jsonl"))
        for k, name in enumerate(["St-Anna", "City-General", "North-Clinic"])
    })
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=2,
                             round_retries=0)
    config = replace_section(config, "secure_aggregation", threshold=2, clip_norm=1.0,
                             max_weight=64)
    grid = InProcessGrid(3, node_configs=nodes, drop_after={1002: SHARES})
    record = _secure_round(config, grid, tmp_path / "run")
    assert record.aborted
    for hospital in ("St-Anna", "City-General"):
        assert "only 2 hospitals survived; this hospital needs at least 3" in (
            record.refused[hospital])
    _nothing_revealed(grid)


def _readme_list(prefix: str) -> set[str]:
    import re

    text = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    match = re.search(re.escape(prefix) + r" ([a-z0-9, -]+)\.", text)
    assert match, f"README lost its line {prefix!r}"
    return {name.strip() for name in match.group(1).split(",")}


def test_a_deployed_hospitals_replies_reveal_nothing_of_its_size(
    classify_config: RunConfig, tmp_path: Path
):
    """Three deployed hospitals of different sizes, DP and secure aggregation on: the masked
    replies carry exactly the README's metrics, none depending on the data's size, and the
    evaluation replies no example count (the coordinator averages them unweighted)."""
    from flwr.app import Message as FlowerMessage

    from fedtune.client.secure_stages import DEPLOYED_MASKED_METRICS
    from fedtune.core.wire import EVALUATE, METRICS, VALIDATION

    source = Path(classify_config.data.simulation_root)
    sizes = {"Small": 24, "Middle": 40, "Large": 60}
    files = {}
    for k, (name, lines) in enumerate(sizes.items()):
        text = (source / f"hospital-{k + 1}.jsonl").read_text().splitlines()
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join((text * 2)[:lines]) + "\n")
    nodes = deployed_nodes(tmp_path / "keys",
                           {k: (name, str(files[name])) for k, name in enumerate(sizes)})
    for node in nodes.values():
        node["privacy-ledger"] = str(tmp_path / f"{node['hospital-name']}-ledger.json")
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=3)
    config = replace_section(config, "privacy", enabled=True, target_epsilon=6.0)
    config = replace_section(config, "secure_aggregation", threshold=2, clip_norm=1.0,
                             max_weight=64)
    grid = InProcessGrid(3, node_configs=nodes)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    lines: list[str] = []
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lines.append)
    assert run_dir.saved_rounds() == [0, 1]

    def metrics_of(kind: str) -> dict[int, dict[str, float]]:
        replies: list[FlowerMessage] = [
            r for r in grid.replies if r.has_content() and r.metadata.message_type == kind
        ]
        return {(r.metadata.src_node_id, r.metadata.group_id):
                dict(r.content.metric_records[METRICS])
                for r in replies if METRICS in r.content.metric_records}

    masked = metrics_of(MASKED)
    assert len(masked) == 3
    listed = _readme_list("Metrics in a deployed hospital's masked update:")
    assert listed == set(DEPLOYED_MASKED_METRICS)
    size_revealing = {"epsilon", "delta", "epsilon-budget", "sample-rate", "noise-multiplier",
                      "dp-steps", "train-steps", "train-seconds", "num-examples"}
    assert not listed & size_revealing
    for values in masked.values():
        assert set(values) <= listed, set(values) - listed
        assert values["epsilon-target"] == 6.0 and values["dp"] == 1.0
    evaluations = metrics_of(EVALUATE)
    assert len(evaluations) == 6  # 3 hospitals × (base test, final test)
    # evaluation.with_training: round 1's validation rides on the final evaluation's reply
    validations = [dict(r.content.metric_records[VALIDATION]) for r in grid.replies
                   if r.has_content() and VALIDATION in r.content.metric_records]
    assert len(validations) == 3
    for values in [*evaluations.values(), *validations]:
        assert set(values) == {"loss", "accuracy", "macro-f1"}
    # The coordinator still reports a guarantee for each hospital: the planned bound.
    assert any("ε ≤ 6.000 (its plan for this run" in line for line in lines)
    summary = run_dir.summary()
    assert summary["final_test"]["weighted"]["accuracy"] == pytest.approx(
        sum(summary["final_test"]["per_hospital"][h]["accuracy"] for h in sizes) / 3)


def _plain_deployed(classify_config: RunConfig, tmp_path: Path, **extra: object):
    source = Path(classify_config.data.simulation_root)
    nodes = deployed_nodes(tmp_path / "keys", {
        k: (name, str(source / f"hospital-{k + 1}.jsonl"))
        for k, name in enumerate(["St-Anna", "City-General"])
    })
    for node in nodes.values():
        node.update({"allow-plain-updates": True,
                     "audit-log": str(tmp_path / f"{node['hospital-name']}-audit.jsonl"),
                     **extra})
    return source, nodes


def test_a_coordinator_chosen_split_is_ignored_by_a_deployed_node(
    classify_config: RunConfig, tmp_path: Path
):
    """The coordinator asks for 5 % training data (95 % outside DP, in noise-free evaluation);
    each deployed node splits its data its own way: 80/10/10, or what its admin set."""
    from tiny import in_clear

    from fedtune.client.data import load_hospital_data, split_examples

    source, nodes = _plain_deployed(classify_config, tmp_path)
    nodes[1]["data-split"], nodes[1]["split-seed"] = "0.6,0.2,0.2", 3
    config = replace_section(in_clear(classify_config), "federation", rounds=1, min_hospitals=2)
    config = replace_section(config, "data", split=[0.05, 0.9, 0.05], split_seed=99)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    run_federation(InProcessGrid(2, node_configs=nodes), config, run_dir,
                   initial_global_adapter(config), say=lambda _: None)
    (record,) = [r for r in run_dir.records() if isinstance(r, RoundRecord)]
    for name, k, fractions, seed in (("St-Anna", 1, (0.8, 0.1, 0.1), 0),
                                     ("City-General", 2, (0.6, 0.2, 0.2), 3)):
        data = load_hospital_data(source / f"hospital-{k}.jsonl", labels=config.model.labels)
        expected = split_examples(data.examples, seed=seed, fractions=fractions).train
        assert record.train[name]["num-examples"] == len(expected)


@pytest.mark.parametrize("with_training", [False, True])
def test_a_deployed_node_answers_a_bounded_number_of_evaluations(
    classify_config: RunConfig, tmp_path: Path, with_training: bool
):
    """max-evaluations = 2 over base test, two validations and the final test: whether a
    validation travels in its own message or with the next training (evaluation.
    with_training), the node answers two and refuses the rest, and still trains."""
    from tiny import in_clear

    _, nodes = _plain_deployed(classify_config, tmp_path, **{"max-evaluations": 2})
    config = replace_section(in_clear(classify_config), "federation", rounds=2, min_hospitals=2)
    config = replace_section(config, "evaluation", with_training=with_training)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    run_federation(InProcessGrid(2, node_configs=nodes), config, run_dir,
                   initial_global_adapter(config), say=lambda _: None)
    rounds = [r for r in run_dir.records() if isinstance(r, RoundRecord)]
    assert [r.round for r in rounds if not r.aborted] == [1, 2]  # training goes on
    final = run_dir.summary()["final_test"]
    assert final["per_hospital"] == {} and len(final["refused"]) == 2
    assert all("max-evaluations = 2" in reason for reason in final["refused"].values())
    state = run_dir.load_state()
    assert set(state.validation) == {1}  # base test + round 1's validation = 2: done
    if not with_training:
        assert rounds[0].validation is not None and rounds[0].validation["per_hospital"]
        refused = rounds[1].validation["refused"]
        assert sorted(refused) == ["City-General", "St-Anna"]
        assert all("max-evaluations = 2" in reason for reason in refused.values())
    else:
        (validation,) = [r for r in run_dir.records()
                         if isinstance(r, Evaluation) and r.split == "validation"]
        assert validation.round == 1
        assert sorted(validation.per_hospital) == ["City-General", "St-Anna"]


def test_a_coordinator_asking_for_validation_with_every_message_gets_no_more_than_the_limit(
    classify_config: RunConfig, tmp_path: Path
):
    """The attack on `Job.validate`: a coordinator that sets it on every training and
    evaluation message (here by rewriting each request) to get noise-free metrics beyond
    the node's `max-evaluations`. The nodes answer one evaluation (the limit), keep
    training every round, and no reply carries metrics past the limit."""
    from flwr.app import Message as FlowerMessage
    from tiny import in_clear

    from fedtune.core.wire import EVALUATE, JOB, TRAIN, VALIDATION, Job

    _, nodes = _plain_deployed(classify_config, tmp_path, **{"max-evaluations": 1})
    config = replace_section(in_clear(classify_config), "federation", rounds=3, min_hospitals=2)

    def always_validate(_node_id: int, message: FlowerMessage) -> FlowerMessage:
        if message.metadata.message_type in (TRAIN, EVALUATE):
            job = Job.from_record(message.content.config_records[JOB])
            message.content.config_records[JOB] = Job(
                job.server_round, job.config, job.run_id, job.split, job.attempt,
                validate=True).to_record()
        return message

    grid = InProcessGrid(2, node_configs=nodes, tamper_request=always_validate)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=lambda _: None)
    rounds = [r for r in run_dir.records() if isinstance(r, RoundRecord)]
    assert [r.round for r in rounds if not r.aborted] == [1, 2, 3]  # training never stopped
    for node_id in grid.node_ids:
        sent = [r for r in grid.replies if r.metadata.src_node_id == node_id
                and r.has_content() and (VALIDATION in r.content.metric_records
                                         or r.metadata.message_type == EVALUATE)]
        assert len(sent) == 1, sent  # the base test evaluation only: its limit
    hospital_logs = [tmp_path / f"{name}-audit.jsonl" for name in ("St-Anna", "City-General")]
    for log in hospital_logs:
        events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
        assert events.count("sent-metrics") == 1


def test_a_restarted_deployed_node_still_refuses_to_key_an_attempt_twice(
    classify_config: RunConfig, tmp_path: Path
):
    """The nodes key round 1, attempt 1, and restart (fresh Flower contexts); the coordinator
    then asks for attempt 1 again: each node remembers it from its own audit log."""
    source = Path(classify_config.data.simulation_root)
    nodes = deployed_nodes(tmp_path / "keys", {
        k: (name, str(source / f"hospital-{k + 1}.jsonl"))
        for k, name in enumerate(["St-Anna", "City-General", "North-Clinic"])
    })
    for node in nodes.values():
        node["audit-log"] = str(tmp_path / f"{node['hospital-name']}-audit.jsonl")
    config = replace_section(classify_config, "federation", rounds=1, min_hospitals=3,
                             round_retries=0)
    config = replace_section(config, "secure_aggregation", threshold=2, clip_norm=1.0,
                             max_weight=64)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    first = InProcessGrid(3, node_configs=nodes, drop_after={1001: KEYS, 1002: KEYS})
    run_federation(first, config, run_dir, initial_global_adapter(config), say=lambda _: None)

    def attempt_one_again(node_id: int, message: Message) -> Message:
        job = message.content.config_records[JOB]
        job["attempt"] = 1
        return message

    restarted = InProcessGrid(3, node_configs=nodes, tamper_request=attempt_one_again)
    run_federation(restarted, config, run_dir, initial_global_adapter(config),
                   say=lambda _: None, resume=True)
    retry = [r for r in run_dir.records() if isinstance(r, RoundRecord)][-1]
    assert retry.aborted
    assert all("already took part in" in reason for reason in retry.refused.values())
    assert sorted(r.split(":")[0] for r in retry.refused.values()) == [
        "City-General", "North-Clinic", "St-Anna"]
