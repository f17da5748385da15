"""Holds the model being served and swaps in new versions safely.

A reload loads the version CURRENT points to (a valid version name, inside the store), verifies the checksums
of its card and graphs, checks the card's numbers (``modelcard.validate``) and that it names the same version
as its folder, and runs warm-up forecasts on a realistic history; only then is it swapped in (one reference
assignment). All of it happens beside the serving path, in background threads of lower CPU priority, so that
requests are not held up while a version loads. Anything that goes wrong on the way, ONNX Runtime's own errors
included, is a counted and logged refusal, shown by /readyz: the old model keeps serving and the poller lives
on. A refused version is tried again once CURRENT or the version's files change, and the refusal is cleared
once CURRENT names the served version, as it was loaded, again. The served version's files changed in place (a
re-export, a card upgraded) are loaded again, as a new version would be: by the poller once they have stood still
for one poll (a re-export writes its files one after another), by /admin/reload at once.

With several workers (``runtime_dir`` set), a reload asked of one worker reaches all of them: it writes a
new token into ``runtime_dir/reload-token``, every worker watches that file, and each records the version it
serves in ``runtime_dir/workers/<pid>.json``, with the newest token it has answered (tokens sort by the time
they were written): the worker that was asked waits until every live worker has answered its token or a newer
one, never an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import CardError, atomic_write
from modelcard.runtime import ModelRuntime
from modelcard.store import POINTER, check_card_names_folder, current_version, version_dir
from service import metrics

log = logging.getLogger("kovae.registry")
TOKEN_FILE = "reload-token"
WORKERS_DIR = "workers"


class ReloadError(RuntimeError):
    pass


LOADER_NICE = 10
"""How much less CPU the loading threads get than the serving ones when both want it (Linux nice value)."""


def lower_priority() -> None:
    """Give the calling thread a lower CPU priority (Linux: a thread's own nice value), so that loading and
    warming a version takes the cores' spare time rather than the requests'."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)


History = Callable[[np.ndarray, np.ndarray, "tuple[np.ndarray, np.ndarray] | None", int], np.ndarray]


def warm_up(rt: ModelRuntime, seed: int = 0) -> None:
    """Forecasts on realistic histories, every one finite or the version is refused: the card's training means
    with noise of its own spread, and a day that sweeps each variable across its training range; with the
    loops' setpoints and an influent forecast sent, over the longest horizon; the mean alone and with samples,
    the looped controls given and left to their loops, and through the plans graph. (At the means alone a zero
    std went unseen: 0/0 reads as a sensor gap, and the card's own noise is then zero too; the sweep divides by
    it.)"""
    rng = np.random.default_rng(seed)

    def noisy(mean: np.ndarray, std: np.ndarray, seen: tuple[np.ndarray, np.ndarray] | None, n: int) -> np.ndarray:
        """the training means with noise of the card's own spread (0.3 std), within the training range"""
        values = mean + 0.3 * std * rng.standard_normal((n, len(mean)))
        return np.clip(values, *seen) if seen is not None else values

    def sweeping(mean: np.ndarray, std: np.ndarray, seen: tuple[np.ndarray, np.ndarray] | None, n: int) -> np.ndarray:
        """each variable from its training minimum to its maximum"""
        lo, hi = seen if seen is not None else (mean - 2 * std, mean + 2 * std)
        return lo + (hi - lo) * np.linspace(0, 1, n)[:, None]

    for history in (noisy, sweeping):
        with np.errstate(all="ignore"):  # a broken card's 0/0 is what the check below is for
            outputs = _warm_up_forecasts(rt, history, noisy, rng)
        if not all(np.all(np.isfinite(out)) for out in outputs):
            raise ReloadError(
                f"version {rt.version}: a warm-up forecast on a realistic history ({history.__doc__}) is not finite"
            )


def _warm_up_forecasts(rt: ModelRuntime, history: History, noisy: History, rng: np.random.Generator) -> list:
    """Every kind of forecast a request can ask for, from one day of ``history`` (controls held)."""
    L, H = rt.card["history"]["length"], rt.max_horizon
    x, u = history(rt.x_mean, rt.x_std, rt.x_range, L), history(rt.u_mean, rt.u_std, rt.u_range, L)
    s_hist = history(rt.s_mean, rt.s_std, rt.s_range, L)
    s_fut = noisy(rt.s_mean, rt.s_std, rt.s_range, H)
    d_fut = noisy(rt.x_mean, rt.x_std, rt.x_range, H)[:, rt.disturbances]
    uf = np.repeat(u[-1:], H, 0)
    inputs = {"d_fut": d_fut[None], "s_hist": s_hist[None], "s_fut": s_fut[None]}
    last = np.array([600.0])
    outputs = [rt.predict(x[None], u[None], uf[None], last, **inputs).mean]
    fc = rt.predict(x[None], u[None], uf[None], last, 2, rng, **inputs)
    outputs += [fc.mean, fc.samples]
    if rt.looped:  # the looped controls left to their loops, driven by the setpoints
        loop_uf = uf.copy()
        loop_uf[:, rt.looped] = np.nan
        fc = rt.predict(x[None], u[None], loop_uf[None], last, 2, rng, **inputs)
        outputs += [fc.mean, fc.samples]
    if rt.plans_session is not None:
        plans = np.stack([uf, noisy(rt.u_mean, rt.u_std, rt.u_range, H)])
        fc = rt.predict_plans(x, u, plans, 600.0, 2, rng, d_fut, s_hist, s_fut)
        outputs += [fc.mean, fc.samples]
        if rt.looped:  # setpoint plans, each its own
            plans[:, :, rt.looped] = np.nan
            s_plans = np.stack([s_fut, noisy(rt.s_mean, rt.s_std, rt.s_range, H)])
            fc = rt.predict_plans(x, u, plans, 600.0, 2, rng, d_fut, s_hist, s_plans)
            outputs += [fc.mean, fc.samples]
    return outputs


class ModelRegistry:
    def __init__(self, store: Path, threads: int = 1, runtime_dir: Path | None = None) -> None:
        self.store, self.threads = Path(store), threads
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.runtime: ModelRuntime | None = None
        self.refused: dict[str, str] | None = None  # the last refusal: {"version", "reason"}
        self._refused_state: tuple | None = None  # pointer and files at that refusal: not retried until they change
        self._loaded_state: tuple | None = None  # pointer and files the served runtime was loaded from
        self._changing: tuple | None = None  # the served version's files as the last poll saw them changed
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        # Reloads asked for by requests (start-up, /admin/reload) run here, beside the serving threads.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader", initializer=lower_priority)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._token: str | None = self._read_token()  # the newest token seen
        self._answered: str = self._token or ""  # the newest token answered (start-up loads what CURRENT names)

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    # ------------------------------------------------------------------ loading

    def _state(self) -> tuple:
        """What a reload would read: CURRENT's text and the name, mtime and size of every file of that version
        (its card, checksum and both graphs among them: a refused version is tried again once any is fixed)."""
        try:
            raw = (self.store / POINTER).read_bytes()
        except OSError:
            return (None,)
        files = []
        try:
            paths = sorted(version_dir(self.store, raw.decode().strip()).iterdir())
        except (CardError, OSError, UnicodeDecodeError):
            paths = []
        for path in paths:
            if path.name.startswith("."):  # a writer's temporary file, gone in a moment
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((path.name, st.st_mtime_ns, st.st_size))
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
                if old is not None and old.version == version and state == self._loaded_state and not force:
                    self._clear_refusal()
                    return version, False
                rt = ModelRuntime(version_dir(self.store, version), self.threads)
                check_card_names_folder(self.store / version, rt.card)  # the name CURRENT gives, not a link's target
                warm_up(rt)
            except Exception as exc:  # ONNX Runtime raises its own types: every failure is a refusal
                metrics.RELOADS.labels("failure").inc()
                reason = self._describe(exc)
                self.refused, self._refused_state = {"version": version, "reason": reason}, state
                metrics.REFUSED.set(1)
                log.error(
                    "reload of %s refused: %s (store %s)",
                    version,
                    reason,
                    self.store.resolve(),
                    extra={"event": "reload_failed"},
                )
                self._write_worker_state()
                raise ReloadError(f"version {version} refused: {reason}") from None
            self.runtime, self.refused, self._refused_state, self._loaded_state = rt, None, None, state
            metrics.READY.set(1)
            metrics.REFUSED.set(0)
            if old is not None and old.version != rt.version:
                metrics.MODEL_INFO.labels(old.version).set(0)
            metrics.MODEL_INFO.labels(rt.version).set(1)
            metrics.SPECTRAL_RADIUS.set(rt.card["stability"]["spectral_radius"])
            metrics.LAST_LOADED.set(time.time())
            metrics.RELOADS.labels("success").inc()
            log.info("serving %s", rt.version, extra={"event": "model_loaded"})
            self._write_worker_state()
            return rt.version, True

    def _clear_refusal(self) -> None:
        """CURRENT names the served version again: a refusal of another version is history, not news."""
        if self.refused is not None:
            log.info(
                "refusal of %s cleared: serving %s",
                self.refused["version"],
                self.runtime.version if self.runtime else None,
                extra={"event": "refusal_cleared"},
            )
            self.refused, self._refused_state = None, None
            metrics.REFUSED.set(0)
            self._write_worker_state()

    def submit(self, force: bool = False) -> Future:
        """A reload on the loading thread (lower CPU priority); its future gives reload()'s result or error."""
        return self._loader.submit(self.reload, force=force)

    async def reload_beside(self) -> None:
        """try_reload on the loading thread, awaited without blocking the event loop."""
        await asyncio.wrap_future(self._loader.submit(self.try_reload))

    def try_reload(self) -> None:
        """A reload whose failure is only logged and counted (start-up, poller, watcher)."""
        try:
            self.reload()
        except ReloadError:
            pass
        except Exception:  # never let a background thread die
            log.exception("unexpected error while reloading")

    def poll_once(self) -> None:
        """Reload when CURRENT names another version, or the served version's files changed and have stood still
        since the last poll (a re-export caught half-written was refused, and raised the alert), unless that very
        state was refused already."""
        state = self._state()
        serving = self.runtime.version if self.runtime is not None else None
        raw = state[0]
        if raw is not None and raw.decode(errors="replace").strip() == serving:
            if state == self._loaded_state:
                self._changing = None
                with self._lock:
                    self._clear_refusal()
                return
            if state != self._changing:  # changed since the last poll: perhaps still being written
                self._changing = state
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
            lower_priority()  # what it does is load versions: beside the serving path
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
        self._loader.shutdown(wait=True)
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
            self._answer(token or "")  # answered after its reload, whether the version changed or not

    def _answer(self, token: str) -> None:
        """Record ``token`` as answered, with what this worker serves now (under the reload lock: a reload on
        another thread writes its state in one piece too)."""
        with self._lock:
            self._answered = max(self._answered, token)
            self._write_worker_state()

    def broadcast_reload(self) -> str | None:
        """Ask every worker of this server to reload; returns the token their answers will carry (None with one
        worker: nothing to ask). Tokens sort by the time they were written, so an answer to a newer reload
        answers an older one too (two reloads at once both had to see their own)."""
        if self.runtime_dir is None:
            return None
        self._token = f"{time.time_ns():020d}-{uuid.uuid4().hex}"  # this worker has reloaded already
        atomic_write(self.runtime_dir / TOKEN_FILE, self._token.encode())
        self._answer(self._token)
        return self._token

    def _write_worker_state(self) -> None:
        if self.runtime_dir is None:
            return
        state = {
            "pid": os.getpid(),
            "version": self.runtime.version if self.runtime is not None else None,
            "refused": self.refused,
            "token": self._answered,
            "time": time.time(),
        }
        try:
            atomic_write(self.runtime_dir / WORKERS_DIR / f"{os.getpid()}.json", json.dumps(state).encode())
        except OSError:
            log.exception("cannot write the worker state")

    def workers(self) -> dict[str, dict[str, Any]]:
        """State of every live worker of this server (pid -> version, refusal and the last token it answered);
        files of dead workers are removed."""
        if self.runtime_dir is None:
            pid = os.getpid()
            version = self.runtime.version if self.runtime else None
            return {str(pid): {"version": version, "refused": self.refused, "token": None}}
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
            out[str(pid)] = {k: state.get(k) for k in ("version", "refused", "token")}
        return out

    def wait_for_workers(
        self, token: str | None, timeout_s: float = 5.0
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Wait until every live worker has answered reload ``token`` (``broadcast_reload``'s) or a newer one;
        returns their states (version and refusal) and the workers that had not answered by ``timeout_s``. A
        worker's state from an earlier reload (a refusal of the same version, before its files were fixed) is no
        answer."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.workers()
            pending = sorted(pid for pid, s in states.items() if token is not None and (s["token"] or "") < token)
            if not pending or time.monotonic() > deadline:
                return {pid: {"version": s["version"], "refused": s["refused"]} for pid, s in states.items()}, pending
            time.sleep(0.05)
