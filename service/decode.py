"""Decoding a parsed /forecast request (``service.parse``) into the arrays the runtime takes.

Every cost of reading a request is bounded before it is paid: ``service.parse`` checks the raw body's size
rules before parsing it; here the size rules that need the model or the settings (history length, horizon,
series, plans, quantiles, samples, the work and the answer's size) are checked, each stopping at its first
violation, and only a request that keeps them all is checked value by value (finite, within the physical
bounds).

Problems are listed up to ``service.problems.LISTED`` and counted. Every check that needs the model's limits
reads them from the card: history and horizon limits, variable names, physical bounds (a value outside them
is refused) and the training range (a value outside it is answered, with a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import numpy as np

from modelcard.card import last_observed, minutes_since_monday
from modelcard.runtime import ModelRuntime
from service.encode import SeriesFacts, SeriesShape, check_answer_size, quantile_key
from service.problems import Errors
from service.request import DecodedRequest, ForecastRequest, PlanIn, SeriesIn
from service.settings import Settings

FLOAT32_MAX = float(np.finfo(np.float32).max)

# ----------------------------------------------------------------------------- a request to arrays


@dataclass(frozen=True)
class Inputs:
    """The model's inputs of one role as the decoder checks them: names, what values they may hold
    (physical bounds widened to the training data), units, the training range, and what errors call them."""

    names: list[str]
    limits: tuple[np.ndarray, np.ndarray]
    units: list[str]
    seen: tuple[np.ndarray, np.ndarray] | None
    kind: str = "variable"

    def subset(self, given: dict[str, Any]) -> tuple[list[int], Inputs]:
        """The positions and the Inputs of the names in ``given`` (optional inputs: any subset is sent)."""
        idx = [j for j, n in enumerate(self.names) if n in given]
        names, units = [self.names[j] for j in idx], [self.units[j] for j in idx]
        seen = None if self.seen is None else (self.seen[0][idx], self.seen[1][idx])
        return idx, Inputs(names, (self.limits[0][idx], self.limits[1][idx]), units, seen, self.kind)


def input_limits(
    physical: tuple[np.ndarray, np.ndarray], seen: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """What an input may hold: the physical bounds, widened to any value the model was trained on (a simulator's
    -0.01 g N/m3 of ammonium, like a sensor's zero offset, was data, not a fault)."""
    if seen is None:
        return physical
    return np.minimum(physical[0], seen[0]), np.maximum(physical[1], seen[1])


@dataclass(frozen=True)
class ModelInputs:
    """Every role's Inputs for one model, built once per request from its card."""

    measurements: Inputs
    controls: Inputs
    setpoints: Inputs
    disturbances: Inputs

    @classmethod
    def of(cls, rt: ModelRuntime) -> ModelInputs:
        x_units = [rt.units[n] for n in rt.measurements]
        u_units = [v["unit"] for v in rt.card["variables"]["controls"]]
        d = rt.disturbances
        d_names = [rt.measurements[j] for j in d]
        return cls(
            measurements=Inputs(rt.measurements, input_limits(rt.x_bounds, rt.x_range), x_units, rt.x_range),
            controls=Inputs(rt.controls, input_limits(rt.u_bounds, rt.u_range), u_units, rt.u_range),
            setpoints=Inputs(rt.setpoints, rt.s_bounds, rt.s_units, rt.s_range, "setpoint input"),
            disturbances=Inputs(
                d_names, (rt.x_bounds[0][d], rt.x_bounds[1][d]), [x_units[j] for j in d], None, "disturbance input"
            ),
        )


def requested_samples(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> int:
    """Samples to draw when the request asks for quantiles (else none): its own count, else the setting's, else
    the count the model's interval width was fitted for (fewer samples give narrower 10-90% ranges)."""
    return (req.samples or settings.default_samples or rt.calibration_samples) if req.quantiles else 0


def decode(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> DecodedRequest:
    """Check a request against the model card and settings and turn it into arrays: every size rule first
    (refused together, before any value is looked at), then each series' values."""
    errors = Errors()
    check_request_sizes(req, rt, settings, errors)
    inputs = ModelInputs.of(rt)
    for i, s in enumerate(req.series):
        check_series_sizes(s, f"series[{i}]", rt, inputs, req.horizon, settings, errors)
    errors.raise_if_any()
    check_answer_size(
        [SeriesShape(len(s.plans or []), s.plan_forecasts) for s in req.series],
        len(rt.measurements),
        len(req.quantiles),
        req.horizon,
        settings.max_answer_bytes,
    )
    samples = requested_samples(req, rt, settings)
    out = DecodedRequest(horizon=req.horizon, quantiles=sorted(req.quantiles), samples=samples, seed=req.seed)
    for i, s in enumerate(req.series):
        decode_series(s, f"series[{i}]", rt, inputs, req.horizon, out, errors)
    errors.raise_if_any()
    return out


def check_request_sizes(req: ForecastRequest, rt: ModelRuntime, settings: Settings, errors: Errors) -> None:
    """Horizon, series, quantiles, samples, plans and the work, each checked once (no error per quantile)."""
    if req.horizon > rt.max_horizon:
        errors.add("horizon", f"{req.horizon} exceeds the model's max_horizon {rt.max_horizon}")
    if len(req.series) > settings.max_series:
        errors.add("series", f"{len(req.series)} series exceed the limit {settings.max_series}")
    if len(req.quantiles) > settings.max_quantiles:
        errors.add("quantiles", f"{len(req.quantiles)} quantiles; at most {settings.max_quantiles}")
    else:
        seen: dict[str, int] = {}
        for i, q in enumerate(req.quantiles):
            if not (math.isfinite(q) and 0 < q < 1):
                errors.add(f"quantiles[{i}]", f"{q} is not strictly between 0 and 1")
            elif quantile_key(q) in seen:
                errors.add(f"quantiles[{i}]", f"repeats quantiles[{seen[quantile_key(q)]}]")
            seen.setdefault(quantile_key(q), i)
    samples = requested_samples(req, rt, settings)
    if samples > settings.max_samples:
        errors.add("samples", f"{samples} exceeds the limit {settings.max_samples}")
    forecasts = sum(len(s.plans) if s.plans else 1 for s in req.series)
    work = forecasts * max(samples, 1) * req.horizon
    if work > settings.max_work:
        errors.add(
            "samples" if samples else "series",
            f"forecasts x samples x horizon = {forecasts} x {max(samples, 1)} x {req.horizon} = {work} exceeds the "
            f"limit {settings.max_work} per request (a series counts one forecast per plan): send fewer samples, "
            "series or plans, or split the request",
        )


def check_series_sizes(
    s: SeriesIn, where: str, rt: ModelRuntime, inputs: ModelInputs, H: int, settings: Settings, errors: Errors
) -> None:
    """A series' lengths and names: history length, each named array's length and name, the plans' count."""
    hist_min, hist_max = rt.card["history"]["min"], rt.card["history"]["max"]
    L = len(s.timestamps)
    if not hist_min <= L <= hist_max:
        errors.add(f"{where}.timestamps", f"{L} steps; the model takes {hist_min}..{hist_max}")
        return
    check_names(s.measurements, inputs.measurements, f"{where}.measurements", L, errors)
    check_names(s.controls, inputs.controls, f"{where}.controls", L, errors)
    if sum((s.hold_controls, s.future_controls is not None, s.plans is not None)) > 1:
        errors.add(f"{where}.future_controls", "give one of future_controls, hold_controls, plans")
    elif s.plans is not None:
        check_plan_sizes(s.plans, f"{where}.plans", inputs.controls, H, settings, errors)
    elif s.future_controls is not None:
        check_names(s.future_controls, inputs.controls, f"{where}.future_controls", H, errors)
    elif not s.hold_controls:
        errors.add(f"{where}.future_controls", "missing (or set hold_controls: true)")
    optional = (
        (s.future_disturbances, inputs.disturbances, "future_disturbances", H),
        (s.setpoints, inputs.setpoints, "setpoints", L),
        (s.future_setpoints, inputs.setpoints, "future_setpoints", H),
    )
    for given, role, name, length in optional:
        if given:
            check_optional_names(given, role, f"{where}.{name}", length, errors)


def check_plan_sizes(
    plans: list[PlanIn], where: str, controls: Inputs, H: int, settings: Settings, errors: Errors
) -> None:
    if len(plans) > settings.max_plans:
        errors.add(where, f"{len(plans)} plans exceed {settings.max_plans}")
        return
    names = [p.name for p in plans]
    twice = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if not plans or twice:
        errors.add(where, f"plan names repeat: {', '.join(twice[:5])}" if twice else "no plans given")
        return
    for k, p in enumerate(plans):
        before = len(errors)
        check_names(p.future_controls, controls, f"{where}[{k}].future_controls", H, errors)
        if len(errors) > before:
            return  # plans are alike: the first one at fault says what is wrong with the rest


def check_names(given: dict[str, list], role: Inputs, where: str, length: int, errors: Errors) -> None:
    """Every name of ``role`` given, each with ``length`` values, and no other name."""
    for name in sorted(set(given) - set(role.names)):
        errors.add(f"{where}.{name}", f"unknown variable; expected {', '.join(role.names)}")
    for name in role.names:
        if name not in given:
            errors.add(f"{where}.{name}", "missing")
        elif len(given[name]) != length:
            errors.add(f"{where}.{name}", f"has {len(given[name])} values, expected {length}")


def check_optional_names(given: dict[str, list], role: Inputs, where: str, length: int, errors: Errors) -> None:
    """Any subset of ``role``'s names, each with ``length`` values (a disturbance forecast, loop setpoints)."""
    if not role.names:
        errors.add(where, f"this model takes no {role.kind}")
        return
    unknown = sorted(set(given) - set(role.names))
    if unknown:
        errors.add(f"{where}.{unknown[0]}", f"not a {role.kind}; expected {', '.join(role.names)}")
        return
    _, sent = role.subset(given)
    check_names(given, sent, where, length, errors)


# ----------------------------------------------------------------------------- a series' values


def decode_series(
    s: SeriesIn, where: str, rt: ModelRuntime, inputs: ModelInputs, H: int, out: DecodedRequest, errors: Errors
) -> None:
    """One series' values into ``out`` (sizes already checked): times, history, controls, optional inputs."""
    before = len(errors)
    times = decode_times(s.timestamps, f"{where}.timestamps", rt.step_minutes, errors)
    future = future_times(times, H, rt.step_minutes, where, errors) if times is not None else None
    gaps_allowed = rt.max_missing_share
    x = named_values(s.measurements, inputs.measurements, f"{where}.measurements", errors, gaps_allowed)
    u = named_values(s.controls, inputs.controls, f"{where}.controls", errors, gaps_allowed)
    uf = future_controls(s, where, inputs.controls, u, H, errors)
    d_fut = optional_values(s.future_disturbances, inputs.disturbances, f"{where}.future_disturbances", H, errors)
    s_hist, s_fut = setpoint_values(s, where, inputs.setpoints, len(s.timestamps), H, errors)
    if len(errors) > before or times is None or future is None:
        return
    assert x is not None and u is not None and uf is not None and d_fut is not None
    assert s_hist is not None and s_fut is not None
    warnings = (
        range_warnings(x, inputs.measurements, f"{where}.measurements")
        + range_warnings(u, inputs.controls, f"{where}.controls")
        + range_warnings(s_hist, inputs.setpoints, f"{where}.setpoints")
        + range_warnings(s_fut, inputs.setpoints, f"{where}.future_setpoints")
        + (
            []
            if s.hold_controls
            else range_warnings(uf.reshape(-1, uf.shape[-1]), inputs.controls, f"{where}.future_controls")
        )
    )
    out.x_hist.append(x)
    out.u_hist.append(u)
    out.u_fut.append(uf)
    out.last_minute.append(minutes_since_monday(times[-1]))  # its own UTC offset: the plant's clock
    out.d_fut.append(d_fut)
    out.s_hist.append(s_hist)
    out.s_fut.append(s_fut)
    names = [p.name for p in s.plans] if s.plans is not None else None
    gaps = {**gap_counts(x, rt.measurements), **gap_counts(u, rt.controls)}
    out.facts.append(SeriesFacts(s.id, future, warnings, gaps, names, s.plan_forecasts))


def decode_times(stamps: list[str], where: str, step: int, errors: Errors) -> list[datetime] | None:
    """ISO 8601 texts to datetimes (no offset: UTC), ``step`` minutes apart; None on the first one at fault."""
    try:
        times = [datetime.fromisoformat(t) for t in stamps]
    except ValueError:
        times = []
        for k, t in enumerate(stamps):
            try:
                times.append(datetime.fromisoformat(t.upper()))  # "t" and "z" are ISO 8601 too
            except ValueError as exc:
                errors.add(f"{where}[{k}]", f"not a valid date-time: {exc}")
                return None
    times = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in times]
    bad = next((j for j, (a, b) in enumerate(pairwise(times)) if (b - a).total_seconds() != step * 60), None)
    if bad is not None:
        errors.add(f"{where}[{bad + 1}]", f"not {step} minutes after the previous timestamp")
        return None
    return times


def future_times(times: list[datetime], H: int, step: int, where: str, errors: Errors) -> list[datetime] | None:
    """The ``H`` forecast times after the last history time, in its UTC offset."""
    try:
        return [times[-1] + timedelta(minutes=step * (k + 1)) for k in range(H)]
    except OverflowError:
        errors.add(f"{where}.timestamps[{len(times) - 1}]", f"{H} steps after it lie beyond the year 9999")
        return None


def named_values(
    given: dict[str, list[float | None]], role: Inputs, where: str, errors: Errors, max_missing: float = 0.0
) -> np.ndarray | None:
    """One (length, len(names)) array from named arrays (names and lengths already checked), each value finite
    and within ``role.limits``; a problem names the variable and the first index at fault. null is a missing
    sample (NaN), allowed up to ``max_missing`` of each variable's values (0: none, future values)."""
    names = role.names
    arr = np.array([[np.nan if v is None else v for v in given[name]] for name in names], dtype=np.float64).T
    gap = np.array([[v is None for v in given[name]] for name in names], dtype=bool).T.reshape(arr.shape)
    length = len(arr)
    # Only null is a gap: a NaN literal (some JSON writers emit it) is refused below as not finite.
    allowed = int(max_missing * length)
    before = len(errors)
    for j in np.flatnonzero(gap.sum(0) > allowed):
        limit = f"at most {allowed} ({100 * max_missing:.0f}%)" if allowed else "none"
        n_gap = int(gap[:, j].sum())
        errors.add(f"{where}.{names[j]}", f"{n_gap} of {length} values missing (null); the model takes {limit}")
    finite = gap | (np.abs(arr) <= FLOAT32_MAX)  # beyond float32 the model cannot take it
    lo, hi = role.limits
    inside = gap | ((arr >= lo) & (arr <= hi))
    if finite.all() and inside.all() and len(errors) == before:
        return arr
    for j in np.flatnonzero(~(finite & inside).all(0)):
        name, col = names[j], arr[:, j]
        if not finite[:, j].all():
            k = int(np.argmin(finite[:, j]))
            errors.add(f"{where}.{name}[{k}]", f"{given[name][k]} is not a finite number")
            continue
        k = int(np.argmin(inside[:, j]))
        side = f"below the physical minimum {lo[j]:g}" if col[k] < lo[j] else f"above the physical maximum {hi[j]:g}"
        n_out = int(np.sum(~inside[:, j]))
        more = f" ({n_out} values outside [{lo[j]:g}, {hi[j]:g}])" if n_out > 1 else ""
        errors.add(f"{where}.{name}[{k}]", f"{col[k]:g} {role.units[j]} is {side}{more}")
    return None


def future_controls(
    s: SeriesIn, where: str, controls: Inputs, u_hist: np.ndarray | None, H: int, errors: Errors
) -> np.ndarray | None:
    """The controls over the horizon, (H, n_u), or (plans, H, n_u) for a series with plans: as planned, or
    the history's last values held. A control a request may leave out (one a loop drives from a setpoint the
    request plans) would be decided here."""
    if s.plans is not None:
        per_plan = [
            named_values(p.future_controls, controls, f"{where}.plans[{k}].future_controls", errors)
            for k, p in enumerate(s.plans)
        ]
        return None if any(a is None for a in per_plan) else np.stack(per_plan)  # type: ignore[arg-type]
    if s.hold_controls:
        return None if u_hist is None else np.repeat(last_observed(u_hist)[None], H, 0)
    assert s.future_controls is not None  # sizes checked: one of the three was given
    return named_values(s.future_controls, controls, f"{where}.future_controls", errors)


def optional_values(
    given: dict[str, list[float | None]] | None, role: Inputs, where: str, length: int, errors: Errors
) -> np.ndarray | None:
    """(length, len(role.names)) from inputs a caller may send, any subset of them (a disturbance forecast,
    loop setpoints), NaN for those not sent and for null values; None on error."""
    out = np.full((length, len(role.names)), np.nan)
    if not given:
        return out
    idx, sent = role.subset(given)
    arr = named_values(given, sent, where, errors, 1.0)
    if arr is None:
        return None
    out[:, idx] = arr
    return out


def setpoint_values(
    s: SeriesIn, where: str, setpoints: Inputs, L: int, H: int, errors: Errors
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The loops' setpoints over the history (L, n_s) and the horizon (H, n_s), NaN where not sent."""
    s_hist = optional_values(s.setpoints, setpoints, f"{where}.setpoints", L, errors)
    s_fut = optional_values(s.future_setpoints, setpoints, f"{where}.future_setpoints", H, errors)
    return s_hist, s_fut


def gap_counts(arr: np.ndarray, names: list[str]) -> dict[str, int]:
    """Input name -> missing samples, for the inputs with any."""
    counts = np.isnan(arr).sum(0)
    return {names[j]: int(counts[j]) for j in np.flatnonzero(counts)}


def range_warnings(arr: np.ndarray, role: Inputs, where: str) -> list[dict[str, Any]]:
    """A warning per variable with values outside the training range (inside the physical bounds)."""
    if role.seen is None or arr.size == 0:
        return []
    seen, names = role.seen, role.names
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


# ----------------------------------------------------------------------------- the published schema


def publish_limits(schemas: dict[str, Any], rt: ModelRuntime | None, settings: Settings) -> None:
    """State in the OpenAPI schemas what parse() and decode() enforce: settings' limits and, with a model, its
    card's limits."""
    req, series = schemas["ForecastRequest"]["properties"], schemas["SeriesIn"]["properties"]
    req["series"]["maxItems"] = settings.max_series
    req["quantiles"]["maxItems"] = settings.max_quantiles
    req["samples"]["anyOf"][0]["maximum"] = settings.max_samples
    series["plans"]["anyOf"][0]["maxItems"] = settings.max_plans
    if rt is None:
        return
    req["horizon"]["maximum"] = rt.max_horizon
    lo, hi = rt.card["history"]["min"], rt.card["history"]["max"]
    series["timestamps"].update(minItems=lo, maxItems=hi)

    def named(role: Inputs, limits: tuple[Any, Any], min_items: int, max_items: int) -> dict[str, Any]:
        props = {}
        for name, low, high in zip(role.names, *limits, strict=True):
            item: dict[str, Any] = {"type": "number"}
            if np.isfinite(low):
                item["minimum"] = float(low)
            if np.isfinite(high):
                item["maximum"] = float(high)
            props[name] = {"type": "array", "items": item, "minItems": min_items, "maxItems": max_items}
        return {"type": "object", "properties": props, "required": role.names, "additionalProperties": False}

    inputs = ModelInputs.of(rt)
    series["measurements"] = named(inputs.measurements, rt.x_bounds, lo, hi)
    series["controls"] = named(inputs.controls, rt.u_bounds, lo, hi)
    series["future_controls"]["anyOf"][0] = named(inputs.controls, rt.u_bounds, 1, rt.max_horizon)
