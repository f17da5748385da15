"""The service at the HTTP layer under clients that misbehave: they leave mid-body, send bodies a byte at a
time, send huge or malformed headers, or probe for redirects, encodings and empty keys.

Real servers (``python -m service``) on 127.0.0.1, spoken to over raw sockets where a client library would
not misbehave. Each test reproduces one finding of the second hostile audit (issue 31).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, wait_for
from tests.test_service import make_body, problem_fields


def raw(port: int, data: bytes, timeout: float = 10.0) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sendall(data)
    return conn


def read_response(conn: socket.socket) -> bytes:
    """One whole answer, its head and its Content-Length of body: a server may send them in two segments, and
    one recv can return the head alone."""
    answer = conn.recv(65536)
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
        re.search(rb"content-length: (\d+)", answer.partition(b"\r\n\r\n")[0]).group(1)
    ):
        answer += conn.recv(65536)
    return answer


def read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while chunk := conn.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (in any order)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            total += float(m.group(3)) if labels.items() <= have.items() else 0.0
    return total


def server_errors(text: str) -> float:
    return metric(text, "kovae_http_requests_total", status_class="5xx")


def log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses


# ----------------------------------------------------------------------------- M2: clients that go away


def test_a_client_leaving_mid_body_is_client_closed_not_a_server_error(serve, trained_store) -> None:
    s = serve(trained_store[0])
    for _ in range(3):
        conn = raw(
            s.port,
            b"POST /forecast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        conn.close()
    assert wait_for(lambda: metric(s.client.get("/metrics").text, "kovae_errors_total", type="client_closed") == 3)
    text = s.client.get("/metrics").text
    assert server_errors(text) == 0
    assert metric(text, "kovae_errors_total", type="internal") == 0
    lines = log_lines(s.stop())
    access = [e for e in lines if e.get("event") == "request" and e["path"] == "/forecast"]
    assert [e["status"] for e in access] == [499, 499, 499]
    assert not any(e["level"] == "ERROR" or "exception" in e for e in lines)


# ----------------------------------------------------------------------------- M3: slow bodies


def test_a_body_that_does_not_arrive_in_time_is_answered_408(serve, trained_store) -> None:
    s = serve(trained_store[0], KOVAE_BODY_TIMEOUT_S="1")
    conn = raw(
        s.port, b"POST /forecast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    start = time.monotonic()
    for _ in range(3):  # a byte now and then, as a slow client does
        time.sleep(0.4)
        try:
            conn.sendall(b" ")
        except OSError:
            break
    answer = read_all(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"application/problem+json" in answer and b"connection: close" in answer.lower()
    assert time.monotonic() - start < 5
    text = s.client.get("/metrics").text
    assert metric(text, "kovae_errors_total", type="body_timeout") == 1 and server_errors(text) == 0


def test_a_body_the_app_never_reads_does_not_hold_its_connection(serve, trained_store) -> None:
    """Answered before its body (here GET /healthz), the body trickling in a byte at a time kept the
    connection open for ever: it is dropped at the body deadline."""
    s = serve(trained_store[0], KOVAE_BODY_TIMEOUT_S="1")
    conn = raw(s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
    start, closed = time.monotonic(), False
    while time.monotonic() - start < 6 and not closed:
        time.sleep(0.3)
        try:
            conn.sendall(b"x")
        except OSError:
            closed = True
    answer = read_all(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert closed or time.monotonic() - start < 6


def test_a_connection_answered_before_its_body_ended_idles_out(serve, trained_store, rt) -> None:
    """A 401 sent while the body was still arriving, then the rest of the body: the body's bytes cancelled the
    keep-alive timer the answer armed, and the idle connection was held for ever (a file descriptor per
    anonymous client)."""
    s = serve(trained_store[0], KOVAE_API_KEYS='["k1"]', KOVAE_KEEP_ALIVE_S="1")
    body = json.dumps(make_body(rt)).encode()
    head = b"POST /forecast HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    conn = raw(s.port, head % len(body) + body[:5])
    conn.settimeout(10)
    assert read_response(conn).startswith(b"HTTP/1.1 401")  # all of it: what follows must be the close alone
    conn.sendall(body[5:])
    start = time.monotonic()
    conn.settimeout(8)
    assert read_all(conn) == b""  # closed by the server, not by the read's own timeout
    conn.close()
    assert time.monotonic() - start < 4


def large_request(rt, plans: int = 1000) -> bytes:
    """One series under 1,000 plans over the whole horizon: a 7.7 MB answer from the tiny model."""
    body = make_body(rt, horizon=rt.max_horizon)
    plan = body["series"][0].pop("future_controls")
    body["series"][0]["plans"] = [{"name": f"p{k}", "future_controls": plan} for k in range(plans)]
    return json.dumps(body).encode()


def unread_large_answer(port: int, rt, plans: int = 1000, headers: bytes = b"") -> socket.socket:
    """A connection that asked for a large answer and reads none of it. A small receive window and small
    segments, set before connect: on loopback (64 kB segments) the server's kernel took some 3 MB of the answer
    unread; with 536-byte segments about 100 kB, and the rest waits in the server's own buffer."""
    data = large_request(rt, plans)
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    conn.connect(("127.0.0.1", port))
    head = b"POST /forecast HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    conn.sendall(head % len(data) + headers + b"\r\n" + data)
    return conn


