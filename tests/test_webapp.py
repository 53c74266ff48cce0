"""`federimed serve` through its HTTP interface (FastAPI's TestClient, and a real uvicorn on
loopback where a test needs real connections): the clinician API on a real tiny model, every bad
input, the runs API and dashboard following a live run record, the consortium's Prometheus
series; who may use it (tokens hashed at rest, the login page's session, the single-sign-on
proxy's header, Host names, the audit line) and the limits that hold before work is done (body
size, concurrent answers and predictions, a client that leaves, /healthz while the model is
busy) (issue 29)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import make_run
from fastapi.testclient import TestClient

from federimed.cli import main
from federimed.deploy.local import free_port
from federimed.runrecord import (
    HospitalResult,
    Network,
    Report,
    RoundRecord,
    RunFailure,
    RunSummary,
    Scores,
    Setup,
    Traffic,
    append_round,
    read_rounds,
    write_failure,
    write_provenance,
    write_report,
    write_summary,
)
from federimed.settings import ServeSettings
from federimed.webapp.access import AccessControl, add_token
from federimed.webapp.app import ServeLimits, create_app, load_app
from federimed.webapp.runs import RunIndex
from federimed.webapp.served import ModelFolderError, ModelSource, ServedModel, model_kind

LIMITS = ServeLimits(max_chars=200, max_new_tokens=6)
USER = "dr.house"
HOST = "http://127.0.0.1"  # the TestClient's: a loopback name, which the Host check allows
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
    from federimed.consortium.run import ServerRun

    root = tmp_path_factory.mktemp("runs")
    server = ServerRun(make_run(model=tiny_model, output_dir=str(root / "flower")), 11)
    append_round(server.out, a_round(1, dropped=True))
    append_round(server.out, a_round(2))
    finish(server, 2)
    return root, server.out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[Path, str]:
    """A tokens file with one user, as `federimed serve --add-token` writes it."""
    path = tmp_path_factory.mktemp("auth") / "serve-tokens"
    return path, add_token(path, USER)


def access(tokens_file: Path, **settings) -> AccessControl:
    """`federimed serve`'s access control, from its settings (FEDERIMED_SERVE_*)."""
    return AccessControl.from_settings(ServeSettings(tokens=tokens_file, **settings))


