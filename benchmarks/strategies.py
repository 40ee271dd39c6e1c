"""Server strategies on the non-IID demo: validation metric per round and upload bytes.

Four arms, one after another in one `fedtune bench strategies` run, on the real Flower
simulation engine: the classify demo (MiniLM + LoRA r=8, ICD-10 chapter) with 5 hospitals
whose data are split by specialty (non-IID), sample-level DP-SGD at ε = 8 and secure
aggregation on, identical data, seed, rounds and examples per hospital; only
`federation.strategy` differs (fedavg, fedprox, fedadam, ffa-lora).

Upload bytes per hospital per round are those of the masked secure-aggregation payload: one
uint32 per uploaded value plus one weight slot, i.e. 4 × `layout_size` of the tensors the
strategy uploads (`uploaded_tensors` of the run's round-0 global adapter).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fedtune.benchmarks.runner import BenchResult
from fedtune.core.adapters import Adapter
from fedtune.core.secagg.encoding import layout_size
from fedtune.core.uploads import FFA_LORA, lora_upload_bytes, uploaded_tensors
from fedtune.ops.demo import DemoOptions, run_demo
from fedtune.server.records import RoundRecord
from fedtune.server.run_dir import RunDirectory

STRATEGIES = ("fedavg", "fedprox", "fedadam", FFA_LORA)
HOSPITALS = 5
# Sized for ≲ 25 minutes on a 2-core CPU: one arm (5 hospitals, 3 rounds) measured 5.4 min.
ROUNDS = 3
EXAMPLES_PER_HOSPITAL = 1000
EPSILON = 8.0
SEED = 0
_RING_BYTES = 4  # one uint32 per masked value


def bench_strategies(work_dir: Path) -> BenchResult:
    """Run the demo once per strategy with identical settings; compare metrics and uploads."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    arms: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        say = f"   {strategy}: {HOSPITALS} hospitals, {ROUNDS} rounds, DP ε={EPSILON:g}"
        print(say, flush=True)
        started = time.perf_counter()
        options = DemoOptions(
            task="classify", hospitals=HOSPITALS, rounds=ROUNDS,
            examples_per_hospital=EXAMPLES_PER_HOSPITAL, run_dir=work_dir / strategy, seed=SEED,
            privacy=True, epsilon=EPSILON, secure_aggregation=True, strategy=strategy,
        )
        summary = run_demo(options)
        arms[strategy] = _arm(RunDirectory(work_dir / strategy), summary, strategy)
        arms[strategy]["seconds"] = time.perf_counter() - started

    reference = RunDirectory(work_dir / "fedavg").load_adapter(0)
    lora_only = {name: value for name, value in reference.items() if _is_lora(name)}
    numbers: dict[str, float] = {}
    for strategy, arm in arms.items():
        key = strategy.replace("-", "_")
        numbers[f"strategy_{key}_val_accuracy"] = arm["validation"][-1]
        numbers[f"strategy_{key}_test_accuracy"] = arm["test_accuracy"]
        numbers[f"strategy_{key}_upload_bytes"] = float(arm["upload_bytes"])
    numbers["ffa_lora_upload_ratio"] = lora_upload_bytes(lora_only, FFA_LORA) / lora_upload_bytes(
        lora_only, "fedavg"
    )
    numbers["ffa_lora_total_upload_ratio"] = (
        arms[FFA_LORA]["upload_bytes"] / arms["fedavg"]["upload_bytes"]
    )
    return BenchResult(numbers, _markdown(numbers, arms, reference, lora_only))


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _upload_bytes(adapter: Adapter, strategy: str) -> int:
    """Masked payload a hospital sends per round under `strategy` (values + weight slot)."""
    return _RING_BYTES * layout_size(uploaded_tensors(adapter, strategy))


