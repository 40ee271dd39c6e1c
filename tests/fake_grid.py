"""An in-process Flower Grid: routes messages to the real ClientApp, no Ray, no network.

Each node gets its own Context, as Flower's simulation engine gives each virtual hospital
(node_config with `partition-id`), so the real ClientApp handlers run unchanged. A node can
be made to fail (`tamper`) to test how the coordinator treats bad replies, never answer
(`silent`), or crash part-way through a secure-aggregation round (`drop_after`); requests can
be altered before they reach a node (`tamper_request`: a malicious coordinator or network).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.app import app as client_app
from fedtune.core.secagg.wire import CONFIRM, KEYS, MASKED, SHARES, UNMASK
from fedtune.core.wire import JOB

Tamper = Callable[[int, Message], Message]

# The secure-aggregation stages of one round, in the order the coordinator sends them.
SECURE_STAGES = (KEYS, SHARES, MASKED, CONFIRM, UNMASK)


class InProcessGrid(Grid):
    """A Grid whose nodes are the fedtune ClientApp called in this process."""

    def __init__(
        self,
        num_nodes: int,
        node_configs: dict[int, dict[str, object]] | None = None,
        tamper: Tamper | None = None,
        silent: set[int] | None = None,
        drop_after: dict[int, str] | None = None,
        tamper_request: Tamper | None = None,
        only_in: set[tuple[int, int]] | None = None,
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
        # node id → the last secure-aggregation stage it answers in every round; it never
        # answers the later stages of that round (it crashed). It still answers evaluate
        # requests (and plain `train`), like a hospital that came back after the round.
        self.drop_after = dict(drop_after or {})
        # (round, attempt) pairs in which `drop_after` applies (None = every round): a
        # hospital whose crash is transient and that is back for the round's next attempt.
        self.only_in = only_in
        for node_id, stage in self.drop_after.items():
            if stage not in SECURE_STAGES:
                raise ValueError(f"drop_after[{node_id}] = {stage!r}; use one of {SECURE_STAGES}")
        # Applied to a copy of each request before the node sees it (`sent` keeps the
        # coordinator's original).
        self.tamper_request = tamper_request
        self.sent: list[Message] = []
        self.replies: list[Message] = []  # every reply the coordinator got, as it got it
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
                       group_id=group_id, ttl=ttl)

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
            if node_id in self.silent or self._dropped(node_id, message):
                continue
            delivered = message
            if self.tamper_request is not None:
                delivered = self.tamper_request(node_id, copy.deepcopy(message))
            reply = client_app(delivered, self.contexts[node_id])
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            replies.append(reply)
        self.replies.extend(replies)
        return replies

    def _dropped(self, node_id: int, message: Message) -> bool:
        """Whether the node has crashed before this secure-aggregation stage."""
        last = self.drop_after.get(node_id)
        kind = message.metadata.message_type
        if last is None or kind not in SECURE_STAGES:
            return False
        if self.only_in is not None:
            job = message.content.config_records[JOB]
            if (int(job["round"]), int(job["attempt"])) not in self.only_in:  # type: ignore[arg-type]
                return False
        return SECURE_STAGES.index(kind) > SECURE_STAGES.index(last)


class CrashAtRound(InProcessGrid):
    """The coordinator process dies when round `crash_round` starts training."""

    def __init__(self, num_nodes: int, crash_round: int) -> None:
        super().__init__(num_nodes)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if any(m.metadata.group_id == str(self.crash_round)
               and m.metadata.message_type.startswith("train") for m in messages):
            raise KeyboardInterrupt("coordinator killed")
        return super().send_and_receive(messages, timeout=timeout)
