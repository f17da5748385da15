"""``python -m service``: start the forecast service with uvicorn (host, port and workers from settings).

With several workers, one temporary folder holds what they share (prometheus-client's multiprocess files and
the reload token); it is removed when the server stops. Logging is set up here, before uvicorn starts, and
uvicorn is told to leave it alone: its supervisor of several workers logs as JSON too. Settings that cannot be
served (an empty API key) stop the start with one JSON line saying which.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.logs import setup_logging
from service.settings import env_file_settings, get_settings, unknown_settings

log = logging.getLogger("kovae.app")


def parse_args(argv: list[str] | None) -> None:
    """The service takes no arguments, only settings; ``--help`` says so (and where they are) without starting."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Start the forecast service. It is configured by KOVAE_* environment variables (or a .env "
        "file in the working directory), not by arguments: KOVAE_HOST, KOVAE_PORT, KOVAE_WORKERS, "
        "KOVAE_MODEL_STORE, KOVAE_API_KEYS and the rest of the README's settings table (service/settings.py).",
    )
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        setup_logging("INFO")
        # A setting's own problem is named by its variable; one between settings names them in its message.
        named = (
            (f"KOVAE_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "", e["msg"]) for e in exc.errors()
        )
        problems = "; ".join(name + msg for name, msg in named)
        log.error("settings refused, not starting: %s", problems, extra={"event": "settings_refused"})
        return 2
    except UnicodeDecodeError as exc:  # pydantic-settings reads .env as UTF-8 text
        setup_logging("INFO")
        log.error(
            "settings refused, not starting: .env is not UTF-8 text (%s)",
            exc.reason,
            extra={"event": "settings_refused"},
        )
        return 2
    except SettingsError as exc:  # e.g. a list setting that is not JSON (KOVAE_API_KEYS=abc)
        setup_logging("INFO")
        hint = "list settings take JSON, e.g. KOVAE_API_KEYS='[\"key\"]'"
        log.error("settings refused, not starting: %s; %s", exc, hint, extra={"event": "settings_refused"})
        return 2
    setup_logging(settings.log_level)
    # Not refused: an orchestrator may inject KOVAE_* variables of its own (Kubernetes' service links).
    for name, where, hint in unknown_settings(os.environ, env_file_settings()):
        log.warning("%s%s is no setting and is ignored%s", name, where, hint, extra={"event": "unknown_setting"})
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
            log_config=None,  # set up above (and by each worker's app): JSON lines, never uvicorn's plain text
            access_log=False,  # the service logs each request itself, as JSON with its request id
            # By name, so that this process (the workers' supervisor) never imports service.metrics: with
            # PROMETHEUS_MULTIPROC_DIR set its gauges would count as a live worker's (kovae_model_ready at 0).
            http="service.http:LimitedHttpProtocol",
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # uvicorn waits on a float
        )
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
