"""The model's inputs as a request meets them, and named arrays read into the runtime's arrays.

Every check that needs the model's limits reads them from the card: variable names, units, physical bounds (a
value outside them is refused), the training range (a value outside it is answered, with a warning) and how
long a sensor may read one value before it looks stuck (``max_flat_minutes``, a warning too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelcard.card import hold_forward, hold_steps, role_items
from modelcard.runtime import ModelRuntime
from service.problems import Errors

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Inputs:
    """The model's inputs of one role as the decoder checks them: names, what values they may hold
    (physical bounds widened to the training data), units, the training range, the longest flat line each may
    show before it is warned about (0: never checked), and what errors call them."""

    names: list[str]
    limits: tuple[np.ndarray, np.ndarray]
    units: list[str]
    seen: tuple[np.ndarray, np.ndarray] | None
    kind: str = "variable"
    max_flat: np.ndarray | None = None  # minutes per name; None: no card entry says any
    hold: np.ndarray | None = None  # samples a value is carried on over nulls (fill = "hold"); None: none is

    def subset(self, given: dict[str, Any]) -> tuple[list[int], Inputs]:
        """The positions and the Inputs of the names in ``given`` (optional inputs: any subset is sent)."""
        idx = [j for j, n in enumerate(self.names) if n in given]
        names, units = [self.names[j] for j in idx], [self.units[j] for j in idx]
        seen = None if self.seen is None else (self.seen[0][idx], self.seen[1][idx])
        flat = None if self.max_flat is None else self.max_flat[idx]
        hold = None if self.hold is None else self.hold[idx]
        return idx, Inputs(names, (self.limits[0][idx], self.limits[1][idx]), units, seen, self.kind, flat, hold)


def input_limits(
    physical: tuple[np.ndarray, np.ndarray], seen: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """What an input may hold: the physical bounds, widened to any value the model was trained on (a simulator's
    -0.01 g N/m3 of ammonium, like a sensor's zero offset, was data, not a fault)."""
    if seen is None:
        return physical
    return np.minimum(physical[0], seen[0]), np.maximum(physical[1], seen[1])


def max_flat(card: dict[str, Any], role: str) -> np.ndarray | None:
    """Each variable's ``max_flat_minutes`` (the catalog's: longer flat lines are a stuck sensor); None where no
    entry of the role carries one (cards from before it)."""
    items = role_items(card, role)
    if not any(v.get("max_flat_minutes") for v in items):
        return None
    return np.array([float(v.get("max_flat_minutes") or 0.0) for v in items])


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
        card = rt.card
        return cls(
            measurements=Inputs(
                rt.measurements,
                input_limits(rt.x_bounds, rt.x_range),
                x_units,
                rt.x_range,
                max_flat=max_flat(card, "measurements"),
                hold=hold_steps(role_items(card, "measurements"), rt.step_minutes),
            ),
            controls=Inputs(
                rt.controls,
                input_limits(rt.u_bounds, rt.u_range),
                u_units,
                rt.u_range,
                max_flat=max_flat(card, "controls"),
                hold=hold_steps(role_items(card, "controls"), rt.step_minutes),
            ),
            setpoints=Inputs(
                rt.setpoints,
                rt.s_bounds,
                rt.s_units,
                rt.s_range,
                "setpoint input",
                max_flat(card, "setpoint_inputs"),
                hold_steps(role_items(card, "setpoint_inputs"), rt.step_minutes),
            ),
            disturbances=Inputs(  # an influent forecast: the measured influent's bounds and training range
                d_names,
                (rt.x_bounds[0][d], rt.x_bounds[1][d]),
                [x_units[j] for j in d],
                None if rt.x_range is None else (rt.x_range[0][d], rt.x_range[1][d]),
                "disturbance input",
            ),
        )


# ----------------------------------------------------------------------------- names and lengths


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


# ----------------------------------------------------------------------------- values


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
    for j in [] if role.hold is None else np.flatnonzero(role.hold):  # logged only on change: held, as trained
        if not np.isnan(arr[~gap[:, j], j]).any():  # a NaN literal is refused below, never held over
            hold_forward(arr[:, j], int(role.hold[j]))
            gap[:, j] &= np.isnan(arr[:, j])
    # Only null is a gap: a NaN literal (some JSON writers emit it) is refused below as not finite.
    allowed = int(max_missing * length)
    before = len(errors)
    for j in np.flatnonzero(gap.sum(0) > allowed):
        limit = f"at most {allowed} ({100 * max_missing:.0f}%)" if allowed else "none"
        n_gap = int(gap[:, j].sum())
        errors.add(f"{where}.{names[j]}", f"{n_gap} of {length} values missing (null); the model takes {limit}")
    finite = gap | np.isfinite(arr)
    lo, hi = role.limits
    # Beyond float32 the model cannot take it; a bound in the way names the bound (1e39 is above the maximum).
    inside = gap | ((arr >= lo) & (arr <= hi) & (np.abs(arr) <= FLOAT32_MAX))
    if finite.all() and inside.all() and len(errors) == before:
        return arr
    for j in np.flatnonzero(~(finite & inside).all(0)):
        name, col = names[j], arr[:, j]
        if not finite[:, j].all():
            k = int(np.argmin(finite[:, j]))
            errors.add(f"{where}.{name}[{k}]", f"{given[name][k]} is not a finite number")
            continue
        k = int(np.argmin(inside[:, j]))
        if lo[j] <= col[k] <= hi[j]:  # within bounds that do not stop it, but beyond float32
            errors.add(f"{where}.{name}[{k}]", f"{col[k]:g} is beyond the largest number the model takes")
            continue
        side = f"below the physical minimum {lo[j]:g}" if col[k] < lo[j] else f"above the physical maximum {hi[j]:g}"
        n_out = int(np.sum(~inside[:, j]))
        more = f" ({n_out} values outside [{lo[j]:g}, {hi[j]:g}])" if n_out > 1 else ""
        errors.add(f"{where}.{name}[{k}]", f"{col[k]:g} {role.units[j]} is {side}{more}")
    return None


def optional_values(
    given: dict[str, list[float]] | dict[str, list[float | None]] | None,
    role: Inputs,
    where: str,
    length: int,
    errors: Errors,
) -> np.ndarray | None:
    """(length, len(role.names)) from inputs a caller may send, any subset of them (a disturbance forecast,
    loop setpoints, the future controls a loop does not decide), NaN for those not sent and for null values;
    None on error."""
    out = np.full((length, len(role.names)), np.nan)
    if not given:
        return out
    idx, sent = role.subset(given)
    arr = named_values(given, sent, where, errors, 1.0)  # type: ignore[arg-type]
    if arr is None:
        return None
    out[:, idx] = arr
    return out


def gap_counts(arr: np.ndarray, names: list[str]) -> dict[str, int]:
    """Input name -> missing samples, for the inputs with any."""
    counts = np.isnan(arr).sum(0)
    return {names[j]: int(counts[j]) for j in np.flatnonzero(counts)}
