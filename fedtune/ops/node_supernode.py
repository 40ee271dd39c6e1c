"""`flower-supernode` as a hospital node runs it: polling the coordinator every 0.25 s.

Flower 1.41's SuperNode waits a fixed 3 s after every pull that brought no message (and
0.5 s between checks for its ClientApp's reply), so a message sent to an idle node waited
1.5 s on average, up to 3 s, before the node even looked at it, at every stage of every
round. The wait is a constant inside Flower's loop (`start_client_internal`, no setting);
`fedtune node` therefore runs the SuperNode through this module, which gives that loop a
`time` whose `sleep` is capped at IDLE_POLL_S. Everything else is Flower's own code and
arguments. The cost is one small pull request to the SuperLink per IDLE_POLL_S per node.
"""

from __future__ import annotations

import sys
import time
from typing import Any

IDLE_POLL_S = 0.25


class _PromptTime:
    """The `time` module, with `sleep` capped at IDLE_POLL_S."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, IDLE_POLL_S))


def main() -> None:
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.cli import flower_supernode

    # Flower 1.41 (pinned) sleeps through this module-level name; tests/test_deployment.py
    # runs real nodes with it.
    node_loop.time = _PromptTime()  # type: ignore[assignment]
    flower_supernode()


def supernode_launcher() -> list[str]:
    """The command that starts the SuperNode (followed by Flower's own arguments).

    `-P` keeps the current folder off `sys.path`, as for the node's ClientApp processes.
    """
    return [sys.executable, "-P", "-m", "fedtune.ops.node_supernode"]


if __name__ == "__main__":
    main()
