"""Stage 4 of a run, the report: the scores (``training.scoring``) in words, plots and report.md, and the run's
outputs written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import atomic_write
from plant.catalog import Catalog
from training import evaluate as ev
from training.gaps import GAP_BLOCK
from training.prepare import Prepared


def loop_lines(metrics: dict[str, Any], step_minutes: int, *, markdown: bool = False) -> list[str]:
    """The looped controls' forecasts (what each loop will apply) against the last value and the same time
    yesterday (reports from before it: the last value alone), where left to the loop."""
    loops = metrics.get("loop_outputs", {})
    if not loops:
        return []
    steps = list(next(iter(loops.values()))["rmse"])
    lead = [ev.lead_label(s, step_minutes) for s in steps]
    refs = "last value / yesterday" if any("yesterday_rmse" in r for r in loops.values()) else "last value"
    covered = all("coverage_80" in r for r in loops.values())
    head = ["control", "windows", *[f"RMSE {x} ({refs})" for x in lead], *["80% coverage"] * covered]

    def cell(r: dict[str, Any], s: str) -> str:
        day = r.get("yesterday_rmse", {}).get(s)
        refs = f"{r['persistence_rmse'][s]:.4g}" + ("" if day is None else f" / {day:.4g}")
        return f"{r['rmse'][s]:.4g} ({refs}) {r['unit']}"

    rows = [
        [name, str(r["windows"]), *[cell(r, s) for s in steps], *[f"{100 * r['coverage_80']:.1f}%"] * covered]
        for name, r in loops.items()
    ]
    title = "What the loops will apply, forecast where the request left it to them:"
    pulled = metrics.get("calibration", {}).get("loop_pull_fit", {}).get("loops", {})
    said = [f"{c} at {n} lead time{'s' * (n > 1)}" for c, f in pulled.items() if (n := len(f["kept_steps"]))]
    pull = (
        [
            "The answer's pull towards each loop's last value (calibration.loop_pull), kept where it cut the loop's "
            f"error on held-out validation scenarios: {', '.join(said) or 'none'}."
        ]
        if pulled
        else []
    )
    if markdown:
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
        return ["", title, "", *table] + (["", *pull] if pull else [])
    return ["", title, *("  ".join(r) for r in rows), *pull]


def width_lines(calib: dict[str, Any]) -> list[str]:
    """The interval width in words (training.model.IntervalWidth): its driver, what each way of telling the
    model does to it, and the validation coverage per request and regime/policy cell."""
    width = calib.get("width")
    if not width:
        return []
    lines = [""]
    if width["driver"] is not None and width["gamma"]:
        lines.append(
            f"The interval widens by exp({width['gamma']:g} z) with z the highest {width['driver_name']} over the "
            f"history as a z-score (clipped to {width['driver_clip'][0]:g}..{width['driver_clip'][1]:g}), gamma "
            "chosen, of a few, to bring the validation regime/policy cells and the quarters of z closest to 80% "
            "coverage (least squares; what each reached is below)."
        )
    for k in width["known"]:
        when = "when sent" if k.get("when", "known") == "known" else "when not sent"
        lines.append(f"{k['input']} ({when}): the width times {np.median(k['ratio']):.2f} (median over the variables).")
    motion = width.get("motion")
    if motion:
        lines.append(
            f"A plan that moved over the history's last {motion['steps']} samples: the width times "
            f"{np.median(motion['moved']):.2f}; one that stood still: times {np.median(motion['still']):.2f} "
            "(medians over the variables)."
        )
    for request, cells in calib["val_coverage_by_regime"].items():
        lines.append(f"Validation coverage, {request}: " + ", ".join(f"{g} {100 * c:.1f}%" for g, c in cells.items()))
    return lines


def kept_epoch(log: list[dict[str, float]]) -> dict[str, float]:
    """The epoch whose weights the run keeps: the first with the lowest validation forecast loss (training.loop)."""
    return min(log, key=lambda r: r["val_forecast_mse"])


def plant_time(minutes: float) -> str:
    """Clock minutes on the influent's calendar (day 0 is a Monday) as 'day 12 (Fri) 06:15'."""
    day, rest = divmod(round(float(minutes)), 24 * 60)
    weekday = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[day % 7]
    return f"day {day} ({weekday}) {rest // 60:02d}:{rest % 60:02d}"


def example_windows(w: Any, per_scenario: int = 1) -> list[int]:
    """Windows to draw: for each held-out scenario (each regime), the one where the truth moves most."""
    picks = []
    for sid in dict.fromkeys(w.scenario.tolist()):
        idx = np.flatnonzero(w.scenario == sid)
        spread = np.nanstd(w.x_fut[idx] / np.maximum(np.nanstd(w.x_fut, (0, 1)), 1e-9), axis=1).mean(1)
        picks += [int(i) for i in idx[np.argsort(-spread)[:per_scenario]]]
    return picks


