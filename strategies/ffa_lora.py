"""FFA-LoRA (Sun et al. 2024): LoRA A frozen at the shared initial values, only B trained.

With every hospital's A identical and fixed, averaging the B matrices averages the products
B·A exactly (FedAvg of A and B separately does not), and DP noise only enters B. Hospitals
upload, and the coordinator expects, exactly ``uploaded_tensors(adapter, strategy)``: at
equal rank that halves the LoRA part of every upload.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedtune.core.adapters import Adapter, UpdateRejected
from fedtune.core.uploads import FFA_LORA, is_frozen
from fedtune.strategies.aggregate import AggregateUpdate
from fedtune.strategies.fedavg import FedAvg


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
