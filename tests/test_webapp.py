"""`federimed serve` through its HTTP interface (FastAPI's TestClient): the clinician API on a
real tiny model, every bad input, the runs API and dashboard following a live run record, and
the consortium's Prometheus series."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
from conftest import make_run
from fastapi.testclient import TestClient

from federimed.cli import main
from federimed.runrecord import (
    RoundRecord,
    RunFailure,
    RunSummary,
    Scores,
    Traffic,
    append_round,
    read_rounds,
    write_failure,
    write_provenance,
    write_summary,
)
from federimed.webapp.app import ServeLimits, load_app
from federimed.webapp.served import ModelFolderError, model_kind

LIMITS = ServeLimits(max_chars=200, max_new_tokens=6)
HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
CASE = "67M crushing central chest pain for 2h, sweating, ST elevation in V2-V5"


def a_round(number: int, dropped: bool = False) -> RoundRecord:
    took_part = HOSPITALS[:2] if dropped else HOSPITALS
    return RoundRecord(
        round=number,
        participants=took_part,
        dropped=HOSPITALS[2:] if dropped else [],
        errors={"hospital-3": "Node Unavailable"} if dropped else {},
        rejected={},
        train={h: {"train_loss": 1.0 / number, "num_examples": 100.0 + i}
               for i, h in enumerate(took_part)},
        evaluate={},
        test=Scores(accuracy=0.2 * number, macro_f1=0.1 * number, loss=2.0 / number,
                    top3_accuracy=0.3 * number, unseen_style_accuracy=0.15 * number,
                    num_examples=64),
        traffic={h: Traffic(bytes_down=1000, bytes_up=900 if h in took_part else 0)
                 for h in HOSPITALS},
        seconds=10.0 + number,
    )  # fmt: skip


def finish(server, rounds: int) -> RunSummary:
    """What the ServerApp writes at a run's end: the summary, and the model's provenance."""
    final = server.global_model.save_final()
    summary = RunSummary(
        run_id=server.run_id, status="completed", run_config=server.run.to_flower(),
        rounds_completed=rounds, initial_test=None,
        final_test=read_rounds(server.out)[-1].test, update_bytes=900,
        trainable_parameters=225, total_parameters=10_000, final_model=str(final),
        wall_seconds=30.0,
    )  # fmt: skip
    write_summary(server.out, summary)
    write_provenance(final, server.run, summary, read_rounds(server.out))
    return summary


@pytest.fixture(scope="module")
def classifier_run(tiny_model, tmp_path_factory):
    """A finished 2-round run of the tiny classifier: round 1 lost hospital-3."""
    from federimed.server import ServerRun

    root = tmp_path_factory.mktemp("runs")
    server = ServerRun(make_run(model=tiny_model, output_dir=str(root / "flower")), 11)
    append_round(server.out, a_round(1, dropped=True))
    append_round(server.out, a_round(2))
    finish(server, 2)
    return root, server.out


@pytest.fixture(scope="module")
def client(classifier_run):
    root, run_dir = classifier_run
    return TestClient(load_app(run_dir / "final", root, LIMITS))


def test_predict_gives_the_top_5_diagnoses_with_names_and_the_models_provenance(client):
    reply = client.post("/api/predict", json={"text": CASE})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    predictions = body["predictions"]
    assert len(predictions) == 5
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    labels = make_run().label_list
    assert all(p["code"] in labels and p["name"] for p in predictions)
    model = body["model"]
    assert model["kind"] == "classify" and model["run_id"] == 11
    assert model["hospitals"] == {"hospital-1": 100, "hospital-2": 101, "hospital-3": 102}
    assert model["rounds_completed"] == 2 and model["final_test"]["accuracy"] == 0.4
    page = client.get("/")
    assert page.status_code == 200
    assert "not for clinical use" in page.text and 'href="/runs/11"' in page.text
    assert "hospital-3: 102 cases" in page.text


@pytest.mark.parametrize(
    ("request_args", "status", "says"),
    [
        ({"json": {"text": ""}}, 422, "text: empty"),
        ({"json": {"text": "   \n "}}, 422, "text: empty"),
        ({"json": {"text": "x" * 201}}, 413, "201 characters, over the limit of 200"),
        ({"json": {"case": CASE}}, 422, "text: Field required"),
        ({"json": {"text": 42}}, 422, "text: Input should be a valid string"),
        ({"content": CASE, "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        ({"data": {"text": CASE}}, 415, "application/x-www-form-urlencoded"),
        ({"content": "{not json", "headers": {"content-type": "application/json"}}, 422,
         "JSON decode error"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_that_names_the_problem(client, request_args, status, says):
    reply = client.post("/api/predict", **request_args)
    assert reply.status_code == status, reply.text
    assert says in reply.json()["detail"]
    assert CASE not in reply.text  # never echoed back


def test_the_wrong_kind_of_question_and_unknown_runs_are_4xx(client):
    wrong = client.post("/api/ask", json={"question": "What causes gout?"})
    assert wrong.status_code == 409 and "use /api/predict" in wrong.json()["detail"]
    assert client.get("/api/runs/999").status_code == 404
    assert client.get("/runs/999").status_code == 404


def test_case_text_is_neither_logged_nor_stored(classifier_run, client, caplog):
    root, _ = classifier_run
    before = {p: p.stat().st_mtime for p in root.rglob("*")}
    marker = "ZEBRA-7781 " + CASE
    with caplog.at_level(logging.DEBUG):
        assert client.post("/api/predict", json={"text": marker}).status_code == 200
    assert "ZEBRA-7781" not in caplog.text
    assert {p: p.stat().st_mtime for p in root.rglob("*")} == before


def test_a_folder_that_is_no_federimed_model_is_refused_at_start(tmp_path, tiny_model, capsys):
    with pytest.raises(ModelFolderError, match="no such folder"):
        model_kind(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match="not a FederiMed model folder"):
        model_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ModelFolderError, match="not a readable adapter config"):
        model_kind(tmp_path)
    assert main(["serve", "--model", tiny_model]) == 2  # a hub-style model, not a FederiMed one
    assert "not a FederiMed model folder" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "give --model DIR" in capsys.readouterr().err
    assert main(["serve", "--model", "latest"]) == 2
    assert "--model latest needs --runs DIR" in capsys.readouterr().err
    assert main(["serve", "--runs", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_generative_model_streams_its_answer(tiny_gpt2, tmp_path):
    from federimed.decoder import ask
    from federimed.server import ServerRun
    from federimed.webapp.served import ServedModel

    run = make_run(track="generative", generator=tiny_gpt2, output_dir=str(tmp_path))
    server = ServerRun(run, 12)
    generative_scores = Scores(exact_match=0.0, token_f1=0.03, perplexity=19.0, num_examples=64)
    append_round(server.out, a_round(1).model_copy(update={"test": generative_scores}))
    finish(server, 1)
    final = server.out / "final"
    client = TestClient(load_app(final, tmp_path, LIMITS))
    question = "What is the key investigation finding in Addison's disease?"
    with client.stream("POST", "/api/ask", json={"question": question}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        streamed = "".join(reply.iter_text())
    served = ServedModel.load(final)
    assert streamed.strip() == ask(served.model, served.tokenizer, question, 6)
    assert streamed.strip()  # a random tiny model still writes something
    assert client.post("/api/predict", json={"text": CASE}).status_code == 409
    assert client.post("/api/ask", json={"question": " "}).status_code == 422
    too_long = client.post("/api/ask", json={"question": "why " * 60})
    assert too_long.status_code == 413 and "over the limit of 200" in too_long.json()["detail"]
    plain = client.post("/api/ask", content=question, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and question not in plain.text
    page = client.get("/")  # its provenance: the generative track's scores
    assert "Ask a medical question" in page.text
    assert "exact match 0.0%, perplexity 19.0" in page.text
    assert "diagnosis exact match 0.0%" in client.get("/runs").text  # a zero is a score


def test_the_dashboard_follows_a_live_run_through_its_record(tiny_model, tmp_path):
    from federimed.server import ServerRun

    server = ServerRun(
        make_run(model=tiny_model, num_server_rounds=3, output_dir=str(tmp_path)), 21
    )
    client = TestClient(load_app(Path("latest"), tmp_path, LIMITS))  # the newest run's model
    assert client.get("/api/runs/21").json()["state"] == "in progress"
    assert client.get("/api/model").status_code == 404 and "No model yet" in client.get("/").text
    append_round(server.out, a_round(1, dropped=True))
    run = client.get("/api/runs/21").json()
    assert run["rounds_completed"] == 1 and run["rounds"][0]["dropped"] == ["hospital-3"]
    page = client.get("/runs/21").text
    assert 'data-state="in progress"' in page and page.count('class="point"') == 1
    assert "Node Unavailable" in page
    quiet = time.time() - (600 + 300 + 1)  # round-timeout and the grace: its ServerApp died?
    for name in ("run_config.json", "rounds.jsonl"):
        os.utime(server.out / name, (quiet, quiet))
    assert client.get("/api/runs/21").json()["state"] == "stalled"
    assert "may have stopped" in client.get("/runs/21").text
    append_round(server.out, a_round(2))  # it was only slow
    assert client.get("/api/runs/21").json()["state"] == "in progress"
    append_round(server.out, a_round(3))
    finish(server, 3)
    listed = client.get("/api/runs").json()
    assert [(r["id"], r["state"], r["rounds_completed"]) for r in listed] == [
        ("21", "completed", 3)
    ]
    page = client.get("/runs/21").text
    assert page.count('class="point"') == 3 and 'data-value="0.6000"' in page
    assert "(this page follows the run" not in page
    assert "21" in client.get("/runs").text
    assert client.get("/api/model").json()["run_id"] == 21  # loaded once the run completed
    broken = ServerRun(make_run(model=tiny_model, output_dir=str(tmp_path)), 22)  # newer
    append_round(broken.out, a_round(1))
    finish(broken, 1)
    (broken.out / "final" / "model.safetensors").write_bytes(b"not weights")
    assert client.get("/api/model").json()["run_id"] == 21  # the last good one goes on
    assert client.post("/api/predict", json={"text": CASE}).json()["model"]["run_id"] == 21
    given_up = ServerRun(make_run(model=tiny_model, output_dir=str(tmp_path)), 20)
    write_failure(
        given_up.out,
        RunFailure(
            run_id=20,
            reason="round 1: no hospital trained (hospital-2: POLICY_FLOOR)",
            rounds_completed=0,
        ),
    )
    assert client.get("/api/runs/20").json()["state"] == "failed"
    assert "hospital-2: POLICY_FLOOR" in client.get("/runs/20").text


def test_the_demo_report_adds_the_comparison(classifier_run, client):
    root, _ = classifier_run
    report = {
        "setup": {"track": "classify"},
        "flower_run_id": 11,
        "hospitals": {
            "hospital-1": {
                "federated": {"accuracy": 0.75, "unseen_accuracy": 0.5},
                "local": {"accuracy": 0.5, "unseen_accuracy": 0.0},
                "centralized": {"accuracy": 0.8, "unseen_accuracy": 0.6},
                "centralized_tuned": {"accuracy": 0.85, "unseen_accuracy": 0.7},
            }
        },
    }
    (root / "report.json").write_text(json.dumps(report))
    try:
        comparison = client.get("/api/runs/11").json()["comparison"]
        assert comparison["measure"] == "test accuracy"
        assert comparison["hospitals"]["hospital-1"]["local"] == {"score": 0.5, "unseen": 0.0}
        assert [name for _, name in comparison["methods"]] == [
            "federated", "local", "centralized", "centralized (tuned)",
        ]  # fmt: skip
        page = client.get("/runs/11").text
        assert "75.0%" in page and "Centralized (tuned)" in page and "85.0%" in page
    finally:
        (root / "report.json").unlink()


def test_metrics_export_the_consortium_and_the_web_apps_own_series(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/api/predict", json={"text": CASE})
    client.post("/api/predict", content=CASE, headers={"content-type": "text/plain"})
    text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    run = (("run", "11"),)
    assert samples[("federimed_rounds_completed_total", run)] == 2
    assert samples[("federimed_round_participants", run)] == 3
    assert samples[("federimed_round_dropped", run)] == 0
    assert samples[("federimed_round_duration_seconds", run)] == 12.0
    assert samples[("federimed_test_accuracy", run)] == pytest.approx(0.4)
    assert samples[("federimed_test_loss", run)] == pytest.approx(1.0)
    assert samples[("federimed_test_top3_accuracy", run)] == pytest.approx(0.6)
    assert samples[("federimed_test_unseen_style_accuracy", run)] == pytest.approx(0.3)
    assert samples[("federimed_updates_rejected_total", run)] == 0
    dropped = ("federimed_hospital_dropped_total", (("hospital", "hospital-3"), ("run", "11")))
    assert samples[dropped] == 1  # round 1's, though round 2 is the one a gauge shows
    for hospital, received in (("hospital-1", 1800), ("hospital-3", 900)):
        key = ("federimed_bytes_received_total", (("hospital", hospital), ("run", "11")))
        assert samples[key] == received
    info = ("federimed_run_info", (("run", "11"), ("state", "completed"), ("track", "classify")))
    assert samples[info] == 1
    ok = (("method", "POST"), ("route", "/api/predict"), ("status", "200"))
    assert samples[("federimed_http_requests_total", ok)] >= 1
    refused = (("method", "POST"), ("route", "/api/predict"), ("status", "415"))
    assert samples[("federimed_http_requests_total", refused)] >= 1  # refused before routing
    assert samples[("federimed_http_request_seconds_count", (("route", "/api/predict"),))] >= 1


def test_the_api_docs_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/api/predict", "/api/ask", "/api/runs", "/api/runs/{run_id}", "/healthz"):
        assert path in spec["paths"] and path in page.text
    assert "The 5 most probable diagnoses" in page.text
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and all(not link.startswith("http") or "//testserver/" in link for link in links)
    assert "cdn" not in page.text.lower()
