"""Stage 3 of a run: forecasts in engineering units, and the calibration fitted on validation after training.

All of it (residual fading, naive blends, interval width) is applied inside the ONNX graph as constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modelcard.card import last_observed
from training import evaluate as ev
from training.config import RunConfig
from training.data import Windows
from training.model import KoVAE, calibrated_samples
from training.prepare import Prepared, tensors


def predict(
    model: KoVAE,
    p: Prepared,
    w: Windows,
    n_samples: int = 0,
    calib: dict[str, Any] | None = None,
    seed: int = 0,
    forecast: str = "none",
) -> tuple[np.ndarray, np.ndarray | None]:
    """KoVAE mean forecast (and samples) in engineering units for a set of windows.

    ``forecast`` is what the model is told of the future disturbances (training.prepare.tensors).
    ``calib`` is the calibration the graph applies: ``residual_decay`` fades the decoder's miss at the last
    history step into the forecast, and ``spread_scale`` widens each sample's deviation from the mean.
    """
    xh, uh, _, uf = tensors(p, w, forecast, seed)
    calib = calib or {}
    decay = calib.get("residual_decay")
    decay = None if decay is None else torch.as_tensor(decay, dtype=torch.float32)
    spread = torch.as_tensor(calib.get("spread_scale", np.ones(model.x_dim)), dtype=torch.float32)
    means, samples = [], []
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(0, len(xh), 256):
            sl = slice(s, s + 256)
            mean = model.forecast(xh[sl], uh[sl], uf[sl], residual_decay=decay)
            means.append(mean.numpy())
            if n_samples:
                eps = torch.randn(len(xh[sl]), n_samples, uf.shape[1], model.cfg.z_dim, generator=g)
                raw = model.forecast(xh[sl], uh[sl], uf[sl], eps, residual_decay=decay)
                samples.append(calibrated_samples(mean, raw, spread).numpy())
    mean = p.dx(np.concatenate(means))
    return mean, (p.dx(np.concatenate(samples)) if n_samples else None)


def naive_forecasts(w: Windows, season: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, x) the two naive forecasts the blends lean on, as the model sees them: the same time ``season``
    steps earlier (NaN where not in the history or k > season), and the last measured value."""
    L = w.x_hist.shape[1]
    H = w.x_fut.shape[1]
    k = np.arange(1, H + 1)
    idx = k + L - 1 - season
    yesterday = w.x_hist[:, np.clip(idx, 0, L - 1)].astype(np.float64)
    yesterday[:, (idx < 0) | (k > season)] = np.nan
    return yesterday, np.repeat(last_observed(w.x_hist)[:, None], H, 1).astype(np.float64)


