"""A real SuperLink and real SuperNodes on loopback: TLS, node authentication, the full run.

The model is the real pretrained MiniLM with short sequences and few steps: a tiny random BERT
only learns the label prior, which on non-IID hospitals makes the global model worse, so it
cannot show that federating helps. Everything else is what a hospital deployment runs.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import plant_marker, processes_using, wire_bytes

from federimed.cli import main
from federimed.config import find_app_dir
from federimed.data.records import load_flashcards
from federimed.deploy.certs import ensure_certs, node_key_path
from federimed.deploy.flower import (
    app_hash,
    flower_env,
    run_flwr,
    submit_run,
    supernode_argv,
    write_flwr_home,
)
from federimed.deploy.local import CONNECTION, STATE_FILE, RunningFederation, free_port
from federimed.deploy.processes import ProcessGroup
from federimed.hospital.ledger import entries
from federimed.runrecord import Scores, read_rounds, read_summary
from federimed.settings import SuperNodeSettings
from federimed.tracks.generative.task import OUTPUTS_FILE, Outputs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
MARKER = f"MARKER-{uuid.uuid4().hex}"
ROUNDS = 3
REPO = Path(__file__).resolve().parents[1]
# Screenshots of the web app's pages (test artifacts; the README's come from here).
WEB_ARTIFACTS = REPO / "runs" / "webapp-test"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
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
    """A copy of the app whose pyproject.toml has one default changed, and whose own
    ``federimed/tracks/classify/task.py`` leaves a mark when a ClientApp imports it: what a
    hospital approves by hash must be the code that runs there, not the hospital's installed copy
    of it."""
    root, app = find_app_dir(), tmp_path_factory.mktemp("app")
    key, old, new = CHANGED_DEFAULT
    pyproject = (root / "pyproject.toml").read_text()
    assert f"\n{key} = {old}\n" in pyproject
    (app / "pyproject.toml").write_text(
        pyproject.replace(f"\n{key} = {old}\n", f"\n{key} = {new}\n")
    )
    for package in ("federimed", "server_app", "client_app"):
        shutil.copytree(root / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (app / "federimed" / "tracks" / "classify" / "task.py").open("a") as task:
        task.write(BUNDLE_MARK.format(marks=str(tmp_path_factory.mktemp("bundle-marks"))))
    return app


# Appended to the bundle's copy of federimed/tracks/classify/task.py (changed_app).
BUNDLE_MARK = """
if "clientapp" in " ".join(__import__("sys").argv):
    __import__("pathlib").Path({marks!r}, str(__import__("os").getpid())).touch()
"""


def _approve(running, app: Path, hospitals=HOSPITALS) -> str:
    """What each hospital's IT does after reviewing a bundle: approve its hash."""
    digest = app_hash(app)
    for hospital in hospitals:
        policy = running.state.site_policies[hospital]
        assert main(["approve", "--policy", policy, digest, "--note", "reviewed"]) == 0
    return digest


@pytest.fixture(scope="module")
def finished_run(federation, changed_app):
    running, _, data = federation
    _approve(running, changed_app)
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
    assert roles == sorted(
        [
            ("superlink", ""),
            ("gateway", ""),
            *[("supernode", h) for h in HOSPITALS],
            *[("clientapp", h) for h in HOSPITALS],
        ]
    )
    assert report["gateway"] != report["superlink"]
    assert sorted(report["site_policies"]) == HOSPITALS
    assert all(p["alive"] and p["pid"] > 0 and p["address"] for p in report["processes"])
    assert report["tls"] is True and report["node_auth"] is True
    (entry,) = [r for r in report["runs"] if r["run_id"] == run_id]
    assert entry["status"] == "finished:completed" and entry["rounds_completed"] == ROUNDS


def test_each_hospital_has_a_runtime_secret_of_its_own(federation):
    """A SuperNode and its ClientApp runner share a Runtime API secret that no other hospital
    holds (one hospital's runner cannot take another's tasks); only the guard's process holds
    the site policy."""
    running, _, _ = federation
    records = {(r.role, r.hospital): r for r in running.state.processes}
    secrets = set()
    for hospital in HOSPITALS:
        runner = records[("clientapp", hospital)]
        path = Path(runner.env["FEDERIMED_SUPEREXEC_AUTH_SECRET"])
        assert path.stat().st_mode & 0o777 == 0o600
        assert str(path) in records[("supernode", hospital)].argv
        secrets.add(path.read_bytes())
        assert "FEDERIMED_SITE_POLICY" not in runner.env
        assert records[("supernode", hospital)].env["FEDERIMED_SITE_POLICY"]
    assert len(secrets) == len(HOSPITALS)


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


def test_the_bundles_own_modules_run_at_the_hospitals(finished_run, changed_app):
    """Every ClientApp task imported the approved bundle's federimed/tracks/classify/task.py (one
    mark per task process: a train and an evaluate task per hospital and round)."""
    text = (changed_app / "federimed" / "tracks" / "classify" / "task.py").read_text()
    marks = Path(re.search(r"Path\('([^']+)'", text).group(1))
    assert len(list(marks.iterdir())) == 2 * ROUNDS * len(HOSPITALS)


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
    for path in state.parent.rglob("*"):  # SuperLink, gateway and runner state
        assert not path.is_file() or MARKER.encode() not in path.read_bytes(), path


