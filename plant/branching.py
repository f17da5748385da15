"""What-if runs of the simulated plant: branch a run at forecast origins, run each plan from the very same state,
then go on as if nothing had happened.

A forecast's answer to "what if I ran more air?" can only be judged against the plant itself under that plan,
from the same state. ``run_with_branches`` saves the plant at each origin (``plant.bsm1.Run.state``), runs every
``Plan`` over the horizon, restores the state, and continues the base run; the base run is bit for bit what it is
without branches (tests/test_bsm1.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from plant import bsm1
from plant.operation import Operation


@dataclass(frozen=True)
class Plan:
    """A what-if from an origin on, over the horizon.

    Open loop (``closed`` false): every loop (and cascade) switched off, each control held at what was applied
    over the last interval before the origin, times ``factors`` (control index -> factor, e.g. KLa_5 x 1.3).
    Closed loop: the loops stay on, each named setpoint shifted by ``shifts`` (setpoint name -> offset, e.g.
    SO_5_setpoint + 0.5), and each control no loop drives scaled by ``factors`` from its schedule (the blowers of
    tanks 3 and 4 turned down while the DO loop runs: what ``POST /optimize`` advises); the rest as scheduled.
    """

    name: str
    closed: bool
    factors: dict[int, float] = field(default_factory=dict)
    shifts: dict[str, float] = field(default_factory=dict)


@dataclass
class Branched:
    """A base run and, per plan, the plant over the horizon after each origin."""

    t: np.ndarray  # (n,) minutes since the run's start, each sample's end
    x: np.ndarray  # (n, measurements) the base run
    u: np.ndarray  # (n, controls) applied
    s: np.ndarray  # (n, loops) each loop's mean setpoint
    origins: list[int]  # per origin, the index of the last sample before it (a forecast's last history sample)
    x_plan: dict[str, np.ndarray]  # plan name -> (origins, horizon, measurements)
    u_plan: dict[str, np.ndarray]  # plan name -> (origins, horizon, controls) applied
    s_plan: dict[str, np.ndarray]  # plan name -> (origins, horizon, loops) each loop's setpoint, NaN: loop off


def run_with_branches(
    op: Operation,
    origins: list[int],
    plans: list[Plan] | Callable[[int], list[Plan]],
    horizon: int,
    sample_minutes: int = 15,
    *,
    stabilize: bool = False,
) -> Branched:
    """Run ``op``'s plant sample by sample; after sample ``k`` of each origin, run every plan for ``horizon``
    samples from the saved state, then restore it and go on. ``origins`` are sample indices (sorted); ``plans``
    is the same list at every origin, or a function of the origin giving each its own (named alike)."""
    run = bsm1.Run(
        op.influent,
        op.controls,
        sample_minutes,
        stabilize=stabilize,
        loops=op.loops,
        cascades=op.cascades,
        caps=op.caps,
        wastage=op.wastage,
    )
    n = run.n_samples
    origins = [k for k in origins if k + horizon < n]
    x, u, s = np.empty((n, bsm1.N_MEASUREMENTS)), np.empty((n, op.controls.shape[1])), np.empty((n, len(run.loops)))
    plans_at = plans if callable(plans) else (lambda _k: plans)
    names = [p.name for p in plans_at(origins[0])] if origins else []
    x_plan = {name: np.empty((len(origins), horizon, x.shape[1])) for name in names}
    u_plan = {name: np.empty((len(origins), horizon, u.shape[1])) for name in names}
    s_plan = {name: np.full((len(origins), horizon, s.shape[1]), np.nan) for name in names}
    at = {k: i for i, k in enumerate(origins)}
    for k in range(n):
        x[k], u[k], s[k] = run.advance()
        if k in at:
            saved = run.state()
            for plan in plans_at(k):
                with branch(run, plan, u[k], horizon):
                    for h in range(horizon):
                        x_plan[plan.name][at[k], h], u_plan[plan.name][at[k], h], sp = run.advance()
                        if len(sp) == s.shape[1]:  # an open-loop plan switched the loops off: none logged
                            s_plan[plan.name][at[k], h] = sp
                run.restore(saved)
    t = np.arange(1, n + 1) * sample_minutes
    return Branched(t, x, u, s, origins, x_plan, u_plan, s_plan)


def deliverable(run: bsm1.Run, planned: np.ndarray, span: slice) -> np.ndarray:
    """What the blowers and the pump can deliver of a planned schedule over ``span``: their limits, and any
    episode's caps (a blower failure)."""
    planned = bsm1.clipped_controls(planned)
    return planned if run.caps is None else np.fmin(planned, run.caps[span])


@contextmanager
def branch(run: bsm1.Run, plan: Plan, last_u: np.ndarray, horizon: int) -> Iterator[None]:
    """``run`` switched to ``plan`` from its current minute over ``horizon`` samples, on copies of its schedule
    and setpoints, so that afterwards the run's own are untouched (its plant state is the caller's to restore)."""
    span = slice(run.minute, run.minute + horizon * run.sample_minutes)
    saved = (run.controls, run.loops, run.cascades, [loop.setpoint for loop in run.loops])
    run.controls = run.controls.copy()
    try:
        if not plan.closed:
            held = last_u.copy()
            for j, factor in plan.factors.items():
                held[j] *= factor
            run.controls[span] = deliverable(run, held, span)
            run.loops, run.cascades = [], []
        else:
            driven = {loop.control for loop in run.loops}
            if plan.factors:
                scaled = run.controls[span].copy()
                for j, factor in plan.factors.items():
                    if j in driven:
                        raise ValueError(f"plan {plan.name!r}: control {j} is driven by a loop; shift its setpoint")
                    scaled[:, j] *= factor
                run.controls[span] = deliverable(run, scaled, span)  # every factor applied, then one clip
            for loop in run.loops:
                loop.setpoint = loop.setpoint.copy()
                loop.setpoint[span] += plan.shifts.get(loop.name, 0.0)
            # A cascade would overwrite the shifted DO setpoint: a setpoint plan is the operator's, so it is off.
            run.cascades = [c for c in run.cascades if c.inner.name not in plan.shifts]
        yield
    finally:
        run.controls, run.loops, run.cascades, setpoints = saved
        for loop, setpoint in zip(run.loops, setpoints, strict=True):
            loop.setpoint = setpoint
