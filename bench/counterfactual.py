"""What-if answers against the simulator: does the model move the plant the way the plant moves?

``python bench/counterfactual.py [--store models] [--version V] [--scenarios dry rain bsm2-36] [--origins 20]``

For held-out influent windows of the version's own data config, the simulated BSM1 plant is run two ways, under
BSM1's standard closed-loop strategy (DO 2.0 g O2/m3 through KLa_5, nitrate 1.0 g N/m3 through Q_intr) and open
loop at BSM1's default controls, and saved at many forecast origins (``plant.branching``). From each origin the
plant runs on under each plan for 5 h:

- open loop, every control held at its last value except KLa_5 at +30% / -30% (or Q_intr at +30% / -30%): the
  request gives every control's future, as an open-loop plant plans it;
- closed loop (the standard strategy only), the DO setpoint +0.5 / -0.5 g O2/m3: the request leaves KLa_5 and
  Q_intr to their loops and sends the setpoints' plan;
- closed loop, the blowers of tanks 3 and 4 held or turned down by 40% (240 -> 144 1/d, within the range
  ``POST /optimize`` advises) while the loops run: the request plans KLa_3 and KLa_4 and leaves KLa_5 and Q_intr
  to their loops, as /optimize's plans do. What the DO loop adds to KLa_5 decides the advice's energy; this pair
  checks that answer (not one of issue 29's targets).

The model (through ONNX Runtime, as served) is asked the same from the same history. Per variable and lead time
the bench compares the forecast change between the two plans of a pair with the simulator's: the share of
origins where its sign is right (origins where the plant hardly moves, less than 1% of the variable's std, are
counted apart), the R^2 of the forecast change, 1 - sum of squared misses / sum of squared true changes (0: no
better than a forecast that ignores the plan, 1: exact; the target's figure), the same about the true changes'
mean (R^2c: 0 is no better than one constant change everywhere; where the plant moves alike from every origin,
as the DO under its loop does, its denominator is tiny and it says little), and the gain (least-squares slope of
forecast change on true change: 1 is the right size). The simulated plant is the truth here, so what-if answers
are judged against what the plant would do.

The DO setpoint pair is then split per held-out window, and within each by whether its +0.5 plan ran KLa_5 at
its loop's upper limit for at least half the horizon: there the higher setpoint cannot add air, the two plans'
DO differ by less than their setpoints (0.42 g O2/m3 on average over 5 h, for setpoints 1.0 apart, before the
dry file's daily peak) and the plant's answer shrinks; that split shows where the pooled R^2 is lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.cli import served_version
from modelcard.card import read_card
from modelcard.runtime import ModelRuntime
from plant import bsm1
from plant.branching import Branched, Plan, run_with_branches
from plant.catalog import BSM1
from plant.config import DataConfig
from plant.executor import executor_arg, run_all
from plant.operation import operation, standard_controls
from plant.scenarios import scenarios
from training.config import config_from_dict, load_config

HORIZON = 20  # 5 h at 15 minutes (or the model's longest horizon, if shorter)
STEPS = {"2 h": 8, "5 h": 20}
KLA3, KLA4, KLA5, QINTR = (BSM1.control_names.index(c) for c in ("KLa_3", "KLa_4", "KLa_5", "Q_intr"))
PLANS = {
    "open": [
        Plan("KLa_5 +30%", False, {KLA5: 1.3}),
        Plan("KLa_5 -30%", False, {KLA5: 0.7}),
        Plan("Q_intr +30%", False, {QINTR: 1.3}),
        Plan("Q_intr -30%", False, {QINTR: 0.7}),
    ],
    "closed": [
        Plan("DO setpoint +0.5", True, shifts={"SO_5_setpoint": 0.5}),
        Plan("DO setpoint -0.5", True, shifts={"SO_5_setpoint": -0.5}),
        Plan("KLa_3,4 held", True),
        Plan("KLa_3,4 -40%", True, {KLA3: 0.6, KLA4: 0.6}),
    ],
}
PLANS["closed"] = PLANS["open"] + PLANS["closed"]  # the closed-loop plant is opened for the open-loop plans too
LOOPS_ON = {plan.name for plan in PLANS["closed"] if plan.closed}  # the plans run with the loops on
# (pair label, plan up, plan down, the variables the targets name)
PAIRS = [
    ("KLa_5 +-30% (open loop)", "KLa_5 +30%", "KLa_5 -30%", ("SO_5", "SNH_5", "SNH_eff")),
    ("Q_intr +-30% (open loop)", "Q_intr +30%", "Q_intr -30%", ("SNO_2",)),
    ("DO setpoint +-0.5 (loops on)", "DO setpoint +0.5", "DO setpoint -0.5", ("SO_5", "SNH_eff")),
    ("KLa_3,4 -40% (loops on)", "KLa_3,4 held", "KLa_3,4 -40%", ("SO_5", "SNH_5", "SNH_eff")),
]
TARGET_SIGN, TARGET_R2 = 0.95, 0.7  # on the named variables, at 5 h
TARGET_PAIRS = 3  # the first three pairs carry issue 29's targets; the blowers' pair checks what /optimize advises
SETPOINT_PAIR = PAIRS[2]  # the DO setpoint pair, split per window and by the air's limit (``setpoint_answers``)


@dataclass
class Task:
    cfg: DataConfig
    scenario: str  # a window id of the config ("dry", "bsm2-36"), its regime's episodes included
    base: str  # "closed" (BSM1's standard strategy) or "open" (BSM1's default controls)
    origins: int
    every: int  # samples between origins
    horizon: int  # samples each plan runs


def simulate(task: Task) -> tuple[Task, Branched, np.ndarray]:
    """The base run and its branches (a local process or a Dask worker): (task, branched, clock minutes)."""
    sc = next(s for s in scenarios(task.cfg) if s.id.partition("@")[0] == task.scenario)
    sc = replace(sc, id=f"{task.scenario}@counterfactual-{task.base}", policy="constant_setpoints")
    op = operation(task.cfg, sc)
    n = len(op.controls)
    op.controls, op.cascades = standard_controls(n), []
    op.loops = [bsm1.do_loop(np.full(n, 2.0)), bsm1.nitrate_loop(np.full(n, 1.0))] if task.base == "closed" else []
    per_day = bsm1.MINUTES_PER_DAY // 15
    first = round(task.cfg.warmup_days * per_day) + per_day  # a day of history after the warm-up
    origins = [first + i * task.every for i in range(task.origins)]
    branched = run_with_branches(op, origins, PLANS[task.base], task.horizon, stabilize=task.cfg.stabilize)
    return task, branched, branched.t + sc.start_day * bsm1.MINUTES_PER_DAY


def forecasts(rt: ModelRuntime, b: Branched, clock: np.ndarray, history: int) -> dict[str, np.ndarray]:
    """The model's mean forecast (origins, horizon, outputs) from each origin's history under each plan: an
    open-loop plan gives every control's future (what the branch applied); a setpoint plan leaves the looped
    controls to their loops (a model without loops gets them held, what a plant could send it) and sends the
    setpoints' history and plan."""
    # The closed base's loops are the DO and the nitrate loop, in the catalog's setpoint order; open: none logged.
    s = b.s if b.s.shape[1] else np.full((len(b.s), len(BSM1.setpoint_names)), np.nan)
    idx = np.array(b.origins)[:, None] + np.arange(1 - history, 1)  # (origins, history)
    if idx.min() < 0:  # numpy would read the run's last samples, the future, as the history's first
        raise SystemExit(
            f"error: the first origin (sample {b.origins[0]}) has fewer than the model's {history} history samples "
            "before it: raise data.warmup_days"
        )
    x_hist, u_hist, s_hist, t_last = b.x[idx], b.u[idx], s[idx], clock[b.origins]
    out = {}
    for plans in PLANS.values():
        for plan in plans:
            if plan.name in out or plan.name not in b.x_plan:
                continue
            u_fut = b.u_plan[plan.name].copy()
            given: dict[str, np.ndarray] = {}
            if plan.closed:
                looped = rt.looped or [KLA5, QINTR]
                held = u_hist[:, -1:, looped]
                u_fut[..., looped] = np.nan if rt.looped else np.broadcast_to(held, u_fut[..., looped].shape)
                s_fut = np.repeat(s_hist[:, -1:], u_fut.shape[1], 1)
                for j, name in enumerate(BSM1.setpoint_names):
                    s_fut[..., j] += plan.shifts.get(name, 0.0)
                given = {"s_hist": s_hist, "s_fut": s_fut}
            out[plan.name] = rt.predict(x_hist, u_hist, u_fut, t_last, **given).mean
    return out


