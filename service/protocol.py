"""The /forecast protocol: request and response models, and the codecs between JSON and arrays.

Kept apart from the runtime (which only sees arrays) and from the web layer (which only routes). Every check
that needs the model's limits reads them from the model card: history and horizon limits, variable names,
physical bounds (a value outside them is refused) and the training range (a value outside it is answered,
with a warning). The work of one request is planned here as pieces small enough to keep memory bounded and
to let other requests through between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from modelcard.card import last_observed, minutes_since_monday
from modelcard.runtime import ModelRuntime
from service.settings import Settings

FLOAT32_MAX = float(np.finfo(np.float32).max)


class ProblemError(Exception):
    """A client mistake, reported as RFC 9457 problem+json; ``errors`` name the fields."""

    def __init__(self, status: int, title: str, errors: list[dict[str, str]] | None = None, detail: str = "") -> None:
        super().__init__(title)
        self.status, self.title, self.errors = status, title, errors or []
        self.detail = detail or "; ".join(f"{e['field']}: {e['message']}" for e in self.errors) or title


# Strict: "20" is no integer and true or "1.5" no number; an ISO 8601 string is still a datetime in JSON.
STRICT = ConfigDict(extra="forbid", strict=True)


class PlanIn(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=128, description="the plan's label, unique within the series")
    future_controls: dict[str, list[float]] = Field(description="planned control per future step (horizon values)")


class SeriesIn(BaseModel):
    model_config = STRICT

    id: str | None = Field(None, max_length=128, description="caller's label, echoed back")
    timestamps: list[datetime] = Field(
        min_length=1,
        description="history sample times, oldest first, at the model's spacing, in the plant's local time "
        "(with its UTC offset; no offset means UTC): the time of day and week are model inputs. "
        "GET /model gives the history limits (history.min, history.max); the served schema states them too",
    )
    measurements: dict[str, list[float | None]] = Field(
        description="one array per measured variable (catalog names); null marks a missing sample (a sensor gap), "
        "up to the model's limit (GET /model: history.max_missing_share per variable)"
    )
    controls: dict[str, list[float | None]] = Field(
        description="one array per control over the history; null marks a missing sample, as for measurements"
    )
    future_controls: dict[str, list[float]] | None = Field(
        None, description="planned control per future step (horizon values each); omit with hold_controls"
    )
    hold_controls: bool = Field(False, description="hold the last history control values over the horizon")
    future_disturbances: dict[str, list[float]] | None = Field(
        None,
        description="optional forecast of disturbance variables (the influent: GET /model, "
        "variables.disturbance_inputs) over the horizon, horizon values each, e.g. from a sewer model or rain "
        "radar; any subset of them. Without it the model forecasts the influent itself",
    )
    setpoints: dict[str, list[float | None]] | None = Field(
        None,
        description="optional: the feedback loops' setpoints over the history (GET /model, "
        "variables.setpoint_inputs; e.g. the DO setpoint the KLa loop held), history values each, null where not "
        "logged; any subset of them",
    )
    future_setpoints: dict[str, list[float]] | None = Field(
        None,
        description="optional: the planned setpoints over the horizon, horizon values each; any subset. Under "
        "feedback control the setpoint decides the controlled variable (the DO, the anoxic nitrate), so a plan "
        "that knows them forecasts those far better. Without them the model forecasts from the controls alone",
    )
    plans: list[PlanIn] | None = Field(
        None,
        description="instead of future_controls or hold_controls: candidate control plans for this one history "
        "(e.g. an MPC's or an operator's options); the history is encoded once and each plan rolled out. The "
        "series then answers with plans in the same order",
    )
    plan_forecasts: bool = Field(
        True,
        description="with plans, false: each plan answers its summary only, no forecast (1,000 plans of 96 steps: "
        "about 2 MB instead of 32 MB); ask again with the chosen plan for its forecast",
    )


class ForecastRequest(BaseModel):
    model_config = STRICT

    series: list[SeriesIn] = Field(min_length=1, description="one or more plant series, run as one batch")
    horizon: int = Field(ge=1, description="forecast steps; at most the model's max_horizon")
    quantiles: list[float] = Field(default_factory=list, description="e.g. [0.1, 0.5, 0.9]; empty: mean only")
    samples: int | None = Field(
        None,
        ge=1,
        description="forecast samples drawn for the quantiles (used only when quantiles are asked for); omitted: "
        "the count the model's intervals were fitted for (GET /model: calibration.samples)",
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed of the sample draws: the same request and seed give the same answer"
    )


class VariableForecast(BaseModel):
    unit: str
    mean: list[float]
    quantiles: dict[str, list[float]] = Field(default_factory=dict)


class InputWarning(BaseModel):
    field: str
    variable: str
    message: str
    training_min: float
    training_max: float
    value: float = Field(description="the value furthest outside the training range")
    beyond: float = Field(description="how far outside, as a fraction of the training range's width")


class Clipped(BaseModel):
    variable: str
    output: str = Field(description="'mean' or 'quantiles.<q>'")
    values: int = Field(description="forecast values set to the physical bound")
    bound: str = Field(description="'min' or 'max'")


class SeriesOut(BaseModel):
    id: str | None
    timestamps: list[datetime]
    forecast: dict[str, VariableForecast]
    warnings: list[InputWarning] = Field(
        default_factory=list, description="inputs inside the physical bounds but outside the training range"
    )
    clipped: list[Clipped] = Field(
        default_factory=list, description="forecast values held at a physical bound (e.g. a concentration at 0)"
    )
    gaps: dict[str, int] = Field(
        default_factory=dict, description="history inputs that had missing samples (null), with how many"
    )
    plans: list[PlanOut] | None = Field(None, description="when the series sent plans: one per plan, in order")


class PlanSummary(BaseModel):
    mean: float = Field(description="mean of the forecast mean over the horizon")
    min: float
    max: float
    final: float = Field(description="the forecast mean at the last step")


class PlanOut(BaseModel):
    name: str
    forecast: dict[str, VariableForecast] = Field(description="as a series' forecast; empty with plan_forecasts false")
    summary: dict[str, PlanSummary] = Field(description="per variable, over the horizon: what plans are compared by")
    clipped: list[Clipped] = Field(default_factory=list)


class StabilityOut(BaseModel):
    spectral_radius: float
    stability_margin: float
    stable: bool


class ForecastResponse(BaseModel):
    model_version: str
    stability: StabilityOut
    horizon: int
    series: list[SeriesOut]


@dataclass
class DecodedRequest:
    x_hist: list[np.ndarray] = field(default_factory=list)  # per series (L_i, n_x)
    u_hist: list[np.ndarray] = field(default_factory=list)
    u_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_u), or (plans, H, n_u) with plans
    future_times: list[list[datetime]] = field(default_factory=list)
    last_minute: list[float] = field(default_factory=list)  # each series' last history time, minutes since Monday
    ids: list[str | None] = field(default_factory=list)
    warnings: list[list[dict[str, Any]]] = field(default_factory=list)  # per series
    gaps: list[dict[str, int]] = field(default_factory=list)  # per series: input name -> missing samples
    plan_names: list[list[str] | None] = field(default_factory=list)  # per series: its plans' names, or None
    plan_forecasts: list[bool] = field(default_factory=list)  # per series: answer each plan's forecast too
    d_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_d) disturbance forecast, NaN: none
    s_hist: list[np.ndarray] = field(default_factory=list)  # per series (L, n_s) loop setpoints, NaN: not sent
    s_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_s)
    horizon: int = 0
    quantiles: list[float] = field(default_factory=list)
    samples: int = 0  # 0 when no quantiles are asked for: samples are drawn only to give quantiles
    seed: int | None = None

    @property
    def work(self) -> int:
        """Forecasts x samples x horizon: what one request costs in sample steps (the mean counts as one sample;
        a series with plans counts one forecast per plan)."""
        return sum(len(u) if u.ndim == 3 else 1 for u in self.u_fut) * max(self.samples, 1) * self.horizon


@dataclass
class SeriesResult:
    mean: np.ndarray  # (H, n_x), engineering units; (plans, H, n_x) for a series with plans
    quantiles: np.ndarray | None  # (Q, H, n_x); (Q, plans, H, n_x)


def quantile_key(q: float) -> str:
    """The shortest text that reads back as the same float: 0.1 -> "0.1", 0.1234567 -> "0.1234567"."""
    return repr(float(q))


def _named(
    given: dict[str, list[float | None]],
    names: list[str],
    where: str,
    length: int,
    limits: tuple[np.ndarray, np.ndarray],
    units: list[str],
    errors: list[dict[str, str]],
    max_missing: float = 0.0,
) -> np.ndarray | None:
    """One (length, len(names)) array from named arrays, each checked for length, finiteness and ``limits``;
    a problem names the variable and the first index at fault. null is a missing sample (NaN), allowed up to
    ``max_missing`` of each variable's values (0: none, future controls)."""
    for name in sorted(set(given) - set(names)):
        errors.append({"field": f"{where}.{name}", "message": f"unknown variable; expected {', '.join(names)}"})
    before = len(errors)
    for name in names:
        if name not in given:
            errors.append({"field": f"{where}.{name}", "message": "missing"})
        elif len(given[name]) != length:
            errors.append({"field": f"{where}.{name}", "message": f"has {len(given[name])} values, expected {length}"})
    if len(errors) > before:
        return None
    arr = np.array([[np.nan if v is None else v for v in given[name]] for name in names], dtype=np.float64).T
    gap = np.array([[v is None for v in given[name]] for name in names], dtype=bool).T.reshape(arr.shape)
    # Only null is a gap: a NaN literal (some JSON writers emit it) is refused below as not finite.
    allowed = int(max_missing * length)
    for j in np.flatnonzero(gap.sum(0) > allowed):
        n_gap = int(gap[:, j].sum())
        limit = f"at most {allowed} ({100 * max_missing:.0f}%)" if allowed else "none"
        errors.append(
            {
                "field": f"{where}.{names[j]}",
                "message": f"{n_gap} of {length} values missing (null); the model takes {limit}",
            }
        )
    finite = gap | (np.abs(arr) <= FLOAT32_MAX)  # beyond float32 the model cannot take it
    inside = gap | ((arr >= limits[0]) & (arr <= limits[1]))
    if finite.all() and inside.all() and len(errors) == before:
        return arr
    for j in np.flatnonzero(~(finite & inside).all(0)):
        name, col = names[j], arr[:, j]
        if not finite[:, j].all():
            k = int(np.argmin(finite[:, j]))
            errors.append({"field": f"{where}.{name}[{k}]", "message": f"{given[name][k]} is not a finite number"})
            continue
        k, lo, hi = int(np.argmin(inside[:, j])), limits[0][j], limits[1][j]
        side = f"below the physical minimum {lo:g}" if col[k] < lo else f"above the physical maximum {hi:g}"
        n_out = int(np.sum(~inside[:, j]))
        more = f" ({n_out} values outside [{lo:g}, {hi:g}])" if n_out > 1 else ""
        errors.append({"field": f"{where}.{name}[{k}]", "message": f"{col[k]:g} {units[j]} is {side}{more}"})
    return None


