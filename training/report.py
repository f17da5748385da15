"""Stage 4 of a run: every model and baseline on the held-out windows, then the plots and report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training import evaluate as ev
from training.calibrate import predict
from training.catalog import MEASUREMENTS
from training.config import RunConfig
from training.model import KoVAE
from training.prepare import Prepared


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


def print_headline(metrics: dict[str, Any], calib: dict[str, Any]) -> None:
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
