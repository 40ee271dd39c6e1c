"""The training loss as a mean over examples of each example's own loss.

Hugging Face's causal-LM loss averages over all response tokens in a batch, so one example's
gradient is scaled by the *other* examples' token counts. Under DP-SGD that breaks the
per-example sensitivity bound (removing one patient would rescale everyone else's
contribution), so fedtune computes each example's loss on its own (mean over its response
tokens) and averages over examples — with and without DP, so the two paths train the same
objective.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class PerExampleLoss(nn.Module):
    """Cross-entropy per example; `reduction` is "mean" (over examples) or "none" ([B]).

    Opacus' ghost clipping sets `reduction = "none"` to get one loss per example.
    """

    def __init__(self, task: str, reduction: str = "mean") -> None:
        super().__init__()
        self.task = task
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "classify":
            per_example = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        else:
            per_example = _per_example_token_mean(logits, labels)
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        return per_example.mean()


def _per_example_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss per example, averaged over that example's response tokens.

    Prompt tuning puts its virtual tokens before the input, so the logits are longer than the
    labels by that many positions: the last `labels` positions are the input's."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:, :]
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counted = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counted


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels: the model returns logits, the loss is ours."""
    return {k: v for k, v in batch.items() if k != "labels"}
