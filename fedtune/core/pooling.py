"""Mean pooling and a label-name head for encoder classifiers.

Why: the embedded MiniLM is a sentence-embedding model, trained so that the *mean* of its
token states (L2-normalized) places texts of similar meaning close together. Hugging Face's
sequence classifier instead reads the first token through a dense + tanh pooler that this
model never trained for that purpose. Measured on ICD-10-CM chapters (21 classes, frozen
encoder, linear head): see `fedtune bench pooling` in benchmarks/RESULTS.md.

Mean-pooled, normalized features also give a head that needs no training data to start: a
cosine classifier whose rows are the label names' own embeddings (well above the 1/21 of a
fresh head before any training; measured by the same benchmark). Label names are part of the run's
configuration, not patient data, so this start costs no privacy budget; under DP, where
every step is noisy, a better start is worth many steps.

The pooler has no weights, so nothing about it travels or is trained; it reads the
attention mask that the encoder was called with, captured by a forward pre-hook (BERT-style
encoders hand their pooler only the token states).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from fedtune.core.config import ConfigError

# logits = scale · cos(text, label): with cosines in [-1, 1] a scale of 20 gives a softmax
# peaked enough to learn from; 10 did about as well and 40 worse in exploratory DP runs on
# frozen features (not a recorded benchmark). `fedtune bench pooling` measures this start.
LABEL_HEAD_SCALE = 20.0


class MaskedMeanPooler(nn.Module):
    """Mean of the token states where the attention mask is 1, then L2-normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None:  # called without a mask: every token is real, as in the encoder
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        elif tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            # Never average over a mask of another batch: that would be a silent wrong answer.
            raise RuntimeError(
                f"mean pooling got an attention mask of shape {tuple(mask.shape)} for token "
                f"states of shape {tuple(hidden_states.shape[:2])}; the encoder was called "
                "in a way fedtune does not support"
            )
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        summed = (hidden_states * weights).sum(dim=1)
        pooled = summed / weights.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)


def use_mean_pooling(model: PreTrainedModel) -> None:
    """Replace the encoder's pooler by `MaskedMeanPooler`, in place (before LoRA is attached)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ConfigError(
            f"model.pooling = 'mean' is supported for BERT-style encoders with a pooler; "
            f"{getattr(model.config, 'model_type', type(model).__name__)!r} has none. "
            "Use model.pooling = 'cls'."
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def capture_mask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.attention_mask = mask

    encoder.register_forward_pre_hook(capture_mask, with_kwargs=True)


def classifier_head(model: PreTrainedModel, num_labels: int) -> nn.Linear:
    """The Linear layer that maps the pooled vector to the labels."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != num_labels:
        raise ConfigError(
            "model.head_init = 'label-names' needs a classifier head that is one Linear layer "
            f"onto the labels; {getattr(model.config, 'model_type', '?')!r} does not have one. "
            "Use model.head_init = 'random'."
        )
    return head


@torch.no_grad()
def init_head_from_label_names(
    model: PreTrainedModel, tokenizer: Any, labels: Sequence[str], max_length: int
) -> None:
    """Set the head to LABEL_HEAD_SCALE × the label names' mean-pooled embeddings, bias 0."""
    head = classifier_head(model, len(labels))
    encoder = getattr(model, model.base_model_prefix)
    if not isinstance(encoder.pooler, MaskedMeanPooler):
        raise ConfigError("model.head_init = 'label-names' needs model.pooling = 'mean'.")
    device = head.weight.device
    batch = tokenizer(
        list(labels), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = encoder.training
    encoder.eval()
    embeddings = encoder(**batch, return_dict=True).pooler_output
    encoder.train(was_training)
    head.weight.copy_(LABEL_HEAD_SCALE * embeddings.to(head.weight.dtype))
    head.bias.zero_()
