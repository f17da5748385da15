"""BSM1 simulation with bsm2-python 0.0.16, open loop or under our own PI loops, with its defects handled.

Defects of bsm2-python 0.0.16 this module works around (each has a test in tests/test_bsm1.py):

1. ``raininfluent.csv`` gives Q in 1000 m3/d (the dry file gives m3/d) and has malformed flow values such as
   ``30.044.50``. ``plant.influent.load_influent`` repairs them explicitly (and says so), or refuses.
2. The recycle streams mixed into reactor 1 are those of the previous step, so after a change of ``qintr``
   the lagged stream still carries the old flow and effluent flow can go negative. :class:`Plant` sets the
   lagged streams' flows at start-up (internal recycle and return sludge) and whenever it changes the recycle.
3. With ``timestep`` given, ``simtime`` has one more entry than ``timesteps``: we loop over ``timesteps``.
4. The PID class never integrates (proportional only) and carbon dosing into tank 2+ overwrites the
   upstream tank's output in place. We refuse carbon dosing and close loops with our own :class:`PI`.
5. The sludge blanket estimate (``sludge_height``) interpolates within the layer the blanket is in by a ratio
   of layer concentrations whose denominator can vanish: in a storm's washout it gave 2,425 m in the 4 m
   settler, and the default model of 2026-11-25 trained with a blanket scaler of 6.5 m (its normal range is
   0.4-2 m). :func:`blanket_height` keeps the estimate within that layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The stream's columns (plant.influent), also read as bsm1.SNH by the plant's users.
from plant.influent import SALK, SI, SND, SNH, SNO, SO, SS, TEMP, TSS, XBA, XBH, XI, XND, XP, XS, Q  # noqa: F401

MINUTES_PER_DAY = 1440
STEP_DAYS = 1.0 / MINUTES_PER_DAY
"""Integration step: 1 minute. Larger steps cost accuracy linearly (15 min: ~3 g N/m3 in tank-5 SNH)."""

I_XB, I_XP = 0.08, 0.06  # N content of biomass and of particulate products (BSM1 definitions)

Q0 = 18446.0  # BSM1 average dry-weather influent flow, m3/d
KLA_LIMITS = (0.0, 240.0)
QINTR_LIMITS = (0.0, 5 * Q0)
DEFAULT_CONTROLS = (240.0, 240.0, 84.0, 3 * Q0)  # KLa3, KLa4, KLa5 (1/d), Qintr (m3/d)

N_MEASUREMENTS = 17  # the length of measurements_from_plant's vector


def blanket_height(tss_layers: np.ndarray, threshold: float, height: float, estimate: float) -> float:
    """Defect 5: bsm2-python's blanket ``estimate`` (m) kept within the layer the blanket is in.

    ``tss_layers`` is the settler's TSS per layer, top first; the blanket is the top of the sludge zone: the
    layers below the lowest one under ``threshold`` (g SS/m3). bsm2-python interpolates within the layer above
    them and can leave it (a vanishing denominator); a settler whose every layer holds sludge is full.
    """
    n = len(tss_layers)
    layer = height / n
    clear = np.flatnonzero(np.asarray(tss_layers) < threshold)
    level = n - 1 - int(clear.max()) if clear.size else n  # whole layers of sludge
    if level == n:
        return float(height)
    return float(np.clip(estimate, level * layer, (level + 1) * layer))


def measurements_from_plant(plant: Plant, influent_row: np.ndarray) -> np.ndarray:
    """The catalog's measurement vector (the order of plant.catalog.BSM1's targets) from the plant's current streams."""
    sim = plant.sim
    eff = sim.ys_eff
    tkn_eff = eff[SNH] + eff[SND] + eff[XND] + I_XB * (eff[XBH] + eff[XBA]) + I_XP * (eff[XP] + eff[XI])
    return np.array(
        [
            influent_row[Q],
            influent_row[SI:SO].sum(),  # SI..XP: total COD
            influent_row[TSS],
            influent_row[SNH],
            sim.y_out2[SNO],
            sim.y_out3[SO],
            sim.y_out4[SO],
            sim.y_out5[SO],
            sim.y_out5[SNH],
            sim.y_out5[TSS],
            eff[SNH],
            eff[SNO],
            eff[TSS],
            eff[SI:SO].sum(),
            eff[SNO] + tkn_eff,
            blanket_height(sim.ys_tss_internal, sim.settler.sedpar[6], sim.settler.dim[1], sim.sludge_height),
            sim.y_out5[TEMP],
        ]
    )


