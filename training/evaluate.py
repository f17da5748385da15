"""Forecast metrics in engineering units, and the baselines every model is judged against.

Per variable and horizon step: RMSE, relative RMSE (RMSE / mean |true|, the figure the plant team quotes) and
NRMSE (RMSE / the training std, the fairer one). Headline figures at fixed horizons summarise them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelcard.card import Calendar
from training.catalog import SAMPLE_MINUTES
from training.data import Windows

HEADLINE_HORIZONS = (20, 96)  # 5 h and 24 h at 15-minute steps


def headline_horizons(max_horizon: int) -> tuple[int, ...]:
    """The headline horizons a model reaches; a short-horizon model (tests) is judged at its longest."""
    return tuple(h for h in HEADLINE_HORIZONS if h <= max_horizon) or (max_horizon,)


def persistence(w: Windows) -> np.ndarray:
    """Last observed value, held over the horizon."""
    return np.repeat(w.x_hist[:, -1:], w.x_fut.shape[1], axis=1)


def seasonal_naive(w: Windows) -> np.ndarray:
    """The same clock time one day earlier; falls back to persistence where that is not known."""
    prev = w.x_prev_day.copy()
    missing = np.isnan(prev)
    prev[missing] = persistence(w)[missing]
    return prev


class ARX:
    """Linear ARX fitted by ridge least squares in normalised units; ``lags=1`` is DMD with control (DMDc).

    x[t+1] = sum_i A_i x[t-i] + B u[t+1] + c
    """

    def __init__(self, lags: int, ridge: float = 1e-3) -> None:
        self.lags, self.ridge = lags, ridge
        self.W: np.ndarray | None = None

    def _features(self, x_lags: np.ndarray, u_next: np.ndarray) -> np.ndarray:
        return np.concatenate([x_lags.reshape(len(x_lags), -1), u_next, np.ones((len(x_lags), 1))], 1)

    def fit(self, series: list[tuple[np.ndarray, np.ndarray]]) -> ARX:
        """Fit on whole normalised scenarios [(x (n, nx), u (n, nu)), ...]."""
        feats, targets = [], []
        for x, u in series:
            p = self.lags
            lagged = np.stack([x[p - 1 - i : len(x) - 1 - i] for i in range(p)], 1)  # (n-p, p, nx)
            feats.append(self._features(lagged, u[p:]))
            targets.append(x[p:])
        F_, Y = np.concatenate(feats), np.concatenate(targets)
        self.W = np.linalg.solve(F_.T @ F_ + self.ridge * np.eye(F_.shape[1]), F_.T @ Y)
        return self

    def forecast(self, x_hist: np.ndarray, u_fut: np.ndarray) -> np.ndarray:
        assert self.W is not None, "fit first"
        lags = list(np.moveaxis(x_hist[:, -self.lags :][:, ::-1], 1, 0))  # newest first
        out = []
        for k in range(u_fut.shape[1]):
            nxt = self._features(np.stack(lags, 1), u_fut[:, k]) @ self.W
            nxt = np.clip(nxt, -1e3, 1e3)  # an unstable fit must not overflow the report
            out.append(nxt)
            lags = [nxt, *lags[:-1]]
        return np.stack(out, 1)


class DirectRidge:
    """Direct ridge forecast of some variables ``h`` steps ahead from their own last ``lags`` values and the
    clock at the target time, in normalised units; one least-squares fit per horizon.

    It sees neither the plant nor the controls. Fitted on the influent, it estimates how far the influent can be
    told from its own past, which bounds what any forecaster not given the future influent can do.
    """

    def __init__(self, columns: list[int], lags: int, calendar: Calendar, ridge: float = 1e-2) -> None:
        self.columns, self.lags, self.calendar, self.ridge = columns, lags, calendar, ridge
        self.W: dict[int, np.ndarray] = {}

    def _features(self, x_lags: np.ndarray, target_minutes: np.ndarray) -> np.ndarray:
        """x_lags (N, lags, nx) normalised, oldest first; target_minutes (N,) clock of the forecast step."""
        own = x_lags[:, :, self.columns].reshape(len(x_lags), -1)
        return np.concatenate([own, self.calendar.features(target_minutes), np.ones((len(own), 1))], 1)

    def fit(self, series: list[tuple[np.ndarray, np.ndarray]], horizons: tuple[int, ...]) -> DirectRidge:
        """Fit on whole normalised scenarios [(x (n, nx), clock minutes (n,)), ...]; ridge is per sample."""
        for h in horizons:
            feats, targets = [], []
            for x, minutes in series:
                last = np.arange(self.lags - 1, len(x) - h)  # index of each window's last history sample
                x_lags = np.lib.stride_tricks.sliding_window_view(x, self.lags, axis=0)[last - self.lags + 1]
                feats.append(self._features(np.moveaxis(x_lags, -1, 1), minutes[last] + h * SAMPLE_MINUTES))
                targets.append(x[last + h][:, self.columns])
            F, Y = np.concatenate(feats), np.concatenate(targets)
            self.W[h] = np.linalg.solve(F.T @ F + self.ridge * len(F) * np.eye(F.shape[1]), F.T @ Y)
        return self

    def forecast(self, x_hist: np.ndarray, t_last: np.ndarray, h: int) -> np.ndarray:
        """(N, len(columns)) normalised forecasts of step h after each window's last history sample."""
        return self._features(x_hist[:, -self.lags :], t_last + h * SAMPLE_MINUTES) @ self.W[h]


