"""What a hospital controls, without processes: its policy, its ledger, its runner's checks.

The same checks against a real federation (a real unapproved bundle, a real refusal, a real
ledger) are in tests/test_e2e.py; these pin the rules and the Flower internals the runner
relies on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from federimed import ledger
from federimed.cli import main
from federimed.deploy import site_runner
from federimed.deploy.flower import app_hash
from federimed.policy import (
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
    received = {"a": torch.zeros(3), "b": torch.ones(2)}
    trained = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}
    clipped, norm = clip_update(received, trained, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    delta = torch.cat([clipped["a"] - received["a"], clipped["b"] - received["b"]])
    assert float(delta.norm()) == pytest.approx(1.0)
    assert torch.allclose(delta, torch.tensor([3.0, 0, 0, 0, 4.0]) / 5)
    same, _ = clip_update(received, trained, max_norm=10.0)
    assert all(torch.equal(same[k], trained[k]) for k in trained)


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


# --- the runner's hooks into Flower -----------------------------------------------------------


def test_the_flower_names_the_runner_rebinds_exist():
    """If a Flower upgrade moves these, the runner must fail here, not silently skip checks."""
    import flwr
    import flwr.supercore.superexec.executor.subprocess_executor as executor
    import flwr.supernode.runtime.run_clientapp as flower_clientapp
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    assert flwr.__version__ == "1.42.0"
    source = Path(flower_clientapp.__file__).read_text()
    for name in ("install_from_fab(", "get_load_client_app_fn(", "push_message("):
        assert name in source and callable(getattr(flower_clientapp, name[:-1]))
    assert executor.TASK_TYPE_TO_COMMAND is TASK_TYPE_TO_COMMAND
    # federimed superexec shortens the task poll through Flower's own variable
    from flwr.supercore.superexec import run_superexec

    assert run_superexec._TASK_POLL_INTERVAL_ENV == "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
    # warm starts replace the module the executor starts processes through
    assert "subprocess.Popen(" in Path(executor.__file__).read_text()
    original = TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP]
    try:
        site_runner.use_site_clientapp()
        assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == "federimed-clientapp"
    finally:
        TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = original


@pytest.fixture
def guard(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's ClientApp process sets from the task it pulled; Messages need it.
    monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 3, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 11, raising=False)
    path = _policy(
        tmp_path,
        f"site: hospital-9\nledger: ledger.jsonl\napproved_apps:\n"
        f"  - sha256: {hashlib.sha256(b'approved bundle').hexdigest()}\n"
        "metrics_allowed: [num_examples]\n",
    )
    monkeypatch.setenv("FEDERIMED_SITE_POLICY", str(path))
    installed, pushed = [], []
    monkeypatch.setattr(site_runner, "_install_from_fab", lambda c, **k: installed.append(c))
    monkeypatch.setattr(site_runner, "_push_message", lambda cl, m, cx: pushed.append(m))
    return site_runner.SiteGuard.from_env(), installed, pushed, tmp_path / "ledger.jsonl"


def test_an_unapproved_bundle_is_never_installed(guard):
    site, installed, _, _ = guard
    with pytest.raises(SiteRefusal, match="not approved by hospital-9") as refusal:
        site.install(b"some other bundle", skip_prompt=True)
    assert refusal.value.code == "APP_NOT_APPROVED" and installed == []
    site.install(b"approved bundle", skip_prompt=True)
    assert installed == [b"approved bundle"]


def _task():
    from flwr.app import ConfigRecord, Message, RecordDict

    task = Message(
        RecordDict({"config": ConfigRecord({"server-round": 4})}),
        dst_node_id=3,
        message_type="train",
    )
    task.metadata.__dict__["_message_id"] = task.object_id
    return task


def test_an_app_error_leaves_without_record_content_and_is_ledgered(guard):
    from flwr.app import Message
    from flwr.app.error import Error

    site, _, pushed, ledger_path = guard

    def leaky_app(message, context):
        raise ValueError("record PATIENT-0042 has label J45")

    task = _task()
    with pytest.raises(SiteRefusal) as refusal:
        site._guarded(leaky_app)(task, None)
    reply = Message(
        Error(code=2, reason=f"{type(refusal.value)}:<'{refusal.value}'>"), reply_to=task
    )
    site.push(None, reply, None)
    (sent,) = pushed
    assert "PATIENT-0042" not in sent.error.reason and "J45" not in sent.error.reason
    assert "CLIENTAPP_FAILED" in sent.error.reason and "hospital-9" in sent.error.reason
    (entry,) = [e for _, e in ledger.entries(ledger_path)]
    assert entry["round"] == 4 and entry["kind"] == "train" and "PATIENT" not in entry["error"]


def test_a_reply_is_ledgered_with_only_allowed_metrics(guard):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    site, _, pushed, ledger_path = guard
    site.install(b"approved bundle", skip_prompt=True)
    weights = torch.arange(4, dtype=torch.float32)
    reply = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": weights}),
                "metrics": MetricRecord({"num_examples": 5, "secret_count": 42}),
            }
        ),
        reply_to=_task(),
    )
    site.push(None, reply, None)
    (sent,) = pushed
    assert dict(sent.content["metrics"]) == {"num_examples": 5}
    (entry,) = [e for _, e in ledger.entries(ledger_path)]
    assert entry["metrics"] == {"num_examples": 5}
    assert entry["app_hash"] == hashlib.sha256(b"approved bundle").hexdigest()
    array = sent.content["arrays"]["w"]
    assert entry["bytes"] == len(array.data)
    assert entry["arrays_sha256"] == ledger.arrays_digest([("w", array.data)])


# --- warm ClientApp starts --------------------------------------------------------------------


def _spec(task_type):
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9094",
        token="token-1",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4321,
        suppress_output=False,
        task_id=1,
    )


def test_clientapp_launches_go_to_the_warm_parent_and_fall_back_when_it_is_gone(monkeypatch):
    """Flower's subprocess executor, unchanged, with the module it starts processes through."""
    import subprocess

    import flwr.supercore.superexec.executor.subprocess_executor as executor
    from flwr.supercore.constant import TaskType

    from federimed.deploy import warm

    class Starter:
        command, alive, started = "federimed-clientapp", True, []

        def start(self, argv):
            self.started.append(argv)
            return self.alive

    cold = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kwargs: cold.append(argv))
    monkeypatch.setattr(executor, "subprocess", executor.subprocess)  # restored afterwards
    monkeypatch.setitem(executor.TASK_TYPE_TO_COMMAND, TaskType.CLIENT_APP, "federimed-clientapp")
    starter = Starter()
    warm.use_warm_starts(starter)
    executor.SubprocessExecutor().launch(_spec(TaskType.CLIENT_APP))
    assert starter.started == [
        ["federimed-clientapp", "--runtime-api-address", "127.0.0.1:9094",
         "--token", "token-1", "--insecure", "--parent-pid", "4321"]
    ]  # fmt: skip
    assert cold == []
    starter.alive = False  # the warm parent died: the task still starts, cold
    executor.SubprocessExecutor().launch(_spec(TaskType.CLIENT_APP))
    assert cold == [starter.started[-1]]
    executor.SubprocessExecutor().launch(_spec(TaskType.SERVER_APP))  # not ours to warm
    assert cold[-1][0] == executor.TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP]


def test_the_warm_parent_forks_a_real_clientapp_per_task(tmp_path):
    from federimed.deploy.warm import PRELOAD, WarmStarter

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
            "import sys, time; from federimed.deploy.warm import WarmStarter;"
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


def test_a_task_first_asks_for_its_message_after_a_tenth_of_a_second(monkeypatch):
    """Pins what quicker_first_pulls relies on: Flower's task pulls its message through
    pull_and_inflate_object_from_tree with the function's default backoff."""
    import inspect

    import flwr.supernode.runtime.run_clientapp as flower_clientapp

    from federimed.deploy import site_runner

    pull = flower_clientapp.pull_and_inflate_object_from_tree
    monkeypatch.setattr(pull, "__kwdefaults__", dict(pull.__kwdefaults__))  # restored after
    assert pull.__kwdefaults__["initial_backoff"] == 1
    source = inspect.getsource(flower_clientapp.pull_task_input)
    assert "pull_and_inflate_object_from_tree(" in source and "initial_backoff" not in source
    site_runner.quicker_first_pulls()
    assert pull.__kwdefaults__["initial_backoff"] == site_runner.FIRST_PULL_BACKOFF
