"""Secure aggregation, pure protocol level: real cryptography, no Flower, no mocks.

Each test runs the hospitals' and the coordinator's sides of `fedtune.core.secagg.protocol` in
memory (`run_protocol` below) and checks one promise of ARCHITECTURE.md "Secure
aggregation": the masks cancel to the exact sum, dropouts are tolerated down to the
threshold and no further, the coordinator sees nothing but uniform noise per hospital, it
cannot tamper with keys or shares unnoticed, a hospital never reveals both secrets of a
peer, and fixed point never wraps silently.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.core.secagg import prg
from fedtune.core.secagg import primitives as p
from fedtune.core.secagg import protocol as P
from fedtune.core.secagg.encoding import decode_aggregate, encode_input, layout_size
from fedtune.core.secagg.fixed_point import (
    FixedPointCodec,
    FixedPointOverflow,
    clip_to_norm,
    decode_weight_sum,
    encode_weight,
)
from fedtune.core.secagg.protocol import Advertisement, HospitalRound, ProtocolAbort

RUN_ID = "run-test"
CONFIG = "c0" * 32  # SHA-256 of the round's run configuration (what the node hashes)
ADAPTER = "a0" * 32  # SHA-256 of the global adapter the hospitals trained from
STAGES = ("advertise", "make_shares", "mask")  # drop_after values, in protocol order
RING = 2**32


# --- an in-memory federation ----------------------------------------------------------------


def hospital_names(n: int) -> list[str]:
    """hospital-1 … hospital-n (name order ≠ numeric order from 10 on, on purpose)."""
    return [f"hospital-{k}" for k in range(1, n + 1)]


def new_identities(names: Sequence[str]) -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in names}


def enrollment_of(identities: Mapping[str, Ed25519PrivateKey]) -> dict[str, Ed25519PublicKey]:
    return {name: key.public_key() for name, key in identities.items()}


def inbox_for(
    outboxes: Mapping[str, Mapping[str, bytes]], mask_set: Sequence[str], name: str
) -> dict[str, bytes]:
    """What the coordinator relays to `name` in stage 3: every other sharer's ciphertext."""
    return {sender: outboxes[sender][name] for sender in mask_set if sender != name}


@dataclass
class Run:
    """Everything both sides hold after one round run by `run_protocol`."""

    context: bytes
    threshold: int
    identities: dict[str, Ed25519PrivateKey]
    states: dict[str, HospitalRound]
    adverts: dict[str, Advertisement]
    outboxes: dict[str, dict[str, bytes]]
    commitments: dict[str, bytes]
    mask_set: list[str]
    masked: dict[str, np.ndarray]
    revealed: dict[str, list[P.RevealedShare]]
    total: np.ndarray | None

    @property
    def survivors(self) -> list[str]:
        return sorted(self.masked)

    def unmask_inputs(self, **changes: object) -> P.UnmaskInputs:
        values: dict[str, object] = {
            "context": self.context,
            "threshold": self.threshold,
            "adverts": self.adverts,
            "mask_set": self.mask_set,
            "commitments": self.commitments,
            "masked": self.masked,
            "revealed": self.revealed,
        }
        values.update(changes)
        return P.UnmaskInputs(**values)  # type: ignore[arg-type]


def run_protocol(
    inputs: Mapping[str, np.ndarray],
    threshold: int,
    *,
    drop_after: Mapping[str, str] | None = None,
    identities: Mapping[str, Ed25519PrivateKey] | None = None,
    server_round: int = 1,
    reveal: bool = True,
    unmask: bool = True,
) -> Run:
    """One full round for the hospitals named in `inputs` (already encoded uint32 rings).

    `drop_after[name]` makes a hospital vanish after a stage: "advertise" (never shares),
    "make_shares" (shared keys, never sends a masked input) or "mask" (sent its masked
    input, never answers the unmasking request). `reveal`/`unmask` False stop before stage
    4 / before the coordinator unmasks. Any ProtocolAbort propagates.
    """
    drop_after = dict(drop_after or {})
    assert set(drop_after.values()) <= set(STAGES)
    names = sorted(inputs)
    ids = dict(identities) if identities is not None else new_identities(names)
    enrollment = enrollment_of(ids)
    states: dict[str, HospitalRound] = {}
    adverts: dict[str, Advertisement] = {}
    for name in names:  # stage 1
        states[name], adverts[name] = P.advertise(ids[name], name, RUN_ID, server_round, 1, CONFIG)
    outboxes: dict[str, dict[str, bytes]] = {}
    commitments: dict[str, bytes] = {}
    for name in names:  # stage 2: everyone who advertised is relayed to everyone
        if drop_after.get(name) != "advertise":
            outboxes[name], commitments[name] = P.make_shares(
                states[name], list(adverts.values()), enrollment, threshold, minimum_threshold=2
            )
    mask_set = sorted(outboxes)
    masked: dict[str, np.ndarray] = {}
    for name in mask_set:  # stage 3
        if drop_after.get(name) != "make_shares":
            P.accept_shares(states[name], mask_set, inbox_for(outboxes, mask_set, name))
            masked[name] = P.mask(states[name], inputs[name], ADAPTER)
    survivors = sorted(masked)
    dropped = sorted(set(mask_set) - set(survivors))
    revealed: dict[str, list[P.RevealedShare]] = {}
    if reveal:  # stage 3b, then 4
        signatures = confirm_all(states, ids, survivors, dropped)
        revealed = {
            name: P.reveal(states[name], survivors, dropped, signatures, enrollment)
            for name in survivors
            if drop_after.get(name) != "mask"
        }
    run = Run(
        states[names[0]].context, threshold, ids, states, adverts, outboxes, commitments,
        mask_set, masked, revealed, None,
    )
    if unmask:
        run.total = P.unmask_sum(run.unmask_inputs())
    return run


def confirm_all(
    states: Mapping[str, HospitalRound], identities: Mapping[str, Ed25519PrivateKey],
    survivors: Sequence[str], dropped: Sequence[str], minimum_survivors: int = 2,
) -> dict[str, bytes]:
    """Stage 3b: every survivor signs its view of the round."""
    return {
        name: P.confirm_view(states[name], identities[name], survivors, dropped,
                             minimum_survivors)
        for name in survivors
    }


def random_rings(names: Sequence[str], length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, RING, length, dtype=np.uint32) for name in names}


