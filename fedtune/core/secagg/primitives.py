"""The cryptographic building blocks of secure aggregation, each from a vetted library.

- X25519 key agreement and Ed25519 signatures, HKDF-SHA256 and AES-GCM: `cryptography`.
- Shamir secret sharing over GF(2^128): pycryptodome's `Shamir` (a 32-byte secret is split
  as two independent 16-byte halves with the same share indices).

Every derived key is bound to the round (run id + round number) and to both hospitals'
names, so a share or mask from one round or pair can never be accepted in another.
"""

from __future__ import annotations

import os
import struct

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_HALF = 16
_NONCE_BYTES = 12


class ShareRejected(ValueError):
    """An encrypted share did not authenticate: tampered, replayed or misaddressed."""


class BadSignature(ValueError):
    """A round key advertisement is not signed by the enrolled identity key it claims."""


def frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation (each part length-prefixed), for signatures and KDF inputs."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def round_context(run_id: str, server_round: int, attempt: int) -> bytes:
    """What binds every key, share and mask to one attempt at one round of one run.

    The attempt is part of it because an aborted round is tried again: without it, signed
    round keys of the first attempt would verify in the second, and a coordinator could
    replay a peer's old keys whose secrets the first attempt's dropout recovery revealed.
    """
    return frame(
        b"fedtune-secagg-v1", run_id.encode(), str(server_round).encode(), str(attempt).encode()
    )


def new_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (secret, public)."""
    secret = X25519PrivateKey.generate()
    return raw_secret(secret), raw_public(secret.public_key())


def raw_secret(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_public_of(secret: bytes) -> bytes:
    """The public key of a raw X25519 secret (to check a reconstructed secret)."""
    return raw_public(X25519PrivateKey.from_private_bytes(secret).public_key())


def advertisement_payload(context: bytes, hospital: str, c_public: bytes, s_public: bytes) -> bytes:
    """Exactly what a hospital signs when it advertises its two round keys."""
    return frame(b"round-keys", context, hospital.encode(), c_public, s_public)


def sign(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    return identity.sign(payload)


def verify(identity: Ed25519PublicKey, signature: bytes, payload: bytes, hospital: str) -> None:
    try:
        identity.verify(signature, payload)
    except InvalidSignature:
        raise BadSignature(
            f"the round keys presented for {hospital} are not signed by {hospital}'s enrolled "
            "identity key (substituted or altered keys)"
        ) from None


def agree(
    secret: bytes, peer_public: bytes, purpose: bytes, context: bytes, pair: tuple[str, str]
) -> bytes:
    """A 256-bit key both hospitals of `pair` derive, bound to purpose, round and pair."""
    shared = X25519PrivateKey.from_private_bytes(secret).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    first, second = sorted(pair)
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=frame(purpose, context, first.encode(), second.encode()),
    ).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce (prepended)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes, sender: str) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise ShareRejected(
            f"the encrypted key shares from {sender} failed authentication: they were altered "
            "in transit, replayed from another round, or not meant for this hospital"
        ) from None


def split_secret(secret: bytes, shares: int, threshold: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret; share k (1-based) is element k−1, 32 bytes."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"secrets are {KEY_BYTES} bytes, got {len(secret)}")
    low = Shamir.split(threshold, shares, secret[:_HALF], ssss=False)
    high = Shamir.split(threshold, shares, secret[_HALF:], ssss=False)
    return [a + b for (_, a), (_, b) in zip(low, high, strict=True)]


def combine_shares(shares: dict[int, bytes]) -> bytes:
    """The secret from ≥ threshold shares, keyed by their 1-based index."""
    low = Shamir.combine([(i, s[:_HALF]) for i, s in shares.items()], ssss=False)
    high = Shamir.combine([(i, s[_HALF:]) for i, s in shares.items()], ssss=False)
    return bytes(low) + bytes(high)
