"""Closed loops in a request: which controls it leaves to their loops, and the setpoints that then drive them.

A plant under feedback control cannot send a looped control's future (the DO loop decides the air from a load
nobody has seen yet); it knows its setpoints. So a request may leave a looped control (GET /model:
``closed_loops``) out of ``future_controls``, or out of a plan's, when it sends that loop's setpoint plan
(``future_setpoints``, the series' or the plan's) or the setpoint's history (``setpoints``, then held at its
last value over the horizon). The model was trained on such requests; it then forecasts the control too, and the
answer carries it after the measurements. ``hold_controls`` holds the open-loop controls and leaves each looped
control whose setpoint is sent to its loop. Leaving out an open-loop control, or a looped one without its
setpoint, is refused naming both. A model without loops takes every control's plan, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelcard.card import last_observed
from modelcard.runtime import ModelRuntime
from service.inputs import Inputs
from service.problems import Errors
from service.request import PlanIn, SeriesIn


@dataclass(frozen=True)
class Loop:
    """One feedback loop of the card: the control it drives from its setpoint, holding its measurement."""

    control: str
    setpoint: str
    measurement: str
    control_pos: int  # among the card's controls
    setpoint_pos: int  # among the card's setpoint inputs
    output: int  # among the runtime's outputs (after the measurements, in the card's loop order)


def model_loops(rt: ModelRuntime) -> list[Loop]:
    n_x = len(rt.measurements)
    return [
        Loop(
            loop["control"],
            loop["setpoint"],
            loop.get("measurement", ""),
            rt.controls.index(loop["control"]),
            rt.setpoints.index(loop["setpoint"]),
            n_x + k,
        )
        for k, loop in enumerate(rt.loops)
    ]


def setpoint_sources(s: SeriesIn, plan: PlanIn | None = None) -> set[str]:
    """The setpoints a series (and one of its plans) sends by name, history or plan."""
    named = set(s.setpoints or {}) | set(s.future_setpoints or {})
    return named | set(plan.future_setpoints or {}) if plan is not None else named


# ----------------------------------------------------------------------------- names (the size rules)


def check_future_controls(
    given: dict[str, list[float]],
    controls: Inputs,
    loops: list[Loop],
    setpoints_sent: set[str],
    where: str,
    H: int,
    errors: Errors,
) -> None:
    """A series' or a plan's future_controls: every open-loop control's plan, and each looped one's unless it is
    left to its loop (its setpoint sent); ``H`` values each; no other name."""
    by_control = {loop.control: loop for loop in loops}
    for name in sorted(set(given) - set(controls.names)):
        errors.add(f"{where}.{name}", f"unknown variable; expected {', '.join(controls.names)}")
    for name in controls.names:
        loop = by_control.get(name)
        if name in given:
            if len(given[name]) != H:
                errors.add(f"{where}.{name}", f"has {len(given[name])} values, expected {H}")
        elif loop is not None and loop.setpoint not in setpoints_sent:
            errors.add(
                f"{where}.{name}",
                f"missing: {name} may be left to its loop only with its setpoint's plan "
                f"(future_setpoints.{loop.setpoint}) or history (setpoints.{loop.setpoint})",
            )
        elif loop is None:
            looped = ", ".join(by_control)
            errors.add(
                f"{where}.{name}",
                f"missing: no loop drives {name}, so its plan is needed (only {looped} may be left to their loops)"
                if loops
                else "missing",
            )


def plan_variables(p: PlanIn) -> tuple[list[str], list[str]]:
    return sorted(p.future_controls), sorted(p.future_setpoints or {})


def check_plans_alike(plans: list[PlanIn], where: str, errors: Errors) -> bool:
    """Every plan of a series gives the same variables (controls and setpoints) as its first: one model call
    shares the looped controls' flags. False after naming the first plan that does not."""
    first = plan_variables(plans[0])
    for k, p in enumerate(plans[1:], 1):
        if plan_variables(p) != first:
            controls, setpoints = plan_variables(p)
            errors.add(
                f"{where}[{k}]",
                f"gives other variables than plans[0] (future_controls {', '.join(controls) or 'none'}; "
                f"future_setpoints {', '.join(setpoints) or 'none'} against {', '.join(first[0]) or 'none'}; "
                f"{', '.join(first[1]) or 'none'}): every plan of a series gives the same variables",
            )
            return False
    return True


def check_plan_setpoints(p: PlanIn, s: SeriesIn, where: str, errors: Errors) -> None:
    """A plan's setpoints may not be the series' future_setpoints too (which one would count?)."""
    for name in sorted(set(p.future_setpoints or {}) & set(s.future_setpoints or {})):
        errors.add(
            f"{where}.future_setpoints.{name}",
            "also in the series' future_setpoints: give a setpoint's plan once, per plan or for the series",
        )


def answered_loops(s: SeriesIn, loops: list[Loop]) -> list[Loop]:
    """The loops a series (its names checked) leaves its control to, by the names it sends: the loops whose
    control it forecasts. With hold_controls, those whose setpoint is named (at most: one whose history holds
    no value keeps its control held, ``decide``)."""
    if s.hold_controls:
        sent = setpoint_sources(s)
        return [loop for loop in loops if loop.setpoint in sent]
    given = s.plans[0].future_controls if s.plans else (s.future_controls or {})
    return [loop for loop in loops if loop.control not in given]


# ----------------------------------------------------------------------------- values


def decide(
    s: SeriesIn,
    where: str,
    loops: list[Loop],
    u_fut: np.ndarray,
    s_hist: np.ndarray,
    s_fut: np.ndarray,
    errors: Errors,
) -> tuple[np.ndarray, list[Loop]] | None:
    """Leave the looped controls to their loops: NaN in ``u_fut`` ((H, n_u), or (P, H, n_u) for plans), and each
    such loop's setpoint over the horizon in ``s_fut`` (same leading shape: as planned, else its history's last
    value held). Returns (s_fut, the loops left) or None, a left-out control's setpoint having no value at all."""
    last = last_observed(s_hist)
    left, s_fut, failed = [], s_fut.copy(), False
    given = s.plans[0].future_controls if s.plans else (s.future_controls or {})
    planned = set(s.future_setpoints or {}) | (set(s.plans[0].future_setpoints or {}) if s.plans else set())
    for loop in loops:
        held = np.isfinite(last[loop.setpoint_pos])
        if s.hold_controls:
            if loop.setpoint not in planned and not held:
                continue  # no setpoint to drive it: the control is held, as without loops
        elif loop.control in given:
            continue
        if loop.setpoint not in planned:
            if not held:
                field = f"{where}.plans[0].future_controls" if s.plans else f"{where}.future_controls"
                errors.add(
                    f"{field}.{loop.control}",
                    f"left to its loop, but setpoints.{loop.setpoint} holds no value to hold over the horizon: "
                    f"send future_setpoints.{loop.setpoint} or {loop.control}'s plan",
                )
                failed = True
                continue
            s_fut[..., loop.setpoint_pos] = last[loop.setpoint_pos]
        u_fut[..., loop.control_pos] = np.nan
        left.append(loop)
    return None if failed else (s_fut, left)
