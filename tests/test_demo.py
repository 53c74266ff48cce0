"""`federimed demo` end to end (tiny model, few steps): processes, report, cleanup."""

from __future__ import annotations

import json

import pytest
from conftest import processes_using, small_demo_args

from federimed.cli import main
from federimed.research.measures import METHODS
from federimed.research.report import round_overhead as report_overhead
from federimed.runrecord import read_report

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_runs_a_secured_federation_and_writes_the_report(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    code = main(small_demo_args(tmp_path, tiny_model))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["tls"] is True and report["supernode_auth"] is True
    assert report["flower_run_id"] > 0
    assert sorted(report["hospitals"]) == ["hospital-1", "hospital-2"]
    for hospital in report["hospitals"].values():
        for method in METHODS:  # the equal-budget figures, and each method tuned
            scores = hospital[method]
            assert 0.0 <= scores["accuracy"] <= scores["top3_accuracy"] <= 1.0
            assert 0.0 <= scores["ece"] <= 1.0
            assert "macro_f1" in scores and "unseen_style_accuracy" in scores
        assert hospital["unseen_conditions"]
        assert "unseen_accuracy" in hospital["local"]
        assert sorted(hospital["bytes_per_round"]) == ["1", "2"]
    assert sorted(report["rounds"]) == ["1", "2"]
    # the leave-one-style-out figure, per round, from the server's second test set
    assert all("unseen_style_accuracy" in r["test"] for r in report["rounds"].values())
    tuning = report["tuning"]["methods"]
    assert sorted(tuning["local"]) == ["hospital-1", "hospital-2"]
    rate = report["setup"]["learning_rate"]
    for found in (tuning["federated"], tuning["centralized"], *tuning["local"].values()):
        assert set(found["trials"]) == {"equal budget", str(round(0.4 * rate, 6))}
        assert found["learning_rate"] in (rate, round(0.4 * rate, 6))
        assert 0 < found["best_at"] <= found["ran"]
    assert tuning["federated"]["ran"] <= 2 * 2  # the cap: twice the equal budget's 2 rounds
    assert set(report["wall_seconds"]) >= {"federated", "local", "centralized", "tuned", "total"}
    for name in ("report.md", "comparison.png", "accuracy_per_round.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "model" / "config.json").is_file()
    markdown = (out / "report.md").read_text()
    assert "## Tuned baselines" in markdown and "| federated (tuned) |" in markdown
    assert "| 1 | hospital-1, hospital-2 | - | - |" in markdown  # who took part, per round
    first = report["rounds"]["1"]
    assert all(m["compute_seconds"] > 0 for m in first["train"].values())
    # a round takes at least its slowest compute (the report read as its typed record)
    assert report_overhead(read_report(out).rounds["1"]) >= 1.0
    assert {p.name for p in (out / "logs").glob("*.log")} >= {
        "superlink.log",
        "supernode-hospital-1.log",
        "supernode-hospital-2.log",
    }
    printed = capsys.readouterr().out
    assert "submitted Flower run" in printed and "federated" in printed
    assert report["network"]["mode"] in ("loopback", "network namespaces")
    assert processes_using(tmp_path) == []  # nothing left running
    _the_dashboard_shows_the_demos_comparison(out, report)


def _the_dashboard_shows_the_demos_comparison(out, report) -> None:
    """`make serve` after a demo: the run's page has the real report's comparison table."""
    from fastapi.testclient import TestClient

    from federimed.webapp.app import ServeLimits, load_app

    client = TestClient(load_app(out / "model", out, ServeLimits(max_chars=400, max_new_tokens=4)))
    run = client.get(f"/api/runs/{report['flower_run_id']}").json()
    assert run["state"] == "completed" and run["comparison"]
    federated = run["comparison"]["hospitals"]["hospital-1"]["federated"]
    assert federated["score"] == report["hospitals"]["hospital-1"]["federated"]["accuracy"]
    page = client.get(f"/runs/{report['flower_run_id']}").text
    assert "<th>Local (tuned)</th>" in page and "<th>Centralized</th>" in page
    predicted = client.post("/api/predict", json={"text": "crushing chest pain, ST elevation"})
    assert predicted.status_code == 200 and len(predicted.json()["predictions"]) == 5


def test_demo_failure_names_the_problem_and_leaves_nothing_behind(tmp_path, capsys):
    data = tmp_path / "data" / "hospital-1"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"id": "1", "text": "x", "label": "I21"}\n')
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "data"),
            "--certs",
            str(tmp_path / "certs"),
        ]
    )
    assert code == 2
    assert "test.jsonl" in capsys.readouterr().err
    assert processes_using(tmp_path) == []
