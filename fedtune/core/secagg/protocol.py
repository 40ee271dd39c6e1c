"""The secure-aggregation protocol (Bonawitz et al. 2017), both sides, as pure functions.

One round, four stages (the coordinator relays every message; it never holds a secret):

1. advertise  each hospital makes fresh X25519 keys c (share encryption) and s (mask
              agreement) and signs both with its enrolled Ed25519 identity key.
2. share      each hospital checks every signature against its enrollment list, draws a
              self-mask seed b, Shamir-splits b and its s secret (threshold t) and encrypts
              one share pair for each peer under a key only that peer can derive.
3. mask       each hospital decrypts its inbox, then sends y = x + PRG(b) ± Σ PRG(s_ij)
              mod 2^32, where x is its clipped, weighted, fixed-point delta and weight.
3b. confirm   (Bonawitz et al.'s ConsistencyCheck, extended) each survivor signs its view
              of the round: the mask set, who survived, who dropped, the threshold, and the
              SHA-256 of the run configuration and of the global adapter it trained from.
4. unmask     a survivor reveals only after every survivor's signature verifies over its
              *own* view; then b-shares of survivors and s-shares of dropped peers (never
              both for one peer, and only once per round); the coordinator removes the
              masks and learns Σ x over survivors, nothing about any single x.

Without 3b a coordinator could tell hospitals different stories (X: "the mask set is
{X, Y, Z}"; V, W: "Y and Z dropped"; Y: "Z dropped"; Z: "Y dropped") and collect b_X, s_Y
and s_Z, so X's input, with every hospital's own checks passing; or send one hospital a
different configuration or adapter than the others (e.g. everyone else learning rate
10^-30) so that the "sum" is that hospital's update alone. With 3b both are refused before
anything is revealed: the honest hospitals' signed views differ.

The run configuration is also fixed for the whole round: every stage's request must carry
the configuration the hospital advertised under (so the threshold its shares were split
for is the one its noise share and checks use).

The hospital's secrets live in `HospitalRound`, which the Flower edge keeps in the node's
own state between stages; nothing here imports Flower.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.core.secagg import primitives as p
from fedtune.core.secagg.prg import add_mask

SHARE_PURPOSE = b"share-encryption"
MASK_PURPOSE = b"pairwise-mask"
SELF_MASK = "self-mask"  # a revealed share of a survivor's self-mask seed b
MASK_KEY = "mask-key"  # a revealed share of a dropped hospital's s secret


class ProtocolAbort(RuntimeError):
    """This hospital (or the coordinator) must stop the round: the message says why."""


@dataclass(frozen=True)
class Advertisement:
    """A hospital's signed round keys (stage 1 reply; relayed to all in stage 2)."""

    hospital: str
    c_public: bytes
    s_public: bytes
    signature: bytes


@dataclass(frozen=True)
class RevealedShare:
    """One share a survivor returns in stage 4: of `peer`'s b (SELF_MASK) or s (MASK_KEY)."""

    peer: str
    kind: str
    share: bytes


