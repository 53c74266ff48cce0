"""The container deployment, for real: images built, `docker compose up`, a federated run.

Brings up a Docker engine where none runs (tests/containers/engine.sh), builds the three
images on a locally made Debian base with the CPU torch wheel from wheelhouse/ and this host's
CA and package index (tests/containers/prepare_build.py), starts compose.yaml (+ compose.cpu.yaml)
and checks that the demo run finished its rounds with all three hospitals, saved its run record
(rounds.jsonl, summary.json) and the model on the `runs` volume, and that the deployment
keeps its promises (non-root, networks, secrets).
Everything is torn down afterwards; images and the layer cache stay for the next run.

    tests/containers/run.sh          # = make test-containers; needs root (dockerd, apt-get)

Settings (env): FEDERIMED_TEST_ROUNDS (2), FEDERIMED_TEST_LOCAL_STEPS (3),
FEDERIMED_TEST_KEEP=1 (leave the stack up for debugging), FEDERIMED_TEST_ARTIFACTS (folder for
compose logs, rounds.jsonl and summary.json; default runs/containers-test).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
COMPOSE_FILES = ("-f", "compose.yaml", "-f", "compose.cpu.yaml")


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
    timings: dict[str, float] = field(default_factory=dict)
    logs: str = ""
    submit_exit: int | None = None

    def compose(self, *args, **kw):
        return _run(["docker", "compose", "-p", PROJECT, *COMPOSE_FILES, *args], env=self.env, **kw)

    def exec(self, service: str, *argv: str, check=False):
        return self.compose("exec", "-T", service, *argv, check=check, timeout=60)

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        out = self.engine.docker("inspect", self.container(service)).stdout
        return json.loads(out)[0]


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
    port = _free_port()
    env.update(
        {
            "FEDERIMED_BASE_IMAGE": base_tag,
            "FEDERIMED_IMAGE_TAG": IMAGE_TAG,
            "FEDERIMED_RUN_CONFIG": f"num-server-rounds={ROUNDS} local-steps={LOCAL_STEPS}",
            "FEDERIMED_TORCH_THREADS": "1",
            "FEDERIMED_SUPERLINK_PUBLISH": f"127.0.0.1:{port}",
        }
    )
    stack = Stack(engine, env, port)
    stack.compose("down", "-v", "--remove-orphans", check=False, timeout=180)

    started = time.monotonic()
    build = stack.compose("build", timeout=BUILD_TIMEOUT, check=False)
    (ARTIFACTS / "build.log").write_text(build.stdout or "")
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-6000:]}"
    stack.timings["build_s"] = time.monotonic() - started

    try:
        started = time.monotonic()
        up = stack.compose("up", "-d", "--no-build", timeout=600, check=False)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout[-4000:]}\n{_logs(stack)}"
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


def test_dockerfile_is_hadolint_clean():
    hadolint = _run(["bash", str(HELPERS / "engine.sh"), "hadolint"], timeout=600)
    binary = hadolint.stdout.strip().splitlines()[-1]
    result = _run([binary, "--failure-threshold", "info", "docker/Dockerfile"], check=False)
    assert result.returncode == 0, result.stdout


def test_compose_files_are_valid_and_gpu_only_in_override(engine):
    def config(*files):
        args = [a for f in files for a in ("-f", f)]
        out = _run(["docker", "compose", *args, "config", "--format", "json"], env=engine.env)
        return json.loads(out.stdout)["services"]

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


def test_superlink_is_published_on_loopback_with_tls(stack, tmp_path):
    ca = tmp_path / "ca.crt"
    stack.compose("cp", "superlink:/certs/ca.crt", str(ca))
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{stack.port}/health", context=context, timeout=10
    ) as response:
        assert response.status == 200
    binding = stack.inspect("superlink")["HostConfig"]["PortBindings"]["8000/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"


LONG_RUNNING = (
    "superlink",
    "serverapp",
    *(f"supernode-{h}" for h in HOSPITALS),
    *(f"clientapp-{h}" for h in HOSPITALS),
)


def test_services_run_as_non_root_and_are_healthy(stack):
    for service in LONG_RUNNING:
        info = stack.inspect(service)
        assert info["State"]["Running"], f"{service} is not running:\n{_tail(stack)}"
        assert info["Config"]["User"] == "49999:49999", service
        # A bare NAME (compose passing through a variable the shell left unset) sets nothing.
        env = dict(item.split("=", 1) for item in info["Config"]["Env"] if "=" in item)
        assert env.get("FLWR_TELEMETRY_ENABLED") == "0" and env.get("HF_HUB_OFFLINE") == "1", env
        uid = stack.exec(service, "id", "-u").stdout.strip()
        assert uid == "49999", f"{service}: uid {uid}"
    for service in ("superlink", *(f"supernode-{h}" for h in HOSPITALS)):
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
    assert _reach(stack, "clientapp-hospital-1", "supernode-hospital-1", 9094)
    assert _reach(stack, "supernode-hospital-1", "superlink", 8000)
    assert _reach(stack, "serverapp", "superlink", 8000)
    # hospitals cannot reach each other, nor their ClientApp runners the SuperLink
    assert not _reach(stack, "supernode-hospital-1", "supernode-hospital-2", 9094)
    assert not _reach(stack, "clientapp-hospital-1", "supernode-hospital-2", 9094)
    assert not _reach(stack, "clientapp-hospital-2", "superlink", 8000)
    assert not _reach(stack, "serverapp", "supernode-hospital-3", 9094)


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
    for hospital in HOSPITALS:
        node = _mounts(stack, f"supernode-{hospital}")
        assert node["/certs"] == (f"certs-{hospital}", False)
        assert "/data" not in node, "the SuperNode needs no patient data"
        files = stack.exec(f"supernode-{hospital}", "ls", "/certs").stdout.split()
        assert sorted(files) == ["ca.crt", "node.key", "node.key.pub"], files
        runner = _mounts(stack, f"clientapp-{hospital}")
        assert runner == {"/data": (f"data-{hospital}", False)}, runner
        others = [h for h in HOSPITALS if h != hospital]
        assert not any(h in str(runner) for h in others)
        write = stack.exec(f"clientapp-{hospital}", "touch", "/data/x")
        assert write.returncode != 0, "hospital data must be mounted read-only"
    superlink = _mounts(stack, "superlink")
    assert superlink["/certs"] == ("certs-superlink", False)
    files = stack.exec("superlink", "ls", "/certs").stdout.split()
    assert sorted(files) == ["ca.crt", "superlink.crt", "superlink.key"], files
    assert _mounts(stack, "serverapp")["/runs"] == ("runs", True)


def test_images_carry_no_build_inputs(stack):
    for image in ("superlink", "supernode", "superexec"):
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
