"""Strategies, client-level DP, sampling and resume in the real round loop (in process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_grid import CrashAtRound, InProcessGrid
from tiny import in_clear, replace_section

from fedtune.core.config import STRATEGIES, RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.secagg.encoding import flatten, layout_size
from fedtune.core.secagg.wire import MASKED, MASKED_INPUT
from fedtune.core.uploads import uploaded_tensors
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

H1, H2, H3 = 1000, 1001, 1002


def _run(config: RunConfig, grid: InProcessGrid, path: Path, lines: list[str] | None = None,
         resume: bool = False) -> RunDirectory:
    run_dir = RunDirectory(path)
    if not resume:
        run_dir.create(config)
    say = lines.append if lines is not None else (lambda _line: None)
    run_federation(grid, config, run_dir, initial_global_adapter(config), say=say, resume=resume)
    return run_dir


def _rounds(run_dir: RunDirectory) -> list[dict]:
    return [r for r in run_dir.read_metrics() if r["event"] == "round"]


def _config(base: RunConfig, strategy: str, rounds: int = 1, **federation: object) -> RunConfig:
    lr = 0.05 if strategy in ("fedadam", "fedyogi", "fedadagrad") else 1.0
    config = replace_section(base, "federation", rounds=rounds, min_hospitals=2,
                             strategy=strategy, server_learning_rate=lr, **federation)
    # A tight codec (tiny deltas, ≈ 50 examples each): its error bound is ~1e-8 per value.
    return replace_section(config, "secure_aggregation", clip_norm=1.0, max_weight=64)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_same_adapter_with_secure_aggregation_on_and_off(
    classify_config: RunConfig, tmp_path: Path, strategy: str
):
    """The strategy sees only (Σ wᵢΔᵢ, Σ wᵢ); masking changes nothing but fixed-point error.
    Two rounds, so the server optimizers' state (moments) takes part."""
    config = _config(classify_config, strategy, rounds=2)
    secure = _run(config, InProcessGrid(3), tmp_path / "secure")
    plain = _run(in_clear(config), InProcessGrid(3), tmp_path / "plain")
    start = secure.load_adapter(0)
    # Round 1 differs only by fixed-point rounding (~1e-8 here); round 2 also trains from
    # starting points that differ by that rounding, which local training amplifies a little.
    for server_round, tolerance in ((1, 1e-6), (2, 1e-4)):
        a, b = secure.load_adapter(server_round), plain.load_adapter(server_round)
        moved = max(float(np.max(np.abs(b[k] - start[k]))) for k in start)
        assert moved > 1e-4  # the strategy did something
        for name in start:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=tolerance * moved)
    assert all(r["secure_aggregation"]["secure_aggregation"] for r in _rounds(secure))


def test_ffa_lora_keeps_the_shared_a_sends_half_and_averages_exactly(
    classify_config: RunConfig, tmp_path: Path
):
    """With A shared and frozen, mean(Bᵢ)·A = mean(Bᵢ·A): the aggregated product is exact."""
    views = tmp_path / "views"
    config = replace_section(_config(classify_config, "ffa-lora", rounds=2),
                             "secure_aggregation", record_views_dir=str(views))
    grid = InProcessGrid(3)
    run_dir = _run(config, grid, tmp_path / "run")
    start, end = run_dir.load_adapter(0), run_dir.load_adapter(2)
    a_names = [k for k in start if ".lora_A." in k]
    b_names = [k for k in start if ".lora_B." in k]
    assert a_names and len(a_names) == len(b_names)
    for name in a_names:
        np.testing.assert_array_equal(end[name], start[name])  # A never moves
    assert any(not np.array_equal(end[k], start[k]) for k in b_names)
    # The masked payload carries B (and the head) only: LoRA upload is half of A + B.
    uploaded = uploaded_tensors(start, "ffa-lora")
    assert not any(".lora_A." in k for k in uploaded)
    payloads = [m for m in grid.replies if m.metadata.message_type == MASKED]
    assert {m.content.array_records[MASKED_INPUT]["masked"].shape[0] for m in payloads} == {
        layout_size(uploaded)
    }
    lora = sum(start[k].size for k in a_names + b_names)
    assert sum(uploaded[k].size for k in b_names) * 2 == lora
    # Round 1: new B·A equals the weighted mean of the hospitals' (B + ΔBᵢ)·A.
    g1 = run_dir.load_adapter(1)
    (record,) = _rounds(run_dir)[:1]
    plain = {h: np.load(views / "round-0001" / f"{h}.plaintext.npy") for h in record["train"]}
    from test_secure_rounds import _train_weights

    weights = _train_weights(config, sorted(plain))
    total = sum(weights.values())
    offsets, offset = {}, 0
    for name in sorted(uploaded):
        offsets[name] = offset
        offset += uploaded[name].size
    for b_name in b_names:
        a_name = b_name.replace(".lora_B.", ".lora_A.")
        size, shape = start[b_name].size, start[b_name].shape
        local_products = [
            (start[b_name] + plain[h][offsets[b_name] : offsets[b_name] + size].reshape(shape))
            @ start[a_name]
            for h in sorted(plain)
        ]
        expected = sum(w * p for w, p in zip(weights.values(), local_products, strict=True))
        np.testing.assert_allclose(g1[b_name] @ start[a_name], expected / total, atol=1e-6)


