"""What a forecast is told: the requests a plant can send, and the diagnostic ones, built from held-out windows.

A plant under feedback control knows its setpoints, never the future output of its loops (the air, the recycle):
the loop decides those from a load nobody has seen yet. So the honest request leaves a looped control's future to
its loop and sends the setpoint's plan (or holds it, where the plant cannot know it); open-loop controls are
planned. Forecasts told the true future of every control are a diagnostic, never a headline. Training's
evaluation, the promotion gate and ``bench/accuracy.py`` all build their requests here (numpy only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from modelcard.card import last_observed
from plant.catalog import Catalog
from plant.operation import HONEST_HELD
from training.data import Windows

REQUESTS = {
    "honest": "what the plant can send: looped controls left to their loops, setpoints planned (held where the "
    "plant cannot know them), open-loop controls planned",
    "held": "as honest, every setpoint held at its last value",
    "applied": "diagnostic: every control's true future as applied (a loop's future output, which no plant has), "
    "setpoints planned",
    "bare": "diagnostic: every control's true future, no setpoints",
}


def held_setpoints(catalog: Catalog) -> dict[str, tuple[int, ...]]:
    """Policy -> the positions of the setpoints an honest request holds: the simulated cascade's DO setpoint
    (``plant.operation.HONEST_HELD``), and in a plant's own data (policy "historian") those its catalog says a
    controller decides (``planned = false``). Every setpoint of an import was sent as planned, a cascade's too."""
    policies = {**HONEST_HELD, "historian": catalog.unplanned_setpoints}
    return {
        name: tuple(catalog.setpoint_names.index(n) for n in held if n in catalog.setpoint_names)
        for name, held in policies.items()
    }


def closed_loops(w: Windows, loop_setpoints: Sequence[int]) -> np.ndarray:
    """(N, loops) bool: each loop closed over each window (its setpoint logged in the history). Logged at the
    history's end only, a plant's setpoint log with a gap there opened the loop, and the honest request then
    sent the loop's true future output. (A simulated plant logs a closed loop's setpoint at every step, an
    open-loop one's never.)"""
    if not len(loop_setpoints):
        return np.zeros((len(w.x_hist), 0), bool)
    return np.isfinite(w.s_hist[:, :, list(loop_setpoints)]).any(1)


def held_where_closed(w: Windows, controls: Sequence[int], setpoints: Sequence[int]) -> np.ndarray:
    """u_fut in engineering units with each looped control (``controls``, positions among the controls) held at
    its last value where its loop was closed (``setpoints``: its setpoint's position in the windows' setpoint
    log): the honest request to a model that reads no setpoints. It cannot leave a control to its loop, and the
    plant never knows the loop's future output; sent the true one, such a model was scored on what no caller
    has."""
    u_fut = w.u_fut.copy()
    if not len(setpoints) or w.s_hist.shape[-1] == 0:
        return u_fut
    closed, last = closed_loops(w, setpoints), last_observed(w.u_hist)
    for j, c in enumerate(controls):
        u_fut[closed[:, j], :, c] = last[closed[:, j], None, c]
    return u_fut


def request_arrays(
    w: Windows,
    request: str,
    looped: Sequence[int],
    loop_setpoints: Sequence[int],
    held: Mapping[str, Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(u_fut, s_hist, s_fut) in engineering units as ``request`` (``REQUESTS``) tells a forecast of the windows:
    u_fut NaN where a looped control is left to its loop (where the loop is closed), the setpoints NaN where not
    sent (None: none at all). ``held``: per scenario id, the setpoint positions an honest request holds."""
    if request not in REQUESTS:
        raise ValueError(f"request {request!r} is not one of {tuple(REQUESTS)}")
    if request == "bare" or w.s_hist.shape[-1] == 0:
        return w.u_fut, None, None
    if request == "applied":
        return w.u_fut, w.s_hist, w.s_fut
    u_fut, s_fut = w.u_fut.copy(), w.s_fut.copy()
    last = np.repeat(last_observed(w.s_hist)[:, None], s_fut.shape[1], 1)
    closed = closed_loops(w, loop_setpoints)
    held = held or {}
    for j, (c, sp) in enumerate(zip(looped, loop_setpoints, strict=True)):
        u_fut[closed[:, j], :, c] = np.nan
        if request == "held":
            s_fut[closed[:, j], :, sp] = last[closed[:, j], :, sp]
    # The setpoints the plant cannot plan (its policy's, or its catalog's ``planned = false``), a loop's or not:
    # held at the last logged value, nothing where none was logged. (Held only where its loop was closed, one
    # of no loop, or one the history never logged, sent its true future.)
    hold = np.zeros(s_fut.shape[::2], bool)  # (N, setpoints)
    for sid in np.unique(w.scenario):
        hold[np.ix_(w.scenario == sid, list(held.get(str(sid), ())))] = True
    s_fut = np.where(hold[:, None, :], last, s_fut)
    return u_fut, w.s_hist, s_fut
