"""The FastAPI app: thin routes over the codecs (``service.decode``, ``service.encode``), the model registry and
the metrics.

Every client mistake becomes an RFC 9457 problem+json with the field named; nothing else reaches the client
but a generic 500 problem (the stack trace stays in the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelcard.card import CALENDAR_CLOCK, loop_limits
from modelcard.objective import Objective
from modelcard.runtime import ModelRuntime
from optimizer.search import Situation
from optimizer.search import optimize as search_plan
from service import forecasting, metrics
from service.auth import require_key
from service.decode import decode, publish_limits
from service.encode import ForecastResponse, SeriesFacts, answer_response
from service.logs import setup_logging
from service.memory import fix_mmap_threshold, release_memory
from service.middleware import ObserveMiddleware, problem
from service.optimize import (
    OptimizeRequest,
    OptimizeResponse,
    encode_advice,
    objective_of,
    parse_optimize,
    search_settings,
    situation_of,
)
from service.parse import field_name, parse, size_limits
from service.problems import PROBLEM, Errors, ProblemError
from service.registry import ModelRegistry, ReloadError
from service.request import DecodedRequest, ForecastRequest
from service.settings import Settings, find_store, get_settings

API_VERSION = "1.9.0"  # 1.1: time of day and week are inputs; 1.2: bounds, warnings, clipping, units, seed;
# 1.3: timestamps ISO 8601 only, answer-size bound, error lists capped (error_count); 1.4: looped controls left to
# their loops and forecast, setpoint plans, local times in the plant's zone, warnings have a kind (flat lines);
# 1.5: POST /optimize (setpoint advice); 1.6: a warning for a measurement missing at the history's end (stale);
# 1.7: /optimize answers the history's warnings and gaps; the schema allows null in history arrays; 1.8: /optimize
# echoes the series' id and checks quantiles as /forecast, its schema's series (OptimizeSeriesIn) requires none of
# what the objective decides; a looped control's forecast stays within its controller's limits; HEAD; no-store
# 1.9: the calendar reads the plant's wall clock whatever offset a timestamp has; keys also as bearer tokens;
# a request cut by the shutdown is a 503
log = logging.getLogger("kovae.app")


class Health(BaseModel):
    status: str


class Refusal(BaseModel):
    version: str
    reason: str


class Ready(BaseModel):
    status: str
    model_version: str | None
    refused: Refusal | None = None


class WorkerState(BaseModel):
    version: str | None
    refused: Refusal | None = None


class ReloadResult(BaseModel):
    model_version: str
    changed: bool
    workers: dict[str, WorkerState]


JSON_TYPES = ("application/json", "application/problem+json")
LARGE_BODY = 64_000
"""Bodies from this many bytes on are parsed and decoded off the event loop, in a worker thread (a day of history
for one series is ~40 kB; from 256 kB on, 250 kB bodies parsed on the loop held /healthz up to 80 ms)."""


FORECAST_BODY_DOC = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ForecastRequest"}}},
}

OPTIMIZE_BODY_DOC = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OptimizeRequest"}}},
}

PROBLEM_SCHEMA = {
    "description": "Problem details (RFC 9457)",
    "content": {
        PROBLEM: {
            "schema": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "instance": {"type": "string"},
                    "request_id": {"type": "string"},
                    "errors": {
                        "type": "array",
                        "description": "the first problems (at most 20), each naming its field",
                        "items": {
                            "type": "object",
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        },
                    },
                    "error_count": {"type": "integer", "description": "problems found in all (with errors)"},
                },
            }
        }
    },
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(settings.log_level)
    log.info("malloc's mmap threshold: %s", fix_mmap_threshold(), extra={"event": "malloc"})
    store, found_by = find_store(settings.model_store)
    log.info("model store: %s (%s)", store.resolve(), found_by, extra={"event": "model_store"})
    registry = ModelRegistry(store, settings.ort_threads, settings.runtime_dir)
    # Two inference lanes per worker, one thread each: ONNX Runtime stays on warm caches, the event loop is never
    # blocked, and a request small enough for one ONNX call (KOVAE_CHUNK_WORK steps) never queues behind a large
    # one's pieces.
    inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk")
    # Setpoint advice has a lane of its own: a search (hundreds of plans, ~0.5 s) never holds up a forecast.
    advising = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optimize")
    # Large bodies are parsed one at a time, off the event loop: a parse holds several times its body in Python
    # objects (a 3.7 MB body of 1,000 plans, tens of MB), so eight at once on the shared thread pool took a worker
    # past its container's memory limit before any of them could be refused.
    reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read")
    waiting = {"optimize": 0}  # searches queued or running in this worker
    answers = forecasting.AnswerBudget(settings.max_answers_in_flight_bytes)  # large answers' memory, this worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.reload_beside()  # a failure is logged: /readyz stays 503 until one succeeds
        registry.start(settings.poll_interval_s)
        yield
        registry.stop()
        inference.shutdown(wait=True)
        bulk.shutdown(wait=True)
        advising.shutdown(wait=True)
        reading.shutdown(wait=True)

    app = FastAPI(
        title="kovae-forecast",
        version=API_VERSION,
        description="Multi-step forecasts of an activated-sludge plant (BSM1) from a stable Koopman VAE.",
        lifespan=lifespan,
        docs_url=None,  # the Swagger page loads its scripts from a public CDN; plant networks are often offline
        redoc_url=None,
        redirect_slashes=False,  # a redirect to "/forecast" would be built from the client's own Host header
    )
    app.state.registry = registry
    app.state.settings = settings

    # ------------------------------------------------------------------ middleware and errors

    app.add_middleware(
        ObserveMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        metrics.ERRORS.labels("invalid_request" if exc.status == 422 else f"http_{exc.status}").inc()
        log.info("%d %s: %s", exc.status, exc.title, exc.detail[:1000], extra={"event": "refused"})
        response = problem(request, exc.status, exc.title, exc.detail, exc.errors, exc.count)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = Errors()
        for e in exc.errors():
            errors.add(field_name(e["loc"]), e["msg"])
        return await on_problem(request, ProblemError(422, "Invalid request", errors.listed, count=errors.count))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.ERRORS.labels(f"http_{exc.status_code}").inc()
        response = problem(request, exc.status_code, str(exc.detail), str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    # ------------------------------------------------------------------ auth

    # async, so FastAPI runs them inline: a plain def dependency costs a hop through the thread pool.
    async def forecast_auth(request: Request) -> None:
        if settings.api_keys:
            require_key(request, settings.api_keys)

    async def admin_auth(request: Request) -> None:
        if not settings.admin_api_keys:
            raise ProblemError(403, "Admin endpoints are disabled", detail="set KOVAE_ADMIN_API_KEYS to enable them")
        require_key(request, settings.admin_api_keys, "admin ")

    async def info_auth(request: Request) -> None:
        if settings.protect_info:
            await forecast_auth(request)

    def serving() -> ModelRuntime:
        rt = registry.runtime
        if rt is None:
            raise ProblemError(503, "No model loaded", detail="the service has no model yet; see /readyz")
        return rt

    def read(body: bytes, rt: ModelRuntime) -> DecodedRequest:
        """Bytes to the runtime's arrays, every size rule first (service.parse, then service.decode)."""
        return decode(parse(body, size_limits(rt, settings)), rt, settings)

    def read_optimize(body: bytes, rt: ModelRuntime) -> tuple[OptimizeRequest, Objective, Situation, SeriesFacts]:
        """Bytes to the search's inputs: the request, its objective, and the series decoded and checked."""
        req = parse_optimize(body, rt, settings)
        objective = objective_of(req, rt)
        situation, facts = situation_of(req, rt, settings, objective)
        return req, objective, situation, facts

    errors_doc: dict[int | str, dict[str, Any]] = {code: PROBLEM_SCHEMA for code in (401, 408, 413, 415, 422, 501, 503)}

    # ------------------------------------------------------------------ routes

    @app.post(
        "/forecast",
        response_model=ForecastResponse,
        responses=errors_doc,
        dependencies=[Depends(forecast_auth)],
        openapi_extra={"requestBody": FORECAST_BODY_DOC},
    )
    async def forecast(request: Request) -> Response:
        """Forecast every series in the body over `horizon` steps, in engineering units."""
        check_body_headers(request)
        body = await request.body()
        rt = serving()  # one reference for the whole request, even if a reload swaps the model meanwhile
        # A large body is read off the event loop, so that other requests' I/O goes on meanwhile, and the memory
        # its parse took is handed back afterwards, whatever the outcome.
        if len(body) < LARGE_BODY:
            decoded = read(body, rt)
        else:
            try:
                decoded = await asyncio.get_running_loop().run_in_executor(reading, read, body, rt)
            finally:
                del body
                asyncio.get_running_loop().run_in_executor(bulk, release_memory)
        held = answers.reserve(decoded.answer_bytes)  # 503 here, before any inference, past the budget
        metrics.HORIZON.observe(decoded.horizon)
        metrics.BATCH.observe(len(decoded.x_hist))
        for facts in decoded.facts:
            metrics.count_warnings(facts.warnings)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        # The fast lane takes a request whose calls together are at most one call's bound (forecasting.steps: the
        # trajectories rolled out and the histories encoded, not samples x horizon alone); a larger one runs in
        # calls of that bound on the bulk lane.
        fast = forecasting.request_steps(decoded, rt.max_horizon) <= settings.chunk_work
        lane = inference if fast else bulk
        fragments: list[forecasting.Fragment] = []
        response: Response | None = None
        try:
            for piece in forecasting.pieces(rt, decoded, settings.chunk_work):
                fragments += await loop.run_in_executor(lane, piece)
                if lane is bulk and await request.is_disconnected():
                    metrics.CANCELLED.inc()
                    log.info("client went away: forecast stopped", extra={"event": "forecast_cancelled"})
                    return Response(status_code=499)
            # Each series was serialised by pydantic-core in its piece: FastAPI's response_model path (validate,
            # then jsonable_encoder over ~1,600 floats) cost several milliseconds. The shape is ForecastResponse's.
            response = answer_response(forecasting.answer(rt, decoded, fragments), large=held > 0)
            # Held until sent, or its client gone (a large answer's background runs however the sending ends).
            response.background = BackgroundTask(answers.release_later, held) if held else None
        finally:
            if response is None:  # stopped, cancelled or failed before there was an answer to send
                answers.release(held)
            if lane is bulk:
                loop.run_in_executor(bulk, release_memory)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
        return response

    @app.post(
        "/optimize",
        response_model=OptimizeResponse,
        responses={**errors_doc, 409: PROBLEM_SCHEMA},
        dependencies=[Depends(forecast_auth)],
        openapi_extra={"requestBody": OPTIMIZE_BODY_DOC},
    )
    async def optimize(request: Request) -> Response:
        """The setpoint plan (and open-loop controls) over the horizon that minimises the energy the model
        forecasts, within the effluent limits on forecast quantiles (GET /model: optimizer), against holding
        the current setpoints."""
        check_body_headers(request)
        body = await request.body()
        rt = serving()
        # As /forecast's: a large body is read off the event loop, so that other requests' I/O goes on meanwhile.
        if len(body) < LARGE_BODY:
            req, objective, situation, facts = read_optimize(body, rt)
        else:
            req, objective, situation, facts = await asyncio.get_running_loop().run_in_executor(
                reading, read_optimize, body, rt
            )
        if waiting["optimize"] >= settings.max_optimize_waiting:
            metrics.ERRORS.labels("optimize_busy").inc()
            detail = f"{waiting['optimize']} searches are queued or running in this worker: try again shortly"
            raise ProblemError(503, "Optimizer busy", detail=detail, headers={"Retry-After": "1"})
        waiting["optimize"] += 1
        try:
            advice = await asyncio.get_running_loop().run_in_executor(
                advising,
                search_plan,
                rt,
                situation,
                objective,
                req.horizon,
                search_settings(rt, req.seed),
                sorted(set(req.quantiles)),
            )
        finally:
            waiting["optimize"] -= 1
        answer = encode_advice(rt, req, objective, advice, facts)
        metrics.count_warnings(facts.warnings)
        metrics.OPTIMIZE_SECONDS.observe(advice.seconds)
        metrics.OPTIMIZE_CALLS.labels(advice.status, str(advice.plan.feasible).lower()).inc()
        metrics.OPTIMIZE_PLANS.observe(advice.plans_evaluated)
        return Response(answer, media_type="application/json")

    @app.get("/model", responses={401: PROBLEM_SCHEMA, 503: PROBLEM_SCHEMA}, dependencies=[Depends(info_auth)])
    async def model() -> dict[str, Any]:
        """The served model's card: variables, units, limits, metrics, eigenvalues and stability; with loops, what
        a request may leave to them (``closed_loops``)."""
        rt = serving()
        card = dict(rt.card)
        card.pop("operator", None)  # large matrices; the eigenvalues summarise them
        if isinstance(card["variables"].get("calendar"), dict):  # how this service reads the clock, older cards too
            calendar = {**card["variables"]["calendar"], "clock": CALENDAR_CLOCK}
            card["variables"] = {**card["variables"], "calendar": calendar}
        if rt.loops:
            card["closed_loops"] = closed_loops(rt)
        return card

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
    async def readyz() -> JSONResponse:
        """Ready when a model is loaded and warmed up."""
        rt = registry.runtime
        if rt is None:
            return JSONResponse(
                {"status": "not ready", "model_version": None, "refused": registry.refused}, status_code=503
            )
        return JSONResponse({"status": "ready", "model_version": rt.version, "refused": registry.refused})

    @app.get("/metrics", response_class=Response, dependencies=[Depends(info_auth)])
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post(
        "/admin/reload",
        response_model=ReloadResult,
        responses={**errors_doc, 403: PROBLEM_SCHEMA, 409: PROBLEM_SCHEMA},
        dependencies=[Depends(admin_auth)],
    )
    async def admin_reload() -> dict[str, Any]:
        """Load the version CURRENT points to (checksums, the card's numbers and warm-up first), in every worker,
        beside the serving path; a broken one is refused and the previous model keeps serving. Answers once every
        live worker has answered this reload: 200 when all serve it, 409 when one refused it (or serves another),
        503 when one had not answered in 5 s."""
        try:
            version, changed = await asyncio.wrap_future(registry.submit(force=False))
        except ReloadError as exc:
            # The other workers try it too: each /readyz then says why it was refused. (In a thread: it waits for
            # a reload under way on another thread, which must not hold up the event loop.)
            await run_in_threadpool(registry.broadcast_reload)
            raise ProblemError(409, "Reload refused; the previous model keeps serving", detail=str(exc)) from None
        token = await run_in_threadpool(registry.broadcast_reload)
        workers, pending = await run_in_threadpool(registry.wait_for_workers, token)
        others = {pid: w for pid, w in workers.items() if pid not in pending and w["version"] != version}
        if others:
            said = "; ".join(
                f"worker {pid} serves {w['version']}"
                + (f", refused {w['refused']['version']}: {w['refused']['reason']}" if w["refused"] else "")
                for pid, w in others.items()
            )
            raise ProblemError(409, f"Reload of {version} refused by a worker; it keeps its model", detail=said[:2000])
        if pending:
            raise ProblemError(
                503,
                f"Reload of {version}: not every worker answered within 5 s",
                detail=f"workers {', '.join(pending)} had not answered; their /readyz says what they serve",
            )
        return {"model_version": version, "changed": changed, "workers": workers}

    documents: dict[str | None, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request models /forecast reads from the raw body, with the served
        model's limits (history length, horizon, variables and their physical bounds) and the API key scheme."""
        rt = registry.runtime
        key = rt.version if rt is not None else None
        if key not in documents:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            request_schema = ForecastRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(request_schema.pop("$defs", {}))
            schemas["ForecastRequest"] = request_schema
            optimize_schema = OptimizeRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(optimize_schema.pop("$defs", {}))
            schemas["OptimizeRequest"] = optimize_schema
            publish_limits(schemas, rt, settings)
            spec["components"]["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer", "description": "the same key, as a bearer token"},
            }
            secured = [("/forecast", "post"), ("/optimize", "post"), ("/admin/reload", "post")]
            secured += [("/model", "get"), ("/metrics", "get")] if settings.protect_info else []
            for path, method in secured:
                spec["paths"][path][method]["security"] = [{"ApiKey": []}, {"Bearer": []}]  # either
            documents.clear()
            documents[key] = spec
        return documents[key]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def closed_loops(rt: ModelRuntime) -> dict[str, Any]:
    """What GET /model says of the model's feedback loops: each loop's control, setpoint and measurement, and how a
    request leaves a control to its loop."""
    units = dict(zip(rt.outputs, rt.out_units, strict=True)) | dict(zip(rt.setpoints, rt.s_units, strict=True))
    limits = loop_limits(rt.card["variables"])
    return {
        "loops": [
            {
                "control": loop["control"],
                "control_unit": units[loop["control"]],
                "setpoint": loop["setpoint"],
                "setpoint_unit": units[loop["setpoint"]],
                "measurement": loop.get("measurement", ""),
                "may_be_left_out": True,
                # The controller's range, where the card declares it: its forecast never asks for more.
                **({"output_limits": list(lim)} if {"output_min", "output_max"} & set(loop) else {}),
            }
            for loop, lim in zip(rt.loops, limits, strict=True)
        ],
        "rule": "a looped control's future may be left out of future_controls (or a plan's) when the request sends "
        "its setpoint's plan (future_setpoints, the series' or the plan's) or history (setpoints, its last value "
        "then held over the horizon): its loop decides it, and the answer forecasts it after the measurements, "
        "with its unit and quantiles. hold_controls holds the open-loop controls and leaves each looped control "
        "whose setpoint is sent to its loop. Every open-loop control's plan is needed",
    }