def check_no_carbon_dosing(sim: object) -> None:
    """bsm2-python 0.0.16 doses carbon by editing the upstream tank's output array in place: refuse it."""
    reactors = [getattr(sim, f"reactor{i}") for i in range(1, 6)]
    if any(r.carb > 0 for r in reactors):
        raise ValueError("carbon dosing is not supported: bsm2-python 0.0.16 corrupts the upstream tank state")


def import_bsm1ol() -> type:
    """bsm2-python's BSM1OL, imported without the handlers bsm2-python adds to the root logger on import
    (``plant.influent.root_logging_kept``)."""
    from plant.influent import root_logging_kept

    with root_logging_kept():
        from bsm2_python.bsm1_ol import BSM1OL  # slow (numba) and only needed to simulate
    return BSM1OL


def clipped_controls(u: np.ndarray) -> np.ndarray:
    """KLa3, KLa4, KLa5 (1/d) and Qintr (m3/d) within what the plant's blowers and pump can deliver."""
    lo = np.array([KLA_LIMITS[0]] * 3 + [QINTR_LIMITS[0]])
    hi = np.array([KLA_LIMITS[1]] * 3 + [QINTR_LIMITS[1]])
    return np.clip(u, lo, hi)


class Plant:
    """BSM1 open loop at a 1-minute step, with the lagged-recycle defect fixed.

    ``set_controls`` is the only way controls change, so the lagged recycle stream is always consistent.
    """

    def __init__(self, influent: np.ndarray, *, tempmodel: bool = True) -> None:
        self.sim = import_bsm1ol()(data_in=influent, timestep=STEP_DAYS, tempmodel=tempmodel)
        check_no_carbon_dosing(self.sim)
        # Defect 3: simtime has one entry more than there are steps.
        self.n_steps = len(self.sim.timesteps)
        self.i = 0
        # Defect 2 at start-up too: every stream starts as a copy of the first influent row, so the lagged
        # return-sludge stream carries the influent flow instead of the settler's return flow.
        self.sim.ys_out[Q] = self.sim.settler.q_r
        self.set_controls(np.array(DEFAULT_CONTROLS))

    STREAMS = ("y_in1", "y_out1", "y_out2", "y_out3", "y_out4", "y_out5", "y_out5_r", "ys_in", "ys_out", "ys_eff")

    def state(self) -> dict[str, object]:
        """Copies of everything the next steps depend on: each reactor's and the settler's state, the streams
        between the units (reactor 1 mixes the previous step's recycle), the controls and the step. bsm2-python's
        objects cannot be deep-copied; their arrays can."""
        sim = self.sim
        out: dict[str, object] = {name: np.array(getattr(sim, name), copy=True) for name in self.STREAMS}
        out["reactors"] = [np.array(getattr(sim, f"reactor{i}").y0, copy=True) for i in range(1, 6)]
        out["settler"] = np.array(sim.settler.ys0, copy=True)
        out["tss_layers"] = np.array(getattr(sim, "ys_tss_internal", np.zeros(0)), copy=True)
        out["scalars"] = (sim.settler.q_w, float(sim.qintr), float(sim.sludge_height), self.i)
        out["klas"] = np.array(sim.klas, copy=True)
        return out

    def restore(self, state: dict[str, object]) -> None:
        """Back to a ``state``, which stays as it was (copies go in): a branch cannot leak into the run."""
        sim = self.sim
        for name in self.STREAMS:
            setattr(sim, name, np.array(state[name], copy=True))
        for i, y0 in enumerate(state["reactors"], 1):  # type: ignore[arg-type]
            getattr(sim, f"reactor{i}").y0 = np.array(y0, copy=True)
        sim.settler.ys0 = np.array(state["settler"], copy=True)
        sim.ys_tss_internal = np.array(state["tss_layers"], copy=True)
        sim.settler.q_w, sim.qintr, sim.sludge_height, self.i = state["scalars"]  # type: ignore[misc]
        sim.klas = np.array(state["klas"], copy=True)

    def set_controls(self, u: np.ndarray) -> None:
        """Apply KLa3, KLa4, KLa5 (1/d) and Qintr (m3/d), clipped to plant limits."""
        u = clipped_controls(u)
        kla, qintr = u[:3], float(u[3])
        self.sim.klas = np.array([0.0, 0.0, kla[0], kla[1], kla[2]])
        self.sim.qintr = qintr
        # Defect 2: reactor 1 mixes in the recycle stream of the previous step; give it the new flow now.
        self.sim.y_out5_r[Q] = qintr

    def step(self) -> np.ndarray:
        """Advance one minute; returns the influent row used in that step."""
        if self.i >= self.n_steps:
            raise IndexError(f"simulation has only {self.n_steps} steps")
        # BSM1OL.step(i, klas) would reset klas to defaults when none is given; pass ours explicitly.
        self.sim.step(self.i, self.sim.klas)
        self.i += 1
        return self.sim.y_in_all[self.i - 1]


