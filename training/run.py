"""Retrain the KoVAE forecaster end to end: ``python -m training.run [--preset tiny] [section.field=value ...]``.

Steps, top to bottom: load (or simulate) the BSM1 data, fit scalers on the training scenarios, train with the
multi-step forecast loss, calibrate the forecast intervals on validation, evaluate against baselines on the
held-out scenarios, export to ONNX into a new version of the model store, and promote it only if it beats
the version being served (or with --force).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.card import CARD_VERSION, Calendar, CardError, atomic_write, known_inputs, window_clock
from export.store import current_version, set_current
from training import evaluate as ev
from training.catalog import CONTROLS, MEASUREMENTS, SAMPLE_MINUTES, catalog_dict
from training.config import ConfigError, RunConfig, TrainConfig, load_config
from training.data import Windows, config_hash, generate, heldout_windows, make_windows, splits
from training.model import KoVAE, calibrated_samples

MAX_NAN_RETRIES = 3


# ----------------------------------------------------------------------------- data


@dataclass
class Prepared:
    x_mean: np.ndarray
    x_std: np.ndarray
    u_mean: np.ndarray
    u_std: np.ndarray
    train: Windows
    val: Windows
    test: Windows
    train_series: list[tuple[np.ndarray, np.ndarray]]  # whole normalised training scenarios (for ARX)
    data_hash: str
    calendar: Calendar  # clock inputs (model.calendar_daily, model.calendar_weekly)
    split_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def nx(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def nu(self, u: np.ndarray, minutes: np.ndarray) -> np.ndarray:
        """The model's known inputs: scaled controls, then calendar features of the same steps."""
        return known_inputs(u, minutes, (self.u_mean, self.u_std), self.calendar)

    def inputs(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Known inputs over each window's history and future."""
        t_hist, t_fut = window_clock(w.t_last, w.u_hist.shape[1], w.u_fut.shape[1], SAMPLE_MINUTES)
        return self.nu(w.u_hist, t_hist), self.nu(w.u_fut, t_fut)

    def dx(self, x: np.ndarray) -> np.ndarray:
        return x * self.x_std + self.x_mean


def prepare(cfg: RunConfig) -> Prepared:
    data = generate(cfg.data)
    ids = splits(cfg.data)
    train = [data[i] for i in ids["train"]]
    x_all = np.concatenate([d.x for d in train])
    u_all = np.concatenate([d.u for d in train])
    x_mean, u_mean = x_all.mean(0), u_all.mean(0)
    # Floor the std so a near-constant series cannot blow up its normalised values.
    x_std = np.maximum(x_all.std(0), 1e-3 * np.maximum(np.abs(x_mean), 1e-3))
    u_std = np.maximum(u_all.std(0), 1e-3 * np.maximum(np.abs(u_mean), 1e-3))
    t = cfg.train
    H = t.horizon
    calendar = Calendar(cfg.model.calendar_daily, cfg.model.calendar_weekly)
    return Prepared(
        x_mean,
        x_std,
        u_mean,
        u_std,
        make_windows(train, t.history, H, t.window_stride),
        heldout_windows([data[i] for i in ids["val"]], t.history, H, t.max_eval_windows),
        heldout_windows([data[i] for i in ids["test"]], t.history, H, t.max_eval_windows),
        [(((d.x - x_mean) / x_std), known_inputs(d.u, d.t_minutes, (u_mean, u_std), calendar)) for d in train],
        config_hash(cfg.data),
        calendar,
        ids,
    )


def tensors(p: Prepared, w: Windows) -> tuple[torch.Tensor, ...]:
    """(x_hist, u_hist, x_fut, u_fut) normalised, the u's with their calendar columns."""
    u_hist, u_fut = p.inputs(w)
    return tuple(torch.from_numpy(a) for a in (p.nx(w.x_hist), u_hist, p.nx(w.x_fut), u_fut))


# ----------------------------------------------------------------------------- training


def rollout_length(cfg: RunConfig, epoch: int) -> int:
    """Curriculum: the trained rollout grows linearly from curriculum_start to the full horizon."""
    t = cfg.train
    if t.curriculum_epochs <= 0 or epoch >= t.curriculum_epochs:
        return t.horizon
    frac = epoch / t.curriculum_epochs
    return round(t.curriculum_start + frac * (t.horizon - t.curriculum_start))


def learning_rate(cfg: RunConfig, epoch: int) -> float:
    """Cosine decay from lr to min_lr over the run."""
    t = cfg.train
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * epoch / max(1, t.epochs)))


