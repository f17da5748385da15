"""Holds the model being served and swaps in new versions safely.

A reload loads the version CURRENT points to (a valid version name, inside the store), verifies its checksum,
checks that its card names the same version as its folder, and runs a warm-up forecast; only then is it
swapped in (one reference assignment). Anything that goes wrong on the way, ONNX Runtime's own errors
included, is a counted and logged refusal: the old model keeps serving and the poller lives on. A refused
version is tried again once CURRENT or the version's files change.

With several workers (``runtime_dir`` set), a reload asked of one worker reaches all of them: it writes a
new token into ``runtime_dir/reload-token``, every worker watches that file, and each records the version it
serves in ``runtime_dir/workers/<pid>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import CARD_FILE, ONNX_FILE, CardError, atomic_write
from modelcard.runtime import ModelRuntime
from modelcard.store import POINTER, check_card_names_folder, current_version, version_dir
from service import metrics

log = logging.getLogger("kovae.registry")
TOKEN_FILE = "reload-token"
WORKERS_DIR = "workers"


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
    def __init__(self, store: Path, threads: int = 1, runtime_dir: Path | None = None) -> None:
        self.store, self.threads = Path(store), threads
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.runtime: ModelRuntime | None = None
        self.refused: dict[str, str] | None = None  # the last refusal: {"version", "reason"}
        self._refused_state: tuple | None = None  # pointer and files at that refusal: not retried until they change
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._token: str | None = self._read_token()

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    # ------------------------------------------------------------------ loading

    def _state(self) -> tuple:
        """What a reload would read: CURRENT's text and the (mtime, size) of that version's card and ONNX."""
        try:
            raw = (self.store / POINTER).read_bytes()
        except OSError:
            return (None,)
        files = []
        try:
            folder = version_dir(self.store, raw.decode().strip())
            for name in (CARD_FILE, ONNX_FILE):
                st = (folder / name).stat()
                files.append((st.st_mtime_ns, st.st_size))
        except (CardError, OSError, UnicodeDecodeError):
            pass
        return (raw, tuple(files))

    def _describe(self, exc: BaseException) -> str:
        """An error's text for logs and API clients, without the store's absolute path."""
        text = str(exc) or type(exc).__name__
        for prefix in {str(self.store.resolve()), str(self.store)}:
            text = text.replace(prefix + os.sep, "").replace(prefix, "<store>")
        return text[:500]

    def reload(self, *, force: bool = False) -> tuple[str, bool]:
        """Load CURRENT if it changed (or ``force``); returns (serving version, changed). Raises ReloadError."""
        with self._lock:
            state = self._state()
            version = "?"  # named in the refusal if CURRENT cannot be read
            try:
                version = current_version(self.store) or version
                if version == "?":
                    raise ReloadError(f"no {POINTER} version in the model store")
                old = self.runtime
                if old is not None and old.version == version and not force:
                    return version, False
                rt = ModelRuntime(version_dir(self.store, version), self.threads)
                check_card_names_folder(self.store / version, rt.card)  # the name CURRENT gives, not a link's target
                warm_up(rt)
            except Exception as exc:  # ONNX Runtime raises its own types: every failure is a refusal
                metrics.RELOADS.labels("failure").inc()
                reason = self._describe(exc)
                self.refused, self._refused_state = {"version": version, "reason": reason}, state
                log.error(
                    "reload of %s refused: %s (store %s)",
                    version,
                    reason,
                    self.store.resolve(),
                    extra={"event": "reload_failed"},
                )
                self._write_worker_state()
                raise ReloadError(f"version {version} refused: {reason}") from None
            self.runtime, self.refused, self._refused_state = rt, None, None
            if old is not None and old.version != rt.version:
                metrics.MODEL_INFO.labels(old.version).set(0)
            metrics.MODEL_INFO.labels(rt.version).set(1)
            metrics.SPECTRAL_RADIUS.set(rt.card["stability"]["spectral_radius"])
            metrics.LAST_LOADED.set(time.time())
            metrics.RELOADS.labels("success").inc()
            log.info("serving %s", rt.version, extra={"event": "model_loaded"})
            self._write_worker_state()
            return rt.version, True

    def try_reload(self) -> None:
        """A reload whose failure is only logged and counted (start-up, poller, watcher)."""
        try:
            self.reload()
        except ReloadError:
            pass
        except Exception:  # never let a background thread die
            log.exception("unexpected error while reloading")

    def poll_once(self) -> None:
        """Reload when CURRENT names another version, unless that very state was refused already."""
        state = self._state()
        serving = self.runtime.version if self.runtime is not None else None
        raw = state[0]
        if raw is not None and raw.decode(errors="replace").strip() == serving:
            return
        if state == self._refused_state:
            return
        self.try_reload()

    # ------------------------------------------------------------------ background threads

    def start(self, poll_interval_s: float, watch_interval_s: float = 0.2) -> None:
        if poll_interval_s > 0:
            self._spawn("model-poller", self.poll_once, poll_interval_s)
        if self.runtime_dir is not None:
            self._write_worker_state()
            self._spawn("reload-watcher", self._watch_token, watch_interval_s)

    def _spawn(self, name: str, step: Any, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    step()
                except Exception:
                    log.exception("%s step failed", name)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.runtime_dir is not None:
            (self.runtime_dir / WORKERS_DIR / f"{os.getpid()}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ reaching every worker

    def _read_token(self) -> str | None:
        if self.runtime_dir is None:
            return None
        try:
            return (self.runtime_dir / TOKEN_FILE).read_text()
        except OSError:
            return None

    def _watch_token(self) -> None:
        token = self._read_token()
        if token != self._token:
            self._token = token
            self.try_reload()

    def broadcast_reload(self) -> None:
        """Ask every worker of this server to reload (no-op with one worker)."""
        if self.runtime_dir is not None:
            self._token = uuid.uuid4().hex  # this worker has reloaded already
            atomic_write(self.runtime_dir / TOKEN_FILE, self._token.encode())

    def _write_worker_state(self) -> None:
        if self.runtime_dir is None:
            return
        state = {
            "pid": os.getpid(),
            "version": self.runtime.version if self.runtime is not None else None,
            "refused": self.refused,
            "time": time.time(),
        }
        try:
            atomic_write(self.runtime_dir / WORKERS_DIR / f"{os.getpid()}.json", json.dumps(state).encode())
        except OSError:
            log.exception("cannot write the worker state")

    def workers(self) -> dict[str, dict[str, Any]]:
        """State of every live worker of this server (pid -> state); files of dead workers are removed."""
        if self.runtime_dir is None:
            pid = os.getpid()
            return {str(pid): {"version": self.runtime.version if self.runtime else None, "refused": self.refused}}
        out = {}
        for path in (self.runtime_dir / WORKERS_DIR).glob("*.json"):
            try:
                pid = int(path.stem)
                if not metrics.pid_alive(pid):
                    path.unlink(missing_ok=True)
                    continue
                state = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
            out[str(pid)] = {"version": state.get("version"), "refused": state.get("refused")}
        return out

    def wait_for_workers(self, version: str, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
        """Wait until every live worker serves ``version`` or has refused it; returns their states."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.workers()
            settled = all(
                s["version"] == version or (s["refused"] or {}).get("version") == version for s in states.values()
            )
            if settled or time.monotonic() > deadline:
                return states
            time.sleep(0.05)
