"""Flower's ``flower-superlink`` as the one-machine federation runs it: two rebindings.

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

**The ServerApp yields the CPU like the hospitals do** (``--app-nice``).  With subprocess
isolation the SuperLink starts a SuperExec in a session of its own, and it the ServerApp; that
session ran at nice 0 while the hospitals' ran at 19, so the server's scoring of each round's
model (3.6 CPU-seconds, beside the next round) took both cores just as the hospitals started
their next round, which waited for it: that start-up is on the round's critical path, the
scoring is not (only the round after next needs its result).  The SuperExec's session is niced
as the hospitals' are (:func:`~federimed.deploy.processes.lower_priority`); the SuperLink and
the gateway keep theirs.

The local federation starts the SuperLink as ``python -m federimed.deploy.local_superlink
--app-nice N`` + ``flower-superlink``'s arguments.  ``tests/test_processes.py`` pins the Flower
names rebound here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial
from typing import Any

import flwr.supercore.sql_mixin as sql_mixin

from federimed.deploy.processes import lower_priority

BUSY_TIMEOUT_MS = 60_000
SUPERLINK_MODULE = "flwr.superlink.cli.flower_superlink"


def longer_busy_timeout(timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make this process's new SQLite connections (Flower's state) wait ``timeout_ms``."""
    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS no longer sets busy_timeout")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value) for name, value in pragmas
    )


def niced_app_runner(nice: int) -> None:
    """Start the SuperExec that this SuperLink launches for ServerApps (subprocess isolation)
    in a session niced to ``nice``; its ServerApps inherit it."""
    # The module, not the function of the same name that ``flwr.superlink.cli`` exports.
    superlink = importlib.import_module(SUPERLINK_MODULE)
    detached = superlink.get_popen_detach_kwargs

    def niced() -> dict[str, Any]:
        return detached() | {"preexec_fn": partial(lower_priority, nice)}

    superlink.get_popen_detach_kwargs = niced


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="federimed-local-superlink", add_help=False)
    parser.add_argument("--app-nice", type=int, default=0)
    ours, flower_args = parser.parse_known_args(argv)
    longer_busy_timeout()
    if ours.app_nice:
        niced_app_runner(ours.app_nice)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