def _arm(run_dir: RunDirectory, summary: dict[str, Any], strategy: str) -> dict[str, Any]:
    config = run_dir.config()
    rounds = [r for r in run_dir.records() if isinstance(r, RoundRecord)]
    aborted = [r.round for r in rounds if r.aborted]
    if aborted:
        raise RuntimeError(f"{strategy}: round(s) {aborted} aborted; see {run_dir.path}")
    epsilons = [v["epsilon"] for v in summary["privacy"]["per_hospital"].values()]
    return {
        # each round's weighted validation, whether it travelled alone or with training
        "validation": [float(run_dir.load_state().validation[r.round]["accuracy"])
                       for r in rounds],
        "base_test_accuracy": summary["base_test"]["weighted"]["accuracy"],
        "test_accuracy": summary["final_test"]["weighted"]["accuracy"],
        "test_loss": summary["final_test"]["weighted"]["loss"],
        "epsilon_max": max(epsilons),
        "upload_bytes": _upload_bytes(run_dir.load_adapter(0), strategy),
        "server_learning_rate": config.federation.server_learning_rate,
        "proximal_mu": config.federation.proximal_mu,
    }


def _markdown(
    numbers: dict[str, float],
    arms: dict[str, dict[str, Any]],
    reference: Adapter,
    lora_only: Adapter,
) -> str:
    head = "".join(f" round {k} |" for k in range(1, ROUNDS + 1))
    rows = []
    for strategy, arm in arms.items():
        validation = "".join(f" {v:.3f} |" for v in arm["validation"])
        rows.append(
            f"| {strategy} |{validation} {arm['test_accuracy']:.3f} | {arm['test_loss']:.4f} | "
            f"{arm['upload_bytes']:,} | {arm['epsilon_max']:.2f} | {arm['seconds'] / 60:.1f} |"
        )
    table = "\n".join(rows)
    base = arms["fedavg"]["base_test_accuracy"]
    head_values = sum(v.size for n, v in reference.items() if not _is_lora(n))
    lora_values = sum(v.size for v in lora_only.values())
    fedadam_lr = arms["fedadam"]["server_learning_rate"]
    fedprox_mu = arms["fedprox"]["proximal_mu"]
    fedavg_lr = arms["fedavg"]["server_learning_rate"]
    return f"""## Server strategies on non-IID hospitals (`fedtune bench strategies`)

Classify demo (all-MiniLM-L6-v2 + LoRA r=8, description → ICD-10 chapter), {HOSPITALS}
hospitals with data split by specialty (non-IID), {EXAMPLES_PER_HOSPITAL} examples each,
{ROUNDS} rounds, sample-level DP-SGD at target ε = {EPSILON:g} and secure aggregation on, same
data and seed for every arm; only the strategy differs. fedadam uses server η =
{fedadam_lr:g} (the demo's default for adaptive strategies), fedprox μ = {fedprox_mu:g} (the
config default), fedavg and ffa-lora η = {fedavg_lr:g}. Validation accuracy after each round
and final test accuracy are example-weighted over the hospitals' held-out splits (base model
test accuracy {base:.3f}).

| strategy |{head} test acc. | test loss | upload B / hospital / round | max ε | wall (min) |
|---|{"---|" * ROUNDS}---|---|---|---|---|
{table}

Upload = masked secure-aggregation payload, 4 bytes × (uploaded values + 1 weight slot). The
adapter holds {lora_values:,} LoRA A/B values and {head_values:,} classifier-head values (sent
as `modules_to_save`); FFA-LoRA freezes and never sends LoRA A:
`ffa_lora_upload_ratio` (LoRA A/B bytes only, equal rank) =
**{numbers["ffa_lora_upload_ratio"]:.3f}**,
`ffa_lora_total_upload_ratio` (whole masked upload, head included) =
**{numbers["ffa_lora_total_upload_ratio"]:.3f}**.

The accuracies show what each strategy reaches under identical DP noise and non-IID data
after {ROUNDS} short rounds; they are one seed on small data with untuned server
hyperparameters, so differences of a few points are noise, not a ranking of the strategies.
"""
