"""Evaluation at a hospital: only the resulting numbers travel, never examples or outputs.

Classification reports loss, accuracy and macro-F1 (chapters are imbalanced, so accuracy
alone flatters a model that ignores rare classes). Generation reports the loss on response
tokens, its perplexity, and exact match of greedy answers on a capped number of examples
(generation is the slow part of evaluating on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.client.data import PromptResponse
from fedtune.client.encoding import collate, render_prompt


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    features: Sequence[Any],
    num_labels: int,
    batch_size: int,
    pad_token_id: int,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the given encoded examples."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, predictions, truths = 0.0, [], []
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]), pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        total_loss += float(output.loss) * int(batch["labels"].shape[0])
        predictions.extend(output.logits.argmax(dim=-1).tolist())
        truths.extend(batch["labels"].tolist())
    count = len(truths)
    return {
        "loss": total_loss / count,
        "accuracy": sum(p == t for p, t in zip(predictions, truths, strict=True)) / count,
        "macro-f1": macro_f1(predictions, truths, num_labels),
        "num-examples": float(count),
    }


def macro_f1(predictions: Sequence[int], truths: Sequence[int], num_labels: int) -> float:
    """Unweighted mean F1 over the labels that occur in the truth or the predictions."""
    scores = []
    for label in range(num_labels):
        tp = sum(p == label and t == label for p, t in zip(predictions, truths, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predictions, truths, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predictions, truths, strict=True))
        if tp + fp + fn == 0:
            continue  # label absent from this split: it says nothing about the model
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    features: Sequence[Any],
    examples: Sequence[PromptResponse],
    batch_size: int,
    generation_examples: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Response-token loss, perplexity, and exact match of greedy answers."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = int(tokenizer.pad_token_id)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        # HF averages over response tokens in the batch; weight by their count.
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(output.loss) * tokens
        total_tokens += tokens
    loss = total_loss / max(total_tokens, 1)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "num-examples": float(len(features)),
    }
    scored = list(examples[:generation_examples])
    if scored:
        hits = sum(
            _answer(model, tokenizer, example, max_new_tokens, device) == example.response.strip()
            for example in scored
        )
        metrics["exact-match"] = hits / len(scored)
    return metrics


def _answer(
    model: torch.nn.Module,
    tokenizer: Any,
    example: PromptResponse,
    max_new_tokens: int,
    device: torch.device,
) -> str:
    prompt = render_prompt(example, tokenizer)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)
    output = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text: str = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return text.strip()
