"""Mask keystreams: ChaCha20 from `cryptography`, keyed by a 256-bit seed.

A mask must be unpredictable to anyone without its seed and reproducible by anyone with it
(the coordinator regenerates a dropped hospital's pairwise masks from reconstructed seeds).
ChaCha20 gives both; numpy's generators give neither (their state is recoverable from
output). The nonce is fixed because every seed is used for exactly one keystream: seeds are
fresh per round (derived from fresh round keys and the round id).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # 64-bit block counter + 64-bit nonce, all zero: one stream per seed
_CHUNK_WORDS = 1 << 22  # 16 MiB of keystream at a time bounds peak memory


def keystream_uint32(seed: bytes, length: int) -> np.ndarray:
    """`length` uint32 words of the ChaCha20 keystream for `seed` (little-endian)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    out = np.empty(length, dtype=np.uint32)
    for start in range(0, length, _CHUNK_WORDS):
        count = min(_CHUNK_WORDS, length - start)
        block = encryptor.update(bytes(4 * count))
        out[start : start + count] = np.frombuffer(block, dtype="<u4")
    return out


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """vector ← vector ± PRG(seed) mod 2^32, in place (uint32 arithmetic wraps)."""
    stream = keystream_uint32(seed, vector.size)
    if sign > 0:
        np.add(vector, stream, out=vector)
    else:
        np.subtract(vector, stream, out=vector)
