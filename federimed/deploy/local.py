"""A real, secured Flower federation on one machine: SuperLink + one SuperNode per hospital.

Same processes and flags as a production deployment (TLS, node authentication, persistent
state, no runtime installs, no telemetry); only the addresses are local.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federimed.deploy.certs import node_key_path
from federimed.deploy.flower import (
    enroll,
    flower_env,
    log_stream_argv,
    run_flwr,
    run_status,
    submit_run,
    superlink_argv,
    supernode_argv,
    write_flwr_home,
)
from federimed.deploy.netns import HospitalHosts
from federimed.deploy.processes import Managed, ProcessGroup, wait_until
from federimed.settings import SuperLinkSettings, SuperNodeSettings

CONNECTION = "federimed-local"
FINISHED = "finished"
STATUS_EVERY = 120.0
STATUS_AFTER_DONE = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def superlink_healthy(address: str, ca_cert: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=2):
            return True
    except OSError:
        return False


@dataclass
class LocalFederation:
    workdir: Path
    certs: Path
    hospitals: dict[str, Path]  # hospital name -> data folder
    port: int = 8000
    env: dict[str, str] | None = None
    host: str = "127.0.0.1"
    hosts: HospitalHosts | None = None  # each hospital in its own network namespace
    # Threads per ClientApp: hospitals sharing one machine train at once, so 1 each avoids
    # oversubscription; the ServerApp evaluates while they wait and keeps torch's default.
    client_threads: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def _env(self) -> dict[str, str]:
        return flower_env(self.env)

    def start_superlink(self, group: ProcessGroup) -> None:
        settings = SuperLinkSettings(
            host=self.host,
            port=self.port,
            ca_cert=self.certs / "ca.crt",
            cert=self.certs / "superlink.crt",
            key=self.certs / "superlink.key",
            database=self.workdir / "state" / "superlink.db",
        )
        group.start("superlink", superlink_argv(settings), self._env())
        ca = self.certs / "ca.crt"
        wait_until(lambda: superlink_healthy(self.address, ca), 90, "the SuperLink", group)
        write_flwr_home(self.flwr_home, CONNECTION, self.address, ca)

    def enroll_nodes(self) -> list[Path]:
        keys = [node_key_path(self.certs, name).with_suffix(".pub") for name in self.hospitals]
        return enroll(self.flwr_home, CONNECTION, keys)

    def node_settings(self, name: str, data: Path, runtime_port: int) -> SuperNodeSettings:
        return SuperNodeSettings(
            name=name,
            superlink=self.address,
            ca_cert=self.certs / "ca.crt",
            private_key=node_key_path(self.certs, name),
            data_path=data.resolve(),
            runtime_port=runtime_port,
        )

    def start_supernodes(self, group: ProcessGroup) -> None:
        env = self._env()
        if self.client_threads:
            env["FEDERIMED_TORCH_THREADS"] = str(self.client_threads)
        for name, data in self.hospitals.items():
            argv = supernode_argv(self.node_settings(name, data, free_port()))
            if self.hosts is not None:
                argv = self.hosts.wrap(name, argv)
            group.start(f"supernode-{name}", argv, env)

    def wait_for_nodes(self, group: ProcessGroup, timeout: float = 120) -> None:
        def all_online() -> bool:
            out = run_flwr(["supernode", "list", CONNECTION, "--format", "json"], self.flwr_home)
            nodes = json.loads(out).get("nodes", [])
            return sum(node.get("status") == "online" for node in nodes) >= len(self.hospitals)

        wait_until(all_online, timeout, "all SuperNodes to come online", group, every=2)

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        overrides = " ".join(f"{key}={_toml(value)}" for key, value in run_config.items())
        return submit_run(self.flwr_home, CONNECTION, app_dir, overrides)

    def run_status(self, run_id: int) -> dict[str, Any]:
        return run_status(self.flwr_home, CONNECTION, run_id)

    def follow_logs(self, run_id: int, group: ProcessGroup) -> Managed:
        """Stream the run's ServerApp log into logs/run-<id>.log (one process, no polling);
        the stream ends when the run does, which makes it a free "finished?" signal."""
        argv, env = log_stream_argv(self.flwr_home, CONNECTION, run_id)
        return group.start(f"run-{run_id}", argv, env)

    def wait_for_run(
        self,
        run_id: int,
        group: ProcessGroup,
        timeout: float,
        done: Callable[[], bool],
        on_tick: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """Wait for ``done()`` (cheap, checked often) or a finished status (asked rarely).

        Each `flwr ls` costs seconds of CPU, which training on a small machine feels, so the
        SuperLink is asked every ``STATUS_AFTER_DONE`` seconds once ``done()`` is true (the
        status turns "finished" a moment after), otherwise every ``STATUS_EVERY`` seconds in
        case the run ended without ``done()`` noticing.
        """
        deadline = time.monotonic() + timeout
        last_status = time.monotonic()
        while time.monotonic() < deadline:
            group.check_alive(ignore=(f"run-{run_id}",))
            on_tick()
            every = STATUS_AFTER_DONE if done() else STATUS_EVERY
            if time.monotonic() - last_status >= every:
                last_status = time.monotonic()
                status = self.run_status(run_id)
                if str(status.get("status", "")).startswith(FINISHED):
                    on_tick()
                    return status
            time.sleep(1)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
