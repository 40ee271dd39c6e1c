"""Length-sorted passes and Poisson batches: less padding, the same examples and gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from tiny import save_tiny_bert, tiny_run_config

from fedtune.client.dp_train import LengthSortedPoissonSampler
from fedtune.client.frozen_prefix import EXAMPLE_INDEX, collate_indexed
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.client.train import length_sorted_passes
from fedtune.core.model import attach_lora, load_base_model

LABELS = ("a", "b", "c")


def _features(lengths: list[int]) -> list[dict[str, object]]:
    return [
        {"input_ids": [101 + (i + j) % 50 for j in range(n)], "attention_mask": [1] * n,
         "labels": i % 3}
        for i, n in enumerate(lengths)
    ]


def test_passes_hold_every_row_once_each_cut_to_its_longest_example() -> None:
    lengths = [3, 17, 5, 9, 2, 30, 4, 11, 8, 6]
    batch = collate_indexed(list(enumerate(_features(lengths))), pad_token_id=0)
    passes = list(length_sorted_passes(batch, rows_per_pass=4))
    assert [len(p[EXAMPLE_INDEX]) for p in passes] == [4, 3, 3]
    seen = [int(i) for p in passes for i in p[EXAMPLE_INDEX]]
    assert sorted(seen) == list(range(len(lengths)))
    assert [lengths[i] for i in seen] == sorted(lengths)  # shortest first
    for part in passes:
        rows = part[EXAMPLE_INDEX].tolist()
        assert part["input_ids"].shape[1] == max(lengths[i] for i in rows)
        for row, index in enumerate(rows):  # every real token kept, in place
            assert (
                part["input_ids"][row, : lengths[index]].tolist()
                == _features(lengths)[index]["input_ids"]
            )
            assert int(part["labels"][row]) == index % 3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, int]:
    path = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-sort"), dropout=0.0)
    config = tiny_run_config(path, "classify", tmp_path_factory.mktemp("d"), LABELS)
    base, tok, fresh = load_base_model(config.model, LABELS, torch.device("cpu"))
    return attach_lora(base, config.lora, "classify", fresh), int(tok.pad_token_id)


def _gradient(model: torch.nn.Module, parts: list[dict[str, torch.Tensor]], total: int) -> dict:
    model.zero_grad(set_to_none=True)
    criterion = PerExampleLoss("classify")
    for part in parts:
        part = {k: v for k, v in part.items() if k != EXAMPLE_INDEX}
        logits = model(**model_inputs(part)).logits
        (criterion(logits, part["labels"]) * part["input_ids"].shape[0] / total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_passes_give_the_gradient_of_the_whole_batch(model: tuple[torch.nn.Module, int]) -> None:
    network, pad = model
    network.train()
    lengths = [3, 17, 5, 9, 2, 30, 4, 11, 8, 6, 12, 7]
    batch = collate_indexed(list(enumerate(_features(lengths))), pad)
    whole = _gradient(network, [batch], len(lengths))
    split = _gradient(network, list(length_sorted_passes(batch, 5)), len(lengths))
    assert whole and whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4)


def test_poisson_batches_are_the_same_draws_listed_by_length() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    plain = UniformWithReplacementSampler(
        num_samples=200, sample_rate=0.1, generator=torch.Generator().manual_seed(3)
    )
    sorted_sampler = LengthSortedPoissonSampler(
        lengths=lengths, sample_rate=0.1, generator=torch.Generator().manual_seed(3)
    )
    assert isinstance(sorted_sampler, UniformWithReplacementSampler)  # what Opacus expects
    pairs = list(zip(plain, sorted_sampler, strict=True))
    assert len(pairs) == 10
    for drawn, listed in pairs:
        assert sorted(drawn) == sorted(listed)
        assert [lengths[i] for i in listed] == sorted(lengths[i] for i in drawn)
    assert any(drawn != listed for drawn, listed in pairs)


def test_dp_training_sees_length_sorted_physical_batches(
    model: tuple[torch.nn.Module, int], tmp_path: Path
) -> None:
    """Through Opacus' BatchMemoryManager, each physical batch is no wider than needed."""
    from fedtune.client.dp_train import DPPlan, train_privately
    from fedtune.core.config import TrainSettings

    network, pad = model
    widths: list[int] = []
    layer = network.get_base_model().bert.encoder.layer[0]
    handle = layer.register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    lengths = [2] * 40 + [30] * 4
    plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1,
                  grad_sample_mode="hooks", max_physical_batch_size=11)
    try:
        train_privately(network, _features(lengths), TrainSettings(local_steps=1), plan, pad, 1,
                        "classify", patients=None)
    finally:
        handle.remove()
    assert sorted(widths) == [2, 2, 2, 30]  # random order would pad almost every batch to 30
