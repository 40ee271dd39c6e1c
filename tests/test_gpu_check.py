"""The GPU check kit on a machine without CUDA: it says so, runs nothing, and every CUDA
branch is importable (mypy type-checks them in `make lint`). The CUDA branches themselves
run only on a GPU machine (benchmarks/gpu_check.sh); this is the dry run the issue asks for."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the real "
                    "check runs with benchmarks/gpu_check.sh instead of this dry run")
def test_without_cuda_the_kit_says_so_and_runs_nothing(tmp_path: Path):
    completed = subprocess.run(
        [sys.executable, "-m", "fedtune.benchmarks.gpu_check", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 3, completed.stderr[-2000:]
    assert "no CUDA device is visible here" in completed.stdout
    assert not (tmp_path / "o").exists()  # no JSON, no model written


def test_every_check_of_the_kit_is_there_and_takes_its_work_folder():
    for check in (gpu_check.bf16_dp_step_ratio, gpu_check.qlora_dp_steps,
                  gpu_check.federated_round_on_gpu):
        assert list(inspect.signature(check).parameters) == ["work"]
    script = Path(gpu_check.__file__).with_name("gpu_check.sh")
    text = script.read_text()
    assert "fedtune.benchmarks.gpu_check" in text and "--no-index" in text


def test_the_kit_model_is_llama_style_and_about_half_a_billion_parameters():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=30522, tie_word_embeddings=True, **gpu_check.LLAMA_SHAPE)
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner
    total = layers * per_layer + config.vocab_size * hidden
    assert 0.4e9 <= total <= 1.0e9


def test_check_a_runs_end_to_end_on_a_tiny_cpu_model(tmp_path: Path, monkeypatch):
    """The bf16/DP branch's own code, shrunk to a tiny model on the CPU: a bug in the kit
    must show here, not in the few minutes a GPU is lent."""
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "LLAMA_SHAPE", {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2})
    monkeypatch.setattr(gpu_check, "SEQUENCE", 16)
    monkeypatch.setattr(gpu_check, "BATCH", 4)
    monkeypatch.setattr(gpu_check, "TIMED_STEPS", 2)
    figures = gpu_check.bf16_dp_step_ratio(tmp_path / "a")
    assert figures["dp_step_ratio_gpu"] > 0 and figures["dp_loss_finite"]
    assert figures["parameters"] > 0
