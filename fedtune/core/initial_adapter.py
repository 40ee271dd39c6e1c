"""The round-0 global adapter, made by the coordinator so every hospital starts equal.

LoRA's A matrices are random and B is zero, so the initial adapter leaves the base model's
outputs unchanged; freshly initialized heads (e.g. a classifier on an encoder) travel in the
adapter too, and with ``model.head_init = "label-names"`` the head starts as a cosine
classifier on the label names (`fedtune.core.pooling`). Seeding before building makes the initial
adapter reproducible for a seed.
"""

from __future__ import annotations

import dataclasses

import torch

from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.model import attach_adapter, get_adapter, load_base_model
from fedtune.core.pooling import init_head_from_label_names


def initial_global_adapter(config: RunConfig) -> Adapter:
    """Build the base model on the CPU once and return its freshly initialized adapter."""
    torch.manual_seed(config.train.seed)
    cpu_settings = dataclasses.replace(config.model, device="cpu", load_in_4bit=False)
    base, tokenizer, fresh = load_base_model(
        cpu_settings, config.model.labels, torch.device("cpu")
    )
    if config.model.head_init == "label-names":
        init_head_from_label_names(base, tokenizer, config.model.labels, config.model.max_length)
    model = attach_adapter(base, config.adapter, config.lora, config.model.task, fresh)
    return get_adapter(model)
