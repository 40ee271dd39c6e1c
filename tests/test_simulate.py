"""`fedtune simulate`: experiment files, the shared test set, the run plan, and real sweeps.

The slow tests run sweeps end to end: federated arms through the real Flower simulation
engine (Ray), baselines in process, on real ICD-10-CM data; the tiny sweep uses a tiny BERT
built from a config, `simulations/quick.toml` runs exactly as shipped (embedded MiniLM).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

from fedtune.core.config import ConfigError
from fedtune.ops.cli import main
from fedtune.simulations.datasets import build_dataset
from fedtune.simulations.experiment import load_experiment
from fedtune.simulations.results import load_results
from fedtune.simulations.sweep import plan_runs, run_config_for, run_experiment

# pytest-xdist (make test: -n 2 --dist loadgroup): every test that starts Flower's
# simulation engine (Ray) runs on one worker, one Ray cluster at a time.
pytestmark = pytest.mark.xdist_group("flower-simulation")

SHIPPED = Path(__file__).resolve().parent.parent / "simulations"


def experiment_text(model_dir: Path | str = "embedded:minilm", **sections: str) -> str:
    """A small classification experiment; ``sections`` replace whole sections' bodies."""
    body = {
        "experiment": 'name = "t"\nseeds = [0]\narms = ["centralized", "local-only", '
        '"federated-dp"]\nsecure_aggregation_threshold = "majority"\nrun_timeout_s = 600',
        "dataset": 'name = "icd10-chapters"\nexamples_per_hospital = 40\ntest_examples = 42',
        "partition": 'method = "dirichlet"\nalpha = 1.0\nhospitals = 2\nmin_examples = 8',
        "sweep": "epsilon = [1.0, 8.0]",
        "model": f'source = "{model_dir}"\ntask = "classify"\nmax_length = 24',
        "lora": "r = 2\nalpha = 4\ndropout = 0.0",
        "train": "local_steps = 2\nlearning_rate = 5e-3\nbatch_size = 8\nseed = 1",
        "federation": "rounds = 2",
        "privacy": "max_physical_batch_size = 16",
        "evaluation": "max_examples = 8",
    }
    body.update(sections)
    return "\n".join(f"[{name}]\n{text}\n" for name, text in body.items())


def write_experiment(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---- experiment files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["quick.toml", "medical_classification.toml", "medical_instruction.toml"]
)
def test_shipped_experiments_load_and_plan(name: str) -> None:
    experiment = load_experiment(SHIPPED / name)
    runs = plan_runs(experiment)
    rows = {(json.dumps(point, sort_keys=True), spec.key) for point, spec in runs}
    assert runs and len(rows) == len(runs)  # no (grid point, run) twice
    assert experiment.metric_name in ("accuracy", "exact-match")


def test_unknown_sweep_key_names_the_allowed_ones(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, experiment_text(sweep="epsilons = [1.0]"))
    allowed = r"allowed: adapter_method, alpha"
    with pytest.raises(ConfigError, match=r"unknown key 'epsilons' in \[sweep\]; " + allowed):
        load_experiment(path)


def test_unknown_run_config_key_is_refused_like_fedtune_run(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, experiment_text(train="learning_rte = 1e-3"))
    with pytest.raises(ConfigError, match="learning_rte"):
        load_experiment(path)


def test_unknown_arm_and_section_are_refused(tmp_path: Path) -> None:
    text = experiment_text().replace('"federated-dp"]', '"federated-magic"]')
    with pytest.raises(ConfigError, match="arm 'federated-magic' is not one of: centralized"):
        load_experiment(write_experiment(tmp_path, text))
    with pytest.raises(ConfigError, match=r"unknown section \[plots\]"):
        load_experiment(write_experiment(tmp_path, experiment_text() + "[plots]\nx = 1\n"))


def test_secure_aggregation_arms_need_an_explicit_threshold(tmp_path: Path) -> None:
    text = experiment_text(experiment='arms = ["federated-secagg"]', sweep="")
    with pytest.raises(ConfigError, match="secure_aggregation_threshold is required"):
        load_experiment(write_experiment(tmp_path, text))


def test_dataset_task_must_match_the_model(tmp_path: Path) -> None:
    text = experiment_text(
        dataset='name = "icd10-chapters-instruct"\nexamples_per_hospital = 40\ntest_examples = 4'
    )
    with pytest.raises(ConfigError, match="is a 'instruct' task but \\[model\\] task"):
        load_experiment(write_experiment(tmp_path, text))


