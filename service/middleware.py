"""Around every request: its id, the body's size and time limits, its outcome in the metrics and the access log.

Outcomes a client causes are the client's: a body too large (413), a body that does not arrive in time (408),
a client that goes away before its answer (499, ``client_closed``, no traceback). Only what escapes the app
otherwise is a 500, answered as a generic problem (the stack trace stays in the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.logs import request_id_var
from service.problems import PROBLEM, problem_body

log = logging.getLogger("kovae.app")
access_log = logging.getLogger("kovae.access")
ROUTES = {"/forecast", "/optimize", "/model", "/healthz", "/readyz", "/metrics", "/admin/reload", "/openapi.json"}
"""Route label values for metrics; anything else is 'other' so a scanner cannot explode label cardinality."""
CLIENT_CLOSED = 499  # nginx's code for a client that closed the connection before its answer


def problem(request: Request, status: int, title: str, detail: str = "", errors: list | None = None, count: int = 0):
    """An RFC 9457 problem+json answer to ``request``."""
    body = problem_body(status, title, detail, request.url.path, request_id_var.get(), errors, count)
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ObserveMiddleware:
    """Request id, body limits, request metrics and access log, and a problem+json 500 for anything unexpected.

    Pure ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware runs every request in an extra
    task and re-streams the body, which cost about a millisecond per forecast here.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        # Printable ASCII only: other bytes came back in the answer as their UTF-8 encoding, another id.
        rid = rid if 0 < len(rid) <= 64 and rid.isascii() and rid.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(rid)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, received, started, body_done = 500, 0, False, False

        head = scope["method"] == "HEAD"

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                # Every answer is this request's own (a forecast, the served version, health): no cache keeps it.
                extra = [(b"x-request-id", rid.encode())]
                if not any(k.lower() == b"cache-control" for k, _ in message.get("headers", [])):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # HEAD: GET's status and headers, no body (RFC 9110 9.3.2)
            await send(message)

        async def receive_limited() -> Message:
            """The body within its byte limit (counted as sent, also without or against a Content-Length) and
            its deadline; once it is all in, receive() passes through (it then waits for a disconnect)."""
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.max_body_bytes:
                raise BodyTooLarge
            return message

        async def answer(status: int, title: str, detail: str, close: bool = False) -> None:
            response = problem(Request(scope), status, title, detail)
            if close:
                response.headers["connection"] = "close"  # the rest of the body is not read
            await response(scope, receive, send_with_id)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                raise BodyTooLarge
            # HEAD is answered wherever GET is, as GET without its body (send_with_id drops it).
            inner = {**scope, "method": "GET"} if head else scope
            await self.app(inner, receive_limited, send_with_id)
        except BodyTooLarge:
            metrics.ERRORS.labels("body_too_large").inc()
            if started:
                raise
            await answer(413, "Request body too large", f"limit is {self.max_body_bytes} bytes")
        except BodyTimeout:
            metrics.ERRORS.labels("body_timeout").inc()
            if not started:
                detail = f"the body did not arrive within {self.body_timeout_s:g} s"
                await answer(408, "Request body timed out", detail, close=True)
        except ClientDisconnect:
            status = CLIENT_CLOSED  # nothing to answer: the client is gone
            log.info("client closed the connection before its answer", extra={"event": "client_closed"})
        except asyncio.CancelledError:
            # The server's shutdown ran out of KOVAE_SHUTDOWN_GRACE_S: not the request's fault nor a bug.
            metrics.ERRORS.labels("shutdown").inc()
            log.warning("stopped by the server's shutdown before its answer", extra={"event": "shutdown_cancelled"})
            if not started:
                status = 503
                await answer(503, "Service shutting down", "the server stopped before this answer: send it again", True)
        except Exception:
            log.exception("unhandled error")
            metrics.ERRORS.labels("internal").inc()
            if started:  # too late for a problem body; the server closes the connection
                raise
            await answer(500, "Internal server error", "see the service log for this request id")
        finally:
            seconds = time.perf_counter() - start
            if status == CLIENT_CLOSED:
                metrics.ERRORS.labels("client_closed").inc()
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
