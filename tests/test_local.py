"""The local federation's own logic: why nodes do not join, stale network namespaces."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from federimed.deploy import netns
from federimed.deploy.local import refusal_in_log

# As Flower 1.42 logs them (from real runs of an unenrolled node and a node with another CA).
UNENROLLED = """\
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""
WRONG_CA = """\
ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate signature failure
"""


def test_refusals_are_named_from_the_node_log():
    assert refusal_in_log(UNENROLLED).startswith("enrolment refused")
    assert refusal_in_log(WRONG_CA).startswith("TLS refused")
    assert refusal_in_log("WARNING :   Connection attempt failed, retrying in 0.94 s") is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.e2e
def test_stale_namespaces_are_removed_and_live_ones_kept():
    """Needs root, as the demo's namespaces do (CI runs as root)."""
    dead, live = str(_dead_pid()), str(os.getpid())
    made = {tag: netns.HospitalHosts(tag=tag) for tag in (dead, live)}
    try:
        for hosts in made.values():
            hosts.create()
            hosts.add("hospital-1")
        assert made[dead].subnet != made[live].subnet  # each federation its own /24
        removed = netns.remove_stale()
        assert f"fmbr{dead}" in removed and f"fm{dead}-h1" in removed
        assert not [name for name in removed if live in name]
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"fm{live}-h1" in listed and f"fm{dead}-h1" not in listed
    finally:
        for hosts in made.values():
            hosts.remove()


@pytest.mark.e2e
def test_reachability_is_probed_from_the_hospital_namespace():
    hosts = netns.HospitalHosts()
    try:
        hosts.create()
        hosts.add("hospital-1")
        with socket.socket() as server:
            server.bind((hosts.bridge_address, 0))
            server.listen()
            port = server.getsockname()[1]
            assert hosts.reachable("hospital-1", hosts.bridge_address, port)
        assert not hosts.reachable("hospital-1", hosts.bridge_address, port)
    finally:
        hosts.remove()


def test_a_damaged_federation_record_is_named(tmp_path, capsys):
    from federimed.cli import main

    (tmp_path / "federation.json").write_text('{"workdir": 3')
    assert main(["status", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "federation.json: not a federation record" in err and "Traceback" not in err


def test_restart_names_what_it_cannot_restart(tmp_path):
    from federimed.deploy.flower import DeploymentError
    from federimed.deploy.local import FederationState, ProcessRecord, RunningFederation

    old = ProcessRecord(
        role="superlink", hospital=None, pid=1, started=0.0, netns=None, address="a", log="l"
    )
    state = FederationState(
        workdir=str(tmp_path), superlink="a", gateway="g", ca_cert="c", flwr_home="f",
        tls=True, node_auth=True, network="loopback", bridge=None, hospitals={},
        site_policies={}, test_path=None, processes=[old],
    )  # fmt: skip
    running = RunningFederation(state)
    with pytest.raises(DeploymentError, match="supernode of hospital-9"):
        running.restart("supernode", "hospital-9")
    with pytest.raises(DeploymentError, match="predates `restart`"):
        running.restart("superlink")


def test_a_restarted_supernode_is_started_again_until_the_superlink_lets_it_in(
    tmp_path, monkeypatch, capsys
):
    """A SuperNode killed a moment ago is still online at the SuperLink (up to 60 s), which
    refuses to activate it, and it exits.  `restart` starts it again until it gets in."""
    import sys

    from federimed.deploy import local
    from federimed.deploy.local import FederationState, ProcessRecord, RunningFederation

    monkeypatch.setattr(local, "REACTIVATION_RETRY", 0.1)
    tries = tmp_path / "tries"
    node = (  # refused twice, then in, as a real SuperNode would log it
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]);"
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1));"
        "n < 2 and sys.exit(print('Failed to activate SuperNode.') or 1);"
        "print('SuperNode ID: 7', flush=True); time.sleep(30)"
    )
    old = ProcessRecord(
        role="supernode", hospital="hospital-1", pid=1, started=0.0, netns=None, address="a",
        log=str(tmp_path / "logs" / "supernode-hospital-1.log"),
        argv=[sys.executable, "-c", node, str(tries)],
    )  # fmt: skip
    state = FederationState(
        workdir=str(tmp_path), superlink="a", gateway="g", ca_cert="c", flwr_home="f",
        tls=True, node_auth=True, network="loopback", bridge=None, hospitals={},
        site_policies={}, test_path=None, processes=[old],
    )  # fmt: skip
    record = RunningFederation(state).restart("supernode", "hospital-1")
    try:
        assert tries.read_text() == "xxx"
        assert "still counts its previous SuperNode online" in capsys.readouterr().out
        assert os.kill(record.pid, 0) is None  # the third one runs
    finally:
        os.kill(record.pid, 9)


def test_the_line_a_connected_supernode_logs_is_still_flowers():
    """`wait_for_nodes` asks the SuperLink only once every SuperNode logged this line."""
    import inspect

    from flwr.supernode import start_client_internal

    from federimed.deploy.local import NODE_CONNECTED

    source = inspect.getsource(start_client_internal.start_client_internal)
    assert f'"{NODE_CONNECTED} %s", node_id' in source


def test_without_namespaces_sharing_loopback_must_be_asked_for(monkeypatch):
    """Not root: `auto` refuses, saying what sharing loopback would expose; `off` is the ask."""
    from federimed.deploy.flower import DeploymentError
    from federimed.deploy.local import use_namespaces

    monkeypatch.setattr(netns, "available", lambda: False)
    for choice in ("auto", "on"):
        with pytest.raises(DeploymentError, match=r"Control API included.*--netns off"):
            use_namespaces(choice)
    assert use_namespaces("off") is False
    monkeypatch.setattr(netns, "available", lambda: True)
    assert use_namespaces("auto") is True
