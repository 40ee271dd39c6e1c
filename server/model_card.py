"""The model card `fedtune export` writes next to an adapter (Hugging Face README.md style).

Everything in it comes from the run's own records, never from what someone types later: the
run configuration the hospitals got, the (ε, δ) each hospital's ledger reported, the
fingerprints of each hospital's training data and of the base model, the evaluation at the
hospitals. A hospital can show it to an auditor together with its own ledger and log.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedtune.core.config import RunConfig
from fedtune.server.records import completed_rounds
from fedtune.server.report import headline_metric
from fedtune.server.run_dir import RunDirectory
from fedtune.server.versions import list_versions

METHOD_TITLES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA³", "prompt-tuning": "prompt-tuning",
                 "prefix-tuning": "prefix-tuning"}


def method_settings(config: RunConfig) -> str:
    """The PEFT method and the settings that shaped its trained values, in one line."""
    method, lora = config.adapter.method, config.lora
    targets = ", ".join(lora.target_modules) or "the architecture default"
    if method in ("lora", "dora"):
        return (f"{METHOD_TITLES[method]}: r = {lora.r}, α = {lora.alpha:g}, dropout = "
                f"{lora.dropout:g}, target modules = {targets}")
    if method == "ia3":
        return f"IA³: target modules = {targets}"
    return f"{method}: {config.adapter.num_virtual_tokens} virtual tokens"

def pseudonym(hospital: str, run_id: str) -> str:
    """A stable per-run pseudonym: the same hospital is the same participant within a run's
    records, but the name cannot be read off the card (nor linked across runs)."""
    digest = hashlib.sha256(f"fedtune-pseudonym/{run_id}/{hospital}".encode()).hexdigest()
    return f"participant-{digest[:8]}"


def model_card(
    run_dir: RunDirectory, server_round: int, base_model_sha256: str, pseudonymize: bool
) -> str:
    """The card's Markdown (with YAML front matter) for the adapter of `server_round`."""
    config = run_dir.config()
    summary = run_dir.summary() if (run_dir.path / "summary.json").is_file() else {}
    trained = [r for r in completed_rounds(run_dir.records()) if r.round <= server_round]
    hospitals = sorted({h for r in trained for h in r.hospitals_used})
    everyone = set(hospitals)
    for split in ("base_test", "final_test"):
        everyone.update(summary.get(split, {}).get("per_hospital", {}))
    shown = {h: pseudonym(h, run_dir.run_id) if pseudonymize else h for h in everyone}
    privacy: dict[str, Any] = {}
    lineage: dict[str, Any] = {}
    for record in trained:
        privacy.update(record.privacy_per_hospital or {})
        lineage.update(record.lineage)
    version = next((v for v in list_versions(run_dir) if v.server_round == server_round), None)
    metric = headline_metric(config.model.task)
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {config.model.source}",
        f"tags: [fedtune, federated-learning, {config.adapter.method}, differential-privacy]",
        "---",
        "",
        f"# Federated {METHOD_TITLES[config.adapter.method]} adapter: {config.model.task} on "
        f"{config.model.source}",
        "",
        f"Trained with fedtune by {len(hospitals)} hospital(s) in {len(trained)} federated "
        f"round(s); this is the global adapter of round {server_round}"
        + (" (the best validated round)." if summary.get("best_round") == server_round else "."),
        "",
        "## Base model and adapter",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{config.model.source}` |",
        f"| base model files SHA-256 | `{base_model_sha256}` |",
        f"| adapter SHA-256 (fedtune) | `{version.sha256 if version else 'not kept'}` |",
        f"| adapter method | {method_settings(config)} |",
        *(
            [
                "| pooling | mean of the token states under the attention mask, L2-normalized "
                "(load with fedtune's `fedtune.core.model.load_base_model`, or apply the same "
                "pooling: the base model's own pooler gives other predictions) |"
            ]
            if config.model.task == "classify" and config.model.pooling == "mean"
            else []
        ),
        f"| strategy | {config.federation.strategy} (server learning rate "
        f"{config.federation.server_learning_rate:g}) |",
        f"| rounds | {len(trained)} completed up to round {server_round}, "
        f"{config.federation.rounds} planned |",
        f"| secure aggregation | {_secure_aggregation(config)} |",
        f"| run id | `{run_dir.run_id}` |",
        "",
        "## Participating hospitals, their data and their privacy guarantee",
        "",
        _privacy_intro(config),
        "",
        "| hospital | protects | ε | δ | ε budget | training data SHA-256 | examples "
        "| base model SHA-256 seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for hospital in hospitals:
        guarantee = privacy.get(hospital, {})
        seen = lineage.get(hospital, {})
        eps = (f"{guarantee['epsilon']:.3f}" if "epsilon" in guarantee
               else f"≤ {guarantee['epsilon-target']:.3f}" if "epsilon-target" in guarantee
               else "no DP")
        delta = (f"{guarantee['delta']:.0e}" if "delta" in guarantee
                 else "kept at the hospital" if "epsilon-target" in guarantee else "-")
        budget = f"{guarantee['epsilon-budget']:g}" if "epsilon-budget" in guarantee else "-"
        unit = ("-" if not guarantee else "each patient"
                if guarantee.get("dp-patient-level", 0.0) > 0 else "each record")
        examples = seen.get("data_examples", "not disclosed")
        lines.append(
            f"| {shown[hospital]} | {unit} | {eps} | {delta} | {budget} | "
            f"`{seen.get('data_sha256', 'not reported')}` | {examples} | "
            f"`{str(seen.get('model_sha256', 'not reported'))[:16]}…` |"
        )
    labels = {h: json.loads(str(s["data_labels"])) for h, s in lineage.items()
              if h in shown and "data_labels" in s}
    if labels:
        lines += ["", "Label counts of the training data, where the hospital shares them:", ""]
        for hospital, counts in sorted(labels.items()):
            top = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
            lines.append(f"- {shown[hospital]}: {top}")
    lines += ["", "## Evaluation at the hospitals", ""]
    lines += _evaluation(summary, version.validation if version else {}, metric, shown)
    lines += [
        "",
        "## Intended use and limitations",
        "",
        "- Research and decision support under clinical oversight; not a medical device, and "
        "not validated for diagnosis or treatment decisions.",
        "- Evaluated only on the participating hospitals' held-out splits, which share their "
        "populations, coding practice and data biases; validate locally before any use.",
        "- The privacy guarantee is (ε, δ) per hospital for the unit its row names (each "
        "patient, or each record: then a patient with k records only at about k·ε), composed "
        "over every round it took part in (its ledger); it does not cover the reported "
        "metrics, and a large ε is a weak guarantee.",
        "- Secure aggregation hides each hospital's update from the coordinator, not the "
        "final model from anyone who receives it.",
        "",
        "Generated by `fedtune export` from the run directory's records (run-config.json, "
        "metrics.jsonl, summary.json).",
    ]
    return "\n".join(lines) + "\n"


def _secure_aggregation(config: RunConfig) -> str:
    settings = config.secure_aggregation
    if not settings.enabled:
        return "**off** (the coordinator saw each hospital's update in clear)"
    return f"on (pairwise masking, threshold {settings.threshold})"


def _privacy_intro(config: RunConfig) -> str:
    if not config.privacy.enabled:
        return ("Differential privacy was not requested by the coordinator; a hospital with a "
                "privacy budget trains with DP anyway (its row then shows its ε).")
    unit = "each patient (all of a patient's records together)" if (
        config.privacy.unit == "patient") else "each record (a patient with k records: about k·ε)"
    return (f"Differential privacy with Opacus DP-SGD at every hospital, protecting {unit} "
            f"unless a hospital's row says it protects each patient; "
            f"{config.privacy.accountant} accountant, target ε = "
            f"{config.privacy.target_epsilon:g} per run; ε and δ below are what each hospital's "
            "privacy ledger reported after its last round in this adapter. (ε, δ) means: "
            "whether or not one such unit's data was used, every update the hospital sent is "
            "almost equally likely (within a factor e^ε), except with probability δ. Not "
            "covered: the training losses and evaluation metrics hospitals reported, and which "
            "rounds the coordinator ran within the budget.")


def _evaluation(
    summary: dict[str, Any], validation: dict[str, float], metric: str, shown: dict[str, str]
) -> list[str]:
    lines = []
    if validation:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in sorted(validation.items()))
        lines.append(f"Validation of this round (example-weighted over hospitals): {parts}.")
    base, final = summary.get("base_test", {}), summary.get("final_test", {})
    if final.get("weighted"):
        lines += ["", f"Held-out test splits, base model vs the run's final adapter "
                      f"(round {summary.get('final_round')}):", "",
                  f"| hospital | base {metric} | final {metric} | base loss | final loss |",
                  "|---|---|---|---|---|"]
        rows = {**{h: h for h in final.get("per_hospital", {})}, "all (weighted)": None}
        for hospital in rows:
            b = base.get("weighted" if rows[hospital] is None else "per_hospital", {})
            f = final.get("weighted" if rows[hospital] is None else "per_hospital", {})
            if rows[hospital] is not None:
                b, f = b.get(hospital, {}), f.get(hospital, {})
            name = shown.get(hospital, hospital) if rows[hospital] is not None else hospital
            lines.append(f"| {name} | {_num(b.get(metric))} | {_num(f.get(metric))} | "
                         f"{_num(b.get('loss'))} | {_num(f.get('loss'))} |")
    return lines or ["No evaluation was recorded."]


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def write_model_card(out_dir: Path, text: str) -> Path:
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
