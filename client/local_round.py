"""One round of local training at a hospital, Flower-free: the hospital's round in one place.

global adapter -> (node settings applied, identifiers checked, budget checked) -> train
(DP-SGD when planned; the ledger records the round) -> delta = local - global. The ClientApp
(`client/app.py`) and the secure-aggregation stage (`client/secure_stages.py`) both call
`train_local_update`, so a plain and a masked round train identically; clipping, noise,
weighting and encoding of the delta happen after it (`client/outgoing.py`, the core's
update rules and fixed point). Takes the node's settings parsed once (`NodeSettings`):
nothing here needs Flower, so it runs the same in a test, a simulation and a deployed node.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from fedtune.client.dp_train import train_privately
from fedtune.client.federated_objectives import check_shared_lora_a, local_objective
from fedtune.client.hospital import HospitalIdentity, apply_node_settings, hospital_identity
from fedtune.client.hospital_log import check_identifiers
from fedtune.client.local_evaluation import validate_received
from fedtune.client.node_settings import NodeSettings
from fedtune.client.privacy import ledger_lock, plan_round
from fedtune.client.privacy_ledger import guarantee_sentence
from fedtune.client.secure_views import record_plaintext_view, refuse_recording_outside_simulation
from fedtune.client.session import data_for, model_for
from fedtune.client.train import train_locally
from fedtune.core.adapters import Adapter, adapter_delta
from fedtune.core.config import RunConfig
from fedtune.core.lineage import DataFingerprint, model_sha256
from fedtune.core.model import get_adapter, set_adapter
from fedtune.core.model_source import model_cache_root, resolve_model_source
from fedtune.core.update_rules import uploaded
from fedtune.core.wire import Job

log = logging.getLogger("fedtune.hospital")


@dataclass(frozen=True)
class LocalUpdate:
    """What one round of local training produced at this hospital (before it is sent)."""

    hospital: HospitalIdentity
    delta: Adapter
    num_examples: int
    metrics: dict[str, float]
    lineage: dict[str, str | int]  # fingerprints that travel with the update (no data)
    # The received global adapter's validation metrics (Job.validate), None when not asked
    # or not answered (the node's evaluation limit, an empty validation split).
    validation: dict[str, float] | None = None


def train_local_update(
    global_adapter: Adapter, job: Job, node: NodeSettings
) -> LocalUpdate:
    """Load the global adapter, train on local data (with DP when planned), return the delta.

    Shared by the plain `train` action and the masked-input stage of secure aggregation, so
    both train identically; only what is sent differs.
    """
    config = apply_node_settings(job.config, node)
    identity = hospital_identity(node, config.data)
    refuse_recording_outside_simulation(config, identity)
    if not identity.simulated:  # a deployed hospital's real file; simulations are generated
        check_identifiers(identity.data_path, node)
    validation = validate_received(global_adapter, job, node) if job.validate else None
    handle = model_for(config)
    data = data_for(config, identity, handle)
    features = data.features["train"]
    seed = _round_seed(config.train.seed, job.server_round, identity.name)
    pad_id = int(handle.tokenizer.pad_token_id)
    task = config.model.task
    privacy_metrics: dict[str, float] = {"dp": 0.0, "train-last-loss": 0.0}
    # One DP training per ledger at a time: budget check, training and record are atomic, so
    # two processes of one node can never both spend the same remaining budget.
    with ledger_lock(identity, config, node):
        if (data.train_patients is not None) != (config.privacy.unit == "patient"):
            raise RuntimeError("the encoded data and privacy.unit disagree on the unit")
        privacy = plan_round(
            config, identity, node, data.privacy_units(), len(features), job.run_id
        )
        check_shared_lora_a(global_adapter, config)  # FFA-LoRA: A must be the shared init
        objective = local_objective(config)  # FedProx's proximal term, FFA-LoRA's frozen A
        set_adapter(handle.model, global_adapter)
        if privacy is None:
            result = train_locally(
                handle.model, features, config.train, pad_id, seed, task, objective=objective
            )
            privacy_metrics["train-last-loss"] = result.last_loss
        else:
            result = train_privately(
                handle.model, features, config.train, privacy.plan, pad_id, seed, task,
                objective=objective, patients=data.train_patients,
            )
            entry = privacy.ledger.record(
                privacy.run_id, job.server_round, privacy.plan.noise_multiplier,
                privacy.plan.sample_rate, result.steps,
            )
            # No last-batch loss under DP: a Poisson batch can be a handful of patients.
            privacy_metrics = {
                "dp": 1.0,
                "epsilon": entry.epsilon,
                "delta": entry.delta,
                "epsilon-budget": privacy.budget,
                "noise-multiplier": entry.noise_multiplier,
                "sample-rate": entry.sample_rate,
                "dp-steps": float(entry.steps),
                "dp-patient-level": 1.0 if privacy.ledger.unit == "patient" else 0.0,
            }
    delta = adapter_delta(get_adapter(handle.model), global_adapter)
    metrics = {
        "train-loss": result.mean_loss,
        "train-steps": float(result.steps),
        "train-seconds": result.seconds,
        "skipped-lines": float(len(data.dataset.skipped)),
        **privacy_metrics,
    }
    log.info("%s: round %d trained %d steps", identity.name, job.server_round, result.steps)
    if privacy is not None:
        log.info("%s: protects each %s at (ε = %.3f, δ = %g) after this round; %s",
                 identity.name, privacy.ledger.unit, metrics["epsilon"], metrics["delta"],
                 guarantee_sentence(privacy.ledger.unit, metrics["epsilon"], metrics["delta"]))
    if data.dataset.skipped:
        log.warning("%s: skipped %d invalid data line(s)", identity.name, len(data.dataset.skipped))
    record_plaintext_view(
        config,
        identity,
        job.server_round,
        uploaded(delta, config),
        uploaded(global_adapter, config),
    )
    return LocalUpdate(identity, delta, len(features), metrics,
                       lineage_of(config, identity, data.lineage, node), validation)


def lineage_of(
    config: RunConfig, identity: HospitalIdentity, data: DataFingerprint,
    node: NodeSettings,
) -> dict[str, str | int]:
    """The fingerprints this hospital sends: always the data and model hashes; its example
    count and label histogram only where its admin shares them (they reveal the data's size,
    which secure aggregation otherwise hides), or for simulated hospitals."""
    model_dir = resolve_model_source(config.model)[0]
    out: dict[str, str | int] = {
        "data_sha256": data.sha256,
        "model_sha256": model_sha256(model_dir, model_cache_root()),
    }
    if identity.simulated or node.share_data_summary:
        out["data_examples"] = data.examples
        out["data_labels"] = json.dumps(data.labels, sort_keys=True)
    return out


def _round_seed(base_seed: int, server_round: int, hospital: str) -> int:
    """Different but reproducible shuffling and dropout per round and hospital."""
    digest = hashlib.sha256(f"{base_seed}/{server_round}/{hospital}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)