def error_table(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Per horizon step and variable: rmse (H, nx) and mean |true| (H, nx)."""
    err = pred.astype(np.float64) - true.astype(np.float64)
    return {"rmse": np.sqrt(np.mean(err**2, axis=0)), "mean_abs_true": np.mean(np.abs(true), axis=0)}


def relative_rmse(table: dict[str, np.ndarray]) -> np.ndarray:
    """RMSE / mean |true| per horizon step and variable (H, nx): the figure the plant team quotes."""
    return table["rmse"] / np.maximum(table["mean_abs_true"], 1e-9)


def skill(rmse: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1 - RMSE / the reference's RMSE (persistence), elementwise: 0 is no better than it, 1 is exact."""
    return 1 - rmse / np.maximum(reference, 1e-12)


POOLED_SKILL_STEPS = (1, 20, 96)  # 15 min, 5 h and 24 h at 15-minute steps


def nmse_by_step(pred: np.ndarray, true: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(H,): at each horizon step, the mean over variables of MSE_v / scale_v^2 (scale fixed per variable)."""
    mse = np.mean((pred - true) ** 2, axis=0)  # (H, nx), over windows
    return np.mean(mse / scale**2, axis=-1)


def pooled_skill(pred: np.ndarray, references: list[np.ndarray], true: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(H,): 1 - sqrt(NMSE_model / NMSE_ref), with NMSE_ref the better of the reference forecasts at each step.

    Unlike a mean of per-variable ratios to persistence, the errors are summed over variables before the ratio,
    each in units of a fixed scale (e.g. its std over all test scenarios): a variable that hardly moves adds
    almost nothing to either side and cannot dominate. Positive: better than every naive reference.
    """
    ref = np.min([nmse_by_step(r, true, scale) for r in references], axis=0)
    return 1.0 - np.sqrt(nmse_by_step(pred, true, scale) / np.maximum(ref, 1e-300))


def headline(
    table: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    x_std: np.ndarray,
    top5: list[int],
) -> dict[str, dict[str, float]]:
    """Headline figures at the headline horizons (1-based steps): top-5 relative RMSE, NRMSE, skill."""
    out = {}
    for h in headline_horizons(table["rmse"].shape[0]):
        rmse, ref = table["rmse"][h - 1], reference["rmse"][h - 1]
        rel = relative_rmse(table)[h - 1]
        out[str(h)] = {
            "rel_rmse_top5": float(np.mean(rel[top5])),
            "nrmse_all": float(np.mean(rmse / x_std)),
            "skill_vs_persistence": float(np.mean(skill(rmse, ref))),
        }
    return out


def headline_score(h: dict[str, dict[str, float]]) -> float:
    """One number to rank models by (lower is better): mean NRMSE over the headline horizons."""
    return float(np.mean([v["nrmse_all"] for v in h.values()]))


def interval_coverage(samples: np.ndarray, true: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> float:
    """Fraction of true values inside the [lo, hi] sample quantiles; samples (N, S, H, nx)."""
    q_lo, q_hi = np.quantile(samples, [lo, hi], axis=1)
    return float(np.mean((true >= q_lo) & (true <= q_hi)))


def per_variable(
    table: dict[str, np.ndarray], x_std: np.ndarray, names: tuple[str, ...], h: int
) -> list[dict[str, Any]]:
    rmse, rel = table["rmse"][h - 1], relative_rmse(table)[h - 1]
    return [
        {"variable": n, "rmse": float(r), "rel_rmse": float(q), "nrmse": float(r / s)}
        for n, r, q, s in zip(names, rmse, rel, x_std, strict=True)
    ]
