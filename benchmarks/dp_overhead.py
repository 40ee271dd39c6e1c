"""DP overhead: the cost of a DP-SGD step against a plain step, per Opacus grad_sample_mode.

Two real models with LoRA r=8 (fedtune's defaults): the embedded all-MiniLM-L6-v2 classifier
(22 ICD-10-CM chapters, batch 16) and the embedded SmolLM2-135M-Instruct causal LM (batch 8).
The batches are real ICD-10 texts from `fedtune.icd10.write_hospital_datasets`, encoded as
training encodes them (max_length 48; a batch is padded to its longest example) and fixed
for the whole measurement, so both paths see exactly the same tensors.

Each (model, mode) runs in a fresh subprocess, which reports its own peak RSS. Inside it, a
plain step (the adapter's AdamW on the mean per-example loss) and a DP step (the same model
made private by Opacus as `client.dp_train` does it: σ = 1, C = 1, fixed batch instead of
Poisson sampling) alternate, with Opacus' hooks removed for the plain step and put back for
the DP step outside the timed region, so machine noise hits both alike. Step time =
median of 10 steps after 2 warm-up steps of each. A separate subprocess per model takes only
plain steps, for the non-DP peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fedtune.benchmarks.runner import BenchResult

MODES = ("hooks", "functorch", "ghost")
DEFAULT_MODE = "hooks"
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"source": "embedded:minilm", "task": "classify", "batch": 16},
    "smollm2": {"source": "embedded:smollm2", "task": "instruct", "batch": 8},
}
MAX_LENGTH = 48
WARMUP_STEPS = 2
TIMED_STEPS = 10


def bench_dp(work_dir: Path) -> BenchResult:
    """Measure every (model, mode) in its own subprocess and tabulate the ratios."""
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], dict[str, float]] = {}
    for model in MODELS:
        for mode in ("none", *MODES):
            print(f"   {model} / {'no DP' if mode == 'none' else mode}", flush=True)
            results[(model, mode)] = _run_worker(model, mode, work_dir)
    numbers: dict[str, float] = {}
    rows = []
    for model in MODELS:
        prefix = "dp_step_ratio" if model == "minilm" else f"dp_step_ratio_{model}"
        plain = results[(model, "none")]
        numbers[f"nodp_peak_rss_mb_{model}"] = plain["peak_rss_mb"]
        for mode in MODES:
            measured = results[(model, mode)]
            ratio = measured["dp_ms"] / measured["nodp_ms"]
            numbers[f"{prefix}_{mode}"] = ratio
            numbers[f"dp_peak_rss_mb_{model}_{mode}"] = measured["peak_rss_mb"]
            rows.append(
                f"| {model} | {mode} | {measured['nodp_ms']:.0f} | {measured['dp_ms']:.0f} | "
                f"{ratio:.2f} | {plain['peak_rss_mb']:.0f} | {measured['peak_rss_mb']:.0f} |"
            )
        numbers[prefix] = numbers[f"{prefix}_{DEFAULT_MODE}"]
    fastest = {
        model: min(
            MODES,
            key=lambda m: numbers[
                f"{'dp_step_ratio' if model == 'minilm' else f'dp_step_ratio_{model}'}_{m}"
            ],
        )
        for model in MODELS
    }
    widths = ", ".join(
        f"{model} {int(results[(model, 'none')]['tokens'])} tokens" for model in MODELS
    )
    threads = int(results[("minilm", "none")]["threads"])
    peak_scope = (
        "while it stepped (model loaded; the kernel's peak mark is reset before the first step)"
        if all(r["steps_only"] for r in results.values())
        else "over its whole life, model loading included"
    )
    table = "\n".join(rows)
    markdown = f"""## DP-SGD step overhead (`fedtune bench dp`)

LoRA r=8 (fedtune defaults) on the embedded all-MiniLM-L6-v2 classifier (22 ICD-10-CM
chapters, batch 16) and SmolLM2-135M-Instruct (instruction data, batch 8). Real ICD-10 texts,
max_length {MAX_LENGTH}, one fixed batch per model (padded width: {widths}). DP step = Opacus
`make_private` as `client.dp_train` uses it (σ = 1, C = 1, AdamW); plain step = same model,
same batch, same loss (`PerExampleLoss`), hooks removed. Median of {TIMED_STEPS} steps after
{WARMUP_STEPS} warm-up steps, plain and DP steps alternating in one process per row. Peak RSS =
that process's maximum resident set {peak_scope} (the DP process also ran the plain steps, which
need less memory); the plain-only process per model gives the non-DP peak. torch used {threads}
CPU thread(s) (set OMP_NUM_THREADS=1 on a machine shared with other jobs: oversubscribed
threads make step times erratic).

| model | mode | plain step (ms) | DP step (ms) | DP / plain | plain peak RSS MB | DP peak RSS MB |
|---|---|---|---|---|---|---|
{table}

