"""How far can reweighting take the served model? An upper bound per held-out cell: a diagnostic.

``python bench/blend_bound.py [--store models] [--version V] [section.field=value ...]``

The served forecast is the model's own, blended with the last measured value and the same time yesterday
(``training.model.KoVAE.seasonal``) by weights calibration fitted on validation windows. Here the blend is fitted
again for each regime x policy cell, variable and lead time, by least squares on that held-out cell's own windows
(truth ~ last + a (model - last) + b (yesterday - last), with the last value and yesterday the references the
pooled skill is measured against, ``training.evaluate``'s). The answers are in the fit, so this is an oracle, never
a product figure; by construction it is at least as good as the model alone and as each naive forecast (skill >=
0). The served blend's weight of yesterday adapts to each window, so the oracle is no bound on it; but where even
the oracle falls short of a target, no fixed weighting of these three forecasts gets there: the model's own
forecast has to get better. Where it meets one the served model misses, the blend's weights are what to look at.

Prints per cell the pooled skill (all variables; ``training.scoring.scored_table``, the product's metric) at 15 min,
5 h and 24 h of the served forecast (the honest request), the model alone (blends off), the oracle blend, and the
oracle blend with a fourth forecast: yesterday shifted by today's offset from yesterday at the history's last step
(x[t+k-P] + x[t] - x[t-P], where a plant's day runs above or below the one before).
Needs torch (the model alone is not in the served graph): the ``train`` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.cli import served_version, version_config
from export.onnx_export import load_model
from training import evaluate as ev
from training.calibrate import blends_off
from training.config import RunConfig
from training.forecast import predict
from training.prepare import prepare
from training.scoring import scored_table

FORECASTS = ("served", "model alone", "oracle blend", "oracle + offset")


def oracle_blend(
    truth: np.ndarray, model: np.ndarray, yesterday: np.ndarray, last: np.ndarray, offset: np.ndarray | None = None
) -> np.ndarray:
    """(N, H, x) the least-squares blend of the three forecasts per lead time and variable, fitted on ``truth``
    itself; yesterday missing (before the history) stands at the last value, and where the model or the last
    value is missing the model's forecast is kept. ``offset`` (N, H, x): today's offset from yesterday, x[t] -
    x[t-P] (0 where unknown), whose sum with yesterday is a fourth forecast to blend."""
    out = model.copy()
    yesterday = np.where(np.isfinite(yesterday), yesterday, last)
    for k in range(truth.shape[1]):
        for j in range(truth.shape[2]):
            t, m, y, lv = truth[:, k, j], model[:, k, j], yesterday[:, k, j], last[:, k, j]
            usable = np.isfinite(m) & np.isfinite(lv)
            fit = usable & np.isfinite(t)
            if fit.sum() < 3:
                continue
            columns = [m - lv, y - lv] + ([y + offset[:, k, j] - lv] if offset is not None else [])
            design = np.stack(columns, 1)
            coef = np.linalg.lstsq(design[fit], (t - lv)[fit], rcond=None)[0]
            out[usable, k, j] = lv[usable] + design[usable] @ coef
    return out


def day_offset(x_hist: np.ndarray, last: np.ndarray, day: int) -> np.ndarray:
    """(N, H, x) today's offset from yesterday at the history's last step, x[t] - x[t-day], as ``last`` (N, H, x,
    the last value over the horizon) minus the history's sample a day before its last; 0 where either is missing
    or the history is no longer than a day."""
    if x_hist.shape[1] <= day:
        return np.zeros_like(last)
    return np.nan_to_num(last - x_hist[:, -1 - day][:, None].astype(np.float64))


def bound(store: Path, version: str, cfg: RunConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Per cell, per forecast (``FORECASTS``), the pooled skill (all variables) at each headline step; ``cfg`` the
    version's training config (``bench.cli.version_config``)."""
    model, card = load_model(store / version)
    p = prepare(cfg)
    w = p.test
    served = predict(model, p, w, 0, card["calibration"])[0]
    with blends_off(model):
        alone = predict(model, p, w, 0, card["calibration"])[0]
    truth, seasonal, last = w.x_fut.astype(np.float64), ev.seasonal_naive(w), ev.persistence(w)
    offset = day_offset(w.x_hist, last, 1440 // p.catalog.sample_minutes)  # the reference's day (training.evaluate)
    cells = p.cells()
    cell_of = np.array([cells[str(s)] for s in w.scenario])
    blend, shifted = alone.copy(), alone.copy()
    for cell in np.unique(cell_of):  # fitted on each cell's own windows
        rows = cell_of == cell
        blend[rows] = oracle_blend(truth[rows], alone[rows], seasonal[rows], last[rows])
        shifted[rows] = oracle_blend(truth[rows], alone[rows], seasonal[rows], last[rows], offset[rows])
    forecasts = (served, alone, blend, shifted)
    tables = {name: scored_table(p, f, None, w) for name, f in zip(FORECASTS, forecasts, strict=True)}
    return {
        cell: {name: dict(tables[name][cell]["pooled_skill_all"]) for name in FORECASTS}
        for cell in sorted(set(cell_of))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("models"))
    parser.add_argument("--version", help="default: the served version (models/CURRENT)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.cache_dir=...")
    args = parser.parse_args(argv)
    version = served_version(parser, args.store, args.version)
    result = bound(args.store, version, version_config(parser, args.store, version, args.overrides))
    steps = list(next(iter(next(iter(result.values())).values())))
    print("pooled skill (all variables), held-out windows, honest request; oracle blend: fitted on each cell itself")
    print(f"{'cell':<34}" + "".join(f"{name + ' ' + '/'.join(steps):>30}" for name in FORECASTS))
    for cell, row in result.items():
        print(f"{cell:<34}" + "".join(f"{'/'.join(f'{row[n][s]:.3f}' for s in steps):>30}" for n in FORECASTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
