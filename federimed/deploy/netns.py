"""Each hospital on its own network host: Linux network namespaces joined by a bridge.

The SuperLink listens only on the bridge address; each SuperNode (and the ClientApp it
starts) runs inside its own namespace with its own address and reaches nothing but that
bridge, as a hospital reaches the consortium over a network rather than over loopback.
Needs root and iproute2; :func:`available` says whether this machine allows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.213.0"
PREFIX = 24


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> bool:
    """Root, iproute2, and a namespace can really be made (containers may forbid it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"fmprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False).returncode == 0
    if made:
        _ip("netns", "del", probe, check=False)
    return made


def remove(bridge: str, namespaces: list[str]) -> None:
    """Delete namespaces and the bridge; what is already gone is fine (``down`` after a crash)."""
    for namespace in namespaces:
        _ip("netns", "del", namespace, check=False)
    _ip("link", "del", bridge, check=False)


@dataclass
class HospitalHosts:
    """The bridge (:meth:`create`) and one namespace per hospital (:meth:`add`)."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    namespaces: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"fmbr{self.tag}"

    @property
    def superlink_address(self) -> str:
        return f"{SUBNET}.1"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.superlink_address}/{PREFIX}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def remove(self) -> None:
        remove(self.bridge, list(self.namespaces.values()))

    def add(self, hospital: str) -> str:
        """A namespace for ``hospital`` with address 10.213.0.(10 + n); returns its name."""
        index = len(self.namespaces) + 1
        namespace = f"fm{self.tag}-h{index}"
        outside, inside = f"fmv{self.tag}h{index}", f"fmn{self.tag}h{index}"
        address = f"{SUBNET}.{10 + index}"
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
