"""The /forecast answer: its models, its size foretold, and the encoding of forecasts into JSON, in pieces.

Every cost of an answer is here. Its size is predicted from the request's shape before any work is done
(series x plans x (mean + quantiles) x horizon x variables: the measurements, and the controls a request leaves
to their loops, which are forecast too), and a request whose answer would pass
``KOVAE_MAX_ANSWER_BYTES`` is refused saying how to make it smaller. Forecasts are encoded a piece at a time
straight to JSON bytes (pydantic-core), so that only one piece's Python lists exist at once, and an answer of
``SMALL_ANSWER`` bytes or more goes out as those pieces, never joined into one more copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from pydantic_core import to_json
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from modelcard.runtime import ModelRuntime
from service.problems import ProblemError

# ----------------------------------------------------------------------------- the answer's shape


class VariableForecast(BaseModel):
    unit: str
    mean: list[float]
    quantiles: dict[str, list[float]] = Field(default_factory=dict)


class WarningBase(BaseModel):
    """What every warning names (the Prometheus count of warnings reads kind and variable)."""

    field: str
    variable: str
    message: str


class InputWarning(WarningBase):
    kind: Literal["training_range"] = Field(description="inside the physical bounds, outside the training range")
    training_min: float
    training_max: float
    value: float = Field(description="the value furthest outside the training range")
    beyond: float = Field(description="how far outside, as a fraction of the training range's width")


class FlatWarning(WarningBase):
    kind: Literal["flat"] = Field(
        description="identical values for longer than the variable's max_flat_minutes (GET /model): a stuck sensor?"
    )
    value: float = Field(description="the value repeated")
    minutes: float = Field(description="from the run's first sample to its last (the longest such run)")
    first_index: int = Field(description="history index of the run's first sample")
    last_index: int
    max_flat_minutes: float


class StaleWarning(WarningBase):
    kind: Literal["stale"] = Field(description="missing at the history's end: a sensor down now")
    value: float = Field(description="its last measured value, which its forecast starts from")
    minutes: float = Field(description="from that value to the history's last timestamp")
    last_index: int = Field(description="history index of that value")


Warning = Annotated[InputWarning | FlatWarning | StaleWarning, Field(discriminator="kind")]


class Clipped(BaseModel):
    variable: str
    output: str = Field(description="'mean' or 'quantiles.<q>'")
    values: int = Field(description="forecast values set to the physical bound")
    bound: str = Field(description="'min' or 'max'")


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


class SeriesOut(BaseModel):
    id: str | None
    timestamps: list[datetime] = Field(
        description="the forecast's times, on the clock of the history's last timestamp: its UTC offset, or "
        "(without one) the plant's time zone with its offset written out"
    )
    forecast: dict[str, VariableForecast] = Field(
        description="per variable: every measurement, then each control the request left to its loop (the air "
        "or recycle its loop will apply under the plan)"
    )
    warnings: list[Warning] = Field(
        default_factory=list,
        description="inputs answered but worth a look: inside the physical bounds but outside the training range "
        "(kind training_range), flat for longer than the catalog allows (kind flat: a stuck sensor?), or a "
        "measurement missing at the history's end (kind stale: a sensor down now)",
    )
    clipped: list[Clipped] = Field(
        default_factory=list, description="forecast values held at a physical bound (e.g. a concentration at 0)"
    )
    gaps: dict[str, int] = Field(
        default_factory=dict, description="history inputs that had missing samples (null), with how many"
    )
    plans: list[PlanOut] | None = Field(None, description="when the series sent plans: one per plan, in order")


class StabilityOut(BaseModel):
    spectral_radius: float
    stability_margin: float
    stable: bool


class ForecastResponse(BaseModel):
    model_version: str
    stability: StabilityOut
    horizon: int
    series: list[SeriesOut]


def quantile_key(q: float) -> str:
    """The shortest text that reads back as the same float: 0.1 -> "0.1", 0.1234567 -> "0.1234567"."""
    return repr(float(q))


# ----------------------------------------------------------------------------- its size, foretold

VALUE_BYTES = 20  # a float as pydantic-core writes it ("12345.678901234567,"); measured 17-19 on real answers
VARIABLE_BYTES = 60  # '"SNH_eff":{"unit":"g N/m3","mean":[...],"quantiles":{...}},' around the values
PLAN_BYTES = 80  # '{"name":"...","forecast":{},"summary":{...},"clipped":[]},' around the rest
SERIES_BYTES = 2_000  # id, warnings, gaps, clipped notes
TIMESTAMP_BYTES = 28  # '"2026-03-01T00:15:00+01:00",'


@dataclass(frozen=True)
class SeriesShape:
    """What decides a series' share of the answer."""

    plans: int  # 0: no plans, one forecast
    plan_forecasts: bool
    variables: int  # forecast per forecast: the measurements and the controls left to their loops


def forecast_bytes(variables: int, quantiles: int, horizon: int) -> int:
    """One forecast: per variable its mean and each quantile over the horizon."""
    return variables * ((1 + quantiles) * horizon * VALUE_BYTES + VARIABLE_BYTES)


