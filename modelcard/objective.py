"""What setpoint advice (POST /optimize) minimises, and under which limits: a plant's energy formula, its
effluent limits on forecast quantiles, and the bounds of what a plan may move.

Written once: a catalog's ``[optimizer]`` table (``plant.catalog``) goes into the model card at training time
(``training.publish``); the service reads it from the card, and a request may replace any part of it. Every
problem is reported with the field it is in, so a catalog, a card and a request are refused alike.

Energy is linear in the controls, as BSM1's formulas are: power (kW) = constant + sum over controls of a
coefficient (kW per unit) x the control. A looped control's value is its forecast (the air the DO loop will
need under the plan); an open-loop control's is the plan's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from modelcard.card import loops, role_items

ENERGY_GROUPS = ("aeration_kw", "pumping_kw")
# kWh per unit above a limit and hour: a day's aeration (~3,800 kWh on BSM1) can outbid it, so the search's answer is
# checked on its own samples and backed off towards holding where it breaks a limit holding meets
DEFAULT_PRICE = 1000.0
LIMIT_KEYS = {"variable", "quantile", "max", "price_kwh", "hour_price_kwh"}
KEYS = {"block_minutes", "control_minutes", "setpoints", "controls", "limits", *ENERGY_GROUPS, "constant_kw"}
KEYS |= {"price_per_kwh", "move_kwh"}
MAX_PLAN_MINUTES = 7 * 24 * 60  # a block or a plan's span: a week is past any model's horizon


@dataclass(frozen=True)
class EffluentLimit:
    """The ``quantile`` of ``variable``'s forecast should stay at or below ``max`` at every step; each unit above
    it for an hour costs ``price_kwh`` (kWh): the energy a plan may spend to bring it one unit lower where no plan
    meets it (a high price: a hard limit)."""

    variable: str
    quantile: float
    max: float
    price_kwh: float = DEFAULT_PRICE
    hour_price_kwh: float = 0.0  # kWh per expected hour above the limit (the share of samples above it)


@dataclass(frozen=True)
class Objective:
    block_minutes: int  # a plan holds each value this long (piecewise constant)
    # The plan decides blocks over this span and holds its last values after it, to the horizon's end (None: the
    # whole horizon): aeration cut in the last hours would show its cost only after the horizon.
    control_minutes: int | None
    setpoints: dict[str, tuple[float, float]]  # the loops' setpoints a plan decides, with their bounds
    controls: dict[str, tuple[float, float]]  # the open-loop controls a plan decides (e.g. a blower's output)
    limits: tuple[EffluentLimit, ...]
    aeration_kw: dict[str, float]  # kW per unit of each control (KLa 1/d)
    pumping_kw: dict[str, float]  # kW per unit of each control (m3/d)
    constant_kw: float = 0.0  # power no plan moves (BSM1: the return sludge and wastage pumps)
    price_per_kwh: float | None = None  # reports the plans' cost too, where given
    # What a move costs, in kWh per whole bound's width, from block to block and from where it is now: a plan
    # that flips a setpoint every hour for a few kWh is no plan an operator follows (0: moves are free).
    move_kwh: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "block_minutes": self.block_minutes,
            **({"control_minutes": self.control_minutes} if self.control_minutes is not None else {}),
            "setpoints": {k: list(v) for k, v in self.setpoints.items()},
            "controls": {k: list(v) for k, v in self.controls.items()},
            "limits": [
                {
                    "variable": m.variable,
                    "quantile": m.quantile,
                    "max": m.max,
                    "price_kwh": m.price_kwh,
                    **({"hour_price_kwh": m.hour_price_kwh} if m.hour_price_kwh else {}),
                }
                for m in self.limits
            ],
            "aeration_kw": dict(self.aeration_kw),
            "pumping_kw": dict(self.pumping_kw),
            "constant_kw": self.constant_kw,
        }
        if self.price_per_kwh is not None:
            out["price_per_kwh"] = self.price_per_kwh
        if self.move_kwh:
            out["move_kwh"] = self.move_kwh
        return out


@dataclass(frozen=True)
class PlantNames:
    """The variables an objective may name, and what each may be used for."""

    measurements: tuple[str, ...]
    controls: tuple[str, ...]
    setpoints: tuple[str, ...]  # the setpoints of the plant's loops
    looped: tuple[str, ...]  # the controls the loops drive
    sample_minutes: int


Problems = list[tuple[str, str]]  # (field, message)


def looped_controls_of(setpoints: Any, card_loops: list[dict[str, str]]) -> set[str]:
    """The controls whose loops' setpoints a plan decides (``setpoints``: their names): their future is the
    loops', never a request's."""
    return {loop["control"] for loop in card_loops if loop["setpoint"] in setpoints}


MAX_MAGNITUDE = 1e9
"""No coefficient, price, bound or limit is larger: beyond it, a sum over a day's steps could leave the floats."""


