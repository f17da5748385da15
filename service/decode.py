"""Decoding a parsed /forecast request (``service.parse``) into the arrays the runtime takes.

Every cost of reading a request is bounded before it is paid: ``service.parse`` checks the raw body's size
rules before parsing it; here the size rules that need the model or the settings (history length, horizon,
series, plans, quantiles, samples, the work and the answer's size) are checked, each stopping at its first
violation, and only a request that keeps them all is checked value by value (finite, within the physical
bounds). Problems are listed up to ``service.problems.LISTED`` and counted.

The pieces: ``service.inputs`` (the card's inputs, named arrays to arrays), ``service.times`` (timestamps and
the plant's time zone), ``service.loops`` (controls left to their loops), ``service.warn`` (what is answered
with a warning).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from modelcard.card import last_observed, minutes_since_monday
from modelcard.objective import looped_controls_of
from modelcard.runtime import ModelRuntime
from service.encode import SeriesFacts, SeriesShape, check_answer_size, quantile_key
from service.inputs import (
    Inputs,
    ModelInputs,
    check_names,
    check_optional_names,
    gap_counts,
    named_values,
    optional_values,
)
from service.loops import (
    Loop,
    answered_loops,
    check_future_controls,
    check_plan_setpoints,
    check_plans_alike,
    decide,
    model_loops,
    setpoint_sources,
)
from service.problems import Errors
from service.request import DecodedRequest, ForecastRequest, PlanIn, SeriesIn
from service.settings import Settings
from service.times import future_times, read_times
from service.warn import flat_warnings, range_warnings, stale_warnings


def requested_samples(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> int:
    """Samples to draw when the request asks for quantiles (else none): its own count, else the setting's, else
    the count the model's interval width was fitted for (fewer samples give narrower 10-90% ranges)."""
    return (req.samples or settings.default_samples or rt.calibration_samples) if req.quantiles else 0


