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

from pathlib import Path

from fedtune.client.node_settings import NodeSettings, node_key
from fedtune.core.app_code import app_code_sha256
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.lineage import model_sha256


class RunNotApproved(ConfigError):
    """The coordinator asked for something this hospital's node settings do not allow."""


def check_run_approved(
    config: RunConfig, node: NodeSettings, model_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> None:
    """Raise RunNotApproved naming the pin and both values if the run is outside the pins."""
    allowed = node.allowed_strategies
    if allowed and config.federation.strategy not in allowed:
        raise RunNotApproved(
            f"the coordinator asked for strategy {config.federation.strategy!r}, but this "
            f"hospital only allows {', '.join(allowed)} (node setting "
            f"'{node_key('allowed_strategies')}'); nothing was trained."
        )
    if node.max_epsilon is not None:
        most = node.max_epsilon
        if not config.privacy.enabled:
            raise RunNotApproved(
                f"the coordinator asked to train without differential privacy, but this "
                f"hospital allows at most ε = {most:g} (node setting '{node_key('max_epsilon')}'); "
                "nothing was trained."
            )
        if config.privacy.target_epsilon > most:
            raise RunNotApproved(
                f"the coordinator asked for ε = {config.privacy.target_epsilon:g}, above this "
                f"hospital's maximum ε = {most:g} (node setting '{node_key('max_epsilon')}'); "
                "nothing was trained."
            )
    pinned_app = node.allowed_app_sha256.lower()
    if pinned_app:
        running = app_code_sha256()
        if running != pinned_app:
            raise RunNotApproved(
                f"this node's fedtune code has SHA-256 {running[:16]}…, not the "
                f"{pinned_app[:16]}… its admin approved (node setting "
                f"'{node_key('allowed_app_sha256')}'); "
                "update the pin after reviewing the new version, or reinstall the approved one."
            )
    pinned_model = node.allowed_model_sha256.lower()
    if pinned_model:
        if model_dir is None or cache_dir is None:
            raise RunNotApproved("the base model's files could not be located to check its pin")
        actual = model_sha256(model_dir, cache_dir)
        if actual != pinned_model:
            raise RunNotApproved(
                f"the base model {config.model.source!r} has SHA-256 {actual[:16]}…, not the "
                f"{pinned_model[:16]}… this hospital approved (node setting "
                f"'{node_key('allowed_model_sha256')}'); nothing was trained."
            )
