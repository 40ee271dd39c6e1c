"""A deployed reply larger than federation.max_reply_mb is refused before it is decoded.

The replies are real Flower messages split into Flower's own objects (records, arrays in
5 MB chunks), exactly as a hospital's SuperNode pushes them. The SuperLink's HTTP API is the
one part played here (`SuperLinkObjects`, serving those objects and Flower's protobufs):
starting a SuperLink with a node that sends an oversized reply would need a ClientApp other
than the signed one, which every node refuses (test_deployment.py); the normal path through
a real SuperLink is run by the deployment tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import (
    ObjectTree,  # pylint: disable=E0611
    PullObjectResponse,  # pylint: disable=E0611
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedtune.server.bounded_pull import ReplyTooLarge, pull_messages_within, pull_within
from fedtune.server.exchange import exchange

MB = 1024**2


def hospital_reply(node_id: int, megabytes: int, reply_to: str) -> Message:
    """A reply from `node_id` carrying a float32 delta of about `megabytes` MB."""
    delta = np.arange(megabytes * MB // 4, dtype=np.float32)
    content = RecordDict({
        "update": ArrayRecord({"lora_A": Array(delta)}),
        "meta": ConfigRecord({"hospital": f"hospital-{node_id}"}),
    })
    metadata = Metadata(
        run_id=7, message_id="", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id=reply_to, group_id="1", created_at=0.0, ttl=600,
        message_type="train",
    )
    message = make_message(metadata=metadata, content=content)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def objects_of(message: Message) -> dict[str, bytes]:
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


class SuperLinkObjects:
    """The three runtime calls `HttpGrid.pull_messages` makes, served from Flower objects."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies
        self.objects: dict[str, bytes] = {}
        self.trees: dict[str, ObjectTree] = {}
        for reply in replies:
            self.objects.update(objects_of(reply))
            self.trees[reply.object_id] = get_object_tree(reply)
        self.pulled: list[str] = []
        self.confirmed: list[str] = []

    def PullMessages(self, request: object) -> PullAppMessagesResponse:
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(r)) for r in self.replies],
            message_object_trees=[self.trees[r.object_id] for r in self.replies],
        )

    def PullObject(self, request: object) -> PullObjectResponse:
        object_id = request.object_id  # type: ignore[attr-defined]
        self.pulled.append(object_id)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=self.objects[object_id])

    def ConfirmMessageReceived(self, request: object) -> object:
        self.confirmed.append(request.message_object_id)  # type: ignore[attr-defined]
        return object()


def grid_on(link: SuperLinkObjects) -> SimpleNamespace:
    return SimpleNamespace(_runtime_client=link, run=SimpleNamespace(run_id=7),
                           node=Node(node_id=0))


def test_a_reply_within_the_limit_is_pulled_whole_and_decodes_to_what_was_sent() -> None:
    reply = hospital_reply(3, 12, "ins-3")
    objects = objects_of(reply)
    contents = pull_within(list(objects), objects.__getitem__, limit_bytes=13 * MB)
    assert contents == objects
    decoded = inflate_object_from_contents(reply.object_id, contents)
    assert np.array_equal(decoded.content["update"]["lora_A"].numpy(),
                          reply.content["update"]["lora_A"].numpy())


def test_an_oversized_reply_stops_being_pulled_once_it_passes_the_limit() -> None:
    reply = hospital_reply(3, 40, "ins-3")  # 8 chunks of 5 MB
    objects = objects_of(reply)
    calls: list[str] = []

    def pull(object_id: str) -> bytes:
        calls.append(object_id)
        return objects[object_id]

    with pytest.raises(ReplyTooLarge, match="max_reply_mb = 8 MB; it was refused unread"):
        pull_within(list(objects), pull, limit_bytes=8 * MB)
    assert len(calls) <= 4 < len(objects)  # two chunks past 8 MB, plus two in flight at most


def test_the_stage_refuses_the_oversized_reply_by_hospital_and_keeps_the_others() -> None:
    small, large = hospital_reply(1, 1, "ins-1"), hospital_reply(2, 40, "ins-2")
    link = SuperLinkObjects([small, large])
    pulled = pull_messages_within(grid_on(link), ["ins-1", "ins-2"], limit_bytes=4 * MB)

    by_node = {m.metadata.src_node_id: m for m in pulled}
    assert not by_node[1].has_error()
    assert np.array_equal(by_node[1].content["update"]["lora_A"].numpy(),
                          small.content["update"]["lora_A"].numpy())
    refused = by_node[2]
    assert refused.has_error() and not refused.has_content()
    assert refused.metadata.reply_to_message_id == "ins-2"
    assert "max_reply_mb = 4 MB" in refused.error.reason
    assert len(set(link.pulled) & set(objects_of(large))) < len(objects_of(large))
    assert sorted(link.confirmed) == sorted([small.object_id, large.object_id])  # released

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1  # the ServerApp's

    class Grid:  # what the stage sees: these two replies, whatever it asked
        def send_and_receive(self, messages: object, timeout: float) -> list[Message]:
            return pulled

    names = SimpleNamespace(of=lambda r: f"hospital-{r.metadata.src_node_id}",
                            known=lambda n: f"node {n}")
    out = exchange(Grid(), names, {1: RecordDict(), 2: RecordDict()}, "train", "1", 5.0,  # type: ignore[arg-type]
                   max_reply_mb=4, parse=lambda r: r.content["update"], stage="masked input")
    assert list(out.answers) == ["hospital-1"]
    assert [(r.hospital, "max_reply_mb = 4 MB" in r.reason) for r in out.refusals] == [
        ("hospital-2", True)
    ]
