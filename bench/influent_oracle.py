"""How much of the forecast error is the influent's? Train with the true future influent as a known input.

``python bench/influent_oracle.py [--preset default] [section.field=value ...]``  (about 10 min on 2 cores)

The served model, like any forecaster of this plant, must guess the influent (flow and load) over the horizon
from its past. This experiment trains the same KoVAE, same preset and seed, but appends the true influent of
every history and future step (normalised, the catalog's influent variables) to the known inputs, then scores
it on the same held-out windows. The gap between the two is what the influent's unpredictability costs; what
is left is the error of the plant model itself. The result is printed, never stored or served.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import read_card
from modelcard.store import current_version
from plant.catalog import BSM1
from training import calibrate as calibration
from training import evaluate as ev
from training import loop, report, scoring
from training import prepare as preparation
from training.config import ConfigError, RunConfig, load_config
from training.data import Windows

MEASUREMENTS = BSM1.targets
INFLUENT = BSM1.disturbance_positions()


class InfluentKnown(preparation.Prepared):
    """The run's data, with the true influent appended to the known inputs of every window and series."""

    def inputs(
        self, w: Windows, forecast: np.ndarray | None = None, setpoints: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        u_hist, u_fut = super().inputs(w, forecast, setpoints)
        return (
            np.concatenate([u_hist, self.nx(w.x_hist)[..., INFLUENT]], -1),
            np.concatenate([u_fut, self.nx(w.x_fut)[..., INFLUENT]], -1),
        )

    def baseline_columns(self) -> list[int]:
        """The baselines' known inputs (training.scoring): with the true influent, as the ARX was fitted."""
        end = self.known_offset() + 2 * len(self.disturbances)  # the influent columns come after all others
        return [*super().baseline_columns(), *range(end, end + len(INFLUENT))]


def influent_known(p: preparation.Prepared) -> InfluentKnown:
    series = [(x, np.concatenate([u, x[:, INFLUENT]], 1)) for x, u in p.train_series]  # for the ARX
    return InfluentKnown(**{**vars(p), "train_series": series})


def oracle_args(doc: str) -> argparse.Namespace:
    """The command line: the preset, the store whose served model it compares with, and overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--store", default="models", help="the served model's figures are read from here")
    parser.add_argument("overrides", nargs="*", help="section.field=value, as for python -m training.run")
    return parser.parse_args()


def train_and_score(cfg: RunConfig, p: preparation.Prepared) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train, calibrate and score on the held-out windows as ``python -m training.run`` does, in a temporary
    folder: (metrics, calibration). Nothing is stored or exported."""
    with tempfile.TemporaryDirectory() as run_dir:
        model, _ = loop.train(cfg, p, Path(run_dir))
    calib = calibration.calibrate(model, p, cfg)
    return scoring.evaluate_all(model, p, cfg, calib)[0], calib


def main() -> None:
    args = oracle_args(__doc__)
    # The model's own disturbance inputs off: this bench appends the true influent itself, as it always did
    # (the served model's "perfect" influent forecast figures are in its report); no setpoints either, so it
    # compares with the served model as every caller gets it.
    off = ["model.disturbance_inputs=false", "model.setpoint_inputs=false"]
    try:  # a bad preset or override, and a --store that is not one, before ten minutes of training
        cfg = load_config(args.preset, None, [*args.overrides, *off])
        if Path(args.store).exists() and not Path(args.store).is_dir():
            raise ConfigError(f"--store {args.store} is a file, not a model store folder")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    p = influent_known(preparation.prepare(cfg))
    metrics, calib = train_and_score(cfg, p)
    print(f"\nwith the true future influent as a known input ({', '.join(MEASUREMENTS[i].name for i in INFLUENT)}):")
    report.print_headline(metrics, calib, p.catalog)
    print()
    plant_skill(metrics, "influent known")
    served = current_version(Path(args.store))
    if served is not None:
        vdir = Path(args.store) / served
        same = read_card(vdir)["training"]["config"] == json.loads(json.dumps(cfg.to_dict()))
        print(f"\nserved model {served}, influent guessed from its past ({'same' if same else 'another'} config):")
        stored = json.loads((vdir / "metrics.json").read_text())
        for h, v in stored["headline"]["kovae"].items():
            rel, skill = 100 * v["rel_rmse_top5"], 100 * v["skill_vs_persistence"]
            print(f"kovae {h:>3} rel. RMSE top-5 {rel:.2f}%  skill {skill:.1f}%")
        plant_skill(stored, "served")


def plant_skill(metrics: dict, label: str) -> None:
    """Skill vs persistence of the plant's own variables alone: the influent, known or guessed, left out."""
    plant = [i for i in range(len(MEASUREMENTS)) if i not in INFLUENT]
    rmse, ref = (np.array(metrics["rmse_by_horizon"][k]) for k in ("kovae", "persistence"))
    for h in metrics["headline"]["kovae"]:
        skill = ev.skill(rmse[int(h) - 1], ref[int(h) - 1])[plant].mean()
        print(f"{label}, h{h}: mean skill of the plant variables alone {100 * skill:.1f}%")


if __name__ == "__main__":
    main()