def _optional_inputs(
    given: dict[str, list[float | None]] | None,
    names: list[str],
    limits: tuple[np.ndarray, np.ndarray],
    units: list[str],
    kind: str,
    where: str,
    length: int,
    errors: list[dict[str, str]],
) -> np.ndarray | None:
    """(length, len(names)) from inputs a caller may send, any subset of ``names`` (a disturbance forecast,
    loop setpoints), NaN for those not sent and for null values; None on error. ``kind`` names them in errors."""
    out = np.full((length, len(names)), np.nan)
    if not given:
        return out
    if not names:
        errors.append({"field": where, "message": f"this model takes no {kind}"})
        return None
    unknown = sorted(set(given) - set(names))
    if unknown:
        errors.append({"field": f"{where}.{unknown[0]}", "message": f"not a {kind}; expected {', '.join(names)}"})
        return None
    sent = [j for j, n in enumerate(names) if n in given]
    sent_limits = (limits[0][sent], limits[1][sent])
    arr = _named(given, [names[j] for j in sent], where, length, sent_limits, [units[j] for j in sent], errors, 1.0)
    if arr is None:
        return None
    out[:, sent] = arr
    return out


def gap_counts(arr: np.ndarray, names: list[str]) -> dict[str, int]:
    """Input name -> missing samples, for the inputs with any."""
    counts = np.isnan(arr).sum(0)
    return {names[j]: int(counts[j]) for j in np.flatnonzero(counts)}


