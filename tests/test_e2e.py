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
from pathlib import Path

import psutil
import pytest
from conftest import plant_marker, processes_using

from federimed.cli import main
from federimed.config import find_app_dir
from federimed.deploy.certs import ensure_certs, node_key_path
from federimed.deploy.flower import flower_env, run_flwr, supernode_argv
from federimed.deploy.local import CONNECTION, STATE_FILE, RunningFederation, free_port
from federimed.deploy.processes import ProcessGroup
from federimed.runrecord import read_rounds, read_summary
from federimed.settings import SuperNodeSettings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
MARKER = f"MARKER-{uuid.uuid4().hex}"
ROUNDS = 3
# The app's own default, changed in a copy of the app: the run must use it unasked.
CHANGED_DEFAULT = ("local-steps", 15, 10)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, synth_data):
    """One federation for the module, started and stopped with `federimed up` / `down`."""
    root = tmp_path_factory.mktemp("federation")
    data = root / "data"
    shutil.copytree(synth_data, data)
    plant_marker(data / "hospital-1", MARKER)
    certs = root / "certs"
    ensure_certs(certs, [*HOSPITALS, "intruder"])
    assert main(["up", "--out", str(root), "--data", str(data), "--certs", str(certs)]) == 0
    try:
        with ProcessGroup(root / "logs") as rogues:
            yield RunningFederation.attach(root), rogues, data
    finally:
        if (root / STATE_FILE).exists():
            main(["down", "--out", str(root)])


def _submit(running, *args: str) -> int:
    """`federimed submit --out` as a user runs it; the id of the run it started."""
    before = {run["run_id"] for run in running.status()["runs"]}
    assert main(["submit", "--out", str(running.workdir), *args]) == 0
    (run_id,) = {run["run_id"] for run in running.status()["runs"]} - before
    return run_id