def decode(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> DecodedRequest:
    """Check a request against the model card and settings and turn it into arrays: every size rule first
    (refused together, before any value is looked at), then each series' values."""
    errors = Errors()
    work = check_request_sizes(req, rt, settings, errors)
    inputs, loops = ModelInputs.of(rt), model_loops(rt)
    for i, s in enumerate(req.series):
        check_series_sizes(s, f"series[{i}]", rt, inputs, loops, req.horizon, settings, errors)
    errors.raise_if_any()
    n_x = len(rt.measurements)
    answer_size = check_answer_size(
        [SeriesShape(len(s.plans or []), s.plan_forecasts, n_x + len(answered_loops(s, loops))) for s in req.series],
        len(req.quantiles),
        req.horizon,
        settings.max_answer_bytes,
    )
    samples = requested_samples(req, rt, settings)
    out = DecodedRequest(
        horizon=req.horizon,
        quantiles=sorted(req.quantiles),
        samples=samples,
        seed=req.seed,
        work=work,
        answer_bytes=answer_size,
    )
    for i, s in enumerate(req.series):
        decode_series(s, f"series[{i}]", rt, inputs, loops, req.horizon, out, errors)
    errors.raise_if_any()
    return out


def check_request_sizes(req: ForecastRequest, rt: ModelRuntime, settings: Settings, errors: Errors) -> int:
    """Horizon, series, quantiles, samples, plans and the work, each checked once (no error per quantile); returns
    the work: forecasts x samples x horizon in sample steps (the mean counts as one sample, a series with plans one
    forecast per plan), the count KOVAE_MAX_WORK bounds. The lane and the ONNX calls are sized otherwise, by what a
    call costs (``service.forecasting.steps``: the rollout over the model's max_horizon and the history count too)."""
    if req.horizon > rt.max_horizon:
        errors.add("horizon", f"{req.horizon} exceeds the model's max_horizon {rt.max_horizon}")
    if len(req.series) > settings.max_series:
        errors.add("series", f"{len(req.series)} series exceed the limit {settings.max_series}")
    check_quantiles(req.quantiles, settings, errors)
    samples = requested_samples(req, rt, settings)
    if samples > settings.max_samples:
        errors.add("samples", f"{samples} exceeds the limit {settings.max_samples}")
    # Plans whose forecasts the answer leaves out (plan_forecasts false) draw no samples: only their means count.
    means_only = sum(len(s.plans) for s in req.series if s.plans and not s.plan_forecasts)
    forecasts = sum(len(s.plans) if s.plans else 1 for s in req.series) - means_only
    work = (forecasts * max(samples, 1) + means_only) * req.horizon
    if work > settings.max_work and req.horizon <= rt.max_horizon:  # a horizon too long is named alone
        without = f" + {means_only} plans without forecasts x {req.horizon}" if means_only else ""
        errors.add(
            "samples" if samples and forecasts else "series",
            f"forecasts x samples x horizon = {forecasts} x {max(samples, 1)} x {req.horizon}{without} = {work} "
            f"exceeds the limit {settings.max_work} per request (a series counts one forecast per plan): send "
            "fewer samples, series or plans, or split the request",
        )
    return work


def check_quantiles(quantiles: list[float], settings: Settings, errors: Errors) -> None:
    """The quantiles asked for (/forecast's and /optimize's alike): at most the setting's count, each strictly
    between 0 and 1, none twice."""
    if len(quantiles) > settings.max_quantiles:
        errors.add("quantiles", f"{len(quantiles)} quantiles; at most {settings.max_quantiles}")
        return
    seen: dict[str, int] = {}
    for i, q in enumerate(quantiles):
        if not (math.isfinite(q) and 0 < q < 1):
            errors.add(f"quantiles[{i}]", f"{q} is not strictly between 0 and 1")
        elif quantile_key(q) in seen:
            errors.add(f"quantiles[{i}]", f"repeats quantiles[{seen[quantile_key(q)]}]")
        seen.setdefault(quantile_key(q), i)


def check_series_sizes(
    s: SeriesIn,
    where: str,
    rt: ModelRuntime,
    inputs: ModelInputs,
    loops: list[Loop],
    H: int,
    settings: Settings,
    errors: Errors,
) -> None:
    """A series' lengths and names: history length, each named array's length and name, the plans' count."""
    hist_min, hist_max = rt.card["history"]["min"], rt.card["history"]["max"]
    L = len(s.timestamps)
    if not hist_min <= L <= hist_max:
        errors.add(f"{where}.timestamps", f"{L} steps; the model takes {hist_min}..{hist_max}")
        return
    lengths = {len(v) for v in (*s.measurements.values(), *s.controls.values())}
    if len(lengths) == 1 and L not in lengths:  # the arrays agree: the timestamps are at fault, not 21 arrays
        n = lengths.pop()
        errors.add(f"{where}.timestamps", f"{L} timestamps, but every history array has {n} values: one per sample")
        L = n  # the other rules are checked against the arrays' own length, so none is blamed for this one
    check_names(s.measurements, inputs.measurements, f"{where}.measurements", L, errors)
    check_names(s.controls, inputs.controls, f"{where}.controls", L, errors)
    if sum((s.hold_controls, s.future_controls is not None, s.plans is not None)) > 1:
        errors.add(f"{where}.future_controls", "give one of future_controls, hold_controls, plans")
    elif s.plans is not None:
        check_plan_sizes(s, f"{where}.plans", inputs, loops, H, settings, errors)
    elif s.future_controls is not None:
        sent = setpoint_sources(s)
        check_future_controls(s.future_controls, inputs.controls, loops, sent, f"{where}.future_controls", H, errors)
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
    s: SeriesIn, where: str, inputs: ModelInputs, loops: list[Loop], H: int, settings: Settings, errors: Errors
) -> None:
    """The plans' count and names, every plan giving the same variables, each plan's controls and setpoints."""
    plans: list[PlanIn] = s.plans or []
    if len(plans) > settings.max_plans:
        errors.add(where, f"{len(plans)} plans exceed {settings.max_plans}")
        return
    names = [p.name for p in plans]
    twice = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if not plans or twice:
        errors.add(where, f"plan names repeat: {', '.join(twice[:5])}" if twice else "no plans given")
        return
    if not check_plans_alike(plans, where, errors):
        return
    sent = setpoint_sources(s, plans[0])
    for k, p in enumerate(plans):
        before = len(errors)
        at = f"{where}[{k}]"
        check_future_controls(p.future_controls, inputs.controls, loops, sent, f"{at}.future_controls", H, errors)
        if p.future_setpoints:
            check_optional_names(p.future_setpoints, inputs.setpoints, f"{at}.future_setpoints", H, errors)
            check_plan_setpoints(p, s, at, errors)
        if len(errors) > before:
            return  # plans are alike: the first one at fault says what is wrong with the rest


