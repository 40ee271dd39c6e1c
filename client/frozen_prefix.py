"""Reusing the outputs of the encoder layers that LoRA does not touch.

Why: with LoRA on the last encoder layer only (what the DP classification experiment uses, so
that DP noise spreads over few weights), every training step still runs the five frozen
layers below it forward, and on a CPU that forward is most of a step's time
(`fedtune bench frozen-cache` times a DP round with and without this cache). Those layers' outputs
for one example never change: the base is frozen and no adapter weight sits below the first
adapted layer. So they are computed the first time an example is drawn and reused every
later time it is drawn, in this round and in later rounds run by the same process (the
simulation engine's workers, the in-process baselines). While the cache holds an example's
states it is not computed again, so a round with the cache never runs the frozen layers on
more examples than a round without it (the embeddings still run, and are discarded).

What changes, and why that is acceptable: the frozen layers then run in eval mode (no
dropout), because a reused output must be the same every time. Dropout in layers that
cannot adapt only perturbs their features; the adapted layers keep their dropout. Privacy is
untouched: each example's gradient is the same function of that example alone (so
per-example clipping still bounds it), batches are still drawn by the same Poisson sampler,
and the cached states never leave the process. Memory (host RAM, also for a model on a GPU):
one float32 vector per token of every example drawn, ≈ examples × tokens × hidden size × 4
bytes (2,000 ICD-10 descriptions on MiniLM: about 60 MB).

Supported: the classification task on encoders whose forward is embeddings → layers → pooler
and nothing else in between (SUPPORTED_MODEL_TYPES); others are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fedtune.client.encoding import collate
from fedtune.core.config import ConfigError

EXAMPLE_INDEX = "example_index"  # batch key: which training examples the rows are
# Encoders known to run embeddings → encoder.layer[0..n] → pooler with nothing in between
# (DeBERTa-v2, say, applies a convolution after its first layer: skipping layers would be
# silently wrong there).
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
_LAYER_INDEX = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_MAX_CACHED_SPLITS = 8  # local-only baselines hold one per hospital; a node holds one


class _PrefixDone(Exception):
    """Raised by a hook to stop the forward pass after the last frozen layer."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__("frozen prefix computed")
        self.states = states


class FrozenPrefix:
    """The states after the frozen layers, per training example, filled as examples are drawn."""

    def __init__(self, model: nn.Module, features: Sequence[Any], pad_token_id: int) -> None:
        self.encoder: Any = encoder_of(model)  # attribute access below is duck-typed
        self.layers: nn.ModuleList = self.encoder.encoder.layer
        self.start = first_adapted_layer(model, len(self.layers))
        self.features = features
        self.pad_token_id = pad_token_id
        self.states: list[torch.Tensor | None] = [None] * len(features)
        self._current: torch.Tensor | None = None
        self._active = False  # True while `in_effect`: the embeddings' output is replaced

    def computed(self) -> int:
        """How many examples' states are held (for tests and logs)."""
        return sum(state is not None for state in self.states)

    @torch.no_grad()
    def _compute(self, indices: list[int]) -> None:
        """Run embeddings + frozen layers (eval mode) on these examples and keep each one's rows."""
        batch = collate([self.features[i] for i in indices], self.pad_token_id)
        device = next(self.encoder.parameters()).device
        last_frozen = self.layers[self.start - 1]

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            raise _PrefixDone(output[0] if isinstance(output, tuple) else output)

        modes = [(module, module.training) for module in self._frozen_modules()]
        handle = last_frozen.register_forward_hook(stop)
        try:
            for module, _ in modes:
                module.eval()
            self.encoder(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
        except _PrefixDone as done:
            states = done.states.detach()
        else:  # pragma: no cover - the hook always fires when the encoder runs its layers
            raise RuntimeError("the encoder returned without running its frozen layers")
        finally:
            handle.remove()
            for module, training in modes:
                module.train(training)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, index in enumerate(indices):
            self.states[index] = states[row, : int(lengths[row])].to("cpu", copy=True)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.encoder.embeddings, *self.layers[: self.start]]

    def feed(self, indices: torch.Tensor, width: int) -> None:
        """Make the next forward pass start from these examples' states, padded to `width`."""
        wanted = [int(i) for i in indices.tolist()]
        missing = [i for i in dict.fromkeys(wanted) if self.states[i] is None]
        if missing:
            with self._full_encoder():
                self._compute(missing)
        first = self.states[wanted[0]]
        assert first is not None
        padded = first.new_zeros((len(wanted), width, first.shape[-1]))
        for row, index in enumerate(wanted):
            state = self.states[index]
            assert state is not None
            padded[row, : state.shape[0]] = state
        self._current = padded

    @contextlib.contextmanager
    def _full_encoder(self) -> Iterator[None]:
        """The original layer list, without the replacement hook (to compute new states)."""
        reduced = self.encoder.encoder.layer
        self.encoder.encoder.layer = self.layers
        active, self._active = self._active, False
        try:
            yield
        finally:
            self.encoder.encoder.layer = reduced
            self._active = active

    @contextlib.contextmanager
    def in_effect(self) -> Iterator[FrozenPrefix]:
        """During training: the encoder runs only the adapted layers, on the fed states."""
        original = self.encoder.encoder.layer

        def replace(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if not self._active:
                return output
            if self._current is None or self._current.shape[:2] != output.shape[:2]:
                raise RuntimeError(
                    "the frozen-layer cache was not fed the batch the model is running on"
                )
            states, self._current = self._current, None
            return states.to(device=output.device, dtype=output.dtype)

        handle = self.encoder.embeddings.register_forward_hook(replace)
        try:
            self.encoder.encoder.layer = nn.ModuleList(list(original)[self.start :])
            self._active = True
            yield self
        finally:
            self._active = False
            self._current = None
            handle.remove()
            self.encoder.encoder.layer = original


def encoder_of(model: nn.Module) -> Any:
    """The BERT-style encoder inside a (PEFT-wrapped) sequence classifier, or a clear error."""
    get_base: Any = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or encoder is None
        or getattr(encoder, "embeddings", None) is None
        or layers is None
    ):
        raise ConfigError(
            "train.cache_frozen_layers = true is supported for encoders of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; this model is {model_type!r}. "
            "Set train.cache_frozen_layers = false."
        )
    return encoder


