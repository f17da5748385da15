"""Load test of the real service on 127.0.0.1: fixed rate, then a ramp, with model reloads during the run.

``python bench/service_load.py [--rate 100] [--seconds 60] [--reloads 4] [--ramp 150,200,300] [--ramp-seconds 10]
[--workers 1]``

Only 127.0.0.1 is ever targeted and every phase is bounded in time and request count. Prints p50/p95/p99
latency, throughput and errors per phase, and the in-process overhead over a raw ONNX Runtime call. The fixed
rate runs ``--seconds`` without and as long with ``--reloads`` model reloads (CURRENT flipped between two
copies of the model and /admin/reload called), in alternating windows, and the ratio of their p99 says what a
reload costs the requests beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.cli import served_version
from modelcard.card import read_card, write_card
from modelcard.runtime import ModelRuntime
from modelcard.store import POINTER, current_version, set_current

ROOT = Path(__file__).resolve().parents[1]


def request_body(rt: ModelRuntime, horizon: int, seed: int = 0) -> dict:
    """One series of plausible history (around the card's scalers, inside the training range), controls held."""
    rng = np.random.default_rng(seed)
    L = rt.card["history"]["length"]
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    x = rt.x_mean + 0.3 * rt.x_std * rng.standard_normal((L, len(rt.x_mean)))
    u = rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((L, len(rt.u_mean)))
    if rt.x_range is not None and rt.u_range is not None:
        x, u = np.clip(x, *rt.x_range), np.clip(u, *rt.u_range)
    return {
        "horizon": horizon,
        "series": [
            {
                "timestamps": [(t0 + timedelta(minutes=15 * k)).isoformat() for k in range(L)],
                "measurements": {n: x[:, j].tolist() for j, n in enumerate(rt.measurements)},
                "controls": {n: u[:, j].tolist() for j, n in enumerate(rt.controls)},
                "hold_controls": True,
            }
        ],
    }


class KeepAliveClient:
    """A minimal HTTP/1.1 client for one pre-encoded request, over a pool of keep-alive connections.

    The load generator shares the 2 cores with the server, so it must be cheap: httpx spent more CPU per
    request than the service's own parsing. This one writes prepared bytes and reads status and body only.
    """

    def __init__(self, port: int, request: bytes, max_connections: int = 256) -> None:
        self.port, self.request, self.max_connections = port, request, max_connections
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def send(self) -> int:
        """One request; returns the HTTP status, 0 on a connection failure, -1 if no connection was free.

        A reused connection the server has closed meanwhile (keep-alive timeout) is retried once on a new
        one, as HTTP clients do; only a fresh connection's failure counts as an error.
        """
        for attempt in range(2):
            if self.idle and attempt == 0:
                (reader, writer), reused = self.idle.pop(), True
            elif self.opened < self.max_connections:
                self.opened += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                reused = False
            else:
                return -1
            try:
                writer.write(self.request)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                writer.close()
                self.opened -= 1
                if reused:
                    continue
                return 0
            self.idle.append((reader, writer))
            return status
        return 0

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def post_bytes(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def phase(client: KeepAliveClient, rate: float, seconds: float) -> tuple[np.ndarray, dict[int, int], float]:
    """Open-loop load: requests start on a fixed schedule whatever the latency; bounded by rate * seconds.

    Returns latencies (ms) of the requests sent, counts by status (0: connection failure, -1: not sent because
    all connections were busy, i.e. the generator's limit, not the server's answer) and the wall time.
    """
    n = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one() -> None:
        start = time.perf_counter()
        status = await client.send()
        statuses[status] = statuses.get(status, 0) + 1
        if status != -1:
            latencies.append(time.perf_counter() - start)

    tasks = []
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return np.array(latencies) * 1000, statuses, time.perf_counter() - t0


async def sequential(client: KeepAliveClient, n: int) -> tuple[np.ndarray, dict[int, int], float]:
    """Closed loop, one request at a time: the service's own latency, without queueing."""
    latencies, statuses, t0 = [], {}, time.perf_counter()
    for _ in range(n):
        start = time.perf_counter()
        status = await client.send()
        statuses[status] = statuses.get(status, 0) + 1
        latencies.append(time.perf_counter() - start)
    return np.array(latencies) * 1000, statuses, time.perf_counter() - t0


async def reloader(store: Path, versions: list[str], times: int, every: float, key: str, url: str) -> int:
    """Flip CURRENT between versions (atomically, as training.promote does) and ask the server to reload;
    returns how many swaps took: the server serves the new version (the poller may have been first)."""
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as admin:
        for i in range(times):
            await asyncio.sleep(every)
            target = versions[(i + 1) % len(versions)]
            await asyncio.to_thread(set_current, store, target)  # it checks the checksums: not on this loop
            r = await admin.post("/admin/reload", headers={"x-api-key": key})
            done += r.status_code == 200 and r.json()["model_version"] == target
    return done


Phase = tuple[np.ndarray, dict[int, int], float]


async def paired(
    client: KeepAliveClient, args: argparse.Namespace, store: Path, versions: list[str], url: str
) -> tuple[Phase, Phase, int]:
    """The fixed rate for ``args.seconds`` without reloads and as long with ``args.reloads`` of them, in
    alternating windows (one reload each, started a quarter into it) so that both see the same machine: on a
    shared machine, other work drifts more between two whole phases than a reload costs. Returns the pooled
    quiet windows, the pooled reload windows, and how many reloads took."""
    window = args.seconds / args.reloads
    pooled: dict[str, list[Phase]] = {"quiet": [], "busy": []}
    took = 0
    for i in range(args.reloads):
        pooled["quiet"].append(await phase(client, args.rate, window))
        target = versions[(i + 1) % len(versions)]
        swap = asyncio.create_task(
            reloader(store, [versions[i % len(versions)], target], 1, window / 4, "bench-admin", url)
        )
        pooled["busy"].append(await phase(client, args.rate, window))
        took += await swap

    def pool(phases: list[Phase]) -> Phase:
        statuses: dict[int, int] = {}
        for _, st, _ in phases:
            for code, n in st.items():
                statuses[code] = statuses.get(code, 0) + n
        return np.concatenate([ms for ms, _, _ in phases]), statuses, sum(w for _, _, w in phases)

    return pool(pooled["quiet"]), pool(pooled["busy"]), took


def report(name: str, ms: np.ndarray, statuses: dict[int, int], wall: float) -> None:
    """One line per phase; compare its p50 with the raw ONNX Runtime line for the service's overhead.

    errors: any answer but 200, and connection failures. unsent: the generator ran out of connections.
    """
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (np.nan,) * 3
    errors = {k: v for k, v in statuses.items() if k not in (200, -1)}
    print(
        f"{name:<14} n={len(ms):>6} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms  "
        f"throughput {statuses.get(200, 0) / wall:7.1f}/s  errors {sum(errors.values())} {errors or ''}"
        + (f"  unsent {statuses[-1]}" if statuses.get(-1) else "")
    )


async def run(args: argparse.Namespace, port: int, store: Path, versions: list[str], rt: ModelRuntime) -> None:
    body = json.dumps(request_body(rt, args.horizon)).encode()
    client = KeepAliveClient(port, post_bytes("/forecast", body))
    url = f"http://127.0.0.1:{port}"
    try:
        await phase(client, 20, 2)  # warm up connections and the server
        report("one at a time", *await sequential(client, 300))
        quiet, busy, took = await paired(client, args, store, versions, url)
        report(f"fixed {args.rate:g}/s", *quiet)
        report(f"  + {args.reloads} reloads", *busy)
        p99 = np.percentile(quiet[0], 99), np.percentile(busy[0], 99)
        print(
            f"{'':<14} reloads that took: {took} of {args.reloads}; p99 with reloads / without: "
            f"{p99[1]:.2f} / {p99[0]:.2f} ms = {p99[1] / p99[0]:.2f}x (target: at most 2x)"
        )
        for rate in args.ramp:
            ms, errors, wall = await phase(client, rate, args.ramp_seconds)
            report(f"ramp {rate:g}/s", ms, errors, wall)
    finally:
        client.close()


def private_store(src: Path) -> tuple[Path, Path, str]:
    """A private copy of the store's current version plus a twin named ``<version>-b``, so that reloads really
    swap models; returns (temp folder to remove, store, version)."""
    version = current_version(src)
    tmp = Path(tempfile.mkdtemp(prefix="kovae-bench-"))
    store = tmp / "models"
    store.mkdir()
    shutil.copytree(src / version, store / version)
    shutil.copytree(src / version, store / f"{version}-b")
    card = read_card(store / f"{version}-b", verify=False)
    card["version"] = f"{version}-b"
    write_card(store / f"{version}-b", card)  # with its checksum file, as training writes it
    (store / POINTER).write_text(version)
    return tmp, store, version


def start_server(store: Path, log: Path | None = None, **env: str) -> tuple[subprocess.Popen, int]:
    """``python -m service`` on a free port of 127.0.0.1 (admin key "bench-admin"), once /readyz answers 200;
    its log (stderr) goes to ``log`` if given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {
        **os.environ,
        "KOVAE_MODEL_STORE": str(store),
        "KOVAE_HOST": "127.0.0.1",
        "KOVAE_PORT": str(port),
        "KOVAE_ADMIN_API_KEYS": '["bench-admin"]',
        "KOVAE_POLL_INTERVAL_S": "1",
        "KOVAE_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    stderr = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the server holds it)
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stderr=stderr)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError("the service did not become ready in 30 s")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and at its peak."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def reset_peak(pid: int) -> None:
    """Start VmHWM over from the present RSS (Linux: clear_refs 5), so a peak belongs to one probe."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if (
            m
            and m.group(1) == name
            and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")).items()
        ):
            total += float(m.group(3))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ramp", type=lambda s: [float(v) for v in s.split(",") if v], default=[150.0, 200.0, 300.0])
    parser.add_argument("--ramp-seconds", type=float, default=10.0)
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reloads", type=int, default=4, help="model reloads in the fixed phase, one per window")
    args = parser.parse_args()
    if args.rate * args.seconds > 20_000 or any(r * args.ramp_seconds > 20_000 for r in args.ramp):
        sys.exit("refusing: more than 20,000 requests in one phase")
    served_version(parser, Path(args.store))  # a missing store or version stops here, before any copy

    tmp, store, version = private_store(Path(args.store))
    rt = ModelRuntime(store / version)
    raw = request_body(rt, args.horizon)["series"][0]
    x = np.stack([raw["measurements"][n] for n in rt.measurements], 1)[None]
    u = np.stack([raw["controls"][n] for n in rt.controls], 1)[None]
    uf = np.repeat(u[:, -1:], args.horizon, 1)
    clock = np.zeros(1)
    for _ in range(20):
        rt.predict(x, u, uf, clock)
    raw_ms = []
    for _ in range(300):
        start = time.perf_counter()
        rt.predict(x, u, uf, clock)
        raw_ms.append((time.perf_counter() - start) * 1000)

    server, port = start_server(store, KOVAE_WORKERS=str(args.workers))
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"model {version}, horizon {args.horizon}, {args.workers} worker(s), server on {url}")
        asyncio.run(run(args, port, store, [version, f"{version}-b"], rt))
        med, p99 = np.median(raw_ms), np.percentile(raw_ms, 99)
        print(f"raw ONNX Runtime predict (in-process, same request): median {med:.2f} ms, p99 {p99:.2f} ms")
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