Every mode passes the per-sample gradient checks in `tests/test_dp_training.py`, so all three
are correct here; the fastest is **{fastest["minilm"]}** for MiniLM
(`dp_step_ratio_{fastest["minilm"]}` = {numbers[f"dp_step_ratio_{fastest['minilm']}"]:.2f})
and **{fastest["smollm2"]}** for SmolLM2
(`dp_step_ratio_smollm2_{fastest["smollm2"]}` =
{numbers[f"dp_step_ratio_smollm2_{fastest['smollm2']}"]:.2f}). The default mode
(`{DEFAULT_MODE}`): `dp_step_ratio` = **{numbers["dp_step_ratio"]:.2f}**,
`dp_step_ratio_smollm2` = **{numbers["dp_step_ratio_smollm2"]:.2f}**.
"""
    return BenchResult(numbers=numbers, markdown=markdown)


def _run_worker(model: str, mode: str, work_dir: Path) -> dict[str, float]:
    """One configuration in a fresh interpreter: its peak RSS is its own."""
    completed = subprocess.run(
        [sys.executable, "-m", "fedtune.benchmarks.dp_overhead", model, mode, str(work_dir)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"dp benchmark worker {model}/{mode} failed:\n{completed.stderr}")
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


# ---- the worker ----------------------------------------------------------------------------


def _fixed_batch(model_name: str, tokenizer: Any, work_dir: Path) -> tuple[list[Any], Any]:
    """The first `batch` training examples of hospital 1, encoded as training encodes them."""
    from fedtune.client.data import load_hospital_data
    from fedtune.client.encoding import collate, encode_classification, encode_generation
    from fedtune.ops.icd10 import CHAPTERS, write_hospital_datasets

    spec = MODELS[model_name]
    data_dir = work_dir / f"data-{spec['task']}"
    if not (data_dir / "hospital-1.jsonl").is_file():  # workers run one after another
        write_hospital_datasets(data_dir, 1, spec["task"], 64, seed=0)
    if spec["task"] == "classify":
        labels = tuple(chapter.title for chapter in CHAPTERS)
        examples: list[Any] = list(
            load_hospital_data(data_dir / "hospital-1.jsonl", labels=labels).examples
        )
        label_to_id = {label: i for i, label in enumerate(labels)}
        features: list[Any] = list(
            encode_classification(examples, tokenizer, label_to_id, MAX_LENGTH)
        )
    else:
        examples = list(load_hospital_data(data_dir / "hospital-1.jsonl").examples)
        features = list(encode_generation(examples, tokenizer, MAX_LENGTH))
    chosen = features[: spec["batch"]]
    return chosen, collate(chosen, int(tokenizer.pad_token_id))


def _worker(model_name: str, mode: str, work_dir: Path) -> dict[str, float]:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from fedtune.client.losses import PerExampleLoss, model_inputs
    from fedtune.core.config import LoraSettings, ModelSettings
    from fedtune.core.model import attach_lora, load_base_model
    from fedtune.ops.icd10 import CHAPTERS

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*[Ss]ecure.*RNG.*")
    spec = MODELS[model_name]
    labels = tuple(chapter.title for chapter in CHAPTERS) if spec["task"] == "classify" else ()
    settings = ModelSettings(
        source=spec["source"], task=spec["task"], labels=labels, max_length=MAX_LENGTH
    )
    torch.manual_seed(0)
    base, tokenizer, fresh = load_base_model(settings, labels, torch.device("cpu"))
    model = attach_lora(base, LoraSettings(), spec["task"], fresh)
    model.train()
    features, batch = _fixed_batch(model_name, tokenizer, work_dir)
    inputs, targets = model_inputs(batch), batch["labels"]
    criterion = PerExampleLoss(spec["task"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def plain_step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(**inputs).logits, targets).backward()
        optimizer.step()
        return time.perf_counter() - started

    plain_ms: list[float] = []
    dp_ms: list[float] = []
    steps_only = _reset_peak_rss()  # the peak of loading the model is not the step's
    if mode == "none":
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            seconds = plain_step()
            if step >= WARMUP_STEPS:
                plain_ms.append(1000 * seconds)
    else:
        loader: DataLoader[Any] = DataLoader(
            features,  # type: ignore[arg-type]
            batch_size=len(features),
            collate_fn=lambda items: items,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prepared = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            private_model, private_optimizer, dp_criterion, _ = prepared
        else:
            (private_model, private_optimizer, _), dp_criterion = prepared, criterion

        def dp_step() -> float:
            started = time.perf_counter()
            private_optimizer.zero_grad(set_to_none=True)
            dp_criterion(private_model(**inputs).logits, targets).backward()
            private_optimizer.step()
            return time.perf_counter() - started

        for step in range(WARMUP_STEPS + TIMED_STEPS):
            # Alternate which path goes first, so slow drifts of the machine cancel out.
            order = ("dp", "plain") if step % 2 else ("plain", "dp")
            for path in order:
                if path == "plain":
                    private_model.remove_hooks()
                    seconds = plain_step()
                    private_model.add_hooks(
                        loss_reduction="mean",
                        batch_first=True,
                        force_functorch=mode == "functorch",
                    )
                else:
                    seconds = dp_step()
                if step >= WARMUP_STEPS:
                    (plain_ms if path == "plain" else dp_ms).append(1000 * seconds)
        private_model._close()
    peak_kb = _peak_rss_kb() if steps_only else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "nodp_ms": statistics.median(plain_ms),
        "peak_rss_mb": peak_kb / 1024,
        "tokens": float(batch["input_ids"].shape[1]),
        "threads": float(torch.get_num_threads()),
        "steps_only": float(steps_only),
    }
    if dp_ms:
        result["dp_ms"] = statistics.median(dp_ms)
    return result


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM), so the peak covers the steps only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _peak_rss_kb() is not None


def _peak_rss_kb() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