def signed_in(app, token: str, **kwargs) -> TestClient:
    return TestClient(app, base_url=HOST, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def serve(tokens, model, runs, limits=LIMITS, **settings) -> TestClient:
    """`federimed serve` on ``model`` and ``runs``, with a client that sends the user's token."""
    path, token = tokens
    return signed_in(load_app(model, runs, limits, access(path, **settings)), token)


@pytest.fixture(scope="module")
def client(classifier_run, tokens):
    root, run_dir = classifier_run
    return serve(tokens, run_dir / "final", root)


@pytest.fixture(scope="module")
def anonymous(client):
    """The same web app, asked without credentials."""
    return TestClient(client.app, base_url=HOST)


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


@pytest.fixture(scope="module")
def generative_run(tiny_gpt2, tmp_path_factory) -> tuple[Path, Path]:
    """A finished 1-round run of the tiny GPT-2: (runs folder, its final/ model)."""
    from federimed.consortium.run import ServerRun

    root = tmp_path_factory.mktemp("generative")
    run = make_run(track="generative", generator=tiny_gpt2, output_dir=str(root))
    server = ServerRun(run, 12)
    generative_scores = Scores(
        choice_accuracy=0.0, exact_match=0.0, token_f1=0.03, perplexity=19.0, num_examples=64
    )
    append_round(server.out, a_round(1).model_copy(update={"test": generative_scores}))
    finish(server, 1)
    return root, server.out / "final"


def test_a_generative_model_streams_its_answer(generative_run, tokens):
    from federimed.tracks.generative.decoder import ask

    tmp_path, final = generative_run
    client = serve(tokens, final, tmp_path)
    question = "What is the key investigation finding in Addison's disease?"
    with client.stream("POST", "/api/ask", json={"question": question}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        streamed = "".join(reply.iter_text())
    served = ServedModel.load(final)
    assert streamed.strip() == ask(served.model, served.tokenizer, question, 6)
    assert streamed.strip()  # a random tiny model still writes something
    case = "What is the most likely diagnosis for this patient?\n\n58M crushing chest pain, ST up"
    with client.stream("POST", "/api/ask", json={"question": case}) as reply:
        diagnosed = "".join(reply.iter_text())
    names = list(served.names.values())
    assert diagnosed.strip() == ask(served.model, served.tokenizer, case, 6, choices=names)
    first_line = diagnosed.split("\n")[0]
    assert first_line.split(" (the likeliest of 32 conditions, ")[0] in names, first_line
    assert client.post("/api/predict", json={"text": CASE}).status_code == 409
    assert client.post("/api/ask", json={"question": " "}).status_code == 422
    too_long = client.post("/api/ask", json={"question": "why " * 60})
    assert too_long.status_code == 413 and "over the limit of 200" in too_long.json()["detail"]
    plain = client.post("/api/ask", content=question, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and question not in plain.text
    page = client.get("/")  # its provenance: the generative track's scores
    assert "Ask a medical question" in page.text
    assert "exact match 0.0%, perplexity 19.0" in page.text
    # a zero is a score
    assert "diagnosis multiple-choice accuracy 0.0%" in client.get("/runs").text


def test_the_dashboard_follows_a_live_run_through_its_record(tiny_model, tmp_path, tokens):
    from federimed.consortium.run import ServerRun

    server = ServerRun(
        make_run(model=tiny_model, num_server_rounds=3, output_dir=str(tmp_path)), 21
    )
    client = serve(tokens, Path("latest"), tmp_path)  # the newest run's model
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
    assert "Differential privacy" not in page  # a run without DP-SGD shows no ε
    private = a_round(2).model_copy(update={"epsilon": {"hospital-1": 3.51, "hospital-2": 7.94}})
    append_round(server.out, private)  # it was only slow, and its hospitals account ε
    page = client.get("/runs/21").text
    assert "Differential privacy" in page
    assert '<tr data-hospital="hospital-2"><td>hospital-2</td><td>7.94</td></tr>' in page
    assert client.get("/api/runs/21").json()["state"] == "in progress"
    append_round(server.out, a_round(3))
    finish(server, 3)
    listed = client.get("/api/runs").json()
    assert [(r["id"], r["state"], r["rounds_completed"]) for r in listed] == [
        ("21", "completed", 3)
    ]
    page = client.get("/runs/21").text
    assert page.count('class="point"') == 3 and 'data-value="0.6000"' in page
    assert "<td>hospital-1</td><td>3.51</td>" in page  # as last reported, rounds later
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
    hospital = HospitalResult(
        train_cases=40,
        unseen_conditions=["I21"],
        bytes_per_round={},
        federated={"accuracy": 0.75, "unseen_accuracy": 0.5},
        local={"accuracy": 0.5, "unseen_accuracy": 0.0},
        centralized={"accuracy": 0.8, "unseen_accuracy": 0.6},
        centralized_tuned={"accuracy": 0.85, "unseen_accuracy": 0.7},
    )
    setup = Setup(hospitals=1, rounds=1, local_steps=2, batch_size=8, learning_rate=0.001,
                  track="classify", model="minilm", strategy="fedavg", seed=0,
                  test_cases=9)  # fmt: skip
    report = Report(
        setup=setup, tls=True, supernode_auth=True,
        network=Network(mode="loopback", superlink="127.0.0.1:1", hospitals={}),
        flower_run_id=11, flower_run={}, hospitals={"hospital-1": hospital}, rounds={},
        server_evaluation={}, update_bytes=1, trainable_parameters=1, total_parameters=2,
        wall_seconds={},
    )  # fmt: skip
    write_report(root, report)
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
    assert links and all(not link.startswith("http") or "//127.0.0.1/" in link for link in links)
    assert "cdn" not in page.text.lower()


# ------------------------------------------------------------------------------ who may use it


def test_without_credentials_the_api_gets_401_and_a_page_the_login_page(anonymous, tokens):
    for method, path in (("POST", "/api/predict"), ("GET", "/api/runs"), ("GET", "/api/model"),
                         ("GET", "/api/runs/11"), ("GET", "/openapi.json"), ("GET", "/metrics"),
                         ("POST", "/api/ask")):  # fmt: skip
        reply = anonymous.request(method, path, json={"text": CASE})
        assert reply.status_code == 401, (path, reply.text)
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "--add-token" in reply.json()["detail"] and CASE not in reply.text
    for path in ("/", "/runs", "/runs/11", "/docs"):
        reply = anonymous.get(path + "?x=1", follow_redirects=False)
        assert reply.status_code == 303 and "hospital-3" not in reply.text
        assert reply.headers["location"] == "/login?next=" + path.replace("/", "%2F") + "%3Fx%3D1"
    page = anonymous.get("/runs")  # followed: the login page
    assert page.status_code == 200 and '<form id="login" method="post"' in page.text
    assert "run 11" not in page.text.lower() and "hospital-1" not in page.text
    assert anonymous.get("/healthz").json()["status"] == "ok"  # open by default
    assert anonymous.get("/static/style.css").status_code == 200  # the login page's look
    wrong = {"Authorization": f"Bearer {USER}.{'x' * 43}"}
    assert anonymous.get("/api/runs", headers=wrong).status_code == 401
    assert anonymous.get("/api/runs", headers={"Authorization": "Basic abc"}).status_code == 401
    right = {"Authorization": f"Bearer {tokens[1]}"}
    assert anonymous.get("/api/runs", headers=right).status_code == 200


def test_healthz_and_metrics_are_each_configurable(classifier_run, tokens):
    root, run_dir = classifier_run
    path, token = tokens

    def app(**settings):
        return TestClient(load_app(run_dir / "final", root, LIMITS, access(path, **settings)),
                          base_url=HOST)  # fmt: skip

    closed = app(healthz="auth", metrics="open")
    assert closed.get("/healthz").status_code == 401
    assert (
        closed.get("/metrics").status_code == 200
        and "federimed_run_info" in closed.get("/metrics").text
    )
    off = app(metrics="off")
    bearer = {"Authorization": f"Bearer {token}"}
    assert off.get("/metrics", headers=bearer).status_code == 404
    assert off.get("/healthz").status_code == 200


def test_a_person_signs_in_on_the_login_page_with_a_signed_session_cookie(tmp_path, client):
    path = tmp_path / "tokens"
    token = add_token(path, "nurse.joy")
    web = TestClient(_same_app(client, path), base_url=HOST)
    wrong = web.post("/login", data={"token": "nurse.joy." + "y" * 43, "next": "/runs"})
    assert (
        wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    )
    reply = web.post("/login", data={"token": token, "next": "/runs"}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/runs"
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("federimed_session=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"):
        assert flag in cookie, cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never return
    assert token not in cookie and token.split(".")[-1] not in cookie
    page = web.get("/runs")
    assert page.status_code == 200 and "Sign out" in page.text and "nurse.joy" in page.text
    assert web.post("/api/predict", json={"text": CASE}).status_code == 200  # the page's fetch
    cross = web.post("/api/predict", json={"text": CASE}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403  # the cookie's second lock, after SameSite
    same = web.post("/api/predict", json={"text": CASE}, headers={"Origin": HOST})
    assert same.status_code == 200
    forged = web.cookies["federimed_session"][:-2] + "AA"
    assert (
        TestClient(web.app, base_url=HOST, cookies={"federimed_session": forged})
        .get("/api/runs")
        .status_code
        == 401
    )
    add_token(path, "nurse.joy")  # a new token for her: the old sessions end with the old one
    assert web.get("/api/runs").status_code == 401
    # where the page sends her afterwards: this site only
    again = add_token(path, "nurse.joy")
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        reply = web.post("/login", data={"token": again, "next": target}, follow_redirects=False)
        assert reply.headers["location"] == "/", target
    assert (
        web.post("/logout", follow_redirects=False)
        .headers["set-cookie"]
        .startswith("federimed_session=;")
    )
    secure = TestClient(web.app, base_url="https://127.0.0.1")
    reply = secure.post("/login", data={"token": again}, follow_redirects=False)
    assert "; Secure" in reply.headers["set-cookie"]  # over HTTPS


def _same_app(client: TestClient, tokens_file: Path):
    """The module's classifier web app, with another tokens file."""
    app = client.app
    source = app.state.models
    return create_app(source, source.runs, LIMITS, access(tokens_file))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True), ("localhost:8080", True), ("[::1]:8080", True),
        ("10.20.30.40", True), ("webapp:8080", True), ("ai.hospital.example", True),
        ("evil.example", False), ("127.0.0.1.nip.io", False), ("localhost.evil.example", False),
        ("hospital.example.evil.example", False), ("", False),
    ],
)  # fmt: skip
def test_a_request_to_another_host_name_gets_400(classifier_run, tokens, host, allowed):
    """DNS rebinding: an attacker's name made to resolve to 127.0.0.1 arrives as that name."""
    root, run_dir = classifier_run
    client = serve(tokens, run_dir / "final", root, allowed_hosts="webapp, *.hospital.example")
    reply = client.get("/healthz", headers={"host": host})
    assert (reply.status_code == 200) is allowed, reply.text
    if not allowed:
        assert reply.status_code == 400 and "host name" in reply.json()["detail"]
    assert client.get("/api/runs", headers={"host": host}).status_code == (200 if allowed else 400)


def test_behind_a_single_sign_on_proxy_only_the_proxy_names_the_user(classifier_run, tmp_path):
    root, run_dir = classifier_run
    audit = tmp_path / "audit.jsonl"
    control = access(tmp_path / "no-tokens", auth="proxy-header", trusted_proxies="10.1.2.0/24",
                     audit_log=audit)  # fmt: skip
    app = load_app(run_dir / "final", root, LIMITS, control)
    proxy = TestClient(app, base_url=HOST, client=("10.1.2.3", 40000))
    named = {"X-Forwarded-User": "dr.who@hospital.example"}
    assert proxy.post("/api/predict", json={"text": CASE}, headers=named).status_code == 200
    assert json.loads(audit.read_text())["user"] == "dr.who@hospital.example"
    assert proxy.get("/api/runs").status_code == 401  # the proxy did not say who
    forger = TestClient(app, base_url=HOST, client=("10.9.9.9", 40000))
    assert forger.get("/api/runs", headers=named).status_code == 401
    assert "single-sign-on" in forger.get("/").text
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        ServeSettings(auth="proxy-header")


def test_every_query_is_audited_with_who_and_which_model_never_the_text(
    classifier_run, tokens, tmp_path
):
    root, run_dir = classifier_run
    audit = tmp_path / "audit" / "audit.jsonl"
    client = serve(tokens, run_dir / "final", root, audit_log=audit)
    marker = "ZEBRA-9913 " + CASE
    assert client.post("/api/predict", json={"text": marker}).status_code == 200
    assert client.post("/api/ask", json={"question": marker}).status_code == 409
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["user"], r["route"], r["outcome"]) for r in lines] == [
        (USER, "/api/predict", "answered"), (USER, "/api/ask", "refused: 409"),
    ]  # fmt: skip
    assert lines[0]["model"] == {"run_id": 11, "folder": "final", "kind": "classify"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", lines[0]["time"])
    assert "ZEBRA" not in audit.read_text()
    assert audit.stat().st_mode & 0o777 == 0o600


def test_token_files_hold_salted_hashes_only_and_are_private(classifier_run, tmp_path, capsys):
    root, run_dir = classifier_run
    path = tmp_path / "new" / "serve-tokens"
    assert main(["serve", "--add-token", "alice", "--tokens", str(path)]) == 0
    printed = capsys.readouterr()
    token = printed.out.strip()
    assert token.startswith("alice.") and len(token) > 40 and "shown only now" in printed.err
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    text = path.read_text()
    assert token not in text and token.split(".", 1)[1] not in text
    (line,) = [ln for ln in text.splitlines() if not ln.startswith("#")]
    name, stored = line.split(":", 1)
    assert name == "alice" and stored.startswith("scrypt$16384$8$1$")
    assert main(["serve", "--add-token", "bob", "--tokens", str(path)]) == 0
    bob = capsys.readouterr().out.strip()
    assert path.stat().st_mode & 0o777 == 0o600
    salts = [ln.split("$")[4] for ln in path.read_text().splitlines() if "$" in ln]
    assert len(set(salts)) == 2  # salted: equal tokens would not give equal lines
    client = signed_in(load_app(run_dir / "final", root, LIMITS, access(path)), token)
    assert client.get("/api/runs").status_code == 200
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {bob}"}).status_code == 200
    assert main(["serve", "--revoke-token", "alice", "--tokens", str(path)]) == 0
    assert client.get("/api/runs").status_code == 401  # the file is re-read when it changes
    assert main(["serve", "--add-token", "no good", "--tokens", str(path)]) == 2


def test_a_new_token_is_checked_once_however_many_bring_it_and_a_flood_waits_for_nobody(
    tmp_path, monkeypatch
):
    """scrypt costs tens of ms: 50 requests arriving at once with the same new token pay it
    once, later ones not at all; with 64 checks of other tokens waiting, a new one is refused
    at once instead of queueing behind them."""
    from federimed.webapp import access as module

    path = tmp_path / "tokens"
    token = add_token(path, "dr.quinn")
    control = access(path)
    calls = []
    real = module.token_matches
    monkeypatch.setattr(module, "token_matches", lambda *a: calls.append(1) or real(*a))

    async def together(n: int) -> list:
        return await asyncio.gather(*(control.check_token(token) for _ in range(n)))

    assert asyncio.run(together(50)) == ["dr.quinn"] * 50
    assert asyncio.run(together(5)) == ["dr.quinn"] * 5
    assert len(calls) == 1
    gate = threading.Event()
    monkeypatch.setattr(module, "token_matches", lambda *a: gate.wait(30) and False)

    async def flood() -> list:
        wrong = [control.check_token(f"dr.quinn.{i:043d}") for i in range(module.MAX_CHECKS)]
        waiting = [asyncio.ensure_future(w) for w in wrong]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        refused = await control.check_token(f"dr.quinn.{'z' * 43}")
        quick = time.monotonic() - started
        gate.set()
        return [refused, quick, await asyncio.gather(*waiting)]

    refused, quick, rest = asyncio.run(flood())
    assert refused is None and quick < 0.5 and rest == [None] * module.MAX_CHECKS


def test_a_token_check_that_is_done_before_it_is_awaited_does_not_hang(tmp_path):
    """A check can finish before its callback is registered (a busy machine preempts the event
    loop between the two); the callback then runs at once, in the event loop's thread.  It once
    took a lock that thread already held: the web app stopped answering, /healthz included."""
    path = tmp_path / "tokens"
    token = add_token(path, "dr.quinn")
    control = access(path)

    class Finished:  # an executor whose work is done by the time submit returns
        def submit(self, work, *args):
            done: Future = Future()
            done.set_result(work(*args))
            return done

    control._checking = Finished()
    answers: list = []
    checking = threading.Thread(
        target=lambda: answers.append(asyncio.run(control.check_token(token))), daemon=True
    )
    checking.start()
    checking.join(10)
    assert answers == ["dr.quinn"] and control._pending == {}


def test_serve_on_loopback_makes_the_tokens_file_on_its_first_start(
    classifier_run, tmp_path, capsys, monkeypatch
):
    """`make serve` after `make demo`: the first start prints one token for the person, once."""
    import uvicorn

    root, run_dir = classifier_run
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    path = tmp_path / "config" / "serve-tokens"
    argv = ["serve", "--model", str(run_dir / "final"), "--runs", str(root), "--tokens", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    token = re.search(r"^  (\S+)$", out, re.MULTILINE)[1]
    assert "first start" in out and path.stat().st_mode & 0o777 == 0o600
    assert token not in path.read_text()
    assert started[0]["host"] == "127.0.0.1" and started[0]["proxy_headers"] is False
    assert main(argv) == 0  # the second start: no new token
    assert "first start" not in capsys.readouterr().out
    elsewhere = tmp_path / "elsewhere"
    assert main([*argv[:-1], str(elsewhere), "--host", "0.0.0.0"]) == 0
    assert "nobody can sign in until" in capsys.readouterr().out and not elsewhere.exists()


def test_serve_flags_say_what_their_settings_say_and_only_a_given_one_beats_the_variable(
    tmp_path, capsys, monkeypatch
):
    """Each flag's help is its ServeSettings field's description, default and variable; an
    unset flag leaves FEDERIMED_SERVE_* in force, a given one wins over it."""
    import uvicorn

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # as one line, however argparse wraps it
    for name, default in (("port", "8080"), ("max_chars", "4000"), ("auth", "token")):
        description = ServeSettings.model_fields[name].description.rstrip(".")
        env = f"FEDERIMED_SERVE_{name.upper()}"
        assert f"{description} (default: {default}; env {env})" in shown
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    monkeypatch.setenv("FEDERIMED_SERVE_AUTH", "none")
    monkeypatch.setenv("FEDERIMED_SERVE_PORT", "8181")
    assert main(["serve", "--runs", str(tmp_path)]) == 0
    assert main(["serve", "--runs", str(tmp_path), "--port", "8282"]) == 0
    assert [kw["port"] for kw in started] == [8181, 8282]
    assert "auth none" in capsys.readouterr().out


# ------------------------------------------------------------------------------ limits


class SlowModel(ServedModel):
    """A generative model that writes a piece every ``pause`` seconds, ``pieces`` of them,
    after ``gate`` opens: what a busy model looks like to the web app, without a model."""

    def __init__(self, pieces: int = 10_000, pause: float = 0.01, gate=None):
        super().__init__("generative", Path("slow"), None, None, None, {})
        self.pieces, self.pause, self.gate = pieces, pause, gate
        self.written = 0

    def _generate(self, question, max_new_tokens, on_text):
        if self.gate is not None:
            self.gate.wait(60)
        for i in range(self.pieces):
            time.sleep(self.pause)
            on_text(f"w{i} ")
            self.written += 1


class SlowClassifier(ServedModel):
    def __init__(self, gate):
        super().__init__("classify", Path("slow"), None, None, None, {})
        self.gate = gate

    def predict(self, text, k=5):
        self.gate.wait(60)
        return []


def _app(tmp_path, served, tokens, **limits):
    source = ModelSource(None, RunIndex(tmp_path))
    source.served = served
    path, _ = tokens
    app = create_app(source, source.runs, ServeLimits(max_chars=200, max_new_tokens=6, **limits),
                     access(path))  # fmt: skip
    return app


@contextlib.contextmanager
def _running(app) -> Iterator[int]:
    """A real uvicorn on loopback (real connections: a client can leave), its port."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)


def _open_answer(port: int, token: str, question: str = "What causes gout?") -> socket.socket:
    """A client that asked and is reading the streamed answer (the response has started)."""
    body = json.dumps({"question": question}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def _get(port: int, path: str, token: str | None = None, timeout: float = 5):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    connection.request("GET", path, headers=headers)
    reply = connection.getresponse()
    body = reply.read()
    connection.close()
    return reply.status, time.monotonic() - started, body


def _answer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "federimed-answer"]


def test_50_open_answers_do_not_stall_healthz_or_the_pages(tmp_path, tokens):
    """The model busy with one answer and 49 waiting their turn: /healthz, the runs API and the
    dashboard (synchronous routes, on anyio's shared pool of 40 threads) answer at once."""
    gate = threading.Event()
    served = SlowModel(pieces=3, gate=gate)
    app = _app(tmp_path, served, tokens, max_generations=50)
    token = tokens[1]
    with _running(app) as port:
        streams = [_open_answer(port, token) for _ in range(50)]
        try:
            assert app.state.admissions["ask"].inside == 50
            for path, who in (("/healthz", None), ("/api/runs", token), ("/runs", token),
                              ("/api/model", token)):  # fmt: skip
                status, seconds, _ = _get(port, path, who)
                assert status in (200, 404) and seconds < 1.0, (path, status, seconds)
        finally:
            gate.set()
            for stream in streams:
                stream.close()
        deadline = time.monotonic() + 10
        while _answer_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _answer_threads() == [] and app.state.admissions["ask"].inside == 0


def test_one_answer_more_than_allowed_gets_429_with_retry_after(tmp_path, tokens):
    gate = threading.Event()
    app = _app(tmp_path, SlowModel(gate=gate), tokens, max_generations=2)
    with _running(app) as port:
        streams = [_open_answer(port, tokens[1]) for _ in range(2)]
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST", "/api/ask", json.dumps({"question": "Gout?"}),
                               {"Content-Type": "application/json",
                                "Authorization": f"Bearer {tokens[1]}"})  # fmt: skip
            reply = connection.getresponse()
            assert reply.status == 429 and reply.getheader("Retry-After") == "5"
            assert "2 answers in progress" in json.loads(reply.read())["detail"]
            assert _get(port, "/healthz")[0] == 200
        finally:
            gate.set()
            for stream in streams:
                stream.close()


def test_one_prediction_more_than_allowed_gets_429_with_retry_after(tmp_path, tokens):
    gate = threading.Event()
    app = _app(tmp_path, SlowClassifier(gate), tokens, max_predictions=2)
    client = signed_in(app, tokens[1])
    with _running(app) as port:

        def post() -> int:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/api/predict", json.dumps({"text": CASE}),
                               {"Content-Type": "application/json",
                                "Authorization": f"Bearer {tokens[1]}"})  # fmt: skip
            return connection.getresponse().status

        waiting = [threading.Thread(target=post) for _ in range(2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while app.state.admissions["predict"].inside < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/api/predict", json={"text": CASE})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert _get(port, "/healthz")[1] < 1.0
        gate.set()
        for thread in waiting:
            thread.join(10)
    assert app.state.admissions["predict"].inside == 0


def test_a_client_that_leaves_stops_its_generation(tmp_path, tokens):
    served = SlowModel(pieces=100_000, pause=0.005)
    app = _app(tmp_path, served, tokens)
    with _running(app) as port:
        stream = _open_answer(port, tokens[1])
        got = b""
        while b"w5 " not in got:
            got += stream.recv(4096)
        (thread,) = _answer_threads()
        stream.close()  # the person closed the tab
        thread.join(5)
        assert not thread.is_alive(), "the generation went on without its client"
        written = served.written
        time.sleep(0.2)
        assert served.written == written < 100_000
        assert app.state.admissions["ask"].inside == 0  # its place is free again


def test_stopping_ends_a_real_models_generation_at_the_next_piece(generative_run):
    """The stop reaches into transformers' generate loop (the streamer's callback raises)."""
    _, final = generative_run
    served = ServedModel.load(final)
    question = "What is the key investigation finding in Addison's disease?"
    everything: list[str] = []
    assert served.answer(question, 40, everything.append, threading.Event()) is True
    assert len(everything) > 3  # a random tiny model writes many pieces
    stop = threading.Event()
    pieces: list[str] = []

    def first_only(text: str) -> None:
        pieces.append(text)
        stop.set()  # the client left after the first piece

    assert served.answer(question, 40, first_only, stop) is False
    assert pieces == everything[:1]
    assert served.lock.acquire(blocking=False)  # and the model is free for the next one
    served.lock.release()


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: Iterator[bytes]):
    """Drive the ASGI app by hand: (status, how many body chunks it pulled)."""
    pulled, sent = 0, []
    source = iter(chunks)

    async def receive():
        nonlocal pulled
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                    *headers],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], pulled


