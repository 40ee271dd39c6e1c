"""Adapter deltas ↔ the one ring vector a hospital masks: [w·x (fixed point)…, w].

The layout is the global adapter's tensor names in sorted order, flattened, followed by one
slot for the weight. Both sides derive it from the global adapter they share, so no layout
travels with the payload (and a payload of the wrong length is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.core.adapters import Adapter
from fedtune.core.secagg.fixed_point import (
    ClipResult,
    FixedPointCodec,
    clip_to_norm,
    decode_weight_sum,
    encode_weight,
)


def layout_size(reference: Adapter) -> int:
    """Ring elements in one hospital's masked input: every adapter value, plus the weight."""
    return sum(int(np.prod(reference[name].shape)) for name in sorted(reference)) + 1


def flatten(adapter: Adapter, reference: Adapter) -> np.ndarray:
    """The adapter's values in the reference layout (float64)."""
    if set(adapter) != set(reference):
        raise ValueError("the delta's tensors differ from the global adapter's")
    parts = []
    for name in sorted(reference):
        if adapter[name].shape != reference[name].shape:
            raise ValueError(f"{name}: shape {adapter[name].shape} ≠ {reference[name].shape}")
        parts.append(np.asarray(adapter[name], dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, reference: Adapter) -> Adapter:
    """Inverse of `flatten` (float32 tensors in the reference shapes)."""
    out: Adapter = {}
    offset = 0
    for name in sorted(reference):
        shape = reference[name].shape
        size = int(np.prod(shape))
        out[name] = vector[offset : offset + size].reshape(shape).astype(np.float32)
        offset += size
    return out


@dataclass(frozen=True)
class EncodedInput:
    """A hospital's input before masking, and what clipping did to its delta."""

    ring: np.ndarray  # uint32, layout_size(reference) elements
    clip: ClipResult
    weight: int


def encode_input(
    delta: Adapter, reference: Adapter, weight: int, codec: FixedPointCodec
) -> EncodedInput:
    """Clip the delta to the norm bound, weight it, and encode it with its weight."""
    clip = clip_to_norm(flatten(delta, reference), codec.clip_norm)
    return EncodedInput(encode_values(clip.vector * weight, weight, codec), clip, weight)


def encode_values(weighted: np.ndarray, weight: int, codec: FixedPointCodec) -> np.ndarray:
    """Already bounded w·x values (flat, layout order) and the weight → the ring vector."""
    ring = np.empty(weighted.size + 1, dtype=np.uint32)
    ring[:-1] = codec.encode(weighted)
    ring[-1] = encode_weight(weight, codec.max_weight)
    return ring


def decode_aggregate(
    total: np.ndarray, hospitals: int, codec: FixedPointCodec, reference: Adapter
) -> tuple[Adapter, int]:
    """The unmasked ring sum → (Σ wᵢ·Δᵢ as an adapter, Σ wᵢ); refuses impossible sums."""
    if total.shape != (layout_size(reference),):
        raise ValueError("the aggregate has the wrong length for this adapter")
    weight_sum = decode_weight_sum(total[-1], hospitals, codec.max_weight)
    return unflatten(codec.decode_sum(total[:-1], hospitals), reference), weight_sum
