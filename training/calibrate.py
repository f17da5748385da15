"""Stage 3 of a run: forecasts in engineering units, and the calibration fitted on validation after training.

All of it (residual fading, naive blends, interval width) is applied inside the ONNX graph as constants.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from training import evaluate as ev
from training.config import RunConfig
from training.data import Windows
from training.gaps import fit_gap_pull
from training.model import (
    BAND_MARGIN,
    DRIVER_CLIP,
    STEPS_PER_DAY,
    IntervalWidth,
    KoVAE,
    band_space,
    calibrated_samples,
    driver_level,
    held_plan,
    plan_moved,
)
from training.prepare import Prepared, tensors


def predict(
    model: KoVAE,
    p: Prepared,
    w: Windows,
    n_samples: int = 0,
    calib: dict[str, Any] | None = None,
    seed: int = 0,
    forecast: str = "none",
    request: str = "honest",
    held: bool = False,
    same_as: tuple[str, np.ndarray, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """KoVAE mean forecast (N, H, x) in engineering units for a set of windows, and with ``n_samples`` the band
    of the samples (``ev.sample_band``, (N, 2, H, x)), computed a chunk of windows at a time so that hundreds of
    samples per window never sit in memory at once.

    ``forecast`` is what the model is told of the future disturbances, ``request`` what it is told of the
    controls and setpoints (training.requests.REQUESTS); ``held``: the forecast under the plan held
    (training.model.held_plan), what the naive blends read.
    ``calib`` is the calibration the graph applies: ``residual_decay`` fades the decoder's miss at the last
    history step into the forecast, and ``spread_scale`` and ``width`` (``IntervalWidth``) widen each sample's
    deviation from the mean.
    ``same_as``: (request, mean, band) of a forecast of the same windows with the same ``forecast``, samples and
    calibration, told as that request tells. The windows it tells exactly as ``request`` does are copied from it
    and only the others forecast: the held request differs from the honest one only where a setpoint plan moves,
    a third of the held-out windows, and a sampled forecast is most of a run's evaluation time.
    """
    if same_as is not None and (held or (same_as[2] is None and n_samples)):
        raise ValueError("predict: same_as copies a forecast of its request's own plan, with its band")
    xh, uh, _, uf = tensors(p, w, forecast, seed, request)
    if held:
        uf = held_plan(uh, uf, model.plan)
    todo = np.ones(len(xh), bool)
    if same_as is not None:
        _, uh_o, _, uf_o = tensors(p, w, forecast, seed, same_as[0])
        todo = ~(told_alike(uh, uh_o) & told_alike(uf, uf_o))
        xh, uh, uf = xh[todo], uh[todo], uf[todo]
    calib = calib or {}
    decay = calib.get("residual_decay")
    decay = None if decay is None else torch.as_tensor(decay, dtype=torch.float32)
    width = IntervalWidth(model.x_dim, calib)
    means, bands = [], []
    g = torch.Generator().manual_seed(seed)
    chunk = 256 if n_samples == 0 else max(1, 4096 // n_samples)
    with torch.no_grad():
        for s in range(0, len(xh), chunk):
            sl = slice(s, s + chunk)
            mean = model.forecast(xh[sl], uh[sl], uf[sl], residual_decay=decay)
            means.append(mean.numpy())
            if n_samples:
                eps = torch.randn(len(xh[sl]), n_samples, uf.shape[1], model.cfg.z_dim, generator=g)
                raw = model.forecast(xh[sl], uh[sl], uf[sl], eps, residual_decay=decay)
                factor = width(xh[sl], uf[sl], uh[sl])
                samples = calibrated_samples(mean, raw, factor, width.bounds, model.saturation())
                bands.append(p.dx(ev.sample_band(samples.numpy())))
    mean_x = p.dx(np.concatenate(means)) if means else np.zeros((0, *w.x_fut.shape[1:-1], model.x_dim))
    band_x = (np.concatenate(bands) if bands else mean_x[:, None].repeat(2, 1)) if n_samples else None
    if same_as is None:
        return mean_x, band_x
    mean_all = same_as[1].copy()
    mean_all[todo] = mean_x
    if band_x is None:
        return mean_all, None
    band_all = np.asarray(same_as[2]).copy()
    band_all[todo] = band_x
    return mean_all, band_all


def told_alike(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N,) bool: each window's inputs the same in both tensors (N, ...), NaN (not told) in the same places."""
    return ((a == b) | (torch.isnan(a) & torch.isnan(b))).flatten(1).all(1).numpy()