def first_adapted_layer(model: nn.Module, num_layers: int) -> int:
    """Index of the first encoder layer holding an adapter or trainable weight.

    Frozen LoRA weights count too (FFA-LoRA freezes A, which still changes the output), and
    so does any adapter weight before the layers (embeddings): then nothing can be reused.
    """
    first = num_layers
    for name, parameter in model.named_parameters():
        if not (parameter.requires_grad or "lora_" in name or "modules_to_save" in name):
            continue
        match = _LAYER_INDEX.search(name)
        if match:
            first = min(first, int(match.group(1)))
        elif ".embeddings." in name or name.startswith("embeddings."):
            return 0
    return first


_cache: OrderedDict[tuple[int, int], tuple[weakref.ref[nn.Module], FrozenPrefix]] = OrderedDict()


def frozen_prefix_for(
    model: nn.Module, features: Sequence[Any], pad_token_id: int
) -> FrozenPrefix | None:
    """The process's cache for this model and this list of training examples, or None when
    an adapter weight sits in the first layer (nothing to reuse, nothing held).

    The same list object (``client.session.data_for`` keeps one per hospital file) gets the
    same cache in every round; a new model or a re-read file gets a new one.
    """
    key = (id(model), id(features))
    entry = _cache.get(key)
    if entry is not None:
        model_ref, prefix = entry
        if model_ref() is model and prefix.features is features:
            _cache.move_to_end(key)
            return prefix
    prefix = FrozenPrefix(model, features, pad_token_id)
    if prefix.start == 0:
        return None
    # The entry holds the encoder; drop it as soon as the model itself is gone (a new run).
    weakref.finalize(model, _cache.pop, key, None)
    _cache[key] = (weakref.ref(model), prefix)
    while len(_cache) > _MAX_CACHED_SPLITS:
        _cache.popitem(last=False)
    return prefix


def indexed(features: Sequence[Any]) -> list[tuple[int, Any]]:
    """The training examples with their positions, so a batch can say which rows it holds."""
    return list(enumerate(features))


def collate_indexed(items: Sequence[tuple[int, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus the examples' positions under EXAMPLE_INDEX."""
    batch = collate([feature for _, feature in items], pad_token_id)
    batch[EXAMPLE_INDEX] = torch.tensor([index for index, _ in items], dtype=torch.long)
    return batch
