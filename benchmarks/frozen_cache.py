"""Frozen-layer cache: one hospital's DP round with and without `train.cache_frozen_layers`.

Backs the speed-up claimed for `client.frozen_prefix`. Setting: the classification
experiment of record (`simulations/medical_classification.toml`: MiniLM, mean pooling, LoRA
on the last layer, 8 DP-SGD steps of 512 Poisson-sampled examples), one hospital's training
split of its partition, σ = 1. Measured in one process, side by side: a round without the
cache, then two rounds with it (the first computes each drawn example's frozen-layer
output, the second reuses them, as a simulation worker or the in-process baselines do from
their second round on). Physical batches are length-sorted in every case (always on).
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.benchmarks.runner import BenchResult
from fedtune.client.dp_train import DPPlan, poisson_sample_rate, train_privately
from fedtune.client.frozen_prefix import frozen_prefix_for
from fedtune.client.hospital import HospitalIdentity
from fedtune.client.session import data_for, model_for
from fedtune.core.config import TrainSettings
from fedtune.core.model import get_adapter, set_adapter
from fedtune.simulations.experiment import load_experiment
from fedtune.simulations.sweep import _prepare_data, plan_runs, run_config_for

EXPERIMENT = Path("simulations/medical_classification.toml")


def bench_frozen_cache(work_dir: Path) -> BenchResult:
    """Seconds per DP round: no cache, cache filling, cache reused."""
    experiment = load_experiment(EXPERIMENT)
    spec = next(s for _point, s in plan_runs(experiment) if s.arm == "federated-dp")
    data_dir = _prepare_data(experiment, spec, work_dir, lambda _line: None)
    cached = run_config_for(experiment, spec, data_dir, work_dir / "run")
    plain = cached.with_overrides(train={"cache_frozen_layers": False})
    handle = model_for(cached)  # same model either way (the setting is not part of it)
    identity = HospitalIdentity("hospital-1", data_dir / "hospital-1.jsonl", simulated=True)
    features = data_for(cached, identity, handle).features["train"]
    pad = int(handle.tokenizer.pad_token_id)
    settings = cached.train
    plan = DPPlan(
        noise_multiplier=1.0, max_grad_norm=cached.privacy.max_grad_norm,
        sample_rate=poisson_sample_rate(settings.batch_size, len(features)),
        steps=settings.local_steps, grad_sample_mode=cached.privacy.grad_sample_mode,
        max_physical_batch_size=cached.privacy.max_physical_batch_size,
    )
    start = get_adapter(handle.model)

    def one_round(config_train: TrainSettings, seed: int) -> float:
        set_adapter(handle.model, start)
        began = time.perf_counter()
        train_privately(handle.model, features, config_train, plan, pad, seed, "classify",
                        patients=None)
        return time.perf_counter() - began

    one_round(plain.train, 0)  # warm-up: first use of the model's kernels
    no_cache = one_round(plain.train, 1)
    filling = one_round(settings, 2)
    prefix = frozen_prefix_for(handle.model, features, pad)
    assert prefix is not None  # LoRA sits on the last layer only in this experiment
    computed = prefix.computed()  # by the first round
    reused = one_round(settings, 3)
    numbers: dict[str, float | str] = {
        "frozen_cache_round_s_without": no_cache,
        "frozen_cache_round_s_first": filling,
        "frozen_cache_round_s_reused": reused,
        "frozen_cache_speedup_reused": no_cache / reused,
    }
    markdown = f"""## Frozen-layer cache (`fedtune bench frozen-cache`)

One hospital of `{EXPERIMENT}` ({len(features)} training examples, MiniLM, LoRA on
{", ".join(cached.lora.target_modules)}), one DP round = {plan.steps} DP-SGD
steps, Poisson rate q = {plan.sample_rate:.3f} (≈ {plan.sample_rate * len(features):.0f}
examples per step), physical batches of ≤ {plan.max_physical_batch_size}, σ = 1. Seconds
per round, measured one after the other in one process (after a warm-up round):

| round | seconds | vs no cache |
|---|---|---|
| no cache (`train.cache_frozen_layers = false`) | {no_cache:.1f} | 1.00 |
| cache, first round (computes the {computed} examples drawn) | {filling:.1f} | \
{no_cache / filling:.2f}× faster |
| cache, a later round (reuses them) | {reused:.1f} | {no_cache / reused:.2f}× faster |

The frozen layers are five of MiniLM's six; what is left per step is the last layer's
forward and backward, Opacus' per-example gradients and the head.
"""
    return BenchResult(numbers=numbers, markdown=markdown)
