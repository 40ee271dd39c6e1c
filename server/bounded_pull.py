"""Pull a hospital's reply from the SuperLink without reading more than the run allows.

A deployed reply reaches the ServerApp as Flower objects (the message, its records, its
arrays in chunks of at most 5 MB) that `HttpGrid.pull_messages` pulls one by one into memory
and only then decodes. Flower 1.41 puts no limit on a message's total size, so a hospital (or
anyone holding a node key) could make the coordinator pull and decode gigabytes. Here the
bytes of one reply are counted as its objects arrive; once they pass
`federation.max_reply_mb` the pull stops, nothing of that reply is decoded, and the reply is
handed on as an error that names the hospital and the limit. At most the objects already in
flight when the limit is passed (two concurrent pulls, each one object) are read beyond it.

The SuperLink itself still stores what a SuperNode pushes (Flower has no per-message limit
there); this bounds what the coordinator's own process reads and decodes. In simulation the
virtual hospitals run the project's own code in the same engine and replies are not pulled
over the network: `PromptGrid` leaves those to Flower's grid, and `exchange` still checks
every decoded reply's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import cast

from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid


class ReplyTooLarge(ObjectPullError):
    """A reply's objects add up to more bytes than the run allows; the rest is not pulled."""

    def __init__(self, object_id: str, limit_bytes: int) -> None:
        super().__init__(object_id, "over the limit")
        self.limit_bytes = limit_bytes

    @property
    def reason(self) -> str:
        return (
            f"the reply is larger than federation.max_reply_mb = "
            f"{self.limit_bytes / 1024**2:g} MB; it was refused unread"
        )

    def __str__(self) -> str:
        return self.reason


def pull_within(
    object_ids: list[str], pull_object_fn: Callable[[str], bytes], limit_bytes: int
) -> dict[str, bytes]:
    """Flower's `pull_objects`, stopped with ReplyTooLarge once the bytes pass `limit_bytes`."""
    lock = threading.Lock()
    received = [0]

    def counted(object_id: str) -> bytes:
        content = pull_object_fn(object_id)
        with lock:
            received[0] += len(content)
            over = received[0] > limit_bytes
        if over:
            raise ReplyTooLarge(object_id, limit_bytes)
        return content

    return pull_objects(object_ids, counted)


def pull_messages_within(
    grid: HttpGrid, message_ids: Iterable[str], limit_bytes: int
) -> list[Message]:
    """`HttpGrid.pull_messages` with each reply's bytes bounded by `limit_bytes`.

    Restates Flower 1.41's method (superlink/grid/http_grid.py) with `pull_within` in place
    of `pull_objects`. A reply over the limit, or one whose objects cannot be pulled, comes
    back as an error message from its hospital's node, so the stage refuses it by name; its
    objects are released on the SuperLink either way.
    """
    client = grid._runtime_client
    run_id = grid.run.run_id
    response = client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    pull_fn = make_pull_object_fn_protobuf(
        pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id
    )
    messages: list[Message] = []
    for proto, tree in zip(response.messages_list, response.message_object_trees, strict=True):
        meta = proto.metadata
        object_ids = [node.object_id for node in iterate_object_tree(tree)]
        try:
            contents = pull_within(object_ids, pull_fn, limit_bytes)
        except ReplyTooLarge as exc:
            reason = exc.reason
        except ObjectPullError as exc:
            reason = f"its reply could not be pulled from the coordinator's SuperLink ({exc})"
        else:
            reason = ""
        client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
            node=grid.node, run_id=run_id, message_object_id=meta.message_id
        ))
        if reason:
            messages.append(make_message(
                metadata=Metadata(
                    run_id=run_id, message_id="", src_node_id=meta.src_node_id,
                    dst_node_id=grid.node.node_id, message_type=meta.message_type,
                    group_id=meta.group_id, ttl=0,
                    reply_to_message_id=meta.reply_to_message_id,
                    created_at=now().timestamp(),
                ),
                error=Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=reason),
            ))
            continue
        message = cast(Message, inflate_object_from_contents(meta.message_id, contents))
        message.metadata.__dict__["_message_id"] = meta.message_id
        messages.append(message)
    return messages
