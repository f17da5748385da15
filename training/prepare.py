"""Stage 1 of a run: the data the model sees. Scenarios -> scalers fitted on training -> windows -> tensors.

Everything downstream (loop, calibration, evaluation, export) takes a ``Prepared`` and never re-derives a scaler.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from modelcard.card import Calendar, exogenous_outputs, fast_outputs, known_inputs, loop_limits, window_clock
from plant.catalog import BSM1, Catalog
from plant.scenarios import DataError
from plant.whatif import WhatIf
from training.config import ConfigError, RunConfig
from training.data import Windows, heldout_windows, load_data, make_windows
from training.model import PlanLayout, scaled_limits
from training.requests import closed_loops, held_setpoints, held_where_closed, request_arrays


@dataclass
class Prepared:
    x_mean: np.ndarray
    x_std: np.ndarray
    u_mean: np.ndarray
    u_std: np.ndarray
    train: Windows
    val: Windows
    test: Windows
    train_series: list[tuple[np.ndarray, np.ndarray]]  # whole normalised training scenarios (for ARX)
    data_hash: str
    calendar: Calendar  # clock inputs (model.calendar_daily, model.calendar_weekly)
    split_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    x_range: tuple[np.ndarray, np.ndarray] | None = None  # (min, max) over the training scenarios
    u_range: tuple[np.ndarray, np.ndarray] | None = None
    groups: dict[str, str] = field(default_factory=dict)  # scenario id -> evaluation group (regime or "later")
    test_scale: np.ndarray | None = None  # per variable, its std over all test scenarios (pooled skill's scale)
    catalog: Catalog = BSM1
    disturbances: list[int] = field(default_factory=list)  # target positions taken as known inputs (influent)
    forecast_noise: float = 0.3  # the error of a "noisy" disturbance forecast at the horizon (train.forecast_noise)
    missing: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> variable -> missing share
    dropped: dict[str, int] = field(default_factory=dict)  # split -> windows dropped for missing data
    # The loops' setpoints as optional known inputs (model.setpoint_inputs and a catalog with setpoints): their
    # scalers and training range; none: the model does not take them.
    s_mean: np.ndarray | None = None
    s_std: np.ndarray | None = None
    s_range: tuple[np.ndarray, np.ndarray] | None = None
    width_driver: int | None = None  # target position whose level widens the interval (train.width_driver)
    # Controls that feedback loops drive (positions among the controls, the catalog's loop order): forecast after
    # the catalog's targets (x's last columns), and left to the loop in an honest request. loop_setpoints[j]: the
    # position among the setpoints of loop j's setpoint.
    looped: tuple[int, ...] = ()
    loop_setpoints: tuple[int, ...] = ()
    policies: dict[str, str] = field(default_factory=dict)  # scenario id -> how its plant was run
    # policy -> the setpoints an honest request holds (plant.operation.HONEST_HELD)
    held_setpoints: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_setpoints(self) -> int:
        return 0 if self.s_mean is None else len(self.s_mean)

    @property
    def n_targets(self) -> int:
        """The catalog's forecast targets (measurements and disturbances): x's first columns, what is scored."""
        return len(self.catalog.targets)

    @property
    def output_names(self) -> list[str]:
        """Every column of x: the catalog's targets, then the looped controls."""
        return [*self.catalog.target_names, *(self.catalog.control_names[j] for j in self.looped)]

    def output_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the physical bounds of every column of x (the catalog's targets, then the looped controls)."""
        variables = [*self.catalog.targets, *(self.catalog.controls[j] for j in self.looped)]
        return np.array([v.min for v in variables], float), np.array([v.max for v in variables], float)

    @property
    def plan(self) -> PlanLayout:
        variables = self.catalog.to_dict()
        if not self.looped:  # a model without loops: its card names none (training.publish)
            variables.pop("loops", None)
        fast = tuple(fast_outputs(variables))
        limits = scaled_limits(loop_limits(variables), self.looped, self.u_mean, self.u_std) if self.looped else ()
        exogenous = tuple(exogenous_outputs(variables))
        return PlanLayout(len(self.u_mean), self.looped, self.n_setpoints, fast, exogenous, limits)

    def nx(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def nu(
        self,
        u: np.ndarray,
        minutes: np.ndarray,
        disturbances: np.ndarray | None = None,
        setpoints: np.ndarray | None = None,
    ) -> np.ndarray:
        """The model's known inputs (``modelcard.card.known_inputs``): scaled controls (a looped one NaN where it
        is left to its loop) and their loop flags, the setpoint columns (their values in engineering units, NaN
        where unknown), calendar features of the same steps, then the disturbance columns (z-scored values, NaN
        where unknown), each where the model takes them."""
        d = disturbances if self.disturbances else None
        sp = None
        if self.n_setpoints:
            sp = setpoints if setpoints is not None else np.full((*u.shape[:-1], self.n_setpoints), np.nan)
            sp = (sp - self.s_mean) / self.s_std
        return known_inputs(u, minutes, (self.u_mean, self.u_std), self.calendar, d, sp, self.looped)

    def scored(self, w: Windows) -> Windows:
        """The windows with x cut to the catalog's targets, what forecasts are scored on (the looped controls'
        columns are scored apart: ``training.scoring.loop_scores``)."""
        n = self.n_targets
        return replace(w, x_hist=w.x_hist[..., :n], x_fut=w.x_fut[..., :n], x_prev_day=w.x_prev_day[..., :n])

    def cells(self) -> dict[str, str]:
        """Scenario id -> its evaluation cell, "regime/policy": forecasts are judged per cell."""
        return {sid: f"{group}/{self.policies.get(sid, '-')}" for sid, group in self.groups.items()}

    def closed_loops(self, w: Windows) -> np.ndarray:
        """(N, loops) bool: each loop closed over each window (its setpoint logged in the history)."""
        return closed_loops(w, self.loop_setpoints)

    def request(self, w: Windows, request: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(u_fut, s_hist, s_fut) as ``request`` (``training.requests.REQUESTS``) tells a forecast of ``w``."""
        if not self.n_setpoints:  # the model reads no setpoints: a closed loop's control is held, not told
            if request not in ("honest", "held"):
                return w.u_fut, None, None
            loops = self.catalog.loops if w.s_hist.shape[-1] else ()
            controls = [self.catalog.control_names.index(lp.control) for lp in loops]
            setpoints = [self.catalog.setpoint_names.index(lp.setpoint) for lp in loops]
            return held_where_closed(w, controls, setpoints), None, None
        return request_arrays(w, request, self.looped, self.loop_setpoints, self.held_by_scenario())

    def held_by_scenario(self) -> dict[str, tuple[int, ...]]:
        """Scenario id -> the setpoint positions an honest request holds there (its policy's: the plant cannot
        know them, e.g. the cascade's DO setpoint)."""
        return {sid: self.held_setpoints.get(policy, ()) for sid, policy in self.policies.items()}

    def inputs(
        self, w: Windows, forecast: np.ndarray | None = None, request: str = "honest"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Known inputs over each window's history (the disturbances as measured) and future (``forecast`` of
        the disturbances, (N, H, n_d) z-scored; none: unknown), as ``request`` (``training.requests.REQUESTS``)
        tells them."""
        t_hist, t_fut = window_clock(w.t_last, w.u_hist.shape[1], w.u_fut.shape[1], self.catalog.sample_minutes)
        d = self.disturbances
        d_hist = self.nx(w.x_hist)[..., d]
        d_fut = np.full((*w.u_fut.shape[:2], len(d)), np.nan) if forecast is None else forecast
        u_fut, s_hist, s_fut = self.request(w, request)
        return self.nu(w.u_hist, t_hist, d_hist, s_hist), self.nu(u_fut, t_fut, d_fut, s_fut)

    def fed_columns(self) -> int:
        """How many leading known-input columns are the plan (the controls, the looped controls' flags, then the
        setpoint columns): what the decoder reads beside z."""
        return self.plan.fed

    def known_offset(self) -> int:
        """Where the disturbance columns start in the known inputs (after the plan and the calendar)."""
        return self.fed_columns() + self.calendar.size

    def flag_columns(self, kind: str) -> list[int]:
        """The known-input columns that flag which "controls" (looped), "setpoints" or "disturbances" are known
        (each optional kind's values come first, then its flags: ``modelcard.card.optional_columns``)."""
        n_u, n_l, n_s = len(self.u_mean), len(self.looped), self.n_setpoints
        if kind == "controls":
            return list(range(n_u, n_u + n_l))
        if kind == "setpoints":
            return list(range(n_u + n_l + n_s, n_u + n_l + 2 * n_s))
        n, start = len(self.disturbances), self.known_offset()
        return list(range(start + n, start + 2 * n))

    def motion_columns(self) -> list[int]:
        """The known-input columns whose motion over the history's last day widens the interval
        (``training.model.plan_moved``): the controls no loop drives and the setpoints' values (a looped control
        moves with the load under its loop whatever the plan)."""
        return [c for c in self.plan.values if c not in self.looped]  # looped: positions among the controls

    def baseline_columns(self) -> list[int]:
        """The known-input columns the ARX baselines were fitted on (``train_series``): controls and calendar."""
        n_u = len(self.u_mean)
        return [*range(n_u), *range(self.fed_columns(), self.known_offset())]

    def dx(self, x: np.ndarray) -> np.ndarray:
        return x * self.x_std + self.x_mean


def fitted_scalers(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per column over the training rows, missing values left out. The std is floored so that a
    near-constant series cannot blow up its normalised values."""
    mean = np.nanmean(values, 0)
    return mean, np.maximum(np.nanstd(values, 0), 1e-3 * np.maximum(np.abs(mean), 1e-3))


def looped_controls(catalog: Catalog, cfg: RunConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(controls, their setpoints): positions of each loop's control among the catalog's controls and of its
    setpoint among the setpoints, for a model that takes the setpoints (none otherwise: every control planned)."""
    if not cfg.model.setpoint_inputs or not catalog.setpoints:
        return (), ()
    controls = tuple(catalog.control_names.index(loop.control) for loop in catalog.loops)
    return controls, tuple(catalog.setpoint_names.index(loop.setpoint) for loop in catalog.loops)


def prepare(cfg: RunConfig) -> Prepared:
    catalog, data, ids, data_hash = load_data(cfg)
    looped, loop_setpoints = looped_controls(catalog, cfg)
    # The looped controls are forecast too: x gains their columns (what a loop will apply is an output).
    data = {sid: replace(d, x=np.concatenate([d.x, d.u[:, list(looped)]], 1)) for sid, d in data.items()}
    train = [data[i] for i in ids["train"]]
    x_all = np.concatenate([d.x for d in train])
    u_all = np.concatenate([d.u for d in train])
    # A variable never measured in training gets no scaler: refused by name now, not as a NaN card after the run.
    read = cfg.model.setpoint_inputs and bool(catalog.setpoints)  # the setpoints, where the model reads them
    columns = [*catalog.target_names, *catalog.control_names, *(catalog.setpoint_names if read else ())]
    logged = np.concatenate(
        [np.concatenate([d.x[:, : len(catalog.targets)], d.u, *([d.s] if read else [])], 1) for d in train]
    )
    never = [name for name, col in zip(columns, logged.T, strict=True) if np.isnan(col).all()]
    if never:
        raise DataError(
            f"{', '.join(never)}: no value in the training data; import a period in which it was measured, or "
            "leave it out of the catalog (a setpoint never logged: its loop too)"
        )
    (x_mean, x_std), (u_mean, u_std) = fitted_scalers(x_all), fitted_scalers(u_all)
    test_x = np.concatenate([data[i].x for i in ids["test"]])
    t = cfg.train
    H, day = t.horizon, catalog.steps_per_day
    calendar = Calendar(cfg.model.calendar_daily, cfg.model.calendar_weekly)
    windows = {
        "train": make_windows(
            train, t.history, H, t.window_stride, steps_per_day=day, max_missing=cfg.data.max_missing
        ),
        **{
            k: heldout_windows([data[i] for i in ids[k]], t.history, H, t.max_eval_windows, day, cfg.data.max_missing)
            for k in ("val", "test")
        },
    }
    names = [*catalog.target_names, *catalog.control_names, *catalog.setpoint_names]

    def missing_share(ids_: tuple[str, ...]) -> dict[str, float]:
        n = len(catalog.targets)
        both = np.concatenate([np.concatenate([data[i].x[:, :n], data[i].u, data[i].s], 1) for i in ids_])
        return dict(zip(names, np.isnan(both).mean(0).tolist(), strict=True))

    s_scalers: tuple[np.ndarray | None, ...] = (None, None, None)
    if cfg.model.setpoint_inputs and catalog.setpoints:
        s_all = np.concatenate([d.s for d in train])
        s_scalers = (*fitted_scalers(s_all), (np.nanmin(s_all, 0), np.nanmax(s_all, 0)))

    missing = {k: missing_share(ids[k]) for k in ("train", "val", "test")}
    return Prepared(
        x_mean,
        x_std,
        u_mean,
        u_std,
        windows["train"],
        windows["val"],
        windows["test"],
        [(((d.x - x_mean) / x_std), known_inputs(d.u, d.t_minutes, (u_mean, u_std), calendar)) for d in train],
        data_hash,
        calendar,
        ids,
        (np.nanmin(x_all, 0), np.nanmax(x_all, 0)),
        (np.nanmin(u_all, 0), np.nanmax(u_all, 0)),
        {sid: d.group for sid, d in data.items()},
        np.maximum(np.nanstd(test_x, 0), 1e-12),
        catalog,
        catalog.disturbance_positions() if cfg.model.disturbance_inputs else [],
        t.forecast_noise,
        missing,
        {k: w.dropped for k, w in windows.items()},
        *s_scalers,
        width_driver=width_driver(catalog, t.width_driver),
        looped=looped,
        loop_setpoints=loop_setpoints,
        policies={sid: d.policy for sid, d in data.items()},
        held_setpoints=held_setpoints(catalog),
    )


def width_driver(catalog: Catalog, name: str) -> int | None:
    """The target position ``train.width_driver`` names: "" the first disturbance (none without one), "none"
    none."""
    if name == "none" or (name == "" and not catalog.disturbance_positions()):
        return None
    if name == "":
        return catalog.disturbance_positions()[0]
    if name not in catalog.target_names:
        raise ConfigError(f"train.width_driver: {name!r} is not a variable of catalog {catalog.name!r}")
    return catalog.target_names.index(name)


def disturbance_forecast(
    x_fut: torch.Tensor, disturbances: list[int], noise: float, gen: torch.Generator
) -> torch.Tensor:
    """A forecast of the disturbances (z-scored, (B, H, n_d)): the truth plus an error whose std grows as
    sqrt(k / H) to ``noise`` at the horizon's end, as a sewer model's or a weather service's would."""
    truth = x_fut[..., disturbances]
    H = truth.shape[1]
    growth = (torch.arange(1, H + 1, dtype=truth.dtype) / H).sqrt()[:, None]
    return truth + noise * growth * torch.randn(truth.shape, generator=gen)


def tensors(
    p: Prepared, w: Windows, forecast: str = "none", seed: int = 0, request: str = "honest"
) -> tuple[torch.Tensor, ...]:
    """(x_hist, u_hist, x_fut, u_fut) normalised, the u's with their loop flags, setpoint, calendar (and
    disturbance) columns. ``forecast``: what the model is told of the future disturbances, "none", "noisy"
    (train.forecast_noise's kind, seeded) or "perfect" (the truth); ``request``: what it is told of the
    controls and setpoints (``training.requests.REQUESTS``)."""
    x_fut = torch.from_numpy(p.nx(w.x_fut))
    fc = None
    if forecast != "none" and p.disturbances:
        noise = 0.0 if forecast == "perfect" else p.forecast_noise
        fc = disturbance_forecast(x_fut, p.disturbances, noise, torch.Generator().manual_seed(seed)).numpy()
    u_hist, u_fut = p.inputs(w, fc, request)
    return torch.from_numpy(p.nx(w.x_hist)), torch.from_numpy(u_hist), x_fut, torch.from_numpy(u_fut)


def pair_tensors(p: Prepared, pairs: list[WhatIf]) -> tuple[torch.Tensor, ...] | None:
    """(x_hist, u_hist, u_a, u_b, dx) of the what-if pairs (``plant.whatif``), normalised, told what a request
    for each plan tells (as ``bench/counterfactual.py`` asks): a control plan gives every control's future and
    no setpoint (the loops are off); a setpoint plan leaves the looped controls to their loops and sends the
    setpoints' plan, holding those the plant cannot know (its policy's, e.g. the cascade's DO setpoint) unless
    the plan moves it. dx: the plant's change of every output, plan a minus plan b. None: no pairs."""
    if not pairs:
        return None
    cat = {k: np.concatenate([getattr(w, k) for w in pairs]) for k in ("x_hist", "u_hist", "s_hist", "t_last")}
    closed = np.concatenate([w.closed for w in pairs])
    looped = list(p.looped)
    x_hist = p.nx(np.concatenate([cat["x_hist"], cat["u_hist"][..., looped]], -1))
    L, P = x_hist.shape[1], pairs[0].x_a.shape[1]
    t_hist, t_fut = window_clock(cat["t_last"], L, P, p.catalog.sample_minutes)
    d = p.disturbances
    s_hist = np.where(closed[:, None, None], cat["s_hist"], np.nan)
    u_hist = p.nu(cat["u_hist"], t_hist, x_hist[..., d], s_hist if p.n_setpoints else None)
    by_scenario = p.held_by_scenario()
    names = p.catalog.setpoint_names
    hold = np.zeros((len(closed), len(names)), bool)  # (pairs, setpoints): sent held at the last value
    i = 0
    for w in pairs:
        for j in by_scenario.get(w.scenario, ()):
            hold[i : i + len(w), j] = w.closed & (w.move != names[j])
        i += len(w)
    unknown = closed[:, None, None] & np.isin(np.arange(len(p.u_mean)), looped)  # left to the loops
    plans, outputs = [], []
    for side in ("a", "b"):
        u = np.concatenate([getattr(w, f"u_{side}") for w in pairs])
        sp = np.concatenate([getattr(w, f"s_{side}") for w in pairs])
        x = np.concatenate([getattr(w, f"x_{side}") for w in pairs])
        outputs.append(p.nx(np.concatenate([x, u[..., looped]], -1)))
        sp = np.where(hold[:, None], s_hist[:, -1:], np.where(closed[:, None, None], sp, np.nan))
        d_fut = np.full((*u.shape[:2], len(d)), np.nan)
        plans.append(p.nu(np.where(unknown, np.nan, u), t_fut, d_fut, sp if p.n_setpoints else None))
    arrays = (x_hist, u_hist, plans[0], plans[1], outputs[0] - outputs[1])
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)
