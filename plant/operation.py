"""How a scenario's plant is run: its influent (storms, overload), the scheduled controls, the feedback loops and
their setpoints, the caps of a low-aeration episode and the sludge wastage, all drawn from the scenario's seed.

``plant.scenarios`` simulates each scenario under its ``operation``. ``Scenario`` (what is simulated) is defined
here, beside how it is run, so that ``plant.scenarios`` imports this module and never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from plant import bsm1
from plant.catalog import SAMPLE_MINUTES
from plant.config import DataConfig

REGIMES = ("normal", "storm", "stress")
"""How a scenario's plant is run: normal operation (dry weather and the BSM2 influent's own weather), with
added storms (or the rain file), or with stress episodes (low aeration, overload)."""


@dataclass(frozen=True)
class Scenario:
    """One simulated stretch of plant life: which influent window, with which seed, under which regime."""

    id: str  # "dry", "rain" or "bsm2-NN" (the NN-th window of the BSM2 influent)
    influent: str  # key of plant.bsm1.INFLUENT_FILES
    start_day: float
    days: float
    seed: int
    regime: str  # one of REGIMES
    later: bool = False  # from after every training window (an unseen later period)

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
    data, repairs = bsm1.load_influent("bsm2")
    if scale:
        data = data * bsm1.design_load_factors(data, bsm1.load_influent("dry")[0])
    return bsm1.influent_window(data, start_day, days), repairs


@dataclass
class Operation:
    """How one scenario's plant is run, drawn from its seed before anything is simulated: the influent (with its
    storms and overload), the scheduled controls, the feedback loops (their setpoints and excitation), the
    actuator caps of a low-aeration episode and the operator's sludge wastage."""

    influent: np.ndarray
    controls: np.ndarray  # (minutes, controls) the open-loop schedule; the loops replace their own column
    loops: list[bsm1.FeedbackLoop]
    caps: np.ndarray  # (minutes, controls), NaN: no cap
    wastage: float
    notes: list[dict[str, object]]  # influent repairs and episodes, for the scenario file


def operation(cfg: DataConfig, sc: Scenario) -> Operation:
    """Draw how the scenario's plant is run. DO in reactor 5 and nitrate in reactor 2 follow moving setpoints
    under PI control (with excitation on the loop outputs), KLa3 and KLa4 move open loop, and the operator sets
    the sludge wastage for the season. Storm scenarios add seeded storms to the influent; stress scenarios an
    overload and a low-aeration episode. The same scenario always draws the same operation."""
    if sc.influent == "bsm2":
        influent, repairs = bsm2_design_influent(sc.start_day, sc.days, cfg.design_load)
    else:
        influent, repairs = bsm1.load_influent(sc.influent)
    rng = np.random.default_rng(sc.seed)
    n = round(sc.days * bsm1.MINUTES_PER_DAY)
    episodes: list[dict[str, float | str]] = []
    if sc.regime == "storm" and sc.influent != "rain":
        for storm in bsm1.random_storms(sc.days, rng, cfg.storms_per_week):
            influent = bsm1.add_storm(influent, storm)
            episodes.append({"kind": "storm", **asdict(storm)})
    influent = bsm1.cap_inflow(influent, cfg.max_inflow)
    caps = np.full((n, 4), np.nan)
    if sc.regime == "stress":
        start, hours, factor = rng.uniform(cfg.warmup_days, sc.days - 1), rng.uniform(12, 48), rng.uniform(1.4, 2.0)
        influent = bsm1.add_overload(influent, start, hours, factor)
        episodes.append({"kind": "overload", "start_day": start, "hours": hours, "factor": factor})
        start, hours, cap = rng.uniform(cfg.warmup_days, sc.days - 0.5), rng.uniform(4, 24), rng.uniform(20, 60)
        first = int(start * bsm1.MINUTES_PER_DAY)
        caps[first : first + int(hours * 60), :3] = cap
        episodes.append({"kind": "low_aeration", "start_day": start, "hours": hours, "kla_cap": cap})

    def setpoints(lo_hi: tuple[float, float]) -> np.ndarray:
        return piecewise(n, rng, (cfg.setpoint_hours[0] * 60, cfg.setpoint_hours[1] * 60), lambda: rng.uniform(*lo_hi))

    def dither(amplitude: float) -> np.ndarray:
        draw = lambda: rng.uniform(-amplitude, amplitude) if rng.random() < cfg.dither_share else 0.0  # noqa: E731
        return piecewise(n, rng, cfg.dither_minutes, draw)

    do, no = bsm1.do_loop(setpoints(cfg.do_setpoints)), bsm1.nitrate_loop(setpoints(cfg.no_setpoints))
    do.dither, no.dither = dither(cfg.dither_kla), dither(cfg.dither_qintr)
    hold = (cfg.hold_hours[0] * 60, cfg.hold_hours[1] * 60)
    controls = np.tile(np.array(bsm1.DEFAULT_CONTROLS), (n, 1))
    for j, (lo, hi) in enumerate(cfg.kla_ranges):
        controls[:, j] = piecewise(n, rng, hold, lambda lo=lo, hi=hi: rng.uniform(lo, hi))
    temperature = float(np.mean(influent[:, 1 + bsm1.TEMP]))
    wastage = bsm1.seasonal_wastage(temperature, cfg.wastage, cfg.wastage_temperatures)
    notes = [asdict(r) for r in repairs] + episodes + [{"kind": "wastage", "m3_per_day": wastage}]
    return Operation(influent, controls, [do, no], caps, wastage, notes)


def loop_setpoints(cfg: DataConfig, sc: Scenario, t_minutes: np.ndarray) -> np.ndarray:
    """``setpoints_at`` for a scenario's operation drawn again (cheap next to simulating it)."""
    return setpoints_at(operation(cfg, sc), sc, t_minutes)


def setpoints_at(op: Operation, sc: Scenario, t_minutes: np.ndarray) -> np.ndarray:
    """(len(t_minutes), loops): each feedback loop's setpoint at the scenario's samples, as the mean over the
    sample's interval (the way u records the controls), in the catalog's setpoint order (DO, then nitrate)."""
    per_minute = np.stack([loop.setpoint for loop in op.loops], 1)
    minutes = np.round(t_minutes - sc.start_day * bsm1.MINUTES_PER_DAY).astype(int)  # each interval's end
    return np.stack([per_minute[m - SAMPLE_MINUTES : m].mean(0) for m in minutes])
