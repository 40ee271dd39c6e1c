"""`fedtune server` and `fedtune node`: a real federation on Flower's deployment engine.

The coordinator runs a SuperLink (Flower 1.41: one HTTPS port serves the Fleet, Control and
Runtime APIs) with TLS and SuperNode authentication on by default, registers every enrolled
hospital's node key, starts the fedtune ServerApp on it with `flwr run`, follows its log until
the run ends, and stops what it started. A hospital runs one SuperNode with its own settings
(data file, privacy budget and ledger, identity key, device) as node configuration: they
travel to the ClientApp from the hospital's own machine, so the coordinator cannot change them.

Measured Flower 1.41 behaviour this relies on (see the coordinator's guide):
- a SuperNode whose key is not registered is refused at activation and exits;
- a SuperNode without the federation's CA certificate cannot verify the SuperLink and exits;
- the SuperLink's state (registered node keys) is kept in an SQLite file in the federation
  folder, so a restarted coordinator keeps its hospitals.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.node_settings import NodeSettings as HospitalNodeSettings
from fedtune.client.node_settings import parse_node_settings
from fedtune.core.config import ConfigError
from fedtune.core.toml_files import check_tables, read_toml, scalar
from fedtune.ops.flower_processes import (
    SimulationError,
    final_status,
    flower_tool,
    pump_output,
    terminate_processes,
)
from fedtune.ops.launch import show_flower_line
from fedtune.ops.simulation import format_config_value

CONNECTION = "fedtune-federation"
SUPERLINK_DB = "superlink.db"
SUPEREXEC_POLL_INTERVAL_S = 0.1
_STARTUP_TIMEOUT_S = 60.0
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """A coordinator or node could not start or its run failed; the message says where to look."""


@dataclass(frozen=True)
class CoordinatorPlan:
    """What `fedtune server` runs."""

    config_path: Path
    run_dir: Path
    federation_dir: Path
    host: str
    port: int
    insecure: bool = False  # local experiments only: no TLS, no node authentication
    resume: bool = False
    timeout_s: float | None = None


def coordinator_env(home: Path) -> dict[str, str]:
    """Environment of every Flower process of this coordinator (and its app processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        # How often Flower's SuperExec (in the SuperLink and in every SuperNode) looks for an
        # app process to start: each message a node answers starts one, so Flower's default
        # 1 s is paid per message; 0.1 s costs a small local database query per poll.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPEREXEC_POLL_INTERVAL_S),
    )
    return env


def superlink_command(plan: CoordinatorPlan) -> list[str]:
    """The SuperLink's command line: TLS and node authentication unless `insecure`."""
    command = [
        flower_tool("flower-superlink"), "--host", plan.host, "--port", str(plan.port),
        "--database", str((plan.federation_dir / SUPERLINK_DB).resolve()),
        "--disable-runtime-dependency-installation",
    ]
    if plan.insecure:
        return [*command, "--insecure"]
    files = _federation_files(plan.federation_dir)
    return [
        *command,
        "--ssl-ca-certfile", str(files["ca"]),
        "--ssl-certfile", str(files["cert"]),
        "--ssl-keyfile", str(files["key"]),
        "--enable-supernode-auth",
    ]


def _federation_files(federation_dir: Path) -> dict[str, Path]:
    from fedtune.ops.federation_keys import CA_CERT, COORDINATOR_CERT, COORDINATOR_KEY

    files = {
        "ca": federation_dir / CA_CERT,
        "cert": federation_dir / COORDINATOR_CERT,
        "key": federation_dir / COORDINATOR_KEY,
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{federation_dir} is not a federation folder (missing {', '.join(missing)}); "
            f"create it with `fedtune keys init-federation {federation_dir} --host <address>`."
        )
    return {name: path.resolve() for name, path in files.items()}


