"""Turning a hospital's validated examples into token ids the model trains on.

Encoding returns plain python lists (one dict per example) so that datasets stay cheap to build
and inspect; ``collate`` pads a batch into tensors. Two tasks:

- classification: ``input_ids``, ``attention_mask`` and ``labels`` (one class id per example).
- generation (instruction / chat / completion): ``input_ids`` = prompt tokens + response tokens
  + EOS, and ``labels`` = -100 on the prompt so the loss (and hence what DP-SGD spends privacy
  on) is the response only. EOS is part of the response so the model learns to stop.

Prompt and response are tokenized separately and concatenated, so the prompt's tokens are
always an exact prefix of the training sequence and the boundary between "given" and "to
learn" cannot shift by a merged token. ``prompt_token_ids`` is the same function the
evaluator uses at generation time, so training and evaluation see identical prompts.

Truncation (sequences longer than ``max_length``): the prompt is cut first, at its end, so it
keeps its beginning (the instruction, which carries the task), but never below half of the
window; only then is the response cut at its end, so at least half of the window is response
(or the whole response if shorter). A cut response loses its EOS on purpose: the model must not
learn to stop mid-answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.client.data import LabeledText, PromptResponse

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and HF models) leave out of the loss."""

PROMPT_FLOOR_SHARE = 0.5
"""Truncation cuts the prompt first, but keeps this share of the window for it: an answer
without its question teaches nothing, a question without an answer teaches nothing either."""

# Without a chat template the prompt uses the widely known Alpaca-style headings; a system
# turn gets its own heading so it is not confused with the user's request.
_PLAIN_HEADINGS = {
    "system": "### System:",
    "user": "### Instruction:",
    "assistant": "### Response:",
}

logger = logging.getLogger(__name__)


class ClassificationFeatures(TypedDict):
    """One encoded classification example; ``labels`` is the class id."""

    input_ids: list[int]
    attention_mask: list[int]
    labels: int


class GenerationFeatures(TypedDict):
    """One encoded generation example; ``labels`` is -100 wherever no loss is wanted."""

    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]


def encode_classification(
    examples: Sequence[LabeledText],
    tokenizer: PreTrainedTokenizerBase,
    label_to_id: Mapping[str, int],
    max_length: int,
) -> list[ClassificationFeatures]:
    """Tokenize texts (truncated to ``max_length``) and map labels to the model's class ids."""
    _check_max_length(max_length)
    features: list[ClassificationFeatures] = []
    for example in examples:
        if example.label not in label_to_id:
            known = ", ".join(repr(label) for label in list(label_to_id)[:10])
            raise ValueError(
                f"line {example.line}: label {example.label!r} is not one of the model's labels "
                f"({known}); add it to the configured labels or fix the data"
            )
        encoded = tokenizer(example.text, truncation=True, max_length=max_length)
        features.append(
            ClassificationFeatures(
                input_ids=list(encoded["input_ids"]),
                attention_mask=list(encoded["attention_mask"]),
                labels=label_to_id[example.label],
            )
        )
    return features


def encode_generation(
    examples: Sequence[PromptResponse], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[GenerationFeatures]:
    """Tokenize prompt + response + EOS with the loss masked on the prompt (see module doc)."""
    _check_max_length(max_length)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            "the tokenizer has no end-of-sequence (EOS) token; generation fine-tuning needs one "
            "to teach the model where an answer stops. Set `eos_token` in tokenizer_config.json."
        )
    features: list[GenerationFeatures] = []
    truncated = 0
    for example in examples:
        prompt_ids = prompt_token_ids(example, tokenizer)
        response_ids = [*_token_ids(tokenizer, example.response, special=False), int(eos_id)]
        if len(prompt_ids) + len(response_ids) > max_length:
            truncated += 1
            prompt_ids, response_ids = _truncate(prompt_ids, response_ids, max_length)
        features.append(
            GenerationFeatures(
                input_ids=prompt_ids + response_ids,
                attention_mask=[1] * (len(prompt_ids) + len(response_ids)),
                labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
            )
        )
    if truncated:
        logger.warning(
            "%d of %d examples exceed max_length=%d tokens and were truncated; raise "
            "max_length if answers are being cut",
            truncated,
            len(examples),
            max_length,
        )
    return features


def render_prompt(example: PromptResponse, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text the model sees before its answer, at training and generation time.

    Chat/instruction prompts use the model's own chat template when it has one (the format it
    was instruction-tuned on), else a plain "### Instruction: ... ### Response:" layout;
    completion prompts are used verbatim because the hospital chose that exact text.
    """
    if example.prompt is not None:
        return example.prompt
    turns = example.messages or ()
    if _has_chat_template(tokenizer):
        conversation = [{"role": turn.role, "content": turn.content} for turn in turns]
        rendered = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template rendered {type(rendered).__name__}, expected text")
        return rendered
    blocks = [f"{_PLAIN_HEADINGS[turn.role]}\n{turn.content}" for turn in turns]
    return "\n\n".join([*blocks, _PLAIN_HEADINGS["assistant"]]) + "\n"


def prompt_token_ids(example: PromptResponse, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the rendered prompt, exactly as used in training.

    A chat template writes its own special tokens (BOS, turn markers) into the text, so they
    must not be added twice; a plain or completion prompt gets the tokenizer's usual ones
    (e.g. Llama's BOS).
    """
    special = example.prompt is not None or not _has_chat_template(tokenizer)
    return _token_ids(tokenizer, render_prompt(example, tokenizer), special=special)


def collate(
    features: Sequence[ClassificationFeatures] | Sequence[GenerationFeatures],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors; generation labels are padded with -100 (no loss).

    Right padding keeps position ids of real tokens unchanged, which is what training of both
    encoders and decoders expects (left padding is only needed for batched generation).
    """
    if not features:
        raise ValueError("cannot collate an empty batch")
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = torch.tensor(feature["attention_mask"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}

    label_values = [feature["labels"] for feature in features]
    if all(isinstance(label, int) for label in label_values):
        batch["labels"] = torch.tensor(label_values, dtype=torch.long)
        return batch
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, label in enumerate(label_values):
        if isinstance(label, int):
            raise TypeError("a batch mixes classification and generation examples")
        labels[row, : len(label)] = torch.tensor(label, dtype=torch.long)
    batch["labels"] = labels
    return batch


def _truncate(
    prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Fit prompt + response into ``max_length``: prompt end first, then response end."""
    prompt_floor = min(len(prompt_ids), int(max_length * PROMPT_FLOOR_SHARE))
    response_keep = min(len(response_ids), max_length - prompt_floor)
    prompt_keep = min(len(prompt_ids), max_length - response_keep)
    return prompt_ids[:prompt_keep], response_ids[:response_keep]


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    """Token ids of ``text``; with ``special``, only the special tokens the tokenizer *prepends*.

    Some tokenizers append EOS or [SEP]; at the end of a prompt that would teach the model to
    stop before answering, so appended special tokens are dropped.
    """
    plain = [int(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not special:
        return plain
    decorated = [int(token) for token in tokenizer(text, add_special_tokens=True)["input_ids"]]
    for start in range(len(decorated) - len(plain) + 1):
        if decorated[start : start + len(plain)] == plain:
            return decorated[:start] + plain
    return plain


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do, base models don't)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _check_max_length(max_length: int) -> None:
    """Refuse windows too small to hold a prompt token and a response token."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
