"""A hospital's evaluation of an adapter the coordinator sent, Flower-free.

Shared by the `evaluate` action and by training messages that also evaluate the adapter they
carry (`evaluation.with_training`), so both give the same numbers. Only metrics leave the
hospital; a deployed hospital under secure aggregation drops the example count (it would tell
the coordinator the size of its data, which the masked weight hides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedtune.client.data import DataValidationError
from fedtune.client.evaluate import evaluate_classification, evaluate_generation
from fedtune.client.hospital import HospitalIdentity, apply_node_settings, hospital_identity
from fedtune.client.hospital_log import EvaluationLimitReached, check_evaluation_allowed
from fedtune.client.node_settings import NodeSettings
from fedtune.client.session import data_for, model_for
from fedtune.core.adapters import Adapter
from fedtune.core.model import set_adapter
from fedtune.core.wire import Job

log = logging.getLogger("fedtune.hospital")


class EmptySplit(DataValidationError):
    """The split asked for holds no examples at this hospital."""


@dataclass(frozen=True)
class LocalEvaluation:
    hospital: HospitalIdentity
    split: str
    metrics: dict[str, float]


def evaluate_adapter(
    adapter: Adapter, job: Job, node: NodeSettings, split: str
) -> LocalEvaluation:
    """Metrics of `adapter` on this hospital's `split` (at most evaluation.max_examples)."""
    config = apply_node_settings(job.config, node)
    identity = hospital_identity(node, config.data)
    check_evaluation_allowed(node, job.run_id)
    handle = model_for(config)
    data = data_for(config, identity, handle)
    set_adapter(handle.model, adapter)
    limit = config.evaluation.max_examples
    features = data.features[split][:limit]
    if not features:
        raise EmptySplit(identity.data_path, [
            f"the {split} split is empty, so there is nothing to evaluate on (the data "
            "file has too few records or patients for its split fractions)"
        ], skippable=False)
    batch_size = config.train.batch_size
    if config.model.task == "classify":
        metrics = evaluate_classification(
            handle.model, features, len(config.model.labels), batch_size,
            int(handle.tokenizer.pad_token_id),
        )
    else:
        examples = list(getattr(data.splits, split))[:limit]
        metrics = evaluate_generation(
            handle.model, handle.tokenizer, features, examples, batch_size,
            config.evaluation.generation_examples, config.evaluation.max_new_tokens,
        )
    if not identity.simulated and config.secure_aggregation.enabled:
        # The held-out split's size would tell the coordinator the data's size, which
        # secure aggregation hides; its metrics are then averaged over hospitals unweighted.
        metrics = {k: v for k, v in metrics.items() if k != "num-examples"}
    return LocalEvaluation(identity, split, metrics)


def validate_received(adapter: Adapter, job: Job, node: NodeSettings) -> dict[str, float] | None:
    """The carried adapter on the validation split (Job.validate), as a separate evaluation
    message would answer; None when this node is at its evaluation limit or has no validation
    examples: the message's main work (training, the test evaluation) still goes ahead."""
    try:
        return evaluate_adapter(adapter, job, node, "validation").metrics
    except (EvaluationLimitReached, EmptySplit) as exc:
        log.warning("round %d: no validation sent: %s", job.server_round, exc)
        return None
