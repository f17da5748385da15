"""What an answer warns about in its inputs without refusing them: values outside the training range (the forecast
is an extrapolation), a flat line longer than the catalog allows (``max_flat_minutes``: a stuck sensor, as
the historian import calls it, where the import sets it to missing; here the caller decides), and a measurement
missing at the history's end (a sensor down now: its forecast starts from an older value)."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelcard.card import last_observed_step
from service.inputs import Inputs


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
                "kind": "training_range",
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


def flat_warnings(arr: np.ndarray, role: Inputs, where: str, step_minutes: int) -> list[dict[str, Any]]:
    """A warning per variable whose history holds a run of identical values longer than its ``max_flat_minutes``
    (from the run's first sample to its last, as the import measures it; missing samples in between do not end
    it): the longest such run, with its value, length and where it lies."""
    if role.max_flat is None or arr.size == 0:
        return []
    out = []
    for j in np.flatnonzero(role.max_flat > 0):
        idx = np.flatnonzero(np.isfinite(arr[:, j]))
        if len(idx) < 2:
            continue
        values = arr[idx, j]
        change = np.flatnonzero(values[1:] != values[:-1]) + 1
        starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(idx)]]) - 1
        minutes = (idx[ends] - idx[starts]) * step_minutes
        longest = int(np.argmax(minutes))
        if minutes[longest] <= role.max_flat[j]:
            continue
        first, last = int(idx[starts[longest]]), int(idx[ends[longest]])
        name, value, length = role.names[j], float(values[starts[longest]]), float(minutes[longest])
        out.append(
            {
                "kind": "flat",
                "field": f"{where}.{name}",
                "variable": name,
                "message": f"{ends[longest] - starts[longest] + 1} identical values ({value:g} {role.units[j]}) over "
                f"{length:g} minutes, indices {first}..{last}: longer than its max_flat_minutes "
                f"{role.max_flat[j]:g}, a stuck sensor? (answered; send null for values not really measured)",
                "value": value,
                "minutes": length,
                "first_index": first,
                "last_index": last,
                "max_flat_minutes": float(role.max_flat[j]),
            }
        )
    return out


def stale_warnings(arr: np.ndarray, role: Inputs, where: str, step_minutes: int) -> list[dict[str, Any]]:
    """A warning per variable missing at the history's last step(s): how long since its last value, and that
    value. The model starts it from there and leans on it more the older it is (the card's
    ``calibration.gap_pull``), and it is the least sure variable of the answer."""
    out = []
    steps = last_observed_step(arr) if arr.size else np.zeros(0, int)
    for j in np.flatnonzero((steps >= 0) & (steps < len(arr) - 1)):
        last = int(steps[j])
        name, value, minutes = role.names[j], float(arr[last, j]), float((len(arr) - 1 - last) * step_minutes)
        out.append(
            {
                "kind": "stale",
                "field": f"{where}.{name}",
                "variable": name,
                "message": f"not measured for the last {minutes:g} minutes (last value {value:g} {role.units[j]} "
                f"at index {last}): its forecast starts from that value, {minutes:g} minutes older than the others",
                "value": value,
                "minutes": minutes,
                "last_index": last,
            }
        )
    return out