def control_schedule(
    n_steps: int,
    rng: np.random.Generator,
    ranges: list[tuple[float, float]],
    hold_minutes: tuple[int, int],
) -> np.ndarray:
    """Random piecewise-constant moves at 1-minute resolution: (n_steps, n_controls), each held 1-8 h.

    Each control moves on its own clock so their effects can be told apart.
    """
    out = np.empty((n_steps, len(ranges)))
    for j, (lo, hi) in enumerate(ranges):
        i = 0
        while i < n_steps:
            hold = int(rng.integers(hold_minutes[0], hold_minutes[1] + 1))
            out[i : i + hold, j] = rng.uniform(lo, hi)
            i += hold
    return out


def seasonal_wastage(
    temperature: float, flows: tuple[float, float] = (140.0, 385.0), temperatures: tuple[float, float] = (11.0, 18.0)
) -> float:
    """Excess-sludge flow (m3/d) an operator runs at a given water temperature: ``flows[1]`` (BSM1's 385) at
    ``temperatures[1]`` and above, ``flows[0]`` at ``temperatures[0]`` and below, linear between. A lower
    wastage means an older sludge, so nitrifiers survive the winter: with 385 m3/d all year the plant stopped
    nitrifying on BSM2's 10 C weeks (SNH_eff 20-23 g N/m3 under DO control at 2 g O2/m3)."""
    frac = float(np.clip((temperature - temperatures[0]) / (temperatures[1] - temperatures[0]), 0.0, 1.0))
    return flows[0] + frac * (flows[1] - flows[0])


@dataclass
class PI:
    """A discrete PI controller with output limits and back-calculation anti-windup, as in the BSM1 benchmark's
    control strategy (bsm2-python's PID class never integrates, so it is not used).

    u = clip(bias + kp * (e + integral / ti)), with the integral corrected by (u_applied - u_raw) / tt.
    ``kp`` carries the sign: negative where more output lowers the measured value.
    """

    kp: float
    ti_days: float
    tt_days: float
    lo: float
    hi: float
    bias: float
    integral: float = 0.0

    def step(self, setpoint: float, measured: float, dt_days: float = STEP_DAYS, hi: float | None = None) -> float:
        """One step; ``hi`` lowers the upper limit for this step (an actuator that cannot deliver, e.g. a
        blower failure), and anti-windup sees it like any other limit."""
        error = setpoint - measured
        raw = self.bias + self.kp * (error + self.integral / self.ti_days)
        out = float(np.clip(raw, self.lo, self.hi if hi is None else min(hi, self.hi)))
        # d(integral)/dt = error + (out - raw) / (kp * tt): the integral stops winding up at the limits.
        self.integral += dt_days * (error + (out - raw) / (self.kp * self.tt_days / self.ti_days))
        return out


