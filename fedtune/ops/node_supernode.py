"""`flower-supernode` as a hospital node runs it: polling every 0.25 s, a heartbeat every ~4 s.

Flower 1.41's SuperNode waits a fixed 3 s after every pull that brought no message (and
0.5 s between checks for its ClientApp's reply), so a message sent to an idle node waited
1.5 s on average, up to 3 s, before the node even looked at it, at every stage of every
round. The wait is a constant inside Flower's loop (`start_client_internal`, no setting);
`fedtune node` therefore runs the SuperNode through this module, which gives that loop a
`time` whose `sleep` is capped at IDLE_POLL_S. Everything else is Flower's own code and
arguments. The cost is one small pull request to the SuperLink per IDLE_POLL_S per node.

The node also announces a heartbeat interval of HEARTBEAT_INTERVAL_S (10 s, the shortest
the SuperLink accepts) instead of Flower's 30 s. The SuperLink takes a node for dead after two
intervals without a heartbeat, so a hospital whose machine dies mid-round is noticed after
about 20 s instead of about a minute, and the round goes on (or is aborted) that much
sooner. The cost is one small heartbeat request about every 4 s instead of every 20 s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

IDLE_POLL_S = 0.25
HEARTBEAT_INTERVAL_S = 10  # Flower's HEARTBEAT_MIN_INTERVAL: the SuperLink refuses less


class _PromptTime:
    """The `time` module, with `sleep` capped at IDLE_POLL_S."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, IDLE_POLL_S))


def main() -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.cli import flower_supernode

    # Flower 1.41 (pinned) sleeps, and reads the heartbeat interval, through these
    # module-level names; tests/test_deployment.py runs real nodes with them.
    node_loop.time = _PromptTime()  # type: ignore[assignment]
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL_S  # announced
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL_S  # the sender's pace
    flower_supernode()


def supernode_launcher() -> list[str]:
    """The command that starts the SuperNode (followed by Flower's own arguments).

    `-P` keeps the current folder off `sys.path`, as for the node's ClientApp processes.
    """
    return [sys.executable, "-P", "-m", "fedtune.ops.node_supernode"]


if __name__ == "__main__":
    main()
