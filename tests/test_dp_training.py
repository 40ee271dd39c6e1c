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
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

from fedtune.client.dp_train import DPPlan, poisson_sample_rate, train_privately
from fedtune.client.encoding import collate
from fedtune.client.hospital import hospital_identity
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.client.node_settings import NodeSettings
from fedtune.client.session import ModelHandle, data_for
from fedtune.core.config import RunConfig, TrainSettings
from fedtune.core.model import attach_lora, get_adapter, load_base_model, set_adapter

MODES = ("hooks", "functorch", "ghost")
TASKS = ("classify", "instruct")

# Frozen embeddings: no module input needs a gradient, and PyTorch says so on every backward.
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


class Setup:
    """A fresh tiny LoRA model (never the process-wide cached one) and its training data."""

    def __init__(self, config: RunConfig) -> None:
        device = torch.device("cpu")
        torch.manual_seed(0)  # LoRA's A and a fresh head are drawn from the global generator
        base, tokenizer, fresh = load_base_model(config.model, config.model.labels, device)
        self.model = attach_lora(base, config.lora, config.model.task, fresh)
        self.task = config.model.task
        self.pad = int(tokenizer.pad_token_id)
        handle = ModelHandle(model=self.model, tokenizer=tokenizer, device=device)
        identity = hospital_identity(NodeSettings(partition_id=0), config.data)
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
        """`count` examples, as many different lengths as the data has: the batch is padded."""
        by_length: dict[int, Any] = {}
        for feature in self.features:
            by_length.setdefault(len(feature["input_ids"]), feature)
        lengths = sorted(by_length)
        picks = np.linspace(0, len(lengths) - 1, min(count, len(lengths))).round().astype(int)
        chosen = [by_length[lengths[i]] for i in picks]
        chosen += [f for f in self.features if all(f is not c for c in chosen)][
            : count - len(chosen)
        ]
        assert len({len(f["input_ids"]) for f in chosen}) >= min(count, 4), "too few lengths"
        return chosen

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
    put in training mode; a Linear computes the same in both modes. The root's own flag is
    set too (not its children's): Opacus refuses a root module in evaluation mode.
    """
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    model.training = True


def _reference_grads(setup: Setup, features: list[Any]) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient on its own (a batch of one: no padding at all)."""
    setup.model.eval()  # no dropout; requires_grad is untouched
    grads = []
    for feature in features:
        setup.model.zero_grad(set_to_none=True)
        setup.loss(setup.model, [feature]).backward()
        grads.append({n: torch.clone(p.grad) for n, p in setup.trainable().items()})  # type: ignore[arg-type]
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
            grad_sample = getattr(parameter, "grad_sample", None)
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
            norms = parameter._norm_sample  # type: ignore[attr-defined]
            error = _relative_error(norms, per_example)
            assert error <= 1e-4, f"ghost: norm of {name}: relative error {error:.2e}"
        total = torch.stack(
            [torch.cat([g.flatten() for g in reference.values()]).norm() for reference in expected]
        )
        error = _relative_error(wrapped.get_norm_sample(), total)
        assert error <= 1e-4, f"ghost: total per-example norm: relative error {error:.2e}"
    finally:
        wrapped._close()
        setup.model.zero_grad(set_to_none=True)
    _no_opacus_leftovers(setup.model)


# ---- 2. σ = 0, C = ∞: a DP step is the non-DP step ----------------------------------------


def _snapshot(setup: Setup) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in setup.trainable().items()}


def _restore(setup: Setup, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in setup.trainable().items():
            parameter.copy_(state[name])


def _batches(setup: Setup, features: list[Any], batch_size: int) -> DataLoader[Any]:
    return DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda items: collate(items, setup.pad),
    )