def ring_sum(rings: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(rings[0])
    for ring in rings:
        np.add(total, ring, out=total)
    return total


def assert_no_masked_input(state: HospitalRound) -> None:
    """The hospital can no longer produce a masked input this round: nothing of it is merged."""
    with pytest.raises(ProtocolAbort):
        P.mask(state, np.zeros(4, dtype=np.uint32), ADAPTER)


def signed_advert(
    identity: Ed25519PrivateKey, name: str, context: bytes, c_secret: bytes, s_secret: bytes
) -> tuple[HospitalRound, Advertisement]:
    """An honest advertisement for chosen round keys (to build replay scenarios)."""
    c_public, s_public = p.x25519_public_of(c_secret), p.x25519_public_of(s_secret)
    signature = p.sign(identity, p.advertisement_payload(context, name, c_public, s_public))
    return (
        HospitalRound(name, context, c_secret, s_secret),
        Advertisement(name, c_public, s_public, signature),
    )


# --- 1. masks cancel ---------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(2, 10))
    names = hospital_names(n)
    threshold = draw(st.integers(max(2, n // 2 + 1), n))
    shapes = draw(
        st.lists(
            hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=25),
            min_size=1,
            max_size=3,
        )
    )  # ≤ 3 × 625 values
    max_weight = draw(st.integers(1, 10_000))
    clip_norm = draw(st.sampled_from([1e-3, 1.0, 7.5]) | st.floats(1e-3, 1e3))
    # Delta norms as multiples of the clip norm: inside, outside, far outside.
    norms = st.floats(0.0, 0.999) | st.floats(1.001, 4.0) | st.just(1e6)
    # Drop up to n − t hospitals after random stages: the round must still succeed.
    drops = draw(st.lists(st.sampled_from(STAGES), max_size=n - threshold))
    order = draw(st.permutations(names))
    return {
        "names": names,
        "threshold": threshold,
        "shapes": shapes,
        "max_weight": max_weight,
        "clip_norm": clip_norm,
        "weights": draw(st.lists(st.integers(1, max_weight), min_size=n, max_size=n)),
        "norms": draw(st.lists(norms, min_size=n, max_size=n)),
        "drop_after": dict(zip(order, drops, strict=False)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=25, deadline=None)
@given(scenarios())
def test_masks_cancel_to_the_weighted_sum_of_clipped_deltas(case: dict) -> None:
    """The coordinator recovers Σ wᵢ·clip(Δᵢ) within the codec's error bound and Σ wᵢ exactly,
    for any federation size, valid threshold, adapter shape, weights, delta norms and
    tolerable dropouts: every pairwise and self mask cancels."""
    names, t, C, W = case["names"], case["threshold"], case["clip_norm"], case["max_weight"]
    rng = np.random.default_rng(case["seed"])
    reference = {f"t{k}": np.zeros(shape, np.float32) for k, shape in enumerate(case["shapes"])}
    weights = dict(zip(names, case["weights"], strict=True))
    deltas = {}
    for name, factor in zip(names, case["norms"], strict=True):
        raw = {key: rng.standard_normal(v.shape) for key, v in reference.items()}
        norm = float(np.sqrt(sum(np.sum(v**2) for v in raw.values())))
        deltas[name] = {k: (v * (factor * C / norm)).astype(np.float32) for k, v in raw.items()}
    drop_after = case["drop_after"]
    mask_set = [n for n in names if drop_after.get(n) != "advertise"]
    codec = FixedPointCodec(C, W, len(mask_set))  # as both edges build it
    inputs = {n: encode_input(deltas[n], reference, weights[n], codec).ring for n in names}

    run = run_protocol(inputs, t, drop_after=drop_after)
    assert run.total is not None
    survivors = run.survivors
    assert survivors == sorted(n for n in names if drop_after.get(n) in (None, "mask"))
    weighted, weight_sum = decode_aggregate(run.total, len(survivors), codec, reference)

    assert weight_sum == sum(weights[n] for n in survivors)
    bound = codec.error_bound(len(survivors))
    for key in reference:
        expected = np.zeros(reference[key].shape, np.float64)
        for name in survivors:
            flat = np.concatenate(
                [np.asarray(v, np.float64).ravel() for v in deltas[name].values()]
            )
            shrink = min(1.0, C / float(np.linalg.norm(flat))) if flat.any() else 1.0
            expected += weights[name] * shrink * np.asarray(deltas[name][key], np.float64)
        np.testing.assert_allclose(weighted[key], expected, rtol=1e-6, atol=bound)


# --- 2. dropouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_the_threshold_still_give_the_exact_sum_of_survivors(stage: str) -> None:
    """n = 5, t = 3: two hospitals vanishing after any stage leave exactly t in play; the
    coordinator still removes every mask (reconstructing the dropped hospitals' pairwise
    masks or the silent survivors' self-masks) and gets the survivors' sum mod 2^32."""
    names = hospital_names(5)
    inputs = random_rings(names, 257)
    run = run_protocol(inputs, 3, drop_after={"hospital-2": stage, "hospital-4": stage})
    expected_survivors = names if stage == "mask" else ["hospital-1", "hospital-3", "hospital-5"]
    assert run.survivors == expected_survivors
    assert run.total is not None
    np.testing.assert_array_equal(run.total, ring_sum([inputs[n] for n in expected_survivors]))


def test_dropouts_after_every_stage_at_once() -> None:
    """n = 7, t = 4: one hospital never shares, one shares but never masks, one masks but
    never answers; the sum covers exactly the five that sent masked inputs."""
    names = hospital_names(7)
    inputs = random_rings(names, 100, seed=1)
    drops = {"hospital-6": "advertise", "hospital-2": "make_shares", "hospital-7": "mask"}
    run = run_protocol(inputs, 4, drop_after=drops)
    assert run.mask_set == sorted(set(names) - {"hospital-6"})
    assert run.total is not None
    survivors = sorted(set(names) - {"hospital-6", "hospital-2"})
    np.testing.assert_array_equal(run.total, ring_sum([inputs[n] for n in survivors]))


def test_too_few_sharers_abort_before_any_masked_input() -> None:
    """Three of five never share keys: every remaining hospital refuses to mask (t = 3)."""
    names = hospital_names(5)
    drops = dict.fromkeys(["hospital-1", "hospital-3", "hospital-5"], "advertise")
    with pytest.raises(ProtocolAbort, match=r"only 2 hospitals shared keys; the threshold is 3"):
        run_protocol(random_rings(names, 8), 3, drop_after=drops)


def test_too_few_masked_inputs_abort_on_both_sides() -> None:
    """Three of five share but never mask: survivors refuse to reveal anything, and the
    coordinator cannot unmask with the shares it has."""
    names = hospital_names(5)
    drops = dict.fromkeys(["hospital-1", "hospital-2", "hospital-5"], "make_shares")
    with pytest.raises(ProtocolAbort, match=r"only 2 hospitals survived; this hospital needs "
                                            r"at least 3 \(threshold 3"):
        run_protocol(random_rings(names, 8), 3, drop_after=drops)
    run = run_protocol(random_rings(names, 8), 3, drop_after=drops, reveal=False, unmask=False)
    assert run.survivors == ["hospital-3", "hospital-4"]
    with pytest.raises(ProtocolAbort, match=r"only 0 hospitals answered .* 3 are needed"):
        P.unmask_sum(run.unmask_inputs())
    # Even if both survivors (wrongly) answered, the coordinator alone refuses.
    for name in run.survivors:
        run.states[name].threshold = 2
    gone = ["hospital-1", "hospital-2", "hospital-5"]
    signatures = confirm_all(run.states, run.identities, run.survivors, gone)
    enrollment = enrollment_of(run.identities)
    revealed = {
        n: P.reveal(run.states[n], run.survivors, gone, signatures, enrollment)
        for n in run.survivors
    }
    with pytest.raises(ProtocolAbort, match=r"only 2 hospitals answered .* 3 are needed"):
        P.unmask_sum(run.unmask_inputs(revealed=revealed))


def test_too_few_unmasking_answers_abort_the_round() -> None:
    """All five mask but three never answer the unmasking request: 2 < t = 3 responders."""
    names = hospital_names(5)
    drops = dict.fromkeys(["hospital-2", "hospital-3", "hospital-4"], "mask")
    with pytest.raises(ProtocolAbort, match=r"only 2 hospitals answered the unmasking stage"):
        run_protocol(random_rings(names, 8), 3, drop_after=drops)


def test_corrupted_or_missing_revealed_shares_abort_instead_of_a_wrong_sum() -> None:
    """With exactly t responders, one altered b-share or s-share reconstructs the wrong secret:
    the commitment / advertised key check refuses it; a withheld share leaves < t."""
    names = hospital_names(5)
    drops = {"hospital-2": "make_shares", "hospital-5": "mask"}
    run = run_protocol(random_rings(names, 16), 3, drop_after=drops, unmask=False)
    assert len(run.revealed) == 3
    responder = "hospital-3"

    def altered(kind: str) -> list[P.RevealedShare]:
        out = []
        for item in run.revealed[responder]:
            if item.kind == kind:
                item = P.RevealedShare(item.peer, kind, bytes([item.share[0] ^ 1]) + item.share[1:])
            out.append(item)
        return out

    bad_b = {**run.revealed, responder: altered(P.SELF_MASK)}
    with pytest.raises(ProtocolAbort, match="does not match its commitment"):
        P.unmask_sum(run.unmask_inputs(revealed=bad_b))
    bad_s = {**run.revealed, responder: altered(P.MASK_KEY)}
    with pytest.raises(ProtocolAbort, match="hospital-2 .* does not match its advertised key"):
        P.unmask_sum(run.unmask_inputs(revealed=bad_s))
    withheld = [i for i in run.revealed[responder] if i.kind != P.MASK_KEY]
    with pytest.raises(ProtocolAbort, match=r"only 2 share\(s\) of hospital-2's mask-key"):
        P.unmask_sum(run.unmask_inputs(revealed={**run.revealed, responder: withheld}))
    both = [*run.revealed[responder], P.RevealedShare("hospital-2", P.SELF_MASK, bytes(32))]
    with pytest.raises(ProtocolAbort, match="unexpected share for hospital-2"):
        P.unmask_sum(run.unmask_inputs(revealed={**run.revealed, responder: both}))
    assert P.unmask_sum(run.unmask_inputs()) is not None  # the honest shares still work


# --- 3. what the coordinator sees is noise -----------------------------------------------------


def _chi_square_uniform_bytes(payload: np.ndarray) -> float:
    """χ² statistic of the payload's raw bytes against 256 equally likely values (255 dof)."""
    counts = np.bincount(np.frombuffer(payload.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(np.sum((counts - expected) ** 2 / expected))


# χ²(255) upper 1e-6 quantile (scipy.stats.chi2.isf(1e-6, 255) = 377.08). 1e-6 rather than
# 1e-3: an honest mask is uniform, so p is uniform and p > 0.001 would fail one CI run in a
# thousand; an unmasked or badly masked payload gives χ² in the millions (p ≈ 0) either way.
CHI2_CRITICAL_255_DOF = 377.08
try:
    from scipy.stats import chi2
except ImportError:  # pragma: no cover - the fixed critical value above still applies
    chi2 = None


def test_masked_input_is_independent_of_the_delta_and_fresh_every_round() -> None:
    """A hospital's masked vector — all the coordinator receives from it — is uniform noise:
    no linear correlation with a large, smooth delta and uniform raw bytes; masking the very
    same encoded input in the next round gives an unrelated payload (fresh keys and seeds).
    2^18 values (≥ 100k) so the 0.01 correlation bound is 5 standard errors: not flaky."""
    length = 2**18
    i = np.arange(length - 1, dtype=np.float64)
    delta = 1e3 * (np.sin(2 * np.pi * 7 * i / length) + 2.0 * i / length - 1.0)
    reference = {"w": np.zeros(length - 1, np.float32)}
    codec = FixedPointCodec(1.0, 1000, 3)
    names = hospital_names(3)
    encoded = encode_input({"w": delta.astype(np.float32)}, reference, 1000, codec)
    assert encoded.clip.clipped
    signed = encoded.ring[:-1].view(np.int32).astype(np.float64)
    assert np.corrcoef(signed, delta)[0, 1] > 0.99  # the encoding itself carries the signal
    identities = new_identities(names)

    payloads = []
    for server_round in (1, 2):
        inputs = {**random_rings(names, length, seed=server_round), names[0]: encoded.ring}
        run = run_protocol(inputs, 2, identities=identities, server_round=server_round)
        masked = run.masked[names[0]]
        assert masked.dtype == np.uint32 and masked.shape == encoded.ring.shape
        correlation = np.corrcoef(masked[:-1].astype(np.float64), delta)[0, 1]
        assert abs(correlation) < 0.01, correlation
        statistic = _chi_square_uniform_bytes(masked)
        assert statistic < CHI2_CRITICAL_255_DOF, statistic
        if chi2 is not None:
            assert chi2.sf(statistic, 255) > 1e-6
        payloads.append(masked)
    assert np.mean(payloads[0] == payloads[1]) < 1e-3
    assert np.mean(payloads[0].view(np.uint8) == payloads[1].view(np.uint8)) < 0.01


def test_seeds_and_round_keys_are_fresh_per_hospital_and_round() -> None:
    """Self-mask seeds and X25519 round keys are never reused across hospitals or rounds
    (a reused seed would let the coordinator subtract two payloads and cancel the mask)."""
    names = hospital_names(3)
    identities = new_identities(names)
    seen: list[bytes] = []
    for server_round in (1, 2):
        run = run_protocol(random_rings(names, 4), 2, identities=identities,
                           server_round=server_round)
        for state in run.states.values():
            assert len(state.self_seed) == prg.SEED_BYTES
            seen += [state.self_seed, state.c_secret, state.s_secret]
    assert len(set(seen)) == len(seen)


def test_keys_and_share_aad_are_bound_to_round_purpose_and_pair() -> None:
    """Both ends of a pair derive the same key, and any other round, purpose or pair gives
    another one; the shares' associated data also names round, sender and recipient. Each
    binding is checked alone (each alone stops a replayed or redirected share)."""
    a_secret, a_public = p.new_x25519()
    b_secret, b_public = p.new_x25519()
    ctx1, ctx2 = p.round_context(RUN_ID, 1, 1), p.round_context(RUN_ID, 2, 1)
    key = p.agree(a_secret, b_public, P.SHARE_PURPOSE, ctx1, (H1, H2))
    assert key == p.agree(b_secret, a_public, P.SHARE_PURPOSE, ctx1, (H2, H1))
    others = [
        p.agree(a_secret, b_public, P.SHARE_PURPOSE, ctx2, (H1, H2)),
        p.agree(a_secret, b_public, P.MASK_PURPOSE, ctx1, (H1, H2)),
        p.agree(a_secret, b_public, P.SHARE_PURPOSE, ctx1, (H1, H3)),
        p.agree(a_secret, b_public, P.SHARE_PURPOSE, p.round_context("other-run", 1, 1), (H1, H2)),
    ]
    assert len({key, *others}) == 5 and len(key) == 32
    aad = P._share_aad(ctx1, H1, H2)
    assert len({aad, P._share_aad(ctx2, H1, H2), P._share_aad(ctx1, H2, H1)}) == 3
    ciphertext = p.encrypt(key, b"shares", aad)
    assert p.decrypt(key, ciphertext, aad, H1) == b"shares"
    with pytest.raises(p.ShareRejected, match=H1):
        p.decrypt(key, ciphertext, P._share_aad(ctx2, H1, H2), H1)


# --- 4. tampering by the coordinator -----------------------------------------------------------


@dataclass
class SharedRound:
    """Three hospitals after stage 2, for tampering with what stage 3 receives."""

    identities: dict[str, Ed25519PrivateKey]
    states: dict[str, HospitalRound]
    adverts: dict[str, Advertisement]
    outboxes: dict[str, dict[str, bytes]]

    @property
    def enrollment(self) -> dict[str, Ed25519PublicKey]:
        return enrollment_of(self.identities)


def advertised(
    identities: Mapping[str, Ed25519PrivateKey], server_round: int = 1, attempt: int = 1
) -> SharedRound:
    states, adverts = {}, {}
    for name, key in identities.items():
        states[name], adverts[name] = P.advertise(key, name, RUN_ID, server_round, attempt, CONFIG)
    return SharedRound(dict(identities), states, adverts, {})


def shared(round_: SharedRound, threshold: int = 2) -> SharedRound:
    for name, state in round_.states.items():
        round_.outboxes[name], _ = P.make_shares(
            state, list(round_.adverts.values()), round_.enrollment, threshold, minimum_threshold=2
        )
    return round_


NAMES3 = hospital_names(3)
H1, H2, H3 = NAMES3


@pytest.mark.parametrize("position", [0, 20, -1], ids=["nonce", "body", "tag"])
def test_a_flipped_ciphertext_byte_is_rejected_naming_the_sender(position: int) -> None:
    """AES-GCM authenticates the whole share message: one altered byte anywhere → refused."""
    round_ = shared(advertised(new_identities(NAMES3)))
    inbox = inbox_for(round_.outboxes, NAMES3, H2)
    data = bytearray(inbox[H1])
    data[position] ^= 0x01
    inbox[H1] = bytes(data)
    with pytest.raises(p.ShareRejected, match=H1):
        P.accept_shares(round_.states[H2], NAMES3, inbox)
    assert_no_masked_input(round_.states[H2])


def test_misaddressed_or_relabelled_shares_are_rejected() -> None:
    """A ciphertext for hospital-3 given to hospital-2, or hospital-3's ciphertext labelled as
    hospital-1's, does not decrypt: keys and associated data bind sender and recipient."""
    round_ = shared(advertised(new_identities(NAMES3)))
    for sender, ciphertext in [(H1, round_.outboxes[H1][H3]), (H1, round_.outboxes[H3][H2])]:
        inbox = {**inbox_for(round_.outboxes, NAMES3, H2), sender: ciphertext}
        with pytest.raises(p.ShareRejected, match=sender):
            P.accept_shares(round_.states[H2], NAMES3, inbox)
        assert_no_masked_input(round_.states[H2])


def test_a_share_replayed_from_another_round_is_rejected() -> None:
    """Round-1 ciphertext delivered in round 2 is refused, with fresh round-2 keys and even
    if sender and recipient (wrongly) reused their round-1 c keys: the round id is in both
    the key derivation and the associated data."""
    identities = new_identities(NAMES3)
    round1 = shared(advertised(identities, server_round=1))
    replayed = round1.outboxes[H1][H2]

    round2 = shared(advertised(identities, server_round=2))
    inbox = {**inbox_for(round2.outboxes, NAMES3, H2), H1: replayed}
    with pytest.raises(p.ShareRejected, match=H1):
        P.accept_shares(round2.states[H2], NAMES3, inbox)
    assert_no_masked_input(round2.states[H2])

    reused = advertised(identities, server_round=2)
    context2 = p.round_context(RUN_ID, 2, 1)
    for name in (H1, H2):
        reused.states[name], reused.adverts[name] = signed_advert(
            identities[name], name, context2, round1.states[name].c_secret,
            reused.states[name].s_secret,
        )
    shared(reused)
    assert reused.adverts[H1].c_public == round1.adverts[H1].c_public
    inbox = {**inbox_for(reused.outboxes, NAMES3, H2), H1: replayed}
    with pytest.raises(p.ShareRejected, match=H1):
        P.accept_shares(reused.states[H2], NAMES3, inbox)
    assert_no_masked_input(reused.states[H2])


@pytest.mark.parametrize("key", ["c_public", "s_public"])
def test_a_substituted_public_key_fails_its_signature(key: str) -> None:
    """The coordinator swaps hospital-2's c or s key for its own (keeping hospital-2's
    signature, or re-signing with a key it controls): hospital-1 refuses, naming hospital-2."""
    round_ = advertised(new_identities(NAMES3))
    _, coordinator_public = p.new_x25519()
    forged = {**round_.adverts[H2].__dict__, key: coordinator_public}
    coordinator_identity = Ed25519PrivateKey.generate()
    resigned = {
        **forged,
        "signature": p.sign(
            coordinator_identity,
            p.advertisement_payload(
                round_.states[H1].context, H2, forged["c_public"], forged["s_public"]
            ),
        ),
    }
    for fields_ in (forged, resigned):
        adverts = {**round_.adverts, H2: Advertisement(**fields_)}
        with pytest.raises(p.BadSignature, match=H2):
            P.make_shares(
                round_.states[H1], list(adverts.values()), round_.enrollment, 2, minimum_threshold=2
            )
        assert round_.states[H1].stage == "advertised"
        assert_no_masked_input(round_.states[H1])


def test_an_advertisement_from_another_round_fails_its_signature() -> None:
    """Hospital-2's genuine round-1 keys relayed in round 2: the signature covers the round."""
    identities = new_identities(NAMES3)
    round1 = advertised(identities, server_round=1)
    round2 = advertised(identities, server_round=2)
    adverts = {**round2.adverts, H2: round1.adverts[H2]}
    with pytest.raises(p.BadSignature, match=H2):
        P.make_shares(
            round2.states[H1], list(adverts.values()), round2.enrollment, 2, minimum_threshold=2
        )
    assert_no_masked_input(round2.states[H1])


def test_an_unenrolled_or_duplicated_hospital_aborts() -> None:
    """Keys of a hospital missing from the enrollment list (even correctly self-signed) are
    refused, and so is a hospital listed twice."""
    round_ = advertised(new_identities(NAMES3))
    _, intruder = P.advertise(Ed25519PrivateKey.generate(), "intruder", RUN_ID, 1, 1, CONFIG)
    with pytest.raises(ProtocolAbort, match="intruder is not in this hospital's enrollment"):
        P.make_shares(
            round_.states[H1],
            [*round_.adverts.values(), intruder],
            round_.enrollment,
            2,
            minimum_threshold=2,
        )
    assert_no_masked_input(round_.states[H1])
    twice = [*round_.adverts.values(), round_.adverts[H3]]
    with pytest.raises(ProtocolAbort, match="twice"):
        P.make_shares(round_.states[H1], twice, round_.enrollment, 2, minimum_threshold=2)
    assert_no_masked_input(round_.states[H1])


def test_round_keys_of_an_aborted_attempt_are_refused_in_its_retry() -> None:
    """A retried round is a new attempt: a peer's validly signed keys from the first try
    (whose secrets that try's dropout recovery may have revealed) do not verify in the
    second, and shares of the first try do not decrypt in the second."""
    identities = new_identities(NAMES3)
    first = shared(advertised(identities, server_round=2, attempt=1))
    retry = advertised(identities, server_round=2, attempt=2)
    assert first.states[H1].context != retry.states[H1].context
    replayed = [a if a.hospital != H2 else first.adverts[H2] for a in retry.adverts.values()]
    with pytest.raises(p.BadSignature, match=H2):
        P.make_shares(retry.states[H1], replayed, retry.enrollment, 2, minimum_threshold=2)
    assert_no_masked_input(retry.states[H1])
    retry = shared(retry)
    inbox = {**inbox_for(retry.outboxes, NAMES3, H3), H1: first.outboxes[H1][H3]}
    with pytest.raises(p.ShareRejected, match=H1):
        P.accept_shares(retry.states[H3], NAMES3, inbox)
    assert_no_masked_input(retry.states[H3])


def test_the_recipients_own_keys_must_be_relayed_unchanged() -> None:
    """Omitting hospital-1's own keys, or relaying a stale but validly signed set (it
    advertised twice this round), aborts; altering them breaks its own signature."""
    identities = new_identities(NAMES3)
    round_ = advertised(identities)
    others = [a for name, a in round_.adverts.items() if name != H1]
    with pytest.raises(ProtocolAbort, match="own round keys"):
        P.make_shares(round_.states[H1], others, round_.enrollment, 2, minimum_threshold=2)
    assert_no_masked_input(round_.states[H1])

    _, stale = P.advertise(identities[H1], H1, RUN_ID, 1, 1, CONFIG)
    with pytest.raises(ProtocolAbort, match="own round keys"):
        P.make_shares(
            round_.states[H1], [*others, stale], round_.enrollment, 2, minimum_threshold=2
        )
    assert_no_masked_input(round_.states[H1])

    _, other_public = p.new_x25519()
    altered = Advertisement(H1, other_public, round_.adverts[H1].s_public,
                            round_.adverts[H1].signature)
    with pytest.raises(p.BadSignature, match=H1):
        P.make_shares(
            round_.states[H1], [*others, altered], round_.enrollment, 2, minimum_threshold=2
        )
    assert_no_masked_input(round_.states[H1])


def test_an_inconsistent_mask_set_or_inbox_aborts() -> None:
    """Stage 3 refuses a mask set without the hospital itself or with unknown names, and an
    inbox missing a sharer's shares or carrying extra ones."""
    round_ = shared(advertised(new_identities(NAMES3)))
    state = round_.states[H2]
    inbox = inbox_for(round_.outboxes, NAMES3, H2)
    with pytest.raises(ProtocolAbort, match="inconsistent"):
        P.accept_shares(state, [H1, H3], {H1: inbox[H1], H3: inbox[H3]})
    with pytest.raises(ProtocolAbort, match="inconsistent"):
        P.accept_shares(state, [*NAMES3, "hospital-9"], inbox)
    with pytest.raises(ProtocolAbort, match=r"missing from: \['hospital-3'\]"):
        P.accept_shares(state, NAMES3, {H1: inbox[H1]})
    with pytest.raises(ProtocolAbort, match=r"unexpected from: \['hospital-3'\]"):
        P.accept_shares(state, [H1, H2], inbox)
    assert_no_masked_input(state)


# --- 5. reveal safety --------------------------------------------------------------------------


def masked_round(n: int = 5, threshold: int = 3) -> Run:
    names = hospital_names(n)
    return run_protocol(random_rings(names, 8), threshold, reveal=False, unmask=False)


def test_reveal_gives_one_share_per_peer_and_only_once() -> None:
    """A hospital reveals b-shares of survivors and s-shares of dropped peers, never both;
    a second request (e.g. claiming a survivor dropped) is refused: answering it would give
    the coordinator both secrets of that survivor and so its unmasked input."""
    run = masked_round()
    state = run.states["hospital-1"]
    survivors, dropped = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"], ["hospital-5"]
    signatures = confirm_all(run.states, run.identities, survivors, dropped)
    enrollment = enrollment_of(run.identities)
    shares = P.reveal(state, survivors, dropped, signatures, enrollment)
    assert [(s.peer, s.kind) for s in shares] == [
        *[(name, P.SELF_MASK) for name in survivors],
        ("hospital-5", P.MASK_KEY),
    ]
    for s in shares:
        assert s.share == state.inbox[s.peer][0 if s.kind == P.SELF_MASK else 1]
    with pytest.raises(ProtocolAbort, match="twice"):
        P.reveal(state, survivors[:3], ["hospital-4", "hospital-5"], signatures, enrollment)
    with pytest.raises(ProtocolAbort, match="twice"):
        P.reveal(state, survivors, dropped, signatures, enrollment)
    with pytest.raises(ProtocolAbort, match="out of order"):  # a view is confirmed once
        P.confirm_view(state, run.identities["hospital-1"], survivors, dropped, 2)


@pytest.mark.parametrize(
    ("survivors", "dropped", "message"),
    [
        (["hospital-1", "hospital-2", "hospital-3"], ["hospital-3", "hospital-4", "hospital-5"],
         "inconsistent"),
        (["hospital-2", "hospital-3", "hospital-4"], ["hospital-1", "hospital-5"],
         "inconsistent"),
        (["hospital-1", "hospital-2", "hospital-3"], ["hospital-4"], "inconsistent"),
        (["hospital-1", "hospital-2", "hospital-3"], ["hospital-4", "hospital-5", "hospital-6"],
         "inconsistent"),
        (["hospital-1", "hospital-2"], ["hospital-3", "hospital-4", "hospital-5"],
         r"only 2 hospitals survived; this hospital needs at least 3"),
    ],
    ids=["peer-in-both", "omits-itself", "misses-a-peer", "unknown-peer", "below-threshold"],
)
def test_an_unsafe_unmasking_request_is_refused(
    survivors: list[str], dropped: list[str], message: str
) -> None:
    """Refused before signing anything: the hospital can still answer a correct request."""
    run = masked_round()
    state = run.states["hospital-1"]
    with pytest.raises(ProtocolAbort, match=message):
        P.confirm_view(state, run.identities["hospital-1"], survivors, dropped, 2)
    assert state.stage == "masked"
    names = hospital_names(5)
    signatures = confirm_all(run.states, run.identities, names, [])
    assert len(P.reveal(state, names, [], signatures, enrollment_of(run.identities))) == 5


def test_reveal_before_masking_is_refused() -> None:
    round_ = shared(advertised(new_identities(NAMES3)))
    with pytest.raises(ProtocolAbort, match="out of order"):
        P.confirm_view(round_.states[H1], round_.identities[H1], NAMES3, [], 2)
    with pytest.raises(ProtocolAbort, match="out of order"):
        P.reveal(round_.states[H1], NAMES3, [], {}, round_.enrollment)


# --- 6. threshold rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "hospitals", "advice"),
    [(0, 3, 2), (1, 2, 2), (1, 3, 2), (2, 4, 3), (2, 5, 3), (3, 6, 4), (5, 10, 6)],
)
def test_check_threshold_rejects_low_values_and_says_what_to_use(
    threshold: int, hospitals: int, advice: int
) -> None:
    """t < 2 or t ≤ n/2 would let a coordinator play two halves against each other."""
    with pytest.raises(ProtocolAbort, match=rf"set secure_aggregation.threshold to {advice} "):
        P.check_threshold(threshold, hospitals)


@pytest.mark.parametrize(("threshold", "hospitals"), [(2, 2), (2, 3), (3, 4), (3, 5), (6, 10)])
def test_check_threshold_accepts_a_strict_majority(threshold: int, hospitals: int) -> None:
    P.check_threshold(threshold, hospitals)


def test_make_shares_enforces_the_threshold_rule() -> None:
    """A hospital refuses to split its secrets with a threshold too low for the round."""
    round_ = advertised(new_identities(hospital_names(4)))
    state = round_.states["hospital-1"]
    with pytest.raises(ProtocolAbort, match="too low for 4 hospitals"):
        P.make_shares(
            state, list(round_.adverts.values()), round_.enrollment, 2, minimum_threshold=2
        )
    assert state.stage == "advertised"


# --- 7. masks come from ChaCha20 keyed by the seed, nothing else ------------------------------


def chacha20_reference(seed: bytes, length: int) -> np.ndarray:
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4")


def test_keystream_is_chacha20_of_the_seed_and_ignores_numpy_random_state() -> None:
    seed = secrets.token_bytes(32)
    np.random.seed(1)
    first = prg.keystream_uint32(seed, 1000)
    np.random.seed(2)
    np.random.random(100)
    np.random.default_rng(3).random(10)
    second = prg.keystream_uint32(seed, 1000)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, chacha20_reference(seed, 1000))
    assert prg.keystream_uint32(seed, 0).shape == (0,)


def test_keystream_continues_across_chunks() -> None:
    """Streams longer than one internal chunk are one continuous ChaCha20 stream."""
    seed = bytes(range(32))
    length = prg._CHUNK_WORDS + 3
    stream = prg.keystream_uint32(seed, length)
    np.testing.assert_array_equal(stream[-8:], chacha20_reference(seed, length)[-8:])


def test_different_seeds_give_different_streams_and_short_seeds_are_refused() -> None:
    a, b = prg.keystream_uint32(bytes(32), 256), prg.keystream_uint32(bytes(31) + b"\x01", 256)
    assert np.mean(a == b) < 0.05
    for size in (16, 31, 33):
        with pytest.raises(ValueError, match="32 bytes"):
            prg.keystream_uint32(bytes(size), 4)


def test_add_mask_is_undone_by_the_opposite_sign() -> None:
    vector = np.arange(1000, dtype=np.uint32)
    seed = secrets.token_bytes(32)
    prg.add_mask(vector, seed, +1)
    np.testing.assert_array_equal(
        vector, np.arange(1000, dtype=np.uint32) + chacha20_reference(seed, 1000)
    )
    prg.add_mask(vector, seed, -1)
    np.testing.assert_array_equal(vector, np.arange(1000, dtype=np.uint32))


def test_mask_uses_no_numpy_or_system_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """protocol.mask is a pure function of the round state: with every numpy.random entry
    point and the OS RNG made to raise, a copy of the state masks an (already encoded)
    vector to the very same payload."""
    names = hospital_names(3)
    round_ = shared(advertised(new_identities(names)))
    state = round_.states[names[0]]
    P.accept_shares(state, names, inbox_for(round_.outboxes, names, names[0]))
    copy = HospitalRound.from_bytes(state.to_bytes())
    encoded = np.arange(500, dtype=np.uint32)
    expected = P.mask(state, encoded, ADAPTER)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("masking must not draw randomness")

    for name in dir(np.random):
        if not name.startswith("_") and callable(getattr(np.random, name)):
            monkeypatch.setattr(np.random, name, refuse)
    monkeypatch.setattr(os, "urandom", refuse)
    monkeypatch.setattr(secrets, "token_bytes", refuse)
    monkeypatch.setattr(secrets, "randbits", refuse)
    with pytest.raises(AssertionError):
        np.random.default_rng(0)
    np.testing.assert_array_equal(P.mask(copy, encoded, ADAPTER), expected)
    np.testing.assert_array_equal(encoded, np.arange(500, dtype=np.uint32))  # not in place


# --- 8. fixed point ----------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased() -> None:
    """E[encode(v)] = v·scale between grid points (mean of 200k draws within 5 standard
    errors), for positive and negative values; values on the grid encode exactly."""
    codec = FixedPointCodec(1.0, 1, 2)
    k, frac, draws = 12_345, 0.3, 200_000
    tolerance = 5 * np.sqrt(frac * (1 - frac) / draws)
    for sign in (+1, -1):
        ring = codec.encode(np.full(draws, sign * (k + frac) / codec.scale))
        values = ring.view(np.int32).astype(np.float64)
        assert set(np.unique(values)) <= {sign * k, sign * (k + 1)}
        assert abs(values.mean() - sign * (k + frac)) < tolerance
    on_grid = codec.encode(np.full(1000, 7 / codec.scale))
    np.testing.assert_array_equal(on_grid, 7)


def test_clip_to_norm() -> None:
    rng = np.random.default_rng(5)
    long = rng.standard_normal(300) * 1e6
    clip = clip_to_norm(long, 2.5)
    assert clip.clipped and clip.original_norm == pytest.approx(np.linalg.norm(long))
    assert abs(np.linalg.norm(clip.vector) - 2.5) <= 2.5 * 1e-9
    np.testing.assert_allclose(clip.vector / np.linalg.norm(clip.vector), long / clip.original_norm)
    short = long / np.linalg.norm(long)
    kept = clip_to_norm(short, 2.5)
    assert not kept.clipped
    np.testing.assert_array_equal(kept.vector, short)
    with pytest.raises(ValueError, match="positive"):
        clip_to_norm(short, 0.0)
    with pytest.raises(FixedPointOverflow, match="NaN"):
        clip_to_norm(np.array([1.0, np.nan]), 1.0)


@pytest.mark.parametrize("sign", [+1, -1])
def test_the_extreme_sum_of_clipped_deltas_never_wraps(sign: int) -> None:
    """n hospitals with the maximum weight and huge deltas all on one coordinate: each is
    clipped to exactly ±C, and the sum n·W·C decodes with the right sign and value."""
    n, W, C = 7, 5000, 3.0
    codec = FixedPointCodec(C, W, n)
    reference = {"a": np.zeros(3, np.float32)}
    delta = {"a": np.array([sign * 1e30, 0.0, 0.0], np.float32)}
    rings = []
    for _ in range(n):
        encoded = encode_input(delta, reference, W, codec)
        assert encoded.clip.clipped
        rings.append(encoded.ring)
    total, weight_sum = decode_aggregate(ring_sum(rings), n, codec, reference)
    assert weight_sum == n * W
    assert abs(total["a"][0] - sign * n * W * C) <= codec.error_bound(n) + 1e-6 * n * W * C
    np.testing.assert_allclose(total["a"][1:], 0.0, atol=codec.error_bound(n))


def test_encode_refuses_an_unclipped_value() -> None:
    codec = FixedPointCodec(1.0, 10, 3)
    with pytest.raises(FixedPointOverflow, match="clip before encoding"):
        codec.encode(np.array([0.0, -10.01]))


def test_encode_never_exceeds_the_per_hospital_budget() -> None:
    """Even a value at encode's float tolerance (W·C·(1 + 1e-9)) must encode to at most
    (2^31 − 1)/n units, or n of them can wrap to a negative sum the range check accepts."""
    codec = FixedPointCodec(1.0, 1, 3)
    ring = codec.encode(np.full(20_000, 1.0 + 0.99e-9))
    assert int(ring.view(np.int32).max()) <= (2**31 - 1) // 3


def test_an_oversized_input_is_refused_by_decode_not_wrapped() -> None:
    """A hospital that skips clipping (3.5·W·C on one coordinate, encoded by hand and masked
    normally) makes the sum of the 3 survivors impossible: decoding refuses it. (With all n
    in the sum the range check spans the whole ring; the server's norm check covers that.)"""
    n, W, C = 4, 100, 1.0
    codec = FixedPointCodec(C, W, n)
    names = hospital_names(n)
    reference = {"a": np.zeros(2, np.float32)}
    inputs = {
        name: encode_input({"a": np.array([0.0, 0.9], np.float32)}, reference, W, codec).ring
        for name in names
    }
    cheat = np.array([round(3.5 * W * C * codec.scale), 0, W], dtype=np.int64)
    assert cheat[0] < 2**31  # the sum does not wrap: it is just too large
    inputs["hospital-2"] = cheat.astype(np.uint32)
    run = run_protocol(inputs, 3, drop_after={"hospital-3": "make_shares"})
    assert run.total is not None and len(run.survivors) == 3
    with pytest.raises(FixedPointOverflow, match="did not clip"):
        decode_aggregate(run.total, 3, codec, reference)
    inputs["hospital-2"] = inputs["hospital-1"]  # honest: decodes fine
    run = run_protocol(inputs, 3, drop_after={"hospital-3": "make_shares"})
    assert run.total is not None
    assert decode_aggregate(run.total, 3, codec, reference)[1] == 3 * W
    with pytest.raises(FixedPointOverflow, match="did not clip"):
        codec.decode_sum(np.array([-cheat[0]], np.int64).astype(np.uint32), 1)
    with pytest.raises(ValueError, match="wrong length"):
        decode_aggregate(run.total[:-1], 3, codec, reference)


def test_weights_are_exact_and_impossible_weight_sums_are_refused() -> None:
    assert encode_weight(1, 50) == 1 and encode_weight(50, 50) == 50
    for bad in (0, 51, -1):
        with pytest.raises(FixedPointOverflow):
            encode_weight(bad, 50)
    assert decode_weight_sum(np.uint32(3), 3, 50) == 3
    assert decode_weight_sum(np.uint32(150), 3, 50) == 150
    for impossible in (0, 2, 151, RING - 1):
        with pytest.raises(FixedPointOverflow, match="impossible"):
            decode_weight_sum(np.uint32(impossible), 3, 50)


def test_a_codec_that_cannot_fit_the_sum_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit in 32-bit fixed point"):
        FixedPointCodec(1e6, 10_000, 1000)
    for args in [(0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]:
        with pytest.raises(ValueError, match="positive"):
            FixedPointCodec(*args)
    codec = FixedPointCodec(2.0, 300, 9)
    assert 9 * (300 * 2.0 * codec.scale + 1) < 2**31  # the documented budget holds
    assert layout_size({"a": np.zeros((2, 3)), "b": np.zeros(4)}) == 11


# --- 9. state round trip -----------------------------------------------------------------------


def assert_same_state(a: HospitalRound, b: HospitalRound) -> None:
    assert a == b
    for f in fields(HospitalRound):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y), f.name
        if isinstance(x, dict):
            for key in x:
                assert type(x[key]) is type(y[key]) is tuple, f.name
                assert all(type(v) is bytes for v in y[key]), f.name


@pytest.mark.parametrize("names", [hospital_names(4), ["hex", "zeta", "alpha"]])
def test_hospital_round_survives_to_bytes_between_every_stage(names: list[str]) -> None:
    """The node keeps HospitalRound as bytes in its Flower context between stages: every
    field (bytes, tuples, lists, stage, threshold) survives, and a round run entirely on
    reloaded states gives the exact sum. (A hospital may be named 'hex'.)"""
    names = sorted(names)
    identities = new_identities(names)
    enrollment = enrollment_of(identities)

    def reload(state: HospitalRound) -> HospitalRound:
        copy = HospitalRound.from_bytes(state.to_bytes())
        assert_same_state(state, copy)
        return copy

    states, adverts = {}, {}
    for name in names:
        state, adverts[name] = P.advertise(identities[name], name, RUN_ID, 3, 1, CONFIG)
        states[name] = reload(state)
    outboxes, commitments = {}, {}
    for name in names:
        outboxes[name], commitments[name] = P.make_shares(
            states[name],
            list(adverts.values()),
            enrollment,
            len(names) // 2 + 1,
            minimum_threshold=2,
        )
        states[name] = reload(states[name])
        assert states[name].self_seed and states[name].participants
    inputs = random_rings(names, 33)
    masked = {}
    for name in names:
        P.accept_shares(states[name], names, inbox_for(outboxes, names, name))
        states[name] = reload(states[name])
        masked[name] = P.mask(states[name], inputs[name], ADAPTER)
        states[name] = reload(states[name])
        assert states[name].stage == "masked"
    signatures = {}
    for name in names:
        signatures[name] = P.confirm_view(states[name], identities[name], names, [], 2)
        states[name] = reload(states[name])
        assert states[name].stage == "confirmed" and states[name].survivors == names
    revealed = {name: P.reveal(states[name], names, [], signatures, enrollment)
                for name in names}
    for name in names:
        assert reload(states[name]).stage == "revealed"
    context = states[names[0]].context
    total = P.unmask_sum(
        P.UnmaskInputs(context, len(names) // 2 + 1, adverts, names, commitments, masked,
                       revealed)
    )
    np.testing.assert_array_equal(total, ring_sum(list(inputs.values())))


def test_a_hospital_refuses_a_threshold_below_its_own_floor() -> None:
    """A coordinator listing only itself-controlled peers with a low threshold is refused:
    the floor is the hospital's (a majority of its enrolled hospitals), not the coordinator's."""
    names = hospital_names(6)
    identities = new_identities(names)
    enrollment = enrollment_of(identities)
    victim, colluder = names[0], names[1]
    states, adverts = {}, {}
    for name in (victim, colluder):
        states[name], adverts[name] = P.advertise(identities[name], name, "run-floor", 1, 1, CONFIG)
    with pytest.raises(P.ProtocolAbort, match="below this hospital's minimum of 4"):
        P.make_shares(states[victim], list(adverts.values()), enrollment, 2,
                      minimum_threshold=len(enrollment) // 2 + 1)