# ----------------------------------------------------------------------------- a series' values


def decode_series(
    s: SeriesIn,
    where: str,
    rt: ModelRuntime,
    inputs: ModelInputs,
    loops: list[Loop],
    H: int,
    out: DecodedRequest,
    errors: Errors,
) -> None:
    """One series' values into ``out`` (sizes already checked): times, history, controls, optional inputs."""
    before = len(errors)
    L, step = len(s.timestamps), rt.step_minutes
    times = read_times(s.timestamps, f"{where}.timestamps", step, rt.zone, errors)
    future = future_times(times, H, step, where, errors) if times is not None else None
    gaps_allowed = rt.max_missing_share
    x = named_values(s.measurements, inputs.measurements, f"{where}.measurements", errors, gaps_allowed)
    u = named_values(s.controls, inputs.controls, f"{where}.controls", errors, gaps_allowed)
    uf = future_controls(s, where, inputs.controls, u, H, errors)
    d_fut = optional_values(s.future_disturbances, inputs.disturbances, f"{where}.future_disturbances", H, errors)
    s_hist = optional_values(s.setpoints, inputs.setpoints, f"{where}.setpoints", L, errors)
    s_fut = future_setpoints(s, where, inputs.setpoints, H, errors)
    if len(errors) > before or times is None or future is None:
        return
    assert x is not None and u is not None and uf is not None and d_fut is not None
    assert s_hist is not None and s_fut is not None
    warnings = (
        range_warnings(x, inputs.measurements, f"{where}.measurements")
        + range_warnings(u, inputs.controls, f"{where}.controls")
        + range_warnings(s_hist, inputs.setpoints, f"{where}.setpoints")
        + range_warnings(s_fut.reshape(-1, s_fut.shape[-1]), inputs.setpoints, f"{where}.future_setpoints")
        + range_warnings(d_fut, inputs.disturbances, f"{where}.future_disturbances")
        + (
            []
            if s.hold_controls
            else range_warnings(uf.reshape(-1, uf.shape[-1]), inputs.controls, f"{where}.future_controls")
        )
        + flat_warnings(x, inputs.measurements, f"{where}.measurements", step)
        + flat_warnings(u, inputs.controls, f"{where}.controls", step)
        + flat_warnings(s_hist, inputs.setpoints, f"{where}.setpoints", step)
        + stale_warnings(x, inputs.measurements, f"{where}.measurements", step)
    )
    try:
        wall_clock = times[-1].astimezone(rt.zone)  # the plant's, as training read its data
    except OverflowError:
        errors.add(f"{where}.timestamps[{L - 1}]", "lies too near the year 1 or 9999 to be read in the plant's zone")
        return
    decided = decide(s, where, loops, uf, s_hist, s_fut, errors)
    if decided is None:
        return
    s_fut, left = decided
    out.x_hist.append(x)
    out.u_hist.append(u)
    out.u_fut.append(uf)
    out.last_minute.append(minutes_since_monday(wall_clock))
    out.d_fut.append(d_fut)
    out.s_hist.append(s_hist)
    out.s_fut.append(s_fut)
    names = [p.name for p in s.plans] if s.plans is not None else None
    gaps = {**gap_counts(x, rt.measurements), **gap_counts(u, rt.controls)}
    outputs = list(range(len(rt.measurements))) + [loop.output for loop in left]
    out.facts.append(SeriesFacts(s.id, future, warnings, gaps, names, s.plan_forecasts, outputs))