@pytest.mark.parametrize("mode", MODES)
def test_dp_step_without_noise_or_clipping_is_the_non_dp_step(setup: Setup, mode: str):
    features = setup.mixed_lengths(8)
    start = _snapshot(setup)
    criterion = PerExampleLoss(setup.task)
    _deterministic_training_mode(setup.model)

    plain = torch.optim.SGD(list(setup.trainable().values()), lr=0.1)
    for batch in _batches(setup, features, 4):
        plain.zero_grad(set_to_none=True)
        criterion(setup.model(**model_inputs(batch)).logits, batch["labels"]).backward()
        plain.step()
    expected = _snapshot(setup)
    assert any(not torch.equal(expected[n], start[n]) for n in start), "SGD did not move"

    _restore(setup, start)
    setup.model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(list(setup.trainable().values()), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # secure_mode off: irrelevant here
        prepared = PrivacyEngine(accountant="rdp").make_private(
            module=setup.model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=_batches(setup, features, 4),
            noise_multiplier=0.0,
            max_grad_norm=1e6,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
    if mode == "ghost":
        private_model, private_optimizer, dp_criterion, loader = prepared
    else:
        (private_model, private_optimizer, loader), dp_criterion = prepared, criterion
    try:
        steps = 0
        for batch in loader:
            private_optimizer.zero_grad(set_to_none=True)
            dp_criterion(private_model(**model_inputs(batch)).logits, batch["labels"]).backward()
            private_optimizer.step()
            steps += 1
        assert steps == 2
    finally:
        private_model._close()
        for parameter in setup.model.parameters():  # the DP optimizer's own buffer
            if hasattr(parameter, "summed_grad"):
                del parameter.summed_grad
    for name, value in _snapshot(setup).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    _no_opacus_leftovers(setup.model)


def _training_loss(setup: Setup) -> float:
    setup.model.eval()
    with torch.no_grad():
        return float(setup.loss(setup.model, setup.features))


def _plan(
    setup: Setup, settings: TrainSettings, mode: str, sigma: float, clip: float, **changes: Any
) -> DPPlan:
    values: dict[str, Any] = {
        "noise_multiplier": sigma,
        "max_grad_norm": clip,
        "sample_rate": poisson_sample_rate(settings.batch_size, len(setup.features)),
        "steps": settings.local_steps,
        "grad_sample_mode": mode,
        "max_physical_batch_size": settings.batch_size,
    }
    values.update(changes)
    return DPPlan(**values)


def _train(setup: Setup, settings: TrainSettings, plan: DPPlan, seed: int = 3) -> Any:
    return train_privately(
        setup.model, setup.features, settings, plan, setup.pad, seed=seed, task=setup.task,
        patients=None)


@pytest.mark.parametrize("mode", MODES)
def test_train_privately_without_noise_lowers_the_training_loss(setup: Setup, mode: str):
    settings = TrainSettings(local_steps=6, learning_rate=1e-2, batch_size=8)
    before = _training_loss(setup)
    result = _train(setup, settings, _plan(setup, settings, mode, sigma=0.0, clip=1e6))
    after = _training_loss(setup)
    assert result.steps == 6
    assert np.isfinite(result.mean_loss)
    assert after < before - 0.01, f"{mode}: training loss {before:.4f} -> {after:.4f}"


# ---- 3. under DP only the adapter moves, and Opacus leaves nothing behind ------------------


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if "lora_" not in name and "modules_to_save" not in name
    }


@pytest.mark.parametrize("mode", MODES)
def test_dp_training_moves_only_the_adapter_and_leaves_the_model_clean(setup: Setup, mode: str):
    settings = TrainSettings(local_steps=2, learning_rate=1e-2, batch_size=8)
    plan = _plan(setup, settings, mode, sigma=1.0, clip=1.0)
    base = _base_state(setup.model)
    assert base, "no base weights found"
    adapters = [get_adapter(setup.model)]
    for round_seed in (3, 4):  # a second round on the same (cached) model object
        result = _train(setup, settings, plan, seed=round_seed)
        assert result.steps == 2
        _no_opacus_leftovers(setup.model)
        adapters.append(get_adapter(setup.model))
        changed = {
            name for name, value in adapters[-1].items()
            if not np.array_equal(value, adapters[-2][name])
        }
        assert any("lora_A" in name for name in changed), f"round {round_seed}: lora_A frozen"
        assert any("lora_B" in name for name in changed), f"round {round_seed}: lora_B frozen"
        if setup.task == "classify":
            assert any("classifier" in name for name in changed), "the head did not train"
    after = _base_state(setup.model)
    assert after.keys() == base.keys()
    moved = [name for name in base if not torch.equal(base[name], after[name])]
    assert not moved, f"frozen base weights changed: {moved[:5]}"


# ---- 4. the sampling rate the accountant assumes ---------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "num_examples"),
    [(1, 1), (8, 8), (8, 9), (8, 7), (16, 100), (32, 1000), (7, 50), (1, 93), (8, 737)],
)
def test_poisson_sample_rate_is_what_opacus_derives_from_the_loader(
    batch_size: int, num_examples: int
):
    loader: DataLoader[int] = DataLoader(range(num_examples), batch_size=batch_size)  # type: ignore[arg-type]
    assert poisson_sample_rate(batch_size, num_examples) == 1 / len(loader)


