"""What a hospital agrees to run: its node settings pin the model, strategies, ε and code.

The coordinator asks; the hospital decides. A request outside what the hospital's admin
pinned in the node file is refused before anything is loaded or trained, with a reason the
admin can act on, and the refusal is written to the hospital's own log. Pins (node settings,
all optional):

- `allowed-model-sha256`: the SHA-256 of the base model's files (`fedtune fingerprint-model
  DIR`); a coordinator cannot swap the model the hospital's data trains, even under the same
  name or path. (`allowed-model` pins the name, see client.session.)
- `allowed-strategies`: comma-separated strategy names, e.g. "fedavg,fedprox".
- `max-epsilon`: the largest per-run ε this hospital accepts; a run asking for more, or for
  no DP at all, is refused (the privacy budget then still caps what the ledger may spend).
- `allowed-app-sha256`: the SHA-256 of the fedtune code this node runs (`fedtune app-hash`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, RunConfig

NODE_ALLOWED_MODEL_SHA_KEY = "allowed-model-sha256"
NODE_ALLOWED_STRATEGIES_KEY = "allowed-strategies"
NODE_MAX_EPSILON_KEY = "max-epsilon"
NODE_ALLOWED_APP_KEY = "allowed-app-sha256"

# The packages whose code a node runs for the coordinator (what the Flower app bundle holds).
APP_PACKAGES = ("client", "fedtune", "server", "strategies")


class RunNotApproved(ConfigError):
    """The coordinator asked for something this hospital's node settings do not allow."""


def app_code_sha256(root: Path | None = None) -> str:
    """SHA-256 over the relative paths and bytes of every .py file of the app's packages.

    This is the code that answers the coordinator on this node (runtime installation is off),
    so pinning it pins what the node will do with the hospital's data.
    """
    base = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in APP_PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            relative = path.relative_to(base).as_posix()
            digest.update(f"{relative}\n{path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def model_sha256(directory: Path, cache_dir: Path) -> str:
    """The base model's fingerprint, cached by the files' sizes and modification times
    (hashing a multi-GB model for every message would dominate a node's round)."""
    from fedtune.lineage import model_fingerprint

    stamp = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        info = path.stat()
        stamp.update(f"{path.relative_to(directory)}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    key = hashlib.sha256(f"{directory.resolve()}\n{stamp.hexdigest()}".encode()).hexdigest()
    cached = cache_dir / "model-fingerprints" / f"{key}.json"
    if cached.is_file():
        return str(json.loads(cached.read_text())["sha256"])
    sha = model_fingerprint(directory).sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"directory": str(directory), "sha256": sha}))
    os.replace(tmp, cached)
    return sha


def check_run_approved(
    config: RunConfig, node_config: Mapping[str, Any], model_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> None:  # fmt: skip
    """Raise RunNotApproved naming the pin and both values if the run is outside the pins."""
    strategies = str(node_config.get(NODE_ALLOWED_STRATEGIES_KEY, "")).strip()
    if strategies:
        allowed = [s.strip() for s in strategies.split(",") if s.strip()]
        if config.federation.strategy not in allowed:
            raise RunNotApproved(
                f"the coordinator asked for strategy {config.federation.strategy!r}, but this "
                f"hospital only allows {', '.join(allowed)} (node setting "
                f"'{NODE_ALLOWED_STRATEGIES_KEY}'); nothing was trained."
            )
    if NODE_MAX_EPSILON_KEY in node_config:
        most = float(node_config[NODE_MAX_EPSILON_KEY])
        if not config.privacy.enabled:
            raise RunNotApproved(
                f"the coordinator asked to train without differential privacy, but this "
                f"hospital allows at most ε = {most:g} (node setting '{NODE_MAX_EPSILON_KEY}'); "
                "nothing was trained."
            )
        if config.privacy.target_epsilon > most:
            raise RunNotApproved(
                f"the coordinator asked for ε = {config.privacy.target_epsilon:g}, above this "
                f"hospital's maximum ε = {most:g} (node setting '{NODE_MAX_EPSILON_KEY}'); "
                "nothing was trained."
            )
    pinned_app = str(node_config.get(NODE_ALLOWED_APP_KEY, "")).strip().lower()
    if pinned_app:
        running = app_code_sha256()
        if running != pinned_app:
            raise RunNotApproved(
                f"this node's fedtune code has SHA-256 {running[:16]}…, not the "
                f"{pinned_app[:16]}… its admin approved (node setting '{NODE_ALLOWED_APP_KEY}'); "
                "update the pin after reviewing the new version, or reinstall the approved one."
            )
    pinned_model = str(node_config.get(NODE_ALLOWED_MODEL_SHA_KEY, "")).strip().lower()
    if pinned_model:
        if model_dir is None or cache_dir is None:
            raise RunNotApproved("the base model's files could not be located to check its pin")
        actual = model_sha256(model_dir, cache_dir)
        if actual != pinned_model:
            raise RunNotApproved(
                f"the base model {config.model.source!r} has SHA-256 {actual[:16]}…, not the "
                f"{pinned_model[:16]}… this hospital approved (node setting "
                f"'{NODE_ALLOWED_MODEL_SHA_KEY}'); nothing was trained."
            )
