"""The run's deadline around Flower's grid: no wait on nodes or replies outlives it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class RunDeadline(Exception):
    """The run's deadline passed: no new round starts."""


# Flower's grid waits 3 s between pulls for replies.  Every pull is a SuperLink request that
# can take its SQLite write lock (docs/scale.md): twice a second from the one ServerApp is
# little next to the hospitals' idle pulls (once a second each).
REPLY_POLL_SECONDS = 0.5


class DeadlineGrid:
    """The run's grid with its deadline: waiting for nodes or replies ends when it passes.

    Flower's strategies wait for ``min-nodes`` without end, polling the node list: past the
    deadline that raises :class:`RunDeadline` (no new round starts). Waiting for replies is cut
    to the time left, so a round in flight at the deadline ends with what arrived by then.
    Without a deadline (``math.inf``) it only polls for replies more often than Flower does.
    """

    def __init__(self, grid: Grid, deadline: float):
        self._grid = grid
        self._deadline = deadline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        if time.monotonic() >= self._deadline:
            raise RunDeadline("the run deadline passed")
        return self._grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's own loop, polling every :data:`REPLY_POLL_SECONDS` instead of every 3 s:
        the last reply of a round would otherwise wait 1.5 s on average to be seen."""
        end = min(self._deadline, math.inf if timeout is None else time.monotonic() + timeout)
        waiting = set(self._grid.push_messages(messages))
        replies: list[Message] = []
        while True:
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or time.monotonic() >= end:
                return replies
            time.sleep(min(REPLY_POLL_SECONDS, max(0.0, end - time.monotonic())))
