"""Prometheus metrics of the service. Works with several uvicorn workers via prometheus-client's
multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (``python -m service`` sets it up).

The model gauges count live workers only (``livemax``): the files of a worker that died are dropped when the
page is rendered, so a restarted worker's old version does not linger at 1. Counters keep every worker's counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Up to a minute: the largest request KOVAE_MAX_WORK lets in takes seconds, and a quantile past the last bucket
# reads as that bucket's bound.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

REQUESTS = Counter("kovae_http_requests_total", "HTTP requests handled", ["route", "method", "status_class"])
REQUEST_SECONDS = Histogram(
    "kovae_http_request_duration_seconds", "HTTP request latency", ["route", "status_class"], buckets=LATENCY_BUCKETS
)
ERRORS = Counter("kovae_errors_total", "Requests that ended in an error, by type", ["type"])
INFERENCE_SECONDS = Histogram(
    "kovae_inference_duration_seconds", "Forecast computation: ONNX Runtime calls and encoding", buckets=LATENCY_BUCKETS
)
HORIZON = Histogram(
    "kovae_forecast_horizon_steps", "Requested forecast horizon", buckets=(1, 4, 8, 16, 24, 48, 96, 192)
)
BATCH = Histogram("kovae_forecast_batch_size", "Series per forecast request", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ANSWER_BYTES_IN_FLIGHT = Gauge(
    "kovae_answer_bytes_in_flight",
    "Predicted bytes of the large answers being computed or sent (KOVAE_MAX_ANSWERS_IN_FLIGHT_BYTES bounds them)",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge("kovae_model_info", "Loaded model version (1 = loaded)", ["version"], multiprocess_mode="livemax")
SPECTRAL_RADIUS = Gauge(
    "kovae_model_spectral_radius", "Spectral radius of the loaded operator A", multiprocess_mode="livemax"
)
LAST_LOADED = Gauge(
    "kovae_model_last_loaded_timestamp_seconds", "Unix time the model was last loaded", multiprocess_mode="livemax"
)
RELOADS = Counter("kovae_model_reloads_total", "Model reload attempts by outcome", ["outcome"])
for _outcome in ("success", "failure"):  # both exported from the start: increase() needs the 0 before the first 1
    RELOADS.labels(_outcome)
READY = Gauge(
    "kovae_model_ready",
    "1 while a model is served (what /readyz says), 0 before one loads",
    multiprocess_mode="livemin",
)
REFUSED = Gauge(
    "kovae_model_refused",
    "1 while the version CURRENT names is refused (another keeps serving, or none: GET /readyz says why)",
    multiprocess_mode="livemax",
)
OPTIMIZE_CALLS = Counter(
    "kovae_optimize_total",
    "Setpoint advice answered, by status and whether the plan meets every limit",
    ["status", "feasible"],
)
OPTIMIZE_SECONDS = Histogram(
    "kovae_optimize_duration_seconds",
    "Setpoint advice: the search's time",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0),
)
OPTIMIZE_PLANS = Histogram(
    "kovae_optimize_plans_evaluated", "Plans the search forecast per call", buckets=(50, 100, 200, 400, 800, 1600, 3200)
)
CANCELLED = Counter("kovae_forecasts_cancelled_total", "Forecasts stopped because the client went away")
INPUT_WARNINGS = Counter(
    "kovae_input_warnings_total",
    "Warnings answered about a series' inputs, by kind (training_range, flat, stale: a sensor down now) and the "
    "card's variable name (bounded by the card)",
    ["kind", "variable"],
)


def count_warnings(warnings: list[dict[str, Any]]) -> None:
    """One count per warning answered: which sensors are down, stuck or out of range, across all callers."""
    for w in warnings:
        INPUT_WARNINGS.labels(w["kind"], w["variable"]).inc()


LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def pid_alive(pid: int) -> bool:
    """Whether a worker process still runs (the files of dead workers are dropped: metrics, reload state)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def _drop_dead_workers(folder: str) -> None:
    for path in Path(folder).glob("gauge_live*_*.db"):
        m = LIVE_FILE.match(path.name)
        if m is not None and not pid_alive(int(m.group(1))):
            multiprocess.mark_process_dead(int(m.group(1)), folder)


def exposition() -> tuple[bytes, str]:
    """The metrics page: aggregated over worker processes in multiprocess mode."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        _drop_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
