"""DP-SGD correctness on the real PEFT LoRA models (the class of bug in opacus issue #820).

DP-LoRA can fail silently: per-sample gradients that are wrong (padding, the LoRA wrappers,
tied weights), a DP step that is not the non-DP step plus clipping and noise, frozen weights
that move, or Opacus hooks left on a cached model. None of that raises; the model is just
useless. These tests check each property directly against plain autograd:

1. Opacus' per-sample gradients (hooks, functorch) and ghost clipping's per-sample gradient
   norms equal the gradients of each example's own loss, on padded batches.
2. With σ = 0 and a huge clip norm a DP step is exactly the non-DP step; `train_privately`
   itself lowers the training loss under those settings.
3. Under real DP only the adapter moves, and Opacus leaves nothing behind on the model.
4. The sampling rate the accountant is told is the one Opacus samples with.
5. `plan.steps` logical steps are taken when a logical batch is split into physical ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.utils.data import DataLoader

from client.dp_train import DPPlan, poisson_sample_rate, train_privately
from client.encoding import collate
from client.losses import PerExampleLoss, model_inputs
from client.model import attach_lora, get_adapter, load_base_model
from client.session import ModelHandle, data_for, hospital_identity
from fedtune.config import RunConfig, TrainSettings

MODES = ("hooks", "functorch", "ghost")
TASKS = ("classify", "instruct")


class Setup:
    """A fresh tiny LoRA model (never the process-wide cached one) and its training data."""

    def __init__(self, config: RunConfig) -> None:
        device = torch.device("cpu")
        base, tokenizer, fresh = load_base_model(config.model, config.model.labels, device)
        self.model = attach_lora(base, config.lora, config.model.task, fresh)
        self.task = config.model.task
        self.pad = int(tokenizer.pad_token_id)
        handle = ModelHandle(model=self.model, tokenizer=tokenizer, device=device)
        identity = hospital_identity({"partition-id": 0}, config.data)
        self.features: list[Any] = data_for(config, identity, handle).features["train"]
        # LoRA starts with B = 0, where every gradient of A is exactly zero: a comparison
        # of zeros proves nothing. Move the adapter somewhere generic first.
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in self.trainable().values():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def mixed_lengths(self, count: int) -> list[Any]:
        """`count` examples of pairwise different lengths: the batch needs padding."""
        by_length: dict[int, Any] = {}
        for feature in self.features:
            by_length.setdefault(len(feature["input_ids"]), feature)
        lengths = sorted(by_length)
        assert len(lengths) >= count, "the tiny data set has too few distinct lengths"
        picks = np.linspace(0, len(lengths) - 1, count).round().astype(int)
        return [by_length[lengths[i]] for i in picks]

    def loss(self, model: torch.nn.Module, features: list[Any]) -> torch.Tensor:
        batch = collate(features, self.pad)
        logits = model(**model_inputs(batch)).logits
        return PerExampleLoss(self.task)(logits, batch["labels"])


def _config(request: pytest.FixtureRequest, task: str) -> RunConfig:
    name = "classify_config" if task == "classify" else "instruct_config"
    config: RunConfig = request.getfixturevalue(name)
    return config


@pytest.fixture(params=TASKS)
def setup(request: pytest.FixtureRequest) -> Setup:
    return Setup(_config(request, request.param))


def _deterministic_training_mode(model: torch.nn.Module) -> None:
    """Dropout off everywhere, yet Opacus' hooks active (they skip modules not in training).

    Only the leaf modules that own trainable parameters (LoRA's A and B, the saved head) are
    put in training mode; a Linear computes the same in both modes.
    """
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()


def _reference_grads(setup: Setup, features: list[Any]) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient on its own (a batch of one: no padding at all)."""
    grads = []
    for feature in features:
        setup.model.zero_grad(set_to_none=True)
        setup.loss(setup.model, [feature]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in setup.trainable().items()})
    setup.model.zero_grad(set_to_none=True)
    return grads


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def _no_opacus_leftovers(model: torch.nn.Module) -> None:
    for name, parameter in model.named_parameters():
        for attribute in ("grad_sample", "_forward_counter", "_norm_sample", "summed_grad"):
            assert getattr(parameter, attribute, None) is None, f"{name}.{attribute} left over"
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'the model'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'the model'}"
        assert not module._backward_hooks, f"backward hook left on {name or 'the model'}"
        assert not getattr(module, "_full_backward_hooks", None), f"hook left on {name}"
        # Opacus leaves an empty list behind on each hooked module; it must hold no tensors.
        assert not getattr(module, "activations", None), f"activations kept on {name}"


# ---- 1. per-sample gradients ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_each_examples_own_gradient(setup: Setup, mode: str):
    features = setup.mixed_lengths(4)
    batch = collate(features, setup.pad)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    expected = _reference_grads(setup, features)

    _deterministic_training_mode(setup.model)
    wrapped = GradSampleModule(
        setup.model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    try:
        # The batch loss is the mean over examples, so autograd gives each example's gradient
        # divided by B; with loss_reduction="mean" Opacus multiplies by B again, so
        # grad_sample[i] is the gradient of example i's own loss (no scaling left to undo).
        setup.loss(wrapped, features).backward()
        for name, parameter in setup.trainable().items():
            grad_sample = parameter.grad_sample
            assert grad_sample is not None, f"no per-sample gradient for {name}"
            assert grad_sample.shape == (len(features), *parameter.shape)
            for i, reference in enumerate(expected):
                assert reference[name].norm() > 0, f"{name}: zero reference gradient"
                error = _relative_error(grad_sample[i], reference[name])
                assert error <= 1e-4, f"{mode}: {name}, example {i}: relative error {error:.2e}"
    finally:
        wrapped._close()
        wrapped.zero_grad(set_to_none=True)
    _no_opacus_leftovers(setup.model)


def test_ghost_clipping_per_sample_norms_equal_each_examples_gradient_norm(setup: Setup):
    """Ghost clipping never materializes per-sample gradients; its norms must still be right."""
    features = setup.mixed_lengths(4)
    expected = _reference_grads(setup, features)

    _deterministic_training_mode(setup.model)
    wrapped = GradSampleModuleFastGradientClipping(
        setup.model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0
    )
    try:
        setup.loss(wrapped, features).backward()
        for name, parameter in setup.trainable().items():
            per_example = torch.stack([reference[name].norm() for reference in expected])
            error = _relative_error(parameter._norm_sample, per_example)
            assert error <= 1e-4, f"ghost: norm of {name}: relative error {error:.2e}"
        total = torch.stack(
            [torch.cat([g.flatten() for g in reference.values()]).norm() for reference in expected]
        )
        error = _relative_error(wrapped.get_norm_sample(), total)
        assert error <= 1e-4, f"ghost: total per-example norm: relative error {error:.2e}"
    finally:
        wrapped._close()
        setup.model.zero_grad(set_to_none=True)
        for parameter in setup.model.parameters():
            if hasattr(parameter, "_norm_sample"):
                del parameter._norm_sample
