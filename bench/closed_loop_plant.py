"""The plant side of the closed-loop bench (``bench/closed_loop.py``): BSM1 run under an advisor's strategy.

A strategy is judged on the plant, not on a forecast, so each window's plant is warmed up once, saved, and every
strategy (the default, a fixed DO setpoint, the simulator oracle, the service) runs from that very same state;
the difference in energy, EQI and time above the limits is the advice's. No service, no HTTP: what the bench's
CLI puts in the loop is any ``Advisor``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from modelcard.objective import Objective
from plant import bsm1
from plant.catalog import BSM1, SAMPLE_MINUTES
from plant.config import DataConfig
from plant.operation import Scenario, operation, setpoints_at, standard_controls
from plant.scenarios import scenarios

HOUR = 60 // SAMPLE_MINUTES  # samples between two calls of the advisor
DAY = bsm1.MINUTES_PER_DAY // SAMPLE_MINUTES
DEFAULT_SETPOINTS = {"SO_5_setpoint": 2.0, "SNO_2_setpoint": 1.0}  # BSM1's default strategy
SNH_LIMIT, TN_LIMIT = 4.0, 18.0  # g N/m3, BSM1's effluent limits


class BenchError(RuntimeError):
    """Advice or an answer the bench cannot use (a setpoint no loop follows; from the service, a non-2xx status,
    no plan): the run stops, loudly."""


@dataclass
class History:
    """What the plant's historian holds when the advisor is asked: every sample so far, oldest first."""

    clock: np.ndarray  # (k,) minutes on the influent's clock at each sample's end (day 0: a Monday, 00:00)
    x: np.ndarray  # (k, catalog measurements)
    u: np.ndarray  # (k, catalog controls) the mean applied over each interval
    s: np.ndarray  # (k, catalog setpoints) each loop's mean setpoint, NaN: no loop


@dataclass
class Advice:
    """The first hour of a plan by catalog name, one value per sample interval; a name left out keeps the run's
    own schedule (the default strategy's)."""

    setpoints: dict[str, list[float]] = field(default_factory=dict)
    controls: dict[str, list[float]] = field(default_factory=dict)


Advisor = Callable[[History], Advice]


def default_strategy(history: History) -> Advice:
    """BSM1's default strategy: nothing moved, the loops at their schedule's setpoints."""
    return Advice()


def fixed_do(setpoint: float) -> Advisor:
    """A constant DO setpoint, the nitrate loop left alone: a reference, and the bench's check without a service."""
    return lambda history: Advice({"SO_5_setpoint": [setpoint] * HOUR})


ORACLE_DO = (1.0, 1.5, 2.0, 3.0)  # g O2/m3: the DO setpoints the simulator oracle tries
ORACLE_KLA34 = (120.0, 180.0, 240.0)  # 1/d: KLa_3 = KLa_4, within the card's bounds


@dataclass(frozen=True)
class Prices:
    """The simulator oracle's score per candidate, in kWh: aeration, plus per limit a price per unit above it and
    hour and one per hour above it (the card's objective's limits, on the true effluent instead of a quantile)."""

    snh_unit: float
    snh_hour: float
    tn_unit: float
    tn_hour: float

    @classmethod
    def of(cls, objective: Objective) -> Prices:
        """The objective's prices on effluent ammonium and total nitrogen (0 where it sets no such limit)."""
        limits = {m.variable: m for m in objective.limits}
        snh, tn = limits.get("SNH_eff"), limits.get("TN_eff")
        return cls(
            snh.price_kwh if snh else 0.0,
            snh.hour_price_kwh if snh else 0.0,
            tn.price_kwh if tn else 0.0,
            tn.hour_price_kwh if tn else 0.0,
        )


