"""A real, secured Flower federation on one machine: SuperLink + one SuperNode per hospital.

Same processes and flags as a production deployment (TLS, node authentication, persistent
state, no runtime installs, no telemetry); only the addresses are local.  As in production,
hospitals are given the fleet gateway's address, never the SuperLink's (which listens on
loopback, out of their network namespaces' reach), and each hospital runs its ClientApps in
its own runner under its own site policy (``sites/<hospital>/policy.yaml``).

:class:`LocalFederation` is the one way to start it (``with LocalFederation(...) as running``
for the demo and the tests; :meth:`LocalFederation.start` for ``federimed up``, whose processes
outlive the command).  Either way ``federation.json`` in the work folder records every process,
so :class:`RunningFederation` serves ``status``, ``submit`` and ``down`` from another process
exactly as it serves the process that started the federation.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from federimed.config import find_app_dir, to_toml_pairs
from federimed.deploy import netns
from federimed.deploy.certs import ensure_certs, node_key_path
from federimed.deploy.flower import (
    DeploymentError,
    app_hash,
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
from federimed.deploy.gateway import gateway_argv
from federimed.deploy.processes import Managed, ProcessGroup, nap, tail, wait_until
from federimed.hospital.policy import POLICY_ENV, approve
from federimed.runrecord import read_rounds
from federimed.settings import GatewaySettings, SuperLinkSettings, SuperNodeSettings

CONNECTION = "federimed-local"
# Set in the environment of every process a local federation starts; their children inherit it.
FEDERATION_TAG = "FEDERIMED_FEDERATION"
STATE_FILE = "federation.json"
FINISHED = "finished"
STATUS_EVERY = 120.0
STATUS_AFTER_DONE = 3.0
# CPU priority (nice) of each hospital's SuperNode and ClientApp runner, and so of the ClientApp
# processes the runner starts (they inherit it), on a one-machine federation.  The hospitals'
# processes outnumber the SuperLink's: at 20 hospitals training at once the SuperLink got about
# a tenth of a CPU and, holding its SQLite state database's write lock (Flower writes on nearly
# every Fleet request), waited 1-3 s on the run queue with the lock held (0.1 s of CPU); other
# requests then outwaited SQLite's 5 s busy timeout (flwr/supercore/constant.py SQLITE_PRAGMAS)
# and got HTTP 500 "database is locked", which Flower's clients do not retry
# (flwr/supercore/retry/http_retry.py): a reply, a node's download or the ServerApp was lost.
# In production the SuperLink has a host of its own; here the hospitals yield to it and to the
# gateway.  The ServerApp runs at the hospitals' priority (local_superlink.py: its scoring is
# off a round's critical path, their start-up is on it).  Lowering priority needs no
# privilege, and idle CPU is still all theirs.  See processes.lower_priority for why the
# session is niced too.
HOSPITAL_NICE = 19


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


# What a federation without network namespaces gives up, said where it starts.
SHARED_LOOPBACK = (
    "every hospital shares this machine's loopback, so its processes can reach the SuperLink "
    "directly, its Control API included (the fleet gateway is then no boundary)"
)


def use_namespaces(choice: str) -> bool:
    """``auto`` and ``on``: each hospital in its own network namespace, or a refusal that says
    why; sharing loopback has to be asked for (``off``)."""
    if choice == "off":
        return False
    if netns.available():
        return True
    raise DeploymentError(
        "network namespaces are not available here (they need root and iproute2: `ip netns "
        f"add` must work); without them {SHARED_LOOPBACK}. Run as root, or pass --netns off "
        "to accept that for a trial on one machine"
    )


def deployment_overrides(
    workdir: Path, hospitals: int, test_path: Path | str | None
) -> dict[str, Any]:
    """What a local federation decides for its runs: a round goes ahead with a majority of its
    hospitals (every one online is sampled; one that is gone costs a round, not the run), its
    test set, outputs in its work folder (where ``status`` reads the rounds)."""
    majority = hospitals // 2 + 1
    overrides: dict[str, Any] = {"min-nodes": majority, "output-dir": str(workdir / "flower")}
    if test_path:
        overrides["test-path"] = str(test_path)
    return overrides


def refusal_in_log(log: str) -> str | None:
    """The refusal a SuperNode's log names (Flower 1.42's messages), if any."""
    if "CERTIFICATE_VERIFY_FAILED" in log or "SSL/TLS handshake error" in log:
        return "TLS refused: the SuperNode does not trust the SuperLink's certificate"
    if "Failed to activate SuperNode" in log:
        return "enrolment refused: its public key is not registered with the SuperLink"
    return None


class ProcessRecord(BaseModel):
    role: str  # "superlink", "gateway", "supernode" or "clientapp" (a hospital's app runner)
    hospital: str | None
    pid: int
    started: float  # the process's start time: a reused pid is never mistaken for it
    netns: str | None
    address: str
    log: str
    # How it was started (what `restart` repeats): the command line, the variables set on
    # top of Flower's fixed environment (paths and addresses only; secrets stay in files), and
    # its CPU priority (HOSPITAL_NICE).
    argv: list[str] = []
    env: dict[str, str] = {}
    nice: int = 0


# What a SuperNode logs once it has connected to the SuperLink (flwr/supernode/
# start_client_internal.py); tests/test_local.py pins it.
NODE_CONNECTED = "SuperNode ID:"
# Flower 1.42: a node is online until 2 heartbeats of 30 s are missed (HEARTBEAT_PATIENCE x
# HEARTBEAT_DEFAULT_INTERVAL), and a SuperNode the SuperLink refuses to activate logs this
# (flwr/supercore/error/catalog.py) and exits.
HEARTBEAT_WINDOW = 60
ACTIVATION_REFUSED = "Failed to activate SuperNode"
REACTIVATION_RETRY = 5.0
REACTIVATION_WAIT = HEARTBEAT_WINDOW + 30.0


class FederationState(BaseModel):
    """``federation.json``: what ``up`` started, read by ``status``, ``submit`` and ``down``."""

    workdir: str
    superlink: str  # HOST:PORT, the consortium's only (Control API); on loopback
    gateway: str  # HOST:PORT, the hospitals' only: the Fleet API through the fleet gateway
    ca_cert: str
    flwr_home: str
    tls: bool  # read from the SuperLink's command line as started, not assumed
    node_auth: bool
    network: str  # "loopback" or "network namespaces"
    bridge: str | None
    hospitals: dict[str, str]  # hospital -> its address
    site_policies: dict[str, str]  # hospital -> its site policy file
    test_path: str | None  # the common test set the consortium scores runs on
    processes: list[ProcessRecord]


def _refused_activation(member: Managed, log: Path, seen: int, timeout: float = 120) -> bool:
    """Whether the SuperNode just started exited because the SuperLink refused to activate it
    (what it logged since byte ``seen``); False once it logged its node id (it is in), when
    it ended otherwise (the caller's liveness checks name that), or after ``timeout``.  Its
    exit status does not tell: Flower exits 305, but the shutdown after it ends with 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = log.read_bytes()[seen:] if log.is_file() else b""
        if NODE_CONNECTED.encode() in logged:
            return False
        if member.process.poll() is not None:
            return ACTIVATION_REFUSED.encode() in log.read_bytes()[seen:]
        nap(0.25)
    return False


def _same_process(record: ProcessRecord) -> psutil.Process | None:
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.started) > 0.5:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def _group_members(record: ProcessRecord) -> list[psutil.Process]:
    """Processes in the record's process group started no earlier than it (its children)."""
    members = []
    for process in psutil.process_iter(["pid", "create_time"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (
                os.getpgid(process.pid) == record.pid
                and process.info["create_time"] >= record.started - 0.5
            ):
                members.append(process)
    return members


def tagged_processes(workdir: str) -> list[psutil.Process]:
    """Processes whose environment carries this federation's tag (set at launch, inherited)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get(FEDERATION_TAG) == workdir:
                found.append(process)
    return found


def _terminate(processes: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after ``grace`` seconds."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def _members(record: ProcessRecord) -> list[psutil.Process]:
    """The process, its descendants (Flower starts app processes in sessions of their own) and
    its process group; a group whose leader died is still searched, so ``down`` after a crash
    leaves no orphaned app process behind."""
    members = _group_members(record)
    leader = _same_process(record)
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            members += [p for p in leader.children(recursive=True) if p not in members]
    return members


def _stop_record(record: ProcessRecord) -> None:
    """SIGTERM the process and its members, then SIGKILL what is left."""
    _terminate(_members(record))


class ProcessGone(DeploymentError):
    """A federation process is no longer running; names it and its log."""


class RunningFederation:
    """Operations on a started federation, by its recorded state (any process may hold one)."""

    def __init__(self, state: FederationState):
        self.state = state
        self.workdir = Path(state.workdir)
        self.flwr_home = Path(state.flwr_home)

    @classmethod
    def attach(cls, workdir: Path) -> RunningFederation:
        path = Path(workdir).resolve() / STATE_FILE
        if not path.is_file():
            raise DeploymentError(f"{path}: no federation here (start one with `federimed up`)")
        try:
            return cls(FederationState.model_validate_json(path.read_text()))
        except ValueError as error:  # pydantic's ValidationError is one
            raise DeploymentError(f"{path}: not a federation record ({error})") from None

    @property
    def address(self) -> str:
        return self.state.superlink

    def run_overrides(self) -> dict[str, Any]:
        return deployment_overrides(self.workdir, len(self.state.hospitals), self.state.test_path)

    def check_alive(self) -> None:
        for record in self.state.processes:
            if _same_process(record) is None:
                name = f"{record.role}-{record.hospital}" if record.hospital else record.role
                raise ProcessGone(
                    f"{name} (pid {record.pid}) is not running; log: {record.log}\n"
                    + tail(Path(record.log))
                )

    def submit(self, overrides: dict[str, Any], app_dir: Path) -> int:
        """`flwr run` with ``overrides`` (what differs from the app's defaults)."""
        return submit_run(self.flwr_home, CONNECTION, app_dir, to_toml_pairs(overrides))

    def run_status(self, run_id: int) -> dict[str, Any]:
        return run_status(self.flwr_home, CONNECTION, run_id)

    def runs(self) -> list[dict[str, Any]]:
        out = run_flwr(["ls", CONNECTION, "--format", "json"], self.flwr_home)
        return json.loads(out).get("runs", [])

    def wait_for_run(
        self,
        run_id: int,
        timeout: float,
        done: Callable[[], bool],
        on_tick: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """Wait for ``done()`` (cheap, checked every second) or a finished status (asked
        rarely); the run's ServerApp log is streamed to ``logs/run-<id>.log`` meanwhile.

        Each `flwr ls` costs seconds of CPU, which training on a small machine feels, so the
        SuperLink is asked every ``STATUS_AFTER_DONE`` seconds once ``done()`` is true (the
        status turns "finished" a moment after), otherwise every ``STATUS_EVERY`` seconds in
        case the run ended without ``done()`` noticing.
        """
        with ProcessGroup(self.workdir / "logs") as streams:
            argv, env = log_stream_argv(self.flwr_home, CONNECTION, run_id)
            stream = streams.start(f"run-{run_id}", argv, env)
            deadline = time.monotonic() + timeout
            last_status = time.monotonic()
            while time.monotonic() < deadline:
                self.check_alive()
                on_tick()
                finished = done() or stream.process.poll() is not None
                if time.monotonic() - last_status >= (
                    STATUS_AFTER_DONE if finished else STATUS_EVERY
                ):
                    last_status = time.monotonic()
                    status = self.run_status(run_id)
                    if str(status.get("status", "")).startswith(FINISHED):
                        on_tick()
                        return status
                nap(1)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s")

    def wait_for_nodes(self, timeout: float = 120) -> None:
        """Until the SuperLink counts every hospital's SuperNode online.  Asking it is a `flwr`
        process (about a second of CPU, which the starting SuperNodes feel), so it is asked
        only once every SuperNode has logged that it connected."""
        expected = len(self.state.hospitals)
        logs = [Path(r.log) for r in self.state.processes if r.role == "supernode"]

        def all_connected() -> bool:
            self.check_alive()
            return all(
                log.is_file() and NODE_CONNECTED in log.read_text(errors="replace") for log in logs
            )

        def all_online() -> bool:
            out = run_flwr(["supernode", "list", CONNECTION, "--format", "json"], self.flwr_home)
            nodes = json.loads(out).get("nodes", [])
            return sum(node.get("status") == "online" for node in nodes) >= expected

        deadline = time.monotonic() + timeout
        while True:
            connected = all_connected()
            if connected and all_online():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {expected} SuperNodes to come "
                    f"online; see the logs in {self.workdir / 'logs'}"
                )
            nap(2 if connected else 0.25)  # `flwr` was just asked: give its CPU back

    def status(self) -> dict[str, Any]:
        """Every process with whether it is alive, and the runs with their rounds so far."""
        processes = [
            {
                "role": r.role,
                "hospital": r.hospital,
                "pid": r.pid,
                "netns": r.netns,
                "address": r.address,
                "alive": _same_process(r) is not None,
            }
            for r in self.state.processes
        ]
        report: dict[str, Any] = {
            "workdir": self.state.workdir,
            "superlink": self.address,
            "gateway": self.state.gateway,
            "site_policies": self.state.site_policies,
            "tls": self.state.tls,
            "node_auth": self.state.node_auth,
            "network": self.state.network,
            "processes": processes,
            "runs": [],
        }
        if processes and processes[0]["alive"]:
            report["runs"] = [self._run_entry(run) for run in self.runs()]
        return report

    def _run_entry(self, run: dict[str, Any]) -> dict[str, Any]:
        run_id = int(run.get("run-id", 0))
        return {
            "run_id": run_id,
            "status": run.get("status"),
            "rounds_completed": len(read_rounds(self.workdir / "flower" / str(run_id))),
        }

    def restart(self, role: str, hospital: str | None = None) -> ProcessRecord:
        """Stop one process (if it still runs) and start it again exactly as ``up`` did.

        What a rebooted hospital node or a restarted SuperLink looks like: same command line,
        same state database, same keys, in the same network namespace.
        """
        matches = [
            i
            for i, r in enumerate(self.state.processes)
            if (r.role, r.hospital) == (role, hospital)
        ]
        if not matches:
            who = f"{role} of {hospital}" if hospital else role
            raise DeploymentError(f"this federation has no {who}")
        index = matches[0]
        record = self.state.processes[index]
        if not record.argv:
            raise DeploymentError(
                f"{record.log}: this federation's record predates `restart`; "
                f"restart all of it: federimed down/up --out {self.workdir}"
            )
        _stop_record(record)
        group = ProcessGroup(self.workdir / "logs", detached=True)
        member = self._start_again(group, record)
        if role in ("superlink", "gateway"):
            ca = Path(self.state.ca_cert)
            wait_until(lambda: superlink_healthy(record.address, ca), 90, f"the {role}", group)
        started = psutil.Process(member.process.pid).create_time()
        self.state.processes[index] = record.model_copy(
            update={"pid": member.process.pid, "started": started}
        )
        (self.workdir / STATE_FILE).write_text(self.state.model_dump_json(indent=2))
        return self.state.processes[index]

    def _start_again(self, group: ProcessGroup, record: ProcessRecord) -> Managed:
        """Start ``record``'s command; a SuperNode until the SuperLink lets it back in.

        A SuperNode that died without saying goodbye (SIGKILL, a host's power) stays
        ``online`` at the SuperLink until its heartbeat window ends (Flower 1.42: 2 x 30 s),
        and the SuperLink refuses to activate an online node: the new process exits at once
        ("Failed to activate SuperNode", Flower's exit code 305).  Compose and Kubernetes
        restart it until it gets in; here it is started again every few seconds for up to
        :data:`REACTIVATION_WAIT` seconds, saying why."""
        argv, env, log = record.argv, flower_env() | record.env, Path(record.log)
        deadline = time.monotonic() + REACTIVATION_WAIT
        refusals = 0
        while True:
            seen = log.stat().st_size if log.is_file() else 0
            member = group.start(log.stem, argv, env, nice=record.nice)
            if record.role != "supernode" or not _refused_activation(member, log, seen):
                return member
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{record.hospital}'s SuperNode was refused by the SuperLink for "
                    f"{REACTIVATION_WAIT:.0f}s; log: {log}\n" + tail(log)
                )
            refusals += 1
            if refusals == 1:
                print(
                    f"{record.hospital}: the SuperLink still counts its previous SuperNode "
                    f"online (up to {HEARTBEAT_WINDOW}s after it died); starting it again "
                    f"every {REACTIVATION_RETRY:.0f}s until it is let in",
                    flush=True,
                )
            nap(REACTIVATION_RETRY)

    def stop(self) -> None:
        """Stop every recorded process and remove the network namespaces, alive or not.

        All at once: each takes up to a second to act on SIGTERM, one after another they took
        4 s for three hospitals."""
        members: list[psutil.Process] = []
        for record in self.state.processes:
            members += [p for p in _members(record) if p not in members]
        _terminate(members)
        # What an already dead process had started (Flower's app runners, in sessions of
        # their own) is found by the tag every process of this federation inherits.
        _terminate(tagged_processes(self.state.workdir))
        if self.state.bridge:
            netns.remove(self.state.bridge, [r.netns for r in self.state.processes if r.netns])
        (self.workdir / STATE_FILE).unlink(missing_ok=True)


class LocalFederation:
    """Start a SuperLink and one SuperNode per hospital, enrol them, wait until all are online.

    ``with LocalFederation(...) as running:`` stops everything on exit, error or Ctrl-C;
    ``LocalFederation(...).start()`` leaves it running (``federimed up``; ``down`` stops it).
    Nothing here changes after construction: the addresses are chosen up front.
    """

    def __init__(
        self,
        workdir: Path,
        certs: Path,
        hospitals: dict[str, Path],
        test_path: Path | None = None,
        netns_mode: str = "auto",
        client_threads: int | None = 1,
        say: Callable[[str], None] = lambda text: None,
        detached: bool = False,
        hospital_nice: int = HOSPITAL_NICE,
    ):
        self.workdir = Path(workdir).resolve()
        self.certs = Path(certs).resolve()
        self.hospitals = {name: Path(path).resolve() for name, path in hospitals.items()}
        self.test_path = Path(test_path).resolve() if test_path else None
        self.hosts = netns.HospitalHosts() if use_namespaces(netns_mode) else None
        self.port = free_port()
        self.gateway_port = free_port()
        self.runtime_ports = {name: free_port() for name in self.hospitals}
        # What every hospital's policy approves at set-up: this project's own app bundle.
        self.approved_app = find_app_dir()
        # Threads per ClientApp: hospitals sharing one machine train at once, so 1 each avoids
        # oversubscription; the ServerApp evaluates while they wait and keeps torch's default.
        self.client_threads = client_threads
        self.hospital_nice = hospital_nice
        self.say = say
        # Not detached: the processes die with this one, even when it is SIGKILLed.
        self.group = ProcessGroup(self.workdir / "logs", detached=detached)

    @property
    def host(self) -> str:
        """The gateway's host: the bridge's address (its subnet is claimed at start) or
        loopback."""
        return self.hosts.bridge_address if self.hosts else "127.0.0.1"

    @property
    def address(self) -> str:
        """The SuperLink, on loopback: no hospital namespace can reach it."""
        return f"127.0.0.1:{self.port}"

    @property
    def gateway(self) -> str:
        return f"{self.host}:{self.gateway_port}"

    def __enter__(self) -> RunningFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        # By the record first: it finds the app processes Flower started in sessions of
        # their own while their parents still live; then the group reaps what it started.
        if (self.workdir / STATE_FILE).is_file():
            RunningFederation.attach(self.workdir).stop()
        self.group.stop_all()
        if self.hosts is not None:
            self.hosts.remove()

    def start(self) -> RunningFederation:
        self._clear_earlier_federation()  # before the try: a live one there is not ours to stop
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> RunningFederation:
        if self.hosts is not None:
            stale = netns.remove_stale()
            if stale:
                self.say(f"removed what an earlier, killed run left behind: {', '.join(stale)}")
            self.hosts.create()
            for hospital in self.hospitals:
                self.hosts.add(hospital)
        report = ensure_certs(self.certs, list(self.hospitals), (self.host,))
        self.say(
            f"certificates in {self.certs} ({len(report.created)} created, {len(report.kept)} kept)"
        )
        self._write_site_policies()
        self._write_secrets()
        self.say(
            f"starting SuperLink on https://{self.address} (TLS, node authentication) and the "
            f"fleet gateway on https://{self.gateway} (hospitals on {self._network})"
        )
        if not self.hosts:
            self.say(f"--netns off: {SHARED_LOOPBACK}")
        # Flower's SuperLink with a 60 s SQLite busy timeout instead of 5 s, and its ServerApps
        # yielding the CPU as the hospitals do (local_superlink.py).
        link_argv = [
            sys.executable,
            "-m",
            "federimed.deploy.local_superlink",
            "--app-nice",
            str(self.hospital_nice),
            *superlink_argv(self._superlink_settings())[1:],
        ]
        records = [self._launch("superlink", None, link_argv)]
        # Recorded from the first process on, so `down` finds whatever a killed start left.
        self._write_state(link_argv, records)
        records.append(self._launch("gateway", None, gateway_argv(self._gateway_settings())))
        # The hospitals' ClientApp runners first: each imports its ML libraries (seconds of
        # CPU, at the hospitals' low priority, so with what the rest leaves) while the SuperLink
        # starts, then waits for its SuperNode (wait_for_listener) before Flower's SuperExec.
        for name in self.hospitals:
            records.append(self._launch("clientapp", name, self._runner_argv(name)))
        self._write_state(link_argv, records)
        ca = self.certs / "ca.crt"
        wait_until(lambda: superlink_healthy(self.address, ca), 90, "the SuperLink", self.group)
        wait_until(lambda: superlink_healthy(self.gateway, ca), 60, "the gateway", self.group)
        write_flwr_home(self._flwr_home, CONNECTION, self.address, ca)
        keys = [node_key_path(self.certs, name).with_suffix(".pub") for name in self.hospitals]
        added = enroll(self._flwr_home, CONNECTION, keys)
        self.say(
            f"enrolled {len(added)} new SuperNode key(s); starting {len(self.hospitals)} SuperNodes"
        )
        for name, data in self.hospitals.items():
            records.append(self._launch("supernode", name, self._supernode_argv(name, data)))
            self._write_state(link_argv, records)
        running = RunningFederation.attach(self.workdir)
        try:
            running.wait_for_nodes()
        except (TimeoutError, ProcessGone) as error:
            raise DeploymentError(f"{error}\n{self._diagnose(running)}") from None
        return running

    def _diagnose(self, running: RunningFederation) -> str:
        """Why SuperNodes are not online, as far as their logs and the network tell."""
        lines = []
        for record in running.state.processes:
            if record.role != "supernode":
                continue
            log = Path(record.log).read_text(errors="replace")
            why = refusal_in_log(log)
            if (
                why is None
                and self.hosts
                and record.hospital is not None
                and not self.hosts.reachable(record.hospital, self.host, self.gateway_port)
            ):
                why = (
                    f"{self.gateway} is unreachable from its network namespace {record.netns} "
                    "(another interface on this machine may hold the same subnet)"
                )
            if why is None and "Connection attempt failed" in log:
                why = f"cannot connect to the fleet gateway at {self.gateway}"
            if why:
                lines.append(f"  {record.hospital}: {why}; log: {record.log}")
        return "\n".join(lines) or f"  no cause found in the SuperNode logs in {self.group.log_dir}"

    @property
    def _network(self) -> str:
        return "network namespaces" if self.hosts else "loopback"

    @property
    def _flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def _write_state(self, link_argv: list[str], records: list[ProcessRecord]) -> None:
        state = FederationState(
            workdir=str(self.workdir),
            superlink=self.address,
            gateway=self.gateway,
            ca_cert=str(self.certs / "ca.crt"),
            flwr_home=str(self._flwr_home),
            tls="--ssl-certfile" in link_argv and "--insecure" not in link_argv,
            node_auth="--enable-supernode-auth" in link_argv,
            network=self._network,
            bridge=self.hosts.bridge if self.hosts else None,
            hospitals={
                name: self.hosts.addresses[name] if self.hosts else self.host
                for name in self.hospitals
            },
            test_path=str(self.test_path) if self.test_path else None,
            site_policies={name: str(self._policy(name)) for name in self.hospitals},
            processes=records,
        )
        (self.workdir / STATE_FILE).write_text(state.model_dump_json(indent=2))

    def _clear_earlier_federation(self) -> None:
        """A federation recorded in this folder: refuse if it runs, clean up if it died."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / STATE_FILE).is_file():
            return
        earlier = RunningFederation.attach(self.workdir)
        if any(_same_process(record) for record in earlier.state.processes):
            raise DeploymentError(
                f"a federation is already running in {self.workdir}; "
                f"stop it first: federimed down --out {self.workdir}"
            )
        earlier.stop()
        self.say(
            f"cleaned up after the earlier federation in {self.workdir} (its processes had died)"
        )

    def _policy(self, hospital: str) -> Path:
        return self.workdir / "sites" / hospital / "policy.yaml"

    def feature_cache(self, hospital: str) -> Path:
        """The hospital's own folder for the frozen layers' output of its cases."""
        return self._policy(hospital).parent / "cache"

    def _write_site_policies(self) -> None:
        """Each hospital's policy (kept across starts, as a hospital's would be) approves this
        project's app bundle; its ledger lies beside it."""
        digest = app_hash(self.approved_app)
        note = f"set up by federimed: {self.approved_app}"
        for hospital in self.hospitals:
            approve(self._policy(hospital), digest, note=note, site=hospital)
        self.say(f"site policies in {self.workdir / 'sites'} approve app bundle {digest[:12]}")

    def _secret(self, hospital: str) -> Path:
        """Shared by a hospital's SuperNode and its ClientApp runner (Flower's SuperExec auth),
        and by no other hospital: one hospital's runner cannot take another's tasks."""
        return self.workdir / "state" / f"superexec-{hospital}.secret"

    def _write_secrets(self) -> None:
        """Made once each, kept across starts (runners of a restarted node still hold it)."""
        for hospital in self.hospitals:
            secret = self._secret(hospital)
            if not secret.is_file():
                secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                secret.touch(mode=0o600)
                secret.write_bytes(os.urandom(32).hex().encode())

    @property
    def _gateway_state(self) -> Path:
        """Caddy's working folder: its Caddyfile and its own files."""
        return self.workdir / "state" / "gateway"

    def _superlink_settings(self) -> SuperLinkSettings:
        return SuperLinkSettings(
            host="127.0.0.1",
            port=self.port,
            ca_cert=self.certs / "ca.crt",
            cert=self.certs / "superlink.crt",
            key=self.certs / "superlink.key",
            database=self.workdir / "state" / "superlink.db",
        )

    def _gateway_settings(self) -> GatewaySettings:
        return GatewaySettings(
            host=self.host,
            port=self.gateway_port,
            superlink=self.address,
            ca_cert=self.certs / "ca.crt",
            cert=self.certs / "gateway.crt",
            key=self.certs / "gateway.key",
            state=self._gateway_state,
        )

    def _supernode_argv(self, name: str, data: Path) -> list[str]:
        settings = SuperNodeSettings(
            name=name,
            superlink=self.gateway,
            ca_cert=self.certs / "ca.crt",
            private_key=node_key_path(self.certs, name),
            data_path=data,
            isolation="process",
            runtime_port=self.runtime_ports[name],
            superexec_auth_secret=self._secret(name),
        )
        return self._in_hospital(name, supernode_argv(settings))

    def _runner_argv(self, name: str) -> list[str]:
        """The hospital's ClientApp runner (`federimed superexec`), configured by env."""
        return self._in_hospital(name, ["federimed", "superexec"])

    def _in_hospital(self, name: str, argv: list[str]) -> list[str]:
        return self.hosts.wrap(name, argv) if self.hosts else argv

    def _address_of(self, role: str, hospital: str | None) -> str:
        if role == "superlink":
            return self.address
        if role == "gateway":
            return self.gateway
        return self.hosts.addresses[_named(role, hospital)] if self.hosts else "127.0.0.1"

    def _launch(self, role: str, hospital: str | None, argv: list[str]) -> ProcessRecord:
        env = {FEDERATION_TAG: str(self.workdir)}
        if role == "supernode":  # the hospital's guard reads its policy (guard.py)
            env[POLICY_ENV] = str(self._policy(_named(role, hospital)))
        if role == "clientapp":  # the consortium's code: no policy, no ledger
            name = _named(role, hospital)
            env.update(
                FEDERIMED_SUPEREXEC_RUNTIME_API=f"127.0.0.1:{self.runtime_ports[name]}",
                FEDERIMED_SUPEREXEC_AUTH_SECRET=str(self._secret(name)),
                FEDERIMED_FEATURE_CACHE=str(self.feature_cache(name)),
            )
            if self.client_threads:
                env["FEDERIMED_TORCH_THREADS"] = str(self.client_threads)
        if role == "gateway":  # Caddy's own files stay in the work folder
            env["XDG_DATA_HOME"] = env["XDG_CONFIG_HOME"] = str(self._gateway_state)
        name = f"{role}-{hospital}" if hospital else role
        nice = self.hospital_nice if role in ("supernode", "clientapp") else 0
        member = self.group.start(name, argv, flower_env() | env, nice=nice)
        return ProcessRecord(
            role=role,
            hospital=hospital,
            pid=member.process.pid,
            started=psutil.Process(member.process.pid).create_time(),
            netns=self.hosts.namespaces[hospital] if self.hosts and hospital else None,
            address=self._address_of(role, hospital),
            log=str(member.log),
            argv=argv,
            env=env,
            nice=nice,
        )


def _named(role: str, hospital: str | None) -> str:
    """The hospital a SuperNode or its ClientApp runner is started for (they all have one)."""
    if hospital is None:
        raise ValueError(f"a {role} is started for a hospital, and none was named")
    return hospital