@pytest.fixture()
def bert_setup(classify_config: RunConfig) -> Setup:
    return Setup(classify_config)


def test_batches_are_poisson_sampled_at_the_rate_the_ledger_records(bert_setup: Setup):
    """Each example joins a batch with probability q: the mean batch is q·n, whatever q."""
    settings = TrainSettings(local_steps=60, batch_size=8)
    n = len(bert_setup.features)
    for rate in (0.1, 0.5):
        plan = _plan(bert_setup, settings, "hooks", sigma=1.0, clip=1.0, sample_rate=rate)
        result = _train(bert_setup, settings, plan)
        mean_batch = result.examples_seen / result.steps
        spread = 4 * (n * rate * (1 - rate) / result.steps) ** 0.5  # 4 standard errors
        assert abs(mean_batch - n * rate) < spread, (rate, mean_batch, n * rate)
        _no_opacus_leftovers(bert_setup.model)


def test_dp_noise_is_not_reproducible_from_the_seed_the_coordinator_knows(bert_setup: Setup):
    """Same data, same seed, same plan: the noise differs, so nobody can regenerate it."""
    settings = TrainSettings(local_steps=2, batch_size=8)
    plan = _plan(bert_setup, settings, "hooks", sigma=5.0, clip=1.0)
    start = get_adapter(bert_setup.model)
    deltas = []
    for _ in range(2):
        set_adapter(bert_setup.model, start)
        _train(bert_setup, settings, plan)
        after = get_adapter(bert_setup.model)
        deltas.append(np.concatenate([(after[k] - start[k]).ravel() for k in sorted(start)]))
    correlation = float(np.corrcoef(deltas[0], deltas[1])[0, 1])
    assert abs(correlation) < 0.5, correlation


def test_train_privately_accepts_the_correct_rate_for_every_dataset_size(bert_setup: Setup):
    settings = TrainSettings(local_steps=1, batch_size=1)
    features = (bert_setup.features * 2)[:93]  # 93 batches of one: 1/(1/93) = 92.999…
    plan = DPPlan(1.0, 1.0, poisson_sample_rate(1, 93), 1, "hooks", 1)
    result = train_privately(
        bert_setup.model, features, settings, plan, bert_setup.pad, seed=0, task="classify",
        patients=None)
    assert result.steps == 1


# ---- 5. logical steps when a logical batch is split into physical batches ---------------


class _StepCounter:
    """Counts the real (inner) optimizer's steps, i.e. parameter updates."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if type(optimizer) is torch.optim.AdamW:
            self.count += 1


def _counting_steps() -> Iterator[_StepCounter]:
    counter = _StepCounter()
    handle = register_optimizer_step_post_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()


step_counter = pytest.fixture(_counting_steps)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_split_logical_batches_take_exactly_the_planned_steps(
    setup: Setup, mode: str, step_counter: _StepCounter
):
    # 5 steps cross an epoch boundary of the Poisson loader (≈ 24–48 examples / 8).
    settings = TrainSettings(local_steps=5, learning_rate=1e-2, batch_size=8)
    plan = _plan(setup, settings, mode, sigma=1.0, clip=1.0, max_physical_batch_size=2)
    result = _train(setup, settings, plan)
    assert result.steps == plan.steps == 5
    assert step_counter.count == plan.steps
    assert result.examples_seen > plan.steps * 2, "logical batches were not reassembled"


def test_splitting_into_physical_batches_does_not_change_the_update(
    request, step_counter, monkeypatch
):
    """Same batches, σ = 0: splitting only changes the summation order (Llama: no dropout).

    The Poisson draws come from the OS's randomness in production; here they are pinned so
    both runs see the same batches.
    """
    import types

    import fedtune.client.dp_train as dp_train

    monkeypatch.setattr(dp_train, "secrets", types.SimpleNamespace(randbits=lambda bits: 1234))
    settings = TrainSettings(local_steps=4, learning_rate=1e-2, batch_size=8)
    adapters = []
    for physical in (8, 3):
        setup = Setup(_config(request, "instruct"))
        plan = _plan(setup, settings, "hooks", 0.0, 1e6, max_physical_batch_size=physical)
        assert _train(setup, settings, plan).steps == 4
        adapters.append(get_adapter(setup.model))
    assert step_counter.count == 8
    for name, value in adapters[0].items():
        np.testing.assert_allclose(adapters[1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
