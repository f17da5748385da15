"""Stage 3 of a run: forecasts in engineering units, and the calibration fitted on validation after training.

Both calibration steps (residual fading, interval width) are applied inside the ONNX graph as constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
) -> tuple[np.ndarray, np.ndarray | None]:
    """KoVAE mean forecast (and samples) in engineering units for a set of windows.

    ``calib`` is the calibration the graph applies: ``residual_decay`` fades the decoder's miss at the last
    history step into the forecast, and ``spread_scale`` widens each sample's deviation from the mean.
    """
    xh, uh, _, uf = tensors(p, w)
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


def fit_residual_decay(model: KoVAE, p: Prepared, w: Windows) -> np.ndarray:
    """Per variable, the fading factor g in [0, rho_max] of the decoder's miss at the last history step that
    minimises the validation MSE of the mean forecast over the horizon.

    For each variable the MSE is a polynomial in the powers g^k, so a fine grid of half-lives costs one matmul.
    """
    xh, uh, xf, uf = tensors(p, w)
    with torch.no_grad():
        z0 = model.encode(xh, uh)[0][:, -1]  # encoded once for both
        latent = model.decoder(model.rollout(z0, uf)).numpy().astype(np.float64)  # (N, H, x), no correction
        miss = (xh[:, -1] - model.decoder(z0)).numpy().astype(np.float64)  # (N, x)
    return best_residual_decay(latent - xf.numpy(), miss, model.cfg.rho_max)


def best_residual_decay(err: np.ndarray, miss: np.ndarray, rho_max: float) -> np.ndarray:
    """argmin over g of mean((err + g^k miss)^2) per variable; err (N, H, x), miss (N, x), g in [0, rho_max]."""
    a = np.mean(err * miss[:, None], 0)  # (H, x)
    b = np.mean(miss**2, 0)  # (x,)
    # Candidate g: 0 (no correction), then half-lives from 6 minutes to 3 weeks, capped at rho_max.
    grid = np.concatenate([[0.0], np.minimum(0.5 ** (1 / np.geomspace(0.4, 2000, 400)), rho_max)])
    powers = grid[:, None] ** np.arange(1, err.shape[1] + 1)[None]  # (G, H)
    gain = 2 * powers @ a + (powers**2).sum(1, keepdims=True) * b  # (G, x): change of the summed MSE
    return grid[np.argmin(gain, 0)]


def calibrate(model: KoVAE, p: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """Fitted on validation after training: the residual fading, then the spread of the forecast samples.

    The prior noise gives the shape of the forecast distribution; its width, after the decoder, is not
    trustworthy, so each variable's sample deviations from the mean are scaled (bisection, log scale) until
    the 80% sample interval covers 80% of validation truth.
    """
    w = p.val
    decay = fit_residual_decay(model, p, w)
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
        "method": "per-variable fading of the decoder's miss at the last step (least squares over a grid), then "
        "per-variable scaling of sample deviations from the mean; both fitted on validation",
        "residual_decay": decay.tolist(),
        "spread_scale": spread.tolist(),
        "val_coverage_80": ev.interval_coverage(calibrated, w.x_fut),
    }
