"""The run directory and exporting a run's adapter as a plain PEFT (or merged) model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import attach_lora, load_base_model, set_adapter
from fedtune.server.export import ExportError, choose_round, export_adapter
from fedtune.server.records import Evaluation, RoundRecord
from fedtune.server.run_dir import RunDirectory
from fedtune.server.state import CoordinatorState

CPU = torch.device("cpu")
TEXTS = ["acute bronchitis with cough", "fracture of the left wrist", "type 2 diabetes"]


def _perturbed(adapter: Adapter, seed: int, scale: float = 0.05) -> Adapter:
    rng = np.random.default_rng(seed)
    return {
        name: (value + scale * rng.standard_normal(value.shape)).astype(np.float32)
        for name, value in adapter.items()
    }


def _round_record(server_round: int, accuracy: float, aborted: bool = False) -> RoundRecord:
    return RoundRecord(
        round=server_round, attempt=1, hospitals_asked=2, hospitals_connected=2,
        hospitals_sampled=2, sampled_nodes=[1, 2], sampled_hospitals=["a", "b"],
        hospitals_used=[] if aborted else ["a", "b"], refused={}, train={},
        train_phase_seconds=1.0, secure_aggregation={"secure_aggregation": True},
        aborted=True if aborted else None,
        validation=None if aborted else {"weighted": {"accuracy": accuracy, "loss": 1.0},
                                         "per_hospital": {}, "refused": {}},
    )


def _record_round(run_dir: RunDirectory, server_round: int, accuracy: float) -> None:
    """What the coordinator writes after a round: its log line and its state."""
    record = _round_record(server_round, accuracy)
    run_dir.log(record)
    state = run_dir.load_state() if run_dir.state_file.is_file() else CoordinatorState()
    state.completed(server_round, record.validation["weighted"], {})  # type: ignore[index]
    run_dir.save_state(state)


def _evaluation(server_round: int) -> Evaluation:
    return Evaluation(round=server_round, split="test", weighted={}, per_hospital={},
                      refused={})


def _make_run(path: Path, config: RunConfig, accuracies: dict[int, float]) -> dict[int, Adapter]:
    """A run directory as the coordinator leaves it: round 0 plus perturbed later rounds."""
    run_dir = RunDirectory(path)
    run_dir.create(config)
    adapters = {0: initial_global_adapter(config)}
    run_dir.save_adapter(0, adapters[0])
    run_dir.log(_evaluation(0))
    for server_round, accuracy in sorted(accuracies.items()):
        adapters[server_round] = _perturbed(adapters[server_round - 1], seed=server_round)
        run_dir.save_adapter(server_round, adapters[server_round])
        _record_round(run_dir, server_round, accuracy)
    return adapters


def _framework_logits(config: RunConfig, adapter: Adapter, texts: list[str]) -> torch.Tensor:
    base, tokenizer, fresh = load_base_model(config.model, config.model.labels, CPU)
    model = attach_lora(base, config.lora, config.model.task, fresh)
    set_adapter(model, adapter)
    model.eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# ---- export ---------------------------------------------------------------------------------


def test_exported_classifier_loads_with_plain_peft(
    classify_config: RunConfig, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    adapters = _make_run(tmp_path / "run", classify_config, {1: 0.5, 2: 0.4})
    out = tmp_path / "export"
    exported = export_adapter(RunDirectory(tmp_path / "run"), out, "final", merged=False)
    assert exported == 2
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "merged").exists()
    info = json.loads((out / "fedtune-export.json").read_text())
    assert info["round"] == 2 and info["task"] == "classify"
    assert info["labels"] == list(classify_config.model.labels)
    assert info["pooling"] == classify_config.model.pooling == "cls"
    assert info["run_dir"] == str((tmp_path / "run").resolve())

    labels = classify_config.model.labels
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=len(labels)
    )
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = peft_model(**batch).logits

    expected = _framework_logits(classify_config, adapters[2], TEXTS)
    assert torch.allclose(plain, expected, atol=1e-5)
    for other in (0, 1):  # the export really is round 2, not another saved round
        assert not torch.allclose(plain, _framework_logits(classify_config, adapters[other], TEXTS))


def test_exported_merged_causal_lm_matches_the_adapter(
    instruct_config: RunConfig, tmp_path: Path
) -> None:
    adapters = _make_run(tmp_path / "run", instruct_config, {1: 0.0})
    out = tmp_path / "export"
    assert export_adapter(RunDirectory(tmp_path / "run"), out, "1", merged=True) == 1
    assert (out / "adapter_model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits = merged(**batch).logits

    expected = _framework_logits(instruct_config, adapters[1], TEXTS)
    assert torch.allclose(merged_logits, expected, atol=1e-4)
    initial = _framework_logits(instruct_config, adapters[0], TEXTS)
    assert not torch.allclose(merged_logits, initial, atol=1e-4)


# ---- choosing the round ---------------------------------------------------------------------


def _run_with_rounds(path: Path, config: RunConfig, accuracies: dict[int, float]) -> RunDirectory:
    """Cheap stand-in adapters: choose_round looks at files and metrics, not at tensors."""
    run_dir = RunDirectory(path)
    run_dir.create(config)
    run_dir.save_adapter(0, {"w": np.zeros(2, np.float32)})
    for server_round, accuracy in accuracies.items():
        run_dir.save_adapter(server_round, {"w": np.full(2, server_round, np.float32)})
        _record_round(run_dir, server_round, accuracy)
    return run_dir


def test_choose_round(classify_config: RunConfig, tmp_path: Path) -> None:
    run_dir = _run_with_rounds(tmp_path / "run", classify_config, {1: 0.5, 2: 0.8, 3: 0.6})
    run_dir.log(_round_record(4, 0.0, aborted=True))  # no validation
    run_dir.log(_evaluation(3))
    assert choose_round(run_dir, "final") == 3
    assert choose_round(run_dir, "best") == 2
    assert choose_round(run_dir, "1") == 1
    assert choose_round(run_dir, "0") == 0
    with pytest.raises(ExportError, match=r"round 7 was not saved; saved rounds: \[0, 1, 2, 3\]"):
        choose_round(run_dir, "7")
    with pytest.raises(ExportError, match="'final', 'best' or a number"):
        choose_round(run_dir, "latest")


def test_choose_round_without_adapters_or_validation(
    classify_config: RunConfig, tmp_path: Path
) -> None:
    empty = RunDirectory(tmp_path / "empty")
    empty.create(classify_config)
    with pytest.raises(ExportError, match="no saved adapters"):
        choose_round(empty, "final")

    unvalidated = _run_with_rounds(tmp_path / "unvalidated", classify_config, {})
    assert choose_round(unvalidated, "final") == 0
    with pytest.raises(ExportError, match="no validated rounds"):
        choose_round(unvalidated, "best")


# ---- run directory --------------------------------------------------------------------------


def test_create_refuses_an_existing_run(classify_config: RunConfig, tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(classify_config)
    assert run_dir.config() == classify_config
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDirectory(tmp_path / "run").create(classify_config)
    with pytest.raises(FileNotFoundError, match="not a fedtune run directory"):
        RunDirectory(tmp_path / "elsewhere").config()


def test_adapters_round_trip_bit_exactly(classify_config: RunConfig, tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(classify_config)
    rng = np.random.default_rng(0)
    adapter = {
        "b.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "a.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)[:, ::2],  # strided
        "c.bias": np.array([np.float32(1e-38), -0.0, np.inf], np.float32),
    }
    run_dir.save_adapter(3, adapter)
    run_dir.save_adapter(12, adapter)
    assert run_dir.saved_rounds() == [3, 12]
    loaded = run_dir.load_adapter(3)
    assert set(loaded) == set(adapter)
    for name, value in adapter.items():
        assert loaded[name].dtype == np.float32
        assert loaded[name].tobytes() == np.ascontiguousarray(value).tobytes()
    leftovers = [p.name for p in run_dir.adapters_dir.iterdir()]
    assert sorted(leftovers) == ["round-0003.safetensors", "round-0012.safetensors"]

    with pytest.raises(FileNotFoundError, match="round 5; saved: 3, 12"):
        run_dir.load_adapter(5)


def test_saved_rounds_ignores_other_files(classify_config: RunConfig, tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.saved_rounds() == []
    run_dir.create(classify_config)
    (run_dir.adapters_dir / "round-1.safetensors").write_bytes(b"")
    (run_dir.adapters_dir / "tmpabc").write_bytes(b"")
    assert run_dir.saved_rounds() == []
    with pytest.raises(FileNotFoundError, match="saved: none"):
        run_dir.load_adapter(0)


def test_metrics_append_and_read(classify_config: RunConfig, tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(classify_config)
    assert run_dir.read_metrics() == []
    records = [_round_record(1, 0.25), Evaluation(round=1, split="test", weighted={},
                                                  per_hospital={"é ✓": {"loss": 1.0}},
                                                  refused={})]
    for record in records:
        run_dir.log(record)
    assert run_dir.records() == records
    assert run_dir.read_metrics()[1]["per_hospital"] == {"é ✓": {"loss": 1.0}}
    assert len(run_dir.metrics_file.read_text(encoding="utf-8").splitlines()) == 2

    run_dir.save_summary({"final_round": 1})
    assert run_dir.summary() == {"final_round": 1}
