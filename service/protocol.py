"""The /forecast protocol: request and response models, and the codecs between JSON and arrays.

Kept apart from the runtime (which only sees arrays) and from the web layer (which only routes). Every check
that needs the model's limits reads them from the model card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modelcard.card import minutes_since_monday
from modelcard.runtime import Forecast, ModelRuntime
from service.settings import Settings


class ProblemError(Exception):
    """A client mistake, reported as RFC 9457 problem+json; ``errors`` name the fields."""

    def __init__(self, status: int, title: str, errors: list[dict[str, str]] | None = None, detail: str = "") -> None:
        super().__init__(title)
        self.status, self.title, self.errors = status, title, errors or []
        self.detail = detail or "; ".join(f"{e['field']}: {e['message']}" for e in self.errors) or title


class SeriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=128, description="caller's label, echoed back")
    timestamps: list[datetime] = Field(
        description="history sample times, oldest first, at the model's spacing, in the plant's local time "
        "(with its UTC offset; no offset means UTC): the time of day and week are model inputs"
    )
    measurements: dict[str, list[float]] = Field(description="one array per measured variable (catalog names)")
    controls: dict[str, list[float]] = Field(description="one array per control over the history")
    future_controls: dict[str, list[float]] | None = Field(
        None, description="planned control per future step (horizon values each); omit with hold_controls"
    )
    hold_controls: bool = Field(False, description="hold the last history control values over the horizon")


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    series: list[SeriesIn] = Field(min_length=1, description="one or more plant series, run as one batch")
    horizon: int = Field(ge=1, description="forecast steps; at most the model's max_horizon")
    quantiles: list[float] = Field(default_factory=list, description="e.g. [0.1, 0.5, 0.9]; empty: mean only")
    samples: int | None = Field(None, ge=1, description="forecast samples used for the quantiles")


class VariableForecast(BaseModel):
    mean: list[float]
    quantiles: dict[str, list[float]] = Field(default_factory=dict)


class SeriesOut(BaseModel):
    id: str | None
    timestamps: list[datetime]
    forecast: dict[str, VariableForecast]


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
    u_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_u)
    future_times: list[list[datetime]] = field(default_factory=list)
    last_minute: list[float] = field(default_factory=list)  # each series' last history time, minutes since Monday
    ids: list[str | None] = field(default_factory=list)
    horizon: int = 0
    quantiles: list[float] = field(default_factory=list)
    samples: int = 0


def _array(values: list[float], where: str, length: int, errors: list[dict[str, str]]) -> np.ndarray | None:
    if len(values) != length:
        errors.append({"field": where, "message": f"has {len(values)} values, expected {length}"})
        return None
    arr = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        errors.append({"field": where, "message": f"non-finite value at index {int(bad[0])}"})
        return None
    return arr


def _named(
    given: dict[str, list[float]], names: list[str], where: str, length: int, errors: list[dict[str, str]]
) -> np.ndarray | None:
    for name in sorted(set(given) - set(names)):
        errors.append({"field": f"{where}.{name}", "message": f"unknown variable; expected {', '.join(names)}"})
    cols = []
    for name in names:
        if name not in given:
            errors.append({"field": f"{where}.{name}", "message": "missing"})
            continue
        cols.append(_array(given[name], f"{where}.{name}", length, errors))
    if len(cols) != len(names) or any(c is None for c in cols):
        return None
    return np.stack(cols, 1)


def decode(req: ForecastRequest, rt: ModelRuntime, settings: Settings) -> DecodedRequest:
    """Check a request against the model card and settings and turn it into arrays; collects every problem."""
    card, errors = rt.card, []
    hist_min, hist_max, step = card["history"]["min"], card["history"]["max"], card["sample_minutes"]
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
    for i, q in enumerate(req.quantiles):
        if not (math.isfinite(q) and 0 < q < 1):
            errors.append({"field": f"quantiles[{i}]", "message": f"{q} is not strictly between 0 and 1"})
    samples = req.samples or (settings.default_samples if req.quantiles else 0)
    if samples > settings.max_samples:
        errors.append({"field": "samples", "message": f"{samples} exceeds the limit {settings.max_samples}"})
    if errors:
        raise ProblemError(422, "Invalid forecast request", errors)

    out = DecodedRequest(horizon=req.horizon, quantiles=sorted(set(req.quantiles)), samples=samples)
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
        x = _named(s.measurements, rt.measurements, f"{where}.measurements", L, errors)
        u = _named(s.controls, rt.controls, f"{where}.controls", L, errors)
        if s.hold_controls and s.future_controls is not None:
            errors.append(
                {"field": f"{where}.future_controls", "message": "give future_controls or hold_controls, not both"}
            )
            continue
        if s.hold_controls:
            uf = None if u is None else np.repeat(u[-1:], H, 0)
        elif s.future_controls is None:
            errors.append({"field": f"{where}.future_controls", "message": "missing (or set hold_controls: true)"})
            continue
        else:
            uf = _named(s.future_controls, rt.controls, f"{where}.future_controls", H, errors)
        if x is None or u is None or uf is None:
            continue
        out.x_hist.append(x)
        out.u_hist.append(u)
        out.u_fut.append(uf)
        out.future_times.append([times[-1] + timedelta(minutes=step * (k + 1)) for k in range(H)])
        out.last_minute.append(minutes_since_monday(times[-1]))  # its own UTC offset: the plant's clock
        out.ids.append(s.id)
    if errors:
        raise ProblemError(422, "Invalid forecast request", errors)
    return out


def run(rt: ModelRuntime, d: DecodedRequest) -> list[Forecast]:
    """One ONNX call per distinct history length (usually exactly one), results in request order."""
    results: list[Forecast | None] = [None] * len(d.x_hist)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(d.x_hist):
        by_length.setdefault(len(x), []).append(i)
    for idx in by_length.values():
        fc = rt.predict(
            np.stack([d.x_hist[i] for i in idx]),
            np.stack([d.u_hist[i] for i in idx]),
            np.stack([d.u_fut[i] for i in idx]),
            np.array([d.last_minute[i] for i in idx]),
            d.samples,
        )
        for j, i in enumerate(idx):
            results[i] = Forecast(fc.mean[j : j + 1], None if fc.samples is None else fc.samples[j : j + 1])
    return [r for r in results if r is not None]


def encode(rt: ModelRuntime, d: DecodedRequest, forecasts: list[Forecast]) -> dict[str, Any]:
    st = rt.card["stability"]
    series = []
    for i, fc in enumerate(forecasts):
        qs: dict[float, np.ndarray] = {}
        if fc.samples is not None and d.quantiles:
            qs = dict(zip(d.quantiles, np.quantile(fc.samples[0], d.quantiles, axis=0), strict=True))
        per_var = {
            name: {
                "mean": fc.mean[0, :, j].tolist(),
                "quantiles": {f"{q:g}": v[:, j].tolist() for q, v in qs.items()},
            }
            for j, name in enumerate(rt.measurements)
        }
        series.append({"id": d.ids[i], "timestamps": d.future_times[i], "forecast": per_var})
    return {
        "model_version": rt.version,
        "stability": {k: st[k] for k in ("spectral_radius", "stability_margin", "stable")},
        "horizon": d.horizon,
        "series": series,
    }