@dataclass
class FeedbackLoop:
    """One control loop of the plant: ``control`` (index into KLa3, KLa4, KLa5, Qintr) follows ``pi``'s output
    so that the measurement ``measure(plant)`` follows ``setpoint`` (one value per minute). ``name`` is the
    catalog's name of its setpoint, under which the data record it."""

    control: int
    measure: Callable[[Plant], float]
    pi: PI
    setpoint: np.ndarray
    name: str
    dither: np.ndarray | None = None  # per minute, added to the controller's output (excitation), then clipped


def do_loop(setpoint: np.ndarray, kla_max: float = KLA_LIMITS[1]) -> FeedbackLoop:
    """Dissolved oxygen in reactor 5 through KLa5, with the BSM1 benchmark's tuning (K = 25 1/d per g O2/m3,
    Ti = 0.002 d, Tt = 0.001 d)."""
    pi = PI(25.0, 0.002, 0.001, 0.0, kla_max, 84.0)
    return FeedbackLoop(2, lambda p: float(p.sim.y_out5[SO]), pi, setpoint, "SO_5_setpoint")


def nitrate_loop(setpoint: np.ndarray) -> FeedbackLoop:
    """Nitrate in reactor 2 through the internal recycle Qintr, with the BSM1 benchmark's tuning
    (K = 10,000 m3/d per g N/m3, Ti = 0.025 d, Tt = 0.015 d)."""
    pi = PI(10_000.0, 0.025, 0.015, *QINTR_LIMITS, 3 * Q0)
    return FeedbackLoop(3, lambda p: float(p.sim.y_out2[SNO]), pi, setpoint, "SNO_2_setpoint")


@dataclass
class AmmoniumCascade:
    """Ammonia-based aeration control: a slow outer PI reads ammonium in reactor 5 and writes the DO loop's
    setpoint for the minute (more ammonium, more oxygen), within ``pi``'s limits. The DO loop then moves the air.
    Its ``pi.kp`` is negative: more DO lowers the ammonium."""

    inner: FeedbackLoop
    ammonium: float  # g N/m3 of SNH_5 the outer loop holds
    pi: PI

    def step(self, plant: Plant, minute: int) -> None:
        self.inner.setpoint[minute] = self.pi.step(self.ammonium, float(plant.sim.y_out5[SNH]))


def ammonium_cascade(inner: FeedbackLoop, ammonium: float, do_range: tuple[float, float]) -> AmmoniumCascade:
    """An ABAC outer loop on ``inner`` (the DO loop): -0.3 g O2 per g N/m3 of ammonium error, integral time
    2 h, the DO setpoint between ``do_range``; slow next to the DO loop (minutes), as plants tune it."""
    bias = float(np.mean(do_range))
    return AmmoniumCascade(inner, ammonium, PI(-0.3, 1 / 12, 1 / 24, do_range[0], do_range[1], bias))


