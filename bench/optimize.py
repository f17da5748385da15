"""The setpoint search against slower ones: how close does /optimize's pattern search come to the best plan?

``python bench/optimize.py [--store models] [--version V] [--influents dry rain] [--origins 8] [--plans 8000]``

For held-out windows of the version's data config, the simulated plant runs under BSM1's default strategy
(``bench/closed_loop_plant.py``'s warm-up and history, then two days), and at ``--origins`` origins spread over
those days the served objective (the card's ``optimizer``) is minimised twice through ONNX Runtime from the same
history: by the pattern search /optimize runs; by the same search run to convergence (every hour its own span,
steps down to 0.5% of each bound, up to 60 sweeps: the reference); and by a random search over ``--plans`` plans
drawn uniformly within the bounds (brute force, every block and variable free). Each answer is scored the same
way, on its own sampled forecasts (energy relative to holding the setpoints, plus the limits' and moves' prices:
lower is better). Printed per origin and as medians: the scores, the served search's gap to the converged one and
to the random one (negative: the served search found the better plan), the energy saving each forecasts, and the
time of each search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import served_version
from bench.closed_loop_plant import DAY, default_strategy, prepare, run_strategy
from modelcard.objective import card_objective
from modelcard.runtime import ModelRuntime
from optimizer.search import Search, Situation, optimize
from plant.catalog import BSM1
from training.config import config_from_dict

MINUTES_PER_WEEK = 7 * 24 * 60


def situations(rt: ModelRuntime, cfg, label: str, origins: int) -> list[tuple[float, Situation]]:
    """(hour of the day, situation) at ``origins`` origins over two simulated days of the default strategy."""
    case = prepare(cfg, label, 1.0, 2.0)
    out = run_strategy(case, default_strategy)
    L, H = int(rt.card["history"]["length"]), rt.max_horizon
    clock = np.concatenate([case.past.clock, case.past.clock[-1] + 15 * np.arange(1, len(out.x) - out.first + 1)])
    x = out.x[:, [BSM1.target_names.index(n) for n in rt.measurements]]
    u = out.u[:, [BSM1.control_names.index(n) for n in rt.controls]]
    s = out.s[:, [BSM1.setpoint_names.index(n) for n in rt.setpoints]]
    result = []
    for k in np.linspace(out.first + 1, len(out.x) - 1, origins).astype(int):
        held = np.repeat(u[k - 1 : k], H, 0)
        held[:, rt.looped] = np.nan  # left to the loops: the setpoints' history is sent
        last = float(clock[k - 1] % MINUTES_PER_WEEK)
        sit = Situation(x[k - L : k], u[k - L : k], s[k - L : k], last, None, held, None)
        result.append(((clock[k - 1] % (DAY * 15)) / 60, sit))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version")
    parser.add_argument("--influents", nargs="*", default=["dry", "rain"])
    parser.add_argument("--origins", type=int, default=8, help="origins per window")
    parser.add_argument("--plans", type=int, default=8000, help="plans the random search draws")
    args = parser.parse_args()
    store = Path(args.store)
    version = served_version(parser, store, args.version)
    rt = ModelRuntime(store / version)
    objective = card_objective(rt.card)
    if objective is None:
        raise SystemExit(f"{version} has no objective (card: optimizer)")
    cfg = config_from_dict(json.loads((store / version / "config.json").read_text())).data
    samples = rt.calibration_samples
    print(f"model {version}; the card's objective; pattern search vs {args.plans} random plans, {samples} samples")
    row = "{:8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}"
    print(row.format("window", "hour", "served", "conv.", "random", "gap to", "gap to", *["saves"] * 3, *["time"] * 3))
    print(row.format("", "", *["score"] * 3, "conv.", "random", *["served", "conv.", "random"] * 2))
    gaps, random_gaps, times, slow_times, random_times, better = [], [], [], [], [], 0
    for label in args.influents:
        for hour, sit in situations(rt, cfg, label, args.origins):
            searches = (
                Search(samples=samples),
                Search(samples=samples, sweeps=60, groups=rt.max_horizon, min_step=0.005),
                Search(samples=samples, method="random", random_plans=args.plans),
            )
            a, c, b = (optimize(rt, sit, objective, rt.max_horizon, s, [0.5]) for s in searches)
            gaps.append(a.score - c.score)
            random_gaps.append(a.score - b.score)
            times.append(a.seconds)
            slow_times.append(c.seconds)
            random_times.append(b.seconds)
            better += a.score <= b.score
            saves = [1 - o.plan.energy["total"] / o.current.energy["total"] for o in (a, c, b)]
            print(
                f"{label:8} {hour:5.1f} {a.score:8.4f} {c.score:8.4f} {b.score:8.4f} {gaps[-1]:+8.4f} "
                f"{random_gaps[-1]:+8.4f} " + " ".join(f"{v:6.1%}" for v in saves) + " "
                f"{a.seconds:5.2f}s {c.seconds:5.2f}s {b.seconds:5.2f}s"
            )
    print(
        f"\n{len(gaps)} origins (score units: holding's energy = 1). Served search against the converged one: gap "
        f"median {statistics.median(gaps):+.4f}, worst {max(gaps):+.4f}; time median {statistics.median(times):.2f} "
        f"s against {statistics.median(slow_times):.2f} s. Against {args.plans} random plans: as good or better at "
        f"{better}, gap median {statistics.median(random_gaps):+.4f} ({statistics.median(random_times):.2f} s)"
    )


if __name__ == "__main__":
    main()