def _number(value: Any) -> bool:
    """A real number (not a bool), finite and at most ``MAX_MAGNITUDE`` in size."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and abs(value) <= MAX_MAGNITUDE
    )


def _bounds(given: Any, where: str, allowed: tuple[str, ...], what: str, problems: Problems) -> dict:
    """``{name: [lo, hi]}`` over names of ``allowed``."""
    if not isinstance(given, dict):
        problems.append((where, f"expected a table of {what} names to [min, max]"))
        return {}
    out = {}
    for name, pair in given.items():
        if name not in allowed:
            problems.append((f"{where}.{name}", f"not one of the {what}s this plant can plan: {', '.join(allowed)}"))
        elif not (isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair) and pair[0] < pair[1]):
            problems.append((f"{where}.{name}", "expected [min, max], two finite numbers, min below max"))
        else:
            out[name] = (float(pair[0]), float(pair[1]))
    return out


def _limits(given: Any, where: str, names: PlantNames, problems: Problems) -> tuple[EffluentLimit, ...]:
    if not isinstance(given, list):
        problems.append((where, "expected a list of {variable, quantile, max}"))
        return ()
    out = []
    for i, entry in enumerate(given):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or not {"variable", "quantile", "max"} <= set(entry) <= LIMIT_KEYS:
            problems.append((at, "expected variable, quantile, max and optionally price_kwh, hour_price_kwh"))
            continue
        before = len(problems)
        if entry["variable"] not in names.measurements:
            problems.append((f"{at}.variable", f"{str(entry['variable'])[:60]!r} is not a measurement of the plant"))
        if not (_number(entry["quantile"]) and 0 < entry["quantile"] < 1):
            problems.append((f"{at}.quantile", "expected a number between 0 and 1 (e.g. 0.9)"))
        if not _number(entry["max"]):
            problems.append((f"{at}.max", f"expected a finite number, at most {MAX_MAGNITUDE:g} in size"))
        price, hours = entry.get("price_kwh", DEFAULT_PRICE), entry.get("hour_price_kwh", 0.0)
        for key, value in (("price_kwh", price), ("hour_price_kwh", hours)):
            if not (_number(value) and value >= 0):
                problems.append((f"{at}.{key}", f"expected a number from 0 to {MAX_MAGNITUDE:g} (kWh)"))
        if len(problems) == before:
            limit = EffluentLimit(entry["variable"], float(entry["quantile"]), float(entry["max"]), float(price))
            out.append(replace(limit, hour_price_kwh=float(hours)))
    return tuple(out)


def _coefficients(given: Any, where: str, names: PlantNames, problems: Problems) -> dict[str, float]:
    if not isinstance(given, dict):
        problems.append((where, "expected a table of control names to kW per unit"))
        return {}
    out = {}
    for name, value in given.items():
        if name not in names.controls:
            problems.append((f"{where}.{name}", f"not a control of the plant: {', '.join(names.controls)}"))
        elif not (_number(value) and value >= 0):
            problems.append(
                (f"{where}.{name}", f"expected a number from 0 to {MAX_MAGNITUDE:g} (kW per unit of the control)")
            )
        else:
            out[name] = float(value)
    return out


def _minutes(value: Any) -> bool:
    """A whole number of minutes from 1 to MAX_PLAN_MINUTES (an unbounded one overflowed the search's arrays)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PLAN_MINUTES


def objective_problems(data: dict[str, Any], names: PlantNames, where: str = "optimizer") -> tuple[Objective, Problems]:
    """An objective from a table (catalog, card or a request's complete objective) and every problem in it."""
    problems: Problems = []
    if not isinstance(data, dict):
        return objective_problems({}, names, where)[0], [(where, "expected a table (JSON object)")]
    for key in sorted(set(data) - KEYS):
        problems.append((f"{where}.{key}", f"unknown key; known: {', '.join(sorted(KEYS))}"))
    block = data.get("block_minutes", 60)
    if not _minutes(block) or block % names.sample_minutes:
        msg = f"expected a positive multiple of {names.sample_minutes} minutes, at most {MAX_PLAN_MINUTES}"
        problems.append((f"{where}.block_minutes", msg))
        block = names.sample_minutes
    control = data.get("control_minutes")
    if control is not None and not _minutes(control):
        msg = f"{control!r} is not a whole number of minutes from 1 to {MAX_PLAN_MINUTES}"
        problems.append((f"{where}.control_minutes", msg))
        control = None
    elif control is not None and control < block:
        msg = f"{control} minutes is shorter than block_minutes ({block}): the plan decides at least one block"
        problems.append((f"{where}.control_minutes", msg))
        control = None
    open_loop = tuple(c for c in names.controls if c not in names.looped)
    setpoints = _bounds(data.get("setpoints", {}), f"{where}.setpoints", names.setpoints, "setpoint", problems)
    controls = _bounds(data.get("controls", {}), f"{where}.controls", open_loop, "open-loop control", problems)
    if not setpoints and not controls and not any(p[0].startswith(f"{where}.setpoints") for p in problems):
        problems.append((f"{where}.setpoints", "a plan must decide at least one setpoint or control"))
    limits = _limits(data.get("limits", []), f"{where}.limits", names, problems)
    groups = {g: _coefficients(data.get(g, {}), f"{where}.{g}", names, problems) for g in ENERGY_GROUPS}
    if not any(groups.values()):
        problems.append((f"{where}.aeration_kw", "no energy coefficient: there is nothing to minimise"))
    constant, price, move = data.get("constant_kw", 0.0), data.get("price_per_kwh"), data.get("move_kwh", 0.0)
    if not (_number(move) and move >= 0):
        problems.append(
            (f"{where}.move_kwh", f"expected a number from 0 to {MAX_MAGNITUDE:g} (kWh per whole bound's width moved)")
        )
        move = 0.0
    if not (_number(constant) and constant >= 0):
        problems.append((f"{where}.constant_kw", f"expected a number from 0 to {MAX_MAGNITUDE:g}"))
        constant = 0.0
    if price is not None and not (_number(price) and price >= 0):
        problems.append((f"{where}.price_per_kwh", f"expected a number from 0 to {MAX_MAGNITUDE:g}"))
        price = None
    objective = Objective(
        block,
        control,
        setpoints,
        controls,
        limits,
        groups["aeration_kw"],
        groups["pumping_kw"],
        float(constant),
        None if price is None else float(price),
        float(move),
    )
    return objective, problems


def objective_from_dict(data: dict[str, Any], names: PlantNames, where: str = "optimizer") -> Objective:
    """As ``objective_problems``, raising ValueError with every problem."""
    objective, problems = objective_problems(data, names, where)
    if problems:
        raise ValueError("; ".join(f"{f}: {m}" for f, m in problems))
    return objective


def card_names(card: dict[str, Any]) -> PlantNames:
    """What an objective of the card's plant may name."""
    var = card["variables"]
    plant_loops = loops(card)
    return PlantNames(
        measurements=tuple(v["name"] for v in var["measurements"]),
        controls=tuple(v["name"] for v in var["controls"]),
        setpoints=tuple(loop["setpoint"] for loop in plant_loops),
        looped=tuple(loop["control"] for loop in plant_loops),
        sample_minutes=int(card["sample_minutes"]),
    )


def trained_ranges(variables: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(min, max) each control and setpoint took in training, from a card's ``variables`` (cards before
    card_version 3: none): what a plan may move within."""
    return {
        v["name"]: (float(v["training_range"]["min"]), float(v["training_range"]["max"]))
        for role in ("controls", "setpoint_inputs")
        for v in role_items({"variables": variables}, role)
        if "training_range" in v
    }


def card_objective(card: dict[str, Any]) -> Objective | None:
    """The card's objective (``optimizer``); None for cards without one (no setpoint advice)."""
    if "optimizer" not in card:
        return None
    return objective_from_dict(card["optimizer"], card_names(card))
