"""Flower's processes as fedtune drives them, for simulations and deployments alike.

The console scripts of this environment (`flower_tool`), the `flwr run` output pump that
finds the run id (`pump_output`), the run's final status from the SuperLink
(`final_status`, for any named connection), and a teardown that stops a process tree and
every process still carrying its `FLWR_HOME` (`terminate_processes`). Shared by
`fedtune.ops.simulation` and `fedtune.ops.deployment`, so neither reaches into the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_STATUS_TIMEOUT_S = 30.0
_GRACE_S = 5.0


class SimulationError(RuntimeError):
    """Flower's processes (a simulation, or a deployment's SuperLink and CLI) could not start,
    failed, or timed out; the message says where to look."""


def find_simulation_processes(flwr_home: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries this run's ``FLWR_HOME``."""
    wanted, found = str(flwr_home), []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("FLWR_HOME") == wanted and _alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def flower_tool(name: str) -> str:
    """The console script from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SimulationError(f"`{name}` not found: install flwr[simulation]==1.41.0")
    return found


def pump_output(
    cli: subprocess.Popen[str],
    on_line: Callable[[str], None],
    tail: deque[str],
    deadline: float | None,
    timeout_s: float | None,
) -> int | None:
    """Forward the CLI's lines to ``on_line`` until it exits; return the run id it printed."""
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = cli.stdout
    assert stdout is not None

    def read() -> None:
        for raw in stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="flwr-run-output").start()
    run_id: int | None = None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise SimulationError(
                f"The simulation did not finish within {timeout_s:g} s and was stopped. "
                "Raise SimulationSpec.timeout_s or reduce the work per round."
            )
        try:
            raw = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if raw is None:
            return run_id
        line = _ANSI_RE.sub("", raw.rstrip("\r\n"))
        tail.append(line)
        if run_id is None and (match := _RUN_ID_RE.search(line)):
            run_id = int(match.group(1))
        on_line(line)


def final_status(env: dict[str, str], run_id: int, connection: str) -> tuple[str, str]:
    """Ask the SuperLink how the run ended: `flwr run --stream` exits 0 even when it failed."""
    command = [flower_tool("flwr"), "ls", connection, "--run-id", str(run_id),
               "--format", "json"]
    deadline = time.monotonic() + _STATUS_TIMEOUT_S
    status, details = "unknown", "the SuperLink did not report a final status"
    while time.monotonic() < deadline:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        try:
            payload = json.loads(done.stdout[done.stdout.find("{") :])
            row = next(r for r in payload["runs"] if int(r["run-id"]) == run_id)
            status, details = str(row["status"]), str(row.get("status-details", ""))
        except (ValueError, KeyError, StopIteration, TypeError):
            details = f"`flwr ls` answered: {(done.stdout + done.stderr).strip()[-500:]}"
        if status.startswith("finished"):
            break
        time.sleep(0.5)
    return status, details


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate_processes(roots: Sequence[subprocess.Popen[Any]], flwr_home: Path) -> None:
    """SIGTERM the roots (SuperLink stops SuperExec itself), then sweep and SIGKILL stragglers.

    Descendants are listed *before* the roots die (afterwards they are re-parented and only the
    ``FLWR_HOME`` sweep can find them).
    """
    procs: set[psutil.Process] = set()
    for root in roots:
        if root.poll() is not None:
            continue
        with contextlib.suppress(psutil.Error):
            procs.update(psutil.Process(root.pid).children(recursive=True))
        root.terminate()
        try:
            root.wait(timeout=_GRACE_S)
        except subprocess.TimeoutExpired:
            root.kill()
            root.wait()
    for _sweep in range(3):
        procs.update(find_simulation_processes(flwr_home))
        alive = [p for p in procs if _alive(p)]
        if not alive:
            return
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=_GRACE_S)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=_GRACE_S)
        procs = set()
