"""Secure-aggregation messages on the wire: Flower record names and conversions.

The stages are ClientApp actions (`train.<action>` message types). Each request carries
the round's JOB record (fedtune.core.wire) plus the stage's own record below; each reply carries
the hospital's name. Payload conversions live here so the protocol code stays Flower-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune.core.secagg.protocol import Advertisement, RevealedShare
from fedtune.core.wire import HOSPITAL, JOB, Job, MalformedReply

# Message types (ClientApp actions).
KEYS = "train.secagg_keys"  # stage 1: advertise signed round keys
SHARES = "train.secagg_shares"  # stage 2: verified keys in, encrypted shares out
MASKED = "train.secagg_masked"  # stage 3: inbox + global adapter in, masked input out
CONFIRM = "train.secagg_confirm"  # stage 3b: who survived in, signed view of the round out
UNMASK = "train.secagg_unmask"  # stage 4: who survived + every survivor's signature in,
# revealed shares out

ADVERT = "secagg-advert"  # reply of stage 1
PARTICIPANTS = "secagg-participants"  # request of stage 2: every advertisement
OUTBOX = "secagg-outbox"  # reply of stage 2: recipient → ciphertext, + commitment
INBOX = "secagg-inbox"  # request of stage 3: sender → ciphertext, + the mask set
MASKED_INPUT = "secagg-masked-input"  # reply of stage 3 (ArrayRecord)
SURVIVORS = "secagg-survivors"  # request of stages 3b and 4
VIEW_SIGNATURE = "secagg-view-signature"  # reply of stage 3b
VIEW_SIGNATURES = "secagg-view-signatures"  # request of stage 4: survivor → its signature
REVEALED = "secagg-revealed"  # reply of stage 4


def job_content(job: Job, **records: ConfigRecord) -> RecordDict:
    """A stage request: the round's job plus the stage's records."""
    return RecordDict({JOB: job.to_record(), **records})


def named(content: RecordDict, hospital: str) -> RecordDict:
    content[HOSPITAL] = ConfigRecord({"name": hospital})
    return content


def advert_record(advert: Advertisement) -> ConfigRecord:
    return ConfigRecord({"hospital": advert.hospital, "c-public": advert.c_public,
                         "s-public": advert.s_public, "signature": advert.signature})


def parse_advert(message: Message) -> Advertisement:
    record = _config(message, ADVERT)
    try:
        return Advertisement(str(record["hospital"]), _bytes(record["c-public"]),
                             _bytes(record["s-public"]), _bytes(record["signature"]))
    except KeyError as exc:
        raise MalformedReply(f"the key advertisement has no {exc}") from None


def participants_record(adverts: Sequence[Advertisement]) -> ConfigRecord:
    return ConfigRecord(
        {
            "hospitals": [a.hospital for a in adverts],
            "c-public": [a.c_public for a in adverts],
            "s-public": [a.s_public for a in adverts],
            "signatures": [a.signature for a in adverts],
        }
    )


def parse_participants(message: Message) -> list[Advertisement]:
    record = message.content.config_records[PARTICIPANTS]
    columns = [list(record[key]) for key in ("hospitals", "c-public", "s-public", "signatures")]  # type: ignore[arg-type]
    if len({len(column) for column in columns}) != 1:
        raise ValueError("the list of round keys is malformed (columns of unequal length)")
    return [
        Advertisement(str(name), _bytes(c), _bytes(s), _bytes(sig))
        for name, c, s, sig in zip(*columns, strict=True)
    ]


def outbox_record(outbox: Mapping[str, bytes], commitment: bytes) -> ConfigRecord:
    recipients = sorted(outbox)
    return ConfigRecord({"recipients": recipients,
                         "ciphertexts": [outbox[r] for r in recipients],
                         "commitment": commitment})


def parse_outbox(message: Message) -> tuple[dict[str, bytes], bytes]:
    record = _config(message, OUTBOX)
    try:
        recipients = [str(r) for r in record["recipients"]]  # type: ignore[union-attr]
        ciphertexts = [_bytes(c) for c in record["ciphertexts"]]  # type: ignore[union-attr]
        commitment = _bytes(record["commitment"])
    except (KeyError, TypeError) as exc:
        raise MalformedReply(f"the key-share reply is malformed ({exc})") from None
    if len(recipients) != len(ciphertexts) or len(set(recipients)) != len(recipients):
        raise MalformedReply("the key-share reply lists recipients and ciphertexts unevenly")
    return dict(zip(recipients, ciphertexts, strict=True)), commitment


def inbox_record(mask_set: Sequence[str], inbox: Mapping[str, bytes]) -> ConfigRecord:
    senders = sorted(inbox)
    return ConfigRecord({"mask-set": list(mask_set), "senders": senders,
                         "ciphertexts": [inbox[s] for s in senders]})


def parse_inbox(message: Message) -> tuple[list[str], dict[str, bytes]]:
    record = message.content.config_records[INBOX]
    senders = [str(s) for s in record["senders"]]  # type: ignore[union-attr]
    ciphertexts = [_bytes(c) for c in record["ciphertexts"]]  # type: ignore[union-attr]
    if len(senders) != len(ciphertexts) or len(set(senders)) != len(senders):
        raise ValueError("the relayed key shares are malformed")
    mask_set = [str(s) for s in record["mask-set"]]  # type: ignore[union-attr]
    return mask_set, dict(zip(senders, ciphertexts, strict=True))


def masked_record(masked: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"masked": Array(np.ascontiguousarray(masked, dtype=np.uint32))})


def parse_masked(message: Message, length: int) -> np.ndarray:
    """The masked input of a stage-3 reply; refused unless it is `length` uint32 values."""
    content = message.content
    if MASKED_INPUT not in content.array_records:
        raise MalformedReply(f"the reply has no '{MASKED_INPUT}' record")
    record = content.array_records[MASKED_INPUT]
    if list(record) != ["masked"]:
        raise MalformedReply("the masked input record must hold exactly one array")
    array = record["masked"]
    if array.dtype != "uint32" or tuple(array.shape) != (length,):
        raise MalformedReply(
            f"the masked input has dtype {array.dtype} and shape {array.shape}; expected "
            f"uint32 of length {length}"
        )
    return np.asarray(array.numpy(), dtype=np.uint32).reshape(length)


def masked_payload_bytes(message: Message) -> bytes:
    """The exact bytes of the masked input the coordinator received (for --record-views)."""
    return bytes(message.content.array_records[MASKED_INPUT]["masked"].data)


def survivors_record(survivors: Sequence[str], dropped: Sequence[str]) -> ConfigRecord:
    return ConfigRecord({"survivors": list(survivors), "dropped": list(dropped)})


def parse_survivors(message: Message) -> tuple[list[str], list[str]]:
    record = message.content.config_records[SURVIVORS]
    return [str(s) for s in record["survivors"]], [str(s) for s in record["dropped"]]  # type: ignore[union-attr]


def view_signature_record(signature: bytes) -> ConfigRecord:
    return ConfigRecord({"signature": signature})


def parse_view_signature(message: Message) -> bytes:
    record = _config(message, VIEW_SIGNATURE)
    if "signature" not in record:
        raise MalformedReply("the signed view has no signature")
    return _bytes(record["signature"])


def view_signatures_record(signatures: Mapping[str, bytes]) -> ConfigRecord:
    signers = sorted(signatures)
    return ConfigRecord({"hospitals": signers, "signatures": [signatures[h] for h in signers]})


def parse_view_signatures(message: Message) -> dict[str, bytes]:
    record = message.content.config_records[VIEW_SIGNATURES]
    signers = [str(h) for h in record["hospitals"]]  # type: ignore[union-attr]
    signatures = [_bytes(sig) for sig in record["signatures"]]  # type: ignore[union-attr]
    if len(signers) != len(signatures) or len(set(signers)) != len(signers):
        raise ValueError("the relayed signed views are malformed")
    return dict(zip(signers, signatures, strict=True))


def revealed_record(shares: Sequence[RevealedShare]) -> ConfigRecord:
    return ConfigRecord({"peers": [s.peer for s in shares], "kinds": [s.kind for s in shares],
                         "shares": [s.share for s in shares]})


def parse_revealed(message: Message) -> list[RevealedShare]:
    record = _config(message, REVEALED)
    try:
        columns = [list(record[k]) for k in ("peers", "kinds", "shares")]  # type: ignore[arg-type]
    except (KeyError, TypeError) as exc:
        raise MalformedReply(f"the unmasking reply is malformed ({exc})") from None
    if len({len(c) for c in columns}) != 1:
        raise MalformedReply("the unmasking reply's columns have unequal length")
    return [RevealedShare(str(p), str(k), _bytes(s)) for p, k, s in zip(*columns, strict=True)]


def _config(message: Message, name: str) -> ConfigRecord:
    if not message.has_content() or name not in message.content.config_records:
        raise MalformedReply(f"the reply has no '{name}' record")
    return message.content.config_records[name]


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedReply(f"expected bytes, got {type(value).__name__}")
    return value