@dataclass
class HospitalRound:
    """A hospital's secrets and progress for one round; never leaves the hospital."""

    hospital: str
    context: bytes
    c_secret: bytes
    s_secret: bytes
    stage: str = "advertised"
    run_config_sha256: str = ""  # the configuration of this round (fixed at stage 1)
    threshold: int = 0
    self_seed: bytes = b""
    participants: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # name→(c, s)
    mask_set: list[str] = field(default_factory=list)
    inbox: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # sender→(b, s shares)
    adapter_sha256: str = ""  # the global adapter this hospital trained from (stage 3)
    survivors: list[str] = field(default_factory=list)  # the view it signed (stage 3b)
    dropped: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """JSON with every byte field hex-encoded by name (hospital names are free text)."""
        return json.dumps(
            {
                "hospital": self.hospital,
                "context": self.context.hex(),
                "c_secret": self.c_secret.hex(),
                "s_secret": self.s_secret.hex(),
                "stage": self.stage,
                "run_config_sha256": self.run_config_sha256,
                "threshold": self.threshold,
                "self_seed": self.self_seed.hex(),
                "participants": {k: [c.hex(), s.hex()] for k, (c, s) in self.participants.items()},
                "mask_set": list(self.mask_set),
                "inbox": {k: [b.hex(), s.hex()] for k, (b, s) in self.inbox.items()},
                "adapter_sha256": self.adapter_sha256,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HospitalRound:
        raw = json.loads(data)

        def pair(values: list[str]) -> tuple[bytes, bytes]:
            first, second = values
            return bytes.fromhex(first), bytes.fromhex(second)

        return cls(
            hospital=str(raw["hospital"]),
            context=bytes.fromhex(raw["context"]),
            c_secret=bytes.fromhex(raw["c_secret"]),
            s_secret=bytes.fromhex(raw["s_secret"]),
            stage=str(raw["stage"]),
            run_config_sha256=str(raw["run_config_sha256"]),
            threshold=int(raw["threshold"]),
            self_seed=bytes.fromhex(raw["self_seed"]),
            participants={k: pair(v) for k, v in raw["participants"].items()},
            mask_set=[str(name) for name in raw["mask_set"]],
            inbox={k: pair(v) for k, v in raw["inbox"].items()},
            adapter_sha256=str(raw["adapter_sha256"]),
            survivors=[str(name) for name in raw["survivors"]],
            dropped=[str(name) for name in raw["dropped"]],
        )


def check_threshold(threshold: int, hospitals: int) -> None:
    """t ≥ 2 and t > n/2: otherwise a coordinator telling two halves of the hospitals
    different stories about who dropped could collect both secrets of one hospital."""
    if threshold < 2 or 2 * threshold <= hospitals:
        raise ProtocolAbort(
            f"the secure-aggregation threshold {threshold} is too low for {hospitals} "
            f"hospitals: it must be at least 2 and more than half of them "
            f"(set secure_aggregation.threshold to {max(2, hospitals // 2 + 1)} or more)"
        )


def positions(names: Sequence[str]) -> dict[str, int]:
    """Shamir share index of each hospital: its 1-based position in name order."""
    return {name: k for k, name in enumerate(sorted(names), start=1)}


# --- hospital side -------------------------------------------------------------------


def advertise(
    identity: Ed25519PrivateKey, hospital: str, run_id: str, server_round: int, attempt: int,
    run_config_sha256: str,
) -> tuple[HospitalRound, Advertisement]:
    """Stage 1: fresh round keys, signed (bound to this attempt at the round); the round's
    run configuration is fixed from here on (`check_run_config`)."""
    context = p.round_context(run_id, server_round, attempt)
    c_secret, c_public = p.new_x25519()
    s_secret, s_public = p.new_x25519()
    payload = p.advertisement_payload(context, hospital, c_public, s_public)
    state = HospitalRound(hospital, context, c_secret, s_secret,
                          run_config_sha256=run_config_sha256)
    return state, Advertisement(hospital, c_public, s_public, p.sign(identity, payload))


def check_run_config(state: HospitalRound, run_config_sha256: str) -> None:
    """Every stage of a round must carry the configuration the hospital advertised under."""
    if run_config_sha256 != state.run_config_sha256:
        raise ProtocolAbort(
            "the coordinator changed the run configuration in the middle of a secure round "
            f"(SHA-256 {run_config_sha256[:12]}… instead of {state.run_config_sha256[:12]}…); "
            "a round is one configuration for every hospital and every stage"
        )


def verify_advertisements(
    adverts: Sequence[Advertisement],
    enrollment: Mapping[str, Ed25519PublicKey],
    context: bytes,
) -> None:
    """Every advertisement must come from an enrolled hospital, signed by its identity key."""
    names = [a.hospital for a in adverts]
    if len(set(names)) != len(names):
        raise ProtocolAbort("the coordinator listed a hospital twice in this round")
    for advert in adverts:
        if advert.hospital not in enrollment:
            raise ProtocolAbort(
                f"{advert.hospital} is not in this hospital's enrollment list; its keys are "
                "refused (ask the coordinator to enroll it and redistribute the list)"
            )
        payload = p.advertisement_payload(
            context, advert.hospital, advert.c_public, advert.s_public
        )
        p.verify(enrollment[advert.hospital], advert.signature, payload, advert.hospital)


def make_shares(
    state: HospitalRound,
    adverts: Sequence[Advertisement],
    enrollment: Mapping[str, Ed25519PublicKey],
    threshold: int,
    minimum_threshold: int,
) -> tuple[dict[str, bytes], bytes]:
    """Stage 2: verify peers, split b and s, encrypt a share pair for every peer.

    `minimum_threshold` is the hospital's own floor, never the coordinator's: a coordinator
    choosing both a low threshold and a small group (itself plus one colluder) could
    otherwise unmask this hospital. Returns (recipient → ciphertext, commitment to b); the
    commitment lets the coordinator check that the b it reconstructs is the one masked with.
    """
    if state.stage != "advertised":
        raise ProtocolAbort(f"key shares requested twice in one round (stage {state.stage})")
    verify_advertisements(adverts, enrollment, state.context)
    own = next((a for a in adverts if a.hospital == state.hospital), None)
    if own is None or (own.c_public, own.s_public) != (
        p.x25519_public_of(state.c_secret),
        p.x25519_public_of(state.s_secret),
    ):
        raise ProtocolAbort(
            "the coordinator did not relay this hospital's own round keys unchanged"
        )
    check_threshold(threshold, len(adverts))
    if threshold < minimum_threshold:
        raise ProtocolAbort(
            f"the coordinator asked for threshold {threshold}, below this hospital's minimum "
            f"of {minimum_threshold} (a majority of its enrolled hospitals, or its node "
            f"setting secagg-min-threshold); with fewer, a coordinator and a few colluders "
            f"could unmask it"
        )
    state.threshold = threshold
    state.participants = {a.hospital: (a.c_public, a.s_public) for a in adverts}
    state.self_seed = secrets.token_bytes(p.KEY_BYTES)
    index = positions(list(state.participants))
    b_shares = p.split_secret(state.self_seed, len(index), threshold)
    s_shares = p.split_secret(state.s_secret, len(index), threshold)
    outbox: dict[str, bytes] = {}
    for peer, (c_public, _) in state.participants.items():
        if peer == state.hospital:
            # Our own shares stay here (we may need to reveal our b-share in stage 4).
            state.inbox[peer] = (b_shares[index[peer] - 1], s_shares[index[peer] - 1])
            continue
        key = p.agree(state.c_secret, c_public, SHARE_PURPOSE, state.context,
                      (state.hospital, peer))
        plaintext = p.frame(
            b"shares", state.hospital.encode(), peer.encode(),
            b_shares[index[peer] - 1], s_shares[index[peer] - 1],
        )
        outbox[peer] = p.encrypt(key, plaintext, _share_aad(state.context, state.hospital, peer))
    state.stage = "shared"
    return outbox, self_mask_commitment(state.context, state.hospital, state.self_seed)


def accept_shares(
    state: HospitalRound, mask_set: Sequence[str], inbox: Mapping[str, bytes]
) -> None:
    """Stage 3, first half: decrypt the shares addressed to us from every peer in the mask set."""
    if state.stage != "shared":
        raise ProtocolAbort(f"masked input requested out of order (stage {state.stage})")
    members = list(mask_set)
    if state.hospital not in members or not set(members) <= set(state.participants):
        raise ProtocolAbort("the coordinator's list of hospitals for masking is inconsistent")
    if len(members) < state.threshold:
        raise ProtocolAbort(
            f"only {len(members)} hospitals shared keys; the threshold is {state.threshold}"
        )
    expected = set(members) - {state.hospital}
    if set(inbox) != expected:
        missing = sorted(expected - set(inbox))
        extra = sorted(set(inbox) - expected)
        raise ProtocolAbort(
            f"the coordinator relayed the wrong key shares (missing from: {missing or 'none'}; "
            f"unexpected from: {extra or 'none'})"
        )
    for sender, ciphertext in inbox.items():
        c_public = state.participants[sender][0]
        key = p.agree(state.c_secret, c_public, SHARE_PURPOSE, state.context,
                      (state.hospital, sender))
        plaintext = p.decrypt(key, ciphertext, _share_aad(state.context, sender, state.hospital),
                              sender)
        parts = _unframe(plaintext)
        if parts[:3] != [b"shares", sender.encode(), state.hospital.encode()] or len(parts) != 5:
            raise p.ShareRejected(f"the key shares from {sender} are not addressed to us")
        state.inbox[sender] = (parts[3], parts[4])
    state.mask_set = sorted(members)


def mask(state: HospitalRound, encoded: np.ndarray, adapter_sha256: str) -> np.ndarray:
    """Stage 3, second half: y = x + PRG(b) + Σ ±PRG(s_ij) mod 2^32 over the mask set.

    `adapter_sha256` is the global adapter the input was trained from: it goes into the
    view this hospital signs in stage 3b."""
    if state.stage != "shared" or not state.mask_set:
        raise ProtocolAbort(f"cannot mask before the key shares are accepted ({state.stage})")
    state.adapter_sha256 = adapter_sha256
    masked = np.array(encoded, dtype=np.uint32, copy=True)
    add_mask(masked, state.self_seed, +1)
    for peer in state.mask_set:
        if peer == state.hospital:
            continue
        seed = p.agree(state.s_secret, state.participants[peer][1], MASK_PURPOSE,
                       state.context, (state.hospital, peer))
        add_mask(masked, seed, _pair_sign(state.hospital, peer))
    state.stage = "masked"
    return masked


def consistency_payload(state: HospitalRound, survivors: Sequence[str],
                        dropped: Sequence[str]) -> bytes:
    """The view of the round every survivor signs; identical for all honest survivors."""
    return p.frame(
        b"round-view", state.context,
        json.dumps(sorted(state.mask_set)).encode(),
        json.dumps(sorted(survivors)).encode(), json.dumps(sorted(dropped)).encode(),
        str(state.threshold).encode(), state.run_config_sha256.encode(),
        state.adapter_sha256.encode(),
    )


def confirm_view(
    state: HospitalRound, identity: Ed25519PrivateKey, survivors: Sequence[str],
    dropped: Sequence[str], minimum_survivors: int,
) -> bytes:
    """Stage 3b: check the coordinator's survivor list against this hospital's mask set and
    sign the resulting view (once per round). Signing reveals nothing.

    `minimum_survivors` is the hospital's own floor: with two survivors each could compute
    the other's update from the next global adapter, so a deployed hospital needs three.
    """
    if state.stage != "masked":
        raise ProtocolAbort(
            f"the round's view was asked to be confirmed out of order (stage {state.stage})"
        )
    alive, gone = set(survivors), set(dropped)
    if (alive & gone or (alive | gone) != set(state.mask_set) or state.hospital not in alive
            or len(alive) != len(survivors) or len(gone) != len(dropped)):
        raise ProtocolAbort(
            "the coordinator's list of survivors and dropped hospitals is inconsistent with "
            "the hospitals that masked this round"
        )
    needed = max(state.threshold, minimum_survivors)
    if len(alive) < needed:
        raise ProtocolAbort(
            f"only {len(alive)} hospitals survived; this hospital needs at least {needed} "
            f"(threshold {state.threshold}; with fewer than {minimum_survivors} survivors one "
            "could compute another's update from the result)"
        )
    state.survivors, state.dropped = sorted(alive), sorted(gone)
    state.stage = "confirmed"
    return p.sign(identity, consistency_payload(state, state.survivors, state.dropped))


def reveal(
    state: HospitalRound, survivors: Sequence[str], dropped: Sequence[str],
    signatures: Mapping[str, bytes], enrollment: Mapping[str, Ed25519PublicKey],
) -> list[RevealedShare]:
    """Stage 4: b-shares of survivors, s-shares of dropped peers; never both, only once, and
    only when every survivor signed exactly the view this hospital signed."""
    if state.stage != "confirmed":
        raise ProtocolAbort(
            "unmasking requested twice or out of order in one round; refusing (revealing "
            "twice could expose both secrets of one hospital)"
        )
    if sorted(survivors) != state.survivors or sorted(dropped) != state.dropped:
        raise ProtocolAbort(
            "the coordinator's survivor list for unmasking differs from the one this hospital "
            "confirmed; nothing is revealed"
        )
    payload = consistency_payload(state, state.survivors, state.dropped)
    missing = sorted(set(state.survivors) - set(signatures))
    if missing:
        raise ProtocolAbort(
            f"no signed view of this round from {', '.join(missing)}; every survivor must "
            "confirm the same view before anything is revealed"
        )
    for hospital in state.survivors:
        key = enrollment.get(hospital)
        try:
            if key is None:
                raise InvalidSignature
            key.verify(signatures[hospital], payload)
        except InvalidSignature:
            raise ProtocolAbort(
                f"{hospital}'s signed view of this round differs from this hospital's (mask "
                "set, survivors, threshold, run configuration or global adapter): the "
                "coordinator told hospitals different stories; nothing is revealed"
            ) from None
    state.stage = "revealed"
    alive, gone = state.survivors, state.dropped
    shares = [RevealedShare(peer, SELF_MASK, state.inbox[peer][0]) for peer in alive]
    shares += [RevealedShare(peer, MASK_KEY, state.inbox[peer][1]) for peer in gone]
    return shares


# --- coordinator side --------------------------------------------------------------------


@dataclass(frozen=True)
class UnmaskInputs:
    """What the coordinator holds at the end of stage 4."""

    context: bytes
    threshold: int
    adverts: Mapping[str, Advertisement]  # everyone who advertised (stage 1)
    mask_set: Sequence[str]  # hospitals that shared keys (stage 2) and so are in masks
    commitments: Mapping[str, bytes]  # hospital → commitment to its b (stage 2)
    masked: Mapping[str, np.ndarray]  # survivors' masked inputs (stage 3)
    revealed: Mapping[str, Sequence[RevealedShare]]  # responder → its shares (stage 4)


def unmask_sum(inputs: UnmaskInputs) -> np.ndarray:
    """Σ over survivors of their encoded inputs, mod 2^32; ProtocolAbort if impossible."""
    survivors = sorted(inputs.masked)
    dropped = sorted(set(inputs.mask_set) - set(survivors))
    if len(inputs.revealed) < inputs.threshold:
        raise ProtocolAbort(
            f"only {len(inputs.revealed)} hospitals answered the unmasking stage; "
            f"{inputs.threshold} are needed to remove the masks"
        )
    index = positions(list(inputs.adverts))
    collected: dict[tuple[str, str], dict[int, bytes]] = {}
    for responder, shares in inputs.revealed.items():
        for item in shares:
            expected_kind = SELF_MASK if item.peer in survivors else MASK_KEY
            if item.kind != expected_kind or item.peer not in inputs.mask_set:
                raise ProtocolAbort(f"{responder} revealed an unexpected share for {item.peer}")
            collected.setdefault((item.peer, item.kind), {})[index[responder]] = item.share
    length = len(next(iter(inputs.masked.values())))
    total = np.zeros(length, dtype=np.uint32)
    for name in survivors:
        np.add(total, inputs.masked[name], out=total)
    for name in survivors:
        seed = _reconstruct(collected, name, SELF_MASK, inputs.threshold)
        if self_mask_commitment(inputs.context, name, seed) != inputs.commitments.get(name):
            raise ProtocolAbort(
                f"the self-mask of {name} reconstructed from the hospitals' shares does not "
                "match its commitment: shares were corrupted"
            )
        add_mask(total, seed, -1)
    for name in dropped:
        secret = _reconstruct(collected, name, MASK_KEY, inputs.threshold)
        if p.x25519_public_of(secret) != inputs.adverts[name].s_public:
            raise ProtocolAbort(
                f"the mask key of dropped hospital {name} reconstructed from the shares does "
                "not match its advertised key: shares were corrupted"
            )
        for survivor in survivors:
            seed = p.agree(secret, inputs.adverts[survivor].s_public, MASK_PURPOSE,
                           inputs.context, (name, survivor))
            # The survivor added _pair_sign(survivor, name)·PRG; remove exactly that.
            add_mask(total, seed, -_pair_sign(survivor, name))
    return total


def self_mask_commitment(context: bytes, hospital: str, seed: bytes) -> bytes:
    return hashlib.sha256(p.frame(b"self-mask", context, hospital.encode(), seed)).digest()


def _reconstruct(
    collected: Mapping[tuple[str, str], Mapping[int, bytes]], peer: str, kind: str, threshold: int
) -> bytes:
    shares = collected.get((peer, kind), {})
    if len(shares) < threshold:
        raise ProtocolAbort(
            f"only {len(shares)} share(s) of {peer}'s {kind} arrived; {threshold} are needed"
        )
    return p.combine_shares(dict(shares))


def _pair_sign(me: str, peer: str) -> int:
    """+1 for the hospital first in name order, −1 for the other: the pair's masks cancel."""
    return 1 if me < peer else -1


def _share_aad(context: bytes, sender: str, recipient: str) -> bytes:
    return p.frame(b"share-aad", context, sender.encode(), recipient.encode())


def _unframe(data: bytes) -> list[bytes]:
    parts: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise p.ShareRejected("a decrypted share message is truncated")
        size = int.from_bytes(data[offset : offset + 4], "big")
        parts.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return parts
