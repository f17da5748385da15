"""What a card must hold before it is served: the numbers every forecast is computed from, finite and in range.

A card can be well-formed JSON with a matching checksum and still be unservable: a scaler's std of 0 turns
every input of that variable into 0/0 (read as a sensor gap at the mean, as Inf elsewhere), a NaN calibration
or stability figure reaches every answer, a missing bound lets any value in. Such a card is refused at load,
with each problem named, instead of being served and failing every request as a client error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from modelcard.card import CardError, role_items
from modelcard.objective import card_names, objective_problems

LISTED = 5
"""Problems named in the refusal (the count says how many more)."""


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every number (or null) inside ``value``, with its path: nested objects and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from _numbers(item, f"{where}[{k}]")
    elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        yield where, value


def _variables(card: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for role in ("measurements", "controls", "setpoint_inputs"):
        for k, item in enumerate(role_items(card, role)):
            yield f"variables.{role}[{k}] ({item.get('name', '?')})", item


def _variable_problems(card: dict[str, Any]) -> Iterator[str]:
    """Scalers: mean finite, std finite and positive. Bounds (card_version 3 on): both present, finite and
    min < max. Training range, where recorded: finite and min <= max."""
    with_bounds = card.get("card_version", 0) >= 3
    for where, item in _variables(card):
        if not _finite(item.get("mean")):
            yield f"{where}.mean is {item.get('mean')!r}, not a finite number"
        std = item.get("std")
        if not (_finite(std) and std > 0):
            yield f"{where}.std is {std!r}: a scaler's std must be a finite number above 0"
        if with_bounds:
            b = item.get("bounds") or {}
            lo, hi = b.get("min"), b.get("max")
            if not (_finite(lo) and _finite(hi)):
                yield f"{where}.bounds must give a finite min and max (has min {lo!r}, max {hi!r})"
            elif not lo < hi:
                yield f"{where}.bounds: min {lo!r} is not below max {hi!r}"
        if "training_range" in item:
            r = item["training_range"] or {}
            lo, hi = r.get("min"), r.get("max")
            if not (_finite(lo) and _finite(hi) and lo <= hi):
                yield f"{where}.training_range must be finite with min <= max (has min {lo!r}, max {hi!r})"


def _limit_problems(card: dict[str, Any]) -> Iterator[str]:
    """History and horizon limits, the sample spacing, the gap share: the decoder's rules come from these."""
    history = card.get("history", {})
    sizes = {k: history.get(k) for k in ("length", "min", "max")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        yield f"history length, min and max must be positive integers (has {sizes})"
    elif not sizes["min"] <= sizes["length"] <= sizes["max"]:
        yield f"history: min {sizes['min']} <= length {sizes['length']} <= max {sizes['max']} does not hold"
    share = history.get("max_missing_share", 0.0)
    if not (_finite(share) and 0 <= share < 1):
        yield f"history.max_missing_share is {share!r}, not a number in [0, 1)"
    for key in ("max_horizon", "sample_minutes"):
        value = card.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            yield f"{key} is {value!r}, not a positive integer"


# Calibration tables a model may be without (null: no such term; training.calibrate writes them so).
OPTIONAL_TABLES = ("calibration.gap_pull", "calibration.loop_pull")
# An interval width that follows no variable (train.width_driver = "none", or a catalog without disturbances):
# training.interval_width writes its driver and the driver's name as null, and the graph then reads no driver.
OPTIONAL_VALUES = ("calibration.width.driver", "calibration.width.driver_name")


def _calibration_problems(card: dict[str, Any]) -> Iterator[str]:
    """Every number under calibration finite (samples a positive integer, spreads positive); the stability
    figures every answer carries finite."""
    calibration = card.get("calibration")
    if not isinstance(calibration, dict):
        yield "calibration is missing"
        return
    for where, value in _numbers(calibration, "calibration"):
        if value is None and where in (*OPTIONAL_TABLES, *OPTIONAL_VALUES):
            continue
        if not _finite(value):
            yield f"{where} is {value!r}, not a finite number"
    samples = calibration.get("samples", 32)
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples > 0):
        yield f"calibration.samples is {samples!r}, not a positive integer"
    for k, value in enumerate(calibration.get("spread_scale") or []):
        if _finite(value) and value <= 0:
            yield f"calibration.spread_scale[{k}] is {value!r}: a spread must be above 0"
    yield from _pull_problems(card, calibration)
    stability = card.get("stability", {})
    for key in ("spectral_radius", "stability_margin"):
        if not _finite(stability.get(key)):
            yield f"stability.{key} is {stability.get(key)!r}, not a finite number"
    if not isinstance(stability.get("stable"), bool):
        yield f"stability.stable is {stability.get('stable')!r}, not true or false"


def _pull_problems(card: dict[str, Any], calibration: dict[str, Any]) -> Iterator[str]:
    """The pulls towards the last value are weights in [0, 1]; the loops' has a column per loop the card
    declares, and only a model whose loops drive it (model.loop_feedback) takes one: export would otherwise
    apply a table of the wrong width, or none."""
    for name in ("gap_pull", "loop_pull"):
        for where, value in _numbers(calibration.get(name), f"calibration.{name}"):
            if _finite(value) and not 0 <= value <= 1:
                yield f"{where} is {value!r}: a pull must lie in [0, 1]"
    pull = calibration.get("loop_pull")
    if pull is None:
        return
    loops = len(card.get("variables", {}).get("loops", []))
    if not card.get("model", {}).get("loop_feedback"):
        yield "calibration.loop_pull is set, but the model's loops do not drive it (model.loop_feedback is off)"
    elif not (isinstance(pull, list) and pull and all(isinstance(r, list) and len(r) == loops for r in pull)):
        yield f"calibration.loop_pull must be a table of lead times by {loops} loop(s)"


def _objective_problems(card: dict[str, Any]) -> Iterator[str]:
    """The setpoint advice's objective (``optimizer``), where the card has one."""
    if "optimizer" in card:
        _, problems = objective_problems(card["optimizer"], card_names(card))
        yield from (f"{where}: {message}" for where, message in problems)


def card_problems(card: dict[str, Any]) -> list[str]:
    """Everything wrong with a card's numbers, in the order scalers and bounds, limits, calibration, objective."""
    return [*_variable_problems(card), *_limit_problems(card), *_calibration_problems(card), *_objective_problems(card)]


def check_card(card: dict[str, Any], where: str) -> None:
    """Raise CardError naming the first problems (``where``: e.g. the version) if the card cannot be served."""
    problems = card_problems(card)
    if problems:
        more = f" (and {len(problems) - LISTED} more)" if len(problems) > LISTED else ""
        raise CardError(f"{where}: card not servable: {'; '.join(problems[:LISTED])}{more}")
