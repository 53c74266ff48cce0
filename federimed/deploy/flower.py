"""Flower command lines built from our settings, and the `flwr` CLI driven safely.

Every place that starts a Flower process (the demo, compose, Kubernetes) goes through these
builders, so the hardening (TLS, node auth, no runtime installs, no telemetry) cannot drift
between deployments.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pathspec
from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import filter_paths_for_publish

from federimed.settings import SuperExecSettings, SuperLinkSettings, SuperNodeSettings

HARDENED_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


# `flwr ls` status of a run that ended well (others: finished:failed, finished:stopped).
COMPLETED = "finished:completed"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which and what to check."""


def flower_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Hardened environment; Flower's binaries are found beside this Python even when the
    virtualenv is not activated (``.venv/bin/federimed demo`` from the Makefile)."""
    env = dict(os.environ if base is None else base)
    env.update(HARDENED_ENV)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def require_files(**paths: Path) -> None:
    """Fail with the setting's env name, not with Flower's traceback deep inside ssl."""
    for env_name, path in paths.items():
        if not Path(path).is_file():
            raise DeploymentError(f"{env_name}={path}: file not found")


def superlink_argv(settings: SuperLinkSettings) -> list[str]:
    require_files(
        FEDERIMED_SUPERLINK_CA_CERT=settings.ca_cert,
        FEDERIMED_SUPERLINK_CERT=settings.cert,
        FEDERIMED_SUPERLINK_KEY=settings.key,
    )
    settings.database.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "flower-superlink",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--ssl-ca-certfile",
        str(settings.ca_cert),
        "--ssl-certfile",
        str(settings.cert),
        "--ssl-keyfile",
        str(settings.key),
        "--database",
        str(settings.database),
        "--isolation",
        settings.isolation,
        "--disable-runtime-dependency-installation",
    ]
    if settings.node_auth:
        argv.append("--enable-supernode-auth")
    return argv + _secret_args(
        FEDERIMED_SUPERLINK_SUPEREXEC_AUTH_SECRET=settings.superexec_auth_secret
    )


def _secret_args(**setting: Path | None) -> list[str]:
    """``--superexec-auth-secret-file`` from the one setting given (its env name => its path):
    only runners holding the secret reach the Runtime API."""
    ((env_name, secret),) = setting.items()
    if secret is None:
        return []
    require_files(**{env_name: secret})
    return ["--superexec-auth-secret-file", str(secret)]


def node_config(settings: SuperNodeSettings) -> str:
    """Flower parses this TOML-ish string into typed values for ``context.node_config``."""
    return f'hospital="{settings.name}" data-path="{settings.data_path}"'


def supernode_argv(settings: SuperNodeSettings) -> list[str]:
    require_files(
        FEDERIMED_NODE_CA_CERT=settings.ca_cert,
        FEDERIMED_NODE_PRIVATE_KEY=settings.private_key,
    )
    if not settings.data_path.is_dir():
        raise DeploymentError(f"FEDERIMED_NODE_DATA_PATH={settings.data_path}: not a folder")
    return [
        # Flower's flower-supernode, with its idle wait set (federimed/hospital/supernode.py)
        sys.executable,
        "-m",
        "federimed.hospital.supernode",
        "--idle-poll-seconds",
        str(settings.idle_poll_seconds),
        "--superlink",
        settings.superlink,
        "--root-certificates",
        str(settings.ca_cert),
        "--auth-supernode-private-key",
        str(settings.private_key),
        "--node-config",
        node_config(settings),
        "--isolation",
        settings.isolation,
        "--host",
        settings.runtime_host,
        "--port",
        str(settings.runtime_port),
        *_secret_args(FEDERIMED_NODE_SUPEREXEC_AUTH_SECRET=settings.superexec_auth_secret),
    ]


def wait_for_listener(address: str, say=print, every: float = 0.2) -> None:
    """Until ``HOST:PORT`` accepts a TCP connection.

    Flower's SuperExec retries an unreachable runtime API with exponential backoff (up to 20 s
    between tries), so a runner started before its SuperNode (as the local federation does, to
    import its ML libraries while the SuperLink starts) could sit out many seconds after the
    node came up; asking five times a second costs nothing."""
    host, _, port = address.rpartition(":")
    told = False
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if not told:
                say(f"waiting for {address} to accept connections")
                told = True
            time.sleep(every)


def superexec_argv(settings: SuperExecSettings) -> list[str]:
    argv = [
        "flower-superexec",
        "--runtime-api-address",
        settings.runtime_api,
        *_secret_args(FEDERIMED_SUPEREXEC_AUTH_SECRET=settings.auth_secret),
    ]
    if settings.ca_cert is None:
        return [*argv, "--insecure"]
    require_files(FEDERIMED_SUPEREXEC_CA_CERT=settings.ca_cert)
    return [*argv, "--root-certificates", str(settings.ca_cert)]


def app_files(app_dir: Path) -> dict[str, Path]:
    """The app folder's files as `flwr run` collects them (relative path -> file), without
    walking the folders its .gitignore excludes: Flower walks them all (a virtualenv and run
    outputs, 80,000 files in a working checkout: 9 s of CPU) and then drops every file there."""
    root = Path(app_dir).resolve()
    gitignore = root / ".gitignore"
    ignored = pathspec.GitIgnoreSpec.from_lines(
        gitignore.read_text().splitlines() if gitignore.is_file() else []
    )
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, followlinks=False):
        here = Path(folder).relative_to(root)
        subfolders[:] = [
            d for d in subfolders if not ignored.match_file(f"{(here / d).as_posix()}/")
        ]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[(here / name).as_posix()] = path
    return files


def app_hash(app_dir: Path) -> str:
    """SHA-256 of the app bundle exactly as `flwr run` builds it (Flower's own builder), the
    hash a hospital approves."""
    try:
        fab, _ = build_fab_from_files(app_files(app_dir))
    except ValueError as error:
        raise DeploymentError(f"{Path(app_dir).resolve()}: not a Flower app ({error})") from None
    return hashlib.sha256(fab).hexdigest()


def stage_app(app_dir: Path, into: Path) -> Path:
    """Copy into ``into`` only the files the app bundle holds (and the .gitignore that selects
    them), for `flwr run` to bundle without walking the whole project: the same files make the
    same bundle, byte for byte, so the hash the hospitals approved does not change."""
    files = app_files(app_dir)
    kept = [*filter_paths_for_publish(files), *([".gitignore"] if ".gitignore" in files else [])]
    for relative in kept:
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[relative], target)
    return into


def write_flwr_home(home: Path, connection: str, address: str, ca_cert: Path) -> Path:
    """A project-local FLWR_HOME, so the user's own ~/.flwr is never read or changed."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(
        "[superlink]\n"
        f'default = "{connection}"\n\n'
        f"[superlink.{connection}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{Path(ca_cert).resolve()}"\n'
    )
    return config


