"""End to end through Flower's real simulation engine (Ray), as `fedtune run` runs it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomli_w
from tiny import tiny_run_config

from fedtune.ops.cli import main
from fedtune.ops.flower_processes import find_simulation_processes
from fedtune.server.run_dir import RunDirectory

# pytest-xdist (make test: -n 2 --dist loadgroup): every test that starts Flower's
# simulation engine (Ray) runs on one worker, one Ray cluster at a time.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower-simulation")]


def test_two_hospitals_two_rounds_on_the_simulation_engine(
    tiny_bert_dir: Path, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    """Secure aggregation on (the default), with the coordinator's view recorded."""
    data_root, labels = classify_data
    config = tiny_run_config(tiny_bert_dir, "classify", data_root, labels,
                             secure_aggregation={"simulation_keys_dir": "keys"})
    config_path = tmp_path / "run.toml"
    with config_path.open("wb") as handle:
        tomli_w.dump(config.to_dict(), handle)
    run_dir = tmp_path / "run"
    views = tmp_path / "views"

    code = main(["run", "--config", str(config_path), "--hospitals", "2",
                 "--run-dir", str(run_dir), "--record-views", str(views)])

    out = capsys.readouterr().out
    assert code == 0, out
    run = RunDirectory(run_dir)
    assert run.saved_rounds() == [0, 1, 2]
    rounds = [r for r in run.read_metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["hospitals_used"]) == ["hospital-1", "hospital-2"] for r in rounds)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["final_test"]["per_hospital"]) == {"hospital-1", "hospital-2"}
    assert "Held-out test split" in out  # the coordinator's table reached the console
    # It ends as the demo does: the verdict on held-out data and how to use the model.
    assert "than the base model on held-out data" in out
    assert f"fedtune export {run_dir.resolve()} --out" in out and "fedtune predict" in out
    # The launcher gave the virtual hospitals identity keys (relative to the config file).
    assert sorted(p.name for p in (tmp_path / "keys").glob("*.key")) == [
        "hospital-1.key", "hospital-2.key"]
    # Every round went through the four secure-aggregation stages with both hospitals...
    assert all(r["secure_aggregation"]["survivors"] == ["hospital-1", "hospital-2"]
               for r in rounds)
    # ...and what the coordinator received is the masked payload, not the delta.
    index = json.loads((views / "index.json").read_text())
    assert index["mode"] == "secure-aggregation" and set(index["rounds"]) == {"1", "2"}
    for entry in index["rounds"]["2"].values():
        plain = np.load(views / entry["plaintext"])
        received = np.load(io.BytesIO((views / entry["received"]).read_bytes()))
        assert received.dtype == np.uint32
        assert received.size == plain.size + 1  # one more slot: the masked weight
        assert np.any(plain != 0) and abs(np.corrcoef(plain, received[:-1])[0, 1]) < 0.2
    # Resuming a finished run goes through Flower (the app declares `resume`), restores the
    # last round and has nothing left to train: no round is run or counted twice.
    code = main(["run", "--config", str(config_path), "--hospitals", "2",
                 "--run-dir", str(run_dir), "--record-views", str(views), "--resume"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "after round 2" in out and "Resuming" in out
    assert run.saved_rounds() == [0, 1, 2]
    assert [r["round"] for r in run.read_metrics() if r["event"] == "round"] == [1, 2]
    # Nothing the run started is left behind.
    leftovers = [
        p for home in (run_dir / ".flower").glob("flwr-home-*")
        for p in find_simulation_processes(home)
    ]
    assert leftovers == [], [p.cmdline() for p in leftovers if psutil.pid_exists(p.pid)]


def test_demo_with_the_embedded_model_beats_the_base_model_under_dp(
    installed_wheel: Path, tmp_path: Path
):
    """The README's main job, shortened, run as a user runs it: `fedtune demo` from the
    installed wheel (not the checkout), real MiniLM, real ICD-10-CM data, 3 hospitals,
    differential privacy on by default (each patient at ε = 8 per hospital for the whole run)."""
    import json
    import os
    import subprocess
    import sys

    from fedtune.client.privacy_ledger import read_ledger_file
    from fedtune.core.app_code import app_code_sha256

    env = {**os.environ, "PYTHONPATH": str(installed_wheel)}
    demo = subprocess.run(
        [sys.executable, "-m", "fedtune.ops.cli", "demo", "--rounds", "2",
         "--examples-per-hospital", "400", "--run-dir", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    lines = demo.stdout.splitlines()
    run_dir = tmp_path / "demo"
    # The simulation's app bundle and the coordinator's recorded code are the wheel's.
    bundle = run_dir / ".flower" / "app"
    installed = app_code_sha256(installed_wheel)
    assert app_code_sha256(bundle) == installed
    start = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[0])
    assert start["data"]["code"]["app_code_sha256"] == installed
    summary = json.loads((run_dir / "summary.json").read_text())
    base, final = summary["base_test"]["weighted"], summary["final_test"]["weighted"]
    assert final["accuracy"] > base["accuracy"] + 0.05
    assert final["loss"] < base["loss"]
    assert any(line.startswith("Global model is better") for line in lines)
    guarantees = summary["privacy"]["per_hospital"]
    assert set(guarantees) == {"hospital-1", "hospital-2", "hospital-3"}
    for hospital, values in guarantees.items():
        assert 0 < values["epsilon"] <= 8.0
        ledger = read_ledger_file(run_dir / "ledgers" / f"{hospital}.json")
        assert ledger.epsilon_spent() == values["epsilon"]
        assert [entry.server_round for entry in ledger.entries] == [1, 2]
        assert ledger.unit == "patient"  # the demo protects patients, not lines
    assert any("hospital-2: protects each patient, (ε = " in line for line in lines)
    assert any("(ε, δ) means: whether or not one patient's" in line for line in lines)


def test_kill_stops_a_simulated_run_and_everything_it_started(
    tiny_bert_dir: Path, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path
):
    """`kill` (SIGTERM: systemd, a batch scheduler, a researcher's `kill`) ends `fedtune run`
    like Ctrl-C: the SuperLink, the ServerApp and every Ray worker are stopped too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data_root, labels = classify_data
    config = tiny_run_config(tiny_bert_dir, "classify", data_root, labels,
                             federation={"rounds": 20},
                             secure_aggregation={"simulation_keys_dir": "keys"})
    config_path = tmp_path / "run.toml"
    with config_path.open("wb") as handle:
        tomli_w.dump(config.to_dict(), handle)
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.ops.cli", "run", "--config", str(config_path),
             "--hospitals", "2", "--run-dir", str(run_dir)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "adapters" / "round-0001.safetensors").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not finish in 300 s"
            time.sleep(0.5)
        homes = {Path(p.environ()["FLWR_HOME"]) for p in psutil.process_iter()
                 if _flwr_home_under(p, run_dir)}
        assert homes, "no Flower process of this run was found while it ran"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "every process it started has been stopped" in log.read_text()
    assert [p for home in homes for p in find_simulation_processes(home)] == []


def _flwr_home_under(proc: psutil.Process, root: Path) -> bool:
    try:
        return proc.environ().get("FLWR_HOME", "").startswith(str(root))
    except psutil.Error:
        return False