def fit_naive_blends(model: KoVAE, p: Prepared, calib: dict[str, Any]) -> dict[str, Any]:
    """Refit the blend weights towards the two naive forecasts on validation, per lead time and variable, where
    that helps on windows it was not fitted on; writes them into the model (and so into the graph).

    Training learns the weights on windows with artificial gaps and influent forecasts; the weights a plain
    forecast needs differ. Per (k, v) least squares gives forecast + a (yesterday - forecast) + b (last -
    forecast), i.e. s = a / (1 - b), q = b, clipped to [0, 1]. A lead time k takes the refitted weights only if,
    fitted on either half of the validation windows, they beat the learned ones on the other half (pooled NMSE).
    """
    w = p.val
    learned = predict(model, p, w, 0, calib)[0]
    saved = model.seasonal_logit.data.clone(), model.persistence_logit.data.clone()
    model.seasonal_logit.data.fill_(-1e4)
    model.persistence_logit.data.fill_(-1e4)
    base = predict(model, p, w, 0, calib)[0].astype(np.float64)  # the forecast before both blends
    model.seasonal_logit.data.copy_(saved[0])
    model.persistence_logit.data.copy_(saved[1])
    yesterday, last = naive_forecasts(w, max(model.cfg.seasonal_steps, 1))
    A, B = np.nan_to_num(yesterday - base), np.nan_to_num(last - base)
    T = np.nan_to_num(w.x_fut - base)  # a missing truth adds nothing to either side
    H = base.shape[1]

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a_, b_, t_ = A[rows], B[rows], T[rows]
        aa, bb, ab = (a_ * a_).sum(0), (b_ * b_).sum(0), (a_ * b_).sum(0)
        at, bt = (a_ * t_).sum(0), (b_ * t_).sum(0)
        det = aa * bb - ab * ab + 1e-9
        q = np.clip((aa * bt - ab * at) / det, 0.0, 0.999)
        return np.clip(((bb * at - ab * bt) / det) / (1 - q), 0.0, 1.0), q

    def blended(s_: np.ndarray, q_: np.ndarray, rows: np.ndarray) -> np.ndarray:
        f = base[rows] + s_ * A[rows]
        return f + q_ * (np.nan_to_num(last[rows]) - f) * np.isfinite(last[rows])

    scale = p.x_std
    halves = [np.arange(len(base)) % 2 == 0, np.arange(len(base)) % 2 == 1]
    better = np.ones(H, bool)
    for fit_rows, check_rows in (halves, halves[::-1]):
        refit = ev.nmse_by_step(blended(*fit(fit_rows), check_rows), w.x_fut[check_rows], scale)
        better &= refit < ev.nmse_by_step(learned[check_rows], w.x_fut[check_rows], scale)
    s_all, q_all = fit(np.ones(len(base), bool))
    with torch.no_grad():
        for logit, weights in ((model.seasonal_logit, s_all), (model.persistence_logit, q_all)):
            rows = min(H, logit.shape[0])
            take = torch.from_numpy(better[:rows])[:, None]
            new = torch.logit(torch.from_numpy(weights[:rows]).float().clamp(1e-4, 1 - 1e-4))
            logit[:rows] = torch.where(take, new, logit[:rows])
    return {"refitted_steps": [int(k) + 1 for k in np.flatnonzero(better)]}


def calibrate(model: KoVAE, p: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """The residual fading learned in training, the naive blends refitted on validation where that helps
    (``fit_naive_blends``), then the spread of the forecast samples fitted on validation.

    The prior noise gives the shape of the forecast distribution; its width, after the decoder, is not
    trustworthy, so each variable's sample deviations from the mean are scaled (bisection, log scale) until
    the 80% sample interval covers 80% of validation truth.
    """
    w = p.val
    with torch.no_grad():
        decay = model.residual_decay().double().numpy()
    blends = fit_naive_blends(model, p, {"residual_decay": decay.tolist()})
    mean, raw = predict(model, p, w, cfg.train.calibration_samples, {"residual_decay": decay.tolist()}, seed=1)
    dev = raw - mean[:, None]
    spread = np.ones(model.x_dim)
    for j in range(model.x_dim):
        lo, hi = -6.0, 10.0  # log2 of the factor
        for _ in range(24):
            mid = (lo + hi) / 2
            smp = mean[:, None, :, j] + 2**mid * dev[..., j]
            if ev.interval_coverage(smp[..., None], w.x_fut[..., j : j + 1]) < 0.8:
                lo = mid
            else:
                hi = mid
        spread[j] = 2 ** ((lo + hi) / 2)
    calibrated = mean[:, None] + spread * dev
    return {
        "method": "per-variable fading of the decoder's miss at the last step (learned in training); the blends "
        "towards the naive forecasts refitted on validation at the lead times where that helps on held-out "
        "validation windows; then per-variable scaling of sample deviations from the mean (fitted on validation)",
        "naive_blend": blends,
        "residual_decay": decay.tolist(),
        "spread_scale": spread.tolist(),
        "val_coverage_80": ev.interval_coverage(calibrated, w.x_fut),
    }
