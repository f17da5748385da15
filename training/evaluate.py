"""Forecast metrics in engineering units, and the baselines every model is judged against.

Per variable and horizon step: RMSE, relative RMSE (RMSE / mean |true|, the figure the plant team quotes) and
NRMSE (RMSE / the training std, the fairer one). Headline figures at fixed horizons summarise them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelcard.card import Calendar, last_observed
from training.data import Windows

HEADLINE_HORIZONS = (20, 96)  # 5 h and 24 h at 15-minute steps


def headline_horizons(max_horizon: int) -> tuple[int, ...]:
    """The headline horizons a model reaches; a short-horizon model (tests) is judged at its longest."""
    return tuple(h for h in HEADLINE_HORIZONS if h <= max_horizon) or (max_horizon,)


def forward_filled(x: np.ndarray) -> np.ndarray:
    """(N, L, nx) normalised histories with each gap holding the last value before it (0, the mean, before
    any): what a linear baseline can be fed."""
    out = x.copy()
    for k in range(1, out.shape[1]):
        gap = np.isnan(out[:, k])
        out[:, k][gap] = out[:, k - 1][gap]
    return np.nan_to_num(out, nan=0.0)


def persistence(w: Windows) -> np.ndarray:
    """Last observed value, held over the horizon (a sensor gap at the end: its last value before the gap)."""
    return np.repeat(last_observed(w.x_hist)[:, None], w.x_fut.shape[1], axis=1)


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
        complete = np.isfinite(F_).all(1) & np.isfinite(Y).all(1)  # imported data: rows with a gap are left out
        F_, Y = F_[complete], Y[complete]
        self.W = np.linalg.solve(F_.T @ F_ + self.ridge * np.eye(F_.shape[1]), F_.T @ Y)
        return self

    def forecast(self, x_hist: np.ndarray, u_fut: np.ndarray) -> np.ndarray:
        assert self.W is not None, "fit first"
        x_hist = forward_filled(x_hist)
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

    def __init__(
        self, columns: list[int], lags: int, calendar: Calendar, ridge: float = 1e-2, sample_minutes: int = 15
    ) -> None:
        self.columns, self.lags, self.calendar, self.ridge = columns, lags, calendar, ridge
        self.sample_minutes = sample_minutes
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
                feats.append(self._features(np.moveaxis(x_lags, -1, 1), minutes[last] + h * self.sample_minutes))
                targets.append(x[last + h][:, self.columns])
            F, Y = np.concatenate(feats), np.concatenate(targets)
            complete = np.isfinite(F).all(1) & np.isfinite(Y).all(1)
            F, Y = F[complete], Y[complete]
            self.W[h] = np.linalg.solve(F.T @ F + self.ridge * len(F) * np.eye(F.shape[1]), F.T @ Y)
        return self

    def forecast(self, x_hist: np.ndarray, t_last: np.ndarray, h: int) -> np.ndarray:
        """(N, len(columns)) normalised forecasts of step h after each window's last history sample."""
        return self._features(x_hist[:, -self.lags :], t_last + h * self.sample_minutes) @ self.W[h]


