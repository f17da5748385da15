"""The training windows an analyser outage costs: the share of windows kept, per split, on a 72-day export of the
example plant (issue 30's: tag names, naive local time, codes, a stuck analyser) with and without a 3-day outage
of the effluent nitrate analyser, cut as a run of the default preset cuts them.

``python bench/outage.py [--days 72] [--outage-days 3] [--preset default]``: about 20 s on 2 cores (it imports the
export twice). The scenarios are the tiny preset's BSM2 windows, repeated back to back: what is counted here is
missing data, not forecast skill.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from plant.catalog import load_catalog
from plant.example_export import EXAMPLE_CATALOG, export_plant
from plant.historian import import_table, load_dataset
from plant.scenarios import generate
from training.config import ConfigError, load_config
from training.data import heldout_windows, make_windows


def kept_shares(folder: Path, preset: str) -> dict[str, tuple[int, int]]:
    """(windows kept, windows in all) per split, training's stride for train, the held-out stride for the rest."""
    cfg = load_config(preset)
    t, d = cfg.train, cfg.data
    catalog, data, _ = load_dataset(folder)
    day = catalog.steps_per_day
    out = {}
    for split, sd in data.items():
        if split == "train":
            w = make_windows([sd], t.history, t.horizon, t.window_stride, steps_per_day=day, max_missing=d.max_missing)
        else:
            w = heldout_windows([sd], t.history, t.horizon, 10**9, day)
        out[split] = (len(w.x_hist), len(w.x_hist) + w.dropped)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--days", type=float, default=72.0, help="length of the export")
    parser.add_argument("--outage-days", type=float, default=3.0, help="the effluent nitrate analyser's outage")
    parser.add_argument("--preset", default="default", help="the training preset whose windows are cut")
    args = parser.parse_args()
    try:  # before the tiny scenarios are simulated
        train = load_config(args.preset).train
    except ConfigError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    tiny = generate(load_config("tiny").data, progress=False)
    block = [tiny[i] for i in ("bsm2-00", "bsm2-01", "bsm2-02")]
    days = sum(len(sd.t_minutes) for sd in block) / 96
    scenarios = block * max(1, round(args.days / days))
    catalog = load_catalog(EXAMPLE_CATALOG)
    with tempfile.TemporaryDirectory() as tmp:
        for outage in (0.0, args.outage_days):
            csv, folder = Path(tmp) / "plant.csv", Path(tmp) / f"imported-{outage}"
            export_plant(scenarios, csv, start=datetime(2026, 9, 1), outage_days=outage)
            manifest = import_table(csv, catalog, folder, history=train.history, horizon=train.horizon)
            missing = manifest["missing"]["no3_out"]["missing_share"]
            shares = kept_shares(folder, args.preset)
            text = ", ".join(f"{k} {a}/{n} = {100 * a / n:.1f}%" for k, (a, n) in shares.items())
            print(f"outage {outage:g} d (no3_out {100 * missing:.1f}% missing): windows kept: {text}")
    total = sum(len(sd.t_minutes) for sd in scenarios) / 96
    print(f"{total:.0f} days, the {args.preset} preset's windows, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
