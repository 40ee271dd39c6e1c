"""Fixed-point encoding of weighted deltas in Z_2^32, sized so the sum cannot wrap.

Masks are added modulo 2^32, so the hospitals' weighted deltas must be integers in that ring.
Each hospital clips its delta to L2 norm C, so every coordinate satisfies |x| ≤ C, and its
weight w is at most W. With n hospitals the true sum of every coordinate lies in
[−n·W·C, n·W·C]; the scale s is chosen so that n·(W·C·s + 1) < 2^31 (the +1 is the most a
stochastic rounding can add). The decoded sum therefore never wraps, and a decoded value
outside that range proves that some hospital did not clip: it is refused, never wrapped.

Stochastic rounding keeps the encoding unbiased: E[round(v)] = v, so rounding errors average
out across hospitals instead of adding up in one direction. Its randomness need not be secret
(the masks hide the result), but it comes from a generator local to the call, never numpy's
global state, so nothing else in the process can influence or observe it.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
_HALF = 2 ** (RING_BITS - 1)


class FixedPointOverflow(ValueError):
    """A value does not fit the fixed-point range: it would wrap, so it is refused."""


@dataclass(frozen=True)
class ClipResult:
    """A delta after clipping to the norm bound, with what was done to it."""

    vector: np.ndarray  # float64, norm ≤ clip_norm
    original_norm: float
    clipped: bool


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> ClipResult:
    """Scale the vector down to L2 norm `clip_norm` if it is longer; never up."""
    if clip_norm <= 0:
        raise ValueError(f"the clip norm must be positive, got {clip_norm}")
    values = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise FixedPointOverflow("the delta has NaN or infinite values; it cannot be encoded")
    norm = float(np.linalg.norm(values))
    if norm <= clip_norm:
        return ClipResult(values, norm, False)
    # Slightly below the bound so floating-point rounding cannot push a coordinate over it.
    return ClipResult(values * (clip_norm / norm) * (1 - 1e-12), norm, True)


@dataclass(frozen=True)
class FixedPointCodec:
    """Encoding of Σ wᵢ·xᵢ for up to `num_hospitals` hospitals with |xᵢ| ≤ C and wᵢ ≤ W."""

    clip_norm: float
    max_weight: int
    num_hospitals: int

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.max_weight < 1 or self.num_hospitals < 1:
            raise ValueError("clip_norm, max_weight and num_hospitals must be positive")
        if self.scale < 1.0:
            raise ValueError(
                f"{self.num_hospitals} hospitals × weight {self.max_weight} × clip norm "
                f"{self.clip_norm} do not fit in {RING_BITS}-bit fixed point; lower "
                "secure_aggregation.max_weight or clip_norm"
            )

    @property
    def scale(self) -> float:
        """Units per 1.0 of w·x: the largest that keeps n·(W·C·s + 1) below 2^31."""
        per_hospital = (_HALF - 1) / self.num_hospitals - 1
        return per_hospital / (self.max_weight * self.clip_norm)

    @property
    def sum_bound(self) -> float:
        """The largest |Σ wᵢ·xᵢ| coordinate honest hospitals can produce, in w·x units."""
        return self.num_hospitals * self.max_weight * self.clip_norm

    def error_bound(self, hospitals: int) -> float:
        """Worst-case |decoded − exact| per coordinate of the sum, in w·x units."""
        return hospitals / self.scale

    def encode(self, weighted: np.ndarray) -> np.ndarray:
        """w·x (float) → uint32 ring elements, stochastically rounded."""
        values = np.asarray(weighted, dtype=np.float64) * self.scale
        limit = self.max_weight * self.clip_norm * self.scale * (1 + 1e-9)
        if values.size and float(np.max(np.abs(values))) > limit:
            raise FixedPointOverflow(
                "a weighted delta coordinate exceeds weight × clip norm; clip before encoding"
            )
        # Within the tolerance above, pull values back onto the bound: n·(W·C·s + 1) must
        # hold exactly, or n extreme inputs could round past 2^31 and wrap.
        bound = self.max_weight * self.clip_norm * self.scale
        values = np.clip(values, -bound, bound)
        rng = np.random.default_rng(secrets.randbits(128))
        floor = np.floor(values)
        rounded = floor + (rng.random(values.shape) < (values - floor))
        return rounded.astype(np.int64).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, hospitals: int) -> np.ndarray:
        """The summed ring elements of `hospitals` hospitals → Σ w·x (float64).

        Refuses a sum outside what that many clipped hospitals can produce: it can only come
        from a hospital that skipped clipping (or a corrupted payload), and would be wrong.
        """
        signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
        limit = hospitals * (self.max_weight * self.clip_norm * self.scale + 1)
        if signed.size and float(np.max(np.abs(signed))) > limit:
            raise FixedPointOverflow(
                "the unmasked sum is outside the range clipped deltas can produce: a hospital "
                "did not clip its delta or its payload was corrupted"
            )
        return signed / self.scale


def encode_weight(weight: int, max_weight: int) -> np.uint32:
    """A hospital's weight (an example count) as one ring element: an exact integer."""
    if not 1 <= weight <= max_weight:
        raise FixedPointOverflow(f"weight {weight} is outside [1, {max_weight}]")
    return np.uint32(weight)


def decode_weight_sum(total: np.uint32 | int, hospitals: int, max_weight: int) -> int:
    """Σ wᵢ from the ring; refused unless it is what `hospitals` honest weights can sum to."""
    value = int(total)
    if not hospitals <= value <= hospitals * max_weight:
        raise FixedPointOverflow(
            f"the unmasked weight sum {value} is impossible for {hospitals} hospitals with "
            f"weights in [1, {max_weight}]"
        )
    return value


def required_bits(codec: FixedPointCodec) -> float:
    """How many bits the sum uses (for reports): log2 of the range it can span."""
    return math.log2(2 * codec.sum_bound * codec.scale + codec.num_hospitals)
