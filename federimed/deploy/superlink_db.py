"""Flower's ``flower-superlink``, unchanged but for how long SQLite waits for its write lock.

Flower 1.42 keeps the SuperLink's state in SQLite and sets ``PRAGMA busy_timeout = 5000`` on
every connection (``SQLITE_PRAGMAS`` in ``flwr/supercore/constant.py``, applied by
``_set_sqlite_pragmas`` in ``flwr/supercore/sql_mixin.py``).  It writes on nearly every Fleet
request (``check_abort`` -> ``get_run_status`` -> ``_cleanup_expired_task_tokens``, then
``store_traffic``), so a round's burst (each hospital pulling, then pushing, a message of one
object per array plus its records, one request per object, within seconds of the others)
keeps the single write lock busy, and SQLite's busy handler, which polls instead of queueing,
can leave one request waiting past 5 s.  That request gets HTTP 500 "database is locked",
which Flower's HTTP clients do not retry (``flwr/supercore/retry/http_retry.py``): a
hospital's download or reply, or the ServerApp itself, is lost, and the round waits out
``round-timeout``.  Measured with 20 hospitals on 2 cores: once the hospitals yielded the CPU
(``local.HOSPITAL_NICE``) the longest lock hold was 0.35 s, yet in one of two runs a pull at
a round's start still waited 5.1 s and failed.

Here the SuperLink waits up to :data:`BUSY_TIMEOUT_MS` instead: a request in a burst is late,
not lost.  The entry point rebinds that one name and then runs Flower's own; the local
federation starts the SuperLink through it (``python -m federimed.deploy.superlink_db`` +
``flower-superlink``'s arguments).  ``tests/test_processes.py`` pins the Flower names.
"""

from __future__ import annotations

import sys

import flwr.supercore.sql_mixin as sql_mixin

BUSY_TIMEOUT_MS = 60_000


def longer_busy_timeout(timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make this process's new SQLite connections (Flower's state) wait ``timeout_ms``."""
    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS no longer sets busy_timeout")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value) for name, value in pragmas
    )


def main() -> None:
    longer_busy_timeout()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
