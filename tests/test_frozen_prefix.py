"""The frozen-layer cache (client.frozen_prefix): same training, frozen layers run once per example.

A 3-layer tiny BERT with LoRA on its last layer; dropout is off in the model so that cached
and uncached training must agree to float precision (with dropout, the cache's only
difference is that the frozen layers run without it, which is its documented behaviour).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import replace_section, save_tiny_bert, tiny_run_config

from fedtune.client.dp_train import DPPlan, train_privately
from fedtune.client.frozen_prefix import (
    EXAMPLE_INDEX,
    collate_indexed,
    first_adapted_layer,
    frozen_prefix_for,
    indexed,
)
from fedtune.client.hospital import HospitalIdentity
from fedtune.client.session import data_for, model_for
from fedtune.client.train import frozen_prefix_in_use, train_locally
from fedtune.core.config import ConfigError, RunConfig
from fedtune.core.model import attach_lora, get_adapter, load_base_model, set_adapter

LAST_LAYER = [f"encoder.layer.2.attention.self.{name}" for name in ("query", "key", "value")]


@pytest.fixture(scope="module")
def bert3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-3"), layers=3, dropout=0.0)


def _config(
    bert3_dir: Path, classify_data: tuple[Path, tuple[str, ...]], cache: bool, **lora: Any
) -> RunConfig:
    root, labels = classify_data
    return tiny_run_config(
        bert3_dir, "classify", root, labels,
        model={"pooling": "mean"},
        lora={"target_modules": LAST_LAYER, **lora},
        train={"cache_frozen_layers": cache, "batch_size": 8, "local_steps": 6},
    )


def _fresh(config: RunConfig) -> tuple[torch.nn.Module, list[Any], int]:
    base, tokenizer, fresh = load_base_model(config.model, config.model.labels, torch.device("cpu"))
    model = attach_lora(base, config.lora, "classify", fresh)
    data_file = Path(config.data.simulation_root) / "hospital-1.jsonl"
    identity = HospitalIdentity("hospital-1", data_file, simulated=True)
    features = data_for(config, identity, model_for(config)).features["train"]
    return model, list(features), int(tokenizer.pad_token_id)


def _rows_through_first_layer(model: torch.nn.Module) -> list[int]:
    """Records how many example rows each call of encoder layer 0 processed."""
    rows: list[int] = []
    layer = model.get_base_model().bert.encoder.layer[0]
    layer.register_forward_hook(lambda _m, args, _out: rows.append(int(args[0].shape[0])))
    return rows


def test_cached_forward_equals_the_full_forward(bert3_dir: Path, classify_data: Any) -> None:
    config = _config(bert3_dir, classify_data, cache=True)
    model, features, pad = _fresh(config)
    batch = collate_indexed(indexed(features)[:5], pad)
    rows = batch.pop(EXAMPLE_INDEX)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        prefix = frozen_prefix_for(model, features, pad)
        assert prefix is not None and prefix.start == 2
        with prefix.in_effect():
            assert len(model.get_base_model().bert.encoder.layer) == 1
            prefix.feed(rows, int(batch["input_ids"].shape[1]))
            cached = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            # A forward pass that was not fed its batch is refused, never run on stale states.
            with pytest.raises(RuntimeError, match="not fed the batch"):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(model.get_base_model().bert.encoder.layer) == 3  # restored
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(full, torch.zeros_like(full))


def test_training_with_the_cache_equals_training_without(
    bert3_dir: Path, classify_data: Any
) -> None:
    """Same adapter after two calls; the frozen layers saw each example once, not per step."""
    plain_config = _config(bert3_dir, classify_data, cache=False)
    cached_config = _config(bert3_dir, classify_data, cache=True)
    plain, features, pad = _fresh(plain_config)
    cached, _, _ = _fresh(cached_config)
    set_adapter(cached, get_adapter(plain))
    start = get_adapter(plain)
    plain_rows = _rows_through_first_layer(plain)
    cached_rows = _rows_through_first_layer(cached)
    for seed in (5, 6):  # two "rounds": the second reuses what the first computed
        train_locally(plain, features, plain_config.train, pad, seed, "classify")
        train_locally(cached, features, cached_config.train, pad, seed, "classify")
    after_plain, after_cached = get_adapter(plain), get_adapter(cached)
    for name in after_plain:
        torch.testing.assert_close(after_cached[name], after_plain[name], atol=1e-5, rtol=1e-4)
    assert any(not np.array_equal(after_plain[n], start[n]) for n in start)  # it did train
    steps = 2 * cached_config.train.local_steps
    assert sum(plain_rows) == steps * cached_config.train.batch_size
    prefix = frozen_prefix_for(cached, features, pad)
    assert prefix is not None
    assert sum(cached_rows) == prefix.computed() <= len(features)
    assert prefix.computed() < sum(plain_rows)


def test_dp_training_with_the_cache_equals_training_without(
    bert3_dir: Path, classify_data: Any
) -> None:
    """Every example in every batch (q = 1) and no noise: DP-SGD is deterministic, so the
    clipped per-example gradients through the cache must give the same adapter."""
    plain_config = _config(bert3_dir, classify_data, cache=False)
    cached_config = _config(bert3_dir, classify_data, cache=True)
    plain, features, pad = _fresh(plain_config)
    cached, _, _ = _fresh(cached_config)
    set_adapter(cached, get_adapter(plain))
    plan = DPPlan(noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0, steps=3,
                  grad_sample_mode="hooks", max_physical_batch_size=16)
    cached_rows = _rows_through_first_layer(cached)
    one = train_privately(plain, features, plain_config.train, plan, pad, 5, "classify",
                          patients=None)
    two = train_privately(cached, features, cached_config.train, plan, pad, 5, "classify",
                          patients=None)
    assert one.steps == two.steps == 3
    after_plain, after_cached = get_adapter(plain), get_adapter(cached)
    for name in after_plain:
        torch.testing.assert_close(after_cached[name], after_plain[name], atol=1e-5, rtol=1e-4)
    assert sum(cached_rows) == len(features)  # 3 steps over all examples, each computed once
    # With noise the cached path trains too, and the model is plain again afterwards.
    noisy = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=2,
                   grad_sample_mode="hooks", max_physical_batch_size=4)
    before = get_adapter(cached)
    assert train_privately(cached, features, cached_config.train, noisy, pad, 6, "classify",
                           patients=None).steps
    assert any(not np.array_equal(before[n], get_adapter(cached)[n]) for n in before)
    assert not any(hasattr(p, "grad_sample") for p in cached.parameters())
    assert len(cached.get_base_model().bert.encoder.layer) == 3


def test_no_cache_where_an_adapter_sits_in_the_first_layer(
    bert3_dir: Path, classify_data: Any
) -> None:
    from fedtune.client import frozen_prefix

    config = _config(bert3_dir, classify_data, cache=True, target_modules=["query", "value"])
    model, features, pad = _fresh(config)
    assert first_adapted_layer(model, 3) == 0
    assert frozen_prefix_in_use(model, features, config.train, pad) is None
    assert not any(ref() is model for ref, _ in frozen_prefix._cache.values())  # nothing held
    # FFA-LoRA freezes A, which still changes the layer's output: it counts as adapted.
    last_layer_config = _config(bert3_dir, classify_data, cache=True)
    last, _, _ = _fresh(last_layer_config)
    for name, parameter in last.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(False)
    assert first_adapted_layer(last, 3) == 2
    off = replace_section(last_layer_config, "train", cache_frozen_layers=False)
    assert frozen_prefix_in_use(last, features, off.train, pad) is None


def test_cache_setting_is_checked(tiny_llama_dir: Path, instruct_data: Path) -> None:
    with pytest.raises(ConfigError, match="cache_frozen_layers = true is supported for model.task"):
        tiny_run_config(tiny_llama_dir, "instruct", instruct_data,
                        train={"cache_frozen_layers": True})


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_an_empty_draw_is_a_noise_only_step_and_the_next_batch_stays_whole(
    bert3_dir: Path, classify_data: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Poisson draws forced to: empty, then every example (split into 3 physical batches).

    The empty draw must still add noise (the mechanism the accountant analyses), and the
    next logical batch must be one update over all its examples, not its first piece."""
    from fedtune.client.dp_train import LengthSortedPoissonSampler

    config = _config(bert3_dir, classify_data, cache=False)
    model, features, pad = _fresh(config)
    draws = [[], list(range(len(features)))]
    monkeypatch.setattr(LengthSortedPoissonSampler, "__iter__", lambda _self: iter(draws))
    noise_only = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1,
                        grad_sample_mode=mode, max_physical_batch_size=4)
    before = get_adapter(model)
    result = train_privately(model, features, config.train, noise_only, pad, 5, "classify",
                             patients=None)
    assert result.steps == 1 and result.examples_seen == 0
    assert any(not np.array_equal(before[n], get_adapter(model)[n]) for n in before)
    plan = DPPlan(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        steps=2,
        grad_sample_mode="hooks",
        max_physical_batch_size=len(features) // 3 + 1,
    )
    result = train_privately(model, features, config.train, plan, pad, 6, "classify", patients=None)
    assert result.steps == 2
    assert result.examples_seen == len(features)  # one update over the whole second batch


