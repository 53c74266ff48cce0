"""Flower's ``flower-superlink`` as the one-machine federation runs it: one rebinding, one
setting.

**SQLite waits longer for its write lock.**  Flower 1.42 keeps the SuperLink's state in SQLite
and sets ``PRAGMA busy_timeout = 5000`` on every connection (``SQLITE_PRAGMAS`` in
``flwr/supercore/constant.py``, applied by ``_set_sqlite_pragmas`` in
``flwr/supercore/sql_mixin.py``).  It writes on nearly every Fleet request (``check_abort`` ->
``get_run_status`` -> ``_cleanup_expired_task_tokens``, then ``store_traffic``), so a round's
burst (each hospital pulling, then pushing, its message's objects, one request per object,
within seconds of the others) keeps the single write lock busy, and SQLite's busy handler,
which polls instead of queueing, can leave one request waiting past 5 s.  That request gets
HTTP 500 "database is locked", which Flower's HTTP clients do not retry
(``flwr/supercore/retry/http_retry.py``): a hospital's download or reply, or the ServerApp
itself, is lost, and the round waits out ``round-timeout``.  Measured with 20 hospitals on 2
cores: once the hospitals yielded the CPU (``local.HOSPITAL_NICE``) the longest lock hold was
0.35 s, yet in one of two runs a pull at a round's start still waited 5.1 s and failed.  Here
the SuperLink waits up to :data:`BUSY_TIMEOUT_MS` instead: a request in a burst is late, not
lost.

**The ServerApp yields the CPU like the hospitals do** (``--app-nice``), once it has started.
The server's scoring of each round's model (3.6 CPU-seconds, beside the next round) took both
cores just as the hospitals started their next round, which waited for it: that start-up is on
the round's critical path, the scoring is not (only the round after next needs its result).
This SuperLink's environment names the nice value (:data:`~federimed.priority.SERVERAPP_NICE_ENV`);
the SuperExec it starts for ServerApps (subprocess isolation) and the ServerApps that starts
inherit it, and each ServerApp lowers its own priority once Flower has started it
(:func:`~federimed.priority.yield_once_started`).  The SuperExec and the ServerApp's start keep
normal priority: started niced, a ServerApp could not pull its inputs within the 30 s Flower
gives it whenever other work ran on the machine, and the run never started
(``federimed/priority.py``).

The local federation starts the SuperLink as ``python -m federimed.deploy.local_superlink
--app-nice N`` + ``flower-superlink``'s arguments.  The rebinding is
:func:`~federimed.deploy.flower_patches.superlink_sqlite_busy_timeout`.
"""

from __future__ import annotations

import argparse
import os
import sys

from federimed.deploy.flower_patches import superlink_sqlite_busy_timeout
from federimed.priority import SERVERAPP_NICE_ENV

BUSY_TIMEOUT_MS = 60_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="federimed-local-superlink", add_help=False)
    parser.add_argument("--app-nice", type=int, default=0)
    ours, flower_args = parser.parse_known_args(argv)
    superlink_sqlite_busy_timeout(BUSY_TIMEOUT_MS)
    if ours.app_nice:
        os.environ[SERVERAPP_NICE_ENV] = str(ours.app_nice)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()


if __name__ == "__main__":
    main()