MOTION_RATIO = (0.5, 2.0)  # a plan's motion over the history changes the width at most this much
COLLINEAR = 1e-3  # below this det / (aa bb) the two naive regressors count as one


def naive_forecasts(w: Windows, season: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, x) the two naive forecasts the blends lean on, as the model sees them: the same time ``season``
    steps earlier (NaN where not in the history or k > season), and the last measured value."""
    L = w.x_hist.shape[1]
    H = w.x_fut.shape[1]
    k = np.arange(1, H + 1)
    idx = k + L - 1 - season
    yesterday = w.x_hist[:, np.clip(idx, 0, L - 1)].astype(np.float64)
    yesterday[:, (idx < 0) | (k > season)] = np.nan
    return yesterday, ev.persistence(w).astype(np.float64)


@contextmanager
def blends_off(model: KoVAE) -> Iterator[None]:
    """The model's forecast without its two naive blends (weights ~0), restored on exit. Under
    model.loop_feedback the looped controls keep theirs: the loops drive the plant at their blended forecast, so
    without it every other variable's forecast would be another one than the served (``calibrated_columns``)."""
    saved = model.seasonal_logit.data.clone(), model.persistence_logit.data.clone()
    off = torch.from_numpy(calibrated_columns(model))
    model.seasonal_logit.data.masked_fill_(off, -1e4)
    model.persistence_logit.data.masked_fill_(off, -1e4)
    try:
        yield
    finally:
        model.seasonal_logit.data.copy_(saved[0])
        model.persistence_logit.data.copy_(saved[1])


def calibrated_columns(model: KoVAE) -> np.ndarray:
    """(x,) which outputs calibration refits the fading and the naive blends of, each on its own: all but the
    looped controls under model.loop_feedback, whose blended forecast drives the plant inside the rollout (so
    their weights move every other variable's forecast, and keep what training learned)."""
    columns = np.ones(model.x_dim, bool)
    if model.feedback:
        columns[model.x_dim - len(model.plan.looped) :] = False
    return columns


DECAY_GRID = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)  # per step: half-lives of 45 min to 7 days at 15 min


def fit_residual_decay(model: KoVAE, p: Prepared) -> np.ndarray:
    """The fading g of the decoder's miss at the last history step, per variable: of the learned g and
    DECAY_GRID, the one with the least validation error of the forecast before the blends.

    Training hardly moves g from its start (0.88, a half-life of 1.3 h), too fast for slow variables (the
    temperature, the sludge blanket) whose measured level should carry for days.
    """
    with torch.no_grad():
        learned = model.residual_decay().double().numpy()
    own = calibrated_columns(model)
    candidates = [learned, *(np.where(own, g, learned) for g in DECAY_GRID)]
    errors = []
    with blends_off(model):
        for g in candidates:
            mean = predict(model, p, p.val, 0, {"residual_decay": g.tolist()})[0]
            errors.append(np.nanmean(((mean - p.val.x_fut) / p.x_std) ** 2, axis=(0, 1)))
    best = np.argmin(np.array(errors), axis=0)
    return np.array([candidates[c][j] for j, c in enumerate(best)])


