"""The interval width (``training.model.IntervalWidth``), fitted on validation after the other calibrated terms:
how far each forecast sample's deviation from the mean is scaled so that the 80% band covers 80%, per variable,
per way of telling the model its inputs and per plan that moved or stood still."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training import evaluate as ev
from training.data import Windows
from training.forecast import SaturatingSamples, predict
from training.model import (
    BAND_MARGIN,
    DRIVER_CLIP,
    STEPS_PER_DAY,
    IntervalWidth,
    KoVAE,
    band_space,
    driver_level,
    plan_moved,
)
from training.prepare import Prepared, tensors

MOTION_RATIO = (0.5, 2.0)  # a plan's motion over the history changes the width at most this much
WIDTH_GAMMAS = tuple(round(0.05 * i, 2) for i in range(21))  # log-width per z-score of the width's driver


def fit_spread(
    mean: np.ndarray,
    dev: np.ndarray,
    truth: np.ndarray,
    factor: np.ndarray,
    saturating: dict[int, SaturatingSamples] | None = None,
) -> np.ndarray:
    """Per variable, the factor on the sample band's deviations from the mean (dev, (N, 2, H, x), each window's
    already times ``factor``, (N,) or per variable (N, x)) under which the band covers 80% of the truth:
    bisection on a log scale. A variable with no truth here (NaN: not forecast in these windows) keeps 1.

    A positive factor on every sample's deviation from the mean scales the band's deviation the same way, so the
    band of the unscaled samples is all the fit needs; but for an output a loop's limit holds (``saturating``,
    the same windows' samples), whose samples at the limit the graph keeps, the band is computed from the
    samples at each factor tried."""
    spread = np.ones(mean.shape[-1])
    factor = np.broadcast_to(factor.reshape(len(factor), -1), (len(factor), mean.shape[-1]))  # (N,) or (N, x)
    scaled = dev * factor[:, None, None, :]
    saturating = saturating or {}
    for j in range(mean.shape[-1]):
        m, d, t = mean[:, None, :, j : j + 1], scaled[..., j : j + 1], truth[..., j : j + 1]
        if not np.isfinite(t).any():
            continue

        def band(f: float, j: int = j, m: np.ndarray = m, d: np.ndarray = d) -> np.ndarray:
            if j in saturating:
                return saturating[j].band(f * factor[:, j])[..., None]
            return m + f * d

        lo, hi = -6.0, 10.0  # log2 of the factor
        for _ in range(24):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ev.interval_coverage(band(2**mid), t) < 0.8 else (lo, mid)
        spread[j] = 2 ** ((lo + hi) / 2)
    return spread


def widened(
    mean: np.ndarray, band: np.ndarray, factor: np.ndarray, saturating: dict[int, SaturatingSamples] | None = None
) -> np.ndarray:
    """The band (N, 2, H, x) with its deviations from the mean (N, H, x) times ``factor`` (broadcast; per window
    and variable (N, 1, 1, x) where ``saturating`` is given): the outputs a loop's limit holds from their samples
    (``fit_spread``)."""
    out = mean[:, None] + factor * (band - mean[:, None])
    for j, samples in (saturating or {}).items():
        scale = np.broadcast_to(factor, (len(mean), 1, 1, mean.shape[-1]))[:, 0, 0, j]
        out[..., j] = samples.band(scale)
    return out


def subset(saturating: dict[int, SaturatingSamples], rows: np.ndarray) -> dict[int, SaturatingSamples]:
    return {j: samples[rows] for j, samples in saturating.items()}


def coverage_by_group(band: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return {str(g): ev.interval_coverage(band[groups == g], truth[groups == g]) for g in dict.fromkeys(groups)}


def window_levels(p: Prepared, w: Windows) -> np.ndarray:
    """(N,) each window's ``driver_level`` (z-scores) as the graph reads it; zeros without a driver."""
    if p.width_driver is None:
        return np.zeros(len(w.x_hist))
    return driver_level(torch.from_numpy(p.nx(w.x_hist)), p.width_driver).double().numpy()