def test_large_answers_in_flight_are_bounded_and_small_ones_pass(serve, trained_store, rt) -> None:
    """Each answer was bounded, not how many at once: eight 1,000-plan answers took a worker past a 512 MiB
    container's limit. Past the budget a large request is 503 before any work; small ones keep flowing."""
    s = serve(trained_store[0], KOVAE_MAX_ANSWERS_IN_FLIGHT_BYTES="2000000")
    in_flight = lambda: metric(s.client.get("/metrics").text, "kovae_answer_bytes_in_flight")  # noqa: E731
    conn = unread_large_answer(s.port, rt)  # one alone passes, though above the budget
    assert wait_for(lambda: in_flight() > 7_000_000)
    busy = s.client.post("/forecast", content=large_request(rt), headers={"content-type": "application/json"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "KOVAE_MAX_ANSWERS" in busy.text
    assert s.client.post("/forecast", json=make_body(rt)).status_code == 200  # a small answer is never held up
    conn.close()  # the client goes away: its answer's bytes are free again
    assert wait_for(lambda: in_flight() == 0)
    again = s.client.post("/forecast", content=large_request(rt), headers={"content-type": "application/json"})
    assert again.status_code == 200 and in_flight() == 0
    text = s.client.get("/metrics").text
    assert metric(text, "kovae_errors_total", type="forecast_busy") == 1
    assert server_errors(text) == 1 and metric(text, "kovae_errors_total", type="internal") == 0  # the 503 alone


def test_a_client_that_never_reads_its_answer_is_dropped(serve, trained_store, rt) -> None:
    """A client that sends a large request and reads nothing held the whole answer in the server's memory for as
    long as it kept the connection (6 such clients: +200 MB, for ever)."""
    s = serve(trained_store[0], KOVAE_SEND_TIMEOUT_S="1")
    conn = unread_large_answer(s.port, rt)
    dropped = wait_for(lambda: metric(s.client.get("/metrics").text, "kovae_errors_total", type="send_timeout") == 1)
    conn.settimeout(10)
    answer = read_all(conn)  # what was in flight, then the reset
    conn.close()
    head, _, got = answer.partition(b"\r\n\r\n")
    assert dropped and head.startswith(b"HTTP/1.1 200")
    assert len(got) < int(re.search(rb"content-length: (\d+)", head).group(1))  # cut short
    assert server_errors(s.client.get("/metrics").text) == 0


def test_a_closing_connection_whose_client_never_reads_is_dropped(serve, trained_store, rt) -> None:
    """``Connection: close`` and an answer under 1 MB, written whole at once: the app is done, the connection is
    closing, and its unsent bytes stay until the client reads them. A client that never does held them for as
    long as it kept the connection; it is dropped at the send deadline like one whose answer is still being
    written."""
    s = serve(trained_store[0], KOVAE_SEND_TIMEOUT_S="1")
    conn = unread_large_answer(s.port, rt, plans=100, headers=b"Connection: close\r\n")
    sent = lambda: metric(s.client.get("/metrics").text, "kovae_errors_total", type="send_timeout")  # noqa: E731
    dropped = wait_for(lambda: sent() == 1, seconds=10)
    conn.settimeout(10)
    answer = read_all(conn)  # what the kernel held, then the reset
    conn.close()
    head, _, got = answer.partition(b"\r\n\r\n")
    size = int(re.search(rb"content-length: (\d+)", head).group(1))
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert 500_000 < size < 1_000_000  # one write (encode.SMALL_ANSWER), far more than the kernel takes
    assert dropped and len(got) < size  # cut short
    lines = log_lines(s.stop())
    order = [e["event"] for e in lines if e.get("event") == "send_timeout" or e.get("path") == "/forecast"]
    assert order == ["request", "send_timeout"]  # the app had answered (200): the connection was closing


# ----------------------------------------------------------------------------- M4: headers


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * 1_000_000 + b"\r\n", b"".join(b"X-%d: 1\r\n" % k for k in range(5000))],
    ids=["one huge header", "many headers"],
)
def test_headers_have_size_limits(serve, trained_store, headers) -> None:
    s = serve(trained_store[0])
    conn = raw(s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    with contextlib.suppress(OSError):  # the server may close early: it read enough
        conn.sendall(headers + b"\r\n")
    answer = read_all(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == 431 and "header" in body["detail"]
    text = s.client.get("/metrics").text
    assert metric(text, "kovae_errors_total", type="headers_too_large") == 1
    assert s.client.get("/healthz").status_code == 200


def test_malformed_http_is_answered_as_a_problem_and_counted(serve, trained_store) -> None:
    s = serve(trained_store[0])
    conn = raw(s.port, b"POST /forecast HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    answer = read_all(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    head, raw_body = answer.split(b"\r\n\r\n", 1)
    assert b"\r\ncache-control: no-store\r\n" in head  # as every answer the app writes
    body = json.loads(raw_body)
    assert body["status"] == 400 and body["title"] == "Malformed HTTP request" and body["request_id"]
    text = s.client.get("/metrics").text
    assert metric(text, "kovae_errors_total", type="malformed_http") == 1
    assert metric(text, "kovae_http_requests_total", method="-", route="other", status_class="4xx") == 1
    # A proxy's CONNECT: uvicorn cannot take its request line apart, and httptools called that "User callback error".
    conn = raw(s.port, b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n")
    connect = json.loads(read_all(conn).split(b"\r\n\r\n", 1)[1])
    conn.close()
    assert connect["status"] == 400 and "request line" in connect["detail"], connect
    access = [e for e in log_lines(s.stop()) if e.get("event") == "request" and e["status"] == 400]
    assert len(access) == 2 and access[0]["request_id"] == body["request_id"]


# ----------------------------------------------------------------------------- low: redirects, encodings, keys


def test_no_redirect_is_built_from_the_host_header(server, rt) -> None:
    r = server.client.post("/forecast/", json=make_body(rt), headers={"host": "attacker.example"})
    assert r.status_code == 404 and "location" not in r.headers
    problem_fields(r)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_a_content_encoding_is_refused_not_read_as_json(server, rt, encoding) -> None:
    r = server.client.post(
        "/forecast",
        content=json.dumps(make_body(rt)),
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert r.status_code == 415 and encoding in r.json()["detail"]
    problem_fields(r)


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        (b"content-type: application/json\r\ncontent-encoding: identity\r\ncontent-encoding: gzip\r\n", 415, b"gzip"),
        (b"content-type: application/json\r\ncontent-encoding: identity, gzip\r\n", 415, b"gzip"),
        (b"content-type: application/json\r\ncontent-type: text/plain\r\n", 415, b"one Content-Type"),
        (b"content-type: application/json; charset=utf-16\r\n", 415, b"utf-16"),
        (b"content-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n", 501, b"gzip"),
    ],
    ids=["second content-encoding", "listed content-encoding", "second content-type", "charset", "transfer coding"],
)
def test_every_header_of_a_body_is_read_before_the_body(server, rt, headers, status, words) -> None:
    """Only the first Content-Type and Content-Encoding were read: a second one (or a charset, or a transfer
    coding) let a gzip or UTF-16 body through to be read as JSON (422 "Invalid JSON"), or a text body as JSON."""
    body = gzip.compress(json.dumps(make_body(rt)).encode())
    chunked = b"transfer-encoding" in headers
    framing = b"" if chunked else b"content-length: %d\r\n" % len(body)
    payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    conn = raw(server.port, b"POST /forecast HTTP/1.1\r\nHost: x\r\n" + headers + framing + b"\r\n" + payload)
    conn.settimeout(10)
    answer = read_response(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert b"application/problem+json" in answer and words in answer


def test_a_401_names_the_scheme_it_wants(serve, trained_store, rt) -> None:
    s = serve(trained_store[0], KOVAE_API_KEYS='["k1"]', KOVAE_ADMIN_API_KEYS='["a1"]')
    for path in ("/forecast", "/admin/reload"):
        r = s.client.post(path, json=make_body(rt))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("ApiKey ")
        assert 'header="X-API-Key"' in r.headers["www-authenticate"]


@pytest.mark.parametrize("variable", ["KOVAE_API_KEYS", "KOVAE_ADMIN_API_KEYS"])
def test_empty_api_keys_stop_the_start(variable, trained_store) -> None:
    env = {**os.environ, variable: '["s3cret-key", " "]', "KOVAE_MODEL_STORE": str(trained_store[0])}
    out = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    (line,) = log_lines(out.stderr + out.stdout)
    assert line["event"] == "settings_refused" and variable in line["message"] and "empty" in line["message"]
    assert "s3cret" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("KOVAE_API_KEYS", "s3cret-key", ("api_keys", "JSON")),  # a list setting that is not JSON
        # logging's ValueError ended in a plain-text traceback, past the one JSON line
        ("KOVAE_LOG_LEVEL", "verbose", ("KOVAE_LOG_LEVEL", "'verbose' is no log level")),
        # a NaN timeout started a service that answered nothing; port 70000 listened on 4464 (mod 65536)
        ("KOVAE_HEADER_TIMEOUT_S", "nan", ("KOVAE_HEADER_TIMEOUT_S", "finite")),
        ("KOVAE_PORT", "70000", ("KOVAE_PORT", "65535")),
        # a key a header cannot carry: a client's UTF-8 never matched it, and an unencodable one was a 500
        ("KOVAE_API_KEYS", '["ké"]', ("KOVAE_API_KEYS", "printable ASCII only")),
        # HTTP drops a header value's blanks: this key never matched, and its clients were all refused
        ("KOVAE_API_KEYS", '[" padkey "]', ("KOVAE_API_KEYS", "begins or ends with a blank")),
        # /model and /metrics protected by no key stayed open
        ("KOVAE_PROTECT_INFO", "true", ("KOVAE_PROTECT_INFO", "KOVAE_API_KEYS is empty")),
    ],
)
def test_a_setting_that_cannot_be_served_stops_the_start_in_one_line(variable, value, words, trained_store) -> None:
    env = {**os.environ, variable: value, "KOVAE_MODEL_STORE": str(trained_store[0])}
    out = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    (line,) = log_lines(out.stderr + out.stdout)
    assert line["event"] == "settings_refused" and all(w in line["message"] for w in words), line
    assert "s3cret" not in out.stderr + out.stdout


def test_an_env_file_that_is_not_utf8_stops_the_start_in_one_line(tmp_path) -> None:
    (tmp_path / ".env").write_bytes(b"KOVAE_LOG_LEVEL=\xff\xfe\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "service"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    (line,) = log_lines(out.stderr + out.stdout)
    assert line["event"] == "settings_refused" and ".env is not UTF-8 text" in line["message"]


def test_help_and_arguments_never_start_a_server() -> None:
    """``python -m service --help`` started the server (it takes settings, not arguments)."""
    env = {**os.environ, "KOVAE_PORT": "1"}  # a port it could never bind: a start would fail, not hang

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "service", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    shown, refused = run("--help"), run("--port", "9000")
    assert shown.returncode == 0 and "KOVAE_MODEL_STORE" in shown.stdout
    assert refused.returncode == 2 and "unrecognized arguments: --port 9000" in refused.stderr
    for out in (shown, refused):
        assert "Uvicorn running" not in out.stdout + out.stderr and "model_loaded" not in out.stdout + out.stderr


def test_a_mistyped_setting_is_named_at_the_start(serve, trained_store) -> None:
    """KOVAE_API_KEY (no S) left /forecast open without a word; it is served, and the log says what was meant."""
    s = serve(trained_store[0], KOVAE_API_KEY='["k1"]')
    assert wait_for(lambda: any(b"unknown_setting" in line for line in s.output))
    (line,) = [e for e in log_lines(s.stop()) if e.get("event") == "unknown_setting"]
    assert line["message"] == "KOVAE_API_KEY is no setting and is ignored (did you mean KOVAE_API_KEYS?)"


def test_a_mistyped_setting_in_the_env_file_is_named_too(serve, trained_store, tmp_path) -> None:
    """A .env line is read as the environment is: its typo left /forecast open without a word."""
    (tmp_path / ".env").write_text('KOVAE_API_KEY=["k1"]\nkovae_port_x=1\nOTHER=2\n')
    s = serve(trained_store[0], cwd=tmp_path)
    assert wait_for(lambda: sum(b"unknown_setting" in line for line in s.output) == 2)
    lines = [e["message"] for e in log_lines(s.stop()) if e.get("event") == "unknown_setting"]
    assert lines == [
        "KOVAE_API_KEY (in .env) is no setting and is ignored (did you mean KOVAE_API_KEYS?)",
        "kovae_port_x (in .env) is no setting and is ignored (did you mean KOVAE_PORT?)",
    ]


def test_a_mistyped_setting_in_the_environment_and_the_env_file_is_named_once(serve, trained_store, tmp_path) -> None:
    """The same typo in both places was warned about twice, as if two settings were wrong; once, saying where."""
    (tmp_path / ".env").write_text('kovae_api_key=["k1"]\n')
    s = serve(trained_store[0], cwd=tmp_path, KOVAE_API_KEY='["k1"]')
    # Warned before uvicorn starts: all in the log of a server that answered /healthz.
    lines = [e["message"] for e in log_lines(s.stop()) if e.get("event") == "unknown_setting"]
    assert lines == [
        "KOVAE_API_KEY (in the environment and .env) is no setting and is ignored (did you mean KOVAE_API_KEYS?)"
    ]


# ----------------------------------------------------------------------------- low: logs of several workers


def test_every_log_line_is_json_with_several_workers(serve, trained_store, tmp_path) -> None:
    """The parent of several workers logged uvicorn's plain text ("INFO:     Child process [11806] died")."""
    s = serve(trained_store[0], KOVAE_WORKERS="2", TMPDIR=str(tmp_path))
    runtime = next(tmp_path.glob("kovae-*"))
    assert wait_for(lambda: len(list((runtime / "workers").glob("*.json"))) == 2)
    os.kill(int(next((runtime / "workers").glob("*.json")).stem), signal.SIGKILL)
    assert wait_for(lambda: any(b"died" in line for line in s.output))
    lines = log_lines(s.stop())
    assert any("Child process" in e["message"] and e["logger"] == "uvicorn.error" for e in lines)