def answer_bytes(shapes: list[SeriesShape], quantiles: int, horizon: int) -> int:
    """The answer's size in bytes, predicted from the request's shape (within a few percent of the real one)."""
    total = 200
    for s in shapes:
        one = forecast_bytes(s.variables, quantiles, horizon)
        summary = s.variables * (4 * VALUE_BYTES + 40)
        total += SERIES_BYTES + horizon * TIMESTAMP_BYTES
        if s.plans == 0:
            total += one
        else:
            total += s.plans * (PLAN_BYTES + summary + (one if s.plan_forecasts else 0))
    return total


def check_answer_size(shapes: list[SeriesShape], quantiles: int, horizon: int, limit: int) -> int:
    """The answer's predicted size in bytes; a request whose answer would pass ``limit`` bytes is refused (422),
    saying its size and how to shrink it."""
    size = answer_bytes(shapes, quantiles, horizon)
    if size <= limit:
        return size
    plans = sum(s.plans for s in shapes if s.plan_forecasts)
    forecasts = sum(s.plans or 1 for s in shapes)
    variables = max(s.variables for s in shapes)
    ways = []
    if plans:
        summaries = answer_bytes([SeriesShape(s.plans, False, s.variables) for s in shapes], quantiles, horizon)
        ways.append(f'"plan_forecasts": false (each plan answers its summary only: about {summaries / 1e6:.1f} MB)')
    if quantiles:
        ways.append("fewer quantiles")
    ways += (["a shorter horizon"] if horizon > 1 else []) + ["fewer series or plans per request"]
    field = "series[].plan_forecasts" if plans else ("quantiles" if quantiles else "series")
    message = (
        f"the answer would be about {size / 1e6:.0f} MB ({forecasts} forecasts x (mean + {quantiles} quantiles) x "
        f"{horizon} steps x {variables} variables at most), above the limit of {limit / 1e6:.0f} MB per answer: "
        "ask for " + ", or ".join(ways)
    )
    raise ProblemError(422, "Answer too large", [{"field": field, "message": message}])


# ----------------------------------------------------------------------------- forecasts to JSON


@dataclass
class SeriesResult:
    mean: np.ndarray  # (H, n_out), engineering units; (plans, H, n_out) for a piece of a series' plans
    quantiles: np.ndarray | None  # (Q, H, n_out); (Q, plans, H, n_out)

    def answered(self, outputs: list[int]) -> SeriesResult:
        """Only the runtime's ``outputs`` a series answers (the measurements, the controls left to their loops)."""
        if outputs == list(range(self.mean.shape[-1])):
            return self
        return SeriesResult(self.mean[..., outputs], None if self.quantiles is None else self.quantiles[..., outputs])


def check_finite(res: SeriesResult, field: str) -> None:
    """A forecast that is not finite is refused (422 naming the series' ``field``) rather than sent as NaN or
    Infinity, which strict JSON parsers reject."""
    if not (np.all(np.isfinite(res.mean)) and (res.quantiles is None or np.all(np.isfinite(res.quantiles)))):
        msg = "the forecast is not finite for these inputs: check the history"
        raise ProblemError(422, "No finite forecast", [{"field": field, "message": msg}])


