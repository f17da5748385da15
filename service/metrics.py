"""Prometheus metrics of the service. Works with several uvicorn workers via prometheus-client's
multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (``python -m service`` sets it up)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("kovae_http_requests_total", "HTTP requests handled", ["route", "method", "status_class"])
REQUEST_SECONDS = Histogram(
    "kovae_http_request_duration_seconds", "HTTP request latency", ["route", "status_class"], buckets=LATENCY_BUCKETS
)
ERRORS = Counter("kovae_errors_total", "Requests that ended in an error, by type", ["type"])
INFERENCE_SECONDS = Histogram("kovae_inference_duration_seconds", "ONNX Runtime call latency", buckets=LATENCY_BUCKETS)
HORIZON = Histogram(
    "kovae_forecast_horizon_steps", "Requested forecast horizon", buckets=(1, 4, 8, 16, 24, 48, 96, 192)
)
BATCH = Histogram("kovae_forecast_batch_size", "Series per forecast request", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
MODEL_INFO = Gauge("kovae_model_info", "Loaded model version (1 = loaded)", ["version"], multiprocess_mode="max")
SPECTRAL_RADIUS = Gauge(
    "kovae_model_spectral_radius", "Spectral radius of the loaded operator A", multiprocess_mode="max"
)
LAST_LOADED = Gauge(
    "kovae_model_last_loaded_timestamp_seconds", "Unix time the model was last loaded", multiprocess_mode="max"
)
RELOADS = Counter("kovae_model_reloads_total", "Model reload attempts by outcome", ["outcome"])


def exposition() -> tuple[bytes, str]:
    """The metrics page: aggregated over worker processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
