"""Simulated BSM1 days per wall-clock second, one process and two: ``python bench/data_gen.py [--days 14]``."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from plant import bsm1
from plant.influent import influent_window, load_influent


def simulate_window(args: tuple[int, float]) -> float:
    """Simulate one BSM2-influent window under random control moves; returns wall seconds."""
    window, days = args
    data, _ = load_influent("bsm2")
    influent = influent_window(data, window * days, days)
    rng = np.random.default_rng(window)
    n = round(days * bsm1.MINUTES_PER_DAY)
    controls = bsm1.control_schedule(n, rng, [(120, 240), (120, 240), (20, 200), (9223, 92230)], (60, 480))
    start = time.perf_counter()
    bsm1.simulate(influent, controls)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=float, default=14.0, help="simulated days per scenario (default 14)")
    args = parser.parse_args()
    simulate_window((99, 0.05))  # JIT-compile numba kernels outside the timing
    one = simulate_window((0, args.days))
    print(f"1 process : {args.days:.1f} d in {one:.1f} s -> {args.days / one:.3f} simulated days/s")
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(simulate_window, [(99, 0.05)] * 2))  # warm both workers
        start = time.perf_counter()
        list(pool.map(simulate_window, [(1, args.days), (2, args.days)]))
    two = time.perf_counter() - start
    print(f"2 processes: {2 * args.days:.1f} d in {two:.1f} s -> {2 * args.days / two:.3f} simulated days/s")
    print(f"speed-up with 2 processes: {one * 2 / two:.2f}x")


if __name__ == "__main__":
    main()
