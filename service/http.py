"""uvicorn's HTTP protocol with limits on what a client may hold open or send before the app sees a request.

- Headers: the request line and headers must arrive within ``header_timeout_s`` of the connection opening
  (or the next request beginning), and hold at most ``max_header_bytes`` bytes and ``max_headers`` fields
  (431). uvicorn starts its keep-alive timer only after a first response and sets no size limit of its own:
  a connection sending nothing was held for ever, and a 64 MB header was read and answered.
- Bodies: the app reads a body within ``body_timeout_s`` (``service.middleware`` answers 408); a body the app
  never reads (its answer came first) is dropped with its connection at that deadline, instead of being
  read a byte a second for ever, and once such a body has arrived whole the connection idles out like any
  other (``keep_alive_s``).
- Answers: a client that reads none of its answer for ``send_timeout_s`` (the socket's send buffer full, and no
  byte of it taken, all that time) is dropped, and the answer's memory freed; it was held for as long as the
  client kept the connection. A slow client that keeps reading gets a new deadline each time.
- Malformed HTTP (``Content-Length: abc``) is answered as problem+json and counted in the metrics and the
  access log like any other refusal; uvicorn answered it in plain text, seen by no metric.

In production, put a proxy in front as well (HAProxy or nginx, with their own header and body timeouts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.logs import request_id_var
from service.problems import PROBLEM, problem_body
from service.settings import get_settings

access_log = logging.getLogger("kovae.access")
REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


class Refused(Exception):
    """Raised in a parser callback to stop reading a request that breaks a limit."""


class LimitedHttpProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _send_mark = 0  # the unsent bytes when the send deadline was armed: less at the deadline is progress
    _in_headers = True  # between a request's start (or the connection's) and the end of its headers
    _header_bytes = 0
    _header_count = 0
    _headers_seen = 0  # requests whose headers were complete, on this connection
    _refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but every parser error is answered as problem+json (and counted), and the bytes of a
        request still in its headers are counted as they arrive (a header can be megabytes long)."""
        self._unset_keepalive_if_required()
        was_in_headers, headers_seen = self._in_headers, self._headers_seen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            detail = str(exc) or type(exc).__name__
            if detail == "User callback error":  # httptools' words for a request uvicorn could not take apart
                detail = "the request line or a header cannot be read (e.g. a CONNECT or another proxy's request)"
            self.refuse(*(self._refusal or (400, "Malformed HTTP request", detail)))
            return
        if was_in_headers and self._headers_seen == headers_seen:  # no request's headers ended in this data
            self._header_bytes += len(data)
            self._check_header_size()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        # A keep-alive timer armed for the request before (``on_message_complete``) must not close this one,
        # pipelined in the same read, while it runs.
        self._unset_keepalive_if_required()
        super().on_message_begin()
        self._in_headers, self._header_bytes, self._header_count = True, 0, 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        self._check_header_size(raise_=True)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        self._check_header_size(raise_=True)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._headers_seen += 1
        self._cancel("_header_timer")
        self._body_timer = self.loop.call_later(get_settings().body_timeout_s, self._on_body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel("_body_timer")
        self._in_headers = True  # what comes next is the next request's
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and self.timeout_keep_alive_task is None:
            # Answered before its body ended (a 401, 405, 413 or 415): the rest of the body cancelled the
            # keep-alive timer the answer armed (uvicorn's data_received), and nothing armed it again, so the
            # idle connection was held for ever, a file descriptor per anonymous client.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel("_header_timer")
        self._cancel("_body_timer")
        self._cancel("_send_timer")
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The send buffer is full: the client has ``send_timeout_s`` to read some of it."""
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_timer()

    def _arm_send_timer(self) -> None:
        self._send_mark = self.transport.get_write_buffer_size()
        self._send_timer = self.loop.call_later(get_settings().send_timeout_s, self._on_send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("_send_timer")

    # ------------------------------------------------------------------ limits

    def _check_header_size(self, raise_: bool = False) -> None:
        settings = get_settings()
        if self._header_bytes > settings.max_header_bytes:
            detail = f"the request line and headers may hold at most {settings.max_header_bytes} bytes"
        elif self._header_count > settings.max_headers:
            detail = f"a request may send at most {settings.max_headers} header fields"
        else:
            return
        self._refusal = (431, "Request header fields too large", detail)
        if raise_:
            raise Refused(detail)  # the parser stops; data_received answers
        self.refuse(*self._refusal)

    def refuse(self, status: int, title: str, detail: str) -> None:
        """Answer a request the app never saw (problem+json, connection closed), count and log it."""
        if self.transport.is_closing():
            return
        rid = uuid.uuid4().hex
        body = json.dumps(problem_body(status, title, detail, "", rid)).encode()
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, title)}\r\ncontent-type: {PROBLEM}\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {rid}\r\ncache-control: no-store\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
        metrics.ERRORS.labels("headers_too_large" if status == 431 else "malformed_http").inc()
        metrics.REQUESTS.labels("other", "-", f"{status // 100}xx").inc()
        extra = {"event": "request", "method": "-", "path": "-", "status": status, "duration_ms": 0.0}
        token = request_id_var.set(rid)
        access_log.info("- - %d %s", status, detail[:200], extra=extra)
        request_id_var.reset(token)

    def _arm_header_timer(self) -> None:
        self._cancel("_header_timer")
        self._header_timer = self.loop.call_later(get_settings().header_timeout_s, self._on_header_timeout)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request is being answered on it
            self.transport.close()

    def _on_send_timeout(self) -> None:
        """At the deadline: a client that read some of the answer meanwhile gets another deadline (a slow link is
        no fault); one that read nothing is dropped. The app's sends then return at once (uvicorn marks the
        request disconnected), so the rest of the answer is never written and its memory goes back. A connection
        already closing (its answer all written, the keep-alive timer closed it) still holds its unsent bytes
        until the client reads them: it is dropped too."""
        self._send_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent == 0:
            return
        if unsent < self._send_mark:
            self._arm_send_timer()
            return
        metrics.ERRORS.labels("send_timeout").inc()
        extra = {"event": "send_timeout", "method": "-", "path": "-", "status": 0, "duration_ms": 0.0}
        access_log.warning(
            "client read none of its answer for %g s: dropped", get_settings().send_timeout_s, extra=extra
        )
        self.transport.abort()

    def _on_body_timeout(self) -> None:
        """The body is still arriving: once the request is answered, drop it (the app, reading it, answers
        408 itself); until then look again in a second."""
        self._body_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:
            self._body_timer = self.loop.call_later(1.0, self._on_body_timeout)
