"""`--record-views` at a simulated hospital: save the plaintext delta it computed.

A research tool to measure what the coordinator could learn: the coordinator saves what it
received from each hospital, the hospital saves what it actually computed, side by side. A
real hospital must never write its plaintext delta anywhere because a run asked it to, so a
deployed node refuses any run that sets `secure_aggregation.record_views_dir`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.client.hospital import HospitalIdentity
from fedtune.core.adapters import Adapter
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.secagg.encoding import flatten


def views_round_dir(root: str | Path, server_round: int) -> Path:
    return Path(root) / f"round-{server_round:04d}"


def plaintext_view_path(root: str | Path, server_round: int, hospital: str) -> Path:
    return views_round_dir(root, server_round) / f"{hospital}.plaintext.npy"


def received_view_path(root: str | Path, server_round: int, hospital: str) -> Path:
    return views_round_dir(root, server_round) / f"{hospital}.received.bin"


def refuse_recording_outside_simulation(config: RunConfig, identity: HospitalIdentity) -> None:
    if config.secure_aggregation.record_views_dir and not identity.simulated:
        raise ConfigError(
            "this run asks hospitals to record their plaintext deltas "
            "(secure_aggregation.record_views_dir); that is a simulation-only research tool "
            "and a real hospital node refuses it"
        )


def record_plaintext_view(
    config: RunConfig,
    identity: HospitalIdentity,
    server_round: int,
    delta: Adapter,
    reference: Adapter,
) -> None:
    """Save the delta exactly as computed (before clipping), flattened in the wire layout."""
    root = config.secure_aggregation.record_views_dir
    if not root:
        return
    refuse_recording_outside_simulation(config, identity)
    path = plaintext_view_path(root, server_round, identity.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, flatten(delta, reference).astype(np.float32))
