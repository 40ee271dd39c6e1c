"""The deployed ServerApp's Grid, collecting replies as soon as they arrive.

Flower 1.41's `HttpGrid.send_and_receive` (the ServerApp's connection to a SuperLink) sleeps
3 s between two pulls of replies, so every stage of a round waited up to 3 s after its last
hospital had answered: with five stages per secure round, up to 15 s per round spent waiting
on nothing. `PromptGrid` keeps Flower's push and pull calls and only pulls more often
(`PULL_INTERVAL_S`, each pull one small request to the SuperLink). Flower's own simulation
grid already pulls every 0.1 s and is used as it is.

Deployed replies are pulled with each reply's bytes bounded (server/bounded_pull.py): a
reply larger than `federation.max_reply_mb` is refused before it is decoded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from fedtune.server.bounded_pull import pull_messages_within

PULL_INTERVAL_S = 0.1


class PromptGrid(Grid):
    """`grid` with a `send_and_receive` that pulls every PULL_INTERVAL_S, and replies over
    the network read only up to `max_reply_bytes` each."""

    def __init__(self, grid: Grid, max_reply_bytes: int) -> None:
        self._grid = grid
        self.max_reply_bytes = max_reply_bytes

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if isinstance(self._grid, HttpGrid):
            return pull_messages_within(self._grid, message_ids, self.max_reply_bytes)
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every message has its reply or `timeout` s have passed."""
        pending = {mid for mid in self.push_messages(messages) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL_S)
        return replies
