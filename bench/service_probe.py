"""Probe the real service on 127.0.0.1 as a hostile client and as a busy plant would: prints what it found.

``python bench/service_probe.py [--store models] [--rounds 20] [--load-seconds 20]``

1. Hostile bodies: about 40 kinds of malformed, out-of-range or odd requests, ``--rounds`` times each with
   fresh values, plus valid ones: counts of 5xx answers and of bodies that are not strict JSON (NaN, Infinity).
2. Reloads under load: 50 forecasts per second for ``--load-seconds`` while CURRENT flips between two
   versions and /admin/reload is called: failed requests and reloads done.
3. A maximal request (series x samples x horizon at the server's limit) with 1-series requests sent beside it:
   the small requests' latency, the large one's time, and the server's peak and settled memory (RSS).

Only 127.0.0.1 is targeted; every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from service_load import KeepAliveClient, phase, post_bytes, private_store, reloader, request_body, start_server

from modelcard.runtime import ModelRuntime
from service.settings import Settings


def strict_json(text: str) -> bool:
    def refuse(token: str) -> None:
        raise ValueError(token)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    return True


def hostile_bodies(rt: ModelRuntime, seed: int) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of requests a careless or hostile client sends."""
    rng = np.random.default_rng(seed)
    base = request_body(rt, 8, seed)
    s0 = base["series"][0]
    m, c = rt.measurements[int(rng.integers(len(rt.measurements)))], rt.controls[int(rng.integers(len(rt.controls)))]
    k = int(rng.integers(len(s0["timestamps"])))

    def mutated(fn: Callable[[dict], object]) -> bytes:
        body = json.loads(json.dumps(base))
        fn(body)
        return json.dumps(body).encode()

    def setter(path: list, value: object) -> Callable[[dict], object]:
        def fn(body: dict) -> None:
            target = body
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value

        return fn

    series = ["series", 0]
    huge = float(10 ** rng.integers(39, 300))
    cases: list[tuple[str, Callable[[dict], object]]] = [
        ("valid", lambda b: None),
        ("valid with quantiles", lambda b: b.update(quantiles=[0.05, 0.5, 0.95], samples=64)),
        ("value 1e39+", setter([*series, "measurements", m, k], huge)),
        ("negative value", setter([*series, "measurements", m, k], -abs(float(rng.normal(10, 5))))),
        ("control 1e300", setter([*series, "controls", c, k], 1e300)),
        ("KLa 5000", setter([*series, "controls", "KLa_5", k], 5000.0) if "KLa_5" in rt.controls else lambda b: 0),
        ("control -1e9", setter([*series, "controls", c, k], -1e9)),
        ("bool in array", setter([*series, "measurements", m, k], True)),
        ("string in array", setter([*series, "measurements", m, k], "1.5")),
        ("null in array", setter([*series, "measurements", m, k], None)),
        ("horizon as string", setter(["horizon"], "8")),
        ("horizon 0", setter(["horizon"], 0)),
        ("horizon huge", setter(["horizon"], 10**12)),
        ("horizon float", setter(["horizon"], 8.5)),
        ("empty timestamps", setter([*series, "timestamps"], [])),
        ("short history", lambda b: b["series"][0].update(timestamps=b["series"][0]["timestamps"][:3])),
        ("bad timestamp", setter([*series, "timestamps", k], "yesterday")),
        ("far future", lambda b: b["series"][0].update(timestamps=_ending(len(s0["timestamps"]), "9999-12-31"))),
        ("far past", lambda b: b["series"][0].update(timestamps=_ending(len(s0["timestamps"]), "0001-01-02"))),
        ("unknown variable", setter([*series, "measurements", "nope"], [1.0] * len(s0["timestamps"]))),
        ("missing variable", lambda b: b["series"][0]["measurements"].pop(m)),
        ("wrong length", lambda b: b["series"][0]["measurements"][m].pop()),
        ("extra field", setter(["extra"], 1)),
        ("no series", setter(["series"], [])),
        ("series not a list", setter(["series"], {"a": 1})),
        ("quantile 1", setter(["quantiles"], [1.0])),
        ("quantile NaN-like", setter(["quantiles"], [-0.0])),
        ("repeated quantiles", setter(["quantiles"], [0.5, 0.5])),
        ("close quantiles", setter(["quantiles"], [0.1234567, 0.1234568])),
        ("samples huge", lambda b: b.update(samples=10**9, quantiles=[0.5])),
        ("samples no quantiles", setter(["samples"], 1000)),
        ("seed negative", setter(["seed"], -1)),
        ("seed huge", setter(["seed"], 2**70)),
        ("both hold and future", setter([*series, "future_controls"], {n: [1.0] * 8 for n in rt.controls})),
        ("id too long", setter([*series, "id"], "x" * 1000)),
        ("too many series", lambda b: b.update(series=b["series"] * 65)),
    ]
    out = [(name, mutated(fn), "application/json") for name, fn in cases]
    raw = json.dumps(base)
    out += [
        ("truncated JSON", raw[: int(rng.integers(1, len(raw)))].encode(), "application/json"),
        ("NaN token", raw.replace(str(s0["measurements"][m][k]), "NaN", 1).encode(), "application/json"),
        ("duplicate key", raw.replace('"horizon": 8', '"horizon": 8, "horizon": 9').encode(), "application/json"),
        ("text/plain", raw.encode(), "text/plain"),
        ("form", b"a=1&b=2", "application/x-www-form-urlencoded"),
        ("binary", bytes(rng.integers(0, 256, 200, dtype=np.uint8)), "application/json"),
        ("JSON array", b"[1, 2, 3]", "application/json"),
        ("JSON null", b"null", "application/json"),
        ("deep nesting", b"[" * 5000 + b"]" * 5000, "application/json"),
    ]
    return out


