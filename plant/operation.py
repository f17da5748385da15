"""How a scenario's plant is run: its influent (storms, overload), the scheduled controls, the feedback loops and
their setpoints, the caps of a low-aeration episode and the sludge wastage, all drawn from the scenario's seed.

``plant.scenarios`` simulates each scenario under its ``operation``. ``Scenario`` (what is simulated) is defined
here, beside how it is run, so that ``plant.scenarios`` imports this module and never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from plant import bsm1
from plant.config import DataConfig
from plant.influent import (
    add_overload,
    add_storm,
    cap_inflow,
    design_load_factors,
    influent_window,
    load_influent,
    random_storms,
)

REGIMES = ("normal", "storm", "stress")
"""What the plant goes through: normal operation (dry weather and the BSM2 influent's own weather), with
added storms (or the rain file), or with stress episodes (low aeration, overload)."""

POLICIES = {
    "open_loop_excited": "loops off; KLa3-5 and Q_intr in steps over their working ranges, each held 15 min to "
    "12 h (designed excitation: each control's own effect on the plant)",
    "open_loop_fixed": "loops off; the blowers and the recycle pump at one set output for the whole run",
    "constant_setpoints": "DO in reactor 5 and nitrate in reactor 2 under PI loops at constant setpoints (BSM1's "
    "standard strategy, DO 2.0 and nitrate 1.0, or another constant pair); KLa3 = KLa4 = 240",
    "scheduled_setpoints": "the loops' setpoints on a time-of-day schedule (a day and a night level)",
    "ammonia_cascade": "ammonia-based aeration control: an outer loop sets the DO setpoint from reactor-5 "
    "ammonium; the nitrate loop at a constant setpoint",
    "moving_setpoints": "the loops' setpoints moved by an operator every 4-24 h, with excitation on the loop "
    "outputs; KLa3 and KLa4 moved open loop",
}
"""How a plant is run: its operating policy, a dimension of the data like the regime (every scenario has one,
stored in its file and the manifest, and forecasts are judged per regime and policy)."""

OPEN_LOOP = frozenset({"open_loop_excited", "open_loop_fixed"})
"""The policies that run with every loop off; every other policy runs the DO and nitrate loops (known without
building a scenario's operation, which draws its whole influent and schedule)."""

HONEST_HELD = {"ammonia_cascade": ("SO_5_setpoint",)}
"""Per policy, the setpoints a plant cannot plan, only hold: the cascade decides the DO setpoint from an ammonium
load nobody has seen yet. An honest request sends them held at their last value; the others are planned."""


@dataclass(frozen=True)
class Scenario:
    """One simulated stretch of plant life: which influent window, with which seed, under which regime."""

    id: str  # "dry", "rain" or "bsm2-NN" (the NN-th window of the BSM2 influent)
    influent: str  # key of plant.influent.INFLUENT_FILES
    start_day: float
    days: float
    seed: int
    regime: str  # one of REGIMES
    later: bool = False  # from after every training window (an unseen later period)
    policy: str = "moving_setpoints"  # one of POLICIES

    @property
    def group(self) -> str:
        """What evaluation reports it under: its regime, or "later" for a later period."""
        return "later" if self.later else self.regime


def piecewise(
    n: int, rng: np.random.Generator, hold_minutes: tuple[float, float], draw: Callable[[], float]
) -> np.ndarray:
    """A per-minute series of levels, each drawn by ``draw`` and held for a random time within ``hold_minutes``."""
    out = np.empty(n)
    i = 0
    while i < n:
        hold = int(rng.integers(int(hold_minutes[0]), int(hold_minutes[1]) + 1))
        out[i : i + hold] = draw()
        i += hold
    return out


def bsm2_design_influent(start_day: float, days: float, scale: bool) -> tuple[np.ndarray, list[object]]:
    """A window of the BSM2 influent, brought to BSM1's design load (the dry influent's mean flow and
    flow-weighted concentrations) when ``scale``."""
    data, repairs = load_influent("bsm2")
    if scale:
        data = data * design_load_factors(data, load_influent("dry")[0])
    return influent_window(data, start_day, days), repairs


@dataclass
class Operation:
    """How one scenario's plant is run, drawn from its seed before anything is simulated: the influent (with its
    storms and overload), the scheduled controls, the feedback loops (their setpoints and excitation) and the
    cascades above them, the actuator caps of a low-aeration episode and the operator's sludge wastage."""

    influent: np.ndarray
    controls: np.ndarray  # (minutes, controls) the open-loop schedule; the loops replace their own column
    loops: list[bsm1.FeedbackLoop]
    caps: np.ndarray  # (minutes, controls), NaN: no cap
    wastage: float
    notes: list[dict[str, object]]  # influent repairs, episodes and the policy's draws, for the scenario file
    cascades: list[bsm1.AmmoniumCascade] = field(default_factory=list)


def operation(cfg: DataConfig, sc: Scenario) -> Operation:
    """Draw how the scenario's plant is run: its regime's episodes (storms, or an overload and a low-aeration
    episode) on the influent, its policy's controls and loops (``POLICIES``), and the sludge wastage the
    operator sets for the season. The same scenario always draws the same operation."""
    if sc.influent == "bsm2":
        influent, repairs = bsm2_design_influent(sc.start_day, sc.days, cfg.design_load)
    else:
        influent, repairs = load_influent(sc.influent)
    rng = np.random.default_rng(sc.seed)
    n = round(sc.days * bsm1.MINUTES_PER_DAY)
    episodes: list[dict[str, object]] = []
    if sc.regime == "storm" and sc.influent != "rain":
        for storm in random_storms(sc.days, rng, cfg.storms_per_week):
            influent = add_storm(influent, storm)
            episodes.append({"kind": "storm", **asdict(storm)})
    influent = cap_inflow(influent, cfg.max_inflow)
    caps = np.full((n, 4), np.nan)
    if sc.regime == "stress":
        start, hours, factor = rng.uniform(cfg.warmup_days, sc.days - 1), rng.uniform(12, 48), rng.uniform(1.4, 2.0)
        influent = add_overload(influent, start, hours, factor)
        episodes.append({"kind": "overload", "start_day": start, "hours": hours, "factor": factor})
        start, hours, cap = rng.uniform(cfg.warmup_days, sc.days - 0.5), rng.uniform(4, 24), rng.uniform(20, 60)
        first = int(start * bsm1.MINUTES_PER_DAY)
        caps[first : first + int(hours * 60), :3] = cap
        episodes.append({"kind": "low_aeration", "start_day": start, "hours": hours, "kla_cap": cap})
    # A val or test entry "ID@POLICY" names a held-out run (its id keeps it out of the cache key's way).
    held_out = "@" in sc.id
    controls, loops, cascades, drawn = POLICY_DRAWS[sc.policy](cfg, rng, n, sc.start_day, held_out)
    temperature = float(np.mean(influent[:, 1 + bsm1.TEMP]))
    wastage = bsm1.seasonal_wastage(temperature, cfg.wastage, cfg.wastage_temperatures)
    notes = [asdict(r) for r in repairs] + episodes + [{"kind": "policy", "policy": sc.policy, **drawn}]
    notes.append({"kind": "wastage", "m3_per_day": wastage})
    return Operation(influent, controls, loops, caps, wastage, notes, cascades)


Draw = tuple[np.ndarray, list[bsm1.FeedbackLoop], list[bsm1.AmmoniumCascade], dict[str, object]]


def standard_controls(n: int) -> np.ndarray:
    """(n, controls) BSM1's open-loop defaults: KLa3 = KLa4 = 240, KLa5 84, Q_intr 3 Q0 (loops replace theirs)."""
    return np.tile(np.array(bsm1.DEFAULT_CONTROLS), (n, 1))


def open_loop_excited(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """Every control in steps over its working range, each level held 15 min to 12 h (log-uniform), each
    control on its own clock: the plant's response to each, apart from the load."""
    ranges = [cfg.excite_kla34, cfg.excite_kla34, cfg.excite_kla5, cfg.excite_qintr]
    log_hold = np.log(cfg.excite_minutes)
    controls = np.empty((n, 4))
    for j, (lo, hi) in enumerate(ranges):
        i = 0
        while i < n:
            hold = round(float(np.exp(rng.uniform(*log_hold))))
            controls[i : i + hold, j] = rng.uniform(lo, hi)
            i += hold
    return controls, [], [], {}


def open_loop_fixed(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """One set output for the whole run: BSM1's defaults (240, 240, 84, 55,338) in a third of the runs, else
    drawn within the working ranges (the DO then wanders with the load)."""
    if rng.random() < 1 / 3:
        level = np.array(bsm1.DEFAULT_CONTROLS)
    else:
        kla34 = rng.uniform(*cfg.excite_kla34)
        level = np.array([kla34, kla34, rng.uniform(80.0, 240.0), rng.uniform(20_000.0, 80_000.0)])
    return np.tile(level, (n, 1)), [], [], {"controls": level.tolist()}


def constant_setpoints(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """The loops at constant setpoints: BSM1's standard pair (DO 2.0, nitrate 1.0), the strategy the benchmark
    is judged with, wherever the run is held out and in half the training runs; else a constant pair drawn from
    the setpoint ranges."""
    standard = rng.random() < 0.5 or held_out
    do, no = (2.0, 1.0) if standard else (rng.uniform(*cfg.do_setpoints), rng.uniform(*cfg.no_setpoints))
    loops = [bsm1.do_loop(np.full(n, do)), bsm1.nitrate_loop(np.full(n, no))]
    return standard_controls(n), loops, [], {"do_setpoint": do, "no_setpoint": no}


def scheduled_setpoints(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """Time-of-day schedules: a day level from a morning hour to an evening hour, a night level otherwise, for
    the DO (more air by day, when the load is high) and the nitrate loop."""
    morning, evening = rng.uniform(5, 9), rng.uniform(17, 22)
    hour = (start_day * 24 + np.arange(n) / 60) % 24  # the influent's clock: day 0 starts at midnight
    day = (hour >= morning) & (hour < evening)
    do_day = rng.uniform(1.5, cfg.do_setpoints[1])
    do_night = rng.uniform(cfg.do_setpoints[0], do_day)
    no_day, no_night = rng.uniform(*cfg.no_setpoints), rng.uniform(*cfg.no_setpoints)
    loops = [bsm1.do_loop(np.where(day, do_day, do_night)), bsm1.nitrate_loop(np.where(day, no_day, no_night))]
    drawn = {"hours": [morning, evening], "do_day_night": [do_day, do_night], "no_day_night": [no_day, no_night]}
    return standard_controls(n), loops, [], drawn


def ammonia_cascade(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """Ammonia-based aeration control: the DO setpoint follows reactor-5 ammonium (an outer PI towards an
    ammonium setpoint of 0.5-2.5 g N/m3, the DO setpoint within the DO range), the nitrate loop constant."""
    do = bsm1.do_loop(np.full(n, float(np.mean(cfg.do_setpoints))))
    nh, no = rng.uniform(0.5, 2.5), rng.uniform(*cfg.no_setpoints)
    cascade = bsm1.ammonium_cascade(do, nh, (cfg.do_setpoints[0] / 2, cfg.do_setpoints[1]))
    return standard_controls(n), [do, bsm1.nitrate_loop(np.full(n, no))], [cascade], {"ammonium": nh, "no": no}


def moving_setpoints(cfg: DataConfig, rng: np.random.Generator, n: int, start_day: float, held_out: bool) -> Draw:
    """Setpoints an operator moves (a new one every ``setpoint_hours``), excitation riding on the loop outputs
    (the PI cancels most of it), KLa3 and KLa4 moved open loop."""

    def setpoints(lo_hi: tuple[float, float]) -> np.ndarray:
        return piecewise(n, rng, (cfg.setpoint_hours[0] * 60, cfg.setpoint_hours[1] * 60), lambda: rng.uniform(*lo_hi))

    def dither(amplitude: float) -> np.ndarray:
        draw = lambda: rng.uniform(-amplitude, amplitude) if rng.random() < cfg.dither_share else 0.0  # noqa: E731
        return piecewise(n, rng, cfg.dither_minutes, draw)

    do, no = bsm1.do_loop(setpoints(cfg.do_setpoints)), bsm1.nitrate_loop(setpoints(cfg.no_setpoints))
    do.dither, no.dither = dither(cfg.dither_kla), dither(cfg.dither_qintr)
    hold = (cfg.hold_hours[0] * 60, cfg.hold_hours[1] * 60)
    controls = standard_controls(n)
    for j, (lo, hi) in enumerate(cfg.kla_ranges):
        controls[:, j] = piecewise(n, rng, hold, lambda lo=lo, hi=hi: rng.uniform(lo, hi))
    return controls, [do, no], [], {}


POLICY_DRAWS: dict[str, Callable[[DataConfig, np.random.Generator, int, float, bool], Draw]] = {
    "open_loop_excited": open_loop_excited,
    "open_loop_fixed": open_loop_fixed,
    "constant_setpoints": constant_setpoints,
    "scheduled_setpoints": scheduled_setpoints,
    "ammonia_cascade": ammonia_cascade,
    "moving_setpoints": moving_setpoints,
}
assert set(POLICY_DRAWS) == set(POLICIES)


def setpoints_at(s: np.ndarray, loops: list[bsm1.FeedbackLoop], names: tuple[str, ...]) -> np.ndarray:
    """(samples, len(names)): the simulator's per-loop setpoints ``s`` (``bsm1.simulate``) in the catalog's
    setpoint order, NaN for a setpoint no loop follows (an open-loop plant logs none)."""
    out = np.full((len(s), len(names)), np.nan)
    for j, loop in enumerate(loops):
        out[:, names.index(loop.name)] = s[:, j]
    return out
