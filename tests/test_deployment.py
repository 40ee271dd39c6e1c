"""A real federation on 127.0.0.1: `fedtune server` and `fedtune node` as separate processes.

Flower's deployment engine (SuperLink, SuperNodes, one ClientApp process per message) over
TLS with SuperNode authentication, keys made by `fedtune keys`, a tiny BERT built from a
config. Every process a test starts is stopped by the fixture, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedtune.ops.federation_keys import enroll_hospital, init_federation, new_hospital
from fedtune.ops.icd10 import write_hospital_datasets

pytestmark = pytest.mark.slow
HOSPITALS = ("st-anna", "city-general", "north-clinic")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts fedtune commands in their own sessions; stops them all, whatever happens."""

    def __init__(self, root: Path, site: Path) -> None:
        self.root = root
        self.site = site
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str, site: Path | None = None
              ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}.log"
        # From the installed wheel, not the checkout: its folder first on the path, and a
        # working directory outside the checkout (python -m puts the cwd first).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(site or self.site)}
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.ops.cli", *args], stdout=handle,
                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root,
            )
        self.started.append((proc, log))
        return proc, log

    def stop_all(self) -> None:
        for proc, _log in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc, _log in self.started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture()
def processes(tmp_path: Path, installed_wheel: Path) -> Iterator[Processes]:
    started = Processes(tmp_path, installed_wheel)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture()
def federation(tmp_path: Path, tiny_bert_dir: Path) -> dict[str, Path]:
    """A federation folder, 3 enrolled hospitals with data and node files, a run config."""
    fed = tmp_path / "federation"
    init_federation(fed, ["127.0.0.1", "localhost"], valid_days=2)
    data = tmp_path / "data"
    write_hospital_datasets(data, len(HOSPITALS), "classify", examples_per_hospital=40, seed=0)
    labels = json.loads((data / "labels.json").read_text())
    paths = {"federation": fed}
    for k, name in enumerate(HOSPITALS, start=1):
        home = tmp_path / name
        files = new_hospital(name, home)
        enroll_hospital(fed, files.identity_pub, files.node_pub)
        paths[name] = write_node_file(home, name, files.node_key, files.identity_key, fed,
                                      data / f"hospital-{k}.jsonl")
    config = {
        "model": {"source": str(tiny_bert_dir), "task": "classify", "max_length": 32,
                  "labels": labels},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "train": {"local_steps": 2, "learning_rate": 5e-3, "batch_size": 8, "seed": 1},
        "federation": {"rounds": 2, "min_hospitals": 3, "wait_for_hospitals_s": 240,
                       "round_timeout_s": 300},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "max_physical_batch_size": 16},
        "secure_aggregation": {"threshold": 2, "stage_timeout_s": 180},
        "evaluation": {"max_examples": 8},
    }
    paths["config"] = tmp_path / "run.toml"
    with paths["config"].open("wb") as handle:
        tomli_w.dump(config, handle)
    return paths


def write_node_file(
    home: Path, name: str, node_key: Path, identity_key: Path, fed: Path, data: Path,
    ca: Path | None = None, port: int | None = None, coordinator: str = "",
) -> Path:
    node = {
        "node": {
            "hospital": name, "coordinator": coordinator or "PLACEHOLDER",
            "ca_certificate": str(ca or fed / "ca.pem"), "node_key": str(node_key),
            "identity_key": str(identity_key), "enrollment": str(fed / "enrollment.json"),
            "data": str(data), "privacy_ledger": str(home / "ledger.json"),
            "privacy_epsilon_budget": 8.0, "privacy_unit": "patient", "device": "cpu",
            "local_port": port or free_port(), "join_timeout_s": 15.0,
            "cpu_threads": 1,  # three nodes share the test machine's CPUs
        }
    }
    path = home / "node.toml"
    with path.open("wb") as handle:
        tomli_w.dump(node, handle)
    return path


def point_nodes_at(paths: dict[str, Path], address: str) -> None:
    for name in HOSPITALS:
        text = paths[name].read_text().replace("PLACEHOLDER", address)
        paths[name].write_text(text)


