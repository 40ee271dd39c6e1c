"""The non-federated arms, and scoring every arm on the one shared test set.

What a federation is compared with, on exactly the examples the federated hospitals train on
(each hospital file's ``train`` split, made by the same ``data.split`` and seed):

- **centralized**: all hospitals' training examples pooled at one site. Each "round" is
  ``train.local_steps`` steps of ``hospitals × train.batch_size`` examples: the examples the
  whole federation processes per round, in as many sequential steps as each hospital takes
  (FedAvg with an exact average at every step). Taking ``hospitals ×`` more steps of the
  hospitals' batch instead gives it that many more sequential noisy updates under DP; with
  the classification experiment's settings that version reached 0.19 at ε = 8, below the
  federation itself, which says more about the step count than about pooling data.
- **local-only**: each hospital trains alone for the same rounds × ``train.local_steps``;
  its curve and final metric are averaged over hospitals (what a hospital gets by itself).

Both use the client's own training functions (``client.train`` / Opacus ``client.dp_train``),
start from the coordinator's initial adapter, and for DP calibrate σ once so that the target
(ε, δ) holds after the last round (δ = the power of ten below 1/n, as at a hospital).
Training runs in this process: there is no communication to simulate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.client.data import load_hospital_data
from fedtune.client.dp_train import DPPlan, poisson_sample_rate, train_privately
from fedtune.client.encoding import collate, encode_classification, encode_generation
from fedtune.client.evaluate import evaluate_classification
from fedtune.client.hospital import HospitalIdentity
from fedtune.client.privacy import default_delta
from fedtune.client.session import ModelHandle, data_for, model_for
from fedtune.client.train import train_locally
from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.model import get_adapter, set_adapter
from fedtune.core.privacy_accounting import calibrate_noise_multiplier, compute_epsilon
from fedtune.simulations.datasets import file_fingerprint

Progress = Callable[[int, int], None]  # (done, total) rounds; local-only: hospital-rounds


@dataclass(frozen=True)
class SharedTestSet:
    """The experiment's held-out test file, encoded once per model."""

    path: Path
    fingerprint: str
    features: list[Any]
    examples: list[Any]


@dataclass
class BaselineOutcome:
    """A baseline's curve on the shared test set and, with DP, the ε it actually spent."""

    curve: list[tuple[int, float]]
    achieved_epsilon: float | None = None


def load_test_set(config: RunConfig, path: Path, handle: ModelHandle) -> SharedTestSet:
    """Read and encode the shared test file with this run's tokenizer and labels."""
    labels = config.model.labels if config.model.task == "classify" else None
    examples = list(load_hospital_data(path, config.data.format, labels=labels).examples)
    if config.model.task == "classify":
        label_to_id = {label: i for i, label in enumerate(config.model.labels)}
        features: list[Any] = list(
            encode_classification(
                examples,  # type: ignore[arg-type]
                handle.tokenizer, label_to_id, config.model.max_length,
            )
        )
    else:
        features = list(
            encode_generation(
                examples,  # type: ignore[arg-type]
                handle.tokenizer, config.model.max_length,
            )
        )
    return SharedTestSet(path, file_fingerprint(path), features, examples)


def score(config: RunConfig, handle: ModelHandle, adapter: Adapter, test: SharedTestSet) -> float:
    """The headline metric of ``adapter`` on the shared test set (higher is better).

    Classification: accuracy. Instruct: exact match of the greedy answer, computed by teacher
    forcing: greedy decoding reproduces the reference answer exactly when, and only when,
    every answer token and the end-of-sequence token is the most likely next token given the
    reference prefix, so one forward pass per batch gives the same verdict as generating
    token by token (measured on this CPU: ~7 s per example generated, a batch in well under
    a second). Always over the whole shared test set, the same examples for every arm.
    """
    set_adapter(handle.model, adapter)
    pad_id = int(handle.tokenizer.pad_token_id)
    batch = config.train.batch_size
    if config.model.task == "classify":
        metrics = evaluate_classification(
            handle.model, test.features, len(config.model.labels), batch, pad_id
        )
        return float(metrics["accuracy"])
    return greedy_exact_match(handle.model, test.features, batch, pad_id)


@torch.no_grad()
def greedy_exact_match(
    model: torch.nn.Module, features: Sequence[Any], batch_size: int, pad_token_id: int
) -> float:
    """Share of examples whose whole answer (+ EOS) is the argmax at every position."""
    model.eval()
    device = next(model.parameters()).device
    exact = 0
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]), pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(dim=-1)  # position t predicts token t + 1
        targets = batch["labels"][:, 1:]
        answer = targets != -100
        correct = (predicted == targets) | ~answer
        exact += int((correct.all(dim=1) & answer.any(dim=1)).sum())
    return exact / max(len(features), 1)


@dataclass(frozen=True)
class TrainPart:
    """A training split as DP-SGD sees it: the features and, with privacy.unit = "patient",
    each feature's patient number (0..P-1), else None."""

    features: list[Any]
    patients: list[int] | None

    @property
    def units(self) -> int:
        """n of the privacy analysis: patients, or records."""
        return len(set(self.patients)) if self.patients is not None else len(self.features)


