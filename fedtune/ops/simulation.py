"""Run a Flower app on the Flower simulation engine and stop everything it started.

Why not ``flwr run <app> local``? The ``:local:`` connection makes the CLI start a *detached*
SuperLink on the fixed ports 39091/39093 that nobody ever stops: parallel runs and test
sessions collide on those ports and leak processes. Instead, every run here gets its own
SuperLink on a free port, its own ``FLWR_HOME`` (under ``SimulationSpec.work_dir``) and is
torn down completely in a ``finally``, also on Ctrl-C and on errors.

The process tree in Flower 1.41 (measured) and why one ``killpg`` is not enough::

    flower-superlink      our child, own session; ONE HTTP port serves Control+Runtime+Fleet
      flower-superexec    started by the SuperLink with start_new_session=True (own session)
        flwr-simulation   one per run: runs the ServerApp and is the Ray driver
          Ray gcs_server / raylet / workers (the ClientApps)

Every one of them inherits our environment, so the per-run ``FLWR_HOME`` identifies them:
the cleanup terminates the SuperLink, then every process that still carries that
``FLWR_HOME``, escalating to SIGKILL after a grace period.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtune.ops.flower_processes import (
    SimulationError,
    final_status,
    flower_tool,
    pump_output,
    terminate_processes,
)

RunConfigValue = str | int | float | bool | os.PathLike[str]

CONNECTION_NAME = "fedtune-sim"
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_STARTUP_TIMEOUT_S = 60.0
_TOML_ESCAPES = {0x5C: "\\\\", **{c: f"\\u{c:04X}" for c in [*range(0x20), 0x22, 0x7F]}}
_SHORT_TMP = "/tmp" if os.path.isdir("/tmp") else None
# Inherited env vars that would make the SuperLink also bind the legacy gRPC Control/Fleet APIs
# on their default ports (9093/9092), or make Ray join another cluster instead of its own.
_DROPPED_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "RAY_ADDRESS")


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate and with which resources.

    ``run_config`` keys must exist in the app's ``[tool.flwr.app.config]``. ``client_cpus`` is
    an integer because Flower's SimulationConfig stores it as uint32. ``ray_object_store_bytes``
    caps Ray's shared-memory object store (Ray's default is 30 % of RAM).
    """

    app_dir: Path
    num_hospitals: int
    run_config: Mapping[str, RunConfigValue]
    work_dir: Path
    client_cpus: int = 1
    client_gpus: float = 0.0
    timeout_s: float | None = None
    ray_object_store_bytes: int = 1024**3
    # Ray's CPU count; None = the machine's. Setting it to the number of hospitals lets all
    # of them train at once (time-sliced on fewer cores), as real hospitals would.
    ray_num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_hospitals < 1:
            raise ValueError(f"num_hospitals must be at least 1, got {self.num_hospitals}")
        if isinstance(self.client_cpus, bool) or not isinstance(self.client_cpus, int):
            raise ValueError(f"client_cpus must be a whole number, got {self.client_cpus!r}")
        if self.client_cpus < 1 or self.client_gpus < 0:
            raise ValueError("client_cpus must be >= 1 and client_gpus >= 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.ray_object_store_bytes < 100 * 1024**2:
            raise ValueError("ray_object_store_bytes must be at least 100 MiB")


@dataclass(frozen=True)
class SimulationResult:
    """A finished run: its Flower run id and where its logs are kept."""

    run_id: int
    flwr_home: Path
    superlink_log: Path
    port: int


def format_config_value(value: RunConfigValue) -> str:
    """Render one value as the TOML literal that ``flwr run --run-config`` parses back.

    Flower splits ``k=v`` pairs with the regex ``"[^"]*"`` for quoted values, so a ``"``
    inside a string ends it even when escaped: we write it as ``\\u0022`` instead.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"integer {value} does not fit in 64 bits (TOML limit)")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"run config values must be str, int, float, bool or a path, got {value!r}")
    return '"' + value.translate(_TOML_ESCAPES) + '"'


def format_run_config(run_config: Mapping[str, RunConfigValue]) -> list[str]:
    """Return one ``key=value`` argument per entry for ``flwr run --run-config``."""
    pairs = []
    for key, value in run_config.items():
        if not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"run config key {key!r} is not a plain TOML key (letters, digits, '-', '_', '.')"
            )
        pairs.append(f"{key}={format_config_value(value)}")
    return pairs


def run_simulation(
    spec: SimulationSpec, on_line: Callable[[str], None] = print
) -> SimulationResult:
    """Run ``spec.app_dir`` with ``spec.num_hospitals`` simulated hospitals and wait for it.

    Each line of the run's log (ANSI colours removed) goes to ``on_line`` as it arrives.
    Raises SimulationError when the ServerApp fails, the run times out or Flower cannot start.
    """
    app_dir = spec.app_dir.expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise SimulationError(f"{app_dir} is not a Flower app: it has no pyproject.toml")
    run_config_args = format_run_config(spec.run_config)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=spec.work_dir)).resolve()
    # Ray puts Unix sockets under RAY_TMPDIR (path limit ~107 bytes): keep it short, per run.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedtune-ray-", dir=_SHORT_TMP))
    log_path = flwr_home / "superlink.log"
    env = _child_env(flwr_home, ray_tmp, spec)
    deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
    superlink: subprocess.Popen[bytes] | None = None
    cli: subprocess.Popen[str] | None = None
    try:
        superlink, port = _start_superlink(env, log_path)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f'[superlink.{CONNECTION_NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        federation = (
            f'num-supernodes={spec.num_hospitals} backend="ray" '
            f"client-resources-num-cpus={spec.client_cpus} "
            f"client-resources-num-gpus={float(spec.client_gpus)!r} "
            'init-args-logging-level="WARNING" init-args-log-to-driver=true'
        )
        if spec.ray_num_cpus is not None:
            federation += f" init-args-num-cpus={spec.ray_num_cpus}"
        command = [flower_tool("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
        for pair in run_config_args:
            command += ["--run-config", pair]
        command += ["--federation-config", federation]
        cli = subprocess.Popen(  # unbuffered, else the log arrives in one block at the end
            command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        tail: deque[str] = deque(maxlen=40)
        run_id = pump_output(cli, on_line, tail, deadline, spec.timeout_s)
        code = cli.wait()
        recent = "\n".join(tail)
        if code != 0 or run_id is None:
            raise SimulationError(
                f"`flwr run` could not start the run (exit code {code}). Its last output:\n"
                f"{recent}\nSuperLink log: {log_path}"
            )
        status, details = final_status(env, run_id, CONNECTION_NAME)
        if status != "finished:completed":
            raise SimulationError(
                f"The Flower run {run_id} ended as '{status}': {details}\n"
                f"Last log lines:\n{recent}\nFull SuperLink log: {log_path}"
            )
        return SimulationResult(run_id, flwr_home, log_path, port)
    finally:
        terminate_processes([p for p in (cli, superlink) if p is not None], flwr_home)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _child_env(flwr_home: Path, ray_tmp: Path, spec: SimulationSpec) -> dict[str, str]:
    """Environment for every Flower process; they all inherit it, down to the Ray workers."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    bin_dir = str(Path(sys.executable).parent)  # SuperLink finds flower-superexec on PATH
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_TMPDIR=str(ray_tmp),
        RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=str(spec.ray_object_store_bytes),
        # Offline by design, and quiet: hospitals' logs should show fedtune, not loaders.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",  # e.g. GGUF dequantization bars; fedtune says what it does instead
        TOKENIZERS_PARALLELISM="false",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",  # Ray's own default-to-be; silences its tip
    )
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_superlink(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a SuperLink on a free port and wait for ``/health``; retry if the port got taken.

    In 1.41 ``--host/--port`` is the only port a simulation SuperLink binds (Control, Runtime
    and Fleet APIs share it); the legacy gRPC Control/Fleet ports open only when the
    FLWR_INTERNAL_GRPC_* variables are set, which ``_child_env`` removes.
    """
    for _attempt in range(3):
        port = _free_port()
        command = [
            flower_tool("flower-superlink"), "--insecure", "--simulation", "--isolation",
            "subprocess",
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if _wait_healthy(proc, port, log_path):
            return proc, port
        log_text = log_path.read_text(encoding="utf-8", errors="replace").lower()
        if "address already in use" not in log_text:
            break
    raise SimulationError(
        f"The Flower SuperLink exited at startup with code {proc.returncode}. "
        f"See its log: {log_path}"
    )


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    """True once ``/health`` answers, False if the SuperLink exited first."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as resp:
                if 200 <= int(resp.status) < 300:
                    return True
        except OSError:  # URLError is an OSError: not listening yet
            time.sleep(0.2)
    if proc.poll() is not None:
        return False
    raise SimulationError(
        f"The Flower SuperLink did not become ready within {_STARTUP_TIMEOUT_S:g} s. "
        f"See its log: {log_path}"
    )

