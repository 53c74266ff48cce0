"""Flower's SuperNode, asking the SuperLink for work more often while it is idle.

An idle Flower 1.42 SuperNode sleeps a fixed 3 s between two pulls
(``flwr/supernode/start_client_internal.py``, no setting), so each round's task waits
1.5 s on average at every hospital before it even starts, and the round waits for the last
of them.  ``python -m federimed.deploy.supernode --idle-poll-seconds S <flower-supernode
flags>`` runs Flower's own ``flower-supernode`` with that sleep cut to ``S`` seconds
(``FEDERIMED_NODE_IDLE_POLL_SECONDS``), and its local 0.5 s waits to 0.1 s
(:data:`LOCAL_WAIT_SECONDS`); everything else is Flower's.  Each pull is one request
to the SuperLink, so the setting trades round latency for SuperLink load (docs/scale.md).
``tests/test_deploy_commands.py`` pins the Flower code this relies on.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

FLOWER_IDLE_SLEEP = 3  # seconds, the constant in Flower's SuperNode loop
# Its other waits poll the node's own state every 0.5 s: for its ClientApp's reply, and for
# an object's bytes to arrive from it.  Each check is a lookup in the SuperNode's memory, so
# checking every 0.1 s costs nothing and sends a finished hospital's reply on sooner.
LOCAL_WAIT_SECONDS = 0.1


def shorter_idle_sleeps(module: types.ModuleType, seconds: float) -> None:
    """Give ``module`` a ``time`` whose ``sleep`` waits at most ``seconds`` for the idle pull's
    3 s and at most :data:`LOCAL_WAIT_SECONDS` for the shorter, local waits."""

    def sleep(duration: float) -> None:
        cap = seconds if duration >= FLOWER_IDLE_SLEEP else LOCAL_WAIT_SECONDS
        time.sleep(min(duration, cap))

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    module.time = types.SimpleNamespace(**(names | {"sleep": sleep}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="federimed-supernode", add_help=False)
    parser.add_argument("--idle-poll-seconds", type=float, required=True)
    ours, flower_args = parser.parse_known_args(argv)
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    shorter_idle_sleeps(start_client_internal, ours.idle_poll_seconds)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