def evaluate_loss(model: KoVAE, data: tuple[torch.Tensor, ...], cfg: RunConfig, batch: int = 256) -> dict[str, float]:
    """Mean loss terms over a dataset in eval mode (posterior means, no dropout), full horizon."""
    model.eval()
    sums: dict[str, float] = {}
    n = len(data[0])
    with torch.no_grad():
        for s in range(0, n, batch):
            parts = model.losses(*(d[s : s + batch] for d in data), cfg.train)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(data[0][s : s + batch])
    return {k: v / n for k, v in sums.items()}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


class TrainingFailed(RuntimeError):
    pass


def make_optimizer(model: KoVAE, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays only weight matrices (as nanoGPT does).

    Decay on the operator's spectrum parameters would pull every radius towards rho_max / 2 and every angle
    towards 0, a bias against the slow modes the plant has; biases, norms and noise scales are not weights either.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr)


def train(
    cfg: RunConfig,
    p: Prepared,
    run_dir: Path,
    *,
    resume: bool = False,
    inject_nan_at: list[int] | None = None,
    stop_after: int | None = None,
) -> tuple[KoVAE, list[dict[str, float]]]:
    """The training loop. Checkpoints every N epochs and the best on validation; ``resume`` continues exactly.

    A non-finite loss rolls back to the last good checkpoint and halves the learning rate (up to 3 times).
    Test hooks: ``inject_nan_at`` lists epochs whose first batch is made NaN (each entry fires once);
    ``stop_after`` ends the session after that epoch as if the process had been killed.
    """
    inject = list(inject_nan_at or [])
    t = cfg.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    train_data, val_data = tensors(p, p.train), tensors(p, p.val)
    model = KoVAE(len(MEASUREMENTS), train_data[1].shape[-1], cfg.model)  # as wide as the known inputs it is fed
    opt = make_optimizer(model, t)
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt, best_ckpt = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    log_path = run_dir / "log.csv"
    state = {"epoch": 0, "best_val": math.inf, "lr_scale": 1.0, "nan_retries": 0, "log": []}
    gen = torch.Generator().manual_seed(t.seed)

    def snapshot() -> dict[str, Any]:
        return {
            **state,
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
        }

    def restore(ck: dict[str, Any]) -> None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        state.update({k: ck[k] for k in ("epoch", "best_val", "lr_scale", "nan_retries", "log")})

    if resume:
        if not last_ckpt.exists():
            raise TrainingFailed(f"--resume: no checkpoint at {last_ckpt}")
        restore(torch.load(last_ckpt, weights_only=False))
        print(f"resumed from {last_ckpt} at epoch {state['epoch']}", file=sys.stderr)
    else:
        save_checkpoint(last_ckpt, snapshot())

    n = len(train_data[0])
    while state["epoch"] < t.epochs:
        epoch = state["epoch"]
        lr = learning_rate(cfg, epoch) * state["lr_scale"]
        for g in opt.param_groups:
            g["lr"] = lr
        R = rollout_length(cfg, epoch)
        model.train()
        start, total, seen, bad = time.perf_counter(), 0.0, 0, False
        order = torch.randperm(n, generator=gen)
        n_batches = math.ceil(n / t.batch_size)
        for b in range(n_batches):
            idx = order[b * t.batch_size : (b + 1) * t.batch_size]
            xh, uh, xf, uf = (d[idx] for d in train_data)
            loss = model.losses(xh, uh, xf[:, :R], uf[:, :R], t)["total"]
            if b == 0 and epoch in inject:
                inject.remove(epoch)
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                bad = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            _progress(epoch, b + 1, n_batches, total / max(seen, 1))
        if bad:
            state["nan_retries"] += 1
            if state["nan_retries"] > MAX_NAN_RETRIES:
                raise TrainingFailed(
                    f"loss became NaN/inf {state['nan_retries']} times (last at epoch {epoch}); "
                    "lower train.lr or check the data"
                )
            retries, scale = state["nan_retries"], state["lr_scale"] / 2
            restore(torch.load(last_ckpt, weights_only=False))
            state.update(nan_retries=retries, lr_scale=scale)
            print(
                f"\nnon-finite loss at epoch {epoch}: rolled back to epoch {state['epoch']}, "
                f"learning rate x{scale:g} (retry {retries}/{MAX_NAN_RETRIES})",
                file=sys.stderr,
            )
            continue
        val = evaluate_loss(model, val_data, cfg)
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "val_loss": val["total"],
            "val_forecast_mse": val["pred"],
            "val_rec_mse": val["rec"],
            "rollout": R,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        state["log"].append(row)
        state["epoch"] = epoch + 1
        print(
            f"\repoch {row['epoch']:3d}/{t.epochs} train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
            f"forecast {row['val_forecast_mse']:.4f} rollout {R} lr {lr:.2e} {row['seconds']:.1f}s",
            file=sys.stderr,
        )
        _write_log(log_path, state["log"])
        if val["pred"] < state["best_val"]:
            state["best_val"] = val["pred"]
            save_checkpoint(best_ckpt, snapshot())
        if state["epoch"] % t.checkpoint_every == 0 or state["epoch"] == t.epochs:
            save_checkpoint(last_ckpt, snapshot())
        if stop_after is not None and state["epoch"] >= stop_after:
            break
    best = torch.load(best_ckpt, weights_only=False)
    model.load_state_dict(best["model"])
    model.eval()
    return model, state["log"]