def check_body_headers(request: Request) -> None:
    """A UTF-8 JSON body, sent as is: another media type or charset, or a content or transfer coding (gzip, ...)
    is refused (415; a transfer coding before ``chunked``, e.g. ``gzip, chunked``, 501: httptools answers one
    without ``chunked`` 400 itself), not read as if it were plain JSON. Every header of each name is
    read: a second one must not slip a coding past the first."""
    types = request.headers.getlist("content-type") or ["application/json"]
    if len(types) > 1:
        raise ProblemError(415, "Unsupported media type", detail="send one Content-Type, application/json")
    media_type, *params = (part.strip().lower() for part in types[0].split(";"))
    if media_type not in JSON_TYPES:
        raise ProblemError(415, "Unsupported media type", detail=f"send application/json, not {media_type[:60]}")
    charset = next((p.partition("=")[2].strip('" ') for p in params if p.startswith("charset=")), "utf-8")
    if charset not in ("utf-8", "utf8"):
        raise ProblemError(415, "Unsupported media type", detail=f"send the JSON in UTF-8, not {charset[:40]}")
    if coding := coding_not_taken(request, "content-encoding", "identity"):
        detail = f"Content-Encoding {coding[:40]} is not taken: send the body uncompressed"
        raise ProblemError(415, "Unsupported content encoding", detail=detail)
    if coding := coding_not_taken(request, "transfer-encoding", "chunked"):
        detail = f"Transfer-Encoding {coding[:40]} is not implemented: send the body uncompressed (chunked is taken)"
        raise ProblemError(501, "Transfer coding not implemented", detail=detail)


def coding_not_taken(request: Request, header: str, taken: str) -> str | None:
    """The first coding other than ``taken`` in every ``header`` of the request (each a comma-separated list)."""
    codings = (c.strip() for value in request.headers.getlist(header) for c in value.lower().split(","))
    return next((c for c in codings if c not in ("", taken)), None)