def serve(plan: CoordinatorPlan, say: Callable[[str], None] = print) -> None:
    """Start the SuperLink, register enrolled hospitals, run the ServerApp to the end."""
    from fedtune.core.config import load_run_config, resolve_paths
    from fedtune.ops.flower_app import write_app_bundle

    config = resolve_paths(load_run_config(plan.config_path), plan.config_path.parent)
    if plan.insecure:
        say("WARNING: --insecure: NO TLS and NO node authentication. Anyone who can reach "
            f"{plan.host}:{plan.port} can read the traffic and join as a hospital. Use it only "
            "for local experiments, never with patient data.")
    if config.secure_aggregation.enabled:
        config.secure_aggregation.require_threshold()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    work = plan.run_dir.resolve() / ".flower"
    homes = {name: work / name for name in ("superlink", "cli")}
    for home in homes.values():
        home.mkdir(parents=True, exist_ok=True)
    plan.federation_dir.mkdir(parents=True, exist_ok=True)
    log_path = work / "superlink.log"
    processes: list[subprocess.Popen[Any]] = []
    try:
        superlink = _start(superlink_command(plan), coordinator_env(homes["superlink"]), log_path)
        processes.append(superlink)
        ca = None if plan.insecure else _federation_files(plan.federation_dir)["ca"]
        _wait_healthy(superlink, plan.host, plan.port, ca, log_path)
        _write_cli_config(homes["cli"], plan.host, plan.port, ca)
        cli_env = coordinator_env(homes["cli"])
        if not plan.insecure:
            _register_hospitals(plan.federation_dir, cli_env, say)
        app_dir = write_app_bundle(work / "app")
        run_config: dict[str, str | bool] = {
            "config-path": str(plan.config_path.resolve()),
            "run-dir": str(plan.run_dir.resolve()),
            "resume": plan.resume,
        }
        command = [flower_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        for key, value in run_config.items():
            command += ["--run-config", f"{key}={format_config_value(value)}"]
        cli = subprocess.Popen(
            command, env={**cli_env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        processes.append(cli)
        tail: deque[str] = deque(maxlen=40)
        deadline = None if plan.timeout_s is None else time.monotonic() + plan.timeout_s
        try:
            run_id = pump_output(cli, lambda line: show_flower_line(line, say), tail, deadline,
                                  plan.timeout_s)
        except SimulationError as exc:
            raise DeploymentError(str(exc).replace("simulation", "federated run")) from None
        code = cli.wait()
        if code != 0 or run_id is None:
            raise DeploymentError(
                f"`flwr run` could not start the run (exit code {code}). Its last output:\n"
                + "\n".join(tail) + f"\nSuperLink log: {log_path}"
            )
        status, details = final_status(cli_env, run_id, CONNECTION)
        if status != "finished:completed":
            raise DeploymentError(
                f"The federated run {run_id} ended as '{status}': {details}\n"
                f"SuperLink log: {log_path}"
            )
    finally:
        terminate_processes(processes, homes["superlink"])


def _start(command: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command), env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def _wait_healthy(
    proc: subprocess.Popen[bytes], host: str, port: int, ca: Path | None, log_path: Path
) -> None:
    """Wait for `/health` over HTTPS (verified with the federation's CA) or HTTP (insecure)."""
    scheme = "http" if ca is None else "https"
    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(
                f"The SuperLink exited at start-up with code {proc.returncode}. "
                f"See its log: {log_path}"
            )
        try:
            url = f"{scheme}://{host}:{port}/health"
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if 200 <= int(response.status) < 300:
                    return
        except OSError:
            time.sleep(0.3)
    raise DeploymentError(f"The SuperLink did not answer within {_STARTUP_TIMEOUT_S:g} s: "
                          f"{log_path}")


def _write_cli_config(home: Path, host: str, port: int, ca: Path | None) -> None:
    lines = [f'[superlink]\ndefault = "{CONNECTION}"\n', f"[superlink.{CONNECTION}]",
             f'address = "{host}:{port}"']
    lines.append("insecure = true" if ca is None else f'root-certificates = "{ca}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _register_hospitals(
    federation_dir: Path, env: dict[str, str], say: Callable[[str], None]
) -> None:
    """Register every enrolled node key with the SuperLink (already registered keys are kept)."""
    from fedtune.ops.federation_keys import enrolled_node_keys

    keys = enrolled_node_keys(federation_dir)
    if not keys:
        say(f"No hospital is enrolled in {federation_dir} yet: enroll them with "
            "`fedtune keys enroll --federation ...`; no node can join until then.")
    for hospital, pub in sorted(keys.items()):
        done = subprocess.run(
            [flower_tool("flwr"), "supernode", "register", str(pub.resolve()), CONNECTION,
             "--name", hospital, "--format", "json"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        answer = done.stdout + done.stderr
        if "already in use" in answer.lower():
            continue  # registered by an earlier start of this coordinator
        if done.returncode != 0 or '"success": true' not in answer.replace("\n", " "):
            payload = _json_tail(answer)
            raise DeploymentError(
                f"Could not register {hospital}'s node key ({pub}) with the SuperLink: "
                f"{payload or answer.strip()[-500:]}"
            )
        say(f"Registered {hospital}'s node key.")


def _json_tail(text: str) -> str:
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(text[text.find("{") :]))
    return ""


# ---- the hospital's node -------------------------------------------------------------------

_NODE_KEYS = {
    "hospital": str, "coordinator": str, "ca_certificate": str, "node_key": str,
    "identity_key": str, "enrollment": str, "data": str, "privacy_ledger": str,
    "privacy_epsilon_budget": float, "privacy_unit": str, "device": str, "local_port": int,
    "allow_plain_updates": bool, "allowed_model": str, "insecure": bool,
    "join_timeout_s": float, "allowed_model_sha256": str, "allowed_strategies": str,
    "max_epsilon": float, "allowed_app_sha256": str, "pii_acknowledged": bool,
    "audit_log": str, "share_data_summary": bool, "secagg_min_threshold": int,
    "secagg_min_survivors": int, "data_split": str, "split_seed": int, "max_evaluations": int,
    "cpu_threads": int,
}
_NODE_REQUIRED = ("hospital", "coordinator", "data", "privacy_ledger", "privacy_epsilon_budget",
                  "privacy_unit")
_NODE_PATHS = ("ca_certificate", "node_key", "identity_key", "enrollment", "data",
               "privacy_ledger", "audit_log")


# Flower's messages for the two set-up problems a hospital admin meets, explained.
_NODE_HINTS = {
    "Failed to activate SuperNode": ("not-enrolled", (
        "the coordinator refused this node: its node key ({s.node_key}) is not registered "
        "there (yet). If the coordinator is just starting, this resolves itself; otherwise send "
        "{s.hospital}-node.pub to the coordinator (fedtune keys enroll --federation ...) and "
        "compare fingerprints with `fedtune keys show`."
    )),
    "CERTIFICATE_VERIFY_FAILED": ("tls", (
        "this node cannot verify the coordinator's TLS certificate with {s.ca_certificate}: use "
        "the ca.pem of this federation, and the address its certificate was made for."
    )),
}


@dataclass(frozen=True)
class NodeSettings:
    """A hospital's node, from its `[node]` file; paths are absolute."""

    hospital: str
    coordinator: str
    data: str
    privacy_ledger: str
    privacy_epsilon_budget: float
    # What ε protects: "patient" (every line names its patient_id; each patient as a whole)
    # or "record" (each line; a run asking for "patient" still gets it). Required.
    privacy_unit: str
    ca_certificate: str = ""
    node_key: str = ""
    identity_key: str = ""
    enrollment: str = ""
    device: str = "auto"
    local_port: int = 9094
    allow_plain_updates: bool = False
    allowed_model: str = ""
    insecure: bool = False
    join_timeout_s: float = 600.0  # how long a refused node keeps trying to join
    # What this hospital agrees to run (client.approval); empty / 0 = not pinned.
    allowed_model_sha256: str = ""
    allowed_strategies: str = ""
    max_epsilon: float = 0.0
    allowed_app_sha256: str = ""
    # The admin read the identifier check's findings on this data and accepts them.
    pii_acknowledged: bool = False
    # Send the training data's example count and label histogram with its fingerprint (they
    # reveal the data's size, which secure aggregation otherwise hides).
    share_data_summary: bool = False
    # The hospital's own log of what it sent and refused (hashes only); default: beside the
    # privacy ledger.
    audit_log: str = ""
    # The lowest secure-aggregation threshold this node accepts; 0 = a majority of the
    # enrolled hospitals (lower it only for federations that sample hospitals per round).
    secagg_min_threshold: int = 0
    # The fewest survivors this node unmasks with; 0 = 3 (with two, each could compute the
    # other's update from the result: set 2 only if this hospital accepts that).
    secagg_min_survivors: int = 0
    # This hospital's own split of its data ("train,validation,test" fractions; empty =
    # 0.8,0.1,0.1), its seed, and how many evaluations per run it answers (-1 = default).
    data_split: str = ""
    split_seed: int = 0
    max_evaluations: int = -1
    # CPU threads of each ClientApp process (torch, tokenizers); 0 = all of the machine's.
    # Set it when the node shares its CPUs, e.g. several nodes on one machine: oversubscribed
    # threads made three loopback nodes on 2 cores train about 3× slower (benchmarks/RESULTS.md).
    cpu_threads: int = 0


def load_node_settings(path: Path) -> NodeSettings:
    """Read a hospital's node file; every mistake names the key and the allowed ones."""
    raw = read_toml(path, "node configuration file")
    if set(raw) != {"node"}:
        raise ConfigError(f"{path}: a node file has exactly one section, [node].")
    check_tables(str(path), raw, {"node": _NODE_KEYS})
    values: dict[str, Any] = {}
    for key, value in raw["node"].items():
        value = scalar(str(path), "node", key, value, _NODE_KEYS[key])
        if key in _NODE_PATHS:
            value = str((path.parent / str(value)).resolve()) if value else value
        values[key] = value
    missing = [key for key in _NODE_REQUIRED if key not in values]
    if not values.get("insecure"):
        missing += [k for k in ("ca_certificate", "node_key", "identity_key", "enrollment")
                    if not values.get(k)]
    if missing:
        raise ConfigError(
            f"{path}: [node] needs {', '.join(missing)} (no defaults: they decide who this "
            "hospital trusts, what it trains on and its privacy)."
        )
    if values["privacy_epsilon_budget"] <= 0:
        raise ConfigError(f"{path}: [node] privacy_epsilon_budget must be > 0.")
    if values.get("cpu_threads", 0) < 0:
        raise ConfigError(f"{path}: [node] cpu_threads must be >= 1 (or 0: all CPUs), got "
                          f"{values['cpu_threads']}.")
    settings = NodeSettings(**values)
    try:  # what the ClientApp will check, checked now: the node refuses to start instead
        parse_node_settings(hospital_node_settings(settings).to_node_config())
    except ConfigError as exc:
        raise ConfigError(f"{path}: [node] {exc}") from None
    except ValueError:
        raise ConfigError(f"{path}: [node] data_split must be three fractions like "
                          f"\"0.8,0.1,0.1\", got {settings.data_split!r}.") from None
    return settings


def hospital_node_settings(settings: NodeSettings) -> HospitalNodeSettings:
    """What the node file decides for the ClientApp, as the ClientApp's own settings object."""
    return HospitalNodeSettings(
        name=settings.hospital,
        data_path=Path(settings.data),
        privacy_ledger=Path(settings.privacy_ledger),
        privacy_epsilon_budget=settings.privacy_epsilon_budget,
        privacy_unit=settings.privacy_unit,
        device=settings.device,
        allow_plain_updates=settings.allow_plain_updates,
        allowed_model=settings.allowed_model,
        allowed_model_sha256=settings.allowed_model_sha256,
        allowed_strategies=tuple(
            name.strip() for name in settings.allowed_strategies.split(",") if name.strip()
        ),
        max_epsilon=settings.max_epsilon if settings.max_epsilon > 0 else None,
        allowed_app_sha256=settings.allowed_app_sha256,
        identity_key=Path(settings.identity_key) if settings.identity_key else None,
        enrollment=Path(settings.enrollment) if settings.enrollment else None,
        pii_acknowledged=settings.pii_acknowledged,
        share_data_summary=settings.share_data_summary,
        secagg_min_threshold=settings.secagg_min_threshold or None,
        secagg_min_survivors=settings.secagg_min_survivors or None,
        data_split=(tuple(float(x) for x in settings.data_split.split(","))  # type: ignore[arg-type]
                    if settings.data_split else None),
        split_seed=settings.split_seed,
        max_evaluations=settings.max_evaluations if settings.max_evaluations >= 0 else None,
        audit_log=Path(settings.audit_log or Path(settings.privacy_ledger).with_name(
            f"{settings.hospital}-audit.jsonl")),
    )


def node_config_string(settings: NodeSettings) -> str:
    """The SuperNode's --node-config: the hospital's settings, read back by its ClientApp with
    `parse_node_settings` (one schema for both ends)."""
    entries = hospital_node_settings(settings).to_node_config()
    return " ".join(f"{key}={format_config_value(value)}" for key, value in entries.items())


def supernode_command(settings: NodeSettings) -> list[str]:
    """The SuperNode's command line (runtime dependency installation stays off: default);
    Flower's SuperNode, polling every 0.25 s instead of 3 s (ops/node_supernode.py)."""
    from fedtune.ops.node_supernode import supernode_launcher

    command = [
        *supernode_launcher(), "--superlink", settings.coordinator,
        "--port", str(settings.local_port), "--node-config", node_config_string(settings),
    ]
    if settings.insecure:
        return [*command, "--insecure"]
    from fedtune.ops.federation_keys import check_node_private_key

    check_node_private_key(Path(settings.node_key))
    if not Path(settings.ca_certificate).is_file():
        raise ConfigError(f"[node] ca_certificate {settings.ca_certificate} does not exist; "
                          "the coordinator gives every hospital its ca.pem.")
    return [
        *command,
        "--root-certificates", settings.ca_certificate,
        "--auth-supernode-private-key", settings.node_key,
    ]


def thread_env(cpu_threads: int) -> dict[str, str]:
    """Thread limits every ClientApp process inherits (torch reads OMP_NUM_THREADS at start);
    {} leaves each library's default (all CPUs)."""
    if cpu_threads <= 0:
        return {}
    value = str(cpu_threads)
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value,
            "OPENBLAS_NUM_THREADS": value, "RAYON_NUM_THREADS": value}


def run_node(settings: NodeSettings, home: Path, say: Callable[[str], None] = print) -> int:
    """Run the hospital's SuperNode in the foreground until it exits or Ctrl-C.

    A SuperNode that the coordinator does not (yet) know is refused at activation and Flower
    gives up. That happens in normal operation too: a node started before the coordinator, or
    in the seconds between the SuperLink's start and its registration of enrolled keys. So
    the node tries again (after 1 s, doubling up to every 10 s) for `join_timeout_s`,
    saying why; a TLS
    verification failure is a set-up mistake and ends the node at once.
    """
    from fedtune.ops.node_clientapp import AUDIT_LOG_ENV, write_launcher

    if settings.insecure:
        say("WARNING: insecure = true: NO TLS and NO node authentication (local experiments "
            "only, never with patient data).")
    home.mkdir(parents=True, exist_ok=True)
    env = {**coordinator_env(home), "PYTHONUNBUFFERED": "1", **thread_env(settings.cpu_threads)}
    audit_log = hospital_node_settings(settings).audit_log
    # The SuperNode's ClientApp processes are this node's own `flwr-clientapp`, which runs
    # only a bundle that is byte-identical to the fedtune installed here (node_clientapp).
    with tempfile.TemporaryDirectory(prefix="fedtune-node-") as tools:
        write_launcher(Path(tools))
        env["PATH"] = tools + os.pathsep + env["PATH"]
        env[AUDIT_LOG_ENV] = str(audit_log) if audit_log is not None else ""
        deadline = time.monotonic() + settings.join_timeout_s
        wait = _JOIN_FIRST_RETRY_S
        while True:
            outcome, code = _supernode_once(settings, env, say)
            if outcome != "not-enrolled":
                return code
            if time.monotonic() + wait > deadline:
                say(f"fedtune: giving up after {settings.join_timeout_s:g} s: the coordinator "
                    "does not accept this node's key.")
                return 1
            say(f"fedtune: trying again in {wait:g} s.")
            time.sleep(wait)
            wait = min(2 * wait, _JOIN_RETRY_S)


# A node refused because the coordinator has just started (and not yet registered the
# enrolled keys) joins within a second or two; one that is really not enrolled backs off to
# a try every 10 s.
_JOIN_FIRST_RETRY_S = 1.0
_JOIN_RETRY_S = 10.0


def _supernode_once(
    settings: NodeSettings, env: dict[str, str], say: Callable[[str], None]
) -> tuple[str, int]:
    """One SuperNode process: ("not-enrolled" | "tls" | "exited", exit code)."""
    # Same process group as this command: Ctrl-C, a service manager's stop or a crash of this
    # process reaches the SuperNode and its ClientApps too (none outlives the node command).
    proc = subprocess.Popen(
        supernode_command(settings), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip("\n"))
            for marker, (outcome, hint) in _NODE_HINTS.items():
                if marker in line:
                    say(f"fedtune: {hint.format(s=settings)}")
                    # Flower's SuperNode can linger after giving up: end it here.
                    return outcome, 1
        return "exited", proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()  # graceful: the SuperNode deactivates itself at the SuperLink
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
