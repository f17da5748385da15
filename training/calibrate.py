"""Stage 3 of a run: the calibration fitted on validation after training, with the model's weights fixed.

The decoder's miss faded per variable, the naive blends refitted, a down sensor's and the loops' pulls, then the
interval width (``training.interval_width``). All of it is applied inside the ONNX graph as constants.
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
from training.forecast import predict
from training.gaps import fit_gap_pull
from training.interval_width import fit_interval_width
from training.model import KoVAE
from training.prepare import Prepared, tensors

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