def error_table(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Per horizon step and variable: rmse (H, nx) and mean |true| (H, nx), over the windows where the truth
    was measured (imported data have gaps)."""
    err = pred.astype(np.float64) - true.astype(np.float64)
    with np.errstate(invalid="ignore"):
        return {"rmse": np.sqrt(_nanmean(err**2)), "mean_abs_true": _nanmean(np.abs(true.astype(np.float64)))}


def _nanmean(a: np.ndarray, axis: int | tuple[int, ...] = 0) -> np.ndarray:
    """Mean over what is not NaN; 0 where nothing is (no warning)."""
    seen = ~np.isnan(a)
    return np.where(seen, a, 0.0).sum(axis) / np.maximum(seen.sum(axis), 1)


def relative_rmse(table: dict[str, np.ndarray]) -> np.ndarray:
    """RMSE / mean |true| per horizon step and variable (H, nx): the figure the plant team quotes."""
    return table["rmse"] / np.maximum(table["mean_abs_true"], 1e-9)


def skill(rmse: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1 - RMSE / the reference's RMSE (persistence), elementwise: 0 is no better than it, 1 is exact."""
    return 1 - rmse / np.maximum(reference, 1e-12)


POOLED_SKILL_STEPS = (1, 20, 96)  # 15 min, 5 h and 24 h at 15-minute steps


def pooled_steps(horizon: int) -> list[int]:
    """The pooled-skill steps a model reaches; a short-horizon model (tests) is judged at its longest too."""
    return sorted({s for s in POOLED_SKILL_STEPS if s <= horizon} | {horizon})


def nmse_by_step(pred: np.ndarray, true: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(H,): at each horizon step, the mean over variables of MSE_v / scale_v^2 (scale fixed per variable)."""
    mse = _nanmean((pred.astype(np.float64) - true) ** 2)  # (H, nx), over windows where the truth was measured
    return np.mean(mse / scale**2, axis=-1)


def pooled_skill(pred: np.ndarray, references: list[np.ndarray], true: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(H,): 1 - sqrt(NMSE_model / NMSE_ref), with NMSE_ref the better of the reference forecasts at each step.

    Unlike a mean of per-variable ratios to persistence, the errors are summed over variables before the ratio,
    each in units of a fixed scale (e.g. its std over all test scenarios): a variable that hardly moves adds
    almost nothing to either side and cannot dominate. Positive: better than every naive reference.
    """
    ref = np.min([nmse_by_step(r, true, scale) for r in references], axis=0)
    skill_ = 1.0 - np.sqrt(nmse_by_step(pred, true, scale) / np.maximum(ref, 1e-300))
    # A forecast missing where the truth was measured is no skill: left out of the model's error alone, the
    # hardest windows would leave the model's side only and raise its score.
    unanswered = (np.isnan(pred) & ~np.isnan(true)).any(axis=(0, -1)) if pred.ndim == 3 else False
    return np.where(unanswered, np.nan, skill_)


def regime_table(
    mean: np.ndarray,
    band: np.ndarray | None,
    w: Windows,
    groups: dict[str, str],
    scale: np.ndarray,
    plant: list[int],
) -> dict[str, dict[str, Any]]:
    """Per evaluation group (the regime of each window's scenario, "later" for a later period) and over all
    windows ("all"): pooled skill at POOLED_SKILL_STEPS for all variables and for the plant's own (the influent
    left out), and the 80% interval coverage (``band``: ``sample_band``). ``groups`` maps scenario id to group;
    ``scale`` is fixed per variable (its std over all test scenarios), so every group is measured in the same
    units."""
    by_window = np.array([groups[s] for s in w.scenario])
    steps = pooled_steps(w.x_fut.shape[1])
    out: dict[str, dict[str, Any]] = {}
    for group in [*dict.fromkeys(by_window.tolist()), "all"]:
        k = np.ones(len(by_window), bool) if group == "all" else by_window == group
        naive = [persistence(w)[k], seasonal_naive(w)[k]]
        pooled_all = pooled_skill(mean[k], naive, w.x_fut[k], scale)
        pooled_plant = pooled_skill(
            mean[k][..., plant], [f[..., plant] for f in naive], w.x_fut[k][..., plant], scale[plant]
        )
        out[group] = {
            "windows": int(k.sum()),
            "pooled_skill_all": {str(s): float(pooled_all[s - 1]) for s in steps},
            "pooled_skill_plant": {str(s): float(pooled_plant[s - 1]) for s in steps},
            "coverage_80": interval_coverage(band[k], w.x_fut[k]) if band is not None else None,
        }
    return out


def lead_label(step: int | str, sample_minutes: int) -> str:
    """A lead time as the reports write it: step 20 of 15 minutes -> "5 h", step 1 -> "0.25 h"."""
    return f"{int(step) * sample_minutes / 60:g} h"


def regime_lines(regimes: dict[str, dict[str, Any]], sample_minutes: int, *, markdown: bool = False) -> list[str]:
    """The per-regime table: windows, pooled skill (all and plant variables) at each step, 80% coverage."""
    steps = list(next(iter(regimes.values()))["pooled_skill_all"])
    lead = [lead_label(s, sample_minutes) for s in steps]
    head = ["regime", "windows", *[f"all {x}" for x in lead], *[f"plant {x}" for x in lead], "cover80"]
    first = max(len(head[0]), *(len(g) for g in regimes))  # cells ("storm/ammonia_cascade") are long
    rows = []
    for group, r in regimes.items():
        cover = "-" if r["coverage_80"] is None else f"{100 * r['coverage_80']:.1f}%"
        cells = [f"{r['pooled_skill_all'][s]:.3f}" for s in steps] + [
            f"{r['pooled_skill_plant'][s]:.3f}" for s in steps
        ]
        rows.append([group, str(r["windows"]), *cells, cover])
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return [" ".join([f"{r[0]:<{first}}", *(f"{c:>10}" for c in r[1:])]) for r in [head, *rows]]


def gate_score(regimes: dict[str, dict[str, Any]]) -> float:
    """The promotion gate's score, higher is better: the worst group's pooled skill (all variables) averaged
    over the pooled-skill steps, so a model cannot buy its average with one regime's failure."""
    groups = [g for g in regimes if g != "all"] or ["all"]
    # np.min, not min: a regime scored NaN (nothing to score) makes the score NaN, which no gate passes; Python's
    # min skipped it or not by the order of the regimes.
    return float(np.min([np.mean(list(regimes[g]["pooled_skill_all"].values())) for g in groups]))


def deepened_losses(
    candidate: dict[str, dict[str, Any]], served: dict[str, dict[str, Any]], tie: float, step_minutes: int
) -> list[str]:
    """Each cell and lead time where the candidate loses to the better naive forecast (pooled skill, all
    variables, below 0) and by more than the served version does there (by more than ``tie``): a loss it adds,
    or one it deepens. ``gate_score`` averages the worst cell over its lead times, so a model once passed it by
    rising at 15 min in BSM1's dry cell while falling further below yesterday at 24 h (-0.017 -> -0.052)."""
    out = []
    for cell, table in candidate.items():
        if cell == "all" or cell not in served:
            continue
        for step, skill in table["pooled_skill_all"].items():
            before = served[cell]["pooled_skill_all"].get(step)
            if before is not None and skill < 0 and skill < before - tie:
                out.append(f"{cell} at {lead_label(step, step_minutes)}: {skill:.3f} against {before:.3f}")
    return out


def headline(
    table: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    x_std: np.ndarray,
    top5: list[int],
) -> dict[str, dict[str, float]]:
    """Headline figures at the headline horizons (1-based steps): top-5 relative RMSE, NRMSE, skill. The skill
    is averaged over the variables persistence does not forecast almost exactly (its RMSE at least a thousandth of
    the variable's std): one that never moves in these windows (BSM1's files hold the temperature at 15 C, to the
    solver's last digits) would put 1 - RMSE / 0, or -7e11 %, into the mean."""
    out = {}
    for h in headline_horizons(table["rmse"].shape[0]):
        rmse, ref = table["rmse"][h - 1], reference["rmse"][h - 1]
        rel = relative_rmse(table)[h - 1]
        moves = ref > 1e-3 * x_std
        out[str(h)] = {
            "rel_rmse_top5": float(np.mean(rel[top5])),
            "nrmse_all": float(np.mean(rmse / x_std)),
            "skill_vs_persistence": float(np.mean(skill(rmse, ref)[moves])) if moves.any() else 0.0,
        }
    return out


INTERVAL = (0.1, 0.9)  # the 80% interval whose coverage is reported


def sample_band(samples: np.ndarray) -> np.ndarray:
    """(N, 2, H, nx): the INTERVAL quantiles of forecast samples (N, S, H, nx), all that scoring keeps of them."""
    return np.moveaxis(np.quantile(samples, INTERVAL, axis=1), 0, 1)


def interval_coverage(band: np.ndarray, true: np.ndarray) -> float:
    """Fraction of (measured) true values inside the band (N, 2, H, nx) of ``sample_band``."""
    seen = ~np.isnan(true)
    return float(np.mean(((true >= band[:, 0]) & (true <= band[:, 1]))[seen]))


def per_variable(
    table: dict[str, np.ndarray], x_std: np.ndarray, names: tuple[str, ...], h: int
) -> list[dict[str, Any]]:
    rmse, rel = table["rmse"][h - 1], relative_rmse(table)[h - 1]
    return [
        {"variable": n, "rmse": float(r), "rel_rmse": float(q), "nrmse": float(r / s)}
        for n, r, q, s in zip(names, rmse, rel, x_std, strict=True)
    ]
