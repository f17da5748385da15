"""Many control plans for one history: plans per second, against the same plans sent as separate series.

``python bench/plans.py [--store models] [--repeats 7] [--threads 2]``

Through ``modelcard.runtime`` (what the service runs): one 1-day history (96 steps) under 1, 100 and 1,000
random plans of 96 steps, mean forecast only, with the plans graph (the encoder runs once) and with the
ordinary graph given the history once per plan (the encoder runs per plan). Then one real ``python -m service``
on 127.0.0.1 answers the 1,000-plan request end to end (JSON in and out included), with every plan's forecast
and with summaries only (``plan_forecasts: false``). Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import served_version
from bench.service_load import start_server
from modelcard.runtime import ModelRuntime

TARGET_MS = 100.0  # 1,000 plans for one history, on 2 cores


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (the service default is 1)")
    args = parser.parse_args()
    store = Path(args.store)
    version = served_version(parser, store)
    rt = ModelRuntime(store / version, threads=args.threads)
    rng = np.random.default_rng(0)
    L, H = rt.card["history"]["length"], rt.max_horizon
    x = rt.x_mean + 0.3 * rt.x_std * rng.standard_normal((L, len(rt.x_mean)))
    u = rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((L, len(rt.u_mean)))
    x, u = np.clip(x, *rt.x_range), np.clip(u, *rt.u_range)
    print(f"model {version}; history {L}, horizon {H}, {args.threads} ONNX Runtime thread(s), mean forecasts")
    print(f"{'plans':>6} {'plans graph':>12} {'separate':>10} {'ratio':>6} {'plans/s':>9}")
    results = {}
    for n in (1, 100, 1000):
        plans = np.clip(rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((n, H, len(rt.u_mean))), *rt.u_range)
        once = timed(lambda plans=plans: rt.predict_plans(x, u, plans, 600.0), args.repeats)
        xs, us, last = np.repeat(x[None], n, 0), np.repeat(u[None], n, 0), np.full(n, 600.0)
        each = timed(lambda plans=plans, xs=xs, us=us, last=last: rt.predict(xs, us, plans, last), args.repeats)
        results[n] = once
        print(f"{n:>6} {1000 * once:>10.1f}ms {1000 * each:>8.1f}ms {each / once:>5.1f}x {n / once:>9.0f}")

    # End to end through a real server on 127.0.0.1: one request with 1,000 plans.
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    plans = np.clip(rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((1000, H, len(rt.u_mean))), *rt.u_range)
    body = {
        "horizon": H,
        "series": [
            {
                "timestamps": [(t0 + timedelta(minutes=15 * k)).isoformat() for k in range(L)],
                "measurements": {n: x[:, j].tolist() for j, n in enumerate(rt.measurements)},
                "controls": {n: u[:, j].tolist() for j, n in enumerate(rt.controls)},
                "plans": [
                    {"name": f"plan-{k}", "future_controls": {n: p[:, j].tolist() for j, n in enumerate(rt.controls)}}
                    for k, p in enumerate(plans)
                ],
            }
        ],
    }
    server, port = start_server(store, KOVAE_ORT_THREADS=str(args.threads), KOVAE_MAX_BODY_BYTES="50000000")
    try:
        for plan_forecasts in (True, False):  # every plan's forecast, or its summary only
            body["series"][0]["plan_forecasts"] = plan_forecasts
            data = json.dumps(body).encode()
            size = []

            def post(data: bytes = data, size: list[int] = size) -> None:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/forecast", data, {"content-type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = r.read()
                assert len(json.loads(answer)["series"][0]["plans"]) == 1000
                size.append(len(answer))

            http = timed(post, max(3, args.repeats // 2))
            print(
                f"1000 plans through the service (HTTP, {len(data) / 1e6:.1f} MB request, plan_forecasts "
                f"{str(plan_forecasts).lower()}, {size[-1] / 1e6:.1f} MB answer): {1000 * http:.0f} ms"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    met = results[1000] * 1000 < TARGET_MS
    print(
        f"target: 1,000 plans in < {TARGET_MS:.0f} ms (runtime): {'met' if met else 'NOT MET'} "
        f"({1000 * results[1000]:.0f} ms)"
    )


if __name__ == "__main__":
    main()
