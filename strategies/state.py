"""The one shape every strategy's checkpoint has, and the checks shared by all strategies.

A strategy's state is ``{"meta": {...}, "arrays": {key: np.ndarray}}``:

* ``meta`` is JSON-able: ``{"strategy": name, "step": rounds applied, "hyperparameters":
  {...}}`` (server optimizers add ``"tensors"``: the names they hold moments for);
* ``arrays`` holds the optimizer moments as float64, keyed ``"<slot>/<tensor name>"``
  (e.g. ``"m/base_model...lora_B.weight"``); empty for FedAvg, FedProx and FFA-LoRA.

The split exists so that the run directory can store ``meta`` as readable JSON and the
arrays losslessly in safetensors, and hand back exactly what ``state_dict()`` produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def make_state(
    strategy: str,
    step: int,
    hyperparameters: Mapping[str, float],
    arrays: Mapping[str, np.ndarray] | None = None,
    **extra_meta: Any,
) -> dict[str, Any]:
    """A state dict; arrays are copied so later rounds cannot change a saved checkpoint."""
    meta: dict[str, Any] = {
        "strategy": strategy,
        "step": step,
        "hyperparameters": dict(hyperparameters),
        **extra_meta,
    }
    copied = {
        key: np.array(value, dtype=np.float64, copy=True) for key, value in (arrays or {}).items()
    }
    return {"meta": meta, "arrays": copied}


def check_meta(
    state: Mapping[str, Any], strategy: str, hyperparameters: Mapping[str, float]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a state into (meta, arrays) after refusing another strategy's or run's state.

    Resuming with different hyperparameters would silently continue a different optimizer
    from moments it did not produce, so any difference is an error naming both values. A
    bare ``{"strategy": ...}`` (the format before moments existed) is read as meta.
    """
    meta_raw = state.get("meta", state)
    if not isinstance(meta_raw, Mapping):
        raise ValueError("strategy state has no 'meta' mapping")
    meta = dict(meta_raw)
    saved = meta.get("strategy")
    if saved != strategy:
        raise ValueError(f"checkpoint holds state of {saved!r}, not {strategy!r}")
    saved_hyper = dict(meta.get("hyperparameters", hyperparameters))
    if saved_hyper != dict(hyperparameters):
        differing = sorted(
            key
            for key in set(saved_hyper) | set(hyperparameters)
            if saved_hyper.get(key) != hyperparameters.get(key)
        )
        detail = ", ".join(
            f"{key}: checkpoint {saved_hyper.get(key)!r}, configured {hyperparameters.get(key)!r}"
            for key in differing
        )
        raise ValueError(f"{strategy} checkpoint has other hyperparameters ({detail})")
    step = meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{strategy} checkpoint has an invalid step {step!r}")
    arrays_raw = state.get("arrays", {}) if "meta" in state else {}
    arrays = {str(key): np.asarray(value) for key, value in dict(arrays_raw).items()}
    return meta, arrays
