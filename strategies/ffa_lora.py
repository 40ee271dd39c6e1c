"""FFA-LoRA (Sun et al. 2024): LoRA A frozen at the shared initial values, only B trained.

With every hospital's A identical and fixed, averaging the B matrices averages the products
B·A exactly (FedAvg of A and B separately does not), and DP noise only enters B. Hospitals
upload, and the coordinator expects, exactly ``uploaded_tensors(adapter, strategy)``: at
equal rank that halves the LoRA part of every upload.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedtune.adapters import Adapter, UpdateRejected
from strategies.aggregate import AggregateUpdate
from strategies.fedavg import FedAvg

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


class FFALoRA(FedAvg):
    """Server side: FedAvg over the tensors received, which must not include any LoRA A."""

    name = FFA_LORA

    def apply(self, global_adapter: Mapping[str, np.ndarray], update: AggregateUpdate) -> Adapter:
        """Refuse an aggregate touching A: it would break the frozen shared A of all hospitals."""
        frozen = sorted(name for name in update.weighted_delta_sum if is_frozen(name))
        if frozen:
            raise UpdateRejected(
                "the aggregate",
                f"ffa-lora keeps LoRA A frozen, but the update holds {len(frozen)} A tensor(s) "
                f"(first: {frozen[0]})",
            )
        return super().apply(global_adapter, update)
