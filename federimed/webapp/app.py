"""The FastAPI application: clinician page, JSON API, operator dashboard, metrics.

Case text and questions are never logged or stored: request logging is uvicorn's access log
(method and path only), the audit line names who asked which model, and no handler writes
either anywhere.

Before a route runs, outermost first: the request counter (every refusal counted too), who is
asking and under which Host name (:mod:`federimed.webapp.access`: 400, 401 or the login page),
the body's size (:class:`~federimed.webapp.limits.BodyLimit`: 413 before parsing), JSON only
(415). The model's work runs on threads of its own (a one-thread pool for the classifier, a
thread per answer for a generative model, each admitted within a cap, 429 beyond), never on
anyio's shared pool, so /healthz and the pages answer while the model is busy.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.routing import Match

from federimed.tracks import track_for
from federimed.webapp.access import AccessControl, AccessMiddleware, refuse, safe_next
from federimed.webapp.chart import round_chart
from federimed.webapp.limits import Admission, AnswerResponse, BodyLimit
from federimed.webapp.metrics import WebMetrics
from federimed.webapp.runs import RunIndex
from federimed.webapp.served import Answer, ModelSource, ServedModel

PACKAGE = files("federimed.webapp")
NO_MODEL = "no model is served here yet (--model DIR, or --model latest once a run completed)"
BANNER = (
    "Research prototype, trained on synthetic data: not for clinical use. Every suggestion "
    "needs a clinician's judgement."
)


# Retry-After (seconds) of a refusal for capacity: a prediction takes milliseconds, an answer
# seconds.
RETRY_PREDICT, RETRY_ASK = 1, 5


class ServeLimits(BaseModel):
    max_chars: int
    max_new_tokens: int
    max_body_bytes: int | None = None  # None: 12 bytes per character + 4 KiB
    max_generations: int = 2
    max_predictions: int = 32

    @property
    def body_bytes(self) -> int:
        return self.max_body_bytes or 12 * self.max_chars + 4096


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


def create_app(
    models: ModelSource,
    runs: RunIndex,
    limits: ServeLimits,
    access: AccessControl | None = None,
) -> FastAPI:
    """``access`` None: no access control at all (an in-process app: tests, or embedding behind
    one's own); `federimed serve` always passes one (:meth:`AccessControl.from_settings`)."""
    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours is rendered here.
    app = FastAPI(
        title="FederiMed",
        description="Query the federated model; follow the federation's runs.",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )

    def signed_in(request: Request) -> dict[str, Any]:
        state = request.scope.get("state", {})
        shows = access is not None and access.mode == "token" and state.get("auth") == "session"
        return {"user": state.get("user"), "sign_out": shows}

    templates = Jinja2Templates(
        directory=str(PACKAGE / "templates"), context_processors=[signed_in]
    )
    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    metrics = WebMetrics(runs)
    app.state.metrics = metrics
    app.state.models = models
    predictions = Admission(limits.max_predictions, RETRY_PREDICT)
    generations = Admission(limits.max_generations, RETRY_ASK)
    app.state.admissions = {"predict": predictions, "ask": generations}
    # The classifier's forward passes take turns on this one thread (the model's lock would
    # serialise them anyway); requests waiting for it hold no thread.
    model_work = ThreadPoolExecutor(1, thread_name_prefix="federimed-model")
    audit = access.audit if access is not None else None

    def who(request: Request) -> str | None:
        return request.scope.get("state", {}).get("user")

    def record(request: Request, model: ServedModel | None, outcome: str) -> None:
        if audit is not None:
            audit.record(who(request), request.url.path, model.describe() if model else None,
                         outcome)  # fmt: skip

    # Pure ASGI middleware, added innermost first: the last one added runs first.
    def json_only(inner):
        async def check(scope, receive, send):
            """The API's POST bodies are JSON: anything else is refused before it is read."""
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] != "/logout":
                kind = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
                kind = kind.decode("latin-1").split(";")[0].strip().lower()
                wanted = FORM if scope["path"] in FORM_PATHS else "application/json"
                if kind != wanted:
                    detail = f"content type {kind or '(none)'}: send {wanted}"
                    await refuse(send, 415, detail)
                    return
            await inner(scope, receive, send)

        return check

    def counted(inner):
        async def count(scope, receive, send):
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            started = time.perf_counter()
            done = False

            async def observe(message):
                nonlocal done
                if message["type"] == "http.response.start" and not done:
                    done = True
                    path = _route_path(app, scope)
                    status = str(message["status"])
                    metrics.requests.labels(path, scope["method"], status).inc()
                    metrics.latency.labels(path).observe(time.perf_counter() - started)
                await send(message)

            await inner(scope, receive, observe)

        return count

    app.add_middleware(_Wrap, wrap=json_only)
    if access is not None:
        app.add_middleware(AccessMiddleware, control=access)
    app.add_middleware(BodyLimit, limit=limits.body_bytes)
    # Added last, so outermost: it also counts what is refused before routing.
    app.add_middleware(_Wrap, wrap=counted)

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
            other = track_for(model.kind).api
            raise HTTPException(409, f"this is a {model.kind} model: use {other}")
        return model

    def model_info() -> dict[str, Any] | None:
        model = models.current()
        return model.describe() if model else None

    def busy(admission: Admission, what: str) -> JSONResponse:
        detail = (
            f"busy: {admission.capacity} {what} in progress, the most at once; try again in "
            f"{admission.retry_after} s"
        )
        headers = {"Retry-After": str(admission.retry_after)}
        return JSONResponse({"detail": detail}, status_code=429, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Up, and which kind of model it serves (null: none yet). Answered on the event
        loop, without waiting for the model or a thread: it answers while the model is busy."""
        model = models.served
        return {"status": "ok", "model": model.kind if model else None}

    @app.post(
        "/api/predict",
        responses={429: {"description": "busy: too many requests in progress (Retry-After)"}},
    )
    async def predict(request: Request, body: CaseText) -> Any:
        """The 5 most probable diagnoses for a case (classifier models)."""
        text = _checked(body.text, "text", limits)
        ticket = predictions.enter()
        if ticket is None:
            record(request, models.served, "refused: busy")
            return busy(predictions, "predictions")

        def work() -> tuple[ServedModel, list[Any]]:
            served = need("classify")
            return served, served.predict(text, k=5)

        try:
            served, top = await asyncio.get_running_loop().run_in_executor(model_work, work)
        except HTTPException as error:
            record(request, models.served, f"refused: {error.status_code}")
            raise
        finally:
            ticket.release()
        record(request, served, "answered")
        return {"predictions": [p.__dict__ for p in top], "model": served.describe()}

    @app.post(
        "/api/ask",
        responses={429: {"description": "busy: too many answers in progress (Retry-After)"}},
    )
    async def ask(request: Request, body: Question) -> Response:
        """The answer of a generative model, streamed as plain text while it is generated; it
        stops being generated when the client goes away."""
        question = _checked(body.question, "question", limits)
        try:
            served = await asyncio.get_running_loop().run_in_executor(
                model_work, need, "generative"
            )
        except HTTPException as error:
            record(request, models.served, f"refused: {error.status_code}")
            raise
        ticket = generations.enter()
        if ticket is None:
            record(request, served, "refused: busy")
            return busy(generations, "answers")
        record(request, served, "answered")
        return AnswerResponse(Answer(served, question, limits.max_new_tokens, ticket.release))

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

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, target: str = Query("/", alias="next")) -> Response:
        if who(request) is not None and access is not None and access.mode != "none":
            return RedirectResponse(safe_next(target), status_code=303)
        return _login(request, safe_next(target), None, 200)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The login form: a token from the tokens file, exchanged for a session cookie."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        target = safe_next((form.get("next") or ["/"])[0])
        token = (form.get("token") or [""])[0].strip()
        if access is None or access.mode != "token":
            return RedirectResponse(target, status_code=303)
        name = await access.check_token(token) if token else None
        if name is None:
            return _login(request, target, "That token is not valid.", 401)
        https = request.scope.get("state", {}).get("https", False)
        cookie = access.cookie(access.sessions.issue(name, access.users()[name]), https)
        return RedirectResponse(target, status_code=303, headers={"set-cookie": cookie})

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        if access is not None:
            https = request.scope.get("state", {}).get("https", False)
            response.headers["set-cookie"] = access.cookie("", https, clear=True)
        return response

    def _login(request: Request, target: str, problem: str | None, status: int) -> Response:
        context = {
            "banner": BANNER,
            "next": target,
            "problem": problem,
            "mode": access.mode if access is not None else "none",
        }
        return templates.TemplateResponse(request, "login.html", context, status_code=status)

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


FORM = "application/x-www-form-urlencoded"
FORM_PATHS = ("/login",)  # /logout reads no body


class _Wrap:
    """A pure ASGI middleware made of a function: ``wrap(inner) -> app``."""

    def __init__(self, app, wrap):
        self.call = wrap(app)

    async def __call__(self, scope, receive, send) -> None:
        await self.call(scope, receive, send)


def load_app(
    model_dir: Path | None,
    runs_dir: Path | None,
    limits: ServeLimits,
    access: AccessControl | None = None,
) -> FastAPI:
    """What `federimed serve` runs: a named model is loaded before the first request."""
    runs = RunIndex(runs_dir)
    return create_app(ModelSource(model_dir, runs), runs, limits, access)
