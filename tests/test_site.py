"""What a hospital controls, without processes: its policy, its ledger, its runner's checks.

The same checks against a real federation (a real unapproved bundle, a real refusal, a real
ledger) are in tests/test_e2e.py; these pin the rules and the Flower internals the runner
relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from federimed.cli import main
from federimed.deploy.flower import app_hash
from federimed.hospital import ledger, site_runner
from federimed.hospital.policy import (
    DEFAULT_METRICS,
    PolicyError,
    SiteRefusal,
    approve,
    clip_update,
    load_policy,
    policy_from_env,
)

HASH = "ab" * 32
OTHER = "cd" * 32


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


# --- the policy file --------------------------------------------------------------------------


def test_approve_creates_a_policy_with_safe_defaults_then_adds_once(tmp_path):
    path = tmp_path / "site" / "policy.yaml"
    assert approve(path, HASH, note="reviewed", site="hospital-1") is True
    assert approve(path, HASH) is False
    assert approve(path, OTHER) is True
    policy = load_policy(path)
    assert policy.site == "hospital-1"
    assert [app.sha256 for app in policy.approved_apps] == [HASH, OTHER]
    assert policy.approves(HASH) and not policy.approves("ef" * 32)
    assert policy.metrics_allowed == list(DEFAULT_METRICS)
    assert policy.ledger == path.parent / "egress-ledger.jsonl"


def test_approve_refuses_what_is_not_a_hash_or_a_policy_without_site(tmp_path):
    with pytest.raises(PolicyError, match="64 hex digits"):
        approve(tmp_path / "p.yaml", "not-a-hash", site="h")
    with pytest.raises(PolicyError, match="pass --site"):
        approve(tmp_path / "p.yaml", HASH)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("site: h\nledger: l\nfloors:\n  batch_size: 0\n", "floors.batch_size"),
        ("site: h\nledger: l\nfloor: {}\n", "floor"),
        ("site: h\n", "ledger"),
        ("site: h\nledger: l\napproved_apps:\n  - sha256: nope\n", "approved_apps.0.sha256"),
        ("site: h\nledger: [unclosed\n", "line 2"),
        ("- a list\n", "YAML mapping"),
    ],
)
def test_a_bad_policy_names_the_file_and_the_field(tmp_path, text, named):
    path = _policy(tmp_path, text)
    with pytest.raises(PolicyError, match=r"policy\.yaml") as error:
        load_policy(path)
    assert named in str(error.value)


def test_no_policy_means_nothing_runs(tmp_path):
    with pytest.raises(PolicyError, match="FEDERIMED_SITE_POLICY is not set"):
        policy_from_env({})
    with pytest.raises(PolicyError, match="cannot read"):
        policy_from_env({"FEDERIMED_SITE_POLICY": str(tmp_path / "missing.yaml")})


@pytest.mark.parametrize(
    ("asked", "rule"),
    [
        ((2, 5, 64), "floors.batch_size=8"),
        ((8, 1, 64), "floors.local_steps=3"),
        ((8, 5, 10), "floors.examples_per_update=32"),
    ],
)
def test_floors_refuse_naming_the_rule(tmp_path, asked, rule):
    policy = load_policy(
        _policy(
            tmp_path,
            "site: hospital-2\nledger: l\nfloors:\n  batch_size: 8\n  local_steps: 3\n"
            "  examples_per_update: 32\n",
        )
    )
    policy.check_floors(8, 3, 32)  # exactly at the floors: fine
    with pytest.raises(SiteRefusal) as refusal:
        policy.check_floors(*asked)
    assert rule in str(refusal.value)
    assert "refused by hospital-2" in str(refusal.value) and refusal.value.code == "POLICY_FLOOR"


def test_metrics_not_on_the_allow_list_are_held_back(tmp_path):
    policy = load_policy(_policy(tmp_path, "site: h\nledger: l\nmetrics_allowed: [num_examples]\n"))
    kept, held = policy.split_metrics({"num_examples": 3, "label_histogram_7": 2.0})
    assert kept == {"num_examples": 3} and held == ["label_histogram_7"]


def test_clip_bounds_the_update_norm_and_keeps_its_direction():
    received = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    trained = {"a": np.array([3.0, 0, 0], np.float32), "b": np.array([1.0, 5.0], np.float32)}
    clipped, norm = clip_update(received, trained, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    delta = np.concatenate([clipped["a"] - received["a"], clipped["b"] - received["b"]])
    assert float(np.linalg.norm(delta)) == pytest.approx(1.0)
    assert np.allclose(delta, np.array([3.0, 0, 0, 0, 4.0]) / 5)
    assert all(clipped[k].dtype == np.float32 for k in clipped)
    same, _ = clip_update(received, trained, max_norm=10.0)
    assert all(np.array_equal(same[k], trained[k]) for k in trained)


# --- the ledger -------------------------------------------------------------------------------


def _ledger(tmp_path: Path, lines: int = 3) -> Path:
    path = tmp_path / "egress-ledger.jsonl"
    for round_ in range(1, lines + 1):
        ledger.append(path, {"round": round_, "kind": "train", "metrics": {"loss": 0.5}})
    return path


def test_ledger_chains_and_verifies(tmp_path):
    path = _ledger(tmp_path)
    assert ledger.verify(path) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["prev"] == ledger.GENESIS
    assert [r["prev"] for r in rows[1:]] == [r["hash"] for r in rows[:-1]]


@pytest.mark.parametrize("line", [1, 2, 3])
def test_changing_one_byte_of_a_line_names_that_line(tmp_path, capsys, line):
    path = _ledger(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace('"loss": 0.5', '"loss": 0.6')
    path.write_text("".join(lines))
    assert main(["ledger", "verify", str(path)]) == 1
    assert f"line {line}:" in capsys.readouterr().err


def test_a_removed_line_or_garbage_is_named(tmp_path, capsys):
    path = _ledger(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    assert main(["ledger", "verify", str(path)]) == 1
    assert "line 2: the chain is broken" in capsys.readouterr().err
    path.write_text(lines[0] + "{not json\n")
    assert main(["ledger", "verify", str(path)]) == 1
    assert "line 2: not a ledger entry" in capsys.readouterr().err


def test_ledger_show_and_verify_commands(tmp_path, capsys):
    path = _ledger(tmp_path, lines=2)
    assert main(["ledger", "verify", str(path)]) == 0
    assert "2 entries, hash chain intact" in capsys.readouterr().out
    assert main(["ledger", "show", str(path), "--format", "json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [entry["round"] for entry in shown] == [1, 2]


def _rechained(path: Path, change) -> None:
    """What whoever can write the file can do: change a line and chain every line anew."""
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    path.unlink()
    for entry in lines:
        change(entry)
        ledger.append(path, {k: v for k, v in entry.items() if k not in ("hash", "prev", "time")})


def test_an_anchor_kept_elsewhere_detects_a_wholesale_rewrite(tmp_path, capsys):
    path = _ledger(tmp_path, lines=3)
    assert main(["ledger", "anchor", str(path)]) == 0
    value = capsys.readouterr().out.strip()
    assert value.startswith("3:") and len(value) == 2 + 64
    ledger.append(path, {"round": 4})  # the ledger grows after the anchor: still fine
    assert main(["ledger", "verify", str(path), "--anchor", value]) == 0
    assert "line 3 is the anchor's" in capsys.readouterr().out

    _rechained(path, lambda entry: entry.update(bytes=0) if entry.get("round") == 2 else None)
    assert ledger.verify(path) == 4  # the rewritten chain holds together by itself...
    assert main(["ledger", "verify", str(path), "--anchor", value]) == 1  # ...not against this
    assert "line 3: its hash is not the anchor's" in capsys.readouterr().err
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ledger.LedgerError, match="covers 3 lines, the ledger has 2"):
        ledger.verify(path, value)
    with pytest.raises(ledger.LedgerError, match="an anchor is LINES:HASH"):
        ledger.verify(path, "3:nothex")


def test_the_ledger_is_private_to_the_guard(tmp_path):
    path = tmp_path / "new-folder" / "egress-ledger.jsonl"
    ledger.append(path, {"round": 1})
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


# --- the app hash -----------------------------------------------------------------------------


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "probe").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "probe"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "tests"\n'
        '[tool.flwr.app.components]\nserverapp = "probe.s:app"\nclientapp = "probe.c:app"\n'
        "[tool.flwr.app.config]\nx = 1\n"
    )
    (app / ".gitignore").write_text("venv/\n")
    (app / "probe" / "__init__.py").write_text("")
    (app / "probe" / "c.py").write_text("app = None\n")
    (app / "probe" / "s.py").write_text("app = None\n")
    (app / "venv").mkdir()
    (app / "venv" / "big.py").write_text("x = 1\n")
    return app


def test_app_hash_is_the_hash_of_the_bundle_flower_builds(tmp_path, capsys):
    from flwr.cli.build import build_fab_from_disk

    app = _app(tmp_path)
    expected = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert app_hash(app) == expected
    assert main(["app", "hash", str(app)]) == 0
    assert capsys.readouterr().out.strip() == expected
    (app / "probe" / "c.py").write_text("app = 1\n")
    assert app_hash(app) != expected


@pytest.mark.slow
def test_app_hash_of_this_project_matches_flower(tmp_path):
    """The project folder holds a virtualenv: Flower walks it (seconds), app_hash does not."""
    from flwr.cli.build import build_fab_from_disk

    from federimed.config import find_app_dir

    root = find_app_dir()
    assert app_hash(root) == hashlib.sha256(build_fab_from_disk(root)).hexdigest()


def test_each_task_installs_into_a_fresh_home_and_imports_the_bundles_own_code(monkeypatch):
    """No folder left by another task (a revoked bundle's) is reused, and the hospital's own
    federimed is not what the bundle's imports find."""
    import sys

    homes = {site_runner.fresh_flwr_home() for _ in range(2)}
    assert len(homes) == 2 and all(not any(Path(h).iterdir()) for h in homes)
    monkeypatch.setitem(sys.modules, "federimed.fake_module", object())
    ours = {n: m for n, m in sys.modules.items() if n.split(".")[0] in site_runner.BUNDLE_PACKAGES}
    try:
        site_runner.forget_hospital_modules()
        assert not [name for name in sys.modules if name.split(".")[0] == "federimed"]
    finally:  # the rest of this test session goes on with the modules it imported
        sys.modules.update(ours)
    for home in homes:
        Path(home).rmdir()


# --- the guard at the hospital's SuperNode ------------------------------------------------------

APPROVED_FAB = b"approved bundle"


@pytest.fixture
def guard(tmp_path, monkeypatch, synth_data):
    from federimed.hospital.guard import SiteGuard

    path = _policy(
        tmp_path,
        f"site: hospital-9\nledger: ledger.jsonl\nmax_train_rounds: 2\napproved_apps:\n"
        f"  - sha256: {hashlib.sha256(APPROVED_FAB).hexdigest()}\n"
        "metrics_allowed: [num_examples]\n",
    )
    monkeypatch.setenv("FEDERIMED_SITE_POLICY", str(path))
    monkeypatch.setattr("federimed.hospital.guard.get_fused_config_from_fab", _run_config)
    return SiteGuard("hospital-9", synth_data / "hospital-1"), tmp_path / "ledger.jsonl"


def _run_config(fab_content, run):
    return {"batch-size": 8, "local-steps": 4} | run.override_config


def _run(content: bytes = APPROVED_FAB, task_type: str = "flwr-serverapp", **config):
    from types import SimpleNamespace

    fab = SimpleNamespace(content=content)
    run = SimpleNamespace(
        run_id=7,
        fab_hash=hashlib.sha256(content).hexdigest(),
        primary_task_type=task_type,
        override_config=config,
    )
    return run, fab


def _task(kind: str = "train", run_id: int = 7):
    """A message as the SuperNode receives it from the SuperLink, with its arrays."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 4}),
            "arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
        }
    )
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=1,
        dst_node_id=3,
        reply_to_message_id="",
        group_id="4",
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    task = Message(metadata=metadata, content=content)
    task.metadata.__dict__["_message_id"] = task.object_id
    return task


def _reply(task, **records):
    from flwr.app import Message, RecordDict

    return Message(RecordDict(records), reply_to=task)


def _admitted(site, kind: str = "train"):
    task = _task(kind)
    assert site.admit(task, *_run()) is None
    site.received(task.metadata.message_id, task)
    return task


def _codes(ledger_path: Path) -> list[str | None]:
    return [entry["code"] for _, entry in ledger.entries(ledger_path)]


@pytest.mark.parametrize(
    ("run", "code"),
    [
        (lambda: _run(b"some other bundle"), "APP_NOT_APPROVED"),
        (lambda: _run(task_type="flwr-agentapp"), "TASK_TYPE_REFUSED"),
        (lambda: _run(task_type="flwr-connector"), "TASK_TYPE_REFUSED"),
        (lambda: _run(**{"batch-size": 2}), "POLICY_FLOOR"),
        (lambda: _run(track="translate"), "UNKNOWN_TRACK"),  # no code here counts its cases
    ],
)
def test_a_task_the_policy_does_not_allow_is_answered_by_the_guard_and_ledgered(guard, run, code):
    site, ledger_path = guard
    refusal = site.admit(_task(), *run())
    assert refusal.has_error() and f"code {code}" in refusal.error.reason
    assert "hospital-9" in refusal.error.reason and refusal.object_id in site.cleared
    assert _codes(ledger_path) == [code] and not site.pending


def test_bytes_that_do_not_hash_to_the_claimed_approved_hash_are_refused(guard):
    site, _ = guard
    run, fab = _run()
    fab.content = b"approved bundle, changed"
    assert "code APP_HASH_MISMATCH" in site.admit(_task(), run, fab).error.reason


def test_only_train_and_evaluate_messages_run(guard):
    site, _ = guard
    assert "MESSAGE_TYPE_REFUSED" in site.admit(_task("query"), *_run()).error.reason


def test_the_policy_caps_training_rounds_per_run(guard):
    from flwr.app import ArrayRecord, MetricRecord

    site, ledger_path = guard
    for _ in range(2):
        task = _admitted(site)
        site.screen(
            _reply(
                task,
                arrays=ArrayRecord(dict(task.content["arrays"].items())),
                metrics=MetricRecord({}),
            )
        )
    refusal = site.admit(_task(), *_run())
    assert "code POLICY_CAP" in refusal.error.reason
    assert _codes(ledger_path) == [None, None, "POLICY_CAP"]


def test_evaluate_without_validation_data_is_refused(guard, tmp_path):
    import shutil

    site, _ = guard
    folder = tmp_path / "no-validation"
    folder.mkdir()
    shutil.copy(site.data_path / "train.jsonl", folder / "train.jsonl")
    site.data_path = folder
    assert "code NO_VALIDATION_DATA" in site.admit(_task("evaluate"), *_run()).error.reason


def test_the_reply_that_leaves_is_rebuilt_by_the_guard_and_ledgered(guard):
    from flwr.app import Array, ArrayRecord, MetricRecord

    site, ledger_path = guard
    task = _admitted(site)
    trained = np.arange(4, dtype=np.float32)
    sent = site.screen(
        _reply(
            task,
            arrays=ArrayRecord({"w": Array(trained)}),
            metrics=MetricRecord({"num_examples": 5, "secret_count": 42}),
        )
    )
    assert sorted(sent.content.keys()) == ["arrays", "metrics", "node"]
    assert dict(sent.content["metrics"]) == {"num_examples": 5}
    assert dict(sent.content["node"]) == {"hospital": "hospital-9", "server-round": 4}
    assert sent.metadata.reply_to_message_id == task.metadata.message_id
    assert np.array_equal(sent.content["arrays"]["w"].numpy(), trained)
    assert sent.object_id in site.cleared
    (entry,) = [e for _, e in ledger.entries(ledger_path)]
    assert entry["metrics"] == {"num_examples": 5} and entry["held_back"] == ["secret_count"]
    assert entry["app_hash"] == hashlib.sha256(APPROVED_FAB).hexdigest()
    array = sent.content["arrays"]["w"]
    assert entry["bytes"] == len(array.data) and entry["steps"] == 4 and entry["round"] == 4
    assert entry["arrays_sha256"] == ledger.arrays_digest([("w", array.data)])
    assert {r["name"]: r["type"] for r in entry["records"]} == {
        "arrays": "ArrayRecord",
        "metrics": "MetricRecord",
        "node": "ConfigRecord",
    }


def _leaky_replies(task):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    arrays = ArrayRecord(dict(task.content["arrays"].items()))
    metrics = MetricRecord({"num_examples": 5})
    yield {"arrays": arrays, "metrics": metrics, "leak": ConfigRecord({"t": "PATIENT-1"})}
    yield {"arrays": arrays, "metrics": MetricRecord({"num_examples": [80.0, 65.0, 84.0]})}
    yield {"arrays": arrays, "metrics": MetricRecord({"num_examples": float("nan")})}
    yield {"arrays": ArrayRecord({"PATIENT-1": Array(np.zeros(4, np.float32))}), "metrics": metrics}
    yield {"arrays": ArrayRecord({"w": Array(np.zeros(5, np.float32))}), "metrics": metrics}
    yield {"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float64))}), "metrics": metrics}
    yield {"arrays": ArrayRecord({"w": Array(np.full(4, np.inf, np.float32))}), "metrics": metrics}
    yield {"weights": arrays, "metrics": metrics}
    yield {"metrics": metrics}
    # names are the app's own text: a refusal must not carry them out
    yield {"arrays": arrays, "metrics": MetricRecord({"PATIENT-1 J45": [1.0, 2.0]})}
    yield {"arrays": arrays, "metrics": metrics, "PATIENT-1 J45": ConfigRecord({"t": "x"})}


@pytest.mark.parametrize("case", range(11))
def test_anything_but_the_allowed_shape_is_refused_whole_and_ledgered(guard, case):
    site, ledger_path = guard
    task = _admitted(site)
    records = list(_leaky_replies(task))[case]
    sent = site.screen(_reply(task, **records))
    assert sent.has_error() and "code REPLY_NOT_ALLOWED" in sent.error.reason
    assert "PATIENT" not in sent.error.reason
    (entry,) = [e for _, e in ledger.entries(ledger_path)]
    assert entry["code"] == "REPLY_NOT_ALLOWED" and entry["records"] == []


def test_an_app_error_leaves_without_its_text_and_is_ledgered(guard):
    from flwr.app import Error, Message

    site, ledger_path = guard
    task = _admitted(site)
    sent = site.screen(
        Message(Error(code=2, reason="record PATIENT-0042 has label J45"), reply_to=task)
    )
    assert "PATIENT-0042" not in sent.error.reason and "J45" not in sent.error.reason
    assert "CLIENTAPP_FAILED" in sent.error.reason and "hospital-9" in sent.error.reason
    (entry,) = [e for _, e in ledger.entries(ledger_path)]
    assert entry["round"] == 4 and entry["kind"] == "train" and "PATIENT" not in entry["error"]


def test_the_guard_clips_the_update_itself(guard, tmp_path):
    from flwr.app import Array, ArrayRecord, MetricRecord

    site, _ = guard
    policy = Path(os.environ["FEDERIMED_SITE_POLICY"])
    policy.write_text(policy.read_text() + "max_update_norm: 1.0\n")
    task = _admitted(site)
    big = np.array([30.0, 0, 40.0, 0], np.float32)
    sent = site.screen(
        _reply(task, arrays=ArrayRecord({"w": Array(big)}), metrics=MetricRecord({}))
    )
    assert np.linalg.norm(sent.content["arrays"]["w"].numpy()) == pytest.approx(1.0)


def test_what_the_guard_keeps_of_a_message_expires_with_it(guard):
    site, _ = guard
    stale = _task()
    stale.metadata.created_at = time.time() - 700  # its ttl is 600 s
    assert site.admit(stale, *_run()) is None and stale.metadata.message_id in site.pending
    fresh = _task()
    assert site.admit(fresh, *_run()) is None
    assert list(site.pending) == [fresh.metadata.message_id]


def test_a_reply_that_does_not_read_is_refused_and_the_supernode_goes_on(guard):
    from types import SimpleNamespace

    from flwr.app import MetricRecord
    from flwr.proto.message_pb2 import ObjectTree

    from federimed.hospital.supernode import _app_reply

    site, _ = guard
    reply = _reply(_admitted(site), metrics=MetricRecord({}))
    store = SimpleNamespace(
        get_object_tree=lambda message_id: ObjectTree(object_id=message_id),
        get=lambda object_id: b"not an object Flower wrote",
    )
    sent = site.screen(_app_reply(reply, store))
    assert "code REPLY_NOT_ALLOWED" in sent.error.reason


def test_a_reply_to_nothing_admitted_is_dropped(guard):
    from flwr.app import MetricRecord

    site, ledger_path = guard
    assert site.screen(_reply(_task(), metrics=MetricRecord({}))) is None
    assert not ledger_path.exists()


# --- warm ClientApp starts --------------------------------------------------------------------


def test_the_warm_parent_forks_a_real_clientapp_per_task(tmp_path):
    from federimed.hospital.warm import PRELOAD, WarmStarter

    log = tmp_path / "runner.log"
    with log.open("w") as output:
        starter = WarmStarter("federimed-clientapp", output=output)
        try:
            assert starter.start(["federimed-clientapp", "--help"])
            assert starter.start(["federimed-clientapp", "--help"])
        finally:
            starter.close()
    # The tasks outlive the parent's loop; wait for both to have written their help.
    deadline = time.monotonic() + 120
    while log.read_text().count("usage: federimed-clientapp") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.read_text().count("usage: federimed-clientapp") == 2
    assert "warm ClientApp parent ready: " + ", ".join(PRELOAD) in log.read_text()
    assert not starter.alive() and not starter.start(["federimed-clientapp"])


def test_the_warm_parent_dies_with_its_runner_even_mid_import(tmp_path):
    """A SIGKILLed runner (its federation killed) takes the warm parent with it at once, not
    when the parent's imports end and it reads the closed pipe."""
    import subprocess
    import sys

    import psutil

    log = tmp_path / "runner.log"
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from federimed.hospital.warm import WarmStarter;"
            "w = WarmStarter('federimed-clientapp', output=open(sys.argv[1], 'w'));"
            "print(w.parent.pid, flush=True); time.sleep(120)",
            str(log),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    parent = psutil.Process(int(runner.stdout.readline()))
    runner.kill()  # well before the parent's imports (seconds of torch and transformers) end
    runner.wait()
    gone, _ = psutil.wait_procs([parent], timeout=60)
    assert gone
    assert "warm ClientApp parent ready" not in log.read_text()  # it died importing
