"""Stage 3 of a run: forecasts in engineering units, and the calibration fitted on validation after training.

Both (residual fading, interval width) are applied inside the ONNX graph as constants.
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


def calibrate(model: KoVAE, p: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """The residual fading learned in training, then the spread of the forecast samples fitted on validation.

    The prior noise gives the shape of the forecast distribution; its width, after the decoder, is not
    trustworthy, so each variable's sample deviations from the mean are scaled (bisection, log scale) until
    the 80% sample interval covers 80% of validation truth.
    """
    w = p.val
    with torch.no_grad():
        decay = model.residual_decay().double().numpy()
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
        "method": "per-variable fading of the decoder's miss at the last step (learned in training), then "
        "per-variable scaling of sample deviations from the mean (fitted on validation)",
        "residual_decay": decay.tolist(),
        "spread_scale": spread.tolist(),
        "val_coverage_80": ev.interval_coverage(calibrated, w.x_fut),
    }
