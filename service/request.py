"""The /forecast request as it arrives (pydantic models, strict) and as the runtime takes it (arrays).

``service.decode`` turns the one into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, FailFast, Field

from service.encode import SeriesFacts

ISO_8601 = r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]\d\d(:?\d\d)?)?$"
TIME_EXAMPLE = "2026-03-01T00:15:00+01:00"

# Strict: "20" is no integer and true or "1.5" no number. FailFast: a list stops at its first bad item, so a
# million bad values make one error, not a million.
STRICT = ConfigDict(extra="forbid", strict=True)


class _FailFast(FailFast):
    """pydantic's FailFast, made hashable: typing hashes the parts of an ``X | None``, and FailFast is not."""

    __hash__ = object.__hash__


FAIL_FAST = _FailFast()
Values = Annotated[list[float | None], FAIL_FAST]
Plan = Annotated[list[float], FAIL_FAST]
Timestamp = Annotated[str, Field(pattern=ISO_8601, json_schema_extra={"format": "date-time"})]


class PlanIn(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=128, description="the plan's label, unique within the series")
    future_controls: dict[str, Plan] = Field(
        description="planned control per future step (horizon values each); a looped control may be left out, as "
        "in a series' future_controls, when its setpoint is sent (this plan's future_setpoints, or the series')"
    )
    future_setpoints: dict[str, Plan] | None = Field(
        None,
        description="optional: this plan's own setpoints over the horizon (a setpoint plan: e.g. DO 1.5, 2.0 or "
        "2.5 with KLa_5 left to its loop, answered with the air each needs); not also in the series' "
        "future_setpoints. Every plan of a series gives the same variables",
    )


class SeriesIn(BaseModel):
    model_config = STRICT

    id: str | None = Field(None, max_length=128, description="caller's label, echoed back")
    timestamps: Annotated[list[Timestamp], FAIL_FAST] = Field(
        min_length=1,
        description="history sample times, oldest first, at the model's spacing, in the plant's local time "
        f"as ISO 8601 (e.g. {TIME_EXAMPLE}, with its UTC offset): the time of day and week are model inputs. A "
        "time without offset is the plant's local time in the model's time zone (GET /model: catalog.timezone; "
        "UTC for cards without one), an hour the autumn change repeats placed by its neighbours' order; the "
        "answer's times then carry the zone's offsets. Numbers are not read as times. GET /model gives the "
        "history limits (history.min, history.max); the served schema states them too",
    )
    measurements: dict[str, Values] = Field(
        description="one array per measured variable (catalog names); null marks a missing sample (a sensor gap), "
        "up to the model's limit (GET /model: history.max_missing_share per variable)"
    )
    controls: dict[str, Values] = Field(
        description="one array per control over the history; null marks a missing sample, as for measurements"
    )
    future_controls: dict[str, Plan] | None = Field(
        None,
        description="planned control per future step (horizon values each); omit with hold_controls. A control "
        "a feedback loop drives (GET /model: closed_loops) may be left out when its setpoint's plan "
        "(future_setpoints) or history (setpoints, then held) is sent: its loop decides it, and the answer "
        "forecasts it too (the air or recycle the plan will need)",
    )
    hold_controls: bool = Field(
        False,
        description="hold the last history control values over the horizon; with a model with loops, each looped "
        "control whose setpoint is sent (setpoints or future_setpoints) is left to its loop instead, and forecast",
    )
    future_disturbances: dict[str, Plan] | None = Field(
        None,
        description="optional forecast of disturbance variables (the influent: GET /model, "
        "variables.disturbance_inputs) over the horizon, horizon values each, e.g. from a sewer model or rain "
        "radar; any subset of them. Without it the model forecasts the influent itself",
    )
    setpoints: dict[str, Values] | None = Field(
        None,
        description="optional: the feedback loops' setpoints over the history (GET /model, "
        "variables.setpoint_inputs; e.g. the DO setpoint the KLa loop held), history values each, null where not "
        "logged; any subset of them",
    )
    future_setpoints: dict[str, Plan] | None = Field(
        None,
        description="optional: the planned setpoints over the horizon, horizon values each; any subset. Under "
        "feedback control the setpoint decides the controlled variable (the DO, the anoxic nitrate), so a plan "
        "that knows them forecasts those far better. Without them the model forecasts from the controls alone",
    )
    plans: Annotated[list[PlanIn], FAIL_FAST] | None = Field(
        None,
        description="instead of future_controls or hold_controls: candidate control plans for this one history "
        "(e.g. an MPC's or an operator's options), or setpoint plans (each its future_setpoints, the looped "
        "controls left out); the history is encoded once and each plan rolled out. The series then answers with "
        "plans in the same order",
    )
    plan_forecasts: bool = Field(
        True,
        description="with plans, false: each plan answers its summary only, no forecast (1,000 plans of 96 steps: "
        "about 2 MB instead of 32 MB); ask again with the chosen plan for its forecast",
    )


class ForecastRequest(BaseModel):
    model_config = STRICT

    series: Annotated[list[SeriesIn], FAIL_FAST] = Field(
        min_length=1, description="one or more plant series, run as one batch"
    )
    horizon: int = Field(ge=1, description="forecast steps; at most the model's max_horizon")
    quantiles: Annotated[list[float], FAIL_FAST] = Field(
        default_factory=list, description="e.g. [0.1, 0.5, 0.9]; empty: mean only"
    )
    samples: int | None = Field(
        None,
        ge=1,
        description="forecast samples drawn for the quantiles (used only when quantiles are asked for); omitted: "
        "the count the model's intervals were fitted for (GET /model: calibration.samples)",
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed of the sample draws: the same request and seed give the same answer"
    )


@dataclass
class DecodedRequest:
    x_hist: list[np.ndarray] = field(default_factory=list)  # per series (L_i, n_x)
    u_hist: list[np.ndarray] = field(default_factory=list)
    u_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_u), or (plans, H, n_u) with plans
    last_minute: list[float] = field(default_factory=list)  # each series' last history time, minutes since Monday
    d_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_d) disturbance forecast, NaN: none
    s_hist: list[np.ndarray] = field(default_factory=list)  # per series (L, n_s) loop setpoints, NaN: not sent
    s_fut: list[np.ndarray] = field(default_factory=list)  # per series (H, n_s), or (plans, H, n_s) with plans
    facts: list[SeriesFacts] = field(default_factory=list)  # per series: what its answer echoes
    horizon: int = 0
    quantiles: list[float] = field(default_factory=list)
    samples: int = 0  # 0 when no quantiles are asked for: samples are drawn only to give quantiles
    seed: int | None = None
    work: int = 0  # series x samples x horizon, what KOVAE_MAX_WORK bounds (service.decode); lanes: forecasting.steps
    answer_bytes: int = 0  # the answer's predicted size (service.encode.answer_bytes): what it holds in memory
