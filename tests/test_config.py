"""One source of truth for the run configuration: defaults, env, flags, and what they mean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from federimed.cli import main
from federimed.config import find_app_dir

ROOT = find_app_dir()


def _show(capsys, *args: str) -> dict:
    assert main(["config", "show", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_show_names_each_value_and_its_source(capsys, monkeypatch):
    monkeypatch.setenv("FEDERIMED_RUN_LOCAL_STEPS", "7")
    monkeypatch.setenv("FEDERIMED_RUN_CONFIG", "seed=5 local-steps=6")
    shown = _show(capsys, "--run-config", 'num-server-rounds=2 strategy="fedprox"')
    assert shown["seed"] == {"value": 5, "source": "env"}
    assert shown["num-server-rounds"] == {"value": 2, "source": "flag"}
    assert shown["strategy"] == {"value": "fedprox", "source": "flag"}
    assert shown["local-steps"] == {"value": 7, "source": "env"}
    assert shown["batch-size"]["source"] == "default"
    # Every key of the app's table, nothing else.
    table = (ROOT / "pyproject.toml").read_text().split("[tool.flwr.app.config]")[1]
    keys = {line.split("=")[0].strip() for line in table.splitlines() if "=" in line}
    keys = {k for k in keys if not k.startswith("#") and not k.startswith("[")}
    assert set(shown) == {k for k in keys if k in shown} and len(shown) >= 20


def test_a_default_changed_in_the_one_place_shows_in_config_show(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "\nlocal-steps = 15\n" in pyproject
    (app / "pyproject.toml").write_text(
        pyproject.replace("\nlocal-steps = 15\n", "\nlocal-steps = 9\n")
    )
    assert _show(capsys, "--app", str(app))["local-steps"] == {"value": 9, "source": "default"}


@pytest.mark.parametrize(
    "args, env, named",
    [
        (["--run-config", "rounds=3"], {}, "rounds"),
        (["--run-config", "num-server-rounds=abc"], {}, "num-server-rounds"),
        (["--run-config", "num-server-rounds=0"], {}, "num-server-rounds"),
        (["--run-config", 'strategy="fedbest"'], {}, "fedtrimmedavg"),
        (["--run-config", "num-server-rounds 3"], {}, "num-server-rounds 3"),
        ([], {"FEDERIMED_RUN_ROUNDS": "3"}, "FEDERIMED_RUN_ROUNDS"),
        ([], {"FEDERIMED_RUN_BATCH_SIZE": "big"}, "batch-size"),
        ([], {"FEDERIMED_RUN_CONFIG": "seed=x"}, "FEDERIMED_RUN_CONFIG"),
    ],
)
def test_bad_keys_and_values_are_refused_by_name(args, env, named, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "show", *args]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and "Traceback" not in captured.err


def test_the_deployment_layer_sits_between_defaults_and_env():
    from federimed.config import resolve

    deployment = {"min-nodes": 3, "test-path": "/data/test.jsonl"}
    effective = resolve(deployment=deployment, environ={"FEDERIMED_RUN_MIN_NODES": "2"})
    assert effective.sources["min-nodes"] == "env" and effective.run.min_nodes == 2
    assert effective.sources["test-path"] == "deployment"
    assert effective.overrides == {"min-nodes": 2, "test-path": "/data/test.jsonl"}
    flagged = resolve(deployment=deployment, run_config="min-nodes=1", environ={})
    assert flagged.run.min_nodes == 1


def test_the_generative_track_starts_from_its_own_values_which_env_and_flags_override():
    from federimed.config import resolve, track_defaults

    generative = track_defaults(find_app_dir(), "generative")
    assert generative["batch-size"] < 16 and generative["max-length"] > 128
    table = resolve(flags={"track": "generative"}, environ={}).as_table()
    for key, value in generative.items():
        assert table[key] == {"value": value, "source": "track"}
    env = {"FEDERIMED_RUN_TRACK": '"generative"', "FEDERIMED_RUN_BATCH_SIZE": "2"}
    table = resolve(environ=env).as_table()
    assert table["batch-size"] == {"value": 2, "source": "env"}
    assert table["max-length"]["source"] == "track"
    table = resolve(environ={}).as_table()  # the classify track: its defaults, nothing else
    assert {entry["source"] for entry in table.values()} == {"default"}


def test_a_test_path_folder_holds_each_tracks_test_set(tmp_path):
    """compose and Kubernetes pass the folder (`test-path="/data"`); the track picks the file."""
    from federimed.config import resolve

    folder = f'test-path="{tmp_path}"'
    assert resolve(run_config=folder, environ={}).run.test_set == tmp_path / "test.jsonl"
    generative = resolve(run_config=f'{folder} track="generative"', environ={}).run
    assert generative.test_set == tmp_path / "test-flashcards.jsonl"
    named = tmp_path / "cards.jsonl"
    run = resolve(run_config=f'test-path="{named}" track="generative"', environ={}).run
    assert run.test_set == named
    assert resolve(run_config='test-path=""', environ={}).run.test_set is None


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "config", "show", "--run-config", "rounds=3"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_validate_uses_the_label_set_training_uses(tmp_path, capsys):
    """A file passes `data validate` exactly when training would accept its labels."""
    from federimed.config import resolve
    from federimed.data.records import DataError, load_hospital

    folder = tmp_path / "hospital-x"
    write_jsonl(folder / "train.jsonl", [{"id": "1", "text": "chest pain", "label": "X99"}])
    assert main(["data", "validate", str(folder)]) == 1
    assert "unknown label 'X99'" in capsys.readouterr().err
    with pytest.raises(DataError, match="X99"):
        load_hospital(folder, resolve(environ={}).run.label_list)

    labels = 'labels="X99,I21"'
    assert main(["data", "validate", str(folder), "--run-config", labels]) == 0
    run = resolve(run_config=labels, environ={}).run
    assert [e.label for e in load_hospital(folder, run.label_list).train] == ["X99"]


def test_strategy_choices_come_from_one_definition():
    from federimed.cli import build_parser
    from federimed.runconfig import STRATEGIES

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    (strategy,) = [a for a in demo._actions if a.dest == "strategy"]
    assert tuple(strategy.choices) == STRATEGIES


def test_fixed_environment_has_one_definition_for_local_processes():
    from federimed.deploy.flower import HARDENED_ENV, flower_env

    env = flower_env({"PATH": "/usr/bin", "FLWR_TELEMETRY_ENABLED": "1"})
    assert {k: env[k] for k in HARDENED_ENV} == HARDENED_ENV
    assert Path(shutil.which("flwr", path=env["PATH"]) or "").name == "flwr"


def test_the_cli_and_the_run_config_need_no_ml_stack():
    """The SuperLink and SuperNode images run `federimed` without torch or transformers."""
    probe = (
        "import sys; from federimed.cli import build_parser; from federimed.config import resolve;"
        "build_parser(); resolve(environ={});"
        "heavy = sorted({'torch', 'transformers', 'peft', 'datasets'} & set(sys.modules));"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_demo_refuses_a_model_it_cannot_find_before_starting_anything(tmp_path, capsys):
    """Before the federation starts, not in every hospital's first round."""
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model is not a model folder (no config.json)" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--model", "someone/not-cached-here"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    assert not (out / "flower").exists() and not (out / "logs").exists()
