"""Each hospital on its own network host: Linux network namespaces joined by a bridge.

The SuperLink listens only on the bridge address; each SuperNode (and the ClientApp it
starts) runs inside its own namespace with its own address and reaches nothing but that
bridge, as a hospital reaches the consortium over a network rather than over loopback.
Needs root and iproute2; :func:`available` says whether this machine allows it.

Names carry the pid of the process that made them (bridge ``fmbr<pid>``, namespaces
``fm<pid>-h<n>``), so a later start can tell what an earlier, killed run left behind (its
maker is gone and no process runs in its namespaces) from what a live run uses.  Each
federation takes a /24 of 10.213.0.0/16 that no interface on the machine holds yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NETWORK = "10.213"  # each federation: 10.213.<n>.0/24
PREFIX = 24
LOCK = Path("/run/federimed-netns.lock")
BRIDGE = re.compile(r"^fmbr(\d+)$")
NAMESPACE = re.compile(r"^fm(\d+)-h\d+$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> bool:
    """Root, iproute2, and a namespace can really be made (containers may forbid it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"fmprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False).returncode == 0
    if made:
        _ip("netns", "del", probe, check=False)
    return made


def remove(bridge: str, namespaces: list[str]) -> None:
    """Delete namespaces and the bridge; what is already gone is fine (``down`` after a crash)."""
    for namespace in namespaces:
        _ip("netns", "del", namespace, check=False)
    _ip("link", "del", bridge, check=False)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One federation at a time picks a subnet and claims it (two demos started at once)."""
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ours() -> dict[str, tuple[list[str], list[str]]]:
    """pid tag -> (bridges, namespaces) of ours on this machine."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if match := BRIDGE.match(name):
            found.setdefault(match.group(1), ([], []))[0].append(name)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if match := NAMESPACE.match(name):
            found.setdefault(match.group(1), ([], []))[1].append(name)
    return found


def _in_use(tag: str, namespaces: list[str]) -> bool:
    if Path(f"/proc/{tag}").exists():
        return True
    return any(_ip("netns", "pids", ns, check=False).stdout.strip() for ns in namespaces)


def remove_stale() -> list[str]:
    """Remove bridges and namespaces of ours whose maker is gone and that no process uses;
    return their names.  A live run's (or a running ``federimed up``'s) are left alone."""
    removed = []
    for tag, (bridges, namespaces) in _ours().items():
        if _in_use(tag, namespaces):
            continue
        for bridge in bridges or [f"fmbr{tag}"]:
            remove(bridge, namespaces)
        removed += [*bridges, *namespaces]
    return removed


def _used_subnets() -> dict[str, str]:
    """``10.213.<n>`` -> the interface holding an address in it."""
    used = {}
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].startswith(f"{NETWORK}."):
            used[parts[3].rsplit(".", 1)[0]] = parts[1]
    return used


@dataclass
class HospitalHosts:
    """The bridge (:meth:`create`) and one namespace per hospital (:meth:`add`)."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    subnet: str = ""  # 10.213.<n>, chosen by create()
    namespaces: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"fmbr{self.tag}"

    @property
    def bridge_address(self) -> str:
        """This host on the bridge: where the fleet gateway listens for the hospitals."""
        return f"{self.subnet}.1"

    def create(self) -> None:
        """Claim a free subnet for the bridge; what says no names what holds the subnets."""
        with _locked():
            used = _used_subnets()
            free = [f"{NETWORK}.{n}" for n in range(256) if f"{NETWORK}.{n}" not in used]
            if not free:
                holders = ", ".join(f"{net}.0/24 by {dev}" for net, dev in sorted(used.items()))
                raise RuntimeError(f"no free subnet in {NETWORK}.0.0/16: {holders}")
            self.subnet = free[0]
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/{PREFIX}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    def remove(self) -> None:
        remove(self.bridge, list(self.namespaces.values()))

    def add(self, hospital: str) -> str:
        """A namespace for ``hospital`` with address <subnet>.(10 + n); returns its name."""
        index = len(self.namespaces) + 1
        namespace = f"fm{self.tag}-h{index}"
        outside, inside = f"fmv{self.tag}h{index}", f"fmn{self.tag}h{index}"
        address = f"{self.subnet}.{10 + index}"
        _ip("netns", "add", namespace)
        self.namespaces[hospital] = namespace
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX}", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        self.addresses[hospital] = address
        return namespace

    def wrap(self, hospital: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[hospital], *argv]

    def reachable(self, hospital: str, host: str, port: int) -> bool:
        """Can ``hospital``'s namespace open a TCP connection to ``host:port``?"""
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)"
        argv = self.wrap(hospital, [sys.executable, "-c", probe, host, str(port)])
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0
