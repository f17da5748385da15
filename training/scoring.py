"""Stage 4 of a run, the scores: every model and baseline on the held-out windows, told what a plant can send,
per regime/policy cell, with the diagnostics beside (other requests, sensor gaps, an influent forecast, the
loops' own forecasts). ``training.report`` writes them out."""

from __future__ import annotations

from typing import Any

import numpy as np

from training import evaluate as ev
from training.config import RunConfig
from training.data import Windows
from training.forecast import predict
from training.gaps import with_gap
from training.model import KoVAE
from training.prepare import Prepared
from training.requests import REQUESTS


def scored_table(
    p: Prepared, mean: np.ndarray, band: np.ndarray | None, w: Windows, groups: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """``ev.regime_table`` of a forecast of ``w`` (all of x's columns) scored on the catalog's targets, per
    regime/policy cell (or per ``groups``: scenario id -> group)."""
    n = p.n_targets
    band = None if band is None else band[..., :n]
    groups = groups or p.cells()
    return ev.regime_table(mean[..., :n], band, p.scored(w), groups, p.test_scale[:n], p.catalog.plant_positions())


def top5_indices(p: Prepared) -> list[int]:
    """The five variables with the highest training variance in engineering units."""
    n = p.n_targets
    train_var = np.nanvar(np.concatenate([s[0][:, :n] for s in p.train_series]), 0) * p.x_std[:n] ** 2
    return [int(i) for i in np.argsort(-train_var)[:5]]


GATE_RULE = (
    "worst held-out regime/policy cell's pooled skill (all variables; against the better of persistence and "
    "seasonal naive) averaged over 15 min, 5 h and 24 h, higher is better; and no cell may lose to the naive "
    "forecasts at any of those lead times more than under the served version"
)


def evaluate_all(model: KoVAE, p: Prepared, cfg: RunConfig, calib: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Every model on the held-out windows, told what a plant can send (the honest request: looped controls left
    to their loops, setpoints planned or held, open-loop controls planned); returns (metrics, forecasts kept for
    plots). Forecasts told the true future of every control are a diagnostic (``requests``), never the headline."""
    w, n = p.test, p.n_targets
    scored = p.scored(w)
    names = p.catalog.target_names
    mean, band = predict(model, p, w, cfg.train.calibration_samples, calib, seed=2)
    arx = {lags: ev.ARX(lags).fit(p.train_series) for lags in (1, 4)}
    u_fut = p.inputs(w)[1][..., p.baseline_columns()]  # the baselines get the controls and the clock, as the KoVAE
    forecasts = {
        "kovae": mean[..., :n],
        "persistence": ev.persistence(scored),
        "seasonal_naive": ev.seasonal_naive(scored),
        "dmdc": p.dx(arx[1].forecast(p.nx(w.x_hist), u_fut))[..., :n],
        "arx4": p.dx(arx[4].forecast(p.nx(w.x_hist), u_fut))[..., :n],
    }
    tables = {k: ev.error_table(v, scored.x_fut) for k, v in forecasts.items()}
    top5 = top5_indices(p)
    metrics: dict[str, Any] = {
        "request": "honest: " + REQUESTS["honest"],
        "test_scenarios": list(p.split_ids["test"]),
        "test_windows": len(w.x_hist),
        "top5_variables": [names[i] for i in top5],
        "top5_rule": "five highest variances in engineering units on the training scenarios",
        "headline": {k: ev.headline(t, tables["persistence"], p.x_std[:n], top5) for k, t in tables.items()},
        "coverage_80_test": ev.interval_coverage(band[..., :n], scored.x_fut),
        "per_variable": {
            str(h): ev.per_variable(tables["kovae"], p.x_std[:n], names, h)
            for h in ev.headline_horizons(cfg.train.horizon)
        },
        "rmse_by_horizon": {k: t["rmse"].tolist() for k, t in tables.items()},
    }
    metrics["regimes"] = scored_table(p, mean, band, w)
    metrics["by_regime"] = scored_table(p, mean, band, w, p.groups)
    metrics["missing"] = p.missing
    metrics["dropped_windows"] = p.dropped
    metrics["history_gaps"] = gap_scores(model, p, calib, metrics["regimes"])
    if p.disturbances:
        metrics["influent_forecast"] = forecast_scores(model, p, calib, metrics["by_regime"])
    if p.n_setpoints:
        metrics["requests"] = request_scores(model, p, cfg, calib, (mean, band))
    if p.looped:
        metrics["loop_outputs"] = loop_scores(mean, band, p, w)
    metrics["score"] = ev.gate_score(metrics["regimes"])
    metrics["score_rule"] = GATE_RULE
    return metrics, {"forecasts": forecasts, "band": band[..., :n], "windows": scored}


def request_scores(
    model: KoVAE, p: Prepared, cfg: RunConfig, calib: dict[str, Any], honest: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Per regime/policy cell, pooled skill told each other request (``training.requests.REQUESTS``), and the
    coverage of the held one (the diagnostics' is not scored). ``honest``: the honest request's (mean, band), from
    which the held request copies the windows it tells alike."""
    out = {}
    for request in ("held", "applied", "bare"):
        # The diagnostics (every control's true future) are scored on their mean alone: 200 samples a window
        # for three more requests would double the run's evaluation time.
        samples = cfg.train.calibration_samples if request == "held" else 0
        same = ("honest", *honest) if request == "held" else None
        mean, band = predict(model, p, p.test, samples, calib, seed=2, request=request, same_as=same)
        out[request] = {"words": REQUESTS[request], "regimes": scored_table(p, mean, band, p.test)}
    return out


def loop_scores(mean: np.ndarray, band: np.ndarray | None, p: Prepared, w: Windows) -> dict[str, Any]:
    """The looped controls' forecasts (what each loop will apply) where the honest request left them to their
    loops: RMSE at 15 min, 5 h and 24 h against the last value's and the same time yesterday's, per loop
    control (a loop's output follows the daily load: the last value alone is a weak reference at 5 h), and the
    80% band's coverage (``band``, (N, 2, H, x); none without samples)."""
    closed = p.closed_loops(w)
    out: dict[str, Any] = {}
    steps = ev.pooled_steps(w.x_fut.shape[1])
    for j, c in enumerate(p.looped):
        k, col = closed[:, j], p.n_targets + j
        if not k.any():
            continue
        truth = w.x_fut[k][..., col : col + 1]
        err = ev.error_table(mean[k][..., col : col + 1], truth)["rmse"][:, 0]
        ref = ev.error_table(ev.persistence(w)[k][..., col : col + 1], truth)["rmse"][:, 0]
        day = ev.error_table(ev.seasonal_naive(w)[k][..., col : col + 1], truth)["rmse"][:, 0]
        out[p.catalog.control_names[c]] = {
            "windows": int(k.sum()),
            "unit": p.catalog.controls[c].unit,
            "rmse": {str(s): float(err[s - 1]) for s in steps},
            "persistence_rmse": {str(s): float(ref[s - 1]) for s in steps},
            "yesterday_rmse": {str(s): float(day[s - 1]) for s in steps},
        }
        if band is not None:
            out[p.catalog.control_names[c]]["coverage_80"] = ev.interval_coverage(band[k][..., col : col + 1], truth)
    return out


def gap_scores(
    model: KoVAE, p: Prepared, calib: dict[str, Any], complete: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Pooled skill (all variables, all held-out windows) with sensor gaps in the history: none (``complete``,
    the regime table already scored), one sensor's last 2 hours, a quarter of one sensor's history. Against
    naive forecasts given the same gaps (the skill: what the model adds to what the same data tell), and, as
    "<case>, complete references", against the complete history's (what the gap costs the forecast itself:
    the naive references lose by the gap too, and a quarter of a sensor's history missing scored above the
    complete history against them, 0.350 against 0.340 at 15 min)."""
    out = {"none": complete["all"]["pooled_skill_all"]}
    for case in ("last_2h", "quarter"):
        w = with_gap(p.test, case, p.catalog.sample_minutes, p.n_targets)
        mean, _ = predict(model, p, w, 0, calib)
        everything = {k: "all" for k in p.groups}
        out[case] = scored_table(p, mean, None, w, everything)["all"]["pooled_skill_all"]
        out[f"{case}, complete references"] = scored_table(p, mean, None, p.test, everything)["all"]["pooled_skill_all"]
    return out


def forecast_scores(
    model: KoVAE, p: Prepared, calib: dict[str, Any], without: dict[str, dict[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per regime, pooled skill with no forecast of the disturbances (the served default), a noisy one (the error
    training adds: train.forecast_noise at the horizon, growing as sqrt(lead time)) and a perfect one; the 80%
    coverage too with the noisy one. Both are diagnostics: the truth, or the truth plus synthetic noise, which no
    caller has (a real forecast's errors are not white noise around the truth). All in the honest request."""
    out = {"none": without}
    for mode, samples in (("noisy", calib["samples"]), ("perfect", 0)):
        mean, band = predict(model, p, p.test, samples, calib, seed=3, forecast=mode)
        out[mode] = scored_table(p, mean, band, p.test, p.groups)
    return out
