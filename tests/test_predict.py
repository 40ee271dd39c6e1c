"""`fedtune predict` / `fedtune evaluate`: an exported adapter used on new records.

Each test exports a run's adapter with `fedtune export`'s own function, loads it the way the
commands do (plain transformers + PEFT) and compares with the model fedtune trains in
process: the same labels and probabilities, the same greedy answers, the same metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import replace_section

from fedtune.client.data import DataValidationError, LabeledText, PromptResponse, load_hospital_data
from fedtune.client.encoding import encode_classification, encode_generation, prompt_token_ids
from fedtune.client.evaluate import evaluate_classification, evaluate_generation
from fedtune.core.adapters import Adapter
from fedtune.core.config import RunConfig
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import attach_lora, load_base_model, set_adapter
from fedtune.ops.cli import main
from fedtune.ops.predict import (
    EXPORT_INFO,
    ExportDirectoryError,
    evaluate_file,
    load_export,
    predict_file,
)
from fedtune.ops.run_outcome import verdict
from fedtune.server.export import export_adapter
from fedtune.server.records import RoundRecord
from fedtune.server.run_dir import RunDirectory
from fedtune.server.state import CoordinatorState

CPU = torch.device("cpu")


def _exported(config: RunConfig, tmp_path: Path) -> tuple[Path, Adapter]:
    """A one-round run directory with a perturbed adapter, exported as a user would."""
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    initial = initial_global_adapter(config)
    rng = np.random.default_rng(7)
    trained = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in initial.items()}
    run_dir.save_adapter(0, initial)
    run_dir.save_adapter(1, trained)
    run_dir.log(RoundRecord(
        round=1, attempt=1, hospitals_asked=2, hospitals_connected=2, hospitals_sampled=2,
        sampled_nodes=[1, 2], sampled_hospitals=["a", "b"], hospitals_used=["a", "b"],
        refused={}, train={}, train_phase_seconds=1.0, secure_aggregation={},
        validation={"weighted": {"accuracy": 0.5, "loss": 1.0}, "per_hospital": {},
                    "refused": {}}))
    state = CoordinatorState()
    state.completed(1, {"accuracy": 0.5, "loss": 1.0}, {})
    run_dir.save_state(state)
    out = tmp_path / "export"
    export_adapter(run_dir, out, "final", merged=False)
    return out, trained


def _framework_model(config: RunConfig, adapter: Adapter):
    base, tokenizer, fresh = load_base_model(config.model, config.model.labels, CPU)
    model = attach_lora(base, config.lora, config.model.task, fresh)
    set_adapter(model, adapter)
    return model.eval(), tokenizer


def _write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _hospital_rows(root: Path, count: int) -> list[dict]:
    lines = (root / "hospital-1.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_predicted_labels_and_probabilities_are_the_trained_model_s(
    classify_config: RunConfig, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path,
    pooling: str,
) -> None:
    config = replace_section(classify_config, "model", pooling=pooling)
    export, adapter = _exported(config, tmp_path)
    rows = _hospital_rows(classify_data[0], 10)
    unlabeled = _write_lines(tmp_path / "new.jsonl",
                             [{"text": r["text"]} for r in rows])  # no labels: new records
    out = tmp_path / "predictions.jsonl"
    loaded = load_export(export, "cpu")
    assert predict_file(loaded, unlabeled, out, batch_size=4, progress=False) == 10
    predicted = [json.loads(line) for line in out.read_text().splitlines()]

    model, tokenizer = _framework_model(config, adapter)
    labels = config.model.labels
    examples = [LabeledText(r["text"], labels[0], i) for i, r in enumerate(rows, start=1)]
    ids = {label: i for i, label in enumerate(labels)}
    features = encode_classification(examples, tokenizer, ids, config.model.max_length)
    expected = []
    with torch.no_grad():
        for feature in features:
            batch = {"input_ids": torch.tensor([feature["input_ids"]]),
                     "attention_mask": torch.tensor([feature["attention_mask"]])}
            expected.append(torch.softmax(model(**batch).logits[0], dim=-1))
    assert [p["line"] for p in predicted] == list(range(1, 11))
    for row, probabilities in zip(predicted, expected, strict=True):
        assert row["label"] == labels[int(probabilities.argmax())]
        assert np.allclose([row["probabilities"][label] for label in labels],
                           probabilities.numpy(), atol=1e-5)
        assert abs(sum(row["probabilities"].values()) - 1.0) < 1e-4


def test_evaluate_gives_the_hospitals_own_metrics(
    classify_config: RunConfig, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path
) -> None:
    export, adapter = _exported(classify_config, tmp_path)
    labelled = _write_lines(tmp_path / "labelled.jsonl", _hospital_rows(classify_data[0], 24))
    metrics = evaluate_file(load_export(export, "cpu"), labelled, batch_size=8)
    model, tokenizer = _framework_model(classify_config, adapter)
    labels = classify_config.model.labels
    examples = load_hospital_data(labelled, labels=labels).labeled_texts()
    features = encode_classification(examples, tokenizer, {x: i for i, x in enumerate(labels)},
                                     classify_config.model.max_length)
    expected = evaluate_classification(model, features, len(labels), 8,
                                       int(tokenizer.pad_token_id))
    assert metrics.keys() == expected.keys() == {"loss", "accuracy", "macro-f1", "num-examples"}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name


def test_generated_answers_and_metrics_are_the_trained_model_s(
    instruct_config: RunConfig, instruct_data: Path, tmp_path: Path
) -> None:
    export, adapter = _exported(instruct_config, tmp_path)
    rows = _hospital_rows(instruct_data, 6)
    prompts = _write_lines(tmp_path / "new.jsonl",
                           [{k: v for k, v in r.items() if k != "output"} for r in rows])
    out = tmp_path / "answers.jsonl"
    loaded = load_export(export, "cpu")
    assert predict_file(loaded, prompts, out, batch_size=3, max_new_tokens=4,
                        progress=False) == 6
    answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]

    model, tokenizer = _framework_model(instruct_config, adapter)
    examples = load_hospital_data(prompts, answers=False).prompt_responses()
    expected = []
    with torch.no_grad():
        for example in examples:  # one at a time, no padding: the reference
            ids = torch.tensor([prompt_token_ids(example, tokenizer)])
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=4, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(output[0, ids.shape[1]:],
                                             skip_special_tokens=True).strip())
    assert answers == expected
    assert any(answers)  # the comparison is not between empty strings only

    labelled = _write_lines(tmp_path / "labelled.jsonl", rows)
    metrics = evaluate_file(loaded, labelled, batch_size=3, max_new_tokens=4)
    generation = load_hospital_data(labelled).prompt_responses()
    reference = evaluate_generation(
        model, tokenizer, encode_generation(generation, tokenizer,
                                            instruct_config.model.max_length),
        generation, 3, len(generation), 4)
    assert metrics.keys() == reference.keys()
    assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert metrics["exact-match"] == reference["exact-match"]


def test_a_malformed_line_is_refused_with_file_and_line(
    classify_config: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export, _ = _exported(classify_config, tmp_path)
    bad = tmp_path / "new.jsonl"
    bad.write_text('{"text": "fracture of the wrist"}\n{"text": 12}\nnot json\n')
    out = tmp_path / "predictions.jsonl"
    code = main(["predict", str(export), "--data", str(bad), "--out", str(out),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2: field 'text' must be text" in err
    assert f"{bad}:3: not valid JSON" in err
    assert not out.exists()  # nothing half-written
    # evaluate needs each line's answer
    unlabeled = _write_lines(tmp_path / "unlabeled.jsonl", [{"text": "type 2 diabetes"}])
    assert main(["evaluate", str(export), "--data", str(unlabeled), "--device", "cpu"]) == 2
    assert f"{unlabeled}:1: missing field 'label'" in capsys.readouterr().err


def test_the_commands_write_predictions_and_a_metrics_table(
    classify_config: RunConfig, classify_data: tuple[Path, tuple[str, ...]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    export, _ = _exported(classify_config, tmp_path)
    labelled = _write_lines(tmp_path / "labelled.jsonl", _hospital_rows(classify_data[0], 8))
    out, metrics_json = tmp_path / "p.jsonl", tmp_path / "metrics.json"
    assert main(["predict", str(export), "--data", str(labelled), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 8
    assert main(["evaluate", str(export), "--data", str(labelled), "--device", "cpu",
                 "--json", str(metrics_json)]) == 0
    shown = capsys.readouterr().out
    metrics = json.loads(metrics_json.read_text())
    assert "Round-1 adapter" in shown and "accuracy" in shown
    assert f"{metrics['accuracy']:.4f}" in shown and metrics["num-examples"] == 8


def test_an_incomplete_export_directory_is_refused_clearly(
    classify_config: RunConfig, tmp_path: Path
) -> None:
    export, _ = _exported(classify_config, tmp_path)
    info = json.loads((export / EXPORT_INFO).read_text())
    (export / EXPORT_INFO).write_text(json.dumps({**info, "labels": []}))
    with pytest.raises(ExportDirectoryError, match="lists no labels"):
        load_export(export, "cpu")
    (export / EXPORT_INFO).unlink()
    with pytest.raises(ExportDirectoryError, match=f"has no {EXPORT_INFO}"):
        load_export(export, "cpu")
    (export / EXPORT_INFO).write_text(json.dumps(info))
    (export / "adapter_config.json").unlink()
    with pytest.raises(ExportDirectoryError, match="lacks adapter_config.json"):
        load_export(export, "cpu")
    with pytest.raises(ExportDirectoryError, match="is not a folder"):
        load_export(tmp_path / "nowhere", "cpu")


def _summary(base: dict[str, float], final: dict[str, float]) -> dict:
    return {"task": "classify", "base_test": {"weighted": base},
            "final_test": {"weighted": final}}


def test_the_verdict_says_better_worse_or_mixed_plainly() -> None:
    better = verdict(_summary({"accuracy": 0.1, "loss": 3.0}, {"accuracy": 0.3, "loss": 2.5}))
    assert better.startswith("Global model is better") and "0.1000 → 0.3000" in better
    worse = verdict(_summary({"accuracy": 0.3, "loss": 2.0}, {"accuracy": 0.2, "loss": 2.4}))
    assert "WORSE than the base model" in worse and "Do not deploy" in worse
    loss_rose = verdict(_summary({"accuracy": 0.3, "loss": 2.0}, {"accuracy": 0.3, "loss": 2.4}))
    assert "WORSE" in loss_rose
    mixed = verdict(_summary({"accuracy": 0.3, "loss": 2.0}, {"accuracy": 0.4, "loss": 2.4}))
    assert "NOT clearly better" in mixed and "fedtune evaluate" in mixed
    assert verdict(_summary({}, {})).startswith("No verdict")


def test_records_without_answers_are_read_only_when_asked(tmp_path: Path) -> None:
    chat = _write_lines(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Code for type 2 diabetes?"}]}])
    (example,) = load_hospital_data(chat, answers=False).prompt_responses()
    assert isinstance(example, PromptResponse) and example.response == ""
    assert example.messages is not None and example.messages[-1].role == "user"
    with pytest.raises(DataValidationError, match="last message must be the assistant"):
        load_hospital_data(chat)
    csv = tmp_path / "new.csv"
    csv.write_text("text\nfracture of the wrist\n")
    (row,) = load_hospital_data(csv, answers=False).labeled_texts()
    assert row.text == "fracture of the wrist" and row.label == ""
    with pytest.raises(DataValidationError, match="lacks column"):
        load_hospital_data(csv)
