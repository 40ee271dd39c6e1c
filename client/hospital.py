"""Who this hospital is, and its say over the coordinator's run configuration.

Light on purpose (no torch, transformers, peft or Opacus): every message a node answers reads
these, including the secure-aggregation stages that never touch the model, and a deployed
node answers each message in a fresh process (see client/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.approval import RunNotApproved, check_run_approved
from fedtune.client.node_settings import DEFAULT_DATA_SPLIT, NodeSettings, node_key
from fedtune.core.config import ConfigError, DataSettings, RunConfig
from fedtune.core.model_source import model_cache_root, resolve_model_source


def apply_node_settings(config: RunConfig, node: NodeSettings) -> RunConfig:
    """The run configuration as this hospital will execute it.

    The coordinator asks; the hospital decides: a node pinned to a base model refuses any
    other (a coordinator must not swap the model that hospital data trains), the node's
    device replaces the coordinator's (only the hospital knows its hardware), and a deployed
    node splits its data its own way (its admin's `data-split` and `split-seed`, default
    80/10/10 and seed 0): a coordinator choosing the split could move records out of DP
    training into evaluation, which is not noised. A node set to `privacy-unit = patient`
    protects each patient whatever unit the run asks for.
    """
    if node.allowed_model and config.model.source != node.allowed_model:
        raise RunNotApproved(
            f"the coordinator asked to train base model {config.model.source!r}, but this "
            f"hospital only allows {node.allowed_model!r} (node setting "
            f"'{node_key('allowed_model')}'); nothing was trained."
        )
    model_dir = None
    if node.allowed_model_sha256:
        model_dir = resolve_model_source(config.model)[0]
    check_run_approved(config, node, model_dir, model_cache_root())
    overrides: dict[str, dict[str, Any]] = {}
    if node.device and node.device != config.model.device:
        overrides["model"] = {"device": node.device}
    if node.privacy_unit == "patient" and config.privacy.unit != "patient":
        # The stronger unit wins: a coordinator cannot turn a patient-level node record-level.
        overrides["privacy"] = {"unit": "patient"}
    if node.data_path is not None:  # deployed: the split is the hospital's, not the run's
        split = node.data_split or DEFAULT_DATA_SPLIT
        seed = node.split_seed if node.split_seed is not None else 0
        if (tuple(config.data.split), config.data.split_seed) != (tuple(split), seed):
            overrides["data"] = {"split": list(split), "split_seed": seed}
    return config.with_overrides(**overrides) if overrides else config


@dataclass(frozen=True)
class HospitalIdentity:
    """The hospital's name (as reported to the coordinator) and where its data lives."""

    name: str
    data_path: Path
    simulated: bool


def hospital_identity(node: NodeSettings, data: DataSettings) -> HospitalIdentity:
    """Resolve who this node is: its admin's node settings first, simulation second."""
    if node.data_path is not None:
        return HospitalIdentity(name=node.display_name, data_path=node.data_path, simulated=False)
    if node.partition_id is not None:
        if not data.simulation_root:
            raise ConfigError(
                "This is a simulated hospital but data.simulation_root is not set in the run "
                "configuration, so it does not know where its data is."
            )
        name = node.display_name
        path = Path(data.simulation_root) / f"{name}.jsonl"
        return HospitalIdentity(name=name, data_path=path, simulated=True)
    raise ConfigError(
        f"This node has no '{node_key('data_path')}' in its node configuration; start it with "
        f"--node-config \"{node_key('name')}='...' {node_key('data_path')}='/path/to/data.jsonl'\"."
    )
