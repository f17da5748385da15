"""POST /optimize as it arrives and as it answers: the request (one series' history and, optionally, its own
objective), its decoding into the optimizer's arrays, and the answer's JSON. The search is ``optimizer.search``.

The series is decoded exactly as /forecast decodes one (``service.decode``), so every rule of a forecast request
holds here too; what /optimize adds is the objective (the card's ``optimizer``, any part of it replaced by the
request's) and the rules between the two: the plan decides the setpoints and controls the objective names, so the
request must not send their future, each decided setpoint's control is left to its loop, and the setpoints'
history says where they are now (the plan is compared with holding them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field
from pydantic_core import to_json

from modelcard.objective import (
    DEFAULT_PRICE,
    MAX_PLAN_MINUTES,
    Objective,
    card_names,
    looped_controls_of,
    objective_problems,
    trained_ranges,
)
from modelcard.runtime import ModelRuntime
from optimizer.search import Advice, Outcome, Search, Situation
from service.decode import check_quantiles, decode
from service.encode import SeriesFacts, SeriesResult, Warning, check_finite, encode_forecasts, quantile_key
from service.parse import SCAN_FROM, refuse_duplicate_keys, size_limits, validate
from service.problems import Errors, ProblemError
from service.request import FAIL_FAST, STRICT, ForecastRequest, SeriesIn
from service.scan import check_sizes
from service.settings import Settings

MAX_LIMITS = 20
DEFAULT_LEVELS = [0.1, 0.5, 0.9]


class LimitIn(BaseModel):
    model_config = STRICT

    variable: str = Field(max_length=64, description="a measurement (e.g. SNH_eff)")
    quantile: float = Field(gt=0, lt=1, description="the forecast quantile the limit is on, e.g. 0.9")
    max: float = Field(description="the limit, in the variable's unit, at every step")
    price_kwh: float = Field(
        DEFAULT_PRICE,
        ge=0,
        description="kWh a plan may spend to bring the quantile one unit lower for an hour where it is above the "
        "limit (high: a hard limit; where no plan meets it, the price decides how much air a peak is worth)",
    )
    hour_price_kwh: float = Field(
        0.0, ge=0, description="kWh a plan may spend to shorten the expected time above the limit by an hour"
    )


class ObjectiveIn(BaseModel):
    """Any part of the model's objective (GET /model: optimizer) to replace for this request."""

    model_config = STRICT

    block_minutes: int | None = Field(
        None, ge=1, le=MAX_PLAN_MINUTES, description="how long the plan holds each value (e.g. 60)"
    )
    control_minutes: int | None = Field(
        None,
        ge=1,
        le=MAX_PLAN_MINUTES,
        description="the span the plan decides; after it, its last values are held to the horizon's end (omitted "
        "or null: the card's)",
    )
    setpoints: dict[str, Annotated[list[float], FAIL_FAST]] | None = Field(
        None, description="the loops' setpoints the plan decides, each [min, max] ({} for none)"
    )
    controls: dict[str, Annotated[list[float], FAIL_FAST]] | None = Field(
        None, description="the open-loop controls the plan decides, each [min, max] ({} for none)"
    )
    limits: Annotated[list[LimitIn], FAIL_FAST] | None = Field(
        None, max_length=MAX_LIMITS, description="effluent limits on forecast quantiles ([] for none)"
    )
    aeration_kw: dict[str, float] | None = Field(None, description="kW per unit of each aeration control")
    pumping_kw: dict[str, float] | None = Field(None, description="kW per unit of each pumped flow")
    constant_kw: float | None = Field(None, ge=0, description="power no plan moves")
    price_per_kwh: float | None = Field(None, ge=0, description="energy price, for the plans' cost")
    move_kwh: float | None = Field(
        None, ge=0, description="kWh a move costs per whole bound's width (block to block, and from now)"
    )