def _serverapp_processes(running) -> list[psutil.Process]:
    link = psutil.Process(running.state.processes[0].pid)
    return [
        p
        for p in link.children(recursive=True)
        if any(Path(arg).name == "flwr-serverapp" for arg in p.cmdline()[:2])
    ]


def _final_adapter(run_out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_out / "final" / "adapter" / "adapter_model.safetensors")


def test_a_crashed_serverapp_loses_no_round_and_resume_matches_an_uninterrupted_run(
    federation, finished_run, tiny_model
):
    """Round 1's line is on disk while the run goes on; SIGKILL the ServerApp: it stays.

    `submit --resume` then finishes the rounds left from the last checkpoint, and ends where
    an uninterrupted run with the same seeds ends: adapter weights within 1e-5 (the only
    difference is the order in which three float32 updates are summed).
    """
    running, _, data = federation
    run_config = (
        f'model="{tiny_model}" max-length=32 local-steps=2 num-server-rounds=3 min-nodes=3 '
        f'test-path="{data / "test.jsonl"}"'
    )
    run_id = _submit(running, "--run-config", run_config)
    run_out = running.workdir / "flower" / str(run_id)
    deadline = time.monotonic() + 300
    while not read_rounds(run_out) and time.monotonic() < deadline:
        running.check_alive()
        time.sleep(0.2)
    assert read_rounds(run_out), "no round was recorded in 300 s"
    servers = _serverapp_processes(running)
    assert servers, "the run's ServerApp process was not found"
    for process in servers:
        process.kill()
    psutil.wait_procs(servers, timeout=10)
    rounds = read_rounds(run_out)
    assert rounds[0].round == 1 and rounds[0].participants == HOSPITALS
    assert len(rounds) < 3 and read_summary(run_out) is None
    run_flwr(["stop", str(run_id), CONNECTION], running.flwr_home)

    resumed_id = _submit(running, "--run-config", run_config, "--resume", str(run_id))
    resumed = running.workdir / "flower" / str(resumed_id)
    running.wait_for_run(resumed_id, timeout=600, done=(resumed / "summary.json").exists)
    whole_id = _submit(running, "--run-config", run_config)
    whole = running.workdir / "flower" / str(whole_id)
    running.wait_for_run(whole_id, timeout=600, done=(whole / "summary.json").exists)

    summary = read_summary(resumed)
    assert summary.resumed_from == str(run_id) and summary.rounds_completed == 3
    assert [r.round for r in read_rounds(resumed)] == [1, 2, 3]
    assert read_rounds(resumed)[: len(rounds)] == rounds  # the dead run's rounds, as they were
    assert summary.initial_test == read_summary(whole).initial_test
    expected, got = _final_adapter(whole), _final_adapter(resumed)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"resumed run differs from the uninterrupted one by {worst}"