def test_client_level_noise_has_the_configured_std_and_survives_a_dropout_at_the_threshold(
    classify_config: RunConfig, tmp_path: Path
):
    """σ·C large against the tiny deltas, so the round's sum is essentially the noise: its
    per-coordinate std must be σ·C·√(s/t) with s survivors; here s = t = 2 after a dropout."""
    sigma, clip = 50.0, 0.01
    config = replace_section(_config(classify_config, "fedavg"), "privacy", client_level=True,
                             client_clip_norm=clip, client_noise_multiplier=sigma)
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(3, drop_after={H2: "train.secagg_shares"}),
                   tmp_path / "run", lines)
    (record,) = _rounds(run_dir)
    assert record["secure_aggregation"]["survivors"] == ["hospital-1", "hospital-3"]
    start, end = run_dir.load_adapter(0), run_dir.load_adapter(1)
    # Weight 1 per hospital under client-level DP: the new adapter moved by Σ / 2.
    total = (flatten(end, start) - flatten(start, start)) * 2
    expected = sigma * clip  # s = t = 2: √(s/t) = 1
    n = total.size
    assert n > 2000
    assert abs(total.std() / expected - 1) < 6 / np.sqrt(2 * n) + 0.01  # the clipped signal ≤ C
    summary = run_dir.summary()
    guarantee = summary["privacy"]["client_level"]
    assert guarantee["noise_multiplier"] == sigma and guarantee["rounds"] == 1
    assert 0 <= guarantee["epsilon"] < 0.1  # σ = 50, one round: almost nothing revealed
    assert any("Client-level differential privacy" in line for line in lines)


