"""Warm ClientApp starts: the hospital keeps its ML libraries imported between rounds.

Flower starts a new ClientApp process for every message, and a fresh interpreter spends most
of a round's start importing torch, transformers and peft (9-12 s per hospital and round on
a busy 2-core machine, measured in the demo's ``startup_seconds``).  A hospital's runner
(``federimed superexec``) therefore starts one *warm parent* that imports those libraries
once and then forks one child per task.  Each task still gets its own process, as Flower
intends: the child runs ``federimed-clientapp`` (Flower's ``flwr-clientapp`` in a fresh
install folder, with the bundle's own modules: :mod:`federimed.hospital.site_runner`) with the
same arguments Flower would have given it, imports the approved bundle fresh, and exits when
the task is done.  (The hospital's checks are not in this process: the SuperNode's guard.)
Nothing of a task survives it: the warm parent never imports app code and never sees a
message.

The parent imports only third-party libraries: it must not hold threads or open channels when
it forks (torch's thread pools start at the first operation, gRPC's with the first channel,
and it does neither), and it must not import the bundle's own modules, which the child takes
from the approved bundle.

Flower's SuperExec starts a task with ``subprocess.Popen(argv)`` in its subprocess executor;
:func:`use_warm_starts` gives that module a ``subprocess`` whose ``Popen`` hands a ClientApp's
argv to the warm parent instead (anything else, or a dead parent, starts as before); the
rebinding is :func:`~federimed.deploy.flower_patches.superexec_popen`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from typing import IO, Any

from federimed.deploy.flower_patches import superexec_popen
from federimed.deploy.processes import die_with_parent

# What a ClientApp task imports that costs seconds; never the bundle's own modules.
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "peft",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
)
log = logging.getLogger("flwr.federimed.warm")


class WarmStarter:
    """The runner's handle on its warm parent: one JSON line of argv per task to start."""

    def __init__(self, command: str, output: IO | None = None):
        """``output``: where the parent and its tasks write (default: the runner's own)."""
        self.command = command
        # Dies with the runner, even a SIGKILLed one: otherwise it would notice only once its
        # imports were done and it read the closed pipe (seconds at nice 19 on a busy machine),
        # holding the hospital's network namespace meanwhile.
        self.parent = subprocess.Popen(
            [sys.executable, "-m", "federimed.hospital.warm"],
            preexec_fn=die_with_parent,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=output,
            text=True,
        )

    def alive(self) -> bool:
        return self.parent.poll() is None

    def start(self, argv: list[str]) -> bool:
        """Ask the warm parent to fork a task; False when it cannot (then start it cold)."""
        stdin = self.parent.stdin
        if stdin is None or not self.alive():
            return False
        try:
            stdin.write(json.dumps(argv) + "\n")
            stdin.flush()
        except OSError:
            return False
        return True

    def close(self, timeout: float = 60) -> None:
        """No more tasks: the parent starts those it was sent, then exits (tasks run on)."""
        with contextlib.suppress(OSError):
            if self.parent.stdin is not None:
                self.parent.stdin.close()
        try:
            self.parent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.parent.kill()


def use_warm_starts(starter: WarmStarter) -> None:
    """Route this process's SuperExec ClientApp launches through ``starter``."""

    def popen(argv: list[str], **kwargs: Any) -> Any:
        if argv and argv[0] == starter.command:
            if starter.start(list(argv)):
                return None  # Flower does not keep the handle: the task reports over the API
            log.warning("warm parent gone; starting the ClientApp in a fresh interpreter")
        return subprocess.Popen(argv, **kwargs)

    superexec_popen(popen)


def _run_task(argv: list[str]) -> None:
    """In the forked child: become ``federimed-clientapp argv...`` and never return."""
    code = 0
    try:
        sys.argv = argv
        from federimed.hospital.site_runner import main

        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        logging.getLogger("flwr.federimed.warm").exception("ClientApp task failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(requests: IO[str]) -> None:
    """The warm parent: import once, then fork a task per request until the runner goes."""
    for module in PRELOAD:
        __import__(module)
    # Children are reaped by the kernel; the parent never waits for a task.  They stay in the
    # runner's process group, so stopping the runner stops its tasks, as before.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("warm ClientApp parent ready: " + ", ".join(PRELOAD), flush=True)
    for line in requests:
        argv = json.loads(line)
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _run_task(argv)


if __name__ == "__main__":
    serve(sys.stdin)