def blend_weights(A: np.ndarray, B: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares per (step, variable) over the windows (axis 0) of T ~ a A + b B, with A the day-earlier
    and B the last value minus the forecast, and T the truth minus it; returned as the blends (s, q) with
    s = a / (1 - b), q = b, clipped to [0, 1].

    Near a day ahead the day-earlier value is (almost) the last one: the two regressors coincide and the 2x2
    system is singular. There one weight, towards the last value, is fitted (s = 0).
    """
    aa, bb, ab = (A * A).sum(0), (B * B).sum(0), (A * B).sum(0)
    at, bt = (A * T).sum(0), (B * T).sum(0)
    det = aa * bb - ab * ab
    two = det > COLLINEAR * aa * bb
    det = np.where(two, det, 1.0)
    q = np.clip(np.where(two, (aa * bt - ab * at) / det, bt / np.maximum(bb, 1e-12)), 0.0, 0.999)
    return np.where(two, np.clip(((bb * at - ab * bt) / det) / (1 - q), 0.0, 1.0), 0.0), q


C_FACTORS = tuple(float(2.0**e) for e in range(-4, 5))  # the factors of the model's own error c tried per (k, v)
# c is refitted at a lead time only where that cuts the validation error by this share on each half (fitted on
# the other): on the default's validation windows, beyond 5 h the refits cut the error of the windows they were
# fitted on by 1-4% and that of the other half by -1% to +2%, so a smaller gain says nothing. Elsewhere q alone.
C_MIN_GAIN = 0.02


def rescaled(s: np.ndarray, factor: np.ndarray | float) -> np.ndarray:
    """The adaptive weight of yesterday, s = c / (c + m2), with c multiplied by ``factor``."""
    return factor * s / np.maximum(factor * s + 1.0 - s, 1e-12)


def adaptive_blend_weights(
    s: np.ndarray, A: np.ndarray, B: np.ndarray, T: np.ndarray, seen: np.ndarray, factors: tuple[float, ...] = C_FACTORS
) -> tuple[np.ndarray, np.ndarray]:
    """Per (step, variable), over the windows (axis 0): the factor of c (of ``factors``) and the weight q of
    the last value that fit T ~ s' A + q (B - s' A) best in least squares, with s' each window's own weight
    ``s`` rescaled by the factor (``rescaled``), A the day-earlier and B the last value minus the forecast, T the
    truth minus it, counted where ``seen`` (the truth measured)."""
    best_err = best_f = best_q = None
    for f in factors:
        a = rescaled(s, f) * A
        r = (B - a) * seen
        q = np.clip(((T - a) * r).sum(0) / np.maximum((r**2).sum(0), 1e-12), 0.0, 0.999)
        err = (((a + q * (B - a) - T) * seen) ** 2).sum(0)
        if best_err is None:
            best_err, best_f, best_q = err, np.full(err.shape, f), q
        else:
            better = err < best_err
            best_err, best_f, best_q = (
                np.where(better, new, old) for new, old in ((err, best_err), (f, best_f), (q, best_q))
            )
    return best_f, best_q


def fit_naive_blends(model: KoVAE, p: Prepared, calib: dict[str, Any]) -> dict[str, Any]:
    """Refit the blend weights towards the two naive forecasts on validation, per lead time and variable, where
    that helps on windows it was not fitted on; writes them into the model (and so into the graph).

    Training learns the weights on windows with artificial gaps and influent forecasts; the weights a plain
    forecast needs differ. Per (k, v) least squares gives forecast + a (yesterday - held) + b (last - held),
    with held the forecast under the plan held (what the blends read, training.model.held_plan; the forecast
    itself when the plan is held), i.e. s = a / (1 - b), q = b, clipped to [0, 1]. A lead time k takes the
    refitted weights only if, fitted on either half of the validation windows, they beat the learned ones on the
    other half (pooled NMSE).
    With the adaptive weight of yesterday (``model.seasonal_adaptive``, s = c / (c + m2) per window) the model's
    own error c is rescaled per (k, v) and q fitted given it (``adaptive_blend_weights``) at the lead times where
    that cuts the error of the other half by ``C_MIN_GAIN`` on both halves; elsewhere q alone is fitted, c kept.
    Each window keeps its own s; validation says how far to trust yesterday against the model. (Refitting q alone
    left c as training learned it, 16 times too high at 15 min: the first steps leaned on yesterday.)
    Without the adaptive weight, where the two naive forecasts coincide (a day ahead) only the weight towards the
    last value is fitted (``blend_weights``): solving for both there once left the learned weights at the last 11
    steps, and the 24-h pooled skill of normal operation at 0.09 instead of 0.23. (With it, each window's own s
    keeps the two apart, and the factor of c is fitted there too.)
    """
    w = p.val
    learned = predict(model, p, w, 0, calib)[0]
    with blends_off(model):
        base = predict(model, p, w, 0, calib)[0].astype(np.float64)  # the forecast before both blends
        held = predict(model, p, w, 0, calib, held=True)[0].astype(np.float64)  # what the blends read
    yesterday, last = naive_forecasts(w, max(model.cfg.seasonal_steps, 1))
    if not model.cfg.blend_held_plan:
        held = base
    A, B = np.nan_to_num(yesterday - held), np.nan_to_num(last - held)
    T = np.nan_to_num(w.x_fut - base)  # a missing truth adds nothing to either side
    H = base.shape[1]

    known = np.isfinite(last)
    adaptive = model.cfg.seasonal_adaptive
    if adaptive:  # yesterday's weight is each window's own (KoVAE.seasonal_weights): its c is rescaled
        with torch.no_grad():
            s_window = model.seasonal_weights(tensors(p, w)[0], H).double().numpy()
        seen = np.isfinite(w.x_fut - base)

    def fit(rows: np.ndarray, factors: tuple[float, ...] = C_FACTORS) -> tuple[np.ndarray, np.ndarray]:
        """(s, q), or with the adaptive weight (c's factor, q)."""
        if not adaptive:
            return blend_weights(A[rows], B[rows], T[rows])
        return adaptive_blend_weights(s_window[rows], A[rows], B[rows] * known[rows], T[rows], seen[rows], factors)

    own = calibrated_columns(model)

    def blended(s_: np.ndarray, q_: np.ndarray, rows: np.ndarray) -> np.ndarray:
        s_ = rescaled(s_window[rows], s_) if adaptive else s_
        out = base[rows] + s_ * A[rows] + q_ * (B[rows] - s_ * A[rows]) * known[rows]
        return np.where(own, out, learned[rows])  # the columns calibration leaves alone are the learned forecast

    def held_out_gain(factors: tuple[float, ...]) -> np.ndarray:
        """(H,): the smaller of the two halves' relative cut of the pooled NMSE, each refitted on the other."""
        halves = [np.arange(len(base)) % 2 == 0, np.arange(len(base)) % 2 == 1]
        gains = []
        for fit_rows, check_rows in (halves, halves[::-1]):
            refit = ev.nmse_by_step(blended(*fit(fit_rows, factors), check_rows), w.x_fut[check_rows], p.x_std)
            gains.append(1 - refit / ev.nmse_by_step(learned[check_rows], w.x_fut[check_rows], p.x_std))
        return np.min(gains, axis=0)

    every = np.ones(len(base), bool)
    plain = (1.0,)  # c as learned: q alone
    with_c = held_out_gain(C_FACTORS) >= C_MIN_GAIN if adaptive else np.zeros(H, bool)
    better = with_c | (held_out_gain(plain) > 0)
    s_all, q_all = fit(every, plain)
    if with_c.any():
        f_c, q_c = fit(every)
        s_all, q_all = np.where(with_c[:, None], f_c, s_all), np.where(with_c[:, None], q_c, q_all)
    with torch.no_grad():
        for logit, weights in [(model.seasonal_logit, s_all), (model.persistence_logit, q_all)]:
            rows = min(H, logit.shape[0])
            take = torch.from_numpy(better[:rows])[:, None] & torch.from_numpy(own)
            if adaptive and logit is model.seasonal_logit:  # c = exp(logit): its factor adds log(factor)
                new = logit[:rows] + torch.from_numpy(np.log(weights[:rows])).float()
            else:
                new = torch.logit(torch.from_numpy(weights[:rows]).float().clamp(1e-4, 1 - 1e-4))
            logit[:rows] = torch.where(take, new, logit[:rows])
    steps = {"refitted_steps": [int(k) + 1 for k in np.flatnonzero(better)]}
    return steps | ({"c_refitted_steps": [int(k) + 1 for k in np.flatnonzero(with_c)]} if adaptive else {})


def least_pull(B: np.ndarray, T: np.ndarray) -> np.ndarray:
    """(H,) per lead time, the weight q in [0, 1] of least squares T ~ q B over the windows (axis 0)."""
    return np.clip((B * T).sum(0) / np.maximum((B * B).sum(0), 1e-12), 0.0, 1.0)


LOOP_BLOCK = 8  # lead times decided together by the loops' pull (2 h at 15 min), as the gap pull's blocks


def loop_pull_table(
    served: np.ndarray, held: np.ndarray, last: np.ndarray, truth: np.ndarray, closed: np.ndarray, first: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The pull (H, loops) of each loop's served forecast (N, H, loops) towards its last value, read from the
    plan held's forecast ``held``: least squares of truth - served on last - held per lead time, over the windows
    where the loop decides (``closed``, (N, loops)). Kept per block of LOOP_BLOCK lead times where, fitted on
    either half of the windows (``first`` or not), it cuts the other half's squared error over the block, both
    ways: decided per lead time, it was kept at scattered steps for cuts of a few thousandths. Per loop: the lead
    steps kept and each half's held-out cut over them (none where nothing is kept: a card holds no null there)."""
    H = truth.shape[1]
    starts = np.arange(0, H, LOOP_BLOCK)
    table, fits = np.zeros(truth.shape[1:]), []
    halves = ((first, ~first), (~first, first))  # (fitted on, checked on)
    for j in range(truth.shape[-1]):
        B, T = last[..., j] - held[..., j], truth[..., j] - served[..., j]
        ok = closed[:, j, None] & np.isfinite(B) & np.isfinite(T)  # (N, H): the loop decides, the truth measured
        B, T = np.where(ok, B, 0.0), np.where(ok, T, 0.0)
        without = [(T[c] ** 2).sum(0) for _, c in halves]
        pulled = [((T[c] - least_pull(B[f], T[f]) * B[c]) ** 2).sum(0) for f, c in halves]
        both = np.add.reduceat((ok[first].any(0) & ok[~first].any(0)).astype(int), starts) > 0
        cuts = [np.add.reduceat(w, starts) < np.add.reduceat(w0, starts) for w, w0 in zip(pulled, without, strict=True)]
        keep = np.repeat(both & cuts[0] & cuts[1], LOOP_BLOCK)[:H]
        table[:, j] = np.round(least_pull(B, T) * keep, 4)  # as the card keeps it: graph and card agree
        cut = (
            [float(1 - w[keep].sum() / w0[keep].sum()) for w, w0 in zip(pulled, without, strict=True)]
            if keep.any()
            else []
        )
        fits.append(
            {"kept_steps": [int(k) + 1 for k in np.flatnonzero(keep)], "held_out_cut": [round(c, 4) for c in cut]}
        )
    return table, fits


def fit_loop_pull(model: KoVAE, p: Prepared, calib: dict[str, Any]) -> dict[str, Any]:
    """The answer's pull of each looped control's forecast towards its last value (``KoVAE.loop_pull``), per lead
    time and loop, fitted on validation windows in the honest request (``loop_pull_table``); writes it into the
    model (and so the graph). The loops' own blends drive the rollout and are not refitted (``calibrated_columns``);
    this pull is the answer's alone.

    Its halves are the validation scenarios' (alternate ones), not alternate windows, whose days overlap.
    """
    model.loop_pull = None
    if not (model.feedback and model.cfg.blend_held_plan):  # without the plan held the answer takes no pull
        return {"table": None}
    w, n = p.val, p.n_targets
    served = predict(model, p, w, 0, calib)[0][..., n:].astype(np.float64)
    held = predict(model, p, w, 0, calib, held=True)[0][..., n:].astype(np.float64)
    last, truth = (a[..., n:].astype(np.float64) for a in (ev.persistence(w), w.x_fut))
    first = np.isin(w.scenario, sorted(set(w.scenario.tolist()))[::2])
    table, fits = loop_pull_table(served, held, last, truth, p.closed_loops(w), first)
    loops = dict(zip(p.output_names[n:], fits, strict=True))
    if not table.any():
        return {"table": None, "loops": loops}
    model.loop_pull = torch.from_numpy(table).float()
    return {"table": table.tolist(), "loops": loops}


WIDTH_GAMMAS = tuple(round(0.05 * i, 2) for i in range(21))  # log-width per z-score of the width's driver


def fit_spread(mean: np.ndarray, dev: np.ndarray, truth: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Per variable, the factor on the sample band's deviations from the mean (dev, (N, 2, H, x), each window's
    already times ``factor``, (N,) or per variable (N, x)) under which the band covers 80% of the truth:
    bisection on a log scale. A variable with no truth here (NaN: not forecast in these windows) keeps 1.

    A positive factor on every sample's deviation from the mean scales the band's deviation the same way, so the
    band of the unscaled samples is all the fit needs."""
    spread = np.ones(mean.shape[-1])
    factor = np.broadcast_to(factor.reshape(len(factor), -1), (len(factor), mean.shape[-1]))  # (N,) or (N, x)
    scaled = dev * factor[:, None, None, :]
    for j in range(mean.shape[-1]):
        m, d, t = mean[:, None, :, j : j + 1], scaled[..., j : j + 1], truth[..., j : j + 1]
        if not np.isfinite(t).any():
            continue
        lo, hi = -6.0, 10.0  # log2 of the factor
        for _ in range(24):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ev.interval_coverage(m + 2**mid * d, t) < 0.8 else (lo, mid)
        spread[j] = 2 ** ((lo + hi) / 2)
    return spread


def widened(mean: np.ndarray, band: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """The band (N, 2, H, x) with its deviations from the mean (N, H, x) times ``factor`` (broadcast)."""
    return mean[:, None] + factor * (band - mean[:, None])


def coverage_by_group(band: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return {str(g): ev.interval_coverage(band[groups == g], truth[groups == g]) for g in dict.fromkeys(groups)}


def window_levels(p: Prepared, w: Windows) -> np.ndarray:
    """(N,) each window's ``driver_level`` (z-scores) as the graph reads it; zeros without a driver."""
    if p.width_driver is None:
        return np.zeros(len(w.x_hist))
    return driver_level(torch.from_numpy(p.nx(w.x_hist)), p.width_driver).double().numpy()


def fit_width(
    mean: np.ndarray, dev: np.ndarray, truth: np.ndarray, level: np.ndarray, groups: np.ndarray
) -> tuple[float, np.ndarray]:
    """(gamma, spread): the width exp(gamma * level) * spread[v] (``IntervalWidth``) whose validation coverage
    is 80% per variable and, of WIDTH_GAMMAS, closest to 80% in every validation regime and in every quarter of
    the driver's levels (least sum of squares over both). One width covered storms less than calm days; a width
    balanced over the regimes alone widened the wettest windows until they were covered 96% of the time and
    left the driest at 58%. With a level that never changes (no driver), gamma is 0."""
    candidates = WIDTH_GAMMAS if np.ptp(level) > 0 else (0.0,)
    quarters = np.digitize(level, np.quantile(level, [0.25, 0.5, 0.75])).astype(str)
    best: tuple[float, float, np.ndarray] | None = None
    for gamma in candidates:
        factor = np.exp(gamma * level)
        spread = fit_spread(mean, dev, truth, factor)
        band = widened(mean, mean[:, None] + dev, spread * factor[:, None, None, None])
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


def calibrate(model: KoVAE, p: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """Fitted on validation after training: the residual fading (``fit_residual_decay``), the naive blends
    refitted (``fit_naive_blends``), a down sensor's pull (``fit_gap_pull``) and the loops' answer pull
    (``fit_loop_pull``); then the interval width (``fit_interval_width``) with all of them in place."""
    decay = fit_residual_decay(model, p)
    faded = {"residual_decay": decay.tolist()}
    blends = fit_naive_blends(model, p, faded)
    gaps = fit_gap_pull(model, p, lambda w_, held: predict(model, p, w_, 0, faded, held=held)[0])
    loops = fit_loop_pull(model, p, faded)
    return {
        "method": "per-variable fading of the decoder's miss at the last step (chosen on validation); the blends "
        "towards the naive forecasts refitted on validation at the lead times where that helps on held-out "
        "validation windows; then the interval width: per-variable scaling of sample deviations from the mean, "
        "widened with the driver's highest level over the history and scaled per way of telling the model its "
        "inputs (looped controls given or left to their loops, setpoints sent or not, an influent forecast), "
        "each fitted on validation as requested, and one ratio for a plan that moved over the history's last day "
        "and one for a plan that stood still",
        "naive_blend": blends,
        # A down sensor's pull towards its last value, (lead time from it, output) (KoVAE.gap_pull); None: none.
        "gap_pull": gaps.pop("table"),
        "gap_pull_fit": gaps,
        # The answer's pull of each looped control towards its last value, (lead time, loop) (KoVAE.loop_pull).
        "loop_pull": loops.pop("table"),
        "loop_pull_fit": loops,
        "residual_decay": decay.tolist(),
        **fit_interval_width(model, p, decay, cfg.train.calibration_samples),
    }


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
    (``width.motion``, ``training.model.plan_moved``), so that each covers 80% in the honest request.
    """
    w = p.val
    groups = np.array([f"{p.groups.get(s, 'all')}/{p.policies.get(s, '-')}" for s in w.scenario])
    lo, hi = p.output_bounds()
    bounds = {"lo": ((lo - p.x_mean) / p.x_std).tolist(), "hi": ((hi - p.x_mean) / p.x_std).tolist()}
    base = {"residual_decay": decay.tolist(), "band_bounds": bounds}
    runs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def to_band(v: np.ndarray) -> np.ndarray:
        """Engineering units to band space: everything below is fitted there, where widening is linear."""
        margin = torch.from_numpy(BAND_MARGIN * p.x_std.astype(np.float64))  # the graph's, in engineering units
        return band_space(torch.from_numpy(np.asarray(v, np.float64)), *map(torch.from_numpy, (lo, hi)), margin).numpy()

    honest: list[tuple[np.ndarray, np.ndarray | None]] = []  # its run in engineering units, which held copies

    def run(request: str, forecast: str = "none") -> tuple[np.ndarray, np.ndarray]:
        if (request, forecast) not in runs:
            same = ("honest", *honest[0]) if request == "held" and forecast == "none" and honest else None
            mean_, band_ = predict(model, p, w, n, base, seed=1, forecast=forecast, request=request, same_as=same)
            if (request, forecast) == ("honest", "none"):
                honest.append((mean_, band_))
            runs[request, forecast] = to_band(mean_), to_band(band_ if band_ is not None else mean_[:, None])
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
    mean, band = run("honest")
    level = window_levels(p, w)
    gamma, _ = fit_width(mean, band - mean[:, None], truth, level, groups)
    driver = None if p.width_driver is None else p.catalog.target_names[p.width_driver]
    width: dict[str, Any] = {"driver": p.width_driver, "driver_name": driver, "gamma": gamma}
    width.update(driver_clip=list(DRIVER_CLIP), known=[])
    closed = loops_closed.any(1)
    every = np.ones(len(closed), bool)
    rows = closed if closed.any() else every
    spread = fit_spread(mean[rows], band[rows] - mean[rows, None], truth[rows], np.exp(gamma * level[rows]))
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
        mean_k, band_k = run(how.get("request", "honest"), how.get("forecast", "none"))
        factor = width_factors(width, spread, p, w, **how)[rows]
        dev = (band_k - mean_k[:, None])[rows]
        ratio = fit_spread(mean_k[rows], dev, forecast_truth(how.get("request", "honest"))[rows], factor)
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
            key: np.clip(fit_spread(mean[rows], dev[rows], truth[rows], factor[rows]), *MOTION_RATIO)
            for key, rows in (("moved", moved), ("still", ~moved))
        }
        width["motion"] = {"columns": columns, "steps": STEPS_PER_DAY, **{k: r.tolist() for k, r in ratios.items()}}
    coverage = {}
    for request in ("honest", "held", "applied") if p.n_setpoints else ("bare",):
        mean_r, band_r = run(request)
        factor = width_factors(width, spread, p, w, request=request)
        told = widened(mean_r, band_r, factor[:, None, None, :])
        coverage[request] = coverage_by_group(told, forecast_truth(request), groups)
    if p.disturbances:
        mean_r, band_r = run("honest", "noisy")
        factor = width_factors(width, spread, p, w, request="honest", forecast="noisy")
        told = widened(mean_r, band_r, factor[:, None, None, :])
        coverage["honest + influent forecast"] = coverage_by_group(told, truth, groups)
    honest = widened(mean, band, width_factors(width, spread, p, w)[:, None, None, :])
    return {
        "spread_scale": spread.tolist(),
        "width": width,
        # The outputs' physical bounds (normalised): the samples are widened in band space (the logit of each
        # value's place in its range), so no band leaves them.
        "band_bounds": bounds,
        "samples": n,  # the width holds for quantiles from this many samples
        "val_coverage_80": ev.interval_coverage(honest, truth),
        "val_coverage_by_regime": coverage,
    }
