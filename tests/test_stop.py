"""Stopping: Ctrl-C or SIGTERM in any phase stops everything; a killed demo leaves nothing that
breaks the next one; two federations share a machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import processes_using, small_demo_args

from federimed.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAUSE_AT = Path(__file__).with_name("pause_at.py")
# Each phase of `federimed demo`, a function that stands in its middle (N-th call), and the
# signal sent there: Ctrl-C's SIGINT, or SIGTERM as `kill`, systemd and Kubernetes send.
PHASES = {
    "certificates": ("federimed.deploy.local:ensure_certs", signal.SIGINT),
    "enrolment": ("federimed.deploy.local:enroll", signal.SIGTERM),
    "supernode-start": ("federimed.deploy.local:LocalFederation._supernode_argv@2", signal.SIGINT),
    "waiting-for-nodes": ("federimed.deploy.local:RunningFederation.wait_for_nodes", signal.SIGINT),
    "submission": ("federimed.deploy.local:submit_run", signal.SIGINT),
    "training": ("federimed.research.demo:RoundFollower.__call__@3", signal.SIGTERM),
    "baselines": ("federimed.research.compare:Comparison.tuned_local", signal.SIGINT),
}


def _namespaces_of(pid: int) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"fm{pid}-")]


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Lines of ``proc`` until one contains ``marker`` (a reader that cannot hang the test)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {marker!r} within {timeout:.0f}s:\n{''.join(seen)}")


@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_in_any_phase_stops_everything(phase, tmp_path, tiny_model):
    target, sig = PHASES[phase]
    # One round of one step: the later phases are reached sooner, the phases are the same.
    args = small_demo_args(tmp_path, tiny_model, "--rounds", "1", "--local-steps", "1")
    proc = subprocess.Popen(
        [sys.executable, str(PAUSE_AT), target, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _read_until(proc, "PAUSED", timeout=600)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted; all processes were stopped" in output
    assert processes_using(tmp_path) == []
    assert _namespaces_of(proc.pid) == []


def test_a_killed_demo_leaves_nothing_that_breaks_the_next(tmp_path, tiny_model, capsys):
    first = tmp_path / "first"
    proc = subprocess.Popen(
        [sys.executable, "-m", "federimed.cli", *small_demo_args(first, tiny_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _read_until(proc, "submitted Flower run", timeout=600)
    time.sleep(3)  # the ClientApps are training
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    while processes_using(first) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_using(first) == []  # they died with it (parent-death signal)
    stale = _namespaces_of(proc.pid)

    second = tmp_path / "second"
    args = small_demo_args(second, tiny_model, "--no-baselines", "--rounds", "1")
    assert main(args) == 0
    printed = capsys.readouterr().out
    if stale:  # as root, each hospital had its own network namespace
        assert f"removed what an earlier, killed run left behind: fmbr{proc.pid}" in printed
        assert _namespaces_of(proc.pid) == []


def test_two_federations_on_one_machine_both_complete(tmp_path, synth_data, tiny_model):
    outs = [tmp_path / "a", tmp_path / "b"]
    ups = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "federimed.cli",
                "up",
                "--out",
                str(out),
                "--data",
                str(synth_data),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outs
    ]
    try:
        for up in ups:
            output, _ = up.communicate(timeout=300)
            assert up.returncode == 0, output
        run_config = (
            f'model="{tiny_model}" max-length=32 local-steps=2 num-server-rounds=1 min-nodes=3 '
            f'test-path="{synth_data / "test.jsonl"}"'
        )
        submits = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "federimed.cli",
                    "submit",
                    "--out",
                    str(out),
                    "--run-config",
                    run_config,
                    "--stream",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for out in outs
        ]
        for submit in submits:
            output, _ = submit.communicate(timeout=600)
            assert submit.returncode == 0, output[-3000:]
        addresses = {json.loads((out / "federation.json").read_text())["superlink"] for out in outs}
        assert len(addresses) == 2
    finally:
        for out in outs:
            main(["down", "--out", str(out)])
    assert processes_using(tmp_path) == []


def test_down_cleans_up_a_federation_whose_processes_died(tmp_path, synth_data, capsys):
    out = tmp_path / "fed"
    assert main(["up", "--out", str(out), "--data", str(synth_data)]) == 0
    state = json.loads((out / "federation.json").read_text())
    for record in state["processes"]:  # a crash, the OOM killer, a reboot
        os.kill(record["pid"], signal.SIGKILL)
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 1
    assert "NOT RUNNING" in capsys.readouterr().out
    assert main(["down", "--out", str(out)]) == 0
    assert processes_using(tmp_path) == []
    assert not (out / "federation.json").exists()
    netns_left = [r["netns"] for r in state["processes"] if r["netns"]]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [name for name in netns_left if name in listed]