def fit_width(
    mean: np.ndarray,
    dev: np.ndarray,
    truth: np.ndarray,
    level: np.ndarray,
    groups: np.ndarray,
    saturating: dict[int, SaturatingSamples] | None = None,
) -> tuple[float, np.ndarray]:
    """(gamma, spread): the width exp(gamma * level) * spread[v] (``IntervalWidth``) whose validation coverage
    is 80% per variable and, of WIDTH_GAMMAS, closest to 80% in every validation regime and in every quarter of
    the driver's levels (least sum of squares over both). One width covered storms less than calm days; a width
    balanced over the regimes alone widened the wettest windows until they were covered 96% of the time and
    left the driest at 58%. With a level that never changes (no driver), gamma is 0. ``saturating``: as
    ``fit_spread``'s."""
    candidates = WIDTH_GAMMAS if np.ptp(level) > 0 else (0.0,)
    quarters = np.digitize(level, np.quantile(level, [0.25, 0.5, 0.75])).astype(str)
    best: tuple[float, float, np.ndarray] | None = None
    for gamma in candidates:
        factor = np.exp(gamma * level)
        spread = fit_spread(mean, dev, truth, factor, saturating)
        band = widened(mean, mean[:, None] + dev, (spread * factor[:, None])[:, None, None], saturating)
        covered = [*coverage_by_group(band, truth, groups).values(), *coverage_by_group(band, truth, quarters).values()]
        miss = sum((c - 0.8) ** 2 for c in covered)
        if best is None or miss < best[0] - 1e-9:
            best = (miss, gamma, spread)
    assert best is not None
    return best[1], best[2]


def width_factors(width: dict[str, Any], spread: np.ndarray, p: Prepared, w: Windows, **how: Any) -> np.ndarray:
    """(N, x): the factor ``IntervalWidth`` gives each window's sample deviations, told ``how`` (``tensors``'
    forecast and request)."""
    xh, uh, _, uf = tensors(p, w, seed=1, **how)
    module = IntervalWidth(len(p.x_mean), {"spread_scale": spread.tolist(), "width": width})  # no bounds: factors
    with torch.no_grad():
        return module(xh, uf, uh).double().numpy()