def test_plan_shares_runs_that_do_not_depend_on_a_swept_value(tmp_path: Path) -> None:
    text = experiment_text(
        sweep='epsilon = [1.0, 3.0, 8.0]\nstrategy = ["fedavg", "fedprox"]',
        experiment='arms = ["centralized", "centralized-dp", "federated-dp", '
        '"federated-dp-secagg"]\nsecure_aggregation_threshold = 2\nseeds = [0, 1]',
    )
    experiment = load_experiment(write_experiment(tmp_path, text))
    pairs = plan_runs(experiment)
    keys = [spec.key for _point, spec in pairs]
    unique = set(keys)
    # Per seed: centralized 1 + centralized-dp 3 (shared by both strategies), federated-dp
    # 3 per strategy, federated-dp-secagg only at the largest ε, per strategy.
    assert len(unique) == 2 * (1 + 3 + 2 * 3 + 2)
    secagg = [s for _p, s in pairs if s.arm == "federated-dp-secagg"]
    assert {s.epsilon for s in secagg} == {8.0}
    assert len(pairs) == 2 * 2 * (1 + 3 + 3 + 1)  # every grid point gets every arm


def test_run_config_of_each_arm(tmp_path: Path) -> None:
    text = experiment_text(
        experiment='arms = ["federated", "federated-dp-secagg"]\n'
        'secure_aggregation_threshold = "majority"',
        partition='method = "iid"\nhospitals = 5',
        sweep='epsilon = [3.0]\nlora_r = [2, 8]',
    )
    experiment = load_experiment(write_experiment(tmp_path, text))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "labels.json").write_text(json.dumps(["a", "b"]))
    specs = {spec.key: spec for _p, spec in plan_runs(experiment)}
    secure = next(s for s in specs.values() if s.arm == "federated-dp-secagg" and s.lora_r == 8)
    config = run_config_for(experiment, secure, data_dir, tmp_path / "run")
    assert config.secure_aggregation.enabled and config.secure_aggregation.threshold == 3
    assert config.privacy.enabled and config.privacy.target_epsilon == 3.0
    assert config.privacy.ledger_dir == str(tmp_path / "run" / "ledgers")  # fresh per run
    assert (config.lora.r, config.lora.alpha) == (8, 16)  # alpha keeps its ratio to r
    assert config.model.labels == ("a", "b")
    plain = next(s for s in specs.values() if s.arm == "federated" and s.lora_r == 2)
    config = run_config_for(experiment, plain, data_dir, tmp_path / "run")
    assert not config.secure_aggregation.enabled and not config.privacy.enabled


# ---- the shared test set ---------------------------------------------------------------------


def test_test_set_is_fixed_by_the_dataset_seed_alone() -> None:
    small = build_dataset("icd10-chapters", pool_size=100, test_size=63, seed=0)
    large = build_dataset("icd10-chapters", pool_size=900, test_size=63, seed=0)
    other = build_dataset("icd10-chapters", pool_size=100, test_size=63, seed=1)
    assert small.test == large.test  # sweeping the number of hospitals keeps the test set
    assert small.test != other.test
    texts = [e.record["text"] for e in large.test + large.pool]
    assert len(texts) == len(set(texts)), "an example is in the test set and the pool"
    chapters = {e.chapter for e in small.test}
    assert len(chapters) == 21  # balanced over every chapter the data has (3 each)


def test_instruct_datasets_ask_for_the_chapter_range_or_category() -> None:
    chapters = build_dataset("icd10-chapters-instruct", pool_size=5, test_size=5, seed=0)
    categories = build_dataset("icd10-categories", pool_size=5, test_size=5, seed=0)
    assert all("-" in e.record["output"] for e in chapters.test)
    assert all(len(e.record["output"]) == 3 for e in categories.test)


# ---- sweeps ------------------------------------------------------------------------------