def simulator_oracle(case: Case, prices: Prices, look_hours: int = 6) -> Advisor:
    """A diagnostic, never a product figure: the simulator itself, with the true future influent, as the advisor.
    Every hour each candidate (a DO setpoint and KLa_3 = KLa_4 from ``ORACLE_DO`` x ``ORACLE_KLA34``, held for
    ``look_hours``, the nitrate loop left alone) runs on the plant branched from its state; the cheapest one's
    first hour goes in. The cost is the aeration (the target's measure; the pumping, which the card's objective
    also counts, is left out) plus the limit prices on the true effluent. What a perfect model and a perfect
    influent forecast advise under those prices, with a coarse grid of constant plans chosen hour by hour: a
    reference for the prices and the plant, not a bound."""
    run = case.run

    def advise(history: History) -> Advice:
        saved, schedule = run.state(), run.controls.copy()
        setpoints = [loop.setpoint.copy() for loop in run.loops]

        def rewind() -> None:
            run.restore(saved)
            run.controls[:] = schedule
            for loop, values in zip(run.loops, setpoints, strict=True):
                loop.setpoint[:] = values

        best, best_cost = (ORACLE_DO[0], ORACLE_KLA34[0]), np.inf
        # The simulator may hold fewer minutes than the schedule (the 14-day files: 20,144 of 20,160).
        steps = min(look_hours * HOUR, run.n_samples - run.minute // SAMPLE_MINUTES)
        for do in ORACLE_DO:
            for kla in ORACLE_KLA34:
                rewind()
                apply(run, Advice({"SO_5_setpoint": [do] * steps}, {"KLa_3": [kla] * steps, "KLa_4": [kla] * steps}))
                first = run.plant.i
                for _ in range(steps):
                    run.advance()
                sim, last = run.plant.sim, run.plant.i
                air = sim.perf_factors_all[first:last, 1].sum() / bsm1.MINUTES_PER_DAY  # kWh/d per minute -> kWh
                eff = sim.ys_eff_all[first:last]
                snh, tn = eff[:, bsm1.SNH], effluent_tn(eff)
                cost = (
                    air
                    + (
                        prices.snh_unit * np.clip(snh - SNH_LIMIT, 0, None).sum()
                        + prices.snh_hour * np.sum(snh > SNH_LIMIT)
                        + prices.tn_unit * np.clip(tn - TN_LIMIT, 0, None).sum()
                        + prices.tn_hour * np.sum(tn > TN_LIMIT)
                    )
                    / 60  # minutes above -> hours
                )
                if cost < best_cost:
                    best, best_cost = (do, kla), cost
        rewind()
        do, kla = best
        return Advice({"SO_5_setpoint": [do] * HOUR}, {"KLa_3": [kla] * HOUR, "KLa_4": [kla] * HOUR})

    return advise


@dataclass
class Case:
    """One influent window's plant, run through the warm-up and the history under the default strategy."""

    label: str  # as asked ("dry", "storm")
    scenario: Scenario
    run: bsm1.Run
    past: History  # the warm-up and the history
    samples: int  # the evaluated span, in samples
    notes: list[str]
    schedule: tuple[np.ndarray, list[np.ndarray]]  # the default strategy's controls and loop setpoints
    state: dict[str, object]  # the plant at the end of the history (``bsm1.Run.state``)
    seconds: float  # to simulate the warm-up and history

    def reset(self) -> None:
        """Back to the end of the history under the default strategy's schedule: nothing of a strategy leaks."""
        self.run.restore(self.state)
        self.run.controls = self.schedule[0].copy()
        for loop, setpoint in zip(self.run.loops, self.schedule[1], strict=True):
            loop.setpoint = setpoint.copy()


@dataclass
class Outcome:
    """One strategy over the evaluated span: the samples (warm-up and history first) and bsm2-python's figures."""

    first: int  # the first evaluated sample: the warm-up and history come before it
    x: np.ndarray  # (samples, measurements)
    u: np.ndarray
    s: np.ndarray
    aeration: float  # kWh/d
    pumping: float
    mixing: float
    eqi: float  # kg PU/d
    snh_over: float  # share of the evaluated minutes with SNH_eff above SNH_LIMIT
    tn_over: float
    advice: list[Advice]  # one per hour
    seconds: float  # wall time, the advisor's included

    def figures(self) -> dict[str, float]:
        keys = ("aeration", "pumping", "mixing", "eqi", "snh_over", "tn_over")
        return {k: float(getattr(self, k)) for k in keys} | {"do_setpoint": self.mean_setpoint("SO_5_setpoint")}

    def mean_setpoint(self, name: str) -> float:
        return float(np.mean(self.s[self.first :, BSM1.setpoint_names.index(name)]))


def resolve(cfg: DataConfig, label: str) -> Scenario:
    """The config's scenario for a window id or an alias: ``storm`` is its held-out storm window (a BSM2 window
    with added storms, test before validation), ``later`` its held-out later window. Where a window is held out
    under several policies, the entry under BSM1's constant setpoints is taken, else the first (its seed draws
    the storms)."""
    all_ = scenarios(cfg)
    held = [name.partition("@")[0] for name in (*cfg.test_scenarios, *cfg.val_scenarios)]
    if label in ("storm", "later"):
        kinds = {sc.id.partition("@")[0]: sc for sc in all_}
        wanted = [
            w
            for w in dict.fromkeys(held)
            if kinds[w].influent == "bsm2" and (kinds[w].regime == "storm" if label == "storm" else kinds[w].later)
        ]
        if not wanted:
            raise SystemExit(f"the config holds out no {label} window (held out: {sorted(set(held))})")
        label = wanted[0]
    runs = [sc for sc in all_ if sc.id.partition("@")[0] == label]
    if not runs:
        raise SystemExit(f"the config has no window {label!r} ({sorted({s.id.partition('@')[0] for s in all_})})")
    return next((sc for sc in runs if sc.policy == "constant_setpoints"), runs[0])


def prepare(cfg: DataConfig, label: str, history_days: float, days: float) -> Case:
    """The window's plant under the default strategy (its influent, storms, caps and wastage from its scenario),
    run through the warm-up and ``history_days``, ready for ``days`` of each strategy."""
    sc = resolve(cfg, label)
    notes = []
    warm = round((cfg.warmup_days + history_days) * DAY)
    wanted = warm + round(days * DAY)
    if wanted * SAMPLE_MINUTES > round(sc.days * bsm1.MINUTES_PER_DAY):
        need = wanted * SAMPLE_MINUTES / bsm1.MINUTES_PER_DAY
        if sc.influent == "bsm2" and sc.regime == "normal":
            notes.append(f"window extended from {sc.days:g} to {need:g} days (the BSM2 influent goes on)")
            sc = replace(sc, days=need)
        else:
            notes.append(f"window holds {sc.days:g} days, not {need:g}: evaluation cut to what fits")
    op = operation(cfg, sc)
    for note in op.notes:
        if note.get("kind") != "storm":
            continue
        day, hours, peak = note["start_day"], note["hours"], note["peak_factor"]
        if warm < (day + hours / 24) * DAY and day * DAY < wanted:  # over the evaluated span
            notes.append(f"storm on day {day:.1f}: {hours:.0f} h, peak flow x{peak:.1f}")
    n = round(sc.days * bsm1.MINUTES_PER_DAY)
    loops = [bsm1.do_loop(np.full(n, DEFAULT_SETPOINTS["SO_5_setpoint"]))]
    loops.append(bsm1.nitrate_loop(np.full(n, DEFAULT_SETPOINTS["SNO_2_setpoint"])))
    schedule = (standard_controls(n), [loop.setpoint.copy() for loop in loops])
    start = time.perf_counter()
    run = bsm1.Run(
        op.influent, schedule[0], SAMPLE_MINUTES, stabilize=cfg.stabilize, loops=loops, caps=op.caps, wastage=op.wastage
    )
    samples = min(wanted, run.n_samples) - warm
    if samples < HOUR:
        raise SystemExit(f"{label}: {sc.days:g} days hold no hour after {warm / DAY:g} days of warm-up and history")
    x, u, s = np.empty((warm, bsm1.N_MEASUREMENTS)), np.empty((warm, 4)), np.empty((warm, len(loops)))
    for k in range(warm):
        x[k], u[k], s[k] = run.advance()
    clock = np.arange(1, warm + 1) * SAMPLE_MINUTES + sc.start_day * bsm1.MINUTES_PER_DAY
    past = History(clock, x, u, setpoints_at(s, loops, BSM1.setpoint_names))
    return Case(label, sc, run, past, samples, notes, schedule, run.state(), time.perf_counter() - start)


def apply(run: bsm1.Run, advice: Advice) -> None:
    """Write an hour's advice into the plant from its current minute on: setpoints into their loops, open-loop
    controls into the schedule (within the actuators' caps); a control a loop drives is the loop's."""
    loops = {loop.name: loop for loop in run.loops}
    looped = {loop.control for loop in run.loops}
    for name, values in advice.setpoints.items():
        if name not in loops:
            raise BenchError(f"advice for {name}, which no loop of the plant follows ({sorted(loops)})")
        for k, value in enumerate(values):
            first = run.minute + k * SAMPLE_MINUTES
            loops[name].setpoint[first : first + SAMPLE_MINUTES] = value
    for name, values in advice.controls.items():
        j = BSM1.control_names.index(name)
        if j in looped:
            continue
        for k, value in enumerate(values):
            span = slice(run.minute + k * SAMPLE_MINUTES, run.minute + (k + 1) * SAMPLE_MINUTES)
            cap = run.caps[span, j] if run.caps is not None else np.nan
            run.controls[span, j] = np.fmin(value, cap)


def effluent_tn(eff: np.ndarray) -> np.ndarray:
    """Total nitrogen of bsm2-python's effluent streams (rows), as the catalog's TN_eff: nitrate plus TKN."""
    tkn = eff[:, bsm1.SNH] + eff[:, bsm1.SND] + eff[:, bsm1.XND]
    tkn += bsm1.I_XB * (eff[:, bsm1.XBH] + eff[:, bsm1.XBA]) + bsm1.I_XP * (eff[:, bsm1.XP] + eff[:, bsm1.XI])
    return eff[:, bsm1.SNO] + tkn


def run_strategy(case: Case, advise: Advisor) -> Outcome:
    """The window's evaluated span from the saved state under ``advise``, asked at the start of every hour with
    everything sampled so far. bsm2-python's per-minute figures are read at once: a restore rewinds its step
    index, so the next strategy overwrites them."""
    case.reset()
    run, past = case.run, case.past
    k0, n = len(past.clock), len(past.clock) + case.samples
    x, u, s = (np.concatenate([a, np.empty((case.samples, a.shape[1]))]) for a in (past.x, past.u, past.s))
    clock = past.clock[-1] + np.arange(n - k0 + 1) * SAMPLE_MINUTES
    clock = np.concatenate([past.clock, clock[1:]])
    first, start, advice = run.plant.i, time.perf_counter(), []
    for k in range(k0, n):
        if (k - k0) % HOUR == 0:
            advice.append(advise(History(clock[:k], x[:k], u[:k], s[:k])))
            apply(run, advice[-1])
        x[k], u[k], sp = run.advance()
        s[k] = setpoints_at(sp[None], run.loops, BSM1.setpoint_names)[0]
    sim, last = run.plant.sim, run.plant.i
    perf = sim.perf_factors_all[first:last].mean(axis=0)  # pumping, aeration, mixing (bsm1_base.BSM1Base.step)
    eff = sim.ys_eff_all[first:last]
    return Outcome(
        k0,
        x,
        u,
        s,
        aeration=float(perf[1]),
        pumping=float(perf[0]),
        mixing=float(perf[2]),
        eqi=float(sim.eqi_all[first:last].mean()),
        snh_over=float(np.mean(eff[:, bsm1.SNH] > SNH_LIMIT)),
        tn_over=float(np.mean(effluent_tn(eff) > TN_LIMIT)),
        advice=advice,
        seconds=time.perf_counter() - start,
    )