class Run:
    """A plant under its operation, advanced one sample interval at a time, that can be saved and restored: the
    counterfactual bench branches it at a forecast origin, runs each plan on the same state, and goes on.

    Each minute, the cascades write their DO setpoints, each loop's controller reads its measurement (an ideal
    sensor) and replaces its control's scheduled value, and the plant steps; u records what was applied and s
    each loop's setpoint. ``caps`` (one row per minute, one column per control, NaN: none) limit what the
    actuators can deliver, loops included.
    """

    def __init__(
        self,
        influent: np.ndarray,
        controls: np.ndarray,
        sample_minutes: int = 15,
        *,
        stabilize: bool = False,
        loops: list[FeedbackLoop] | None = None,
        cascades: list[AmmoniumCascade] | None = None,
        caps: np.ndarray | None = None,
        wastage: float | None = None,
        tempmodel: bool = True,
    ) -> None:
        self.plant = Plant(influent, tempmodel=tempmodel)
        if wastage is not None:
            self.plant.sim.settler.q_w = float(wastage)
        if stabilize:
            self.plant.sim.stabilize()
        self.controls = clipped_controls(controls)  # a copy: the applied controls are written into it
        self.caps = caps
        if caps is not None:
            self.controls = np.fmin(self.controls, caps[: len(self.controls)])
        self.loops, self.cascades = list(loops or ()), list(cascades or ())
        self.sample_minutes = sample_minutes
        self.n_samples = min(self.plant.n_steps, len(self.controls)) // sample_minutes
        self.minute = 0
        self.previous: np.ndarray | None = None

    def advance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sample interval: (x at its end, the mean control applied over it, each loop's mean setpoint)."""
        start = self.minute
        block = self.controls[start : start + self.sample_minutes]
        setpoints = np.zeros(len(self.loops))
        for i, row in enumerate(block):
            minute = start + i
            for cascade in self.cascades:
                cascade.step(self.plant, minute)
            for j, loop in enumerate(self.loops):
                cap = (
                    None
                    if self.caps is None or np.isnan(self.caps[minute, loop.control])
                    else self.caps[minute, loop.control]
                )
                out = loop.pi.step(loop.setpoint[minute], loop.measure(self.plant), hi=cap)
                if loop.dither is not None:
                    out = float(np.clip(out + loop.dither[minute], loop.pi.lo, loop.pi.hi if cap is None else cap))
                row[loop.control] = out
                setpoints[j] += loop.setpoint[minute]
            if self.previous is None or np.any(row != self.previous):
                self.plant.set_controls(row)
                self.previous = row.copy()
            influent_row = self.plant.step()
        self.minute += len(block)
        return measurements_from_plant(self.plant, influent_row), block.mean(axis=0), setpoints / len(block)

    def state(self) -> dict[str, object]:
        """Everything a restore needs: the plant's state, the minute, the controllers' integrals."""
        controllers = [loop.pi.integral for loop in self.loops] + [c.pi.integral for c in self.cascades]
        return {"plant": self.plant.state(), "minute": self.minute, "previous": self.previous, "pi": controllers}

    def restore(self, state: dict[str, object]) -> None:
        self.plant.restore(state["plant"])  # type: ignore[arg-type]
        self.minute = int(state["minute"])  # type: ignore[call-overload]
        previous = state["previous"]
        self.previous = None if previous is None else np.array(previous, copy=True)
        integrals = list(state["pi"])  # type: ignore[call-overload]
        for pi, value in zip(
            [*(loop.pi for loop in self.loops), *(c.pi for c in self.cascades)], integrals, strict=True
        ):
            pi.integral = value


def simulate(
    influent: np.ndarray,
    controls: np.ndarray,
    sample_minutes: int = 15,
    *,
    stabilize: bool = False,
    loops: list[FeedbackLoop] | None = None,
    cascades: list[AmmoniumCascade] | None = None,
    caps: np.ndarray | None = None,
    wastage: float | None = None,
    tempmodel: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the plant under a 1-minute control schedule and sample it (``Run``, start to end).

    Returns (t_minutes, x, u, s): x is sampled at the end of every ``sample_minutes`` interval, u is the mean
    control applied over that interval, s each loop's mean setpoint (one column per loop, in ``loops`` order).
    Only whole intervals that fit the influent are simulated. With ``stabilize`` the plant first settles
    (bsm2-python's own routine, ~30 s) under the first influent row and default controls: the package's initial
    state is far from BSM1's steady state. ``wastage`` sets the excess-sludge flow (m3/d; BSM1: 385), the
    operator's lever on sludge age.
    """
    run = Run(
        influent,
        controls,
        sample_minutes,
        stabilize=stabilize,
        loops=loops,
        cascades=cascades,
        caps=caps,
        wastage=wastage,
        tempmodel=tempmodel,
    )
    n = run.n_samples
    t = np.arange(1, n + 1) * sample_minutes
    x, u, s = np.empty((n, N_MEASUREMENTS)), np.empty((n, controls.shape[1])), np.empty((n, len(run.loops)))
    for k in range(n):
        x[k], u[k], s[k] = run.advance()
    return t, x, u, s
