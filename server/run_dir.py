"""The coordinator's run directory: everything a run produces, in files a person can read.

```
<run-dir>/
  run-config.json          the run configuration, canonical JSON (what every hospital got)
  adapters/round-0000.safetensors   the global adapter after each round (0 = initial)
  strategy/round-0001.json          the strategy's state after each round: its JSON
  strategy/round-0001.safetensors   metadata, and its moment arrays (if it has any)
  strategy-state.json      the same JSON as strategy/round-NNNN.json of the latest round
  coordinator-state.json   the coordinator's state (server/state.py): what resume loads
  metrics.jsonl            one JSON object per round and per evaluation (server/records.py)
  summary.json             base vs final metrics, per hospital and weighted
```
Every file is written to a temporary name and renamed into place, so a coordinator killed
mid-write never leaves a half-written checkpoint that a later export would trust.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, load_file, save, save_file

from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.server.records import LogRecord, record_from_json, record_to_json
from fedtune.server.state import CoordinatorState, StateError

_ROUND_FILE = re.compile(r"^round-(\d{4})\.safetensors$")
_STRATEGY_FILE = re.compile(r"^round-(\d{4})\.json$")


class RunDirectory:
    """Reads and writes one run's files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def adapters_dir(self) -> Path:
        return self.path / "adapters"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def create(self, config: RunConfig) -> None:
        """Start a fresh run here; refuse to overwrite an existing one."""
        if (self.path / "run-config.json").exists():
            raise FileExistsError(f"{self.path} already holds a run; choose a new run directory.")
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "run-id", secrets.token_hex(8).encode())
        _atomic_write(self.path / "run-config.json", config.to_json().encode())

    @property
    def run_id(self) -> str:
        """A random identity made at creation; hospitals' ledgers key their plans on it."""
        return (self.path / "run-id").read_text().strip()

    def config(self) -> RunConfig:
        path = self.path / "run-config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a fedtune run directory (it has no run-config.json)"
            )
        return RunConfig.from_json(path.read_text())

    def save_adapter(self, server_round: int, adapter: Adapter) -> Path:
        path = self.adapters_dir / f"round-{server_round:04d}.safetensors"
        contiguous = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.items()}
        with tempfile.NamedTemporaryFile(dir=self.adapters_dir, delete=False) as handle:
            staging = Path(handle.name)
        save_file(contiguous, str(staging), metadata={"round": str(server_round)})
        os.replace(staging, path)
        return path

    def load_adapter(self, server_round: int) -> Adapter:
        path = self.adapters_dir / f"round-{server_round:04d}.safetensors"
        if not path.is_file():
            saved = ", ".join(str(r) for r in self.saved_rounds()) or "none"
            raise FileNotFoundError(f"no adapter saved for round {server_round}; saved: {saved}")
        return dict(load_file(str(path)))

    def saved_rounds(self) -> list[int]:
        if not self.adapters_dir.is_dir():
            return []
        rounds = (_ROUND_FILE.match(p.name) for p in self.adapters_dir.iterdir())
        return sorted(int(m.group(1)) for m in rounds if m)

    @property
    def strategy_dir(self) -> Path:
        return self.path / "strategy"

    def save_strategy_state(self, server_round: int, state: dict[str, Any]) -> None:
        """Store a strategy's ``state_dict()`` for this round: meta as JSON, arrays losslessly.

        ``state`` is ``{"meta": JSON-able, "arrays": {key: ndarray}}`` (strategies.state).
        The arrays go to ``strategy/round-NNNN.safetensors`` in their own dtype (float64 for
        optimizer moments: a resumed run must continue bit-identically), written before
        ``strategy/round-NNNN.json``, which names them; so a JSON file on disk always has
        its complete arrays. ``strategy-state.json`` then repeats the JSON for the latest
        round.
        """
        if "meta" not in state:
            raise ValueError("strategy state must be {'meta': ..., 'arrays': ...}")
        arrays = {
            str(key): np.ascontiguousarray(value) for key, value in state.get("arrays", {}).items()
        }
        stem = f"round-{server_round:04d}"
        arrays_file = None
        if arrays:
            arrays_file = f"{self.strategy_dir.name}/{stem}.safetensors"
            blob = save(arrays, metadata={"round": str(server_round)})
            _atomic_write(self.path / arrays_file, blob)
        payload = {
            "round": server_round,
            "meta": state["meta"],
            "arrays": sorted(arrays),
            "arrays_file": arrays_file,
        }
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False).encode()
        _atomic_write(self.strategy_dir / f"{stem}.json", text)
        _atomic_write(self.path / "strategy-state.json", text)

    def load_strategy_state(self, server_round: int) -> dict[str, Any]:
        """What ``state_dict()`` produced after ``server_round``: {"meta", "arrays"}."""
        path = self.strategy_dir / f"round-{server_round:04d}.json"
        if not path.is_file():
            saved = ", ".join(str(r) for r in self.strategy_rounds()) or "none"
            raise FileNotFoundError(
                f"no strategy state saved for round {server_round}; saved: {saved}"
            )
        payload = json.loads(path.read_text())
        arrays: dict[str, np.ndarray] = {}
        if payload["arrays_file"] is not None:
            arrays = dict(load((self.path / payload["arrays_file"]).read_bytes()))
        if sorted(arrays) != payload["arrays"]:
            raise ValueError(
                f"{payload['arrays_file']} does not hold the arrays {path.name} lists; "
                "the strategy state of this round is damaged"
            )
        return {"meta": payload["meta"], "arrays": arrays}

    def strategy_rounds(self) -> list[int]:
        """Rounds with a saved strategy state, ascending."""
        if not self.strategy_dir.is_dir():
            return []
        rounds = (_STRATEGY_FILE.match(p.name) for p in self.strategy_dir.iterdir())
        return sorted(int(m.group(1)) for m in rounds if m)

    def log(self, record: LogRecord) -> None:
        """One JSON line per record; appended, so a crash loses at most the last line."""
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record_to_json(record), sort_keys=True) + "\n")

    def records(self) -> list[LogRecord]:
        """The metrics log as typed records, in the order they happened."""
        where = str(self.metrics_file)
        return [record_from_json(line, f"{where}:{number}")
                for number, line in enumerate(self.read_metrics(), start=1)]

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics log's raw JSON objects (for tools that print or export it)."""
        if not self.metrics_file.is_file():
            return []
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def state_file(self) -> Path:
        return self.path / "coordinator-state.json"

    def save_state(self, state: CoordinatorState) -> None:
        """Atomically replace the saved coordinator state."""
        text = json.dumps(state.state_dict(), indent=2, sort_keys=True, allow_nan=False)
        _atomic_write(self.state_file, text.encode())

    def load_state(self) -> CoordinatorState:
        """The saved coordinator state (a run that never got past its set-up has none)."""
        if not self.state_file.is_file():
            raise StateError(
                f"{self.path} has no coordinator-state.json: the run stopped before its first "
                "evaluation, or an earlier fedtune release started it; start a new run"
            )
        try:
            saved = json.loads(self.state_file.read_text())
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.state_file} is not valid JSON: {exc}") from None
        state = CoordinatorState()
        state.load_state_dict(saved)
        return state

    def save_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2).encode())

    def summary(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.path / "summary.json").read_text())
        return loaded


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
