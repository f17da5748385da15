"""Runs one model version through ONNX Runtime in engineering units. No torch, no web framework.

The card supplies the scalers and limits; this class only applies them. One session is shared by all
requests (``InferenceSession.run`` is thread-safe). The card must match its checksum file and hold servable
numbers (``modelcard.validate``); the session is built from the very bytes whose SHA-256 was checked against
the card, and without ONNX Runtime's memory arena, so that the memory of one large request goes back to the
system instead of staying reserved for the life of the process. The plans session
is the exception: its requests are bounded (KOVAE_MAX_PLANS, samples in chunks); 1,000 plans keep about 90 MB
reserved, and reusing it saves them about a third of their time.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard.card import (
    Calendar,
    CardError,
    bounds,
    known_inputs,
    loop_limits,
    looped_controls,
    loops,
    onnx_bytes,
    output_names,
    read_card,
    role_items,
    scalers,
    training_range,
    window_clock,
)
from modelcard.validate import check_card

SAMPLE_ROWS = 128  # sampled trajectories per run of the plans graph, so its arena holds one chunk at most


@dataclass(frozen=True)
class Forecast:
    mean: np.ndarray  # (batch, horizon, outputs): the measurements, then the looped controls; engineering units
    samples: np.ndarray | None  # (batch, samples, horizon, outputs), engineering units


class ModelRuntime:
    def __init__(self, version_dir: Path, threads: int = 1) -> None:
        self.version_dir = Path(version_dir)
        # The card against card.sha256 (the graphs are checked below, as their bytes are read), then its numbers.
        self.card: dict[str, Any] = read_card(self.version_dir, verify=False, sealed=True)
        check_card(self.card, self.version_dir.name)
        model = onnx_bytes(self.version_dir, self.card)  # checked against the card's SHA-256
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = False  # an arena keeps a large request's peak memory for ever
        opts.intra_op_num_threads = threads  # small matmuls: more threads cost more than they give
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        # One history under many control plans, the encoder run once (versions exported before it: none).
        self.plans_session = None
        if "plans_file" in self.card["onnx"]:
            plans = onnx_bytes(self.version_dir, self.card, "plans")
            # This one keeps the arena: its mean path decodes step by step, and sampled plans run in chunks,
            # so it never grows past tens of MB, and reusing it spares every request the page faults of fresh
            # memory (1,000 plans: about a third of the time without it).
            opts.enable_cpu_mem_arena = True
            self.plans_session = ort.InferenceSession(plans, opts, providers=["CPUExecutionProvider"])
        self.x_mean, self.x_std, self.u_mean, self.u_std = scalers(self.card)
        # Controls that feedback loops drive (models with loops): a request may leave their future to the loop
        # (NaN), and the graph forecasts them after the measurements, on the controls' own scalers.
        self.looped = looped_controls(self.card)
        self.outputs = output_names(self.card)
        self.out_mean = np.concatenate([self.x_mean, self.u_mean[self.looped]])
        self.out_std = np.concatenate([self.x_std, self.u_std[self.looped]])
        self.z_dim = int(self.card["model"]["z_dim"])
        self.measurements = [v["name"] for v in self.card["variables"]["measurements"]]
        self.controls = [v["name"] for v in self.card["variables"]["controls"]]
        self.calendar = Calendar.from_card(self.card)
        self.step_minutes = int(self.card["sample_minutes"])
        # The samples per forecast its interval width was fitted for (cards before it were fitted with 32).
        self.calibration_samples = int(self.card["calibration"].get("samples", 32))
        # Share of each history input that may be missing (null); cards from before gaps were trained: none.
        self.max_missing_share = float(self.card["history"].get("max_missing_share", 0.0))
        self.x_bounds, self.u_bounds = bounds(self.card, "measurements"), bounds(self.card, "controls")
        self.x_range, self.u_range = training_range(self.card, "measurements"), training_range(self.card, "controls")
        self.units = {v["name"]: v["unit"] for v in self.card["variables"]["measurements"]}
        # Disturbances (the influent) the model takes as known inputs: measured in the history, and over the
        # horizon whatever forecast the caller has (models without them: none).
        names = self.card["variables"].get("disturbance_inputs", {}).get("variables", [])
        self.disturbances = [self.measurements.index(n) for n in names]
        # Loop setpoints the model takes as optional known inputs, history and plan (models without them: none).
        sp = role_items(self.card, "setpoint_inputs")
        self.setpoints = [v["name"] for v in sp]
        self.s_mean = np.array([v["mean"] for v in sp], dtype=np.float64)
        self.s_std = np.array([v["std"] for v in sp], dtype=np.float64)
        self.s_units = [v["unit"] for v in sp]
        self.s_bounds = bounds(self.card, "setpoint_inputs")
        self.s_range = training_range(self.card, "setpoint_inputs")
        # What the answer may hold: every measurement, and each looped control a request leaves to its loop, with
        # its unit and bounds: its controller's output limits (the air, the recycle its loop can apply; a sample
        # past them is one the loop would never run), within the control's physical bounds.
        self.loops = loops(self.card)
        u_units = [v["unit"] for v in self.card["variables"]["controls"]]
        self.out_units = [self.units[n] for n in self.measurements] + [u_units[j] for j in self.looped]
        limits = np.array(loop_limits(self.card["variables"]), dtype=np.float64).reshape(-1, 2)
        self.out_bounds = (
            np.concatenate([self.x_bounds[0], np.maximum(self.u_bounds[0][self.looped], limits[:, 0])]),
            np.concatenate([self.x_bounds[1], np.minimum(self.u_bounds[1][self.looped], limits[:, 1])]),
        )
        self.zone = plant_zone(self.card)

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def max_horizon(self) -> int:
        return int(self.card["max_horizon"])

    def predict(
        self,
        x_hist: np.ndarray,
        u_hist: np.ndarray,
        u_fut: np.ndarray,
        last_minute: np.ndarray,
        n_samples: int = 0,
        rng: np.random.Generator | None = None,
        d_fut: np.ndarray | None = None,
        s_hist: np.ndarray | None = None,
        s_fut: np.ndarray | None = None,
    ) -> Forecast:
        """Forecast from engineering-unit arrays: x_hist (B, L, n_x), u_hist (B, L, n_u), u_fut (B, H, n_u)
        (NaN where a looped control is left to its loop). Returns the ``outputs``: measurements, looped controls.

        last_minute (B,): each series' last history sample in minutes since Monday 00:00 (calendar inputs).
        d_fut (B, H, n_d): a forecast of the disturbances (``self.disturbances``), NaN where there is none.
        s_hist (B, L, n_s), s_fut (B, H, n_s): the loops' setpoints (``self.setpoints``), NaN where not sent.
        """
        batch, horizon = u_fut.shape[0], u_fut.shape[1]
        noise = self._noise(batch, n_samples, horizon, rng)
        t_hist, t_fut = window_clock(last_minute, x_hist.shape[1], horizon, self.step_minutes)
        d_hist, d_fut = self._disturbances(x_hist, d_fut, batch, horizon)
        feeds = {
            "x_hist": self._x_hist(x_hist, u_hist),
            "u_hist": self._known(u_hist, t_hist, d_hist, self._setpoints(s_hist, u_hist)),
            "u_fut": self._known(u_fut, t_fut, d_fut, self._setpoints(s_fut, u_fut)),
            "noise": noise,
        }
        return self._run(self.session, feeds, n_samples)

    def _x_hist(self, x_hist: np.ndarray, u_hist: np.ndarray) -> np.ndarray:
        """The graph's normalised history of its outputs: the measurements, then the looped controls' history."""
        out = np.concatenate([x_hist, u_hist[..., self.looped]], -1) if self.looped else x_hist
        return ((out - self.out_mean) / self.out_std).astype(np.float32)

    def _known(self, u: np.ndarray, minutes: np.ndarray, d: np.ndarray | None, s: np.ndarray | None) -> np.ndarray:
        return known_inputs(u, minutes, (self.u_mean, self.u_std), self.calendar, d, s, self.looped)

    def _noise(self, batch: int, n_samples: int, horizon: int, rng: np.random.Generator | None) -> np.ndarray:
        """Standard-normal draws for the samples; none asked for: an empty tensor, and the graph's sample path
        costs nothing."""
        noise = np.zeros((batch, n_samples, horizon, self.z_dim), np.float32)
        if n_samples > 0:
            noise[:] = (rng or np.random.default_rng()).standard_normal(noise.shape, dtype=np.float32)
        return noise

    def _disturbances(
        self, x_hist: np.ndarray, d_fut: np.ndarray | None, batch: int, horizon: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The disturbances' z-scored values over the history (measured) and the horizon (given, else NaN)."""
        if not self.disturbances:
            return None, None
        d = self.disturbances
        hist = (x_hist[..., d] - self.x_mean[d]) / self.x_std[d]
        fut = np.full((batch, horizon, len(d)), np.nan) if d_fut is None else (d_fut - self.x_mean[d]) / self.x_std[d]
        return hist, fut

    def _setpoints(self, values: np.ndarray | None, like: np.ndarray) -> np.ndarray | None:
        """The setpoints' z-scored values over the steps of ``like`` (NaN: not sent); None: no setpoint inputs."""
        if not self.setpoints:
            return None
        if values is None:
            return np.full((*like.shape[:-1], len(self.setpoints)), np.nan)
        return (values - self.s_mean) / self.s_std

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], n_samples: int) -> Forecast:
        mean, samples = session.run(["mean", "samples"], feeds)
        mean = mean * self.out_std + self.out_mean
        return Forecast(mean, samples * self.out_std + self.out_mean if n_samples > 0 else None)

    def predict_plans(
        self,
        x_hist: np.ndarray,
        u_hist: np.ndarray,
        plans: np.ndarray,
        last_minute: float,
        n_samples: int = 0,
        rng: np.random.Generator | None = None,
        d_fut: np.ndarray | None = None,
        s_hist: np.ndarray | None = None,
        s_fut: np.ndarray | None = None,
    ) -> Forecast:
        """One history, x_hist (L, n_x) and u_hist (L, n_u), under each of ``plans`` (P, H, n_u), NaN where a
        looped control is left to its loop: the encoder runs once. Returns (P, H, outputs) means (and samples),
        as ``predict`` would for the history repeated. d_fut (H, n_d): a disturbance forecast shared by every
        plan, NaN where there is none; s_hist (L, n_s): the loops' setpoints over the history; s_fut (H, n_s),
        shared by every plan, or (P, H, n_s), each plan's own (a setpoint plan), NaN where not sent."""
        if self.plans_session is None:
            raise ValueError(f"version {self.version} has no plans graph (re-export it: python -m export)")
        n_plans, horizon = plans.shape[0], plans.shape[1]
        step = n_plans if n_samples == 0 else max(1, SAMPLE_ROWS // n_samples)  # plans per run
        if not one_plan_held(u_hist, plans, s_hist, s_fut):  # outside the plans graph's premise: separate series
            s_fut = None if s_fut is None else np.broadcast_to(s_fut, (n_plans, horizon, s_fut.shape[-1]))
            runs = []
            for i in range(0, n_plans, step):
                k = len(plans[i : i + step])
                runs.append(
                    self.predict(
                        np.broadcast_to(x_hist, (k, *x_hist.shape)),
                        np.broadcast_to(u_hist, (k, *u_hist.shape)),
                        plans[i : i + step],
                        np.full(k, last_minute),
                        n_samples,
                        rng,
                        None if d_fut is None else np.broadcast_to(d_fut, (k, *d_fut.shape)),
                        None if s_hist is None else np.broadcast_to(s_hist, (k, *s_hist.shape)),
                        None if s_fut is None else s_fut[i : i + step],
                    )
                )
            return joined(runs)
        noise = self._noise(n_plans, n_samples, horizon, rng)
        t_hist, t_fut = window_clock(np.array([last_minute]), x_hist.shape[0], horizon, self.step_minutes)
        d_hist, d_fut = self._disturbances(x_hist[None], None if d_fut is None else d_fut[None], 1, horizon)
        s_hist = None if s_hist is None else s_hist[None]
        if s_fut is not None and s_fut.ndim == 2:
            s_fut = np.broadcast_to(s_fut, (n_plans, *s_fut.shape))
        s_plans = self._setpoints(s_fut, plans)
        # The calendar and disturbance columns are the same for every plan: built once and repeated. Each plan's
        # leading columns (controls, looped controls' flags, setpoints) are its own: the same function without
        # the calendar builds them, so a plan's inputs are exactly those ``predict`` builds for it.
        u_fut = np.repeat(self._known(plans[:1], t_fut, d_fut, None if s_plans is None else s_plans[:1]), n_plans, 0)
        lead = known_inputs(
            plans, np.zeros(plans.shape[:2]), (self.u_mean, self.u_std), Calendar(), None, s_plans, self.looped
        )
        u_fut[..., : lead.shape[-1]] = lead
        history = {
            "x_hist": self._x_hist(x_hist[None], u_hist[None]),
            "u_hist": self._known(u_hist[None], t_hist, d_hist, self._setpoints(s_hist, u_hist[None])),
        }
        parts = [
            self._run(
                self.plans_session, {**history, "u_fut": u_fut[i : i + step], "noise": noise[i : i + step]}, n_samples
            )
            for i in range(0, n_plans, step)
        ]
        return joined(parts)


def joined(parts: list[Forecast]) -> Forecast:
    """Forecasts of consecutive chunks of plans as one."""
    if len(parts) == 1:
        return parts[0]
    samples = None if parts[0].samples is None else np.concatenate([p.samples for p in parts])
    return Forecast(np.concatenate([p.mean for p in parts]), samples)


def one_plan_held(u_hist: np.ndarray, plans: np.ndarray, s_hist: np.ndarray | None, s_fut: np.ndarray | None) -> bool:
    """Whether every plan has the same plan held (``training.model.held_plan``: each given control and setpoint
    at its last value in the history, or its first planned value where the history has none), which the plans
    graph rolls out once: the plans give the same variables at the same steps, and agree on their first value
    where the history gives none. The service's plans always do unless a plan's setpoints have no history."""
    pairs = [(u_hist, plans)] + ([] if s_fut is None or s_fut.ndim == 2 else [(s_hist, s_fut)])
    for hist, fut in pairs:
        given = np.isfinite(fut)
        if not (given == given[:1]).all():
            return False
        unseen = np.ones(fut.shape[-1], bool) if hist is None else ~np.isfinite(hist).any(0)
        first = fut[:, 0, unseen]
        if not np.array_equal(first, np.broadcast_to(first[:1], first.shape), equal_nan=True):
            return False
    return True


def plant_zone(card: dict[str, Any]) -> tzinfo:
    """The plant's time zone (the catalog's, IANA): how a timestamp without a UTC offset is read, as the import
    reads one. Cards without it, and UTC itself: UTC. A zone this system does not know refuses the version."""
    name = str(card.get("catalog", {}).get("timezone", "UTC"))
    if name == "UTC":
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CardError(
            f"catalog.timezone {name[:60]!r} is not a time zone this system knows (an IANA name; install tzdata)"
        ) from None