def encode_forecasts(
    rt: ModelRuntime,
    quantiles: list[float],
    mean: np.ndarray,
    qs: np.ndarray | None,
    outputs: list[int],
    values: bool = True,
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Per forecast in ``mean`` (F, H, n) (``qs`` (Q, F, H, n)), the runtime's ``outputs`` (n of them): per
    variable its unit, mean and quantiles (H values each) held within the physical bounds (``values`` false:
    none, {}), and notes of what was clipped. One pass over all F at once: 1,000 plans have 17,000 variable
    forecasts."""
    names, units = [rt.outputs[j] for j in outputs], [rt.out_units[j] for j in outputs]
    lo, hi = rt.out_bounds[0][outputs], rt.out_bounds[1][outputs]
    keys = [quantile_key(q) for q in quantiles] if qs is not None else []
    parts = [(f"quantiles.{k}", v) for k, v in zip(keys, qs if qs is not None else [], strict=True)]
    parts.append(("mean", mean))  # the notes' order: each variable's quantiles, then its mean
    counts = np.stack([np.stack([(v < lo).sum(1), (v > hi).sum(1)], -1) for _, v in parts], 2)  # (F, n, O, 2)
    lists = [np.clip(v, lo, hi).transpose(0, 2, 1).tolist() if values else [] for _, v in parts]  # [o][f][var]
    encoded = []
    for f in range(len(mean)):
        clipped = (
            [
                {
                    "variable": name,
                    "output": parts[o][0],
                    "values": int(counts[f, j, o, b]),
                    "bound": ("min", "max")[b],
                }
                for j, name in enumerate(names)
                for o, b in zip(*np.nonzero(counts[f, j]), strict=True)
            ]
            if counts[f].any()
            else []
        )
        per_var = (
            {
                name: {
                    "unit": units[j],
                    "mean": lists[-1][f][j],
                    "quantiles": {k: lists[o][f][j] for o, k in enumerate(keys)},
                }
                for j, name in enumerate(names)
            }
            if values
            else {}
        )
        encoded.append((per_var, clipped))
    return encoded


def plan_summaries(rt: ModelRuntime, mean: np.ndarray, outputs: list[int]) -> list[dict[str, dict[str, float]]]:
    """Per plan, per variable over the horizon of the clipped mean (P, H, n) of the runtime's ``outputs``: mean,
    min, max and final value, what plans are compared by (effluent ammonium, and the air each plan needs)."""
    m = np.clip(mean, rt.out_bounds[0][outputs], rt.out_bounds[1][outputs])
    stats = np.stack([m.mean(1), m.min(1), m.max(1), m[:, -1]], -1).tolist()  # [plan][var][stat]
    keys = ("mean", "min", "max", "final")
    names = [rt.outputs[j] for j in outputs]
    return [{name: dict(zip(keys, row[j], strict=True)) for j, name in enumerate(names)} for row in stats]


@dataclass(frozen=True)
class SeriesFacts:
    """What a series' answer echoes from its request: decoded once, read by every piece of it."""

    id: str | None
    timestamps: list[datetime]
    warnings: list[dict[str, Any]]
    gaps: dict[str, int]
    plan_names: list[str] | None
    plan_forecasts: bool
    outputs: list[int]  # the runtime's outputs it answers: every measurement, the controls left to their loops


def encode_series(rt: ModelRuntime, quantiles: list[float], i: int, facts: SeriesFacts, res: SeriesResult) -> bytes:
    """A series without plans, whole: its forecast held within the physical bounds (and where it was held)."""
    res = res.answered(facts.outputs)
    check_finite(res, f"series[{i}]")
    qs = None if res.quantiles is None else res.quantiles[:, None]
    forecast, clipped = encode_forecasts(rt, quantiles, res.mean[None], qs, facts.outputs)[0]
    out = {"id": facts.id, "timestamps": facts.timestamps, "forecast": forecast, "clipped": clipped}
    return to_json({**out, "warnings": facts.warnings, "gaps": facts.gaps})


def series_with_plans(facts: SeriesFacts) -> tuple[bytes, bytes]:
    """The JSON before and after the plans of a series with plans; the plans go between, piece by piece."""
    head = to_json({"id": facts.id, "timestamps": facts.timestamps, "forecast": {}, "clipped": []})
    tail = to_json({"warnings": facts.warnings, "gaps": facts.gaps})
    return head[:-1] + b',"plans":[', b"]," + tail[1:]


def encode_plans(
    rt: ModelRuntime, quantiles: list[float], i: int, facts: SeriesFacts, first: int, res: SeriesResult
) -> bytes:
    """Plans ``first``.. of series ``i`` (as many as ``res`` holds), comma-separated: each its forecast
    (unless plan_forecasts is false), summary and clipping notes."""
    res = res.answered(facts.outputs)
    check_finite(res, f"series[{i}]")
    names = (facts.plan_names or [])[first : first + len(res.mean)]
    forecasts = encode_forecasts(rt, quantiles, res.mean, res.quantiles, facts.outputs, values=facts.plan_forecasts)
    summaries = plan_summaries(rt, res.mean, facts.outputs)
    plans = [
        {"name": name, "forecast": forecast, "summary": summary, "clipped": clipped}
        for name, (forecast, clipped), summary in zip(names, forecasts, summaries, strict=True)
    ]
    return to_json(plans)[1:-1]


def envelope(rt: ModelRuntime, horizon: int) -> tuple[bytes, bytes]:
    """The JSON before and after the series (ForecastResponse's shape): the series go between, in order."""
    st = rt.card["stability"]
    head = {
        "model_version": rt.version,
        "stability": {k: st[k] for k in ("spectral_radius", "stability_margin", "stable")},
        "horizon": horizon,
    }
    return to_json(head)[:-1] + b',"series":[', b"]}"


class PartsResponse(Response):
    """A 200 whose body is sent as the pieces it was encoded in (their length known): a large answer is never
    copied into one more buffer, and each piece waits for the client to take the one before."""

    media_type = "application/json"

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        super().__init__(None, 200)
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for k, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": k < len(self.parts) - 1})
            if not self.parts:
                await send({"type": "http.response.body", "body": b""})
        finally:  # sent, or its client gone: what it held is free (service.forecasting.AnswerBudget)
            self.parts = []
            if self.background is not None:
                await self.background()


SMALL_ANSWER = 1_000_000
"""Answers below this many bytes are joined and sent in one write; larger ones go out piece by piece."""


def answer_response(parts: list[bytes], large: bool = False) -> Response:
    """The 200 for an answer's parts; ``large``: sent piece by piece whatever its size (its ``background`` then
    runs however the sending ends)."""
    if not large and sum(len(p) for p in parts) < SMALL_ANSWER:
        return Response(b"".join(parts), media_type="application/json")
    return PartsResponse(parts)