def hospital_train_features(
    config: RunConfig, hospital_files: Sequence[Path], handle: ModelHandle
) -> list[TrainPart]:
    """Each hospital's encoded ``train`` split: exactly what it trains on when federated."""
    parts = []
    for path in hospital_files:
        data = data_for(config, HospitalIdentity(path.stem, path, simulated=True), handle)
        patients = None if data.train_patients is None else list(data.train_patients)
        parts.append(TrainPart(data.features["train"], patients))
    return parts


def pooled(parts: Sequence[TrainPart]) -> TrainPart:
    """All hospitals' training splits as one; patient numbers stay distinct per hospital."""
    features = [f for part in parts for f in part.features]
    if any(part.patients is None for part in parts):
        return TrainPart(features, None)
    patients: list[int] = []
    for part in parts:
        offset = len(set(patients))
        patients += [offset + p for p in part.patients or ()]
    return TrainPart(features, patients)


def run_centralized(
    config: RunConfig,
    hospital_files: Sequence[Path],
    initial: Adapter,
    test: SharedTestSet,
    epsilon: float | None,
    progress: Progress | None = None,
) -> BaselineOutcome:
    """All training examples pooled; per round ``local_steps`` steps of the federation's
    examples (``hospitals × batch_size`` each)."""
    handle = model_for(config)
    everything = pooled(hospital_train_features(config, hospital_files, handle))
    batch = config.train.batch_size * len(hospital_files)
    pooled_config = config.with_overrides(train={"batch_size": batch})
    steps = config.train.local_steps
    return _train_curve(pooled_config, handle, everything, steps, initial, test, epsilon,
                        progress)


def run_local_only(
    config: RunConfig,
    hospital_files: Sequence[Path],
    initial: Adapter,
    test: SharedTestSet,
    epsilon: float | None,
    progress: Progress | None = None,
) -> BaselineOutcome:
    """Each hospital alone from the same start; curves and ε averaged / maxed over hospitals."""
    handle = model_for(config)
    parts = hospital_train_features(config, hospital_files, handle)
    rounds = config.federation.rounds
    start_score = score(config, handle, initial, test)  # the same start for every hospital
    outcomes = []
    for k, part in enumerate(parts):

        def hospital_progress(done: int, _total: int, k: int = k) -> None:
            if progress is not None:
                progress(k * rounds + done, len(parts) * rounds)

        outcomes.append(
            _train_curve(
                config, handle, part, config.train.local_steps, initial, test, epsilon,
                hospital_progress, start_score,
            )
        )
    curve = [
        (point[0], sum(o.curve[i][1] for o in outcomes) / len(outcomes))
        for i, point in enumerate(outcomes[0].curve)
    ]
    spent = [o.achieved_epsilon for o in outcomes if o.achieved_epsilon is not None]
    return BaselineOutcome(curve, max(spent) if spent else None)


def _train_curve(
    config: RunConfig,
    handle: ModelHandle,
    part: TrainPart,
    steps_per_round: int,
    initial: Adapter,
    test: SharedTestSet,
    epsilon: float | None,
    progress: Progress | None,
    start_score: float | None = None,
) -> BaselineOutcome:
    """Train ``federation.rounds`` chunks from ``initial``, scoring after each one."""
    features = part.features
    rounds = config.federation.rounds
    settings = dataclasses.replace(config.train, local_steps=steps_per_round, local_epochs=0.0)
    pad_id = int(handle.tokenizer.pad_token_id)
    task = config.model.task
    if start_score is None:
        start_score = score(config, handle, initial, test)
    curve = [(0, start_score)]
    plan, history, delta = None, [], 0.0
    if epsilon is not None:
        delta = config.privacy.target_delta or default_delta(part.units)
        sample_rate = poisson_sample_rate(settings.batch_size, len(features))
        sigma = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=delta, sample_rate=sample_rate,
            steps=steps_per_round * rounds, accountant=config.privacy.accountant,
        )
        plan = DPPlan(
            noise_multiplier=sigma, max_grad_norm=config.privacy.max_grad_norm,
            sample_rate=sample_rate, steps=steps_per_round,
            grad_sample_mode=config.privacy.grad_sample_mode,
            max_physical_batch_size=config.privacy.max_physical_batch_size,
        )
    set_adapter(handle.model, initial)
    for server_round in range(1, rounds + 1):
        seed = config.train.seed * 1000 + server_round
        if plan is None:
            train_locally(handle.model, features, settings, pad_id, seed, task)
        else:
            result = train_privately(handle.model, features, settings, plan, pad_id, seed, task,
                                     patients=part.patients)
            history.append((plan.noise_multiplier, plan.sample_rate, result.steps))
        trained = get_adapter(handle.model)
        curve.append((server_round, score(config, handle, trained, test)))
        set_adapter(handle.model, trained)
        if progress is not None:
            progress(server_round, rounds)
    achieved = (
        compute_epsilon(history, delta, config.privacy.accountant) if history else None
    )
    return BaselineOutcome(curve, achieved)