class OptimizeRequest(BaseModel):
    model_config = STRICT

    series: SeriesIn = Field(
        description="one plant series as in /forecast, without plans: its history with the loops' setpoints "
        "(setpoints), the open-loop controls' plan (future_controls) or hold_controls; the decided setpoints' and "
        "controls' future is the answer's"
    )
    horizon: int = Field(ge=1, description="steps planned and forecast; at most the model's max_horizon")
    objective: ObjectiveIn | None = Field(None, description="replaces parts of the model's objective")
    quantiles: Annotated[list[float], FAIL_FAST] = Field(
        default_factory=lambda: list(DEFAULT_LEVELS),
        description="the answer's forecast quantiles, each strictly between 0 and 1 and none twice, as /forecast's "
        "(each limit's own quantile is added)",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed of the sample draws")


def parse_optimize(body: bytes, rt: ModelRuntime, settings: Settings) -> OptimizeRequest:
    """The request from JSON bytes as /forecast's is read (``service.parse``): a large body's structure counted
    first, a strict parse, then keys given twice."""
    structure = check_sizes(body, size_limits(rt, settings)) if len(body) >= SCAN_FROM else None
    errors = Errors()
    req = validate(OptimizeRequest, body, (), errors)
    errors.raise_if_any("Invalid request body")
    refuse_duplicate_keys(body, structure)
    assert req is not None
    check_quantiles(req.quantiles, settings, errors)  # as /forecast checks them
    if req.horizon > rt.max_horizon:  # before any per-step work: a plan of 1e9 steps was built, then refused
        errors.add("horizon", f"{req.horizon} exceeds the model's max_horizon {rt.max_horizon}")
    errors.raise_if_any("Invalid optimize request")
    return req


def objective_of(req: OptimizeRequest, rt: ModelRuntime) -> Objective:
    """The card's objective with the request's parts in its place, every problem named; bounds outside what the
    model saw in training are refused (it cannot say what a setpoint it never saw does)."""
    if "optimizer" not in rt.card:
        detail = f"model {rt.version} has no objective (card: optimizer): it cannot advise setpoints"
        raise ProblemError(409, "No setpoint advice for this model", detail=detail)
    if rt.plans_session is None:  # a version exported before the plans graph, given an objective since
        detail = f"model {rt.version} has no plans graph, which the search runs on (re-export it: python -m export)"
        raise ProblemError(409, "No setpoint advice for this model", detail=detail)
    merged = dict(rt.card["optimizer"])
    if req.objective is not None:
        merged |= req.objective.model_dump(exclude_none=True)
    objective, problems = objective_problems(merged, card_names(rt.card), "objective")
    seen = trained_ranges(rt.card["variables"])  # cards before card_version 3 have none: no check
    for key, bounds in (("setpoints", objective.setpoints), ("controls", objective.controls)):
        for name, (lo, hi) in bounds.items():
            if name not in seen:
                continue
            t_lo, t_hi = seen[name]
            if lo < t_lo - 1e-9 or hi > t_hi + 1e-9:
                msg = f"[{lo:g}, {hi:g}] leaves the range the model was trained on, [{t_lo:g}, {t_hi:g}]"
                problems.append((f"objective.{key}.{name}", msg))
    if problems:
        errors = Errors()
        for where, message in problems:
            errors.add(where, message)
        errors.raise_if_any("Invalid objective")
    return objective


def situation_of(
    req: OptimizeRequest, rt: ModelRuntime, settings: Settings, objective: Objective
) -> tuple[Situation, SeriesFacts]:
    """The series decoded as /forecast decodes it, and checked against what the plan decides: (situation, facts)."""
    s, errors = req.series, Errors()
    if s.plans is not None:
        errors.add("series.plans", "/optimize chooses the plan: send the history only")
    for name in objective.setpoints:
        if s.future_setpoints and name in s.future_setpoints:
            errors.add(f"series.future_setpoints.{name}", "the plan decides this setpoint: leave its future out")
        if not s.setpoints or not any(v is not None for v in s.setpoints.get(name, [])):
            errors.add(f"series.setpoints.{name}", "send its history: the plan is compared with holding it")
    last: dict[str, float] = {}
    for name in objective.controls:
        if s.future_controls and name in s.future_controls:
            errors.add(f"series.future_controls.{name}", "the plan decides this control: leave its future out")
        seen = [v for v in s.controls.get(name, []) if v is not None]
        if not seen:
            errors.add(f"series.controls.{name}", "send its history: the plan is compared with holding it")
        else:
            last[name] = seen[-1]
    errors.raise_if_any("Invalid optimize request")
    # The decided controls' futures are left out; /forecast's decoding needs every open-loop control's: each is
    # held at its last value there (what holding means; the plan replaces them).
    series = s
    if last and s.future_controls is not None:
        filled = {**s.future_controls, **{n: [v] * req.horizon for n, v in last.items()}}
        series = s.model_copy(update={"future_controls": filled})
    forecast = ForecastRequest(series=[series], horizon=req.horizon, quantiles=[], seed=req.seed)
    try:
        d = decode(forecast, rt, settings)
    except ProblemError as exc:  # /forecast's rules, answered in /optimize's own terms
        if exc.status != 422:
            raise
        listed = [{"field": optimize_field(e["field"]), "message": optimize_field(e["message"])} for e in exc.errors]
        raise ProblemError(422, "Invalid optimize request", listed, count=exc.count) from None
    u_fut = d.u_fut[0]
    decided = looped_controls_of(objective.setpoints, rt.loops)
    for name in sorted(decided):
        if np.isfinite(u_fut[:, rt.controls.index(name)]).any():
            errors.add(
                f"series.future_controls.{name}",
                "the plan decides its loop's setpoint: leave this control to its loop (send the setpoints' "
                "history and hold_controls, or future_controls without it)",
            )
    errors.raise_if_any("Invalid optimize request")
    s_fut = d.s_fut[0] if d.s_fut[0].size else None
    situation = Situation(d.x_hist[0], d.u_hist[0], d.s_hist[0], d.last_minute[0], d.d_fut[0], u_fut, s_fut)
    facts = d.facts[0]
    filled = {f"series[0].future_controls.{name}" for name in last} if series is not s else set()
    warnings = [{**w, "field": optimize_field(w["field"])} for w in facts.warnings if w["field"] not in filled]
    return situation, replace(facts, warnings=warnings)


def optimize_field(text: str) -> str:
    """A field path (or a message naming one) of /forecast's decoding in /optimize's terms: its one series is
    ``series``, not ``series[0]``."""
    return text.replace("series[0]", "series")


def search_settings(rt: ModelRuntime, seed: int | None) -> Search:
    """The pattern search, its quantiles drawn from as many samples as the model's intervals were fitted with."""
    return Search(samples=rt.calibration_samples, seed=0 if seed is None else seed)


# ----------------------------------------------------------------------------- the answer


class LimitOut(BaseModel):
    variable: str
    quantile: float
    max: float
    price_kwh: float
    hour_price_kwh: float
    met: bool = Field(description="the plan's quantile stays at or below the limit at every step")
    worst: float = Field(description="the plan's highest quantile over the horizon")
    worst_at: str
    excess: float = Field(description="how far the worst step is above the limit (0: met)")
    binding_at: list[str] = Field(description="the steps where the quantile is within 2% of the limit or above it")
    current_worst: float = Field(description="the same quantile's highest value when the setpoints are held")
    current_excess: float
    hours_above: float = Field(description="expected hours above the limit under the plan (samples above it)")
    current_hours_above: float


class OptimizeResponse(BaseModel):
    model_version: str
    id: str | None = Field(None, description="the series' id, echoed back")
    status: str = Field(
        description="improved: the plan scores better than holding the current setpoints (less energy, or less "
        "excess where a limit cannot be met); current_is_best: holding them is answered as the plan"
    )
    feasible: bool = Field(description="every limit met at every step by the plan")
    plan: dict[str, Any] = Field(description="block_minutes, timestamps and per decided variable its value per step")
    forecast: dict[str, Any] = Field(description="the plan's forecast, per variable: unit, mean and quantiles")
    energy: dict[str, Any] = Field(description="kWh over the horizon of the plan and of holding, and the saving")
    limits: list[LimitOut]
    solver: dict[str, Any]
    warnings: list[Warning] = Field(
        default_factory=list,
        description="the history's inputs worth a look, as /forecast names them (training_range, flat, stale): "
        "advice built on an extrapolated or stale input says so",
    )
    gaps: dict[str, int] = Field(
        default_factory=dict, description="history inputs that had missing samples (null), with how many"
    )


def energy_out(o: Outcome, price: float | None) -> dict[str, float | None]:
    out: dict[str, float | None] = dict(o.energy)
    out["cost"] = None if price is None else o.energy["total"] * price
    return out


def encode_advice(
    rt: ModelRuntime, req: OptimizeRequest, objective: Objective, advice: Advice, facts: SeriesFacts
) -> bytes:
    """The answer's JSON; a forecast that is not finite is refused (422) rather than sent as NaN."""
    plan, cur = advice.plan, advice.current
    mean, quantiles = plan.mean[..., facts.outputs], plan.quantiles[..., facts.outputs]  # the loops in effect
    check_finite(SeriesResult(mean, quantiles), "series")
    times = [to_json(t).decode().strip('"') for t in facts.timestamps]  # written as /forecast writes them
    forecast, clipped = encode_forecasts(rt, plan.levels, mean[None], quantiles[:, None], facts.outputs)[0]
    wanted = {quantile_key(q) for q in (*req.quantiles, *(m.quantile for m in objective.limits))}
    for var in forecast.values():
        var["quantiles"] = {k: v for k, v in var["quantiles"].items() if k in wanted}
    limits = []
    for c, h in zip(plan.limits, cur.limits, strict=True):
        m = c.limit
        limits.append(
            {
                "variable": m.variable,
                "quantile": m.quantile,
                "max": m.max,
                "price_kwh": m.price_kwh,
                "hour_price_kwh": m.hour_price_kwh,
                "met": c.excess == 0,
                "worst": c.worst,
                "worst_at": times[c.worst_step],
                "excess": c.excess,
                "binding_at": [times[k] for k in c.binding_steps],
                "current_worst": h.worst,
                "current_excess": h.excess,
                "hours_above": c.hours_above,
                "current_hours_above": h.hours_above,
            }
        )
    saving = cur.energy["total"] - plan.energy["total"]
    answer: dict[str, Any] = {
        "model_version": rt.version,
        "id": facts.id,
        "status": advice.status,
        "feasible": plan.feasible,
        "plan": {
            "block_minutes": objective.block_minutes,
            "control_minutes": objective.control_minutes,
            "timestamps": times,
            "setpoints": {n: plan.s[:, rt.setpoints.index(n)].tolist() for n in objective.setpoints},
            "controls": {n: plan.u[:, rt.controls.index(n)].tolist() for n in objective.controls},
            "current": {
                **{n: float(cur.s[0, rt.setpoints.index(n)]) for n in objective.setpoints},
                **{n: float(cur.u[0, rt.controls.index(n)]) for n in objective.controls},
            },
        },
        "forecast": {"variables": forecast, "clipped": clipped},
        "energy": {
            "unit": "kWh over the horizon",
            "hours": req.horizon * rt.step_minutes / 60,
            "plan": energy_out(plan, objective.price_per_kwh),
            "current": energy_out(cur, objective.price_per_kwh),
            "saving": saving,
            "saving_share": saving / cur.energy["total"] if cur.energy["total"] > 0 else 0.0,
        },
        "limits": limits,
        "solver": {
            "method": "pattern search over the plans graph (model means, quantile margins from samples)",
            "sweeps": advice.sweeps,
            "plans_evaluated": advice.plans_evaluated,
            "samples": search_settings(rt, req.seed).samples,
            "seconds": advice.seconds,
        },
        "warnings": facts.warnings,
        "gaps": facts.gaps,
    }
    energy = answer["energy"]
    parts = (energy, energy["plan"], energy["current"], *limits)
    numbers = [v for part in parts for v in part.values() if isinstance(v, float)]
    if not all(np.isfinite(numbers)):  # bounded inputs make this unreachable; a guard, never NaN in JSON
        msg = "the plan's energy or limits are not finite numbers: check the objective's coefficients and prices"
        raise ProblemError(422, "No finite answer", [{"field": "objective", "message": msg}])
    return to_json(answer)
