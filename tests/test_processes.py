"""Process priority on a one-machine federation: hospitals yield the CPU to the SuperLink."""

from __future__ import annotations

import os
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


@pytest.mark.slow  # keeps a CPU busy for seconds
def test_niced_sessions_leave_the_cpu_to_a_plain_one(tmp_path):
    """Eight busy niced sessions next to one plain one, all on one CPU (however many the
    machine has): without the session's nice (only the process's), the plain one got about
    1/9 of it; with it, nearly all.  Without autogroup the process's nice is what counts, and
    the same holds."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the processes started now inherit it
    try:
        with ProcessGroup(tmp_path) as group:
            for i in range(8):
                group.start(f"hog-{i}", BUSY, dict(os.environ), nice=19)
            plain = psutil.Process(group.start("plain", BUSY, dict(os.environ)).process.pid)
            time.sleep(0.5)
            before = sum(plain.cpu_times()[:2])
            time.sleep(3)
            share = (sum(plain.cpu_times()[:2]) - before) / 3
    finally:
        os.sched_setaffinity(0, allowed)
    # Other work on that CPU takes its part; nine equal sessions would leave it 0.11.
    assert share > 0.35, f"the plain process got {share:.2f} of the CPU"


def test_a_started_serverapp_yields_alone_and_its_runner_keeps_its_priority(tmp_path):
    """The local federation's SuperLink names the nice value in its environment; the SuperExec
    it starts (one session, normal priority) keeps it, and a ServerApp the SuperExec starts
    (in the SuperExec's session, as Flower's subprocess executor does) moves to a session of
    its own once started and nices that alone, so the next run's ServerApp starts at normal
    priority again (federimed/priority.py)."""

    from federimed.priority import SERVERAPP_NICE_ENV

    serverapp = (
        "import os, sys; from federimed.priority import yield_once_started;"
        "yield_once_started(); print(os.getpid(), os.getsid(0), os.nice(0), flush=True);"
        "sys.stdin.read()"
    )
    runner = (  # the SuperExec: starts the ServerApp in its own session, then waits
        "import subprocess, sys; app = subprocess.Popen([sys.executable, '-c', sys.argv[1]],"
        " stdin=subprocess.PIPE); app.wait()"
    )
    env = os.environ | {SERVERAPP_NICE_ENV: "19"}
    with ProcessGroup(tmp_path) as group:
        started = group.start("superexec", [sys.executable, "-c", runner, serverapp], env)
        superexec = psutil.Process(started.process.pid)
        deadline = time.monotonic() + 60
        while not (apps := superexec.children()) or "19" not in _app_line(started.log):
            assert time.monotonic() < deadline, started.log.read_text()
            time.sleep(0.1)
        pid, session, nice = map(int, _app_line(started.log).split())
        assert pid == apps[0].pid and session == pid  # a session of its own
        assert nice == 19 and superexec.nice() == 0
        assert os.getsid(superexec.pid) == superexec.pid != session
        if AUTOGROUP.exists():
            assert _autogroup_nice(pid) == 19 and _autogroup_nice(superexec.pid) == 0


def _app_line(log: Path) -> str:
    return log.read_text().strip() if log.is_file() else ""


def test_a_serverapp_without_the_setting_keeps_its_priority():
    """Compose and Kubernetes set nothing: the ServerApp has a machine of its own."""
    import subprocess

    from federimed.priority import SERVERAPP_NICE_ENV

    probe = "import os; from federimed.priority import yield_once_started; yield_once_started();"
    probe += "print(os.getsid(0) == os.getpid(), os.nice(0))"
    env = {k: v for k, v in os.environ.items() if k != SERVERAPP_NICE_ENV}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["False", "0"], done.stderr
