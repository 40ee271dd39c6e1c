"""Mean pooling and the label-name head (fedtune.core.pooling) on the real embedded MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import minilm_dir, tiny_run_config

from fedtune.core.config import ConfigError, ModelSettings
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import attach_lora, load_base_model, set_adapter
from fedtune.core.pooling import MaskedMeanPooler

LABELS = (
    "Diseases of the circulatory system",
    "Pregnancy, childbirth and the puerperium",
    "Injury, poisoning and certain other consequences of external causes",
)


def _settings(**values: object) -> ModelSettings:
    return ModelSettings(source=str(minilm_dir()), labels=LABELS, max_length=32, **values)


@torch.no_grad()
def test_mean_pooling_ignores_padding_and_gives_unit_vectors() -> None:
    model, tokenizer, _fresh = load_base_model(
        _settings(pooling="mean"), LABELS, torch.device("cpu")
    )
    model.eval()
    short = "Acute myocardial infarction"
    alone = tokenizer([short], return_tensors="pt")
    padded = tokenizer([short, "Fracture of the left femur, initial encounter for closed fracture"],
                       padding=True, return_tensors="pt")
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    one = model.bert(**alone).pooler_output[0]
    two = model.bert(**padded).pooler_output
    torch.testing.assert_close(one, two[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(two.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=1e-5)
    cls_model, _, _ = load_base_model(_settings(), LABELS, torch.device("cpu"))
    cls_model.eval()
    assert not torch.allclose(cls_model.bert(**alone).pooler_output[0], one, atol=1e-3)


def test_label_name_head_starts_as_a_classifier_of_the_label_names(tmp_path: Path) -> None:
    """Each chapter title, and a diagnosis from each chapter, gets its own label untrained."""
    config = tiny_run_config(minilm_dir(), "classify", tmp_path, labels=LABELS, model={
        "pooling": "mean", "head_init": "label-names", "max_length": 32})
    adapter = initial_global_adapter(config)
    heads = [name for name in adapter if "classifier" in name and name.endswith("weight")]
    assert heads, sorted(adapter)
    base, tokenizer, fresh = load_base_model(config.model, LABELS, torch.device("cpu"))
    model = attach_lora(base, config.lora, "classify", fresh)
    set_adapter(model, adapter)
    model.eval()
    texts = [*LABELS, "Unstable angina", "Preterm labor without delivery",
             "Laceration without foreign body of right hand, initial encounter"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=-1).tolist()
    assert predicted == [0, 1, 2, 0, 1, 2]
    random_start = initial_global_adapter(
        tiny_run_config(
            minilm_dir(), "classify", tmp_path, labels=LABELS, model={"pooling": "mean"}
        )
    )
    assert not all((random_start[n] == adapter[n]).all() for n in heads)


def test_pooling_and_head_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.pooling = 'max' is not one of: cls, mean"):
        _settings(pooling="max")
    with pytest.raises(ConfigError, match="head_init = 'label-names' needs model.pooling = 'mean'"):
        _settings(head_init="label-names")
    with pytest.raises(ConfigError, match="classify' only"):
        ModelSettings(task="instruct", pooling="mean")


def test_a_mask_from_another_batch_is_refused() -> None:
    pooler = MaskedMeanPooler()
    pooler.attention_mask = torch.ones(2, 5)
    with pytest.raises(RuntimeError, match="attention mask of shape"):
        pooler(torch.zeros(3, 5, 4))
