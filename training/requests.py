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
from training.data import Windows

REQUESTS = {
    "honest": "what the plant can send: looped controls left to their loops, setpoints planned (held where the "
    "plant cannot know them), open-loop controls planned",
    "held": "as honest, every setpoint held at its last value",
    "applied": "diagnostic: every control's true future as applied (a loop's future output, which no plant has), "
    "setpoints planned",
    "bare": "diagnostic: every control's true future, no setpoints",
}


def closed_loops(w: Windows, loop_setpoints: Sequence[int]) -> np.ndarray:
    """(N, loops) bool: each loop closed over each window (its setpoint logged at the history's end)."""
    if not len(loop_setpoints):
        return np.zeros((len(w.x_hist), 0), bool)
    return np.isfinite(w.s_hist[:, -1, list(loop_setpoints)])


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
        hold = closed[:, j] & np.array([request == "held" or sp in held.get(str(s), ()) for s in w.scenario])
        s_fut[hold, :, sp] = last[hold, :, sp]
    return u_fut, w.s_hist, s_fut
