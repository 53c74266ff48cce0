"""Process priority on a one-machine federation: hospitals yield the CPU to the SuperLink."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import psutil
import pytest

from federimed.deploy.processes import ProcessGroup

AUTOGROUP = Path("/proc/self/autogroup")
BUSY = [sys.executable, "-c", "while True: pass"]


def _autogroup_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


def test_a_niced_process_and_its_session_are_niced(tmp_path):
    with ProcessGroup(tmp_path) as group:
        niced = group.start("niced", ["sleep", "30"], dict(os.environ), nice=10)
        plain = group.start("plain", ["sleep", "30"], dict(os.environ))
        assert psutil.Process(niced.process.pid).nice() == 10
        assert psutil.Process(plain.process.pid).nice() == 0
        if AUTOGROUP.exists():
            assert _autogroup_nice(niced.process.pid) == 10
            assert _autogroup_nice(plain.process.pid) == 0


@pytest.mark.slow  # keeps the machine's CPUs busy for seconds
@pytest.mark.skipif(
    not AUTOGROUP.exists() or (os.cpu_count() or 1) > 4, reason="needs autogroup, few CPUs"
)
def test_niced_sessions_leave_the_cpu_to_a_plain_one(tmp_path):
    """Eight busy niced sessions next to one plain one: without the session's nice (only the
    process's), the plain one got about 1/9 of the machine; with it, nearly a CPU."""
    with ProcessGroup(tmp_path) as group:
        for i in range(8):
            group.start(f"hog-{i}", BUSY, dict(os.environ), nice=19)
        plain = psutil.Process(group.start("plain", BUSY, dict(os.environ)).process.pid)
        time.sleep(0.5)
        before = sum(plain.cpu_times()[:2])
        time.sleep(3)
        share = (sum(plain.cpu_times()[:2]) - before) / 3
    # Other work on the machine takes its part; eight equal sessions would leave it 0.2.
    assert share > 0.35, f"the plain process got {share:.2f} CPU"


def test_the_superlink_state_waits_longer_for_its_write_lock(tmp_path, monkeypatch):
    """Pins the Flower names local_superlink rebinds: the pragmas are read at connect time."""
    import flwr.supercore.sql_mixin as sql_mixin

    from federimed.deploy import local_superlink

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "5000"  # Flower 1.42's default
    local_superlink.longer_busy_timeout()
    connection = sqlite3.connect(tmp_path / "state.db")
    sql_mixin._set_sqlite_pragmas(connection, None)
    timeout = connection.execute("PRAGMA busy_timeout").fetchone()[0]
    assert timeout == local_superlink.BUSY_TIMEOUT_MS
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # the rest kept


def test_the_superlinks_serverapp_runner_starts_niced_in_a_session_of_its_own(monkeypatch):
    """Pins the Flower name local_superlink rebinds: the SuperLink starts the SuperExec for its
    ServerApps (subprocess isolation) with the Popen arguments `get_popen_detach_kwargs` gives."""
    import importlib
    import inspect
    import subprocess

    from federimed.deploy import local_superlink

    flower_superlink = importlib.import_module(local_superlink.SUPERLINK_MODULE)

    assert "subprocess.Popen(command, **get_popen_detach_kwargs())" in inspect.getsource(
        flower_superlink
    )
    monkeypatch.setattr(
        flower_superlink, "get_popen_detach_kwargs", flower_superlink.get_popen_detach_kwargs
    )
    local_superlink.niced_app_runner(19)
    runner = subprocess.Popen(["sleep", "30"], **flower_superlink.get_popen_detach_kwargs())
    try:  # Popen returns once the child has exec'd, after its preexec_fn
        assert os.getsid(runner.pid) == runner.pid  # a session of its own, as Flower starts it
        assert psutil.Process(runner.pid).nice() == 19
        if AUTOGROUP.exists():
            assert _autogroup_nice(runner.pid) == 19
    finally:
        runner.kill()
        runner.wait()