def test_a_failed_run_is_reported_and_the_sweep_goes_on(
    tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Split by specialty (ICD-10 chapter), 25 hospitals cannot each get one of the 21
    # chapters: that grid point fails; the 2-hospital one must still run.
    text = experiment_text(
        tiny_bert_dir,
        experiment='arms = ["centralized", "local-only"]',
        partition='method = "natural"\nhospitals = 2',
        sweep="hospitals = [2, 25]",
    )
    path = write_experiment(tmp_path, text)
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "failed: PartitionError" in printed.out
    results = load_results(out / "results.json")
    ok = [r for r in results if r.status == "ok"]
    assert {(r.arm, r.point["hospitals"]) for r in ok} == {
        ("centralized", 2), ("local-only", 2),
    }
    failed = [r for r in results if r.status != "ok"]
    assert len(failed) == 2 and all("21 distinct keys for 25 hospitals" in r.error
                                    for r in failed)
    assert all(r.final_metric is not None and len(r.curve) == 3 for r in ok)
    rows = [line for line in (out / "results.md").read_text().splitlines() if "| 25 |" in line]
    assert len(rows) == 2 and all("failed" in row for row in rows)
    # Run again in the same folder: finished runs are reused, the failed ones retried.
    assert main(["simulate", str(path), "--out", str(out)]) == 1
    assert "done in an earlier sweep, reused" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_sweep_end_to_end_on_the_simulation_engine(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """A 2 × 2 grid (ε × strategy), 2 hospitals, 2 rounds, through real Flower simulations."""
    text = experiment_text(tiny_bert_dir, sweep='epsilon = [1.0, 8.0]\nstrategy = ["fedavg", '
                           '"fedprox"]')
    experiment = load_experiment(write_experiment(tmp_path, text))
    out = tmp_path / "out"
    lines: list[str] = []
    progress = io.StringIO()
    results = run_experiment(experiment, out, say=lines.append, progress_stream=progress)

    assert all(r.status == "ok" for r in results), [r.error for r in results]
    # Every arm of every grid point and ε, scored on one and the same test file.
    test_sha = hashlib.sha256((out / "data" / "test.jsonl").read_bytes()).hexdigest()
    assert {r.test_fingerprint for r in results} == {test_sha}
    assert len(results) == 2 * (1 + 1 + 2)
    # Baselines do not depend on the strategy: one run serves both grid points.
    central = [r for r in results if r.arm == "centralized"]
    assert len({r.run_dir for r in central}) == 1 and len(central) == 2
    federated = [r for r in results if r.arm == "federated-dp"]
    assert len({r.run_dir for r in federated}) == 4
    for result in federated:
        assert [r for r, _m in result.curve] == [0, 1, 2]
        assert sorted(result.hospital_epsilon) == ["hospital-1", "hospital-2"]
        for spent in result.hospital_epsilon.values():
            epsilons = [e for _r, e in spent]
            assert epsilons == sorted(epsilons) and 0 < epsilons[-1] <= result.epsilon + 1e-6
    # The table: one row per (point, arm, ε), mean over the seed, parseable.
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {row["strategy"] for row in rows} == {"fedavg", "fedprox"}
    assert {row["epsilon"] for row in rows if row["arm"] == "federated-dp"} == {"1.0000", "8.0000"}
    assert "| strategy | arm | ε |" in (out / "results.md").read_text()
    for plot in ("metric_vs_round.png", "privacy_utility.png", "hospital_epsilon.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
        assert any(str(out / "plots" / plot) in line for line in lines)
    summary = json.loads((out / "data" / "h2-a1-s0" / "partition.json").read_text())
    assert sum(h["examples"] for h in summary["hospitals"]) == 80
    assert "sweep ETA" in progress.getvalue() and "2/2 rounds" in progress.getvalue()


@pytest.mark.slow
def test_quick_experiment_as_shipped(tmp_path: Path) -> None:
    """`fedtune simulate simulations/quick.toml`: every arm finishes; secure aggregation
    gives the plain federated result within the fixed-point error."""
    out = tmp_path / "quick"
    assert main(["simulate", str(SHIPPED / "quick.toml"), "--out", str(out)]) == 0
    results = load_results(out / "results.json")
    assert {r.arm for r in results} == {
        "centralized", "local-only", "federated", "federated-secagg", "federated-dp",
        "federated-dp-secagg",
    }
    check = json.loads((out / "secagg_check.json").read_text())
    assert len(check) == 1 and check[0]["equal_within_fixed_point_error"]
    assert 0 < check[0]["max_abs_difference"] <= check[0]["bound"]


def test_teacher_forced_exact_match_is_greedy_decoding(tiny_llama_dir: Path) -> None:
    """An answer counts as exact iff greedy decoding produces it: build answers from the
    model's own greedy continuation (exact), then change one token (not exact)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune.simulations.baselines import greedy_exact_match

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    features, altered = [], []
    for prompt in ([101, 2023, 2003, 1037], [101, 7592, 2088], [101, 3231, 2005, 2062, 2146]):
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
        answer = out[0, len(prompt) :].tolist()
        full = prompt + answer
        features.append({"input_ids": full, "attention_mask": [1] * len(full),
                         "labels": [-100] * len(prompt) + answer})
        wrong = [*answer[:-1], (answer[-1] + 1) % model.config.vocab_size]
        altered.append({"input_ids": prompt + wrong, "attention_mask": [1] * len(full),
                        "labels": [-100] * len(prompt) + wrong})
    assert greedy_exact_match(model, features, batch_size=2, pad_token_id=0) == 1.0
    assert greedy_exact_match(model, altered, batch_size=2, pad_token_id=0) == 0.0
    mixed = [features[0], altered[1], features[2]]
    assert greedy_exact_match(model, mixed, batch_size=3, pad_token_id=0) == pytest.approx(2 / 3)