def future_controls(
    s: SeriesIn, where: str, controls: Inputs, u_hist: np.ndarray | None, H: int, errors: Errors
) -> np.ndarray | None:
    """The controls over the horizon, (H, n_u), or (plans, H, n_u) for a series with plans: as planned (NaN for a
    control left out, which its loop decides: ``service.loops.decide``), or the history's last values held."""
    if s.plans is not None:
        per_plan = [
            optional_values(p.future_controls, controls, f"{where}.plans[{k}].future_controls", H, errors)
            for k, p in enumerate(s.plans)
        ]
        return None if any(a is None for a in per_plan) else np.stack(per_plan)  # type: ignore[arg-type]
    if s.hold_controls:
        return None if u_hist is None else np.repeat(last_observed(u_hist)[None], H, 0)
    return optional_values(s.future_controls, controls, f"{where}.future_controls", H, errors)


def future_setpoints(s: SeriesIn, where: str, setpoints: Inputs, H: int, errors: Errors) -> np.ndarray | None:
    """The loops' setpoints over the horizon as sent, NaN where not: (H, n_s), or with setpoint plans
    (plans, H, n_s), each plan's own beside the series'."""
    series = optional_values(s.future_setpoints, setpoints, f"{where}.future_setpoints", H, errors)
    if series is None or not s.plans or not s.plans[0].future_setpoints:
        return series
    per_plan = []
    for k, p in enumerate(s.plans):
        own = optional_values(p.future_setpoints, setpoints, f"{where}.plans[{k}].future_setpoints", H, errors)
        if own is None:
            return None
        per_plan.append(np.where(np.isnan(own), series, own))
    return np.stack(per_plan)


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

    def named(
        role: Inputs,
        limits: tuple[Any, Any],
        min_items: int,
        max_items: int,
        optional: tuple[str, ...] = (),
        gaps: bool = False,
    ) -> dict[str, Any]:
        """Each input's array within its physical bounds; ``gaps``: null marks a missing sample (a history)."""
        props = {}
        for name, low, high in zip(role.names, *limits, strict=True):
            item: dict[str, Any] = {"type": "number"}
            if np.isfinite(low):
                item["minimum"] = float(low)
            if np.isfinite(high):
                item["maximum"] = float(high)
            items = {"anyOf": [item, {"type": "null"}]} if gaps else item
            props[name] = {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}
        required = [n for n in role.names if n not in optional]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    inputs = ModelInputs.of(rt)
    series["measurements"] = named(inputs.measurements, rt.x_bounds, lo, hi, gaps=True)
    series["controls"] = named(inputs.controls, rt.u_bounds, lo, hi, gaps=True)
    looped = tuple(loop.control for loop in model_loops(rt))  # may be left to their loops
    series["future_controls"]["anyOf"][0] = named(inputs.controls, rt.u_bounds, 1, rt.max_horizon, looped)
    publish_optimize_limits(schemas, rt, settings)


def publish_optimize_limits(schemas: dict[str, Any], rt: ModelRuntime, settings: Settings) -> None:
    """/optimize's request: its horizon and quantiles as /forecast's, and its one series as /forecast's without
    plans, whose future_controls require none of what the card's objective decides (its controls, and the
    controls of the loops whose setpoints it decides): every request the service takes is schema-valid. The
    service still refuses a decided one sent (which ones depend on the request's own objective), by name."""
    req = schemas["OptimizeRequest"]["properties"]
    req["horizon"]["maximum"] = rt.max_horizon
    req["quantiles"]["maxItems"] = settings.max_quantiles
    objective = rt.card.get("optimizer") or {}
    decided = set(objective.get("controls", {}))
    decided |= looped_controls_of(objective.get("setpoints", {}), rt.loops)
    series = copy.deepcopy(schemas["SeriesIn"])
    series["title"] = "OptimizeSeriesIn"
    series["properties"].pop("plans")
    plan = series["properties"]["future_controls"]["anyOf"][0]
    plan["required"] = [n for n in plan["required"] if n not in decided]
    series["properties"]["future_controls"]["description"] += (
        ". In /optimize: leave out the controls the objective decides (the card's: GET /model, optimizer; or the "
        "request's own) and those of the loops whose setpoints it decides"
    )
    schemas["OptimizeSeriesIn"] = series
    req["series"] = {**req["series"], "$ref": "#/components/schemas/OptimizeSeriesIn"}