def fit_interval_width(model: KoVAE, p: Prepared, decay: np.ndarray, n: int) -> dict[str, Any]:
    """The interval width (``IntervalWidth``) of ``n`` samples, fitted on validation with the model's other
    calibrated terms in place (``decay``, the residual fading; the rest the model holds), and its validation
    coverage: the card's ``spread_scale``, ``width``, ``band_bounds``, ``samples``, ``val_coverage_80`` and
    ``val_coverage_by_regime``.

    The prior noise gives the shape of the forecast distribution; its width, after the decoder, is not
    trustworthy. So each variable's sample deviations from the mean are scaled until the 80% sample interval
    covers 80% of validation truth, times a factor that grows with the width's driver (``fit_width``, on the
    honest request). The base is fitted where loops are closed, told as a plant sends (the looped controls left
    to their loops, the setpoints sent); then, one at a time, each other way of telling gets a ratio per
    variable fitted with the ratios before it in place: the looped controls given (the applied diagnostic), no
    setpoints sent (open-loop windows), an influent forecast. Each covers 80% as it is requested. Last, the
    windows whose plan moved over the history's last day and those whose plan stood still get a ratio each
    (``width.motion``, ``training.model.plan_moved``), so that each covers 80% in the honest request. The
    influent (the catalog's exogenous outputs) takes none of these ratios but the influent forecast's: no plan
    moves it, so its width is fitted on every window. An output a loop's limit can hold (a looped control) is
    fitted from its samples (``SaturatingSamples``), the ones at the limit kept as the graph keeps them.
    """
    w = p.val
    groups = np.array([f"{p.groups.get(s, 'all')}/{p.policies.get(s, '-')}" for s in w.scenario])
    lo, hi = p.output_bounds()
    bounds = {"lo": ((lo - p.x_mean) / p.x_std).tolist(), "hi": ((hi - p.x_mean) / p.x_std).tolist()}
    base = {"residual_decay": decay.tolist(), "band_bounds": bounds}
    runs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, dict[int, SaturatingSamples]]] = {}
    keep = model.saturation() is not None  # a loop's limit holds samples: the fit reads them (``fit_spread``)

    def to_band(v: np.ndarray) -> np.ndarray:
        """Engineering units to band space: everything below is fitted there, where widening is linear."""
        margin = torch.from_numpy(BAND_MARGIN * p.x_std.astype(np.float64))  # the graph's, in engineering units
        return band_space(torch.from_numpy(np.asarray(v, np.float64)), *map(torch.from_numpy, (lo, hi)), margin).numpy()

    honest: list[tuple[np.ndarray, np.ndarray | None]] = []  # its run in engineering units, which held copies

    def run(request: str, forecast: str = "none") -> tuple[np.ndarray, np.ndarray, dict[int, SaturatingSamples]]:
        """(mean, band, the samples a loop's limit holds) in band space, told as ``request`` and ``forecast``."""
        if (request, forecast) not in runs:
            same = ("honest", *honest[0]) if request == "held" and forecast == "none" and honest and not keep else None
            samples: dict[int, SaturatingSamples] | None = {} if keep else None
            mean_, band_ = predict(
                model, p, w, n, base, seed=1, forecast=forecast, request=request, same_as=same, saturating=samples
            )
            if (request, forecast) == ("honest", "none"):
                honest.append((mean_, band_))
            band_ = to_band(band_ if band_ is not None else mean_[:, None])
            runs[request, forecast] = to_band(mean_), band_, samples or {}
        return runs[request, forecast]

    in_band_space = to_band(w.x_fut)  # coverage is the same there: the map is increasing
    loops_closed = p.closed_loops(w)

    def forecast_truth(request: str) -> np.ndarray:
        """The truth of what ``request`` has the model forecast: a looped control's output where the request
        gives the control (its loop open, or the applied diagnostic) is the given plan, a band of no width
        that is no forecast; counted, its float32 round trip missed the truth, and the width of that loop's
        band was driven to the bisection's end (the loops' band over an influent forecast was 2.6 times wider,
        covering 100%)."""
        out = in_band_space.copy()
        for j in range(len(p.looped)):
            given = np.ones(len(out), bool) if request in ("applied", "bare") else ~loops_closed[:, j]
            out[given, :, p.n_targets + j] = np.nan
        return out

    truth = forecast_truth("honest")
    mean, band, saturating = run("honest")
    level = window_levels(p, w)
    gamma, _ = fit_width(mean, band - mean[:, None], truth, level, groups, saturating)
    driver = None if p.width_driver is None else p.catalog.target_names[p.width_driver]
    width: dict[str, Any] = {"driver": p.width_driver, "driver_name": driver, "gamma": gamma}
    width.update(driver_clip=list(DRIVER_CLIP), known=[])
    closed = loops_closed.any(1)
    every = np.ones(len(closed), bool)
    rows = closed if closed.any() else every
    spread = fit_spread(
        mean[rows], band[rows] - mean[rows, None], truth[rows], np.exp(gamma * level[rows]), subset(saturating, rows)
    )
    # The influent (the exogenous outputs, decoded from latent modes no plan drives: model.exogenous_modes) is
    # what it is however the plant is run: its width is fitted on every
    # window and takes no ratio for how the plan is told or moved, only for an influent forecast. Fitted with
    # the plant's (on looped windows, the controls' ratios on open-loop ones), it took the weather of the few
    # validation runs of each policy: 1.35 times wider open loop (a storm among them), and closed loop in a
    # storm the influent's band covered 64% of the flows.
    exo = list(p.plan.exogenous) if model.n_exo else []  # a model without exogenous modes: the plan moves it
    if exo:
        spread[exo] = fit_spread(
            mean[..., exo], (band - mean[:, None])[..., exo], truth[..., exo], np.exp(gamma * level)
        )
    # Each other way of telling: (what it is called, its flags, ratio when they are set or not, how it is told,
    # the windows it is fitted on).
    steps: list[tuple[str, str, str, dict[str, str], np.ndarray]] = []
    if p.looped and closed.any():
        steps.append(("looped controls given", "controls", "known", {"request": "applied"}, closed))
        if not closed.all():
            steps.append(("no setpoints", "setpoints", "unknown", {"request": "honest"}, ~closed))
    elif p.n_setpoints:
        steps.append(("setpoints", "setpoints", "known", {"request": "applied"}, every))
    if p.disturbances:
        steps.append(("disturbance forecast", "disturbances", "known", {"forecast": "noisy"}, every))
    for name, kind, when, how, rows in steps:
        mean_k, band_k, saturating_k = run(how.get("request", "honest"), how.get("forecast", "none"))
        factor = width_factors(width, spread, p, w, **how)[rows]
        dev = (band_k - mean_k[:, None])[rows]
        told_truth = forecast_truth(how.get("request", "honest"))[rows]
        ratio = fit_spread(mean_k[rows], dev, told_truth, factor, subset(saturating_k, rows))
        if kind != "disturbances":
            ratio[exo] = 1.0
        width["known"].append({"input": name, "columns": p.flag_columns(kind), "when": when, "ratio": ratio.tolist()})
    # Last, a plan that moved over the history's last day and one that stood still, each covering 80% of its
    # own validation windows in the honest request (a width fitted on both covered the first less).
    columns = p.motion_columns()
    _, uh, _, _ = tensors(p, w, seed=1)
    moved = plan_moved(uh, columns, STEPS_PER_DAY).numpy() > 0.5
    if columns and moved.any() and not moved.all():
        factor = width_factors(width, spread, p, w)
        dev = band - mean[:, None]
        # Clipped: a variable whose band hardly moves with its width (one the plan holds still) would otherwise
        # take the bisection's end, 2^-6 or 2^10.
        ratios = {
            key: np.clip(
                fit_spread(mean[rows], dev[rows], truth[rows], factor[rows], subset(saturating, rows)), *MOTION_RATIO
            )
            for key, rows in (("moved", moved), ("still", ~moved))
        }
        for r in ratios.values():
            r[exo] = 1.0
        width["motion"] = {"columns": columns, "steps": STEPS_PER_DAY, **{k: r.tolist() for k, r in ratios.items()}}
    coverage = {}
    for request in ("honest", "held", "applied") if p.n_setpoints else ("bare",):
        mean_r, band_r, saturating_r = run(request)
        factor = width_factors(width, spread, p, w, request=request)
        told = widened(mean_r, band_r, factor[:, None, None, :], saturating_r)
        coverage[request] = coverage_by_group(told, forecast_truth(request), groups)
    if p.disturbances:
        mean_r, band_r, saturating_r = run("honest", "noisy")
        factor = width_factors(width, spread, p, w, request="honest", forecast="noisy")
        told = widened(mean_r, band_r, factor[:, None, None, :], saturating_r)
        coverage["honest + influent forecast"] = coverage_by_group(told, truth, groups)
    served = widened(mean, band, width_factors(width, spread, p, w)[:, None, None, :], saturating)
    return {
        "spread_scale": spread.tolist(),
        "width": width,
        # The outputs' physical bounds (normalised): the samples are widened in band space (the logit of each
        # value's place in its range), so no band leaves them.
        "band_bounds": bounds,
        "samples": n,  # the width holds for quantiles from this many samples
        "val_coverage_80": ev.interval_coverage(served, truth),
        "val_coverage_by_regime": coverage,
    }