def plot_variables(p: Prepared, w: Any, count: int = 6) -> list[int]:
    """What the example plot shows: the first disturbance (the influent's flow, where the catalog has one),
    then the plant measurements that move most on the held-out windows (in units of their training std)."""
    moving = np.nanstd(w.x_fut, axis=(0, 1)) / p.x_std[: p.n_targets]
    plant = sorted(p.catalog.plant_positions(), key=lambda i: -moving[i])
    first = p.catalog.disturbance_positions()[:1]
    return (first + plant)[:count]


def write_plots(
    run_dir: Path, log: list[dict[str, float]], metrics: dict[str, Any], kept: dict, p: Prepared
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    best = kept_epoch(log)
    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [r["epoch"] for r in log]
    for key in ("train_loss", "val_loss", "val_forecast_mse"):
        ax.plot(ep, [r[key] for r in log], label=key)
    ax.axvline(best["epoch"], color="k", ls=":", lw=1)
    ax.plot([best["epoch"]], [best["val_forecast_mse"]], "k*", ms=12, label=f"kept: epoch {best['epoch']}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title("KoVAE training (weights kept from the best validation forecast loss)")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=90)
    files.append("loss.png")
    plt.close(fig)

    x_std, step_h = p.x_std[: p.n_targets], p.catalog.sample_minutes / 60
    fig, ax = plt.subplots(figsize=(7, 4))
    for model_name, rmse in metrics["rmse_by_horizon"].items():
        r = np.array(rmse)
        hours = step_h * np.arange(1, len(r) + 1)
        style = {"color": "C0", "lw": 3, "zorder": 5} if model_name == "kovae" else {"lw": 1, "ls": "--", "alpha": 0.8}
        ax.plot(hours, np.mean(r / x_std, 1), label="KoVAE" if model_name == "kovae" else model_name, **style)
    ax.set_xlabel("lead time [h]")
    ax.set_ylabel("mean NRMSE over variables")
    ax.set_yscale("log")
    ax.set_title("Held-out error against lead time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "error_vs_horizon.png", dpi=90)
    files.append("error_vs_horizon.png")
    plt.close(fig)

    w, fc, band = kept["windows"], kept["forecasts"], kept["band"]
    keys = plot_variables(p, w)
    picks = example_windows(w)
    L, H = w.x_hist.shape[1], w.x_fut.shape[1]
    hist_h, fut_h = step_h * np.arange(1 - L, 1), step_h * np.arange(1, H + 1)
    width = max(6.5, 4.2 * len(picks))
    fig, axes = plt.subplots(len(keys), len(picks), figsize=(width, 1.9 * len(keys)), squeeze=False)
    for col, i in enumerate(picks):
        for row, j in enumerate(keys):
            ax = axes[row, col]
            var = p.catalog.targets[j]
            lo, hi = band[i, :, :, j]
            ax.fill_between(
                fut_h,
                np.clip(lo, var.min, var.max),
                np.clip(hi, var.min, var.max),
                color="C0",
                alpha=0.25,
                label="80% interval",
            )
            ax.plot(hist_h, w.x_hist[i, :, j], color="k", lw=1, label="history")
            ax.plot(fut_h, w.x_fut[i, :, j], color="k", lw=1, ls="--", label="truth")
            ax.plot(fut_h, np.clip(fc["kovae"][i, :, j], var.min, var.max), color="C0", lw=2, label="KoVAE mean")
            ax.plot(fut_h, fc["persistence"][i, :, j], color="C3", lw=0.8, label="persistence")
            ax.axvline(0, color="0.5", lw=0.5)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"{var.name} [{var.unit}]", fontsize=8)
            if row == 0:
                ax.set_title(f"{w.scenario[i]}, forecast from {plant_time(w.t_last[i])}", fontsize=8)
            if row == len(keys) - 1:
                ax.set_xlabel("hours from the forecast start", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    ncol = len(labels) if width > 10 else 3
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if ncol < len(labels) else 0.035, 1, 1))
    fig.savefig(run_dir / "forecast_examples.png", dpi=80)
    files.append("forecast_examples.png")
    plt.close(fig)
    return files


def losses_in_words(metrics: dict[str, Any], step_minutes: int) -> list[str]:
    """Sentences naming every baseline that beats the KoVAE (mean NRMSE at a headline horizon), or saying none,
    and every regime where the KoVAE's pooled skill is below 0 (the gate's measure)."""
    head = metrics["headline"]
    lines = []
    for h, kovae in head["kovae"].items():
        lead = ev.lead_label(h, step_minutes)
        better = {
            name: by_h[h]["nrmse_all"]
            for name, by_h in head.items()
            if name != "kovae" and by_h[h]["nrmse_all"] < kovae["nrmse_all"]
        }
        if better:
            who = ", ".join(f"{name} ({v:.3f})" for name, v in sorted(better.items(), key=lambda kv: kv[1]))
            lines.append(f"- **At {lead} the KoVAE loses** (mean NRMSE {kovae['nrmse_all']:.3f}) to: {who}.")
        else:
            lines.append(
                f"- At {lead} the KoVAE (mean NRMSE {kovae['nrmse_all']:.3f}) beats every baseline's mean NRMSE."
            )
    # The gate's measure: a regime where the forecast loses to the better of the last value and yesterday is said
    # too, whatever the averages above (the pooled NRMSE can win while a regime loses).
    for regime, table in metrics.get("regimes", {}).items():
        losing = {h: v for h, v in table["pooled_skill_all"].items() if not v >= 0}
        if regime != "all" and losing:
            where = ", ".join(f"{v:.3f} at {ev.lead_label(h, step_minutes)}" for h, v in losing.items())
            lines.append(
                f"- **In {regime} the KoVAE loses to the better naive forecast** (pooled skill, all variables: "
                f"{where})."
            )
    return lines


def report_markdown(
    version: str, metrics: dict[str, Any], calib: dict[str, Any], seconds: float, catalog: Catalog
) -> str:
    step = catalog.sample_minutes
    lines = [
        f"# KoVAE forecast report: {version}",
        "",
        f"Held-out scenarios: {', '.join(metrics['test_scenarios'])} ({metrics['test_windows']} windows). "
        f"Training took {seconds / 60:.1f} min.",
        "",
        f"Weights kept from epoch {metrics['kept_epoch']} (the lowest validation forecast loss).",
        *(
            [
                "",
                f"Recalibrated from {r['from']}: {', '.join(r['refit'])} fitted again on its validation windows, "
                "every other term and the weights kept (`python -m training.recalibrate`).",
            ]
            if (r := metrics.get("recalibrated"))
            else []
        ),
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
    lines += ["", "Against the baselines:", "", *losses_in_words(metrics, step)]
    lines += [
        "",
        f"Every figure here was measured in the request a plant can send ({metrics['request']}), unless it says "
        "otherwise.",
        "",
        f"Per regime and operating policy, pooled skill against the better naive forecast (gate score "
        f"{metrics['score']:.3f}: {metrics['score_rule']}):",
        "",
        *ev.regime_lines(metrics["regimes"], step, markdown=True),
        "",
        "Per regime:",
        "",
        *ev.regime_lines(metrics["by_regime"], step, markdown=True),
    ]
    for request, r in metrics.get("requests", {}).items():
        lines += ["", f"Told otherwise, `{request}` ({r['words']}):", ""]
        lines += ev.regime_lines(r["regimes"], step, markdown=True)
    lines += loop_lines(metrics, step, markdown=True)
    lines += [
        "",
        f"80% interval coverage: validation {100 * calib['val_coverage_80']:.1f}% (calibrated there), "
        f"test {100 * metrics['coverage_80_test']:.1f}%.",
        *width_lines(calib),
        "",
        "Per variable at the longest headline horizon (KoVAE):",
        "",
        "| variable | RMSE | rel. RMSE | NRMSE |",
        "|---|---|---|---|",
    ]
    last_h = max(metrics["per_variable"], key=int)
    units = {v.name: v.unit for v in catalog.targets}
    for row in metrics["per_variable"][last_h]:
        lines.append(
            f"| {row['variable']} | {row['rmse']:.4g} {units[row['variable']]} | {100 * row['rel_rmse']:.1f}% | "
            f"{row['nrmse']:.3f} |"
        )
    gaps = metrics.get("history_gaps", {})
    if gaps:
        steps = list(next(iter(gaps.values())))
        lines += [
            "",
            "Pooled skill (all variables) with sensor gaps in the history (one measured variable per window; "
            "against naive forecasts given the same gaps, and against the complete history's):",
            "",
        ]
        lines += [
            "| history | " + " | ".join(ev.lead_label(s, step) for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        names = {"none": "complete", "last_2h": "last 2 h missing", "quarter": "a quarter missing"}

        def label(case: str) -> str:  # "last_2h, complete references" -> "last 2 h missing, complete references"
            gap, _, against = case.partition(", ")
            return names[gap] + (f", {against}" if against else "")

        lines += [f"| {label(c)} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |" for c, r in gaps.items()]
        fit = calib.get("gap_pull_fit")
        if fit:
            kept = [f"{v} {fit['kept_hours'][v]:g} h, {100 * fit['held_out_gain'][v]:.1f}%" for v in fit["variables"]]
            lines += [
                "",
                "A down sensor's pull towards its last value (calibration.gap_pull), kept at the lead times "
                f"({GAP_BLOCK * step / 60:g}-h blocks, counted from the last value) where it cut that variable's error "
                f"on held-out validation windows; hours kept and the cut of its error: {'; '.join(kept) or 'none'}.",
            ]
    forecasts = metrics.get("influent_forecast", {})
    if forecasts:
        steps = list(next(iter(forecasts["none"].values()))["pooled_skill_all"])
        lead = [ev.lead_label(s, step) for s in steps]
        lines += [
            "",
            "Diagnostic, not a caller's figure: pooled skill with the true future disturbances (influent), alone "
            "(perfect) or plus synthetic noise growing to train.forecast_noise std (noisy), given as known inputs:",
            "",
        ]
        head = ["regime", "influent forecast", *[f"all {x}" for x in lead], *[f"plant {x}" for x in lead], "cover80"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for group in forecasts["none"]:
            for mode, table in forecasts.items():
                r = table[group]
                cells = [f"{v:.3f}" for v in [*r["pooled_skill_all"].values(), *r["pooled_skill_plant"].values()]]
                cover = "-" if r.get("coverage_80") is None else f"{100 * r['coverage_80']:.1f}%"
                lines.append(f"| {group} | {mode} | " + " | ".join(cells) + f" | {cover} |")
    missing = metrics.get("missing", {})
    if any(share > 0 for split in missing.values() for share in split.values()):
        lines += ["", "Missing data (share of samples, after the import's bridging):", ""]
        lines += ["| variable | " + " | ".join(missing) + " |", "|---|" + "---|" * len(missing)]
        for name in next(iter(missing.values())):
            lines.append(f"| {name} | " + " | ".join(f"{100 * missing[k][name]:.1f}%" for k in missing) + " |")
        dropped = metrics.get("dropped_windows", {})
        lines += ["", "Windows dropped for missing data: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "."]
    lines += ["", "![loss](loss.png)", "", "![error vs horizon](error_vs_horizon.png)", ""]
    lines += ["![examples](forecast_examples.png)", ""]
    return "\n".join(lines)


def write_outputs(
    run_dir: Path, version: str, metrics: dict[str, Any], calib: dict[str, Any], seconds: float, kept: dict, p: Prepared
) -> list[str]:
    """A run's outputs into ``run_dir``: ``metrics.json``, the plots (from ``metrics["log"]``) and ``report.md``;
    returns their names, the files a version holds beside the training log (``training.run``,
    ``training.recalibrate``)."""
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    plots = write_plots(run_dir, metrics["log"], metrics, kept, p)
    atomic_write(run_dir / "report.md", report_markdown(version, metrics, calib, seconds, p.catalog).encode())
    return ["metrics.json", "report.md", *plots]


def print_headline(metrics: dict[str, Any], calib: dict[str, Any], catalog: Catalog) -> None:
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
    if "kept_epoch" in metrics:
        print(f"weights kept from epoch {metrics['kept_epoch']} (lowest validation forecast loss)")
    print("\n".join(line.replace("**", "") for line in losses_in_words(metrics, catalog.sample_minutes)))
    print(f"\nrequest: {metrics['request']}")
    print("pooled skill per regime/policy, 1 - sqrt(NMSE / NMSE of the better naive forecast); < 0: worse than naive")
    print("\n".join(ev.regime_lines(metrics["regimes"], catalog.sample_minutes)))
    print(f"gate score {metrics['score']:.4f} ({metrics['score_rule']})")
    for request, r in metrics.get("requests", {}).items():
        print(f"\ntold otherwise, {request} ({r['words']}):")
        print("\n".join(ev.regime_lines(r["regimes"], catalog.sample_minutes)))
    print("\n".join(loop_lines(metrics, catalog.sample_minutes)))
    for mode, table in metrics.get("influent_forecast", {}).items():
        if mode != "none":
            cells = "; ".join(
                f"{g} " + "/".join(f"{v:.3f}" for v in r["pooled_skill_all"].values()) for g, r in table.items()
            )
            print(f"pooled skill (all) with a {mode} influent forecast: {cells}")
    gaps = metrics.get("history_gaps", {})
    if gaps:
        print(
            "pooled skill (all) with one sensor's last 2 h / a quarter of its history missing: "
            + "; ".join(f"{case} " + "/".join(f"{v:.3f}" for v in r.values()) for case, r in gaps.items())
        )