def input_limits(
    physical: tuple[np.ndarray, np.ndarray], seen: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """What an input may hold: the physical bounds, widened to any value the model was trained on (a simulator's
    -0.01 g N/m3 of ammonium, like a sensor's zero offset, was data, not a fault)."""
    if seen is None:
        return physical
    return np.minimum(physical[0], seen[0]), np.maximum(physical[1], seen[1])


def _range_warnings(
    arr: np.ndarray, names: list[str], where: str, seen: tuple[np.ndarray, np.ndarray] | None
) -> list[dict[str, Any]]:
    """A warning per variable with values outside the training range (inside the physical bounds)."""
    if seen is None:
        return []
    out = []
    if np.isnan(arr).all(0).any():
        arr = np.where(np.isnan(arr).all(0), seen[0], arr)  # a variable with no value: nothing to warn about
    vmins, vmaxs = np.nanmin(arr, 0), np.nanmax(arr, 0)
    for j in np.flatnonzero((vmins < seen[0]) | (vmaxs > seen[1])):
        name, lo, hi = names[j], float(seen[0][j]), float(seen[1][j])
        vmin, vmax = float(vmins[j]), float(vmaxs[j])
        below, above = lo - vmin, vmax - hi
        value = vmin if below >= above else vmax
        beyond = max(below, above) / max(hi - lo, 1e-12)
        out.append(
            {
                "field": f"{where}.{name}",
                "variable": name,
                "message": f"{value:g} is outside the training range [{lo:g}, {hi:g}] by {100 * beyond:.0f}% of "
                "its width: the forecast is an extrapolation",
                "training_min": lo,
                "training_max": hi,
                "value": value,
                "beyond": beyond,
            }
        )
    return out


def requested_samples(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> int:
    """Samples to draw when the request asks for quantiles (else none): its own count, else the setting's, else
    the count the model's interval width was fitted for (fewer samples give narrower 10-90% ranges)."""
    return (req.samples or settings.default_samples or rt.calibration_samples) if req.quantiles else 0


def _check_request(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> list[dict[str, str]]:
    errors = []
    if req.horizon > rt.max_horizon:
        errors.append(
            {"field": "horizon", "message": f"{req.horizon} exceeds the model's max_horizon {rt.max_horizon}"}
        )
    if len(req.series) > settings.max_series:
        errors.append(
            {"field": "series", "message": f"{len(req.series)} series exceed the limit {settings.max_series}"}
        )
    if len(req.quantiles) > settings.max_quantiles:
        errors.append({"field": "quantiles", "message": f"at most {settings.max_quantiles} quantiles"})
    seen: dict[str, int] = {}
    for i, q in enumerate(req.quantiles):
        if not (math.isfinite(q) and 0 < q < 1):
            errors.append({"field": f"quantiles[{i}]", "message": f"{q} is not strictly between 0 and 1"})
        elif quantile_key(q) in seen:
            errors.append({"field": f"quantiles[{i}]", "message": f"repeats quantiles[{seen[quantile_key(q)]}]"})
        seen.setdefault(quantile_key(q), i)
    samples = requested_samples(req, rt, settings)
    if samples > settings.max_samples:
        errors.append({"field": "samples", "message": f"{samples} exceeds the limit {settings.max_samples}"})
    for i, s in enumerate(req.series):
        if s.plans is not None and len(s.plans) > settings.max_plans:
            errors.append(
                {"field": f"series[{i}].plans", "message": f"{len(s.plans)} plans exceed {settings.max_plans}"}
            )
    forecasts = sum(len(s.plans) if s.plans else 1 for s in req.series)
    work = forecasts * max(samples, 1) * req.horizon
    if work > settings.max_work:
        errors.append(
            {
                "field": "samples" if samples else "series",
                "message": f"forecasts x samples x horizon = {forecasts} x {max(samples, 1)} x {req.horizon} = "
                f"{work} exceeds the limit {settings.max_work} per request (a series counts one forecast per plan): "
                "send fewer samples, series or plans, or split the request",
            }
        )
    return errors


def decode(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> DecodedRequest:
    """Check a request against the model card and settings and turn it into arrays; collects every problem."""
    errors = _check_request(req, rt, settings)
    if errors:
        raise ProblemError(422, "Invalid forecast request", errors)
    card = rt.card
    hist_min, hist_max, step = card["history"]["min"], card["history"]["max"], card["sample_minutes"]
    x_units = [rt.units[n] for n in rt.measurements]
    u_units = [v["unit"] for v in card["variables"]["controls"]]
    x_limits, u_limits = input_limits(rt.x_bounds, rt.x_range), input_limits(rt.u_bounds, rt.u_range)
    # The optional inputs a series may send: (names, physical bounds, units, what they are called in errors).
    d_names = [rt.measurements[j] for j in rt.disturbances]
    d_limits = (rt.x_bounds[0][rt.disturbances], rt.x_bounds[1][rt.disturbances])
    disturbances = (d_names, d_limits, [rt.units[n] for n in d_names], "disturbance input")
    setpoints = (rt.setpoints, rt.s_bounds, rt.s_units, "setpoint input")
    samples = requested_samples(req, rt, settings)
    out = DecodedRequest(horizon=req.horizon, quantiles=sorted(req.quantiles), samples=samples, seed=req.seed)
    H = req.horizon
    for i, s in enumerate(req.series):
        where = f"series[{i}]"
        L = len(s.timestamps)
        if not hist_min <= L <= hist_max:
            errors.append(
                {"field": f"{where}.timestamps", "message": f"{L} steps; the model takes {hist_min}..{hist_max}"}
            )
            continue
        times = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in s.timestamps]
        bad = next((j for j, (a, b) in enumerate(pairwise(times)) if (b - a).total_seconds() != step * 60), None)
        if bad is not None:
            errors.append(
                {
                    "field": f"{where}.timestamps[{bad + 1}]",
                    "message": f"not {step} minutes after the previous timestamp",
                }
            )
        try:
            future = [times[-1] + timedelta(minutes=step * (k + 1)) for k in range(H)]
        except OverflowError:
            errors.append(
                {"field": f"{where}.timestamps[{L - 1}]", "message": f"{H} steps after it lie beyond the year 9999"}
            )
            continue
        gaps_allowed = rt.max_missing_share
        x = _named(s.measurements, rt.measurements, f"{where}.measurements", L, x_limits, x_units, errors, gaps_allowed)
        u = _named(s.controls, rt.controls, f"{where}.controls", L, u_limits, u_units, errors, gaps_allowed)
        if sum((s.hold_controls, s.future_controls is not None, s.plans is not None)) > 1:
            errors.append(
                {"field": f"{where}.future_controls", "message": "give one of future_controls, hold_controls, plans"}
            )
            continue
        names = None
        if s.plans is not None:
            names = [p.name for p in s.plans]
            twice = sorted({n for n in names if names.count(n) > 1})
            if not s.plans or twice:
                msg = f"plan names repeat: {', '.join(twice)}" if twice else "no plans given"
                errors.append({"field": f"{where}.plans", "message": msg})
                continue
            per_plan = [
                _named(
                    p.future_controls, rt.controls, f"{where}.plans[{k}].future_controls", H, u_limits, u_units, errors
                )
                for k, p in enumerate(s.plans)
            ]
            uf = None if any(a is None for a in per_plan) else np.stack(per_plan)
        elif s.hold_controls:
            uf = None if u is None else np.repeat(last_observed(u)[None], H, 0)
        elif s.future_controls is None:
            errors.append({"field": f"{where}.future_controls", "message": "missing (or set hold_controls: true)"})
            continue
        else:
            fc = f"{where}.future_controls"
            uf = _named(s.future_controls, rt.controls, fc, H, u_limits, u_units, errors)
        d_fut = _optional_inputs(s.future_disturbances, *disturbances, f"{where}.future_disturbances", H, errors)
        s_hist = _optional_inputs(s.setpoints, *setpoints, f"{where}.setpoints", L, errors)
        s_fut = _optional_inputs(s.future_setpoints, *setpoints, f"{where}.future_setpoints", H, errors)
        if x is None or u is None or uf is None or d_fut is None or s_hist is None or s_fut is None:
            continue
        out.x_hist.append(x)
        out.u_hist.append(u)
        out.u_fut.append(uf)
        out.future_times.append(future)
        out.last_minute.append(minutes_since_monday(times[-1]))  # its own UTC offset: the plant's clock
        out.ids.append(s.id)
        out.gaps.append({**gap_counts(x, rt.measurements), **gap_counts(u, rt.controls)})
        out.plan_names.append(names)
        out.plan_forecasts.append(s.plan_forecasts)
        out.d_fut.append(d_fut)
        out.s_hist.append(s_hist)
        out.s_fut.append(s_fut)
        out.warnings.append(
            _range_warnings(x, rt.measurements, f"{where}.measurements", rt.x_range)
            + _range_warnings(u, rt.controls, f"{where}.controls", rt.u_range)
            + _range_warnings(s_hist, rt.setpoints, f"{where}.setpoints", rt.s_range)
            + _range_warnings(s_fut, rt.setpoints, f"{where}.future_setpoints", rt.s_range)
            + (
                _range_warnings(uf.reshape(-1, uf.shape[-1]), rt.controls, f"{where}.future_controls", rt.u_range)
                if not s.hold_controls
                else []
            )
        )
    if errors:
        raise ProblemError(422, "Invalid forecast request", errors)
    return out


# ----------------------------------------------------------------------------- running the model


def plan(d: DecodedRequest, chunk_work: int) -> list[list[int]]:
    """Series indices per piece of work: series of one history length, together at most ``chunk_work``
    sample steps (a single series with more samples is one piece, its samples drawn in chunks). A series with
    plans is a piece of its own."""
    per_series = max(d.samples, 1) * d.horizon
    group = max(1, chunk_work // per_series)
    by_length: dict[int, list[int]] = {}
    alone = []
    for i, x in enumerate(d.x_hist):
        if d.plan_names[i] is not None:
            alone.append([i])
        else:
            by_length.setdefault(len(x), []).append(i)
    return [idx[k : k + group] for idx in by_length.values() for k in range(0, len(idx), group)] + alone


def run_piece(
    rt: ModelRuntime, d: DecodedRequest, series: list[int], rng: np.random.Generator, chunk_work: int
) -> dict[int, SeriesResult]:
    """Mean and quantiles of some series. Samples are drawn ``chunk_work`` sample steps at a time and
    reduced to quantiles here, so memory stays bounded whatever the request asked for."""
    if d.plan_names[series[0]] is not None:
        return {series[0]: run_plans(rt, d, series[0], rng, chunk_work)}
    x = np.stack([d.x_hist[i] for i in series])
    u = np.stack([d.u_hist[i] for i in series])
    uf = np.stack([d.u_fut[i] for i in series])
    last = np.array([d.last_minute[i] for i in series])
    df = np.stack([d.d_fut[i] for i in series])
    sp = {"s_hist": np.stack([d.s_hist[i] for i in series]), "s_fut": np.stack([d.s_fut[i] for i in series])}
    if d.samples == 0:
        mean = rt.predict(x, u, uf, last, d_fut=df, **sp).mean
        return {i: SeriesResult(mean[j], None) for j, i in enumerate(series)}
    per_call = max(1, chunk_work // (len(series) * d.horizon))
    mean, drawn = None, []
    for start in range(0, d.samples, per_call):
        fc = rt.predict(x, u, uf, last, min(per_call, d.samples - start), rng, d_fut=df, **sp)
        mean = fc.mean if mean is None else mean
        drawn.append(fc.samples)
    samples = np.concatenate(drawn, 1)  # (series, samples, H, n_x)
    qs = np.quantile(samples, d.quantiles, axis=1)  # (Q, series, H, n_x)
    return {i: SeriesResult(mean[j], qs[:, j]) for j, i in enumerate(series)}


def run_plans(rt: ModelRuntime, d: DecodedRequest, i: int, rng: np.random.Generator, chunk_work: int) -> SeriesResult:
    """One history under its plans: the encoder runs once per call."""
    plans = d.u_fut[i]
    # Means of all plans in one call (the runtime decodes them step by step, in little memory); with samples,
    # as many plans as chunk_work allows.
    per_call = len(plans) if d.samples == 0 else max(1, chunk_work // (d.samples * d.horizon))
    means, quantiles = [], []
    for start in range(0, len(plans), per_call):
        chunk = plans[start : start + per_call]
        fc = rt.predict_plans(
            d.x_hist[i], d.u_hist[i], chunk, d.last_minute[i], d.samples, rng, d.d_fut[i], d.s_hist[i], d.s_fut[i]
        )
        means.append(fc.mean)
        if fc.samples is not None:
            quantiles.append(np.quantile(fc.samples, d.quantiles, axis=1))  # (Q, plans, H, n_x)
    return SeriesResult(np.concatenate(means), np.concatenate(quantiles, 1) if quantiles else None)


def pieces(rt: ModelRuntime, d: DecodedRequest, chunk_work: int) -> Iterator[Callable[[], dict[int, bytes]]]:
    """Zero-argument callables, one per piece, to be run in order: each forecasts its series and returns their
    JSON (series index -> bytes), so that no single step of a large request holds the interpreter for long."""
    rng = np.random.default_rng(d.seed)
    for series in plan(d, chunk_work):

        def piece(series: list[int] = series) -> dict[int, bytes]:
            results = run_piece(rt, d, series, rng, chunk_work)
            return {i: to_json(encode_series(rt, d, i, res)) for i, res in results.items()}

        yield piece


# ----------------------------------------------------------------------------- response


def encode_forecasts(
    rt: ModelRuntime, d: DecodedRequest, mean: np.ndarray, quantiles: np.ndarray | None, values: bool = True
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Per forecast in ``mean`` (F, H, n_x) (quantiles (Q, F, H, n_x)): per variable its unit, mean and
    quantiles (H values each) held within the physical bounds (``values`` false: none, {}), and notes of what
    was clipped. One pass over all F at once: a series with 1,000 plans has 17,000 variable forecasts."""
    lo, hi = rt.x_bounds
    keys = [quantile_key(q) for q in d.quantiles] if quantiles is not None else []
    outputs = [(f"quantiles.{k}", v) for k, v in zip(keys, quantiles if quantiles is not None else [], strict=True)]
    outputs.append(("mean", mean))  # the notes' order: each variable's quantiles, then its mean
    counts = np.stack([np.stack([(v < lo).sum(1), (v > hi).sum(1)], -1) for _, v in outputs], 2)  # (F, n_x, O, 2)
    lists = [np.clip(v, lo, hi).transpose(0, 2, 1).tolist() if values else [] for _, v in outputs]  # [o][f][var]
    encoded = []
    for f in range(len(mean)):
        clipped = (
            [
                {
                    "variable": name,
                    "output": outputs[o][0],
                    "values": int(counts[f, j, o, b]),
                    "bound": ("min", "max")[b],
                }
                for j, name in enumerate(rt.measurements)
                for o, b in zip(*np.nonzero(counts[f, j]), strict=True)
            ]
            if counts[f].any()
            else []
        )
        per_var = (
            {
                name: {
                    "unit": rt.units[name],
                    "mean": lists[-1][f][j],
                    "quantiles": {k: lists[o][f][j] for o, k in enumerate(keys)},
                }
                for j, name in enumerate(rt.measurements)
            }
            if values
            else {}
        )
        encoded.append((per_var, clipped))
    return encoded


def plan_summaries(rt: ModelRuntime, mean: np.ndarray) -> list[dict[str, dict[str, float]]]:
    """Per plan, per variable over the horizon of the clipped mean (P, H, n_x): mean, min, max and final value,
    what plans are compared by."""
    m = np.clip(mean, *rt.x_bounds)
    stats = np.stack([m.mean(1), m.min(1), m.max(1), m[:, -1]], -1).tolist()  # [plan][var][stat]
    keys = ("mean", "min", "max", "final")
    return [{name: dict(zip(keys, row[j], strict=True)) for j, name in enumerate(rt.measurements)} for row in stats]


def encode_series(rt: ModelRuntime, d: DecodedRequest, i: int, res: SeriesResult) -> dict[str, Any]:
    """One series of the response. Forecasts are held within the physical bounds (and the series says where);
    a forecast that is not finite is refused rather than sent as NaN or Infinity, which strict JSON parsers
    reject. A series with plans answers one forecast and summary per plan."""
    if not (np.all(np.isfinite(res.mean)) and (res.quantiles is None or np.all(np.isfinite(res.quantiles)))):
        msg = "the forecast is not finite for these inputs: check the history"
        raise ProblemError(422, "No finite forecast", [{"field": f"series[{i}]", "message": msg}])
    out: dict[str, Any] = {"id": d.ids[i], "timestamps": d.future_times[i], "forecast": {}, "clipped": []}
    names = d.plan_names[i]
    if names is None:
        qs = None if res.quantiles is None else res.quantiles[:, None]
        out["forecast"], out["clipped"] = encode_forecasts(rt, d, res.mean[None], qs)[0]
    else:
        forecasts = encode_forecasts(rt, d, res.mean, res.quantiles, values=d.plan_forecasts[i])
        out["plans"] = [
            {"name": name, "forecast": forecast, "summary": summary, "clipped": clipped}
            for name, (forecast, clipped), summary in zip(names, forecasts, plan_summaries(rt, res.mean), strict=True)
        ]
    return {**out, "warnings": d.warnings[i], "gaps": d.gaps[i]}


def envelope(rt: ModelRuntime, d: DecodedRequest, series_json: list[bytes]) -> bytes:
    """The response body (ForecastResponse's shape) around the series already serialised, in request order."""
    st = rt.card["stability"]
    head = {
        "model_version": rt.version,
        "stability": {k: st[k] for k in ("spectral_radius", "stability_margin", "stable")},
        "horizon": d.horizon,
    }
    return to_json(head)[:-1] + b',"series":[' + b",".join(series_json) + b"]}"
