"""Setpoint advice in the loop (issue 33): does the product's advice save aeration energy on the simulated plant?

``python bench/closed_loop.py [--store models] [--version V] [--influents dry rain storm bsm2-36] [--days 7]
[--json out.json]``

For each influent window of the model version's own data config, bsm2-python's BSM1 (``plant.bsm1.Run``) runs
the warm-up (``data.warmup_days``, from steady state where ``data.stabilize`` says so) and one day of history
under BSM1's default strategy (DO 2.0 g O2/m3 through KLa_5, nitrate 1.0 g N/m3 through Q_intr, KLa_3 = KLa_4 =
240), is saved, runs ``--days`` on under the default strategy, is restored, and runs the same days with the
product in the loop: every hour the last day of 15-minute samples goes to ``POST /optimize`` of a real
``python -m service`` on 127.0.0.1, and the answer's first hour of setpoints (and of the open-loop controls it
plans, if any) goes into the plant's PI loops. The same influent from the same state, so the difference is the
advice.

Per window and strategy it prints bsm2-python's own figures, averaged over the evaluated minutes: aeration,
pumping and mixing energy (kWh/d), EQI (kg PU/d), and the share of minutes with effluent ammonium above 4 g N/m3
and total nitrogen above 18 g N/m3 (BSM1's limits); for the advised run the /optimize calls by answer status and
their time, measured here around the HTTP call and by the solver itself. Then the verdict against the targets:
aeration energy at least 10% below the default's, no more time above either limit than the default, EQI at most
2% above it, and /optimize answered within 1 s at the 95th percentile over every call.

``storm`` names the config's held-out storm window (a BSM2 window with added storms; the rain file is ``rain``),
``later`` its held-out later window. A window shorter than warm-up, history and ``--days`` is extended when it
is a BSM2 window of normal operation (its influent goes on), else the evaluation is cut to what fits (printed).
``--fixed-do`` runs a constant DO setpoint instead of the service: what lowering the DO alone gives.
``--oracle`` runs the simulator itself as the advisor, with the true future influent (``simulator_oracle``, each
candidate run ``--oracle-hours`` ahead): a diagnostic of what the plant allows under the same prices, never the
product's figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.closed_loop_plant import (
    DAY,
    HOUR,
    Advice,
    Advisor,
    BenchError,
    Case,
    History,
    Outcome,
    Prices,
    default_strategy,
    fixed_do,
    prepare,
    resolve,
    run_strategy,
    simulator_oracle,
)
from bench.service_load import start_server
from modelcard.card import CardError, read_card
from modelcard.objective import card_objective
from modelcard.store import current_version, resolve_version, set_current
from plant.catalog import BSM1
from training.config import config_from_dict

MONDAY = datetime(2026, 3, 2, tzinfo=UTC)  # the simulator's day 0 is a Monday at midnight
TARGET_AERATION, TARGET_EQI, TARGET_P95_S = 0.10, 0.02, 1.0  # saving at least, rise at most, seconds
TIMEOUT_S = 30.0


@dataclass
class Call:
    """One POST /optimize: how long it took and what came back."""

    seconds: float  # measured here, around the HTTP call
    solver_seconds: float  # the answer's solver.seconds
    status: str
    feasible: bool  # the answer's: every limit met by the plan's forecast
    answer: dict[str, object]


class ServiceAdvisor:
    """The product in the loop: each hour the last day of samples (or the model's longest history, if shorter)
    goes to POST /optimize with the loops' setpoints and ``hold_controls``; the plan's first hour comes back as
    advice, whatever the answer's status. A setpoint or open-loop control the plan leaves out keeps the run's
    schedule; a looped control in the plan is left to its loop."""

    def __init__(
        self, client: httpx.Client, model: dict, horizon: int = DAY, seed: int = 0, objective: dict | None = None
    ) -> None:
        variables = model["variables"]
        self.client, self.seed, self.objective = client, seed, objective
        self.measurements = [v["name"] for v in variables["measurements"]]
        self.controls = [v["name"] for v in variables["controls"]]
        self.setpoints = [v["name"] for v in (variables.get("setpoint_inputs") or {}).get("variables", [])]
        self.looped = {loop["control"] for loop in variables.get("loops") or []}
        limits = model["history"]
        self.length = int(np.clip(DAY, limits["min"], limits["max"]))
        self.horizon = min(horizon, int(model["max_horizon"]))
        self.calls: list[Call] = []

    def body(self, h: History) -> dict[str, object]:
        """The request of the contract: one series as POST /forecast takes it, without plans or future setpoints."""
        if len(h.clock) < self.length:
            raise BenchError(f"{len(h.clock)} samples of history, the model asks for {self.length}")
        last = slice(len(h.clock) - self.length, None)

        def values(a: np.ndarray, names: list[str], catalog: tuple[str, ...]) -> dict[str, list[float | None]]:
            return {n: [None if np.isnan(v) else float(v) for v in a[last, catalog.index(n)]] for n in names}

        series = {
            "timestamps": [(MONDAY + timedelta(minutes=float(m))).isoformat() for m in h.clock[last]],
            "measurements": values(h.x, self.measurements, BSM1.target_names),
            "controls": values(h.u, self.controls, BSM1.control_names),
            "setpoints": values(h.s, self.setpoints, BSM1.setpoint_names),
            "hold_controls": True,
        }
        body: dict[str, object] = {"series": series, "horizon": self.horizon, "seed": self.seed}
        if self.objective is not None:
            body["objective"] = self.objective
        return body

    def __call__(self, h: History) -> Advice:
        content = json.dumps(self.body(h)).encode()
        start = time.perf_counter()
        r = self.client.post("/optimize", content=content, headers={"content-type": "application/json"})
        seconds = time.perf_counter() - start
        if not r.is_success:
            raise BenchError(f"POST /optimize answered {r.status_code}: {r.text[:4000]}")
        answer = r.json()
        plan = answer.get("plan") or {}
        solver = answer.get("solver") or {}
        solver_seconds, status = float(solver.get("seconds", np.nan)), str(answer.get("status"))
        self.calls.append(Call(seconds, solver_seconds, status, bool(answer.get("feasible", True)), answer))
        # Only what the plan decides: the rest keeps the run's own schedule (the default strategy's, with any
        # actuator caps of the scenario), as in the default run.
        advice = Advice()
        for name, values in (plan.get("setpoints") or {}).items():
            if name in self.setpoints and values:
                advice.setpoints[name] = hour(values)
        for name, values in (plan.get("controls") or {}).items():
            if name in self.controls and name not in self.looped and values:
                advice.controls[name] = hour(values)
        return advice


def hour(values: list[float]) -> list[float]:
    """A plan's first hour of one variable (its last value repeated if the plan is shorter)."""
    return [float(v) for v in values[:HOUR]] + [float(values[-1])] * max(0, HOUR - len(values))


@contextmanager
def served(store: Path, version: str) -> Iterator[Path]:
    """A store whose CURRENT is ``version`` (the service serves CURRENT): the store itself, or a copy of it."""
    if current_version(store) == version:
        yield store
        return
    with tempfile.TemporaryDirectory(prefix="closed-loop-") as tmp:
        shutil.copytree(store / version, Path(tmp) / version, ignore=shutil.ignore_patterns("*.png", "weights.pt"))
        set_current(Path(tmp), version)
        yield Path(tmp)


@contextmanager
def service(store: Path, version: str) -> Iterator[tuple[httpx.Client, dict]]:
    """A real ``python -m service`` on 127.0.0.1 serving ``version``, its client and GET /model; stopped at the
    end whatever happens (its log is printed when the bench fails)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise (bsm2-python's root logger)
    with served(store, version) as where, tempfile.NamedTemporaryFile(suffix=".log") as log:
        server, port = start_server(where, Path(log.name))
        ok = False
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT_S) as client:
                r = client.get("/model")
                if not r.is_success:
                    raise BenchError(f"GET /model answered {r.status_code}: {r.text[:4000]}")
                model = r.json()
                if model.get("version") != version:
                    raise BenchError(f"the service serves {model.get('version')!r}, not {version!r}")
                yield client, model
                ok = True
        finally:
            stop(server)
            tail = Path(log.name).read_text(errors="replace")[-4000:]
            if not ok and tail.strip():
                print(f"service log (last 4000 characters):\n{tail}", file=sys.stderr)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@dataclass
class Result:
    """One window: both strategies and, for the advised run, its calls to the service."""

    case: Case
    default: Outcome
    advised: Outcome
    calls: list[Call]

    def verdict(self) -> dict[str, tuple[bool, str]]:
        d, a = self.default, self.advised
        saving, rise = 1 - a.aeration / d.aeration, a.eqi / d.eqi - 1
        return {
            "aeration": (saving >= TARGET_AERATION, f"{-saving:+.1%} (target <= {-TARGET_AERATION:+.0%})"),
            "SNH_eff": (a.snh_over <= d.snh_over, f"{a.snh_over:.1%} of the time (default {d.snh_over:.1%})"),
            "TN_eff": (a.tn_over <= d.tn_over, f"{a.tn_over:.1%} of the time (default {d.tn_over:.1%})"),
            "EQI": (rise <= TARGET_EQI, f"{rise:+.1%} (target <= {TARGET_EQI:+.0%})"),
        }

    def summary(self) -> dict[str, object]:
        sc = self.case.scenario
        verdict = self.verdict()
        return {
            "influent": self.case.label,
            "scenario": sc.id,
            "regime": sc.regime,
            "evaluated_days": self.case.samples / DAY,
            "from_day": len(self.case.past.clock) / DAY,
            "notes": self.case.notes,
            "default": self.default.figures(),
            "advised": self.advised.figures(),
            "calls": call_stats(self.calls),
            "targets": {k: {"met": met, "value": text} for k, (met, text) in verdict.items()},
            "met": all(met for met, _ in verdict.values()),
            "seconds": {"warm_up": self.case.seconds, "default": self.default.seconds, "advised": self.advised.seconds},
        }


def call_stats(calls: list[Call]) -> dict[str, object]:
    """Count, statuses and times (median, 95th percentile) of /optimize calls."""
    if not calls:
        return {"count": 0, "status": {}}
    client, solver = np.array([c.seconds for c in calls]), np.array([c.solver_seconds for c in calls])
    return {
        "count": len(calls),
        "status": {s: sum(c.status == s for c in calls) for s in dict.fromkeys(c.status for c in calls)},
        "infeasible": sum(not c.feasible for c in calls),
        "seconds_median": float(np.median(client)),
        "seconds_p95": float(np.percentile(client, 95)),
        "solver_seconds_median": float(np.median(solver)),
        "solver_seconds_p95": float(np.percentile(solver, 95)),
    }


UNITS = ("", "kWh/d", "kWh/d", "kWh/d", "kgPU/d", "time", "time", "g/m3")
WIDTHS = (10, 9, 8, 7, 8, 6, 6, 6)


def print_result(r: Result, advisor: str) -> None:
    case, sc = r.case, r.case.scenario
    first = len(case.past.clock) / DAY
    print(
        f"\n{case.label}: {sc.id} ({sc.regime}), days {first:g}-{first + case.samples / DAY:g} evaluated "
        f"(warm-up and history {case.seconds:.1f} s, default {r.default.seconds:.1f} s, {advisor} "
        f"{r.advised.seconds:.1f} s)"
    )
    for note in case.notes:
        print(f"  {note}")
    for head in (("strategy", "aeration", "pumping", "mixing", "EQI", "SNH>4", "TN>18", "DO sp"), UNITS):
        cells = [f"{h:>{w}}" for h, w in zip(head[1:], WIDTHS[1:], strict=True)]
        print(f"  {head[0]:<{WIDTHS[0]}} " + " ".join(cells))
    for name, o in (("default", r.default), (advisor, r.advised)):
        f = o.figures()
        print(
            f"  {name:<10} {f['aeration']:>9.1f} {f['pumping']:>8.1f} {f['mixing']:>7.1f} {f['eqi']:>8.1f} "
            f"{f['snh_over']:>6.1%} {f['tn_over']:>6.1%} {f['do_setpoint']:>6.2f}"
        )
    d, a = r.default, r.advised
    print(
        f"  {'change':<10} {a.aeration / d.aeration - 1:>+9.1%} {a.pumping / d.pumping - 1:>+8.1%} "
        f"{a.mixing - d.mixing:>+7.1f} {a.eqi / d.eqi - 1:>+8.1%}"
    )
    stats = call_stats(r.calls)
    if stats["count"]:
        statuses = ", ".join(f"{k} {v}" for k, v in stats["status"].items())
        print(
            f"  /optimize: {stats['count']} calls ({statuses}; {stats['infeasible']} infeasible); per call "
            f"{stats['seconds_median']:.3f} s median, "
            f"{stats['seconds_p95']:.3f} s p95 (solver {stats['solver_seconds_median']:.3f} / "
            f"{stats['solver_seconds_p95']:.3f} s)"
        )
    for name, (met, text) in r.verdict().items():
        print(f"  {'met    ' if met else 'NOT MET'}  {name}: {text}")
    print(f"  verdict: {'MET' if all(m for m, _ in r.verdict().values()) else 'NOT MET'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version", help="default: the served version (models/CURRENT)")
    parser.add_argument("--influents", nargs="*", default=["dry", "rain", "storm", "bsm2-36"], help="window ids")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--days", type=float, default=7.0, help="evaluated days per strategy (default 7)")
    span.add_argument("--hours", type=float, help="evaluated hours per strategy, instead of --days")
    parser.add_argument("--history-days", type=float, default=1.0, help="under the default strategy, after warm-up")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument("--fixed-do", type=float, help="a constant DO setpoint instead of the service (no server)")
    instead.add_argument(
        "--oracle",
        action="store_true",
        help="a diagnostic instead of the service: the simulator with the true future influent as the advisor",
    )
    parser.add_argument(
        "--oracle-prices",
        type=float,
        nargs=4,
        metavar=("SNH_UNIT", "SNH_HOUR", "TN_UNIT", "TN_HOUR"),
        help="the oracle's kWh per g/m3 above a limit and hour, and per hour above it (default: the card's)",
    )
    parser.add_argument(
        "--oracle-hours", type=int, help="how far ahead the oracle runs each candidate plan (hours; default 6)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the /optimize requests' seed")
    parser.add_argument(
        "--objective",
        type=json_object,
        help="JSON object sent as every request's objective (parts of the card's replaced), e.g. "
        '\'{"controls": {}, "move_kwh": 20}\'',
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.oracle and (args.oracle_prices is not None or args.oracle_hours is not None):
        parser.error("--oracle-prices and --oracle-hours set the oracle: give --oracle too")
    args.oracle_hours = 6 if args.oracle_hours is None else args.oracle_hours
    return args


def json_object(text: str) -> dict:
    """--objective's value: a JSON object (the parts of the card's objective a request replaces)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, e.g. '{{\"move_kwh\": 20}}': {text!r}")
    return value


