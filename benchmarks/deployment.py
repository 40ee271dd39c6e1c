"""Deployment on loopback vs simulation, and what a node pays per message.

Side by side in one run, the same run configuration (3 hospitals, the embedded MiniLM + LoRA,
2 rounds, DP and secure aggregation on):

- **deployment**: `fedtune keys` make a federation, `fedtune server` (SuperLink with TLS and
  node authentication) and three `fedtune node` processes on 127.0.0.1;
- **simulation**: `fedtune run` on Flower's simulation engine.

On the deployment engine every message starts a fresh ClientApp process, which imports the
stack and loads the base model: `node_model_load_seconds` is the model load alone (the
embedded MiniLM from its safetensors, LoRA attached), `node_process_start_seconds` the
imports before it, both measured in a fresh interpreter as a ClientApp process does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from fedtune.benchmarks.runner import BenchResult
from fedtune.ops.federation_keys import enroll_hospital, init_federation, new_hospital
from fedtune.ops.icd10 import write_hospital_datasets
from fedtune.ops.launch import LaunchPlan, launch

HOSPITALS = ("st-anna", "city-general", "north-clinic")
_LOAD_PROBE = """
import time
started = time.perf_counter()
from fedtune.client.session import model_for
from fedtune.core.config import parse_run_config
imported = time.perf_counter()
config = parse_run_config({"model": {"source": "embedded:minilm", "task": "classify",
                                     "labels": ["a", "b"]}}, "bench")
model_for(config)
loaded = time.perf_counter()
print(imported - started, loaded - imported)
"""


def bench_deployment(work_dir: Path) -> BenchResult:
    """Time the same federation deployed on loopback and simulated; probe a node's start."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    work_dir = work_dir.resolve()
    data = work_dir / "data"
    write_hospital_datasets(data, len(HOSPITALS), "classify", examples_per_hospital=600, seed=0)
    config_path = _write_config(work_dir, data)
    probes = [_probe_node_start() for _ in range(3)]
    process_start = min(p[0] for p in probes)
    model_load = min(p[1] for p in probes)

    started = time.monotonic()
    _deploy(work_dir, config_path, data)
    deployed = time.monotonic() - started
    started = time.monotonic()
    launch(LaunchPlan(config_path=config_path, run_dir=work_dir / "simulated",
                      num_hospitals=len(HOSPITALS)), say=lambda _line: None)
    simulated = time.monotonic() - started
    numbers: dict[str, float | str] = {
        "deploy_wall_seconds": deployed,
        "deploy_sim_wall_seconds": simulated,
        "deploy_vs_sim_ratio": deployed / simulated,
        "node_model_load_seconds": model_load,
        "node_process_start_seconds": process_start,
    }
    markdown = f"""## Deployment vs simulation (`fedtune bench deployment`)

Same run configuration both ways: 3 hospitals (600 ICD-10-CM examples each), embedded MiniLM +
LoRA r = 4, 2 rounds × 8 steps of 32, DP (ε = 8) and secure aggregation on.

| | wall time (s) |
|---|---|
| deployment, 127.0.0.1: `fedtune server` (TLS, node auth) + 3 `fedtune node` | {deployed:.1f} |
| simulation: `fedtune run` (Flower simulation engine, Ray) | {simulated:.1f} |

Ratio deployment / simulation: **{deployed / simulated:.2f}**. Deployment starts a fresh
ClientApp process for every message (secure aggregation sends four per round, plus
evaluations) and Flower's SuperNode and ServerApp poll every 3 s; the simulation keeps its
hospitals' processes and models between messages.

Per message on a node, in a fresh interpreter (best of 3): process start and imports
`node_process_start_seconds` = {process_start:.2f} s; base model load with LoRA
`node_model_load_seconds` = **{model_load:.2f} s** (goal ≤ 2; the embedded MiniLM loads from
safetensors; a GGUF model loads from fedtune's dequantized cache).

Goal "dominated by training": **not met** at this size. Each round a node answers 5
messages (4 secure-aggregation stages and one evaluation), each in a new process that spends
{process_start:.1f} s importing torch, transformers, peft and Opacus before it works: about
{5 * process_start:.0f} s of start-up per node per round, on 2 cores shared by 3 nodes, against
8 DP steps of 32 examples of training. Flower 1.41's `flwr-clientapp` serves one message per
process, so the way down is lighter imports for the stages that do not train (key exchange,
shares, unmasking need no torch), not a cache.
"""
    return BenchResult(numbers=numbers, markdown=markdown)


def _write_config(work_dir: Path, data: Path) -> Path:
    labels = json.loads((data / "labels.json").read_text(encoding="utf-8"))
    config = {
        "model": {"source": "embedded:minilm", "task": "classify", "max_length": 32,
                  "labels": labels},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"local_steps": 8, "learning_rate": 1e-2, "batch_size": 32, "seed": 1},
        "federation": {"rounds": 2, "min_hospitals": 3},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "max_physical_batch_size": 32,
                    "ledger_dir": str(work_dir / "sim-ledgers")},
        "secure_aggregation": {"threshold": 2},
        "data": {"simulation_root": str(data)},
        "evaluation": {"max_examples": 32},
    }
    path = work_dir / "run.toml"
    with path.open("wb") as handle:
        tomli_w.dump(config, handle)
    return path


def _probe_node_start() -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", _LOAD_PROBE], capture_output=True, text=True,
                          check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    imported, loaded = (float(x) for x in done.stdout.split()[-2:])
    return imported, loaded


def _deploy(work_dir: Path, config_path: Path, data: Path) -> None:
    fed = work_dir / "federation"
    init_federation(fed, ["127.0.0.1"], valid_days=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    node_files = []
    for k, name in enumerate(HOSPITALS, start=1):
        home = work_dir / name
        files = new_hospital(name, home)
        enroll_hospital(fed, files.identity_pub, files.node_pub)
        node = {"node": {
            "hospital": name, "coordinator": f"127.0.0.1:{port}",
            "ca_certificate": str(fed / "ca.pem"), "node_key": str(files.node_key),
            "identity_key": str(files.identity_key), "enrollment": str(fed / "enrollment.json"),
            "data": str(data / f"hospital-{k}.jsonl"), "privacy_ledger": str(home / "ledger.json"),
            "privacy_epsilon_budget": 8.0, "privacy_unit": "patient", "device": "cpu",
            "local_port": 9200 + k,
        }}
        path = home / "node.toml"
        with path.open("wb") as handle:
            tomli_w.dump(node, handle)
        node_files.append(path)
    fedtune = [sys.executable, "-m", "fedtune.ops.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (work_dir / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [*fedtune, "server", "--config", str(config_path), "--federation", str(fed),
                 "--run-dir", str(work_dir / "deployed"), "--host", "127.0.0.1",
                 "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        procs.append(server)
        for path in node_files:
            with (path.parent / "node.log").open("wb") as log:
                procs.append(subprocess.Popen([*fedtune, "node", "--config", str(path)],
                                              stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        if server.wait(timeout=1800) != 0:
            raise RuntimeError(f"the deployed run failed; see {work_dir / 'server.log'}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
