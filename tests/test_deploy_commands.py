"""Flower command lines come from validated settings; bad settings name the variable; `flwr run`
bundles what the hospitals approved."""

from __future__ import annotations

import hashlib

import pytest
from flwr.cli.build import build_fab_from_disk

from federimed.cli import main
from federimed.config import find_app_dir
from federimed.deploy.certs import ensure_certs, node_key_path
from federimed.deploy.flower import (
    DeploymentError,
    app_hash,
    stage_app,
    superexec_argv,
    superlink_argv,
    supernode_argv,
)
from federimed.settings import SuperExecSettings, SuperLinkSettings, SuperNodeSettings


def test_superlink_is_hardened(tmp_path):
    ensure_certs(tmp_path, [])
    argv = superlink_argv(
        SuperLinkSettings(
            ca_cert=tmp_path / "ca.crt",
            cert=tmp_path / "superlink.crt",
            key=tmp_path / "superlink.key",
            database=tmp_path / "state" / "db.sqlite",
        )
    )
    assert argv[0] == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in argv
    assert "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(tmp_path / "superlink.crt")


def test_supernode_args_and_node_config(tmp_path):
    ensure_certs(tmp_path, ["hospital-1"])
    argv = supernode_argv(
        SuperNodeSettings(
            name="hospital-1",
            ca_cert=tmp_path / "ca.crt",
            private_key=node_key_path(tmp_path, "hospital-1"),
            data_path=tmp_path,
            isolation="process",
            runtime_host="0.0.0.0",
        )
    )
    assert argv[argv.index("--node-config") + 1] == (
        f'hospital="hospital-1" data-path="{tmp_path}"'
    )
    assert argv[argv.index("--isolation") + 1] == "process"
    assert "--insecure" not in argv
    assert argv[1:5] == ["-m", "federimed.hospital.supernode", "--idle-poll-seconds", "1.0"]


def test_the_idle_poll_setting_is_bounded():
    with pytest.raises(ValueError, match="idle_poll_seconds"):
        SuperNodeSettings(name="h", private_key="k", data_path=".", idle_poll_seconds=0)


def test_missing_files_are_named_by_their_variable(tmp_path):
    with pytest.raises(DeploymentError, match=r"FEDERIMED_SUPERLINK_CA_CERT=.*file not found"):
        superlink_argv(SuperLinkSettings(ca_cert=tmp_path / "nope.crt"))
    with pytest.raises(DeploymentError, match="FEDERIMED_SUPEREXEC_CA_CERT"):
        superexec_argv(SuperExecSettings(runtime_api="x:9094", ca_cert=tmp_path / "nope"))
    assert superexec_argv(SuperExecSettings(runtime_api="x:9094"))[-1] == "--insecure"


def test_cli_reports_bad_environment_plainly(monkeypatch, capsys):
    monkeypatch.setenv("FEDERIMED_NODE_NAME", "Bad Name!")
    monkeypatch.setenv("FEDERIMED_NODE_RUNTIME_PORT", "99999")
    assert main(["supernode"]) == 2
    err = capsys.readouterr().err
    assert "FEDERIMED_NODE_NAME" in err
    assert "FEDERIMED_NODE_RUNTIME_PORT" in err
    assert "FEDERIMED_NODE_PRIVATE_KEY" in err  # required and missing
    assert "Traceback" not in err


def test_flwr_run_bundles_a_staged_copy_into_the_approved_bundle(tmp_path):
    """`flwr run` gets only the bundle's files (not the checkout's virtualenv and outputs),
    and Flower's own builder makes the very bundle the hospitals approved from them."""
    app = find_app_dir()
    staged = stage_app(app, tmp_path / "staged")
    assert hashlib.sha256(build_fab_from_disk(staged)).hexdigest() == app_hash(app)
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "server_app/server_app.py" in copied and "pyproject.toml" in copied
    assert not [name for name in copied if name.startswith((".venv/", "runs/", "wheelhouse/"))]