def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, object]]:
    """Every window under both strategies, printed as it completes; the results and their JSON summary."""
    store = Path(args.store)
    try:
        version = resolve_version(store, args.version)
    except CardError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg = config_from_dict(json.loads((store / version / "config.json").read_text())).data
    days = args.hours / 24 if args.hours is not None else args.days
    for label in args.influents:  # refuse an unknown window before anything runs
        resolve(cfg, label)
    prices = Prices(*args.oracle_prices) if args.oracle_prices else None  # the oracle's, else the card's
    if args.oracle and prices is None:
        objective = card_objective(read_card(store / version))
        if objective is None:
            raise SystemExit(f"{version} has no objective: give --oracle-prices")
        prices = Prices.of(objective)
    results: list[Result] = []

    def each(advisor: Callable[[Case], Advisor], calls: list[Call], name: str) -> None:
        for label in args.influents:
            case = prepare(cfg, label, args.history_days, days)
            default = run_strategy(case, default_strategy)
            before = len(calls)
            advised = run_strategy(case, advisor(case))
            results.append(Result(case, default, advised, calls[before:]))
            print_result(results[-1], name)

    span = f"{days:g} days" if days >= 1 else f"{days * 24:g} h"
    print(f"model {version}; {span} per strategy after {cfg.warmup_days:g} + {args.history_days:g} days")
    advisor_name = "service"
    if args.fixed_do is not None:
        advisor_name = f"DO {args.fixed_do:g}"
        each(lambda case: fixed_do(args.fixed_do), [], advisor_name)
    elif args.oracle and prices is not None:
        advisor_name = "oracle"
        each(lambda case: simulator_oracle(case, prices, args.oracle_hours), [], advisor_name)
    else:
        with service(store, version) as (client, model):
            advisor = ServiceAdvisor(client, model, seed=args.seed, objective=args.objective)
            print(f"service on 127.0.0.1: {advisor.length} samples of history, horizon {advisor.horizon}")
            each(lambda case: advisor, advisor.calls, "advised")
    every = [c for r in results for c in r.calls]
    summary: dict[str, object] = {"model_version": version, "days": days, "advisor": advisor_name}
    if args.oracle and prices is not None:  # a diagnostic: it knows the true future influent
        summary["oracle_prices"], summary["oracle_hours"] = asdict(prices), args.oracle_hours
    summary["influents"] = [r.summary() for r in results]
    if every:
        p95 = float(np.percentile([c.seconds for c in every], 95))
        summary["optimize_p95_s"], summary["optimize_p95_met"] = p95, p95 < TARGET_P95_S
        met = "met" if p95 < TARGET_P95_S else "NOT MET"
        print(f"\n/optimize p95 over {len(every)} calls: {p95:.3f} s (target < {TARGET_P95_S:g} s): {met}")
    summary["met"] = all(r["met"] for r in summary["influents"]) and summary.get("optimize_p95_met", True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return results, summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (BenchError, httpx.HTTPError) as exc:
        print(f"closed-loop bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
