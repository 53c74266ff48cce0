"""CPU priority on a machine the consortium and its hospitals share (the local federation).

The hospitals' processes run at a low priority so the SuperLink never starves (see
``federimed.deploy.local.HOSPITAL_NICE``); the ServerApp's work yields to the hospitals'
round starts as theirs does.  But Flower gives a task it handed out 30 s to pull its inputs
(``claim_task`` in ``flwr/supercore/corestate/sql_corestate.py``), and a process at nice 19
next to normal-priority work gets about 1/70 of a CPU: a ServerApp started niced could not
import Flower in time whenever anything else ran on the machine, the SuperLink took its task
back and handed it to a new ServerApp, just as starved, every 30 s, and the run stayed
``starting`` as long as the machine was busy (reproduced with four busy loops beside a
two-hospital federation: six ServerApps in four minutes, each refused ``401``).  So a
ServerApp starts at normal priority and lowers its own once Flower has started it
(:func:`yield_once_started`).
"""

from __future__ import annotations

import contextlib
import os
import time

# Set by the local federation for the ServerApps its SuperLink starts: the nice value they
# lower themselves to once started.  Unset (compose, Kubernetes: a machine of its own) they
# keep theirs.
SERVERAPP_NICE_ENV = "FEDERIMED_SERVERAPP_NICE"


def lower_priority(nice: int) -> None:
    """Nice this process *and its session*.

    With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in
    most distribution kernels and on these machines) the kernel first shares the CPUs between
    sessions, and a process's own nice value only counts against processes of its session.
    Every process the local federation starts leads a session of its own, so ``os.nice`` alone
    changes nothing between them (measured: a nice-0 busy loop got 0.19 CPU next to eight
    nice-19 ones, each in its own session, and 0.87 once their sessions were niced too).
    Without autogroup the file is absent and ``os.nice`` is what counts.  The kernel accepts one
    unprivileged autogroup change per 100 ms (EAGAIN otherwise), hence the short retries.
    """
    os.nice(nice)
    for _ in range(5):
        try:
            with open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(nice))
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:
            return


def yield_once_started() -> None:
    """In a started ServerApp: when the deployment asks for it, move to a session of its own
    (niced alone, not the runner that starts the next run's ServerApp) at the asked priority.

    Its heartbeat to the SuperLink is niced with it; that costs a few milliseconds of CPU every
    30 s, in a 60 s window, as the niced hospitals' SuperNodes' heartbeats do."""
    nice = os.environ.get(SERVERAPP_NICE_ENV, "")
    if not nice.isdigit() or int(nice) == 0:
        return
    with contextlib.suppress(OSError):  # already a session leader: its session is its own
        os.setsid()
    lower_priority(int(nice))
