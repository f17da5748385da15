"""``python -m service``: start the forecast service with uvicorn (host, port and workers from settings).

With several workers, one temporary folder holds what they share (prometheus-client's multiprocess files and
the reload token); it is removed when the server stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from service.http import HeaderTimeoutProtocol
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    shared: Path | None = None  # created here, so removed here
    if settings.workers > 1:
        runtime = settings.runtime_dir
        if runtime is None:
            runtime = shared = Path(tempfile.mkdtemp(prefix="kovae-"))
            os.environ["KOVAE_RUNTIME_DIR"] = str(shared)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several workers share metrics through files (prometheus-client multiprocess mode).
            (runtime / "metrics").mkdir(parents=True, exist_ok=True)
            for stale in (runtime / "metrics").glob("*.db"):  # a previous server's counters
                stale.unlink()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(runtime / "metrics")
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
            access_log=False,  # the service logs each request itself, as JSON with its request id
            http=HeaderTimeoutProtocol,
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=10,
        )
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    main()
