"""One message exchange with the hospitals: the coordinator's only Flower edge for rounds.

Every stage — a plain training round, the four secure-aggregation stages, an evaluation —
is the same exchange: send each asked node its request, wait for the replies, and sort
them into usable answers and refusals that name the hospital. A reply from a node that was
not asked is ignored (never trusted), an error reply carries the hospital's own reason, a
reply that is too large or does not parse is refused, a second reply from one hospital is
refused, and a hospital that does not answer is named as dropped out. The round loop
(`server/rounds.py`) and the secure round (`server/secure_round.py`) call `exchange` and
never build a Flower message themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtune.core.adapters import UpdateRejected
from fedtune.core.wire import MalformedReply, check_reply_size
from fedtune.server.collect import HospitalNames, Refusal

# The hospitals' side of the coordinator (a Flower Grid): what `run_federation` is given;
# and one hospital's reply to a stage (a Flower Message), for the stages' parsers.
HospitalGrid = Grid
Reply = Message

T = TypeVar("T")


@dataclass
class Answer(Generic[T]):
    """A usable reply: which node sent it, what it parsed to, and the reply itself."""

    node_id: int
    parsed: T
    reply: Message


@dataclass
class Exchanged(Generic[T]):
    """A stage's outcome: hospital → answer, the refusals, and how long the stage took."""

    answers: dict[str, Answer[T]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    seconds: float = 0.0


def exchange(
    grid: HospitalGrid,
    names: HospitalNames,
    requests: dict[int, RecordDict],
    message_type: str,
    group_id: str,
    timeout: float,
    max_reply_mb: float,
    parse: Callable[[Message], T],
    stage: str,
    malformed: Callable[[Exception], str] = str,
) -> Exchanged[T]:
    """Send `requests` (node id → content), collect and sort the replies.

    `parse` turns a reply into what the stage needs and raises MalformedReply,
    UpdateRejected, ValueError, KeyError or TypeError for a reply it cannot use;
    `malformed` words that refusal. `stage` names the stage in "no reply in the … stage".
    """
    messages = [
        Message(content, dst_node_id=node_id, message_type=message_type, group_id=group_id)
        for node_id, content in requests.items()
    ]
    started = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    out: Exchanged[T] = Exchanged()
    answered: set[int] = set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if node_id not in requests:
            continue  # not asked in this stage: ignore, never trust
        answered.add(node_id)
        hospital = names.of(reply)
        if reply.has_error():
            reason = reply.error.reason or f"error {reply.error.code}"
            out.refusals.append(Refusal(hospital, reason))
            continue
        try:
            check_reply_size(reply, max_reply_mb)
            parsed = parse(reply)
        except UpdateRejected as exc:
            out.refusals.append(Refusal(hospital, exc.reason))
            continue
        except (MalformedReply, ValueError, KeyError, TypeError) as exc:
            out.refusals.append(Refusal(hospital, malformed(exc)))
            continue
        if hospital in out.answers:
            out.refusals.append(Refusal(hospital, "answered twice in one stage"))
            continue
        out.answers[hospital] = Answer(node_id, parsed, reply)
    for node_id in sorted(set(requests) - answered):
        out.refusals.append(
            Refusal(names.known(node_id), f"no reply in the {stage} stage (dropped out)")
        )
    out.seconds = time.perf_counter() - started
    return out


def grid_node_ids(grid: HospitalGrid) -> list[int]:
    """The connected hospitals' node ids, sorted."""
    return sorted(grid.get_node_ids())