@pytest.fixture(scope="module")
def changed_app(tmp_path_factory):
    """A copy of the app whose pyproject.toml has one default changed."""
    root, app = find_app_dir(), tmp_path_factory.mktemp("app")
    key, old, new = CHANGED_DEFAULT
    pyproject = (root / "pyproject.toml").read_text()
    assert f"\n{key} = {old}\n" in pyproject
    (app / "pyproject.toml").write_text(
        pyproject.replace(f"\n{key} = {old}\n", f"\n{key} = {new}\n")
    )
    for package in ("federimed", "server_app", "client_app"):
        shutil.copytree(root / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


@pytest.fixture(scope="module")
def finished_run(federation, changed_app):
    running, _, data = federation
    run_config = (
        'model="minilm" max-length=64 audit-messages=true fraction-evaluate=1.0 '
        f'num-server-rounds={ROUNDS} min-nodes=3 test-path="{data / "test.jsonl"}"'
    )
    run_id = _submit(running, "--app", str(changed_app), "--run-config", run_config)
    run_out = running.workdir / "flower" / str(run_id)
    status = running.wait_for_run(run_id, timeout=900, done=(run_out / "summary.json").exists)
    return run_id, status, run_out


def test_up_status_reports_every_process_and_the_run(federation, finished_run, capsys):
    running, _, _ = federation
    run_id, _, _ = finished_run
    assert main(["status", "--out", str(running.workdir), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    roles = sorted((p["role"], p["hospital"] or "") for p in report["processes"])
    assert roles == [("superlink", ""), *[("supernode", h) for h in HOSPITALS]]
    assert all(p["alive"] and p["pid"] > 0 and p["address"] for p in report["processes"])
    assert report["tls"] is True and report["node_auth"] is True
    (entry,) = [r for r in report["runs"] if r["run_id"] == run_id]
    assert entry["status"] == "finished:completed" and entry["rounds_completed"] == ROUNDS


def test_federation_with_tls_and_node_auth_completes_and_saves_a_model(finished_run):
    _, status, out = finished_run
    assert status["status"] == "finished:completed"
    rounds = read_rounds(out)
    assert [r.round for r in rounds] == list(range(1, ROUNDS + 1))
    for record in rounds:
        assert record.participants == HOSPITALS and record.dropped == []
        assert sorted(record.evaluate) == HOSPITALS
        assert all(t.bytes_up > 0 and t.bytes_down > 0 for t in record.traffic.values())
    assert (out / "final" / "config.json").is_file()
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / f"round-{ROUNDS}" / "adapter_model.safetensors").is_file()


def test_a_default_changed_in_pyproject_reaches_the_run(finished_run):
    """Nothing but the app's own table said local-steps=10: the run used it."""
    _, _, out = finished_run
    key, _, new = CHANGED_DEFAULT
    assert read_summary(out).run_config[key] == new


def test_global_model_improves_over_rounds(finished_run):
    _, _, out = finished_run
    summary = read_summary(out)
    first, last = summary.initial_test, summary.final_test
    assert last.loss < first.loss - 0.2
    assert last.accuracy > first.accuracy + 0.1
    assert read_rounds(out)[-1].test == last


def test_no_training_text_reaches_the_server(finished_run, federation):
    """Every reply the server received, byte for byte, and the SuperLink's whole state."""
    running, _, _ = federation
    _, _, out = finished_run
    replies = sorted((out / "audit").glob("*.bin"))
    from_marked = [p for p in replies if "hospital-1" in p.name]
    assert len(from_marked) == 2 * ROUNDS  # a train and an evaluate reply each round
    for path in replies:
        assert MARKER.encode() not in path.read_bytes(), path
    state = running.workdir / "state" / "superlink.db"
    with sqlite3.connect(state) as db:
        dump = "\n".join(db.iterdump())
    assert "INSERT INTO" in dump  # the SuperLink really persisted this federation's state
    assert MARKER not in dump
    for path in state.parent.iterdir():
        assert MARKER.encode() not in path.read_bytes(), path


def _serverapp_processes(running) -> list[psutil.Process]:
    link = psutil.Process(running.state.processes[0].pid)
    return [
        p
        for p in link.children(recursive=True)
        if any(Path(arg).name == "flwr-serverapp" for arg in p.cmdline()[:2])
    ]


def test_rounds_are_recorded_as_they_end_and_survive_a_serverapp_crash(
    federation, finished_run, tiny_model
):
    """Round 1's line is on disk while the run goes on; SIGKILL the ServerApp: it stays."""
    running, _, data = federation
    run_config = (
        f'model="{tiny_model}" max-length=32 local-steps=2 num-server-rounds=50 min-nodes=3 '
        f'test-path="{data / "test.jsonl"}"'
    )
    run_id = _submit(running, "--run-config", run_config)
    run_out = running.workdir / "flower" / str(run_id)
    deadline = time.monotonic() + 300
    while not read_rounds(run_out) and time.monotonic() < deadline:
        running.check_alive()
        time.sleep(0.5)
    assert read_rounds(run_out), "no round was recorded in 300 s"
    servers = _serverapp_processes(running)
    assert servers, "the run's ServerApp process was not found"
    for process in servers:
        process.kill()
    psutil.wait_procs(servers, timeout=10)
    rounds = read_rounds(run_out)
    assert rounds[0].round == 1 and rounds[0].participants == HOSPITALS
    assert len(rounds) < 50 and read_summary(run_out) is None
    run_flwr(["stop", str(run_id), CONNECTION], running.flwr_home)


def _node_settings(running, name, key_owner, ca_cert, data) -> SuperNodeSettings:
    certs = running.workdir / "certs"
    return SuperNodeSettings(
        name=name,
        superlink=running.address,
        ca_cert=ca_cert or certs / "ca.crt",
        private_key=node_key_path(certs, key_owner),
        data_path=data,
        runtime_port=free_port(),
    )


def _start_node(running, rogues, settings):
    argv = [*supernode_argv(settings), "--max-retries", "2", "--max-wait-time", "20"]
    return rogues.start(f"rogue-{settings.name}", argv, flower_env())


def _outcome(member, seconds: float = 60) -> tuple[int | None, str]:
    try:
        code = member.process.wait(seconds)
    except subprocess.TimeoutExpired:
        code = None
    return code, member.log.read_text(errors="replace")


def _online_count(running) -> int:
    out = run_flwr(["supernode", "list", CONNECTION, "--format", "json"], running.flwr_home)
    return sum(n.get("status") == "online" for n in json.loads(out)["nodes"])


def test_unenrolled_supernode_is_refused(federation):
    running, rogues, data = federation
    settings = _node_settings(running, "intruder", "intruder", None, data / "hospital-2")
    code, log = _outcome(_start_node(running, rogues, settings))
    assert code not in (None, 0), log
    assert _online_count(running) == len(HOSPITALS)


def test_supernode_that_does_not_trust_the_ca_cannot_connect(federation, tmp_path):
    running, rogues, data = federation
    other = tmp_path / "other-ca"
    ensure_certs(other, [])
    settings = _node_settings(
        running, "wrong-ca", "hospital-2", other / "ca.crt", data / "hospital-2"
    )
    code, log = _outcome(_start_node(running, rogues, settings))
    assert code not in (None, 0), log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log.lower()


def test_plaintext_supernode_cannot_connect(federation):
    running, rogues, data = federation
    settings = _node_settings(running, "plaintext", "hospital-2", None, data / "hospital-2")
    argv = supernode_argv(settings)
    ca_index = argv.index("--root-certificates")
    del argv[ca_index : ca_index + 2]
    argv += ["--insecure", "--max-retries", "2", "--max-wait-time", "20"]
    member = rogues.start("rogue-plaintext", argv, flower_env())
    started = time.monotonic()
    code, log = _outcome(member)
    assert code not in (None, 0), log
    assert time.monotonic() - started < 60


def test_submit_stream_exits_nonzero_when_the_run_fails(federation, tmp_path, capsys):
    """`federimed submit --stream` is what compose's one-shot runs: its exit code is the
    run's outcome, so a failed run must not look like success to the operator."""
    running, _, _ = federation
    code = main(
        [
            "submit",
            "--superlink",
            running.address,
            "--ca-cert",
            running.state.ca_cert,
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


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_down_mid_run_stops_every_process(federation, tiny_model, capsys):
    """Last in this module: `down` while a run is training, then nothing is left."""
    running, _, data = federation
    run_config = (
        f'model="{tiny_model}" max-length=32 local-steps=2 num-server-rounds=50 min-nodes=3 '
        f'test-path="{data / "test.jsonl"}"'
    )
    run_out = running.workdir / "flower" / str(_submit(running, "--run-config", run_config))
    deadline = time.monotonic() + 300
    while not read_rounds(run_out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert read_rounds(run_out), "the run never got going"
    started = [psutil.Process(r.pid) for r in running.state.processes]
    started += [child for p in started for child in p.children(recursive=True)]
    assert len(started) > len(HOSPITALS) + 1  # the run's app processes too
    assert main(["down", "--out", str(running.workdir)]) == 0
    assert _alive(started) == []
    assert processes_using(running.workdir / "certs") == []
    assert not (running.workdir / STATE_FILE).exists()
    capsys.readouterr()
    assert main(["status", "--out", str(running.workdir)]) == 2
    assert "no federation here" in capsys.readouterr().err
