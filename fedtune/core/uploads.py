"""Which adapter tensors a hospital uploads, per strategy: shared by node and coordinator.

Under FFA-LoRA every hospital's A matrices are identical and fixed, so only the B matrices
(and any trained head) travel; the node encodes exactly ``uploaded_tensors(adapter,
strategy)`` and the coordinator expects exactly that. Kept in the core so that neither side
imports the other or the strategies package to agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FROZEN_IN_FFA = "lora_A"
FFA_LORA = "ffa-lora"
_BYTES_PER_VALUE = 4  # float32 on the wire, whatever dtype the adapter is held in


def is_frozen(name: str) -> bool:
    """A LoRA A tensor (PEFT names it ``....lora_A.weight``), never sent under FFA-LoRA."""
    return f".{FROZEN_IN_FFA}." in name


def uploaded_tensors(adapter: Mapping[str, np.ndarray], strategy: str) -> dict[str, np.ndarray]:
    """The tensors a hospital sends under ``strategy``: all but LoRA A for ffa-lora, else all."""
    if strategy == FFA_LORA:
        return {name: value for name, value in adapter.items() if not is_frozen(name)}
    return dict(adapter)


def lora_upload_bytes(adapter: Mapping[str, np.ndarray], strategy: str) -> int:
    """Bytes of the float32 values uploaded per round (before masking) under ``strategy``."""
    return _BYTES_PER_VALUE * int(
        sum(np.size(value) for value in uploaded_tensors(adapter, strategy).values())
    )
