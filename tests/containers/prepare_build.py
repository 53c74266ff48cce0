"""Prepare the build inputs of docker/Dockerfile from this host's own setup, and print them.

    python tests/containers/prepare_build.py            # prints KEY=VALUE lines for compose

1. wheelhouse/ (git-ignored): the CPU wheel torch==2.13.0, fetched with this host's pip
   configuration (here it comes from the local wheel folder that PIP_FIND_LINKS names).
2. docker/build-ca/host-ca-bundle.crt (git-ignored): this host's CA bundle, so pip inside the
   build trusts a TLS-inspecting proxy the way the host does (FEDERIMED_BUILD_CA overrides
   the source file; FEDERIMED_BUILD_CA=none skips it).
3. The package index this host's pip uses (index-url, extra-index-url, trusted-host from
   `pip config list` and PIP_* variables), as FEDERIMED_PIP_* build settings. Only http(s)
   URLs are passed on: file:// indexes and find-links folders do not exist inside a build
   (their wheels reach it through wheelhouse/ instead).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH_SPEC = os.environ.get("FEDERIMED_TORCH_SPEC", "torch==2.13.0")
DEFAULT_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def log(message: str) -> None:
    print(f"prepare-build: {message}", file=sys.stderr)


def ensure_wheelhouse(python: str = sys.executable) -> Path:
    wheelhouse = REPO / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    version = TORCH_SPEC.partition("==")[2]
    if version and any(wheelhouse.glob(f"torch-{version}*.whl")):
        log(f"wheelhouse has {TORCH_SPEC}")
        return wheelhouse
    log(f"pip download {TORCH_SPEC} -> {wheelhouse}")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(wheelhouse),
            TORCH_SPEC,
        ],
        check=True,
        stdout=sys.stderr,
    )
    return wheelhouse


def ensure_build_ca() -> Path | None:
    source = os.environ.get("FEDERIMED_BUILD_CA", str(DEFAULT_CA))
    target = REPO / "docker" / "build-ca" / "host-ca-bundle.crt"
    if source.lower() == "none" or not Path(source).is_file():
        target.unlink(missing_ok=True)
        log("no extra CA for the build")
        return None
    data = Path(source).read_bytes()
    if not target.is_file() or target.read_bytes() != data:  # unchanged file keeps the cache
        shutil.copyfile(source, target)
    log(f"build trusts {source}")
    return target


def _pip_config(python: str) -> dict[str, str]:
    """`pip config list` as {key: value} (the last scope wins, as in pip)."""
    proc = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    values: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw.strip("'\"")
        values[key.split(".", 1)[-1]] = str(value)
    return values


def _http_only(value: str) -> str:
    return " ".join(u for u in value.split() if u.startswith(("http://", "https://")))


def index_settings(python: str = sys.executable) -> dict[str, str]:
    config = _pip_config(python)
    for key, env in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
        ("trusted-host", "PIP_TRUSTED_HOST"),
    ):
        if os.environ.get(env):
            config[key] = os.environ[env]
    settings = {
        "FEDERIMED_PIP_INDEX_URL": _http_only(config.get("index-url", "")).split(" ")[0],
        "FEDERIMED_PIP_EXTRA_INDEX_URL": _http_only(config.get("extra-index-url", "")),
        "FEDERIMED_PIP_TRUSTED_HOST": config.get("trusted-host", ""),
    }
    return {k: v for k, v in settings.items() if v}


def prepare(python: str = sys.executable) -> dict[str, str]:
    ensure_wheelhouse(python)
    ensure_build_ca()
    return index_settings(python)


if __name__ == "__main__":
    for key, value in prepare().items():
        print(f"{key}={value}")
