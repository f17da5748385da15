"""Holds the model being served and swaps in new versions safely.

A reload loads the version CURRENT points to, verifies its checksum and runs a warm-up forecast; only then is
it swapped in (one reference assignment). A broken version is refused and the old one keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np

from modelcard.card import CardError
from modelcard.runtime import ModelRuntime
from modelcard.store import current_version
from service import metrics

log = logging.getLogger("kovae.registry")


class ReloadError(RuntimeError):
    pass


def warm_up(rt: ModelRuntime) -> None:
    """One forecast at the scalers' means over the longest horizon; it must come back finite."""
    L, H = rt.card["history"]["length"], rt.max_horizon
    x = np.broadcast_to(rt.x_mean, (1, L, len(rt.x_mean)))
    u = np.broadcast_to(rt.u_mean, (1, L, len(rt.u_mean)))
    fc = rt.predict(x, u, u[:, :1].repeat(H, 1), np.zeros(1), n_samples=2)
    if not (np.all(np.isfinite(fc.mean)) and fc.samples is not None and np.all(np.isfinite(fc.samples))):
        raise ReloadError(f"version {rt.version}: warm-up forecast is not finite")


class ModelRegistry:
    def __init__(self, store: Path, threads: int = 1) -> None:
        self.store, self.threads = Path(store), threads
        self.runtime: ModelRuntime | None = None
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._refused: str | None = None  # last version that failed to load; polling does not retry it

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def reload(self, *, force: bool = False) -> tuple[str, bool]:
        """Load CURRENT if it changed (or ``force``); returns (serving version, changed). Raises ReloadError."""
        with self._lock:
            version = current_version(self.store)
            if version is None:
                metrics.RELOADS.labels("failure").inc()
                raise ReloadError(f"no CURRENT version in {self.store}")
            old = self.runtime
            if old is not None and old.version == version and not force:
                return version, False
            try:
                rt = ModelRuntime(self.store / version, self.threads)
                warm_up(rt)
            except (CardError, ReloadError, OSError, ValueError, RuntimeError) as exc:
                metrics.RELOADS.labels("failure").inc()
                self._refused = version
                log.error("reload of %s refused: %s", version, exc, extra={"event": "reload_failed"})
                raise ReloadError(f"version {version} refused: {exc}") from exc
            self.runtime, self._refused = rt, None
            if old is not None and old.version != rt.version:
                metrics.MODEL_INFO.labels(old.version).set(0)
            metrics.MODEL_INFO.labels(rt.version).set(1)
            metrics.SPECTRAL_RADIUS.set(rt.card["stability"]["spectral_radius"])
            metrics.LAST_LOADED.set(time.time())
            metrics.RELOADS.labels("success").inc()
            log.info("serving %s", rt.version, extra={"event": "model_loaded"})
            return rt.version, True

    def start_polling(self, interval_s: float) -> None:
        if interval_s <= 0:
            return
        self._poller = threading.Thread(target=self._poll, args=(interval_s,), name="model-poller", daemon=True)
        self._poller.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            version = current_version(self.store)
            serving = self.runtime.version if self.runtime is not None else None
            if version is None or version in (serving, self._refused):
                continue
            with contextlib.suppress(ReloadError):  # logged and counted; retried when CURRENT changes again
                self.reload()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