def start_coordinator(
    processes: Processes, federation: dict[str, Path], config: Path, run_dir: Path,
    site: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """`fedtune server` on a free port, hospitals' node files pointed at it, and waited for
    until it has registered the enrolled hospitals' node keys."""
    port = free_port()
    point_nodes_at(federation, f"127.0.0.1:{port}")
    server, server_log = processes.start(
        "server", "server", "--config", str(config), "--federation",
        str(federation["federation"]), "--run-dir", str(run_dir), "--host", "127.0.0.1",
        "--port", str(port), site=site,
    )
    wait_for(lambda: "Registered north-clinic" in server_log.read_text(), 120, "registration")
    return server, server_log


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_three_hospitals_train_two_rounds_over_tls_with_node_authentication(
    tmp_path: Path, federation: dict[str, Path], processes: Processes
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    point_nodes_at(federation, address)
    run_dir = tmp_path / "run"
    server, server_log = processes.start(
        "server", "server", "--config", str(federation["config"]),
        "--federation", str(federation["federation"]), "--run-dir", str(run_dir),
        "--host", "127.0.0.1", "--port", str(port),
    )
    wait_for(lambda: "Registered north-clinic" in server_log.read_text() or server.poll()
             is not None, 120, "the coordinator to register the hospitals")
    for name in HOSPITALS:
        processes.start(name, "node", "--config", str(federation[name]))
    # A hospital that is not enrolled is refused; one without the federation's CA cannot
    # even verify the coordinator. Neither can join.
    intruder = new_hospital("intruder", tmp_path / "intruder")
    intruder_file = write_node_file(
        tmp_path / "intruder", "intruder", intruder.node_key, intruder.identity_key,
        federation["federation"], tmp_path / "data" / "hospital-1.jsonl", coordinator=address,
    )
    stranger_ca = tmp_path / "other-federation"
    init_federation(stranger_ca, ["127.0.0.1"], valid_days=2)
    no_ca = tmp_path / "no-ca"
    no_ca.mkdir()
    first = HOSPITALS[0]
    no_ca_file = write_node_file(
        no_ca, first, tmp_path / first / f"{first}-node.key", tmp_path / first / f"{first}.key",
        federation["federation"], tmp_path / "data" / "hospital-1.jsonl",
        ca=stranger_ca / "ca.pem", coordinator=address,
    )
    refused, refused_log = processes.start("intruder", "node", "--config", str(intruder_file))
    untrusting, untrusting_log = processes.start("no-ca", "node", "--config", str(no_ca_file))
    assert refused.wait(timeout=120) != 0
    refused_text = refused_log.read_text()
    assert "Failed to activate SuperNode" in refused_text
    assert "the coordinator refused this node" in refused_text and "giving up" in refused_text
    assert untrusting.wait(timeout=120) != 0
    untrusting_text = untrusting_log.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting_text
    assert "cannot verify the coordinator's TLS certificate" in untrusting_text

    code = server.wait(timeout=900)
    log = server_log.read_text()
    assert code == 0, log[-3000:]
    assert "than the base model on held-out data" in log and "fedtune predict" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_round"] == 2
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rounds if r.get("event") == "round" and not r.get("aborted")]
    assert len(trained) == 2
    for record in trained:
        assert sorted(record["hospitals_used"]) == sorted(HOSPITALS)
        assert record["secure_aggregation"], "the round did not use secure aggregation"
        for name in HOSPITALS:  # the planned bound and the unit: the exact ε would reveal n
            assert record["privacy_per_hospital"][name] == {"epsilon-target": 8.0,
                                                            "dp-patient-level": 1.0}
    for name in HOSPITALS:  # each hospital's own ledger, on its own disk
        ledger = json.loads((tmp_path / name / "ledger.json").read_text())
        assert len(ledger["entries"]) == 2
        assert 0 < ledger["entries"][-1]["epsilon"] <= 8.0  # the exact ε, kept at home
        assert ledger["unit"] == "patient"  # the node file's privacy_unit
        # Every ClientApp ran through the node's own check of the coordinator's bundle.
        assert "app bundle verified" in (tmp_path / f"{name}.log").read_text()
    _assert_validation_is_what_a_separate_evaluation_gives(run_dir, federation, rounds)


def _assert_validation_is_what_a_separate_evaluation_gives(
    run_dir: Path, federation: dict[str, Path], records: list[dict]
) -> None:
    """evaluation.with_training (the default): round 1's validation came with round 2's
    masked inputs, round 2's with the final test evaluation. Each hospital's numbers are
    those of evaluating that round's saved adapter at the hospital, as a separate
    evaluation message would (same node settings, hence the node's own data split)."""
    from fedtune.client.local_evaluation import evaluate_adapter
    from fedtune.core.wire import Job
    from fedtune.ops.deployment import hospital_node_settings, load_node_settings
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory(run_dir)
    validations = {r["round"]: r["per_hospital"] for r in records
                   if r.get("event") == "evaluate" and r.get("split") == "validation"}
    assert sorted(validations) == [1, 2]
    for server_round, per_hospital in validations.items():
        assert sorted(per_hospital) == sorted(HOSPITALS)
        for name in HOSPITALS:
            node = hospital_node_settings(load_node_settings(federation[name]))
            job = Job(server_round, run.config(), run.run_id)
            expected = evaluate_adapter(run.load_adapter(server_round), job, node,
                                        "validation").metrics
            assert set(per_hospital[name]) == set(expected) == {"loss", "accuracy", "macro-f1"}
            for metric, value in expected.items():
                assert per_hospital[name][metric] == pytest.approx(value, abs=1e-5), (
                    server_round, name, metric)


def test_a_coordinator_shipping_modified_code_is_refused_by_every_node(
    tmp_path: Path, federation: dict[str, Path], processes: Processes, installed_wheel: Path
) -> None:
    """The coordinator runs a modified fedtune (its ClientApp writes a canary file the moment
    it is imported, as code reading the data or the identity key would run): the bundle it
    ships is refused by every hospital's node before any of it runs."""
    import shutil

    evil = tmp_path / "evil-site"
    shutil.copytree(installed_wheel, evil)
    canary = tmp_path / "canary"
    app = evil / "fedtune" / "client" / "app.py"
    app.write_text(app.read_text() + f"\nopen({str(canary)!r}, 'w').write('ran')\n")
    config = federation["config"]
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1").replace(
        "[federation]\n", "[federation]\nround_retries = 0\n"))
    run_dir = tmp_path / "run"
    server, _log = start_coordinator(processes, federation, config, run_dir, site=evil)
    for name in HOSPITALS:
        processes.start(name, "node", "--config", str(federation[name]))
    wait_for(lambda: any(r.get("aborted") for r in round_records(run_dir))
             or server.poll() is not None, 600, "the round to be refused")
    assert not canary.exists(), "the coordinator's code ran at a hospital"
    records = round_records(run_dir)
    assert records and records[0]["aborted"] and not records[0]["hospitals_used"]
    assert not (run_dir / "adapters" / "round-0001.safetensors").exists()
    for name in HOSPITALS:
        log = (tmp_path / f"{name}.log").read_text()
        assert "refused the coordinator's app bundle" in log, log[-2000:]
        assert "changed: fedtune/client/app.py" in log
        audit = (tmp_path / name / f"{name}-audit.jsonl").read_text()
        assert '"refused-app-bundle"' in audit


