"""``python -m service``: start the forecast service with uvicorn (host, port and workers from settings)."""

from __future__ import annotations

import os
import tempfile

import uvicorn

from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers share metrics through files (prometheus-client multiprocess mode).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kovae-metrics-")
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