def pair_change(fc: dict[str, np.ndarray], b: Branched, up: str, down: str, step: int, j: int):
    """(forecast change, true change) over origins of output j from plan ``down`` to plan ``up`` at ``step``."""
    return fc[up][:, step - 1, j] - fc[down][:, step - 1, j], b.x_plan[up][:, step - 1, j] - b.x_plan[down][
        :, step - 1, j
    ]


def setpoint_answers(
    fc: dict[str, np.ndarray], b: Branched, horizon: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The DO setpoint pair's answers at the last lead, per target variable (forecast change, true change), and
    per origin whether the +0.5 plan ran KLa_5 at its loop's upper limit for at least half the horizon: there
    the higher setpoint cannot add air, and the plant's answer shrinks."""
    _, up, down, wanted = SETPOINT_PAIR
    limit = bsm1.KLA_LIMITS[1]  # the DO loop's upper limit (bsm1.do_loop's, as ``simulate`` builds it)
    at_limit = (b.u_plan[up][:, :horizon, KLA5] >= limit - 1e-6).mean(1) >= 0.5
    answers = {name: pair_change(fc, b, up, down, horizon, BSM1.target_names.index(name)) for name in wanted}
    return answers, at_limit


def print_windows(windows: list[tuple[str, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]], lead: str) -> None:
    """The DO setpoint pair per held-out window, and apart where its +0.5 plan ran the air at the loop's limit:
    where the pooled R^2 is lost."""
    if not windows:
        return
    print(f"\nDO setpoint +-0.5 per held-out window (loops on, {lead}); 'air at limit': the +0.5 plan ran KLa_5 at")
    print("its loop's upper limit for at least half the horizon (the setpoint cannot add air there)")
    names = list(windows[0][1])
    print(f"{'window':<10} {'':<16} {'origins':>7}" + "".join(f" {n + ' R2':>11} {'gain':>6}" for n in names))
    for window, answers, at_limit in windows:
        for subset, keep in (("all", np.ones_like(at_limit)), ("air at limit", at_limit), ("air below", ~at_limit)):
            if not keep.any():
                continue
            cells = ""
            for pred, true in answers.values():
                r = pair_scores(pred[keep], true[keep], 1.0)
                cells += f" {r['r2']:>11.2f} {r['gain']:>6.2f}"
            print(f"{window:<10} {subset:<16} {int(keep.sum()):>7}{cells}")


def pair_scores(pred: np.ndarray, true: np.ndarray, scale: float) -> dict[str, float]:
    """Sign share, R^2 (about no change and about the mean change) and gain of a forecast change against the
    true change over origins (``pred``, ``true``: (origins,)); origins where the plant moves less than 1% of
    ``scale`` are left out of the sign share."""
    moved = np.abs(true) > 0.01 * scale
    sign = float(np.mean(np.sign(pred[moved]) == np.sign(true[moved]))) if moved.any() else float("nan")
    miss, total = float(np.sum((pred - true) ** 2)), float(np.sum(true**2))
    spread = float(np.sum((true - true.mean()) ** 2))
    r2 = 1 - miss / total if total > 0 else float("nan")
    r2c = 1 - miss / spread if spread > 0 else float("nan")
    gain = float(np.sum(pred * true) / total) if total > 0 else float("nan")
    return {"origins": len(true), "moved": int(moved.sum()), "sign": sign, "r2": r2, "r2c": r2c, "gain": gain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version", help="default: the served version (models/CURRENT)")
    parser.add_argument("--scenarios", nargs="*", default=["dry", "rain", "bsm2-36"], help="held-out windows")
    parser.add_argument("--origins", type=int, default=20, help="forecast origins per window and plant")
    parser.add_argument("--every-hours", type=float, default=12.0, help="time between origins")
    parser.add_argument("--preset", help="simulate with this preset's data config instead of the card's (tiny: tests)")
    parser.add_argument(
        "--executor", default="local", type=executor_arg, help='"local", or "tcp://HOST:PORT" (a Dask scheduler)'
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="every measurement, not only those the targets name")
    args = parser.parse_args(argv)
    version = served_version(parser, Path(args.store), args.version)
    vdir = Path(args.store) / version
    card = read_card(vdir)
    rt = ModelRuntime(vdir)
    cfg = load_config(args.preset).data if args.preset else config_from_dict(card["training"]["config"]).data
    every = max(1, round(args.every_hours * 60 / card["sample_minutes"]))
    horizon = min(HORIZON, rt.max_horizon)
    steps = {lead: k for lead, k in {**STEPS, f"{horizon * 15 / 60:g} h": horizon}.items() if k <= horizon}
    tasks = [Task(cfg, sc, base, args.origins, every, horizon) for sc in args.scenarios for base in ("closed", "open")]
    start = time.perf_counter()
    runs = list(run_all(simulate, tasks, args.executor, args.workers))
    seconds = time.perf_counter() - start
    history = int(card["history"]["length"])
    names, std = rt.outputs, rt.out_std
    rows: dict[tuple[str, str, str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    windows: list[tuple[str, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]] = []
    for task, branched, clock in runs:
        fc = forecasts(rt, branched, clock, history)
        if SETPOINT_PAIR[1] in fc:
            windows.append((task.scenario, *setpoint_answers(fc, branched, horizon)))
        for label, up, down, _ in PAIRS:
            if up not in fc:
                continue
            for lead, step in steps.items():
                for j, name in enumerate(BSM1.target_names):
                    change = pair_change(fc, branched, up, down, step, j)
                    for base in (task.base, "both"):
                        rows.setdefault((label, base, name, lead), []).append(change)
                n = len(BSM1.target_names)
                for j, c in enumerate(rt.looped if up in LOOPS_ON else []):  # the air it needs, as the loop applies it
                    pred = fc[up][:, step - 1, n + j] - fc[down][:, step - 1, n + j]
                    true = branched.u_plan[up][:, step - 1, c] - branched.u_plan[down][:, step - 1, c]
                    for base in (task.base, "both"):
                        rows.setdefault((label, base, rt.controls[c], lead), []).append((pred, true))

    print(
        f"model {version}; {len(runs)} runs ({', '.join(args.scenarios)} x closed/open), {args.origins} origins each "
        f"every {args.every_hours:g} h, {horizon}-step branches; simulated in {seconds:.0f} s"
    )
    head = f"{'pair':<30} {'plant':<7} {'variable':<9} {'lead':>5} {'origins':>7} {'moved':>6}"
    print(f"{head} {'sign':>6} {'R2':>7} {'R2c':>7} {'gain':>6}")
    named = {label: (*wanted, *rt.controls) for label, _, _, wanted in PAIRS}
    scores = {}
    for (label, base, name, lead), parts in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])
    ):
        pred, true = np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
        scale = float(std[names.index(name)]) if name in names else float(rt.u_std[rt.controls.index(name)])
        r = scores[label, base, name, lead] = pair_scores(pred, true, scale)
        if args.all or name in named[label]:
            print(
                f"{label:<30} {base:<7} {name:<9} {lead:>5} {r['origins']:>7} {r['moved']:>6} {r['sign']:>6.2f} "
                f"{r['r2']:>7.2f} {r['r2c']:>7.2f} {r['gain']:>6.2f}"
            )
    print_windows(windows, f"{horizon * 15 / 60:g} h")
    print("\ntargets (both plants pooled, at 5 h):")
    for label, _, _, wanted in PAIRS[:TARGET_PAIRS]:
        for name in wanted:
            r = scores.get((label, "both", name, "5 h")) or scores.get((label, "both", name, list(steps)[-1]))
            if r is None:
                continue
            for what, value, goal in (("sign share", r["sign"], TARGET_SIGN), ("R^2", r["r2"], TARGET_R2)):
                met = value >= goal
                print(f"  {'met    ' if met else 'NOT MET'}  {label}: {name} {what} >= {goal}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
