"""The FastAPI app: thin routes over the protocol codecs, the model registry and the metrics.

Every client mistake becomes an RFC 9457 problem+json with the field named; nothing else reaches the client
but a generic 500 problem (the stack trace stays in the log).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import jiter
import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, protocol
from service.logs import request_id_var, setup_logging
from service.protocol import ForecastRequest, ForecastResponse, ProblemError
from service.registry import ModelRegistry, ReloadError
from service.settings import Settings, find_store, get_settings

API_VERSION = "1.2.0"  # 1.1: time of day and week are inputs; 1.2: bounds, warnings, clipping, units, seed
PROBLEM = "application/problem+json"
log = logging.getLogger("kovae.app")
access_log = logging.getLogger("kovae.access")
ROUTES = {"/forecast", "/model", "/healthz", "/readyz", "/metrics", "/admin/reload", "/openapi.json"}
"""Route label values for metrics; anything else is 'other' so a scanner cannot explode label cardinality."""


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


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Hand freed heap pages back to the system after a large request (glibc keeps them otherwise)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


JSON_TYPES = ("application/json", "application/problem+json")
LARGE_BODY = 256_000
"""Bodies from this many bytes on are parsed in the thread pool (a day of history for one series is ~40 kB)."""


def parse_request(body: bytes) -> ForecastRequest:
    """Strict parse by pydantic-core straight from bytes (~10x cheaper than json.loads + validation for a day of
    history); its errors take FastAPI's path (problem+json naming the field). Then a pass of jiter (the same
    parser, ~0.06 ms for a day of history) for keys given twice, which pydantic-core silently resolves to the
    last."""
    try:
        req = ForecastRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    try:
        jiter.from_json(body, catch_duplicate_keys=True)
    except ValueError as exc:  # "Detected duplicate key "horizon" at line 1 column 40"
        msg = f"{exc}: a key may appear once in an object"
        raise ProblemError(422, "Invalid request body", [{"field": "body", "message": msg}]) from None
    return req


FORECAST_BODY_DOC = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ForecastRequest"}}},
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
                        "items": {
                            "type": "object",
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        },
                    },
                },
            }
        }
    },
}


def problem(request: Request, status: int, title: str, detail: str = "", errors: list | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail or title}
    body["instance"] = request.url.path
    body["request_id"] = request_id_var.get()
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _key_ok(given: str | None, keys: list[SecretStr]) -> bool:
    """Constant-time comparison against every configured key."""
    if given is None:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.get_secret_value().encode())
    return ok


class BodyTooLarge(Exception):
    pass


class ObserveMiddleware:
    """Request id, body-size limit, request metrics, and a problem+json 500 for anything unexpected.

    Pure ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware runs every request in an extra
    task and re-streams the body, which cost about a millisecond per forecast here.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if 0 < len(rid) <= 64 and rid.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(rid)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, received, started = 500, 0, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def receive_limited() -> Message:
            """Enforces the limit on the bytes actually sent, also without (or against) a Content-Length."""
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge
            return message

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                raise BodyTooLarge
            await self.app(scope, receive_limited, send_with_id)
        except BodyTooLarge:
            metrics.ERRORS.labels("body_too_large").inc()
            if started:
                raise
            limit = f"limit is {self.max_body_bytes} bytes"
            await problem(Request(scope), 413, "Request body too large", limit)(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            metrics.ERRORS.labels("internal").inc()
            if started:  # too late for a problem body; the server closes the connection
                raise
            detail = "see the service log for this request id"
            await problem(Request(scope), 500, "Internal server error", detail)(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            status_class = f"{status // 100}xx"
            metrics.REQUESTS.labels(route, scope["method"], status_class).inc()
            metrics.REQUEST_SECONDS.labels(route, status_class).observe(seconds)
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "event": "request",
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(1000 * seconds, 3),
                },
            )
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(settings.log_level)
    store, found_by = find_store(settings.model_store)
    log.info("model store: %s (%s)", store.resolve(), found_by, extra={"event": "model_store"})
    registry = ModelRegistry(store, settings.ort_threads, settings.runtime_dir)
    # Two inference lanes per worker, one thread each: ONNX Runtime stays on warm caches, the event loop is never
    # blocked, and a request small enough for one ONNX call never queues behind a large one's pieces.
    inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(registry.try_reload)  # a failure is logged: /readyz stays 503 until one succeeds
        registry.start(settings.poll_interval_s)
        yield
        registry.stop()
        inference.shutdown(wait=True)
        bulk.shutdown(wait=True)

    app = FastAPI(
        title="kovae-forecast",
        version=API_VERSION,
        description="Multi-step forecasts of an activated-sludge plant (BSM1) from a stable Koopman VAE.",
        lifespan=lifespan,
        docs_url=None,  # the Swagger page loads its scripts from a public CDN; plant networks are often offline
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.settings = settings

    # ------------------------------------------------------------------ middleware and errors

    app.add_middleware(ObserveMiddleware, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        metrics.ERRORS.labels("invalid_request" if exc.status == 422 else f"http_{exc.status}").inc()
        log.info("%d %s: %s", exc.status, exc.title, exc.detail[:1000], extra={"event": "refused"})
        return problem(request, exc.status, exc.title, exc.detail, exc.errors)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _loc(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        metrics.ERRORS.labels("invalid_request").inc()
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        log.info("422 Invalid request body: %s", detail[:1000], extra={"event": "refused"})
        return problem(request, 422, "Invalid request body", detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.ERRORS.labels(f"http_{exc.status_code}").inc()
        response = problem(request, exc.status_code, str(exc.detail), str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    # ------------------------------------------------------------------ auth

    # async, so FastAPI runs them inline: a plain def dependency costs a hop through the thread pool.
    async def forecast_auth(request: Request) -> None:
        if settings.api_keys and not _key_ok(request.headers.get("x-api-key"), settings.api_keys):
            raise ProblemError(401, "Missing or invalid API key", detail="send a valid X-API-Key header")

    async def admin_auth(request: Request) -> None:
        if not settings.admin_api_keys:
            raise ProblemError(403, "Admin endpoints are disabled", detail="set KOVAE_ADMIN_API_KEYS to enable them")
        if not _key_ok(request.headers.get("x-api-key"), settings.admin_api_keys):
            raise ProblemError(401, "Missing or invalid API key", detail="send a valid admin X-API-Key header")

    async def info_auth(request: Request) -> None:
        if settings.protect_info:
            await forecast_auth(request)

    def serving() -> Any:
        rt = registry.runtime
        if rt is None:
            raise ProblemError(503, "No model loaded", detail="the service has no model yet; see /readyz")
        return rt

    errors_doc: dict[int | str, dict[str, Any]] = {code: PROBLEM_SCHEMA for code in (401, 413, 415, 422, 503)}

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
        media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type not in JSON_TYPES:
            raise ProblemError(415, "Unsupported media type", detail=f"send application/json, not {media_type}")
        body = await request.body()
        # A large body is parsed off the event loop, so that other requests' I/O goes on meanwhile.
        req = parse_request(body) if len(body) < LARGE_BODY else await run_in_threadpool(parse_request, body)
        rt = serving()  # one reference for the whole request, even if a reload swaps the model meanwhile
        decoded = protocol.decode(req, rt, settings)
        metrics.HORIZON.observe(decoded.horizon)
        metrics.BATCH.observe(len(decoded.x_hist))
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        lane = inference if decoded.work <= settings.chunk_work else bulk
        parts: dict[int, bytes] = {}
        try:
            for piece in protocol.pieces(rt, decoded, settings.chunk_work):
                parts.update(await loop.run_in_executor(lane, piece))
                if lane is bulk and len(parts) < len(decoded.x_hist) and await request.is_disconnected():
                    metrics.CANCELLED.inc()
                    log.info("client went away: forecast stopped", extra={"event": "forecast_cancelled"})
                    return Response(status_code=499)
        finally:
            if lane is bulk:
                loop.run_in_executor(bulk, release_memory)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
        # Each series was serialised by pydantic-core in its piece: FastAPI's response_model path (validate, then
        # jsonable_encoder over ~1,600 floats) cost several milliseconds. The shape is ForecastResponse's.
        payload = protocol.envelope(rt, decoded, [parts[i] for i in range(len(decoded.x_hist))])
        return Response(payload, media_type="application/json")

    @app.get("/model", responses={401: PROBLEM_SCHEMA, 503: PROBLEM_SCHEMA}, dependencies=[Depends(info_auth)])
    async def model() -> dict[str, Any]:
        """The served model's card: variables, units, limits, metrics, eigenvalues and stability."""
        card = dict(serving().card)
        card.pop("operator", None)  # large matrices; the eigenvalues summarise them
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
        """Load the version CURRENT points to (checksum and warm-up first), in every worker; a broken one is
        refused and the previous model keeps serving. Answers once every live worker serves it (or refused it)."""
        try:
            version, changed = await run_in_threadpool(registry.reload, force=False)
        except ReloadError as exc:
            raise ProblemError(409, "Reload refused; the previous model keeps serving", detail=str(exc)) from None
        registry.broadcast_reload()
        workers = await run_in_threadpool(registry.wait_for_workers, version)
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
            request_limits(schemas, rt, settings)
            spec["components"]["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            secured = [("/forecast", "post"), ("/admin/reload", "post")]
            secured += [("/model", "get"), ("/metrics", "get")] if settings.protect_info else []
            for path, method in secured:
                spec["paths"][path][method]["security"] = [{"ApiKey": []}]
            documents.clear()
            documents[key] = spec
        return documents[key]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def request_limits(schemas: dict[str, Any], rt: Any, settings: Settings) -> None:
    """Publish in the schema what decode() enforces: settings' limits and, with a model, its card's limits."""
    req, series = schemas["ForecastRequest"]["properties"], schemas["SeriesIn"]["properties"]
    req["series"]["maxItems"] = settings.max_series
    req["quantiles"]["maxItems"] = settings.max_quantiles
    req["samples"]["anyOf"][0]["maximum"] = settings.max_samples
    if rt is None:
        return
    req["horizon"]["maximum"] = rt.max_horizon
    lo, hi = rt.card["history"]["min"], rt.card["history"]["max"]
    series["timestamps"].update(minItems=lo, maxItems=hi)

    def named(names: list[str], limits: tuple[Any, Any], min_items: int, max_items: int) -> dict[str, Any]:
        props = {}
        for name, low, high in zip(names, *limits, strict=True):
            item: dict[str, Any] = {"type": "number"}
            if np.isfinite(low):
                item["minimum"] = float(low)
            if np.isfinite(high):
                item["maximum"] = float(high)
            props[name] = {"type": "array", "items": item, "minItems": min_items, "maxItems": max_items}
        return {"type": "object", "properties": props, "required": names, "additionalProperties": False}

    series["measurements"] = named(rt.measurements, rt.x_bounds, lo, hi)
    series["controls"] = named(rt.controls, rt.u_bounds, lo, hi)
    future = named(rt.controls, rt.u_bounds, 1, rt.max_horizon)
    series["future_controls"]["anyOf"][0] = future


def _loc(loc: tuple[Any, ...]) -> str:
    """('body', 'series', 0, 'horizon') -> 'series[0].horizon'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"
