"""The FastAPI application: clinician page, JSON API, operator dashboard, metrics.

Case text and questions are never logged or stored: request logging is uvicorn's access log
(method and path only) and no handler writes either anywhere.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.routing import Match

from federimed.webapp.chart import round_chart
from federimed.webapp.metrics import WebMetrics
from federimed.webapp.runs import RunIndex
from federimed.webapp.served import ModelSource, ServedModel

PACKAGE = files("federimed.webapp")
NO_MODEL = "no model is served here yet (--model DIR, or --model latest once a run completed)"
BANNER = (
    "Research prototype, trained on synthetic data: not for clinical use. Every suggestion "
    "needs a clinician's judgement."
)


class ServeLimits(BaseModel):
    max_chars: int
    max_new_tokens: int


class CaseText(BaseModel):
    text: str = Field(description="The case description (free text).")


class Question(BaseModel):
    question: str = Field(description="A medical question, answered by a generative model.")


def _checked(text: str, field: str, limits: ServeLimits) -> str:
    text = text.strip()
    if not text:
        raise HTTPException(422, f"{field}: empty; type or paste some text")
    if len(text) > limits.max_chars:
        raise HTTPException(
            413, f"{field}: {len(text)} characters, over the limit of {limits.max_chars}"
        )
    return text


def _route_path(app: FastAPI, scope: dict[str, Any]) -> str:
    """The route's template (/api/runs/{run_id}), never the raw path: a label per distinct URL
    would grow without bound.  A request refused before routing is matched here."""
    route = scope.get("route") or next(
        (r for r in app.router.routes if r.matches(scope)[0] == Match.FULL), None
    )
    return getattr(route, "path", "unmatched")


def create_app(models: ModelSource, runs: RunIndex, limits: ServeLimits) -> FastAPI:
    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours is rendered here.
    app = FastAPI(
        title="FederiMed",
        description="Query the federated model; follow the federation's runs.",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    templates = Jinja2Templates(directory=str(PACKAGE / "templates"))
    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    metrics = WebMetrics(runs)
    app.state.metrics = metrics

    @app.middleware("http")
    async def json_only(request: Request, call_next):
        """The API's POST bodies are JSON: anything else is refused before it is read."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json":
            detail = f"content type {kind or '(none)'}: send application/json"
            return JSONResponse({"detail": detail}, status_code=415)
        return await call_next(request)

    # Added last, so outermost: it also counts what json_only refuses before routing.
    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        path = _route_path(app, request.scope)
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        """A wrong body or content type: named, without echoing the text back."""
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in error.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    def need(kind: str) -> ServedModel:
        model = models.current()
        if model is None:
            raise HTTPException(404, NO_MODEL)
        if model.kind != kind:
            other = "/api/ask" if model.kind == "generative" else "/api/predict"
            raise HTTPException(409, f"this is a {model.kind} model: use {other}")
        return model

    def model_info() -> dict[str, Any] | None:
        model = models.current()
        return model.describe() if model else None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Up, and which kind of model it serves (null: none yet)."""
        model = models.current()
        return {"status": "ok", "model": model.kind if model else None}

    @app.post("/api/predict")
    def predict(body: CaseText) -> dict[str, Any]:
        """The 5 most probable diagnoses for a case (classifier models)."""
        served = need("classify")
        text = _checked(body.text, "text", limits)
        predictions = served.predict(text, k=5)
        return {"predictions": [p.__dict__ for p in predictions], "model": served.describe()}

    @app.post("/api/ask")
    def ask(body: Question) -> StreamingResponse:
        """The answer of a generative model, streamed as plain text while it is generated."""
        served = need("generative")
        question = _checked(body.question, "question", limits)
        stream = served.answer_stream(question, limits.max_new_tokens)
        return StreamingResponse(stream, media_type="text/plain; charset=utf-8")

    @app.get("/api/model")
    def about_model() -> dict[str, Any]:
        """The served model's kind and provenance (run, date, hospitals, rounds, test score)."""
        about = model_info()
        if about is None:
            raise HTTPException(404, NO_MODEL)
        return about

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        """Every run under the runs folder, newest first, with its state and latest score."""
        return [run.to_json(detail=False) for run in runs.runs()]

    @app.get("/api/runs/{run_id}")
    def one_run(run_id: str) -> dict[str, Any]:
        """One run: its config, every round's record, its summary and the demo's comparison."""
        run = runs.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id} under the runs folder")
        return run.to_json()

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs(request: Request) -> HTMLResponse:
        """The OpenAPI description as a page, with no script and no CDN."""
        context = {"spec": app.openapi(), "banner": BANNER}
        return templates.TemplateResponse(request, "docs.html", context)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def clinician(request: Request) -> HTMLResponse:
        context = {
            "model": model_info(),
            "follow": models.follow,
            "banner": BANNER,
            "limits": limits,
        }
        return templates.TemplateResponse(request, "index.html", context)

    @app.get("/runs", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request) -> HTMLResponse:
        context = {"runs": runs.runs(), "root": runs.root, "banner": BANNER}
        return templates.TemplateResponse(request, "runs.html", context)

    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        run = runs.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id} under the runs folder")
        context = {"run": run, "chart": round_chart(run), "banner": BANNER}
        return templates.TemplateResponse(request, "run.html", context)

    return app


def load_app(model_dir: Path | None, runs_dir: Path | None, limits: ServeLimits) -> FastAPI:
    """What `federimed serve` runs: a named model is loaded before the first request."""
    runs = RunIndex(runs_dir)
    return create_app(ModelSource(model_dir, runs), runs, limits)