def test_passes_and_accumulation_give_the_same_training(
    bert3_dir: Path, classify_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unequal passes (3 + 3 + 2 rows) inside accumulated micro-batches train like one pass."""
    import fedtune.client.train as train_module

    config = replace_section(
        _config(bert3_dir, classify_data, cache=False), "train", grad_accumulation=2
    )
    one_pass, features, pad = _fresh(config)
    passes, _, _ = _fresh(config)
    set_adapter(passes, get_adapter(one_pass))
    first = train_locally(one_pass, features, config.train, pad, 5, "classify")
    monkeypatch.setattr(train_module, "ROWS_PER_PASS", 3)
    second = train_locally(passes, features, config.train, pad, 5, "classify")
    assert second.mean_loss == pytest.approx(first.mean_loss, rel=1e-5)
    assert second.examples_seen == first.examples_seen == 6 * 2 * 8
    after_one, after_passes = get_adapter(one_pass), get_adapter(passes)
    for name in after_one:
        torch.testing.assert_close(after_passes[name], after_one[name], atol=1e-5, rtol=1e-4)


def test_unsupported_encoders_are_refused_and_a_dropped_model_frees_its_cache(
    bert3_dir: Path, classify_data: Any
) -> None:
    import gc

    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from fedtune.client import frozen_prefix

    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3))
    with pytest.raises(ConfigError, match="encoders of type bert, roberta.*'distilbert'"):
        frozen_prefix_for(distil, [], 0)
    model, features, pad = _fresh(_config(bert3_dir, classify_data, cache=True))
    frozen_prefix_for(model, features, pad)
    key = (id(model), id(features))
    assert key in frozen_prefix._cache
    del model
    gc.collect()
    assert key not in frozen_prefix._cache
