"""An in-process Flower Grid: routes messages to the real ClientApp, no Ray, no network.

Each node gets its own Context, as Flower's simulation engine gives each virtual hospital
(node_config with `partition-id`), so the real ClientApp handlers run unchanged. A node can
be made to fail (`tamper`) to test how the coordinator treats bad replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

Tamper = Callable[[int, Message], Message]


class InProcessGrid(Grid):
    """A Grid whose nodes are the fedtune ClientApp called in this process."""

    def __init__(
        self,
        num_nodes: int,
        node_configs: dict[int, dict[str, object]] | None = None,
        tamper: Tamper | None = None,
        silent: set[int] | None = None,
    ) -> None:
        # Messages take their sender from the process identity, as in a real ServerApp.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.node_ids = [1000 + k for k in range(num_nodes)]
        configs = node_configs or {}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=configs.get(k, {"partition-id": k, "num-partitions": num_nodes}),
                state=RecordDict(),
                run_config={},
            )
            for k, node_id in enumerate(self.node_ids)
        }
        self.tamper = tamper
        self.silent = silent or set()  # nodes that never answer (dropped out)
        self.sent: list[Message] = []
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)  # fmt: skip

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the in-process grid answers in send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the in-process grid answers in send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if node_id in self.silent:
                continue
            reply = client_app(message, self.contexts[node_id])
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            replies.append(reply)
        return replies
