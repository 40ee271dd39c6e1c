"""What FedProx and FFA-LoRA change in a hospital's local training, on the real PEFT models.

1. FedProx's pre-step hook is the same update as adding μ/2·‖w − w_global‖² to the loss
   (one optimizer step, SGD and AdamW; and whole rounds of `train_locally`), DP-SGD with
   σ = 0 and no clipping gives the same FedProx round (so the hook runs after Opacus), μ pulls
   the adapter toward w_global, and μ = 0 or another strategy is today's training, bit for bit.
2. FFA-LoRA leaves every A bit-identical (with and without DP) while B trains, restores
   requires_grad afterwards, and a hospital refuses a global adapter whose A is not the
   shared initial one it rebuilds from the seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny import replace_section

from fedtune.client.dp_train import DPPlan, train_privately
from fedtune.client.encoding import collate
from fedtune.client.federated_objectives import (
    LocalObjective,
    add_proximal_term,
    check_shared_lora_a,
    local_objective,
    objective_in_effect,
    shared_lora_a,
)
from fedtune.client.hospital import hospital_identity
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.client.node_settings import NodeSettings
from fedtune.client.session import ModelHandle, data_for
from fedtune.client.train import adapter_optimizer, train_locally
from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig, TrainSettings
from fedtune.core.errors import SharedInitMismatch
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import attach_lora, get_adapter, load_base_model, set_adapter

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


class Local:
    """A fresh tiny LoRA model (not the cached one), its training data, a generic start."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.task = config.model.task
        device = torch.device("cpu")
        torch.manual_seed(0)
        base, tokenizer, fresh = load_base_model(config.model, config.model.labels, device)
        self.model = attach_lora(base, config.lora, self.task, fresh)
        self.pad = int(tokenizer.pad_token_id)
        handle = ModelHandle(model=self.model, tokenizer=tokenizer, device=device)
        identity = hospital_identity(NodeSettings(partition_id=0), config.data)
        self.features: list[Any] = data_for(config, identity, handle).features["train"]
        # B = 0 at LoRA's init makes every gradient of A zero: start somewhere generic, as
        # the global adapter of a later round is.
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in self.trainable().values():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        self.start: Adapter = get_adapter(self.model)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self, features: list[Any]) -> torch.Tensor:
        batch = collate(features, self.pad)
        logits = self.model(**model_inputs(batch)).logits
        return PerExampleLoss(self.task)(logits, batch["labels"])

    def reset(self) -> None:
        set_adapter(self.model, self.start)
        self.model.zero_grad(set_to_none=True)


def _config(request: pytest.FixtureRequest, task: str, **federation: Any) -> RunConfig:
    name = "classify_config" if task == "classify" else "instruct_config"
    config: RunConfig = request.getfixturevalue(name)
    return replace_section(config, "federation", **federation) if federation else config


@pytest.fixture()
def llama(request: pytest.FixtureRequest) -> Local:
    """The causal model has no dropout anywhere (and LoRA dropout is 0): training is a
    deterministic function of the batches, which the equivalence tests need."""
    local = Local(_config(request, "instruct"))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in local.model.modules()), (
        "the equivalence tests need a model without dropout"
    )
    return local


@pytest.fixture(params=["classify", "instruct"])
def local(request: pytest.FixtureRequest) -> Local:
    return Local(_config(request, request.param))


def _max_difference(a: Adapter, b: Adapter) -> float:
    return max(float(np.abs(a[n] - b[n]).max()) for n in a)


def _distance(a: Adapter, b: Adapter) -> float:
    return float(np.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a)))


def _assert_close(actual: Adapter, expected: Adapter, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=atol, err_msg=name)


def _relative_error(actual: Adapter, expected: Adapter, start: Adapter) -> float:
    """‖actual − expected‖ / ‖expected − start‖: how far off, relative to the whole round's
    update. Several Adam steps amplify float rounding (another summation order of the batch)
    on the few coordinates whose gradient is near zero, so element-wise tolerances would not
    hold; a missing proximal term is off by more than the whole update (checked)."""
    return _distance(actual, expected) / _distance(expected, start)


# ---- 1. FedProx ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_proximal_hook_step_is_the_step_on_the_proximal_loss(llama: Local, kind: str):
    mu, features = 2.0, llama.features[:8]
    params = list(llama.trainable().values())

    def optimizer() -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)

    def move_away() -> None:  # w ≠ w_global, else the proximal term is zero
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for parameter in params:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))

    llama.model.eval()  # no dropout; requires_grad is untouched
    anchor = [p.detach().clone() for p in params]

    def step(with_hook: bool, with_loss_term: bool) -> Adapter:
        llama.reset()
        opt = optimizer()
        handle = add_proximal_term(opt, mu) if with_hook else None  # anchored here
        move_away()
        opt.zero_grad(set_to_none=True)
        loss = llama.loss(features)
        if with_loss_term:
            loss = loss + mu / 2 * sum(
                ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
            )
        loss.backward()
        opt.step()
        if handle is not None:
            handle.remove()
        return get_adapter(llama.model)

    hooked = step(with_hook=True, with_loss_term=False)
    by_autograd = step(with_hook=False, with_loss_term=True)
    plain = step(with_hook=False, with_loss_term=False)
    _assert_close(hooked, by_autograd, atol=1e-7)
    assert _max_difference(plain, by_autograd) > 1e-4, "the proximal term made no difference"


