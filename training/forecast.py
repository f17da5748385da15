"""The KoVAE's forecasts of a set of windows in engineering units, as the graph serves them: what calibration,
the interval width's fit and the held-out evaluation all score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training import evaluate as ev
from training.data import Windows
from training.model import IntervalWidth, KoVAE, at_limits, band_space, calibrated_samples, held_plan
from training.prepare import Prepared, tensors


@dataclass(frozen=True)
class SaturatingSamples:
    """One output's forecast samples where a loop's limit can hold them, in band space (``band_space``): the
    graph keeps a sample at or past the limit as drawn however the width scales the others
    (``calibrated_samples``), so the band of a scaled width is no scaling of the unscaled band. The width's fit
    (``training.interval_width.fit_spread``) computes it from these."""

    centre: np.ndarray  # (N, H) the mean forecast
    value: np.ndarray  # (N, S, H) each sample as drawn
    pinned: np.ndarray  # (N, S, H) bool: at or past the loop's limit, kept as drawn

    def __getitem__(self, rows: np.ndarray) -> SaturatingSamples:
        return SaturatingSamples(self.centre[rows], self.value[rows], self.pinned[rows])

    def band(self, scale: np.ndarray) -> np.ndarray:
        """(N, 2, H): the ``ev.INTERVAL`` quantiles of the samples with each window's deviations from the mean
        times ``scale`` (N,), the pinned ones kept (the quantiles taken in band space, where the graph takes
        them in normalised units: an increasing map, so the same samples, interpolated apart by a hair)."""
        centre = self.centre[:, None]
        scaled = np.where(self.pinned, self.value, centre + scale[:, None, None] * (self.value - centre))
        return np.moveaxis(np.quantile(scaled, ev.INTERVAL, axis=1), 0, 1)


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
    saturating: dict[int, SaturatingSamples] | None = None,
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
    ``saturating``: a dict filled, per output a loop's limit can hold (``KoVAE.saturation``), with its samples
    (``SaturatingSamples``), for the width's fit; with samples, all windows forecast (no ``same_as``), and the
    calibration's width is 1 (``calib`` without ``spread_scale`` or ``width``).
    """
    if same_as is not None and (held or (same_as[2] is None and n_samples)):
        raise ValueError("predict: same_as copies a forecast of its request's own plan, with its band")
    if saturating is not None and (
        same_as is not None or not n_samples or {"spread_scale", "width"} & set(calib or {})
    ):
        raise ValueError("predict: saturating samples are kept of all windows' unwidened samples")
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
    limits = model.saturation()
    limited = [] if limits is None else torch.nonzero(torch.isfinite(limits[0]) | torch.isfinite(limits[1]))[:, 0]
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
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
                samples = calibrated_samples(mean, raw, factor, width.bounds, limits)
                bands.append(p.dx(ev.sample_band(samples.numpy())))
                if saturating is not None and len(limited) and limits is not None:
                    kept.append(saturating_parts(mean, raw, limited, width.bounds, limits))
    if saturating is not None and kept:
        centre, value, pinned = (np.concatenate(parts) for parts in zip(*kept, strict=True))
        for i, j in enumerate(limited.tolist()):
            saturating[j] = SaturatingSamples(centre[..., i], value[..., i], pinned[..., i])
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


def saturating_parts(
    mean: torch.Tensor,
    raw: torch.Tensor,
    columns: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor] | None,
    limits: tuple[torch.Tensor, torch.Tensor],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chunk's (centre (B, H, k), value (B, S, H, k), pinned (B, S, H, k)) of ``SaturatingSamples`` for the
    outputs ``columns``: mean (B, H, x) and raw samples (B, S, H, x) normalised, into band space as
    ``calibrated_samples`` widens them (linearly without ``bounds``)."""
    m, r = mean[..., columns].double(), raw[..., columns].double()
    pinned = at_limits(r, limits[0][columns], limits[1][columns])
    if bounds is not None:
        lo, hi = bounds[0][columns].double(), bounds[1][columns].double()
        m, r = band_space(m, lo, hi), band_space(r, lo, hi)
    return m.numpy(), r.numpy(), pinned.numpy()  # float64: a truth on the limit is compared with the limit itself


def told_alike(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N,) bool: each window's inputs the same in both tensors (N, ...), NaN (not told) in the same places."""
    return ((a == b) | (torch.isnan(a) & torch.isnan(b))).flatten(1).all(1).numpy()