def kill_coordinator(server: subprocess.Popen[bytes], run_dir: Path) -> None:
    """A coordinator crash: the command and every Flower process it started, SIGKILLed."""
    from fedtune.ops.flower_processes import find_simulation_processes

    homes = [(run_dir / ".flower" / home).resolve() for home in ("superlink", "cli")]
    flower = [proc for home in homes for proc in find_simulation_processes(home)]
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    for proc in flower:
        with contextlib.suppress(Exception):
            proc.kill()


def _events(run_dir: Path, event: str) -> list[dict]:  # type: ignore[type-arg]
    """The coordinator's metrics.jsonl records of one event kind, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()
            if f'"event": "{event}"' in line]


def round_records(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return _events(run_dir, "round")


def round_starts(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return _events(run_dir, "round-start")


def test_hospitals_die_a_round_is_aborted_and_the_resumed_coordinator_retries_it(
    tmp_path: Path, federation: dict[str, Path], processes: Processes
) -> None:
    """One federation, three failures in turn (one start-up of the federation for all).

    Round 2: one hospital's machine dies; 2 of 3 survive = the threshold, and these admins
    accept rounds of two survivors, so the round completes. Then the coordinator crashes
    (machine lost, no clean-up at all), the hospital comes back and the coordinator is
    restarted with --resume. Round 3: two hospitals die (1 left, threshold 2): the attempt is
    aborted with the global adapter that of round 2; they come back and round 3 is retried
    as a new attempt from that same adapter. Every hospital's ledger holds at least what the
    coordinator saw it report, the survivor's exactly that.
    """
    from fedtune.core.adapters import adapter_sha256
    from fedtune.server.run_dir import RunDirectory

    config = federation["config"]
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3").replace(
        "[federation]\n", "[federation]\nround_retries = 2\n"))
    for name in HOSPITALS:  # these admins accept rounds of two survivors (default: three)
        node = federation[name]
        node.write_text(node.read_text() + "secagg_min_survivors = 2\n")
    port = free_port()
    point_nodes_at(federation, f"127.0.0.1:{port}")
    run_dir = tmp_path / "run"
    server_args = ("--config", str(config), "--federation", str(federation["federation"]),
                   "--host", "127.0.0.1", "--port", str(port))
    server, server_log = processes.start("server", "server", *server_args,
                                         "--run-dir", str(run_dir))
    wait_for(lambda: "Registered north-clinic" in server_log.read_text(), 120, "registration")
    nodes = {name: processes.start(name, "node", "--config", str(federation[name]))[0]
             for name in HOSPITALS}

    wait_for(lambda: any(r["round"] == 2 for r in round_starts(run_dir)), 600, "round 2")
    os.killpg(nodes["north-clinic"].pid, signal.SIGKILL)
    wait_for(lambda: len(round_records(run_dir)) >= 2, 600, "round 2")
    kill_coordinator(server, run_dir)
    records = round_records(run_dir)
    assert not records[1].get("aborted"), records[1]
    assert sorted(records[1]["hospitals_used"]) == ["city-general", "st-anna"]

    nodes["north-clinic"] = processes.start(
        "north-clinic-again", "node", "--config", str(federation["north-clinic"]))[0]
    resumed, resumed_log = processes.start("server-resumed", "server", *server_args,
                                           "--resume", str(run_dir))
    wait_for(lambda: any(r["round"] == 3 for r in round_starts(run_dir)), 600, "round 3")
    for name in ("city-general", "north-clinic"):
        os.killpg(nodes[name].pid, signal.SIGKILL)
    wait_for(lambda: any(r.get("aborted") for r in round_records(run_dir)), 600, "the abort")
    for name in ("city-general", "north-clinic"):
        processes.start(f"{name}-back", "node", "--config", str(federation[name]))
    assert resumed.wait(timeout=900) == 0, resumed_log.read_text()[-3000:]

    log = resumed_log.read_text()
    assert "Round 3 aborted" in log and "The global adapter is unchanged" in log
    records = round_records(run_dir)
    assert [(r["round"], r["attempt"], bool(r.get("aborted"))) for r in records] == [
        (1, 1, False), (2, 1, False), (3, 1, True), (3, 2, False)  # no round twice
    ]
    assert "at least 2" in records[2]["reason"]
    assert sorted(records[-1]["hospitals_used"]) == sorted(HOSPITALS)  # both came back
    round_two = adapter_sha256(RunDirectory(run_dir).load_adapter(2))
    starts = [r for r in round_starts(run_dir) if r["round"] == 3]
    assert [r["attempt"] for r in starts] == [1, 2]
    assert {r["global_adapter_sha256"] for r in starts} == {round_two}  # unchanged by the abort
    assert json.loads((run_dir / "summary.json").read_text())["final_round"] == 3
    # The survivor's ledger holds exactly the trainings the coordinator saw it report (the
    # aborted attempt's included, if it trained in it); a killed hospital's may also hold one
    # it finished but could not send before it died: over-counting, never under-counting.
    for name in HOSPITALS:
        ledger = json.loads((tmp_path / name / "ledger.json").read_text())
        charged = [e["server_round"] for e in ledger["entries"]]
        reported = [r["round"] for r in records if name in r["hospitals_used"]]
        assert charged[0] == 1 and charged[-1] == 3
        if name == "st-anna":
            assert charged == reported
        else:
            assert all(charged.count(k) >= reported.count(k) for k in (1, 2, 3))
