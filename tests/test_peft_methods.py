"""PEFT methods beyond LoRA ([adapter] method), through the whole pipeline on tiny models.

Each method is peft's own (no hand-written layers): a federated round through the real
ClientApp with secure aggregation equals the plain round within the fixed-point bound, the
export loads with plain `PeftModel.from_pretrained` and gives the framework's logits, and
DP-SGD is offered only where Opacus' per-sample gradients equal per-example autograd.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from fake_grid import InProcessGrid
from opacus import GradSampleModule
from peft import PeftModel
from tiny import in_clear, replace_section, save_tiny_bert
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtune.client.hospital import HospitalIdentity
from fedtune.client.losses import PerExampleLoss, model_inputs
from fedtune.client.node_settings import parse_node_settings
from fedtune.client.privacy import plan_round
from fedtune.core.config import (
    ADAPTER_METHODS,
    DP_ADAPTER_METHODS,
    AdapterSettings,
    ConfigError,
    RunConfig,
    load_run_config,
)
from fedtune.core.initial_adapter import initial_global_adapter
from fedtune.core.model import attach_adapter, get_adapter, load_base_model, set_adapter
from fedtune.server.export import ExportError, export_adapter
from fedtune.server.rounds import run_federation
from fedtune.server.run_dir import RunDirectory

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_method(config: RunConfig, method: str) -> RunConfig:
    return dataclasses.replace(config, adapter=AdapterSettings(method=method))


def model_of(config: RunConfig) -> PeftModel:
    torch.manual_seed(0)
    base, _tokenizer, fresh = load_base_model(config.model, config.model.labels, CPU)
    return attach_adapter(base, config.adapter, config.lora, config.model.task, fresh)


def _run(config: RunConfig, path: Path) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.create(config)
    run_federation(InProcessGrid(3), config, run_dir, initial_global_adapter(config),
                   say=lambda _line: None)
    return run_dir


@pytest.mark.parametrize("method", [*ADAPTER_METHODS, *(f"{m}+dp" for m in DP_ADAPTER_METHODS)])
def test_a_secure_round_equals_the_plain_round_for_every_method(
    classify_config: RunConfig, tmp_path: Path, method: str
) -> None:
    method, _, dp = method.partition("+")
    if dp:  # DP-SGD at each hospital: fresh noise in every run, so only the secure run is checked
        classify_config = replace_section(classify_config, "privacy", enabled=True,
                                          target_epsilon=8.0, max_physical_batch_size=8)
    config = replace_section(with_method(classify_config, method), "federation", rounds=1)
    config = replace_section(config, "secure_aggregation", clip_norm=1.0, max_weight=64)
    secure = _run(config, tmp_path / "secure")
    plain = secure if dp else _run(in_clear(config), tmp_path / "plain")
    start, a, b = (run.load_adapter(r) for run, r in ((secure, 0), (secure, 1), (plain, 1)))
    trained = [name for name in start if "classifier" not in name]  # the method's own values
    assert trained, sorted(start)
    moved = max(float(np.max(np.abs(b[k] - start[k]))) for k in trained)
    assert moved > 1e-5  # the method's values did train
    for name in start:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6 * max(moved, 1e-3))
    rounds = [r for r in secure.read_metrics() if r["event"] == "round"]
    assert rounds[0]["secure_aggregation"]["secure_aggregation"]
    assert bool(rounds[0].get("privacy_per_hospital")) == bool(dp)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_export_loads_with_plain_peft_and_gives_the_frameworks_logits(
    classify_config: RunConfig, tmp_path: Path, method: str
) -> None:
    config = with_method(classify_config, method)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(config)
    adapter = initial_global_adapter(config)
    rng = np.random.default_rng(1)
    adapter = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in adapter.items()}
    run_dir.save_adapter(0, adapter)
    out = tmp_path / "export"
    export_adapter(run_dir, out, "0", merged=False)

    texts = ["chest pain on exertion", "fracture of the left wrist"]
    ours = model_of(config)
    set_adapter(ours, adapter)
    ours.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(
        config.model.source, num_labels=len(config.model.labels))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(plain(**batch).logits.numpy(), ours(**batch).logits.numpy(),
                                   atol=1e-5)
    info = json.loads((out / "fedtune-export.json").read_text())
    assert info["adapter_method"] == method
    card = (out / "README.md").read_text()
    assert f"tags: [fedtune, federated-learning, {method}," in card
    if method in ("prompt-tuning", "prefix-tuning"):
        with pytest.raises(ExportError, match="--merged is not possible"):
            export_adapter(run_dir, tmp_path / "merged", "0", merged=True)


@pytest.mark.parametrize("method", DP_ADAPTER_METHODS)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_per_example_autograd(
    classify_config: RunConfig, tmp_path: Path, method: str, mode: str
) -> None:
    """What DP-SGD clips: one gradient per example, for every trained value of the method."""
    source = save_tiny_bert(tmp_path / "bert", dropout=0.0)  # the batch and the single
    config = with_method(replace_section(classify_config, "model", source=str(source)), method)
    model = model_of(config)  # examples see the same network
    model.train()  # Opacus records activations in training mode only
    tokenizer = AutoTokenizer.from_pretrained(config.model.source)
    texts = ["chest pain", "fracture of the left wrist", "type 2 diabetes", "asthma attack"]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([0, 1, 2, 0])
    loss_fn = PerExampleLoss("classify", reduction="sum")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    expected = []
    for i in range(len(texts)):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss_fn(model(**model_inputs(one)).logits, one["labels"]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in trained})

    sampled = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    model.zero_grad()
    loss_fn(sampled(**model_inputs(batch)).logits, batch["labels"]).backward()
    for name, param in trained:
        assert param.grad_sample is not None, name
        assert param.grad_sample.shape[0] == len(texts), name  # one row per example
        for i in range(len(texts)):
            torch.testing.assert_close(param.grad_sample[i], expected[i][name], atol=1e-6,
                                       rtol=1e-4)
    sampled._close()


@pytest.mark.parametrize("method", sorted(set(ADAPTER_METHODS) - set(DP_ADAPTER_METHODS)))
def test_opacus_gives_no_correct_per_sample_gradients_for_the_methods_refused_under_dp(
    classify_config: RunConfig, tmp_path: Path, method: str
) -> None:
    """Why DP refuses them: Opacus fails on their layers or, for prompt tuning, forms one
    gradient for the whole batch (one prompt repeated), which it would clip as one sample."""
    source = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    config = with_method(replace_section(classify_config, "model", source=str(source)), method)
    model = model_of(config)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(config.model.source)
    batch = dict(tokenizer(["chest pain", "asthma", "fracture"], return_tensors="pt",
                           padding=True))
    labels = torch.tensor([0, 1, 2])
    try:
        sampled = GradSampleModule(model, loss_reduction="sum")
        logits = sampled(**batch).logits
        PerExampleLoss("classify", reduction="sum")(logits, labels).backward()
    except (TypeError, ValueError, AttributeError, RuntimeError, NotImplementedError):
        return  # refused by Opacus itself
    own = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    rows = [None if p.grad_sample is None else p.grad_sample.shape[0] for p in own]
    assert any(r != 3 for r in rows), rows  # some trained value has no per-example gradient


def test_prompt_tuning_trains_a_causal_lm_on_its_answers(instruct_config: RunConfig) -> None:
    """The virtual tokens lengthen the logits; the loss reads the input's positions."""
    config = with_method(instruct_config, "prompt-tuning")
    model = model_of(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model.source)
    batch = dict(tokenizer(["fever and cough", "broken arm"], return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].clone()
    loss_fn = PerExampleLoss("instruct", reduction="mean")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = get_adapter(model)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        logits = model(**model_inputs(batch)).logits
        assert logits.shape[1] == batch["labels"].shape[1] + config.adapter.num_virtual_tokens
        loss = loss_fn(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = get_adapter(model)
    assert not np.array_equal(after["prompt_embeddings"], before["prompt_embeddings"])


def _write(path: Path, text: str, source: Path) -> Path:
    path.write_text(f'[model]\nsource = "{source}"\ntask = "classify"\nlabels = ["a", "b"]\n'
                    + "[secure_aggregation]\nthreshold = 2\n" + text)
    return path


def test_a_file_names_its_adapter_once_with_the_methods_own_keys(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    config = load_run_config(_write(tmp_path / "a.toml", '[adapter]\nmethod = "dora"\nr = 4\n'
                                    'alpha = 8\n[privacy]\nenabled = false\n', tiny_bert_dir))
    assert config.adapter.method == "dora" and config.lora.r == 4 and config.lora.alpha == 8
    assert RunConfig.from_json(config.to_json()) == config  # the form sent to hospitals
    legacy = load_run_config(_write(tmp_path / "b.toml", "[lora]\nr = 4\n", tiny_bert_dir))
    assert legacy.adapter.method == "lora" and legacy.lora.r == 4

    written = tmp_path / "written.toml"  # every section, as fedtune writes a run.toml itself
    written.write_text(tomli_w.dumps(config.to_dict()))
    assert load_run_config(written) == config
    with pytest.raises(ConfigError, match=r"unknown key 'r' in \[lora\] for method "
                                          r"'prompt-tuning'; allowed: method, num_virtual"):
        load_run_config(_write(tmp_path / "f.toml", '[lora]\nr = 4\n[adapter]\n'
                               'method = "prompt-tuning"\n', tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"both \[lora\] and \[adapter\] set the LoRA"):
        load_run_config(_write(tmp_path / "c.toml", '[lora]\nr = 4\n[adapter]\nr = 8\n',
                               tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"unknown key 'r' in \[adapter\] for method 'ia3'; "
                                          r"allowed: feedforward_modules, method, target_modules"):
        load_run_config(_write(tmp_path / "d.toml", '[adapter]\nmethod = "ia3"\nr = 4\n',
                               tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"unknown adapter.method 'adalora'; allowed: dora, ia3"):
        load_run_config(_write(tmp_path / "e.toml", '[adapter]\nmethod = "adalora"\n',
                               tiny_bert_dir))


@pytest.mark.parametrize("method", sorted(set(ADAPTER_METHODS) - set(DP_ADAPTER_METHODS)))
def test_dp_is_refused_for_a_method_opacus_cannot_compute_per_sample_gradients_for(
    classify_config: RunConfig, tmp_path: Path, method: str
) -> None:
    dp = replace_section(classify_config, "privacy", enabled=True)
    with pytest.raises(ConfigError, match=f"adapter.method = '{method}' cannot be trained with "
                                          "differential privacy"):
        with_method(dp, method)
    # A hospital with its own budget trains with DP whatever the run says: refused there too.
    config = with_method(replace_section(classify_config, "privacy", enabled=False), method)
    identity = HospitalIdentity(name="st-anna", data_path=tmp_path / "d.jsonl", simulated=False)
    node = parse_node_settings({"privacy-epsilon-budget": 8.0,
                               "privacy-ledger": str(tmp_path / "ledger.json")})
    with pytest.raises(ConfigError, match="this hospital trains with DP"):
        plan_round(config, identity, node, num_units=50, num_records=50, run_id="run-1")
    assert not (tmp_path / "ledger.json").exists()  # refused before anything was charged


def test_method_combinations_that_cannot_work_are_refused(classify_config: RunConfig) -> None:
    with pytest.raises(ConfigError, match="'ffa-lora' freezes LoRA's A matrices and needs "
                                          "adapter.method = 'lora'"):
        with_method(replace_section(classify_config, "federation", strategy="ffa-lora"), "dora")
    with pytest.raises(ConfigError, match="cache_frozen_layers = true cannot be used with "
                                          "adapter.method = 'prefix-tuning'"):
        with_method(replace_section(classify_config, "train", cache_frozen_layers=True),
                    "prefix-tuning")
    dp = replace_section(classify_config, "privacy", enabled=True, grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="needs privacy.grad_sample_mode = 'hooks'"):
        with_method(dp, "prefix-tuning")


def test_the_shipped_method_comparison_runs_dp_arms_only_for_dp_capable_methods(
    tmp_path: Path,
) -> None:
    from fedtune.simulations.experiment import load_experiment
    from fedtune.simulations.sweep import plan_runs, run_config_for

    repo = Path(__file__).resolve().parents[1]
    experiment = load_experiment(repo / "simulations" / "peft_methods.toml")
    runs = {spec.key: spec for _point, spec in plan_runs(experiment)}
    methods = {(spec.adapter_method, spec.arm) for spec in runs.values()}
    assert methods == {(m, "federated") for m in ADAPTER_METHODS} | {
        (m, "federated-dp") for m in DP_ADAPTER_METHODS}
    assert "federated-h3-a1-r4-fedavg-s0" in runs  # LoRA keeps the keys earlier sweeps used
    (tmp_path / "labels.json").write_text(json.dumps(["A00-B99", "C00-D49"]))
    for spec in runs.values():
        config = run_config_for(experiment, spec, tmp_path, tmp_path / spec.key)
        assert config.adapter.method == spec.adapter_method
        written = tmp_path / f"{spec.key}.toml"  # the run.toml the sweep writes and reads
        written.write_text(tomli_w.dumps(config.to_dict()))
        assert load_run_config(written) == config
