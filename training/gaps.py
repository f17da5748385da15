"""Sensor gaps in the history: the cases the report scores, and the pull towards a down sensor's last value that
calibration fits on validation windows given such gaps (``fit_gap_pull``, called by training.calibrate).

A sensor down right now is forecast from a value hours old. The naive blends were fitted on whole histories, so
they trust the model's forecast of it as much as if it had just been measured; validation says by how much more
its last value should count, per lead time from that value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcard.card import last_observed, last_observed_step
from training.data import Windows, yesterday_steps

if TYPE_CHECKING:  # torch only where the pull is fitted: bench/accuracy.py reads the gaps without it
    from training.model import KoVAE
    from training.prepare import Prepared

GAP_DRAWS = 10  # gapped copies of the validation windows the pull is fitted on (546 windows each, the default)
GAP_SMOOTH = 5  # neighbouring lead times pooled into each weight (about 60 windows per cell before)
GAP_BLOCK = 8  # lead times (from the last value) kept or dropped together: 2 h at 15 min


def with_gap(w: Windows, case: str, sample_minutes: int, n_sensors: int, seed: int = 0) -> Windows:
    """The windows with one randomly chosen measured variable (of x's first ``n_sensors``) missing in each
    history: over its last 2 hours ("last_2h", the sensor is down right now) or over a quarter of the history
    somewhere ("quarter"). Same-time-yesterday (``x_prev_day``, the reference's) misses the same samples: a
    reference given the gap knows what the forecast knows."""
    rng = np.random.default_rng(seed)
    x, prev = w.x_hist.copy(), w.x_prev_day.copy()
    N, L, _ = x.shape
    nx, day = n_sensors, 1440 // sample_minutes
    n = min(L // 2, round(120 / sample_minutes)) if case == "last_2h" else L // 4
    read = L + yesterday_steps(prev.shape[1], day)  # the history index each lead's yesterday is read from
    for i, j in enumerate(rng.integers(0, nx, N)):
        end = L if case == "last_2h" else int(rng.integers(n, L + 1))
        x[i, end - n : end, j] = np.nan
        prev[i, (read >= end - n) & (read < end), j] = np.nan
    return replace(w, x_hist=x, x_prev_day=prev)


def down_sensors(w: Windows, n_sensors: int, seed: int) -> tuple[Windows, np.ndarray, np.ndarray]:
    """The windows with one randomly chosen measured variable per window down over the last 1 to L/2 steps of
    its history (a uniform length); returns them, each window's variable and how many steps before the history's
    end it was last measured, as the model counts it (``training.model.steps_since_seen``: a gap that meets an
    earlier one counts from before both; never measured, L - 1)."""
    rng = np.random.default_rng(seed)
    x = w.x_hist.copy()
    N, L, _ = x.shape
    var, length = rng.integers(0, n_sensors, N), rng.integers(1, L // 2 + 1, N)
    for i in range(N):
        x[i, L - length[i] :, var[i]] = np.nan
    last = last_observed_step(x[np.arange(N), :, var, None])[:, 0]
    return replace(w, x_hist=x), var, np.where(last >= 0, L - 1 - last, L - 1)


@dataclass(frozen=True)
class DownSensors:
    """Windows each with one variable down at the history's end, (N, H, x): the served forecast without the pull,
    the forecast the pull reads (``reads``: under the plan held, as the naive blends read it,
    ``model.blend_held_plan``; else the served one), the last measured values and the truth; and (N,) each
    window's down variable and how many steps before the history's end it was last measured."""

    forecast: np.ndarray
    reads: np.ndarray
    last: np.ndarray
    truth: np.ndarray
    var: np.ndarray
    age: np.ndarray

    def subset(self, rows: np.ndarray) -> DownSensors:
        return DownSensors(*(a[rows] for a in (self.forecast, self.reads, self.last, self.truth, self.var, self.age)))

    def regressors(
        self, scale: np.ndarray, n_rows: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """For each window's down variable, in units of ``scale`` (x's std), (N, H) each: last - what the pull
        reads and truth - forecast (0 where either is missing); and the cell of the pull's table each falls in,
        (row, variable) with row = lead time + age - 1 (past ``n_rows``, the last row). The served forecast with
        the pull is forecast + g (last - reads) (``KoVAE.shift``)."""
        i, H = np.arange(len(self.var)), self.forecast.shape[1]
        X = (self.last[i, :, self.var] - self.reads[i, :, self.var]) / scale[self.var][:, None]
        T = (self.truth[i, :, self.var] - self.forecast[i, :, self.var]) / scale[self.var][:, None]
        ok = np.isfinite(X) & np.isfinite(T)
        rows = np.minimum(self.age[:, None] + np.arange(H)[None], n_rows - 1)
        return np.where(ok, X, 0.0), np.where(ok, T, 0.0), (rows, np.repeat(self.var[:, None], H, 1))

    def pull_sums(self, scale: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares sums of truth - forecast ~ g (last - reads), per cell of the table (``regressors``):
        (n_rows, x) each."""
        X, T, cells = self.regressors(scale, n_rows)
        xt, xx = np.zeros((n_rows, self.forecast.shape[2])), np.zeros((n_rows, self.forecast.shape[2]))
        np.add.at(xt, cells, X * T)
        np.add.at(xx, cells, X * X)
        return xt, xx

    def errors(self, table: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The down variables' summed squared errors (normalised) without and with the pull ``table``, per cell
        of the table: (rows, x) each."""
        X, T, cells = self.regressors(scale, len(table))
        without, with_pull = np.zeros(table.shape), np.zeros(table.shape)
        np.add.at(without, cells, T**2)
        np.add.at(with_pull, cells, (T - table[cells] * X) ** 2)
        return without, with_pull


def pull_table(xt: np.ndarray, xx: np.ndarray, smooth: int = GAP_SMOOTH) -> np.ndarray:
    """The weights g in [0, 1] (R, x) from ``pull_sums``, each pooling ``smooth`` neighbouring rows; a cell
    without data weighs 0."""
    kernel = np.ones(smooth)

    def pooled(a: np.ndarray) -> np.ndarray:
        return np.stack([np.convolve(a[:, j], kernel, "same") for j in range(a.shape[1])], 1)

    return np.clip(pooled(xt) / np.maximum(pooled(xx), 1e-12), 0.0, 1.0)


def fit_gap_pull(model: KoVAE, p: Prepared, forecast: Callable[[Windows, bool], np.ndarray]) -> dict[str, Any]:
    """The pull towards a down sensor's last value (``KoVAE.gap_pull``), per lead time from that value and
    variable, fitted on validation windows with one sensor down over its last 1 to L/2 steps (``GAP_DRAWS``
    copies), each forecast by ``forecast(windows, held)`` (the served forecast in engineering units, and with held
    the forecast under the plan held: training.forecast.predict); writes it into the model (and so the graph).

    A variable takes it at the lead times where it cuts its error when down on windows it was not fitted on: each
    half of the windows checked with the pull fitted on the other, both halves' errors summed, per variable and
    block of ``GAP_BLOCK`` lead times. (Kept or dropped per variable over the whole horizon, a variable whose pull
    helped in the first hours and cost a little in the later ones was dropped: SNH_5 with it, and one sensor's
    last 2 h missing cost 11% of the 15-min skill instead of 5%.) The blends were fitted on whole histories: with
    one sensor's last 2 h missing, its 15-min forecast's squared error was 2.6 times that of all the other
    variables together.
    """
    import torch

    w = p.val
    model.gap_pull = None
    parts = []
    for d in range(GAP_DRAWS):
        gapped, var, age = down_sensors(w, p.n_targets, seed=1000 + d)
        last = np.repeat(last_observed(gapped.x_hist)[:, None], w.x_fut.shape[1], 1).astype(np.float64)
        served = forecast(gapped, False).astype(np.float64)
        reads = forecast(gapped, True).astype(np.float64) if model.cfg.blend_held_plan else served
        parts.append(DownSensors(served, reads, last, w.x_fut, var, age))
    n_rows = w.x_fut.shape[1] + w.x_hist.shape[1] // 2

    def table(rows: np.ndarray) -> np.ndarray:
        sums = [d.subset(rows).pull_sums(p.x_std, n_rows) for d in parts]
        return pull_table(sum(s[0] for s in sums), sum(s[1] for s in sums))

    halves = [np.arange(len(w.x_fut)) % 2 == 0, np.arange(len(w.x_fut)) % 2 == 1]
    without = with_pull = np.zeros((n_rows, model.x_dim))
    for fit_rows, check_rows in (halves, halves[::-1]):  # each half checked with the pull the other fitted
        g = table(fit_rows)
        for d in parts:
            e = d.subset(check_rows).errors(g, p.x_std)
            without, with_pull = without + e[0], with_pull + e[1]
    starts = np.arange(0, n_rows, GAP_BLOCK)
    blocks = np.add.reduceat(with_pull, starts) < np.add.reduceat(without, starts)  # 0 < 0 (never down): no
    keep = np.repeat(blocks, GAP_BLOCK, 0)[:n_rows]
    pull = np.round(table(np.ones(len(w.x_fut), bool)) * keep, 4)  # as the card keeps it: graph and card agree
    if keep.any():
        model.gap_pull = torch.from_numpy(pull).float()
    names = p.output_names
    # The cut of each variable's error when down, on the halves it was not fitted on, where the pull is kept.
    gain = 1 - np.where(keep, with_pull, without).sum(0) / np.maximum(without.sum(0), 1e-12)
    return {
        "table": pull.tolist() if keep.any() else None,
        "variables": [names[j] for j in np.flatnonzero(keep.any(0))],
        "held_out_gain": {names[j]: round(float(gain[j]), 4) for j in range(p.n_targets)},
        "kept_hours": {names[j]: float(keep[:, j].sum() * p.catalog.sample_minutes / 60) for j in range(p.n_targets)},
    }