def run_flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> str:
    """Run one `flwr` CLI command against the private FLWR_HOME; return its stdout."""
    env = flower_env()
    env["FLWR_HOME"] = str(flwr_home)
    proc = subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stdout + proc.stderr).strip()[-2000:]
        command = shlex.join(["flwr", *args])
        raise DeploymentError(f"`{command}` failed (exit {proc.returncode}):\n{detail}")
    return proc.stdout


def enroll(flwr_home: Path, connection: str, public_keys: list[Path]) -> list[Path]:
    """Register each key with the SuperLink; return those newly added.

    Idempotent: Flower refuses a key it already knows ("already in use"), and the SuperLink's
    node list does not expose keys, so that refusal is how an existing enrolment is detected.
    """
    for key in public_keys:
        if not key.is_file():
            raise DeploymentError(f"public key {key}: file not found")
    # Each `flwr` call spends seconds starting Python; the registrations are independent.
    with ThreadPoolExecutor(max_workers=4) as pool:
        newly = list(pool.map(lambda key: _register(flwr_home, connection, key), public_keys))
    return [key for key, new in zip(public_keys, newly, strict=True) if new]


def _register(flwr_home: Path, connection: str, key: Path) -> bool:
    try:
        run_flwr(["supernode", "register", str(key), connection, "--name", key.stem], flwr_home)
    except DeploymentError as error:
        if "already in use" not in str(error):
            raise
        return False
    return True


def submit_run(flwr_home: Path, connection: str, app_dir: Path, run_config: str) -> int:
    """`flwr run` without waiting; the Flower run id (what `flwr log` and `flwr ls` take).  It
    bundles a staged copy of the app (:func:`stage_app`)."""
    with tempfile.TemporaryDirectory(prefix="federimed-app-") as staging:
        args = ["run", str(stage_app(app_dir, Path(staging))), connection, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config]
        out = run_flwr(args, flwr_home, timeout=300)
    reply = json.loads(out)
    if not reply.get("success", False) or "run-id" not in reply:
        raise DeploymentError(f"flwr run did not start a run: {out.strip()}")
    return int(reply["run-id"])


def run_status(flwr_home: Path, connection: str, run_id: int) -> dict[str, Any]:
    """The run's entry in `flwr ls` (status is e.g. ``finished:completed``)."""
    out = run_flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = json.loads(out).get("runs", [])
    return runs[0] if runs else {}


def log_stream_argv(flwr_home: Path, connection: str, run_id: int) -> tuple[list[str], dict]:
    """`flwr log --stream` and its environment; unbuffered, since it usually writes to a
    file that is read while the run goes (block buffering would hold every line to the end)."""
    env = flower_env()
    env.update({"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"})
    return ["flwr", "log", str(run_id), connection, "--stream"], env