def test_a_10_mb_body_is_refused_without_being_read_whole(tmp_path, tokens):
    """413 at once when Content-Length says so, and after one chunk past the limit when it does
    not (chunked): the handler never runs, nothing parses the rest."""
    gate = threading.Event()
    gate.set()
    served = SlowClassifier(gate)
    calls = []
    served.predict = lambda text, k=5: calls.append(text) or []
    app = _app(tmp_path, served, tokens)
    auth = (b"authorization", f"Bearer {tokens[1]}".encode())
    ten_mb, chunk = 10 * 1024 * 1024, 64 * 1024
    limit = 12 * 200 + 4096  # the default: 12 bytes a character + 4 KiB

    def body() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(ten_mb // chunk):
            yield b"x" * chunk

    status, pulled = _asgi_post(app, [auth, (b"content-length", str(ten_mb).encode())], body())
    assert (status, pulled) == (413, 0)
    status, pulled = _asgi_post(app, [auth], body())  # no length given: counted as it comes
    assert status == 413 and pulled <= limit // chunk + 2, pulled
    assert calls == []
    small = json.dumps({"text": CASE}).encode()
    assert _asgi_post(app, [auth], iter([small]))[0] == 200 and len(calls) == 1
    status, pulled = _asgi_post(app, [], body())  # no credentials: refused before any byte
    assert (status, pulled) == (401, 0)


def test_a_large_declared_body_is_refused_over_a_real_connection(tmp_path, tokens):
    app = _app(tmp_path, SlowModel(), tokens)
    with _running(app) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(
            b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {tokens[1]}\r\n".encode()
            + b"Content-Length: 10485760\r\n\r\n"
            + b"x" * 1000
        )  # 1 KB of the 10 MB sent: the answer comes without the rest
        reply = sock.recv(4096)
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply


def test_the_web_app_loads_no_plotting_library():
    """Its run pages read the report's measures from federimed.research.measures, not
    federimed.research.report (which draws with matplotlib: seconds of import and memory in every
    web app process)."""
    import subprocess
    import sys

    probe = (
        "import sys, federimed.webapp.app;"
        "print(sorted({'matplotlib', 'federimed.research.report'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