def _reference_fedprox_round(local: Local, settings: TrainSettings, mu: float) -> Adapter:
    """`steps` full-batch AdamW steps on loss + μ/2·‖w − w_global‖², by plain autograd."""
    local.reset()
    local.model.eval()
    params = list(local.trainable().values())
    anchor = [p.detach().clone() for p in params]
    optimizer = adapter_optimizer(local.model, settings)
    for _ in range(settings.local_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = local.loss(local.features)
        loss = loss + mu / 2 * sum(
            ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
        )
        loss.backward()
        optimizer.step()
    return get_adapter(local.model)


def _full_batch_settings(local: Local, examples: int = 8, steps: int = 3) -> TrainSettings:
    """Every step one batch of all (a few: the tied vocabulary head is costly) examples."""
    local.features = local.features[:examples]
    return TrainSettings(local_steps=steps, learning_rate=1e-2, batch_size=examples)


def test_fedprox_round_without_dp_is_the_round_on_the_proximal_loss(llama: Local):
    mu = 2.0
    settings = _full_batch_settings(llama)
    expected = _reference_fedprox_round(llama, settings, mu)
    llama.reset()
    train_locally(llama.model, llama.features, settings, llama.pad, 5, llama.task,
                  objective=LocalObjective(proximal_mu=mu))
    fedprox = get_adapter(llama.model)
    llama.reset()
    train_locally(llama.model, llama.features, settings, llama.pad, 5, llama.task)
    plain = get_adapter(llama.model)
    error, effect = (_relative_error(x, expected, llama.start) for x in (fedprox, plain))
    assert error < 1e-3, f"FedProx round off by {error:.2e} of the update"
    assert effect > 0.5, f"μ changed the round by only {effect:.2e}: the test would be blind"


def _noiseless_full_batch_plan(local: Local, steps: int, mode: str) -> DPPlan:
    """σ = 0, a clip norm never reached and q = 1 (every example, every step): DP-SGD is
    then a plain full-batch step, deterministic."""
    n = len(local.features)
    return DPPlan(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, steps=steps,
                  grad_sample_mode=mode, max_physical_batch_size=n)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_fedprox_round_under_dp_without_noise_is_the_non_dp_fedprox_round(llama: Local, mode: str):
    mu = 2.0
    settings = _full_batch_settings(llama)
    expected = _reference_fedprox_round(llama, settings, mu)
    llama.reset()
    plan = _noiseless_full_batch_plan(llama, settings.local_steps, mode)
    result = train_privately(llama.model, llama.features, settings, plan, llama.pad, 5,
                             llama.task, objective=LocalObjective(proximal_mu=mu), patients=None)
    assert result.steps == settings.local_steps
    assert result.examples_seen == settings.local_steps * len(llama.features)
    error = _relative_error(get_adapter(llama.model), expected, llama.start)
    # Ghost clipping's second backward pass rounds differently: ~2e-3 here; a missing
    # proximal term is off by more than the whole update.
    assert error < 1e-2, f"{mode}: DP FedProx round off by {error:.2e} of the update"


def test_proximal_term_pulls_the_local_adapter_toward_the_global_one(local: Local):
    settings = TrainSettings(local_steps=8, learning_rate=1e-2, batch_size=8)
    distances = {}
    for mu in (0.0, 5.0):
        local.reset()
        train_locally(local.model, local.features, settings, local.pad, 5, local.task,
                      objective=LocalObjective(proximal_mu=mu))
        distances[mu] = _distance(get_adapter(local.model), local.start)
    assert distances[0.0] > 0
    assert distances[5.0] < 0.8 * distances[0.0], distances


def test_no_proximal_term_is_todays_training_bit_for_bit(request: pytest.FixtureRequest):
    for strategy, mu in (("fedprox", 0.0), ("fedavg", 0.5), ("fedadam", 0.5)):
        config = _config(request, "instruct", strategy=strategy, proximal_mu=mu)
        assert local_objective(config) is None, strategy
    assert local_objective(_config(request, "instruct", strategy="fedprox", proximal_mu=0.5)) == (
        LocalObjective(proximal_mu=0.5)
    )
    llama = Local(_config(request, "instruct"))
    settings = _full_batch_settings(llama, examples=8, steps=2)
    plan = _noiseless_full_batch_plan(llama, 2, "hooks")
    for train in ("plain", "dp"):
        adapters = []
        for objective in (None, LocalObjective(proximal_mu=0.0), None):
            llama.reset()
            if train == "plain":
                train_locally(llama.model, llama.features, settings, llama.pad, 5, llama.task,
                              objective=objective)
            else:
                train_privately(llama.model, llama.features, settings, plan, llama.pad, 5,
                                llama.task, objective=objective, patients=None)
            adapters.append(get_adapter(llama.model))
        assert _max_difference(adapters[0], llama.start) > 0, "training did not move"
        for other in adapters[1:]:
            assert all(np.array_equal(other[n], adapters[0][n]) for n in other), train


# ---- 2. FFA-LoRA ---------------------------------------------------------------------------


def _requires_grad(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_ffa_lora_trains_b_and_leaves_a_bit_identical(local: Local, dp: bool):
    settings = TrainSettings(local_steps=3, learning_rate=1e-2, batch_size=8)
    flags = _requires_grad(local.model)
    assert any("lora_A" in n and flag for n, flag in flags.items())
    objective = LocalObjective(freeze_lora_a=True)
    for seed in (5, 6):  # two rounds on the same (cached) model object
        before = get_adapter(local.model)
        if dp:  # real noise: a single noisy step on A would show
            plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=3,
                          grad_sample_mode="hooks", max_physical_batch_size=8)
            train_privately(local.model, local.features, settings, plan, local.pad, seed,
                            local.task, objective=objective, patients=None)
        else:
            train_locally(local.model, local.features, settings, local.pad, seed, local.task,
                          objective=objective)
        after = get_adapter(local.model)
        a_names = [n for n in after if ".lora_A." in n]
        b_names = [n for n in after if ".lora_B." in n]
        assert a_names and b_names
        for name in a_names:
            assert after[name].tobytes() == before[name].tobytes(), f"{name} moved"
        assert all(not np.array_equal(after[n], before[n]) for n in b_names), "a B did not train"
        if local.task == "classify":
            head = [n for n in after if "classifier" in n]
            assert head and any(not np.array_equal(after[n], before[n]) for n in head)
        assert _requires_grad(local.model) == flags, "requires_grad not restored"
        for parameter in local.model.parameters():
            assert getattr(parameter, "grad_sample", None) is None


def test_objective_restores_requires_grad_when_training_fails(llama: Local):
    flags = _requires_grad(llama.model)
    seen: list[int] = []

    def make_optimizer() -> torch.optim.Optimizer:
        seen.append(len(llama.trainable()))
        return adapter_optimizer(llama.model, TrainSettings())

    ffa = LocalObjective(freeze_lora_a=True)
    with (
        pytest.raises(RuntimeError, match="boom"),
        objective_in_effect(llama.model, ffa, make_optimizer),
    ):
        assert not any(".lora_A." in n for n in llama.trainable())
        raise RuntimeError("boom")
    assert seen and seen[0] < sum(flags.values()), "A was not frozen before the optimizer"
    assert _requires_grad(llama.model) == flags


def test_the_shared_initial_a_is_rebuilt_identically_and_a_changed_a_is_refused(
    request: pytest.FixtureRequest,
):
    config = _config(request, "classify", strategy="ffa-lora")
    first, second = initial_global_adapter(config), initial_global_adapter(config)
    assert first.keys() == second.keys()
    assert all(first[n].tobytes() == second[n].tobytes() for n in first), "not deterministic"
    assert local_objective(config) == LocalObjective(freeze_lora_a=True)

    rng = torch.get_rng_state()
    check_shared_lora_a(first, config)  # builds and caches
    assert torch.equal(torch.get_rng_state(), rng), "the check changed the global RNG state"
    assert shared_lora_a(config) is shared_lora_a(config), "not cached"

    b_name = next(n for n in first if ".lora_B." in n)
    trained_b = {**first, b_name: first[b_name] + 1.0}
    check_shared_lora_a(trained_b, config)  # B (and heads) may change every round

    a_name = sorted(n for n in first if ".lora_A." in n)[1]
    changed = {n: v.copy() for n, v in first.items()}
    changed[a_name].flat[0] = np.nextafter(changed[a_name].flat[0], np.float32(np.inf))
    with pytest.raises(SharedInitMismatch, match=a_name.replace(".", r"\.")):
        check_shared_lora_a(changed, config)
    without = {n: v for n, v in first.items() if n != a_name}
    with pytest.raises(SharedInitMismatch, match="missing"):
        check_shared_lora_a(without, config)
    other_seed = replace_section(config, "train", seed=config.train.seed + 1)
    with pytest.raises(SharedInitMismatch):
        check_shared_lora_a(first, other_seed)
    # Other strategies train A: nothing to check.
    check_shared_lora_a(changed, replace_section(config, "federation", strategy="fedavg"))
