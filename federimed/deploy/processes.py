"""Start long-running processes with their logs in files, and never leave one behind.

Each process gets its own process group, so stopping it also stops what it spawned (Flower's
SuperLink and SuperNodes start `flwr-serverapp`/`flwr-clientapp` children).  Unless a group is
started ``detached`` (``federimed up``), its processes also get the parent-death signal: when
the command that started them dies, even by SIGKILL, the kernel kills them too.

Stopping is owned by the CLI's signal handler, which calls :func:`request_stop`; every wait
in this package sleeps through :func:`nap`, which raises ``KeyboardInterrupt`` within a second
of a stop request even when a library swallowed the first ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from federimed.priority import lower_priority

_stop = threading.Event()
PR_SET_PDEATHSIG = 1


def request_stop() -> None:
    _stop.set()


def clear_stop() -> None:
    _stop.clear()


def nap(seconds: float) -> None:
    """``time.sleep`` that ends with ``KeyboardInterrupt`` once a stop was requested."""
    if _stop.wait(seconds):
        raise KeyboardInterrupt


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux); in a child before exec, or first
    thing in a helper process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Managed:
    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class ProcessGroup:
    """A context manager: everything started inside is stopped on exit, error or Ctrl-C."""

    log_dir: Path
    detached: bool = False  # True: the processes may outlive this Python process
    members: list[Managed] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], env: dict[str, str], nice: int = 0) -> Managed:
        """``nice`` > 0 lowers the process's CPU priority (and its children's: they inherit
        it); no privilege is needed for that."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        handle = log.open("ab")
        process = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=self._before_exec(nice),
        )
        handle.close()
        member = Managed(name, process, log)
        self.members.append(member)
        return member

    def _before_exec(self, nice: int):
        if self.detached and not nice:
            return None

        def setup() -> None:
            if nice:
                lower_priority(nice)
            if not self.detached:
                die_with_parent()

        return setup

    def check_alive(self) -> None:
        """Fail fast, naming the process and its log, when something died."""
        for member in self.members:
            code = member.process.poll()
            if code is not None:
                raise ProcessDied(member, code)

    def stop(self, member: Managed, grace: float = 10.0) -> None:
        if member.process.poll() is None:
            _signal_group(member.process, signal.SIGTERM)
            try:
                member.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(member.process, signal.SIGKILL)
                member.process.wait(5)
        # Children of a process that exited may still be alive in its group.
        _signal_group(member.process, signal.SIGKILL)

    def stop_all(self) -> None:
        for member in reversed(self.members):
            self.stop(member)


class ProcessDied(RuntimeError):
    def __init__(self, member: Managed, code: int):
        super().__init__(
            f"{member.name} exited with code {code}; log: {member.log}\n{tail(member.log)}"
        )
        self.member = member
        self.code = code


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(predicate, timeout: float, what: str, group: ProcessGroup, every: float = 0.5):
    """Poll ``predicate`` until truthy, failing early if a managed process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        group.check_alive()
        value = predicate()
        if value:
            return value
        nap(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