def _ending(n: int, day: str) -> list[str]:
    from datetime import datetime, timedelta

    end = datetime.fromisoformat(f"{day}T23:45:00+00:00")
    return [(end - timedelta(minutes=15 * (n - 1 - i))).isoformat() for i in range(n)]


def probe_bodies(url: str, rt: ModelRuntime, rounds: int) -> None:
    counts: dict[int, int] = {}
    bad_json: list[str] = []
    server_errors: list[str] = []
    sent = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for seed in range(rounds):
            for name, body, ctype in hostile_bodies(rt, seed):
                r = client.post("/forecast", content=body, headers={"content-type": ctype})
                sent += 1
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    server_errors.append(name)
                if not strict_json(r.text):
                    bad_json.append(name)
            for method, path in (("GET", "/forecast"), ("PUT", "/model"), ("DELETE", "/readyz")):
                r = client.request(method, path)
                sent += 1
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                if r.status_code == 405 and "allow" not in r.headers:
                    server_errors.append(f"405 without Allow on {method} {path}")
    print(f"1. hostile bodies: {sent} requests, answers by status {dict(sorted(counts.items()))}")
    print(f"   5xx: {len(server_errors)} {sorted(set(server_errors)) or ''}")
    print(f"   bodies that are not strict JSON: {len(bad_json)} {sorted(set(bad_json)) or ''}")


def probe_reloads(port: int, store: Path, version: str, rt: ModelRuntime, seconds: float) -> None:
    body = json.dumps(request_body(rt, 96)).encode()

    async def go() -> tuple[dict[int, int], int, int]:
        client = KeepAliveClient(port, post_bytes("/forecast", body))
        try:
            url = f"http://127.0.0.1:{port}"
            versions = [version, f"{version}-b"]
            reloads = asyncio.create_task(reloader(store, versions, 5, seconds / 6, "bench-admin", url))
            ms, statuses, _ = await phase(client, 50, seconds)
            return statuses, await reloads, len(ms)
        finally:
            client.close()

    statuses, reloads, n = asyncio.run(go())
    failed = sum(v for k, v in statuses.items() if k != 200)
    print(f"2. reloads under load: {n} requests at 50/s for {seconds:g} s, {reloads} of 5 reloads, failed {failed}")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and at its peak."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def probe_maximal(url: str, pid: int, rt: ModelRuntime) -> None:
    settings = Settings()
    H = rt.max_horizon
    n_series = min(settings.max_series, 64)
    samples = min(settings.max_samples, settings.max_work // (n_series * H))
    large = request_body(rt, H)
    large["series"] = [dict(large["series"][0], id=f"s{i}") for i in range(n_series)]
    large.update(quantiles=[0.1, 0.5, 0.9], samples=samples)
    small = request_body(rt, H, seed=1)
    rss_before, _ = rss_kib(pid)
    result: dict[str, float] = {}

    def send_large() -> None:
        start = time.perf_counter()
        r = httpx.post(f"{url}/forecast", json=large, timeout=600)
        result.update(status=r.status_code, seconds=time.perf_counter() - start)

    small_ms: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/forecast", json=small)  # warm connection
        thread = threading.Thread(target=send_large)
        thread.start()
        time.sleep(0.2)
        while thread.is_alive() and len(small_ms) < 2000:
            start = time.perf_counter()
            assert client.post("/forecast", json=small).status_code == 200
            small_ms.append((time.perf_counter() - start) * 1000)
            time.sleep(0.05)
        thread.join()
    rss_after, peak = rss_kib(pid)
    time.sleep(5)
    rss_settled, _ = rss_kib(pid)
    work = n_series * samples * H
    print(
        f"3. maximal request: {n_series} series x {samples} samples x {H} steps = {work} (limit {settings.max_work}),"
        f" status {result.get('status')}, {result.get('seconds', float('nan')):.1f} s"
    )
    if small_ms:
        print(
            f"   {len(small_ms)} one-series requests meanwhile: median {statistics.median(small_ms):.1f} ms, "
            f"p95 {np.percentile(small_ms, 95):.1f} ms, max {max(small_ms):.1f} ms"
        )
    print(
        f"   server RSS: {rss_before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB, "
        f"{rss_after / 1024:.0f} MiB right after, {rss_settled / 1024:.0f} MiB 5 s later"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of hostile bodies (about 50 requests each)")
    parser.add_argument("--load-seconds", type=float, default=20.0)
    args = parser.parse_args()
    if args.rounds > 200 or args.load_seconds > 120:
        sys.exit("refusing: at most 200 rounds and 120 s of load")
    tmp, store, version = private_store(Path(args.store))
    try:
        rt = ModelRuntime(store / version)
        server, port = start_server(store, KOVAE_POLL_INTERVAL_S="0")
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"model {version}, server on {url} (pid {server.pid})")
            probe_bodies(url, rt, args.rounds)
            probe_reloads(port, store, version, rt, args.load_seconds)
            probe_maximal(url, server.pid, rt)
        finally:
            server.terminate()
            server.wait(timeout=15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
