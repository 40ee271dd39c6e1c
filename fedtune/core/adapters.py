"""Adapter tensors as plain numpy arrays: the payload of every round.

An adapter is an ordered mapping from PEFT state-dict names to float32 arrays. Everything the
coordinator does to adapters (checking a hospital's update, applying the aggregated delta)
is here as pure functions, with no Flower or torch import, so it is tested on small arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

Adapter = dict[str, np.ndarray]


class UpdateRejected(ValueError):
    """A hospital's update was refused; the global adapter is left unchanged."""

    def __init__(self, hospital: str, reason: str) -> None:
        super().__init__(f"update from {hospital} refused: {reason}")
        self.hospital = hospital
        self.reason = reason


def as_float32(adapter: Mapping[str, np.ndarray]) -> Adapter:
    """Copy to contiguous float32: the wire format (bfloat16 cannot travel in numpy)."""
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in adapter.items()}


def adapter_delta(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> Adapter:
    """local - global, per tensor: what a hospital sends instead of its weights."""
    if local.keys() != global_.keys():
        raise ValueError("local and global adapters have different tensor names")
    return {name: (local[name] - global_[name]).astype(np.float32) for name in global_}


def check_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], hospital: str
) -> None:
    """Refuse an update whose names, shapes or values do not fit the global adapter.

    A wrong shape would crash or silently broadcast during aggregation, and a single NaN
    would poison the global adapter for every hospital: both are refused with the hospital
    named, before anything is merged.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing tensors {_first(missing)}")
        if extra:
            detail.append(f"unexpected tensors {_first(extra)}")
        raise UpdateRejected(hospital, "; ".join(detail))
    for name, expected in reference.items():
        value = update[name]
        if value.shape != expected.shape:
            raise UpdateRejected(
                hospital, f"tensor {name} has shape {value.shape}, expected {expected.shape}"
            )
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise UpdateRejected(hospital, f"tensor {name} has {bad} NaN/infinite values")


def apply_delta(
    global_: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], scale: float
) -> Adapter:
    """global + scale * delta, computed on a copy and checked before anyone swaps it in."""
    check_update(delta, global_, hospital="the aggregate")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below
        updated = {
            name: (global_[name] + scale * delta[name]).astype(np.float32) for name in global_
        }
    check_update(updated, global_, hospital="the new global adapter")
    return updated


def adapter_norm(adapter: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors, as one vector."""
    squares = (float(np.sum(np.square(v, dtype=np.float64))) for v in adapter.values())
    return float(np.sqrt(sum(squares)))


def adapter_sha256(adapter: Mapping[str, np.ndarray]) -> str:
    """A fingerprint of an adapter's exact float32 values (names, shapes, bytes, in order).

    Logged with every round attempt, so anyone can check that an aborted round left the
    global adapter as it was and that its retry started from the same one.
    """
    digest = hashlib.sha256()
    for name in sorted(adapter):
        value = np.ascontiguousarray(adapter[name], dtype=np.float32)
        digest.update(f"{name}:{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def num_parameters(adapter: Mapping[str, np.ndarray]) -> int:
    """How many scalars an adapter holds (4 bytes each on the wire)."""
    return int(sum(v.size for v in adapter.values()))


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