def _progress(epoch: int, done: int, total: int, loss: float) -> None:
    if sys.stderr.isatty():
        bar = "#" * int(30 * done / total)
        print(f"\repoch {epoch + 1:3d} [{bar:<30}] {done}/{total} loss {loss:.4f}", end="", file=sys.stderr)


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


# ----------------------------------------------------------------------------- evaluation


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


def top5_indices(p: Prepared) -> list[int]:
    """The five variables with the highest training variance in engineering units."""
    train_var = np.concatenate([s[0] for s in p.train_series]).var(0) * p.x_std**2
    return [int(i) for i in np.argsort(-train_var)[:5]]


def evaluate_all(model: KoVAE, p: Prepared, cfg: RunConfig, calib: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Every model on the held-out windows; returns (metrics, forecasts kept for plots)."""
    w = p.test
    names = tuple(v.name for v in MEASUREMENTS)
    mean, samples = predict(model, p, w, cfg.train.calibration_samples, calib, seed=2)
    arx = {lags: ev.ARX(lags).fit(p.train_series) for lags in (1, 4)}
    u_fut = p.inputs(w)[1]  # the baselines get the same known inputs as the KoVAE
    forecasts = {
        "kovae": mean,
        "persistence": ev.persistence(w),
        "seasonal_naive": ev.seasonal_naive(w),
        "dmdc": p.dx(arx[1].forecast(p.nx(w.x_hist), u_fut)),
        "arx4": p.dx(arx[4].forecast(p.nx(w.x_hist), u_fut)),
    }
    tables = {k: ev.error_table(v, w.x_fut) for k, v in forecasts.items()}
    top5 = top5_indices(p)
    metrics: dict[str, Any] = {
        "test_scenarios": list(p.split_ids["test"]),
        "test_windows": len(w.x_hist),
        "top5_variables": [names[i] for i in top5],
        "top5_rule": "five highest variances in engineering units on the training scenarios",
        "headline": {k: ev.headline(t, tables["persistence"], p.x_std, top5) for k, t in tables.items()},
        "coverage_80_test": ev.interval_coverage(samples, w.x_fut),
        "per_variable": {
            str(h): ev.per_variable(tables["kovae"], p.x_std, names, h) for h in ev.headline_horizons(cfg.train.horizon)
        },
        "rmse_by_horizon": {k: t["rmse"].tolist() for k, t in tables.items()},
    }
    metrics["score"] = ev.headline_score(metrics["headline"]["kovae"])
    return metrics, {"forecasts": forecasts, "samples": samples, "windows": w}


# ----------------------------------------------------------------------------- reports


def write_plots(
    run_dir: Path, log: list[dict[str, float]], metrics: dict[str, Any], kept: dict, x_std: np.ndarray
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [r["epoch"] for r in log]
    for key in ("train_loss", "val_loss", "val_forecast_mse"):
        ax.plot(ep, [r[key] for r in log], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title("KoVAE training")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=90)
    files.append("loss.png")
    plt.close(fig)

    names = [v.name for v in MEASUREMENTS]
    fig, ax = plt.subplots(figsize=(7, 4))
    for model_name, rmse in metrics["rmse_by_horizon"].items():
        r = np.array(rmse)
        ax.plot(np.arange(1, len(r) + 1), np.mean(r / x_std, 1), label=model_name)
    ax.set_xlabel("horizon step (15 min)")
    ax.set_ylabel("mean NRMSE over variables")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "error_vs_horizon.png", dpi=90)
    files.append("error_vs_horizon.png")
    plt.close(fig)

    w, fc, smp = kept["windows"], kept["forecasts"], kept["samples"]
    i = len(w.x_hist) // 2
    keys = [names.index(k) for k in ("Q_in", "SO_5", "SNH_5", "SNO_2", "SNH_eff", "TN_eff")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.0 * len(keys)), sharex=True)
    L, H = w.x_hist.shape[1], w.x_fut.shape[1]
    for ax, j in zip(axes, keys, strict=True):
        ax.plot(np.arange(L), w.x_hist[i, :, j], color="k", lw=1)
        ax.plot(np.arange(L, L + H), w.x_fut[i, :, j], color="k", lw=1, ls="--", label="truth")
        ax.plot(np.arange(L, L + H), fc["kovae"][i, :, j], color="C0", label="KoVAE")
        lo, hi = np.quantile(smp[i, :, :, j], [0.1, 0.9], axis=0)
        ax.fill_between(np.arange(L, L + H), lo, hi, color="C0", alpha=0.2, label="80% interval")
        ax.plot(np.arange(L, L + H), fc["persistence"][i, :, j], color="C3", lw=0.8, label="persistence")
        ax.set_ylabel(f"{names[j]}\n[{MEASUREMENTS[j].unit}]", fontsize=8)
    axes[0].legend(fontsize=7, ncol=4)
    axes[-1].set_xlabel("step (15 min)")
    fig.tight_layout()
    fig.savefig(run_dir / "forecast_examples.png", dpi=80)
    files.append("forecast_examples.png")
    plt.close(fig)
    return files


def report_markdown(version: str, metrics: dict[str, Any], calib: dict[str, Any], seconds: float) -> str:
    lines = [
        f"# KoVAE forecast report: {version}",
        "",
        f"Held-out scenarios: {', '.join(metrics['test_scenarios'])} ({metrics['test_windows']} windows). "
        f"Training took {seconds / 60:.1f} min.",
        "",
        f"Top-5 variables ({metrics['top5_rule']}): {', '.join(metrics['top5_variables'])}.",
        "",
        "| model | horizon | rel. RMSE top-5 | mean NRMSE | skill vs persistence |",
        "|---|---|---|---|---|",
    ]
    for model_name, by_h in metrics["headline"].items():
        for h, v in by_h.items():
            lines.append(
                f"| {model_name} | {h} | {100 * v['rel_rmse_top5']:.2f}% | {v['nrmse_all']:.3f} | "
                f"{100 * v['skill_vs_persistence']:.1f}% |"
            )
    lines += [
        "",
        f"80% interval coverage: validation {100 * calib['val_coverage_80']:.1f}% (calibrated there), "
        f"test {100 * metrics['coverage_80_test']:.1f}%.",
        "",
        "Per variable at the longest headline horizon (KoVAE):",
        "",
        "| variable | RMSE | rel. RMSE | NRMSE |",
        "|---|---|---|---|",
    ]
    last_h = max(metrics["per_variable"], key=int)
    units = {v.name: v.unit for v in MEASUREMENTS}
    for row in metrics["per_variable"][last_h]:
        lines.append(
            f"| {row['variable']} | {row['rmse']:.4g} {units[row['variable']]} | {100 * row['rel_rmse']:.1f}% | "
            f"{row['nrmse']:.3f} |"
        )
    lines += ["", "![loss](loss.png)", "", "![error vs horizon](error_vs_horizon.png)", ""]
    lines += ["![examples](forecast_examples.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- card, store, promotion


def build_card(version: str, cfg: RunConfig, p: Prepared, metrics: dict, calib: dict, seconds: float) -> dict:
    cat = catalog_dict()

    def with_scalers(items: list[dict], mean: np.ndarray, std: np.ndarray) -> list[dict]:
        return [{**v, "mean": float(m), "std": float(s)} for v, m, s in zip(items, mean, std, strict=True)]

    L = cfg.train.history
    return {
        "card_version": CARD_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sample_minutes": SAMPLE_MINUTES,
        "variables": {
            "measurements": with_scalers(cat["measurements"], p.x_mean, p.x_std),
            "controls": with_scalers(cat["controls"], p.u_mean, p.u_std),
            "calendar": p.calendar.to_card(),
            "control_timing": "a control value at time t is the mean applied over the interval ending at t",
        },
        "scaling": {"kind": "zscore", "where": "outside_graph", "formula": "(value - mean) / std"},
        "history": {"length": L, "min": max(2, L // 2), "max": 2 * L},
        "max_horizon": cfg.train.horizon,
        "model": {"type": "KoVAE", **cfg.model.__dict__},
        "calibration": calib,
        "metrics": {
            k: metrics[k] for k in ("headline", "score", "coverage_80_test", "top5_variables", "test_scenarios")
        },
        "data": {"config_hash": p.data_hash, "splits": {k: list(v) for k, v in p.split_ids.items()}},
        "training": {"seconds": seconds, "epochs": cfg.train.epochs, "config": cfg.to_dict()},
    }


def score_served(store: Path, p: Prepared, candidate_history: int) -> tuple[str, float] | None:
    """Re-evaluate the currently served version on this run's held-out windows through ONNX Runtime."""
    from service.runtime import ModelRuntime

    version = current_version(store)
    if version is None:
        return None
    rt = ModelRuntime(store / version)
    names = [v.name for v in MEASUREMENTS]
    if rt.measurements != names or rt.controls != [v.name for v in CONTROLS]:
        raise CardError(f"served version {version} has other variables; compare by hand or use --force")
    w = p.test
    L = min(candidate_history, rt.card["history"]["max"])
    H = w.x_fut.shape[1]
    if rt.card["history"]["min"] > L or rt.max_horizon < H:
        raise CardError(f"served version {version} cannot forecast these windows; compare by hand or use --force")
    try:
        mean = rt.predict(w.x_hist[:, -L:], w.u_hist[:, -L:], w.u_fut, w.t_last).mean
    except Exception as exc:  # e.g. ONNX Runtime refusing the inputs of a model with other known inputs
        why = f"served version {version} failed on these windows ({exc}); compare by hand or use --force"
        raise CardError(why) from None
    ref = ev.error_table(ev.persistence(w), w.x_fut)
    table = ev.error_table(mean, w.x_fut)
    return version, ev.headline_score(ev.headline(table, ref, p.x_std, top5_indices(p)))


def new_version_name(preset: str) -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + f"-{preset}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (section.field=value): see training/config.py or `--show-config`.",
    )
    parser.add_argument("--preset", default="default", help="tiny (CI, ~1 min) or default")
    parser.add_argument("--config", help="TOML file with [data], [model] and [train] tables")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    parser.add_argument("--version", help="name of the new version (default: UTC time and preset)")
    parser.add_argument("--run-dir", help="where checkpoints and logs go (default: runs/<version>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--force", action="store_true", help="promote even if it does not beat the served model")
    parser.add_argument("--no-promote", action="store_true", help="store the version but never promote it")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.epochs=5 model.z_dim=32")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        splits(cfg.data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.show_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.resume and not args.run_dir:
        print("error: --resume needs --run-dir (the folder of the interrupted run)", file=sys.stderr)
        return 2
    version = args.version or (Path(args.run_dir).name if args.run_dir else new_version_name(args.preset))
    store, run_dir = Path(args.store), Path(args.run_dir or f"runs/{version}")
    if (store / version).exists():
        print(f"error: version {version} already exists in {store}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    p = prepare(cfg)
    print(
        f"data: {len(p.train.x_hist)} train / {len(p.val.x_hist)} val / {len(p.test.x_hist)} test windows",
        file=sys.stderr,
    )
    try:
        model, log = train(cfg, p, run_dir, resume=args.resume)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    train_seconds = sum(row["seconds"] for row in log)  # epoch times, also right after a --resume
    calib = calibrate(model, p, cfg)
    metrics, kept = evaluate_all(model, p, cfg, calib)
    metrics["training_seconds"] = train_seconds
    metrics["calibration"] = calib
    metrics["log"] = log
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    plots = write_plots(run_dir, log, metrics, kept, p.x_std)
    atomic_write(run_dir / "report.md", report_markdown(version, metrics, calib, train_seconds).encode())
    _print_headline(metrics, calib)

    # Build the version in a temp folder, then rename it into the store: a version appears whole or not at all.
    from export.onnx_export import ParityError, export_version

    staging = store / f".tmp-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        card = build_card(version, cfg, p, metrics, calib, train_seconds)
        w = p.test
        u_hist, u_fut = p.inputs(w)
        sample = [(p.nx(w.x_hist[:8]), u_hist[:8], u_fut[:8])]
        export_version(model, card, staging, sample)
        torch.save(model.state_dict(), staging / "weights.pt")
        atomic_write(staging / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        for name in ("metrics.json", "report.md", "log.csv", *plots):
            shutil.copy2(run_dir / name, staging / name)
        staging.rename(store / version)
    except ParityError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    print(f"stored version {version} in {store}/{version}", file=sys.stderr)
    return promote_if_better(store, version, metrics["score"], p, cfg, force=args.force, never=args.no_promote)


def promote_if_better(
    store: Path, version: str, score: float, p: Prepared, cfg: RunConfig, *, force: bool, never: bool
) -> int:
    """The promotion gate: the candidate becomes current only if its held-out score beats the served one's."""
    if never:
        print(f"not promoted (--no-promote); current stays {current_version(store)}", file=sys.stderr)
        return 0
    try:
        served = score_served(store, p, cfg.train.history)
    except CardError as exc:
        if not force:
            print(f"not promoted: {exc}", file=sys.stderr)
            return 0
        served = None
    if served is None or force or score < served[1]:
        set_current(store, version)
        why = "forced" if force else ("no model was served" if served is None else f"{score:.4f} < {served[1]:.4f}")
        print(f"promoted {version} to current ({why})", file=sys.stderr)
    else:
        print(
            f"not promoted: score {score:.4f} does not beat served {served[0]} ({served[1]:.4f}) on the same "
            "held-out windows; use --force to promote anyway",
            file=sys.stderr,
        )
    return 0


def _print_headline(metrics: dict[str, Any], calib: dict[str, Any]) -> None:
    print("\nheld-out headline (lower is better except skill):")
    print(f"{'model':<15} {'h':>3} {'relRMSE top5':>13} {'NRMSE':>7} {'skill':>7}")
    for name, by_h in metrics["headline"].items():
        for h, v in by_h.items():
            print(
                f"{name:<15} {h:>3} {100 * v['rel_rmse_top5']:>12.2f}% {v['nrmse_all']:>7.3f} "
                f"{100 * v['skill_vs_persistence']:>6.1f}%"
            )
    print(
        f"80% interval coverage: val {100 * calib['val_coverage_80']:.1f}%, "
        f"test {100 * metrics['coverage_80_test']:.1f}%"
    )


if __name__ == "__main__":
    raise SystemExit(main())
