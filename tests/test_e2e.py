"""A real SuperLink and real SuperNodes on loopback: TLS, node authentication, the full run.

The model is the real pretrained MiniLM with short sequences and few steps: a tiny random BERT
only learns the label prior, which on non-IID hospitals makes the global model worse, so it
cannot show that federating helps. Everything else is what a hospital deployment runs.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import uuid

import pytest
from conftest import plant_marker

from federimed.demo import find_app_dir
from federimed.deploy.certs import ensure_certs, node_key_path
from federimed.deploy.flower import flower_env, supernode_argv
from federimed.deploy.local import LocalFederation, free_port
from federimed.deploy.processes import ProcessGroup

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
MARKER = f"MARKER-{uuid.uuid4().hex}"
ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory, synth_data):
    root = tmp_path_factory.mktemp("federation")
    data = root / "data"
    shutil.copytree(synth_data, data)
    plant_marker(data / "hospital-1", MARKER)
    certs = root / "certs"
    ensure_certs(certs, [*HOSPITALS, "intruder"])
    local = LocalFederation(
        workdir=root,
        certs=certs,
        hospitals={h: data / h for h in HOSPITALS},
        port=free_port(),
        client_threads=1,
    )
    local.env = {**flower_env(), "FLWR_HOME": str(local.flwr_home)}
    with ProcessGroup(root / "logs") as group:
        local.start_superlink(group)
        local.enroll_nodes()
        local.start_supernodes(group)
        local.wait_for_nodes(group)
        yield local, group, data


@pytest.fixture(scope="module")
def finished_run(federation):
    local, group, data = federation
    output = local.workdir / "runs"
    run_id = local.submit(
        find_app_dir(None),
        {
            "model": "minilm",
            "num-server-rounds": ROUNDS,
            "local-steps": 10,
            "min-nodes": 3,
            "max-length": 64,
            "test-path": str(data / "test.jsonl"),
            "output-dir": str(output),
            "audit-messages": True,
            "fraction-evaluate": 1.0,
        },
    )
    metrics_file = output / str(run_id) / "metrics.json"
    status = local.wait_for_run(run_id, group, timeout=900, done=metrics_file.exists)
    return run_id, status, output / str(run_id)


def test_federation_with_tls_and_node_auth_completes_and_saves_a_model(finished_run):
    _, status, out = finished_run
    assert status["status"] == "finished:completed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["rounds"]) == [str(r) for r in range(1, ROUNDS + 1)]
    for entry in metrics["rounds"].values():
        assert sorted(entry["train"]) == HOSPITALS
        assert sorted(entry["evaluate"]) == HOSPITALS
    assert (out / "final" / "config.json").is_file()
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / f"round-{ROUNDS}" / "adapter_model.safetensors").is_file()


def test_global_model_improves_over_rounds(finished_run):
    _, _, out = finished_run
    server = json.loads((out / "metrics.json").read_text())["server_evaluation"]
    first, last = server["0"], server[str(ROUNDS)]
    assert last["loss"] < first["loss"] - 0.2
    assert last["accuracy"] > first["accuracy"] + 0.1


def test_no_training_text_reaches_the_server(finished_run, federation):
    """Every reply the server received, byte for byte, and the SuperLink's whole state."""
    local, _, _ = federation
    _, _, out = finished_run
    replies = sorted((out / "audit").glob("*.bin"))
    from_marked = [p for p in replies if "hospital-1" in p.name]
    assert len(from_marked) == 2 * ROUNDS  # a train and an evaluate reply each round
    for path in replies:
        assert MARKER.encode() not in path.read_bytes(), path
    state = local.workdir / "state" / "superlink.db"
    with sqlite3.connect(state) as db:
        dump = "\n".join(db.iterdump())
    assert "INSERT INTO" in dump  # the SuperLink really persisted this federation's state
    assert MARKER not in dump
    for path in state.parent.iterdir():
        assert MARKER.encode() not in path.read_bytes(), path


def _start_node(local, group, name, key_owner, ca_cert, data, extra=()):
    settings = local.node_settings(name, data, free_port())
    settings = settings.model_copy(
        update={
            "private_key": node_key_path(local.certs, key_owner),
            "ca_cert": ca_cert,
        }
    )
    argv = [*supernode_argv(settings), "--max-retries", "2", "--max-wait-time", "20", *extra]
    return group.start(f"rogue-{name}", argv, local.env)


def _outcome(member, seconds: float = 60) -> tuple[int | None, str]:
    try:
        code = member.process.wait(seconds)
    except subprocess.TimeoutExpired:
        code = None
    return code, member.log.read_text(errors="replace")


def _online_count(local) -> int:
    from federimed.deploy.flower import run_flwr

    out = run_flwr(["supernode", "list", "federimed-local", "--format", "json"], local.flwr_home)
    return sum(n.get("status") == "online" for n in json.loads(out)["nodes"])


def test_unenrolled_supernode_is_refused(federation):
    local, group, data = federation
    member = _start_node(
        local, group, "intruder", "intruder", local.certs / "ca.crt", data / "hospital-2"
    )
    code, log = _outcome(member)
    assert code not in (None, 0), log
    assert _online_count(local) == len(HOSPITALS)


def test_supernode_that_does_not_trust_the_ca_cannot_connect(federation, tmp_path):
    local, group, data = federation
    other = tmp_path / "other-ca"
    ensure_certs(other, [])
    member = _start_node(
        local, group, "wrong-ca", "hospital-2", other / "ca.crt", data / "hospital-2"
    )
    code, log = _outcome(member)
    assert code not in (None, 0), log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log.lower()


def test_plaintext_supernode_cannot_connect(federation):
    local, group, data = federation
    settings = local.node_settings("hospital-2", data / "hospital-2", free_port())
    argv = supernode_argv(settings)
    ca_index = argv.index("--root-certificates")
    del argv[ca_index : ca_index + 2]
    argv += ["--insecure", "--max-retries", "2", "--max-wait-time", "20"]
    member = group.start("rogue-plaintext", argv, local.env)
    started = time.monotonic()
    code, log = _outcome(member)
    assert code not in (None, 0), log
    assert time.monotonic() - started < 60


def test_submit_stream_exits_nonzero_when_the_run_fails(federation, tmp_path, capsys):
    """`federimed submit --stream` is what compose's one-shot runs: its exit code is the
    run's outcome, so a failed run must not look like success to the operator."""
    from federimed.cli import main

    local, _, _ = federation
    code = main(
        [
            "submit",
            "--superlink",
            local.address,
            "--ca-cert",
            str(local.certs / "ca.crt"),
            "--flwr-home",
            str(tmp_path / "flwr-home"),
            "--stream",
            "--run-config",
            f'test-path="{tmp_path / "missing.jsonl"}" output-dir="{tmp_path}"',
        ]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "ended as finished:failed" in captured.err