def _node_settings(running, name, key_owner, ca_cert, data) -> SuperNodeSettings:
    certs = running.workdir / "certs"
    return SuperNodeSettings(
        name=name,
        superlink=running.state.gateway,  # what hospitals are given
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


# --- what each hospital controls --------------------------------------------------------------

PLANTED = f"PATIENT-{uuid.uuid4().hex[:8]}"
# A hostile ClientApp: each mode is one way an approved app could try to get a record out.
PROBE_CLIENT = """
import os
from pathlib import Path

# Import-time side effect: proof that this bundle's code ran at a hospital.
Path({markers!r}, f"ran-{{os.getpid()}}").touch()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _patient_record(context):  # what the attack is after: a case in the training file
    path = Path(str(context.node_config["data-path"])) / "train.jsonl"
    return path.read_text().splitlines()[0][-200:]


def _reply(msg, context):
    mode = context.run_config["mode"]
    arrays = msg.content["arrays"]
    metrics = MetricRecord({{"num_examples": 1, "label_histogram_j45": 42}})
    content = {{"arrays": arrays, "metrics": metrics}}
    if mode == "fail":
        raise ValueError("record {planted} has label J45")
    RECORD = _patient_record(context)
    if mode == "config":  # the record's text in a ConfigRecord
        content["leak"] = ConfigRecord({{"note": RECORD}})
    if mode == "floats":  # the record's text as numbers under an allowed metric name
        content["metrics"] = MetricRecord({{"train_loss": [float(b) for b in RECORD.encode()]}})
    if mode == "names":  # the record's text as an array's name
        content["arrays"] = ArrayRecord({{RECORD: next(iter(arrays.values()))}})
    if mode == "patch":  # rebind what an in-process guard would have used, then leak
        import federimed.hospital.ledger, federimed.hospital.policy
        federimed.hospital.ledger.append = lambda *a, **k: None
        federimed.hospital.policy.SitePolicy.split_metrics = lambda self, m: (dict(m), [])
        content["node"] = ConfigRecord({{"hospital": RECORD}})
    Path({markers!r}, str(context.node_config["hospital"])).touch()
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg, context):
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg, context):
    return _reply(msg, context)
"""
PROBE_SERVER = """
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < {hospitals} and time.monotonic() < deadline:
        time.sleep(1)
    tasks = [
        Message(
            RecordDict(
                {{
                    "config": ConfigRecord({{"server-round": 1}}),
                    "arrays": ArrayRecord({{"w": Array(np.zeros(4, dtype=np.float32))}}),
                }}
            ),
            dst_node_id=node,
            message_type=context.run_config["kind"],
        )
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(tasks, timeout=120)
    out = [
        {{
            "error": reply.error.reason if reply.has_error() else None,
            "metrics": None if reply.has_error() else dict(reply.content["metrics"]),
            "records": [] if reply.has_error() else sorted(reply.content.keys()),
            "text": "" if reply.has_error() else repr(dict(reply.content.items())),
        }}
        for reply in replies
    ]
    Path(context.run_config["out"]).write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe_app(tmp_path_factory):
    """A small foreign app bundle: its ClientApp leaves a marker the moment it is imported."""
    app = tmp_path_factory.mktemp("probe-app")
    markers = tmp_path_factory.mktemp("markers")
    (app / "probe").mkdir()
    (app / "probe" / "__init__.py").write_text("")
    (app / "probe" / "client.py").write_text(
        PROBE_CLIENT.format(markers=str(markers), planted=PLANTED)
    )
    (app / "probe" / "server.py").write_text(PROBE_SERVER.format(hospitals=len(HOSPITALS)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "probe"\nversion = "1.0.0"\ndependencies = ["flwr"]\n'
        '[tool.flwr.app]\npublisher = "federimed-tests"\n'
        '[tool.flwr.app.components]\nserverapp = "probe.server:app"\n'
        'clientapp = "probe.client:app"\n'
        '[tool.flwr.app.config]\nmode = "ok"\nout = ""\nkind = "train"\n'
        "batch-size = 16\nlocal-steps = 15\n"
    )
    return app, markers


def _probe(running, app: Path, out: Path, mode: str, kind: str = "train") -> list[dict]:
    """One probe run; the replies its ServerApp received."""
    run_config = f'mode="{mode}" out="{out}" kind="{kind}"'
    run_id = submit_run(running.flwr_home, CONNECTION, app, run_config)
    status = running.wait_for_run(run_id, timeout=300, done=out.exists)
    assert status["status"] == "finished:completed", status
    return json.loads(out.read_text())


def _runner_log(running, hospital: str) -> str:
    return (running.workdir / "logs" / f"clientapp-{hospital}.log").read_text(errors="replace")


def test_hospitals_reach_the_fleet_api_and_nothing_else(federation, probe_app, tmp_path):
    """From a hospital's network namespace: the gateway refuses Control (flwr ls, flwr run),
    the SuperLink is unreachable; the consortium side works; the nodes train through it."""
    running, _, _ = federation
    assert running.state.network == "network namespaces"
    namespace = next(p.netns for p in running.state.processes if p.role == "supernode")
    ca = Path(running.state.ca_cert)
    host, _ = running.state.gateway.split(":")
    _, link_port = running.address.split(":")
    targets = {
        "gateway": running.state.gateway,
        "superlink": running.address,  # loopback: the hospital's own, not the consortium's
        "superlink-on-bridge": f"{host}:{link_port}",
    }
    for name, address in targets.items():
        home = tmp_path / name
        write_flwr_home(home, name, address, ca)
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for command in (["ls", name], ["run", str(probe_app[0]), name]):
            done = subprocess.run(
                ["ip", "netns", "exec", namespace, "flwr", *command, "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            reply = json.loads(done.stdout)
            assert reply["success"] is False, (name, command, reply)
            expected = "403 Forbidden" if name == "gateway" else "unavailable"
            assert expected in reply["error-message"], (name, command, reply)
    assert isinstance(running.runs(), list)  # the consortium's Control API answers
    assert _online_count(running) == len(HOSPITALS)


def _supernode_log(running, hospital: str) -> str:
    return (running.workdir / "logs" / f"supernode-{hospital}.log").read_text(errors="replace")


def _ledger_path(running, hospital: str) -> Path:
    return Path(running.state.site_policies[hospital]).parent / "egress-ledger.jsonl"


def _ledger_lines(running, hospital: str, digest: str | None = None) -> list[dict]:
    """The hospital's ledger entries (of the bundle ``digest`` only, if given)."""
    lines = [entry for _, entry in entries(_ledger_path(running, hospital))]
    return [e for e in lines if digest is None or e["app_hash"] == digest]


def test_only_bundles_a_hospital_approved_run_on_its_data(federation, probe_app, tmp_path):
    running, _, _ = federation
    app, markers = probe_app
    digest = app_hash(app)
    replies = _probe(running, app, tmp_path / "unapproved.json", "ok")
    assert len(replies) == len(HOSPITALS)
    for hospital in HOSPITALS:
        assert any(f"is not approved by {hospital}" in (r["error"] or "") for r in replies)
        log = _supernode_log(running, hospital)
        assert f"federimed approve --policy {running.state.site_policies[hospital]} {digest}" in log
        refusals = [
            e for _, e in entries(_ledger_path(running, hospital)) if e["app_hash"] == digest
        ]
        assert [e["code"] for e in refusals] == ["APP_NOT_APPROVED"]
    assert list(markers.iterdir()) == []  # not a line of the bundle ran anywhere

    _approve(running, app, ["hospital-1"])
    replies = _probe(running, app, tmp_path / "approved.json", "ok")
    (answered,) = [r for r in replies if r["error"] is None]
    # The run went on with the hospital that approved; the others still refused.
    assert sorted(r["error"].split("refused by ")[1][:10] for r in replies if r["error"]) == [
        "hospital-2",
        "hospital-3",
    ]
    assert {m.name for m in markers.iterdir() if not m.name.startswith("ran-")} == {"hospital-1"}
    # A metric not on hospital-1's allow-list never reached the server; the guard's own
    # record names the hospital.
    assert answered["metrics"] == {"num_examples": 1}
    assert answered["records"] == ["arrays", "metrics", "node"]

    replies = _probe(running, app, tmp_path / "failing.json", "fail")
    (failed,) = [r for r in replies if "CLIENTAPP_FAILED" in (r["error"] or "")]
    assert PLANTED not in failed["error"] and "J45" not in failed["error"]
    assert PLANTED in _runner_log(running, "hospital-1")  # the details stay at the hospital
    probe_lines = [
        e for _, e in entries(_ledger_path(running, "hospital-1")) if e["app_hash"] == digest
    ]
    assert [e["metrics"] for e in probe_lines if not e["error"]] == [{"num_examples": 1}]
    assert not any(
        PLANTED in json.dumps(e) for _, e in entries(_ledger_path(running, "hospital-1"))
    )


@pytest.mark.parametrize("mode", ["config", "floats", "names", "patch"])
def test_an_approved_app_gets_no_record_out_whatever_it_tries(
    federation, probe_app, tmp_path, mode
):
    """A patient record read from the hospital's training file (it carries the federation's
    MARKER) in a ConfigRecord, as numbers under an allowed metric, as an array's name, or
    after rebinding what an in-process guard would use: the hospital's guard (in its
    SuperNode, another process) refuses the reply, ledgers the refusal with its code, and the
    text reaches neither the ServerApp nor the SuperLink's state."""
    running, _, _ = federation
    app, _ = probe_app
    digest = _approve(running, app, ["hospital-1"])
    replies = _probe(running, app, tmp_path / f"{mode}.json", mode)
    assert not any(MARKER in json.dumps(reply) for reply in replies)
    as_numbers = json.dumps([float(b) for b in MARKER.encode()])[1:-1]
    assert not any(as_numbers in reply["text"] for reply in replies)
    (refused,) = [r for r in replies if "refused by hospital-1" in (r["error"] or "")]
    assert "code REPLY_NOT_ALLOWED" in refused["error"]
    codes = [
        e["code"]
        for _, e in entries(_ledger_path(running, "hospital-1"))
        if e["app_hash"] == digest
    ]
    assert codes[-1] == "REPLY_NOT_ALLOWED"
    with sqlite3.connect(running.workdir / "state" / "superlink.db") as db:
        assert MARKER not in "\n".join(db.iterdump())
    for wal in (running.workdir / "state").glob("superlink.db*"):
        assert MARKER.encode() not in wal.read_bytes(), wal


AGENT_APP = """
import json
from pathlib import Path

from flwr.agentapp import AgentApp

app = AgentApp()


@app.main()
def main(agent, context):
    hospital = context.node_config.get("hospital")
    if hospital:  # proof that this bundle's code ran at a hospital
        Path({markers!r}, f"agent-{{hospital}}").touch()
    tools = {{tool["name"] for tool in agent.grid.tools()}}
    if "get_nodes" not in tools:
        return
    call = {{"name": "get_nodes", "call_id": "1", "arguments": {{"sample_size": None}}}}
    nodes = json.loads(agent.grid.call(call)["output"])["nodes"]
    messages = [
        {{"dst_node_id": n["id"], "payload": "hi", "reply_to_message_id": None}} for n in nodes
    ]
    call = {{"name": "push_messages", "call_id": "2", "arguments": {{"messages": messages}}}}
    agent.grid.call(call)
"""
START_AGENT_RUN = """
import sys
from pathlib import Path

from flwr.cli.chat.chat_app import start_chat_run
from flwr.cli.chat.chat_local_agent import build_local_agent
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection

agent = build_local_agent(Path(sys.argv[2]))
client = init_http_client_from_connection(read_superlink_connection(sys.argv[1]))
run_id, _ = start_chat_run(
    client, "hello", None, None, agent.app_spec, agent.fab_hash, agent.fab_content
)
print(run_id)
"""


def test_an_agent_app_bundle_never_runs_at_a_hospital(federation, tmp_path):
    """A bundle whose only component is an AgentApp, started the way `flwr chat` starts one:
    Flower would make its messages AgentApp tasks, which a SuperExec starts as
    `flwr-agentapp` with the data mounted, no hash check.  Each hospital's guard refuses them
    before a task exists (TASK_TYPE_REFUSED, ledgered); no hospital ran a line of it."""
    running, _, _ = federation
    app, markers = tmp_path / "agent-app", tmp_path / "markers"
    (app / "agent").mkdir(parents=True)
    markers.mkdir()
    (app / "agent" / "__init__.py").write_text("")
    (app / "agent" / "main.py").write_text(AGENT_APP.format(markers=str(markers)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "agent"\nversion = "1.0.0"\ndependencies = ["flwr"]\n'
        '[tool.flwr.app]\npublisher = "federimed-tests"\n'
        '[tool.flwr.app.components]\nagentapp = "agent.main:app"\n'
    )
    digest = _approve(running, app)  # even approved: only ClientApp tasks run at a hospital
    started = subprocess.run(
        [sys.executable, "-c", START_AGENT_RUN, CONNECTION, str(app)],
        env={**flower_env(), "FLWR_HOME": str(running.flwr_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]

    def refused_everywhere() -> bool:
        codes = [
            [e["code"] for e in _ledger_lines(running, h, digest) if e["code"]] for h in HOSPITALS
        ]
        return all(codes)

    deadline = time.monotonic() + 180
    while not refused_everywhere():
        assert time.monotonic() < deadline, "no refusal of the agent run at every hospital"
        time.sleep(1)
    for hospital in HOSPITALS:
        assert {e["code"] for e in _ledger_lines(running, hospital, digest)} == {
            "TASK_TYPE_REFUSED"
        }
    assert list(markers.iterdir()) == []


def test_a_revoked_bundle_never_runs_again(federation, probe_app, tmp_path):
    """Approved, run, then revoked: the next run of the same bytes is refused before a task
    exists (each task installs into a fresh folder, so nothing installed earlier is reused)."""
    running, _, _ = federation
    app, markers = probe_app
    digest = _approve(running, app, ["hospital-1"])
    assert [r for r in _probe(running, app, tmp_path / "before.json", "ok") if not r["error"]]
    policy = Path(running.state.site_policies["hospital-1"])
    text = policy.read_text()
    kept = yaml.safe_load(text)
    kept["approved_apps"] = [a for a in kept["approved_apps"] if a["sha256"] != digest]
    policy.write_text(yaml.safe_dump(kept, sort_keys=False))
    ran_before = set(markers.iterdir())
    try:
        replies = _probe(running, app, tmp_path / "after.json", "ok")
    finally:
        policy.write_text(text)
    assert all("APP_NOT_APPROVED" in r["error"] for r in replies)
    assert set(markers.iterdir()) == ran_before


def test_evaluate_needs_validation_data(federation, probe_app, tmp_path):
    """An evaluation is scored on validation cases only: a hospital without them refuses the
    task before the app runs (never falls back to its training cases)."""
    running, _, data = federation
    app, _ = probe_app
    _approve(running, app, ["hospital-1"])
    validation = data / "hospital-1" / "validation.jsonl"
    aside = validation.with_suffix(".aside")
    validation.rename(aside)
    try:
        replies = _probe(running, app, tmp_path / "evaluate.json", "ok", kind="evaluate")
    finally:
        aside.rename(validation)
    (refused,) = [r for r in replies if "refused by hospital-1" in (r["error"] or "")]
    assert "code NO_VALIDATION_DATA" in refused["error"]


def _submit_below_the_floor(running, tiny_model: str) -> tuple[int, dict]:
    """A run every hospital refuses (batch-size 2 under the sites' floor of 4): its id and
    final status, once the server has given up on it."""
    run_config = (
        f'model="{tiny_model}" max-length=32 batch-size=2 local-steps=2 num-server-rounds=2 '
        "min-nodes=3"
    )
    run_id = _submit(running, "--run-config", run_config)
    log = running.workdir / "logs" / f"run-{run_id}.log"

    def refused() -> bool:
        return log.exists() and "no hospital trained" in log.read_text(errors="replace")

    return run_id, running.wait_for_run(run_id, timeout=300, done=refused)


def test_a_run_with_dp_sgd_completes_and_each_hospital_accounts_its_epsilon(
    federation, tiny_model, capsys
):
    """Record-level DP-SGD on the real federation: the run completes; each hospital's guard
    ledgers ε per training reply (summing to what `privacy show` prints), holds back the
    training loss, and tells the server its ε, which the round records carry."""
    running, _, data = federation
    run_config = (
        f'model="{tiny_model}" max-length=32 local-steps=4 num-server-rounds=2 min-nodes=3 '
        f'dp-noise-multiplier=1.0 dp-max-grad-norm=1.0 test-path="{data / "test.jsonl"}"'
    )
    run_id = _submit(running, "--run-config", run_config)
    run_out = running.workdir / "flower" / str(run_id)
    running.wait_for_run(run_id, timeout=600, done=(run_out / "summary.json").exists)
    rounds = read_rounds(run_out)
    assert [r.round for r in rounds] == [1, 2]
    assert all(set(r.epsilon) == set(HOSPITALS) for r in rounds)
    assert all("train_loss" not in r.train[h] for r in rounds for h in HOSPITALS)
    for hospital in HOSPITALS:
        mine = [e for e in _ledger_lines(running, hospital) if e["run_id"] == run_id]
        spent = [e["epsilon"] for e in mine if e["kind"] == "train"]
        assert len(spent) == 2 and all(e > 0 for e in spent)
        assert sum(spent) == pytest.approx(rounds[-1].epsilon[hospital])
        assert main(["privacy", "show", "--policy", running.state.site_policies[hospital]]) == 0
        shown = capsys.readouterr().out
        assert f"run {run_id}: ε {sum(spent):.3f}; no budget set" in shown


def test_a_run_below_a_hospital_floor_is_refused_naming_the_rule(federation, tiny_model):
    running, _, _ = federation
    run_id, status = _submit_below_the_floor(running, tiny_model)
    assert status["status"] == "finished:failed"
    text = (running.workdir / "logs" / f"run-{run_id}.log").read_text(errors="replace")
    for hospital in HOSPITALS:
        assert f"refused by {hospital}, code POLICY_FLOOR" in text
    assert "batch-size=2 is below the site policy's floor floors.batch_size=4" in text
    assert "batch-size=2" in _supernode_log(running, "hospital-2")


def test_the_generative_track_trains_a_causal_lm_on_the_same_federation(
    federation, tiny_gpt2, tmp_path
):
    """The generative track on the same deployment (TLS, node authentication, each hospital's
    runner and policy): a tiny GPT-2 with the real BPE, two rounds.  The adapter comes back
    and `peft` loads it; the marker planted in every question and answer of hospital-1's
    flashcards reaches neither the server nor the SuperLink's state."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from federimed.learning.model import exchanged_state

    running, _, data = federation
    cards = (data / "test-flashcards.jsonl").read_text().splitlines(keepends=True)
    test = data / "test-flashcards-sample.jsonl"  # both kinds of card, few: the server scores
    test.write_text("".join(cards[:16] + cards[-8:]))  # each round by generating answers
    run_config = (
        f'track="generative" generator="{tiny_gpt2}" max-length=96 max-new-tokens=4 '
        f"local-steps=4 batch-size=4 num-server-rounds=2 min-nodes=3 audit-messages=true "
        f'test-path="{test}"'
    )
    run_id = _submit(running, "--run-config", run_config)
    run_out = running.workdir / "flower" / str(run_id)
    running.wait_for_run(run_id, timeout=600, done=(run_out / "summary.json").exists)
    rounds, summary = read_rounds(run_out), read_summary(run_out)
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.participants == HOSPITALS and not r.errors for r in rounds)
    assert all("val_loss" in r.train["hospital-1"] for r in rounds)
    assert summary.final_test.perplexity > 1 and summary.final_test.exact_match is not None
    assert summary.final_test.accuracy is None
    # round 1, on the way: multiple choice and perplexity; greedy answers after the last only
    assert rounds[0].test.choice_accuracy is not None and rounds[0].test.exact_match is None
    # the last round's answers, kept for the report's per-hospital split, give its scores
    saved = Outputs.load(run_out / "final" / OUTPUTS_FILE, load_flashcards(test))
    assert saved is not None
    assert Scores(**saved.scores(load_flashcards(test))) == summary.final_test
    # the adapter at 8 bits, one array: a step per value, a scale per block, the npy header
    assert summary.update_bytes == wire_bytes(summary.trainable_parameters)

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    adapter = PeftModel.from_pretrained(base, run_out / "final" / "adapter")
    state = exchanged_state(adapter)
    assert state and all("lora_" in name for name in state)

    replies = sorted((run_out / "audit").glob("*.bin"))
    assert len(replies) == 2 * len(HOSPITALS)
    for path in replies:
        assert MARKER.encode() not in path.read_bytes(), path
    with sqlite3.connect(running.workdir / "state" / "superlink.db") as db:
        assert MARKER not in "\n".join(db.iterdump())
    _a_clinician_asks_the_generative_model_in_a_real_browser(running, run_out, tmp_path)


def _a_clinician_asks_the_generative_model_in_a_real_browser(running, run_out, tmp_path):
    """The web app on the run's adapter: Chromium asks for a diagnosis and the answer streams
    into the page, the likeliest of the conditions first; it is the answer the JSON API gives."""
    from federimed.data.records import default_labels

    question = "What is the most likely diagnosis for this patient? 58M crushing chest pain, ST up"
    log = tmp_path / "serve.log"
    with _serving(run_out / "final", running.workdir / "flower", log) as url:
        with _browser_page(url) as page:
            assert "Ask a medical question" in page.inner_text("main")
            page.fill("#question", question)
            page.click("#ask button")
            page.wait_for_selector('#answer[data-done="true"]', timeout=60_000)
            shown = page.inner_text("#answer").strip()
            assert not page.is_visible("#error")
            assert shown.split(" (the likeliest of 32 conditions, ")[0] in default_labels().values()
            page.screenshot(path=str(WEB_ARTIFACTS / "ask.png"), full_page=True)
        request = urllib.request.Request(
            f"{url}/api/ask",
            data=json.dumps({"question": question}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert shown == reply.read().decode().strip()  # greedy: the same answer
    assert question not in log.read_text()


def test_every_reply_of_a_full_run_is_in_each_hospitals_verified_ledger(federation, finished_run):
    running, _, _ = federation
    run_id, _, _ = finished_run
    for hospital in HOSPITALS:
        path = _ledger_path(running, hospital)
        assert main(["ledger", "verify", str(path)]) == 0
        mine = [entry for _, entry in entries(path) if entry["run_id"] == run_id]
        expected = [(r, k) for r in range(1, ROUNDS + 1) for k in ("evaluate", "train")]
        assert sorted((e["round"], e["kind"]) for e in mine) == expected
        for entry in mine:
            assert entry["site"] == hospital and entry["error"] is None
            assert len(entry["app_hash"]) == 64
            assert "num_examples" in entry["metrics"]
        assert all(e["bytes"] > 0 and e["arrays_sha256"] for e in mine if e["kind"] == "train")


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


# ------------------------------------------------------------------------------ the web app


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
        try:
            _get(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s:\n{log.read_text()}")


@contextlib.contextmanager
def _serving(model: Path, runs: Path, log: Path) -> Iterator[str]:
    """`federimed serve` in its own process, as an operator starts it: its URL while it runs.
    Signed in as an operator would set it up: a token from `serve --add-token` (the URL carries
    it as ``.token`` for the browser's login page; urllib sends it to this URL meanwhile), and
    /metrics open for the scraping Prometheus (FEDERIMED_SERVE_METRICS=open)."""
    import os

    port = free_port()
    tokens = log.with_name(f"{log.name}.tokens")
    cli = [sys.executable, "-m", "federimed.cli", "serve", "--tokens", str(tokens)]
    made = subprocess.run([*cli, "--add-token", "e2e"], capture_output=True, text=True, check=True)
    argv = [*cli, "--model", str(model), "--runs", str(runs), "--port", str(port)]
    env = {**os.environ, "FEDERIMED_SERVE_METRICS": "open"}
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = type("SignedInURL", (str,), {})(f"http://127.0.0.1:{port}")
    url.token = made.stdout.strip()

    class Bearer(urllib.request.BaseHandler):
        def http_request(self, request):
            if request.full_url.startswith(url + "/"):
                request.add_unredirected_header("Authorization", f"Bearer {url.token}")
            return request

    previous = urllib.request._opener
    urllib.request.install_opener(urllib.request.build_opener(Bearer()))
    try:
        _wait_until_up(f"{url}/healthz", process, log)
        yield url
    finally:
        urllib.request.install_opener(previous)
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def web(federation, finished_run, tmp_path_factory):
    """`federimed serve` on the full run's final model and the federation's run records."""
    running, _, _ = federation
    _, _, run_out = finished_run
    log = tmp_path_factory.mktemp("web") / "serve.log"
    with _serving(run_out / "final", running.workdir / "flower", log) as url:
        yield url, log


@contextlib.contextmanager
def _browser_page(url: str) -> Iterator[Any]:
    """Debian's Chromium (driven by playwright) showing ``url``/, signed in on the login page
    with the token `_serving` made; closed afterwards."""
    from playwright.sync_api import sync_playwright

    WEB_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url + "/")  # not signed in yet: the login page
            page.fill("#token", url.token)
            page.click("#login button")
            page.wait_for_url(url + "/")
            yield page
        finally:
            browser.close()


def test_a_clinician_gets_diagnoses_from_the_federated_model_in_a_real_browser(web, finished_run):
    """Chromium opens /, a case is typed and submitted, the real model's top 5 appear with
    their bars; the run's page shows one chart point per round.  Screenshots are kept."""
    url, log = web
    run_id, _, _ = finished_run
    case = "72F sudden tearing chest pain radiating to back, BP 190/100 R arm, 150/80 L arm"
    with _browser_page(url) as page:
        assert "not for clinical use" in page.inner_text(".banner")
        assert str(run_id) in page.inner_text(".provenance")
        page.fill("#text", case)
        page.click("#predict button")
        page.wait_for_selector(".prediction", timeout=60_000)
        rows = page.locator(".prediction")
        assert rows.count() == 5
        shown = [rows.nth(i).inner_text() for i in range(5)]
        page.screenshot(path=str(WEB_ARTIFACTS / "clinician.png"), full_page=True)
        page.goto(f"{url}/runs")  # the dashboard: every run of the federation, its state
        listed = page.locator(f'a[href="/runs/{run_id}"]')
        assert listed.count() >= 1
        assert "completed" in page.locator("tr", has=listed.first).inner_text()
        page.screenshot(path=str(WEB_ARTIFACTS / "runs.png"), full_page=True)
        page.goto(f"{url}/runs/{run_id}")
        assert page.locator("svg.chart circle.point").count() == ROUNDS
        assert "completed" in page.inner_text("#run-state")
        page.screenshot(path=str(WEB_ARTIFACTS / "run.png"), full_page=True)
        page.goto(f"{url}/docs")  # the API docs, with the browser offline from any CDN
        assert "POST /api/predict" in page.inner_text("main")
    api = json.loads(_api_predict(url, case))
    top = api["predictions"][0]
    assert top["code"] in shown[0] and f"{100 * top['probability']:.1f}%" in shown[0]
    assert case not in log.read_text()  # the access log names paths, never case text


def _api_predict(url: str, text: str) -> str:
    request = urllib.request.Request(
        f"{url}/api/predict",
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return reply.read().decode()


def test_a_real_prometheus_scrapes_the_federations_metrics(
    federation, web, finished_run, tiny_model, tmp_path
):
    """Debian's Prometheus scrapes the web app's /metrics (the consortium's series, read from
    the run records) and hospital-1's exporter (its series, read from its egress ledger), and
    answers queries for both over its HTTP API."""
    running, _, _ = federation
    url, _ = web
    run_id, _, _ = finished_run
    ledger_path = Path(running.state.site_policies["hospital-1"]).parent / "egress-ledger.jsonl"
    steps = [e.get("steps") for _, e in entries(ledger_path) if e["run_id"] == run_id]
    assert steps.count(CHANGED_DEFAULT[2]) == ROUNDS  # its train replies; evaluate: None
    if not any("code POLICY_FLOOR]" in (e["error"] or "") for _, e in entries(ledger_path)):
        _submit_below_the_floor(running, tiny_model)  # this test run alone: a refusal to count
    refusals = Counter(
        code
        for _, e in entries(ledger_path)
        for code in ("POLICY_FLOOR", "APP_NOT_APPROVED")
        if f"code {code}]" in (e["error"] or "")
    )
    _api_predict(url, "58M crushing central chest pain, ST elevation V1-V4")
    exporter_port = free_port()
    exporter_log = tmp_path / "exporter.log"
    argv = [sys.executable, "-m", "federimed.cli", "exporter", "--ledger", str(ledger_path),
            "--port", str(exporter_port)]  # fmt: skip
    with exporter_log.open("w") as out:
        exporter = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: consortium\n    static_configs: [{{targets: ['{url[7:]}']}}]\n"
        f"  - job_name: hospital-1\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
    )
    port = free_port()
    argv = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/-/ready", process, log)

        def query(expression: str) -> list[dict]:
            reply = json.loads(_get(api + urllib.parse.quote(expression)))
            assert reply["status"] == "success", reply
            return reply["data"]["result"]

        deadline = time.monotonic() + 60
        while not query(f'federimed_rounds_completed_total{{run="{run_id}"}}'):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert query(f'federimed_rounds_completed_total{{run="{run_id}"}}')[0]["value"][1] == str(
            ROUNDS
        )
        received = query(f'federimed_bytes_received_total{{run="{run_id}"}}')
        assert sorted(r["metric"]["hospital"] for r in received) == HOSPITALS
        assert all(float(r["value"][1]) > 0 for r in received)
        accuracy = query(f'federimed_test_accuracy{{run="{run_id}"}}')
        assert 0 < float(accuracy[0]["value"][1]) <= 1
        assert query(f'federimed_round_participants{{run="{run_id}"}}')[0]["value"][1] == "3"
        assert query(f'federimed_round_dropped{{run="{run_id}"}}')[0]["value"][1] == "0"
        assert (
            float(query(f'federimed_round_duration_seconds{{run="{run_id}"}}')[0]["value"][1]) > 0
        )
        assert float(query(f'federimed_test_loss{{run="{run_id}"}}')[0]["value"][1]) > 0
        rejected = query(f'federimed_updates_rejected_total{{run="{run_id}"}}')
        assert rejected[0]["value"][1] == "0"
        ok = 'route="/api/predict",method="POST",status="200"'
        assert float(query(f"federimed_http_requests_total{{{ok}}}")[0]["value"][1]) >= 1
        timed = query('federimed_http_request_seconds_count{route="/api/predict"}')
        assert float(timed[0]["value"][1]) >= 1
        assert query('up{job="consortium"}')[0]["value"][1] == "1"
        while not query('federimed_site_steps_total{site="hospital-1"}'):
            assert time.monotonic() < deadline + 60, exporter_log.read_text()
            time.sleep(1)
        all_steps = sum(e.get("steps") or 0 for _, e in entries(ledger_path) if not e["error"])
        got = query('federimed_site_steps_total{site="hospital-1"}')[0]["value"][1]
        assert float(got) == all_steps >= ROUNDS * CHANGED_DEFAULT[2]
        assert query('federimed_site_ledger_valid{site="hospital-1"}')[0]["value"][1] == "1"
        sent = query('federimed_site_bytes_sent_total{site="hospital-1"}')[0]["value"][1]
        assert float(sent) > 0
        site = '{site="hospital-1"}'
        assert float(query(f"federimed_site_training_loss{site}")[0]["value"][1]) > 0
        assert float(query(f"federimed_site_examples_used_total{site}")[0]["value"][1]) > 0
        trained = query('federimed_site_replies_total{site="hospital-1",kind="train"}')
        assert float(trained[0]["value"][1]) >= ROUNDS
        # each refusal under its own code, as the runner wrote it in the ledger
        counted = {
            r["metric"]["code"]: int(float(r["value"][1]))
            for r in query(f"federimed_site_refused_total{site}")
        }
        assert refusals["POLICY_FLOOR"] >= 1
        assert {code: counted.get(code, 0) for code in refusals} == dict(refusals)
        # the shipped dashboard: every query evaluates, and names only series that exist
        exported = _series_names(_get(url + "/metrics") + _get(f"http://127.0.0.1:{exporter_port}"))
        for expression in _dashboard_queries():
            query(expression)  # asserts "success": it parses and evaluates
            names = set(re.findall(r"federimed_[a-z0-9_]+", expression))
            assert names <= exported, (expression, sorted(names - exported))
    finally:
        for started in (process, exporter):
            started.terminate()
            started.wait(timeout=30)


def _series_names(exposition: str) -> set[str]:
    """Every series name an exposition declares, with or without samples yet (a generative
    run's scores exist only once there is one)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name} | {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_monitoring_profiles_scrape_config_is_valid():
    checked = subprocess.run(
        ["promtool", "check", "config", str(REPO / "monitoring" / "prometheus.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