def test_client_level_sums_beyond_the_clip_bound_are_refused(
    classify_config: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A hospital that skips its clip is caught on the sum: the round is aborted."""
    import fedtune.client.outgoing as outgoing
    import fedtune.core.client_dp as client_dp
    from fedtune.core.secagg.fixed_point import ClipResult

    def no_clip(vector: np.ndarray, clip_norm: float) -> ClipResult:
        return ClipResult(np.asarray(vector, dtype=np.float64) * 1e3, 0.0, False)

    monkeypatch.setattr(client_dp, "clip_to_norm", no_clip)
    monkeypatch.setattr(outgoing, "clip_to_norm", no_clip)
    config = _config(classify_config, "fedavg")
    config = replace_section(config, "privacy", client_level=True, client_clip_norm=1e-3,
                             client_noise_multiplier=0.5)
    lines: list[str] = []
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run", lines)
    assert run_dir.saved_rounds() == [0]
    assert any("ignored its clip bound" in line or "could not be recovered" in line
               for line in lines), lines
    # The refused sum was still computed: it counts for the client-level accounting.
    (revealed,) = [r for r in run_dir.read_metrics() if r["event"] == "sum-revealed"]
    assert revealed["round"] == 1 and revealed["hospitals_sampled"] == 3
    assert run_dir.summary()["privacy"]["client_level"]["rounds"] == 1


def test_client_level_dp_without_secure_aggregation_is_refused(classify_config: RunConfig):
    """Without masking the coordinator would see each update with only its noise share."""
    from fedtune.core.config import ConfigError

    with pytest.raises(ConfigError, match="client_level needs secure aggregation"):
        in_clear(replace_section(classify_config, "privacy", client_level=True))


def test_hospital_sampling_takes_the_configured_count_and_records_it(
    classify_config: RunConfig, tmp_path: Path
):
    config = _config(classify_config, "fedavg", rounds=3, hospitals_per_round=2)
    run_dir = _run(in_clear(config), InProcessGrid(3), tmp_path / "run")
    records = _rounds(run_dir)
    assert [r["hospitals_sampled"] for r in records] == [2, 2, 2]
    assert all(r["hospitals_connected"] == 3 for r in records)
    assert all(len(r["hospitals_used"]) == 2 for r in records)
    assert len({tuple(r["sampled_nodes"]) for r in records}) > 1 or len(records) == 1
    # The same seed samples the same hospitals (a resumed run stays on the same plan).
    again = _run(in_clear(config), InProcessGrid(3), tmp_path / "again")
    assert [r["sampled_nodes"] for r in _rounds(again)] == [r["sampled_nodes"] for r in records]


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_a_resumed_run_ends_with_the_same_adapter_and_optimizer_state(
    classify_config: RunConfig, tmp_path: Path, strategy: str
):
    config = in_clear(_config(classify_config, strategy, rounds=3))  # deterministic training
    straight = _run(config, InProcessGrid(3), tmp_path / "straight")

    with pytest.raises(KeyboardInterrupt):
        _run(config, CrashAtRound(3, crash_round=3), tmp_path / "resumed")
    stopped = RunDirectory(tmp_path / "resumed")
    assert stopped.saved_rounds() == [0, 1, 2]
    lines: list[str] = []
    _run(config, InProcessGrid(3), tmp_path / "resumed", lines, resume=True)
    assert any("Resuming" in line and "after round 2" in line for line in lines)

    assert stopped.saved_rounds() == [0, 1, 2, 3]
    for name, value in straight.load_adapter(3).items():
        np.testing.assert_array_equal(stopped.load_adapter(3)[name], value)
    a, b = straight.load_strategy_state(3), stopped.load_strategy_state(3)
    assert a["meta"] == b["meta"] and a["meta"]["step"] == 3
    assert set(a["arrays"]) == set(b["arrays"]) and a["arrays"]
    for key in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][key], b["arrays"][key])
    # Each round is in the metrics exactly once.
    assert [r["round"] for r in _rounds(stopped)] == [1, 2, 3]
    assert stopped.summary()["final_round"] == 3


def test_fedprox_pulls_hospitals_toward_the_global_adapter(
    classify_config: RunConfig, tmp_path: Path
):
    """Same data and seeds: a large μ makes every hospital's update shorter than FedAvg's."""
    norms = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        config = in_clear(_config(classify_config, strategy, proximal_mu=mu))
        run_dir = _run(config, InProcessGrid(3), tmp_path / strategy)
        start, end = run_dir.load_adapter(0), run_dir.load_adapter(1)
        norms[strategy] = float(np.linalg.norm(flatten(end, start) - flatten(start, start)))
    assert norms["fedprox"] < 0.8 * norms["fedavg"]


def test_the_launcher_checks_the_threshold_against_the_sampled_round_size(
    classify_config: RunConfig,
):
    from fedtune.core.config import ConfigError
    from fedtune.ops.launch import prepare_secure_aggregation

    sampled = replace_section(classify_config, "federation", hospitals_per_round=4)
    ok = replace_section(sampled, "secure_aggregation", threshold=3)  # 3 > 4/2
    prepare_secure_aggregation(ok, 3, say=lambda _line: None)  # 3 hospitals: rounds of 3
    too_high = replace_section(sampled, "secure_aggregation", threshold=4)
    with pytest.raises(ConfigError, match="rounds have 3 hospital"):
        prepare_secure_aggregation(too_high, 3, say=lambda _line: None)


def test_a_resumed_dp_run_keeps_each_hospitals_ledger_exact(
    classify_config: RunConfig, tmp_path: Path
):
    """Coordinator killed before round 3 trains: after --resume every hospital's ledger has
    exactly one entry per round of this run, and its ε stays within the run's target."""
    from fedtune.client.privacy_ledger import read_ledger_file

    ledgers = tmp_path / "ledgers"
    config = replace_section(_config(classify_config, "fedadam", rounds=3), "privacy",
                             enabled=True, target_epsilon=4.0, ledger_dir=str(ledgers))
    with pytest.raises(KeyboardInterrupt):
        _run(config, CrashAtRound(3, crash_round=3), tmp_path / "run")
    run_dir = _run(config, InProcessGrid(3), tmp_path / "run", resume=True)
    assert run_dir.saved_rounds() == [0, 1, 2, 3]
    for hospital in ("hospital-1", "hospital-2", "hospital-3"):
        ledger = read_ledger_file(ledgers / f"{hospital}.json")
        assert [e.server_round for e in ledger.entries] == [1, 2, 3]
        assert len({e.run_id for e in ledger.entries}) == 1
        assert ledger.epsilon_spent() <= 4.0
    guarantees = run_dir.summary()["privacy"]["per_hospital"]
    assert set(guarantees) == {"hospital-1", "hospital-2", "hospital-3"}
