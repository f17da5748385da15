"""Held-out accuracy of a stored model against the product's targets, through ONNX Runtime (no torch).

``python bench/accuracy.py [--store models] [--version V] [--samples N] [--executor local]``

Rebuilds the version's held-out windows from its own card (data config, splits, history, horizon) and runs them
through the service's runtime in the request a plant can send (``training.requests``, "honest"): a control its
loop drives is left to the loop and the loop's setpoint planned (held where the plant cannot know it, the
cascade's DO setpoint), open-loop controls planned. A model without loops gets the looped controls held at their
last value, what such a plant could send it. It prints, per held-out scenario and overall, relative RMSE over the
card's top-5 variables, mean NRMSE and skill vs persistence, the 80% interval coverage; per regime and operating
policy the pooled skill against the better naive forecast at 15 min, 5 h and 24 h and its worst over every lead
time; the same told otherwise (setpoints held; and, as diagnostics, every control's true future); the same with
one sensor's last 2 h or a quarter of its history missing; the forecast of what the loops will apply; a loop's
measurement at a constant setpoint against the naive forecasts; the influent's own predictability; and which
targets are met. The data come from the cache, or are simulated if missing (about 45 min).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.cli import served_version
from modelcard.card import Calendar, exogenous_outputs, last_observed, loops, read_card, scalers
from modelcard.runtime import ModelRuntime
from plant.executor import executor_arg, run_all
from plant.scenarios import ScenarioData
from training import evaluate as ev
from training.config import config_from_dict
from training.data import DataError, Windows, heldout_windows, load_data
from training.gaps import with_gap
from training.requests import REQUESTS, held_setpoints, request_arrays

TARGET_POOLED = {"20": 0.25, "96": 0.15}  # pooled skill at 5 h and 24 h, all and plant variables, on every cell
TARGET_COVERAGE = (0.75, 0.85)  # of the 80% interval, on every cell
TARGET_LOOP_RATIO = 1.1  # a loop's measurement at a constant setpoint: RMSE at most 10% above the better naive's
TARGET_GAP_COST = 0.1  # one sensor's last 2 h missing: 15-min pooled skill at most this share below the complete's
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # candidate ridge strengths of the influent forecaster, chosen on validation


def requested(rt: ModelRuntime, w: Windows, request: str, held: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The runtime's future inputs for ``w`` told as ``request``: u_fut (and, for models that take them, the
    setpoints). A model without loops cannot leave a control to its loop: it gets the control held."""
    setpoint_names = [v["name"] for v in rt.card["variables"].get("setpoint_inputs", {}).get("variables", [])]
    declared = loops(rt.card) or [
        {"control": c, "setpoint": s} for c, s in (("KLa_5", "SO_5_setpoint"), ("Q_intr", "SNO_2_setpoint"))
    ]
    declared = [lp for lp in declared if lp["control"] in rt.controls and lp["setpoint"] in setpoint_names]
    looped = [rt.controls.index(lp["control"]) for lp in declared]
    loop_setpoints = [setpoint_names.index(lp["setpoint"]) for lp in declared]
    u_fut, s_hist, s_fut = request_arrays(w, request, looped, loop_setpoints, held)
    if not rt.looped:
        u_fut = np.where(np.isnan(u_fut), last_observed(w.u_hist)[:, None], u_fut)
    return {"u_fut": u_fut, **({"s_hist": s_hist, "s_fut": s_fut} if rt.setpoints and s_hist is not None else {})}


def score(rt: ModelRuntime, w: Windows, told: dict[str, np.ndarray], x_std: np.ndarray, top5: list[int], samples: int):
    """Headline figures, coverage, relative RMSE by horizon, and the forecasts (mean of every output, the band of
    the samples of the measurements, and that of the looped controls' forecasts) for a set of windows told
    ``told``; a few windows at a time, so the samples never fill memory."""
    rng, step, n = np.random.default_rng(0), max(1, 4096 // max(samples, 1)), len(rt.measurements)
    parts = []
    for i in range(0, len(w.x_hist), step):
        c = slice(i, i + step)
        given = {k: v[c] for k, v in told.items() if k != "u_fut"}
        parts.append(rt.predict(w.x_hist[c], w.u_hist[c], told["u_fut"][c], w.t_last[c], samples, rng, **given))
    mean = np.concatenate([f.mean for f in parts])
    bands = np.concatenate([ev.sample_band(f.samples) for f in parts]) if samples else None
    band, loop_band = (None, None) if bands is None else (bands[..., :n], bands[..., n:])
    table = ev.error_table(mean[..., :n], w.x_fut)
    ref = ev.error_table(ev.persistence(w), w.x_fut)
    return {
        "headline": ev.headline(table, ref, x_std, top5),
        "coverage": ev.interval_coverage(band, w.x_fut) if band is not None else float("nan"),
        "rel": ev.relative_rmse(table),
        "windows": len(w.x_hist),
        "mean": mean,
        "band": band,
        "loop_band": loop_band,
    }


def score_version(task: tuple) -> dict:
    """``score`` for a version folder: one held-out scenario as a task a Dask worker can run (the worker opens
    the version itself; it must see the same model store)."""
    vdir, w, held, x_std, top5, samples = task
    rt = ModelRuntime(vdir)
    return score(rt, w, requested(rt, w, "honest", held), x_std, top5, samples)


def _scored(item: tuple[str, tuple]) -> tuple[str, dict]:
    scenario, task = item
    return scenario, score_version(task)


def influent_floor(
    data: dict[str, ScenarioData],
    ids: dict[str, tuple[str, ...]],
    val: Windows,
    test: Windows,
    influent: list[int],
    x_scalers: tuple[np.ndarray, np.ndarray],
    history: int,
    horizons: tuple[int, ...],
) -> dict[int, np.ndarray]:
    """Per horizon, the test relative RMSE (len(influent),) of the influent forecast from its own past
    (``ev.DirectRidge`` on the last ``history`` samples and the clock), fitted on the training scenarios with the
    ridge strength that does best on validation."""
    mean, std = x_scalers
    series = [((data[i].x - mean) / std, data[i].t_minutes) for i in ids["train"]]
    calendar = Calendar(daily=3, weekly=3)
    fits = [ev.DirectRidge(influent, history, calendar, r).fit(series, horizons) for r in RIDGES]

    def rel(f: ev.DirectRidge, w: Windows, h: int) -> np.ndarray:
        pred = f.forecast((w.x_hist - mean) / std, w.t_last, h) * std[influent] + mean[influent]
        return ev.relative_rmse(ev.error_table(pred[:, None], w.x_fut[:, h - 1 : h, influent]))[0]

    out = {}
    for h in horizons:
        best = min(fits, key=lambda f: float(np.mean(rel(f, val, h))))
        out[h] = rel(best, test, h)
    return out


def worst_lead(mean: np.ndarray, w: Windows, cells: np.ndarray, scale: np.ndarray, cols: list[int]) -> dict:
    """Per cell, the lowest pooled skill over every lead time (the target: >= 0 at each)."""
    out = {}
    for cell in dict.fromkeys(cells.tolist()):
        k = cells == cell
        naive = [ev.persistence(w)[k][..., cols], ev.seasonal_naive(w)[k][..., cols]]
        out[cell] = float(ev.pooled_skill(mean[k][..., cols], naive, w.x_fut[k][..., cols], scale[cols]).min())
    return out


def loop_ratio(mean: np.ndarray, w: Windows, k: np.ndarray, j: int) -> float:
    """RMSE of variable ``j`` over every lead time of windows ``k``, over the better naive forecast's."""
    truth = w.x_fut[k][..., j]
    model = np.sqrt(np.nanmean((mean[k][..., j] - truth) ** 2))
    naive = min(np.sqrt(np.nanmean((f[k][..., j] - truth) ** 2)) for f in (ev.persistence(w), ev.seasonal_naive(w)))
    return float(model / max(naive, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version", help="default: the served version (models/CURRENT)")
    parser.add_argument(
        "--samples", type=int, help="forecast samples for the interval coverage (default: the card's calibration)"
    )
    parser.add_argument(
        "--executor",
        default="local",
        type=executor_arg,
        help='"local", or "tcp://HOST:PORT" to score each held-out scenario on Dask',
    )
    args = parser.parse_args()
    version = served_version(parser, Path(args.store), args.version)
    vdir = Path(args.store) / version
    card = read_card(vdir)
    cfg = config_from_dict(card["training"]["config"])
    rt = ModelRuntime(vdir)
    samples = args.samples or rt.calibration_samples
    x_std = scalers(card)[1]
    names = rt.measurements
    top5 = [names.index(n) for n in card["metrics"]["top5_variables"]]
    influent = exogenous_outputs(card["variables"])
    plant = [i for i in range(len(names)) if i not in influent]
    catalog, data, ids, _ = load_data(cfg)
    if catalog.loops and not rt.setpoints:
        parser.error(
            f"{version} reads no setpoints, so this bench cannot tell it what a looped plant can send (its loops' "
            "future output would reach it): its training report scores it with the loops' controls held"
        )
    by_policy = held_setpoints(catalog)
    held = {sid: by_policy.get(d.policy, ()) for sid, d in data.items()}
    t, day = cfg.train, catalog.steps_per_day
    cut_args = {"max_windows": t.max_eval_windows, "steps_per_day": day, "max_missing": cfg.data.max_missing}
    cut = {}
    for sc in ids["test"]:
        try:
            cut[sc] = heldout_windows([data[sc]], t.history, t.horizon, **cut_args)
        except DataError as exc:  # a plant's stretch the service answers no request of: said, not scored
            print(f"{sc}: left out: {exc}")
    everything = heldout_windows([data[sc] for sc in ids["test"]], t.history, t.horizon, **cut_args)
    # One task per held-out scenario, on this machine or on a Dask cluster; then all pooled, and per cell.
    tasks = [(sc, (vdir.resolve(), w, held, x_std, top5, samples)) for sc, w in cut.items()]
    scored = dict(run_all(_scored, tasks, args.executor))
    results = {sc: scored[sc] for sc in cut}
    results["all"] = overall = score(rt, everything, requested(rt, everything, "honest", held), x_std, top5, samples)
    # The pooled skill's fixed scale per variable: its std over all test scenarios.
    scale = np.maximum(np.nanstd(np.concatenate([data[sc].x for sc in ids["test"]]), 0), 1e-12)
    cell_of = {sid: f"{d.group}/{d.policy}" for sid, d in data.items()}
    cells = np.array([cell_of[s] for s in everything.scenario])
    n = len(names)
    regimes = ev.regime_table(overall["mean"][..., :n], overall["band"], everything, cell_of, scale, plant)

    horizons = list(overall["headline"])
    steps_h = card["sample_minutes"] / 60
    print(f"model {version}; top-5 variables {', '.join(card['metrics']['top5_variables'])}")
    print(f"request: honest, {REQUESTS['honest']}")
    width = max(len(s) for s in results)
    head = (
        f"{'scenario':<{width}} {'windows':>7} {'h':>3} {'relRMSE top5':>12} {'NRMSE':>6} {'skill':>6} {'cover80':>7}"
    )
    print(head)
    for sc, r in results.items():
        for h in horizons:
            v = r["headline"][h]
            print(
                f"{sc:<{width}} {r['windows']:>7} {h:>3} {100 * v['rel_rmse_top5']:>11.1f}% "
                f"{v['nrmse_all']:>6.3f} {100 * v['skill_vs_persistence']:>5.1f}% {100 * r['coverage']:>6.1f}%"
            )

    print(
        "\npooled skill per regime/policy, 1 - sqrt(NMSE / NMSE_ref), against the better of persistence and seasonal"
        "\nnaive at each step (NMSE: mean over variables of MSE / std^2, std over all test scenarios); < 0: worse"
    )
    print("\n".join(ev.regime_lines(regimes, card["sample_minutes"])))
    lo, hi = rt.x_bounds
    outside = float(np.mean((overall["band"] < lo) | (overall["band"] > hi))) if samples else float("nan")
    print(f"\n80% band values outside the physical bounds (before the service clips them): {100 * outside:.2f}%")
    worst_all = worst_lead(overall["mean"], everything, cells, scale, list(range(n)))
    worst_plant = worst_lead(overall["mean"], everything, cells, scale, plant)
    print("\nlowest pooled skill over every lead time (all / plant variables):")
    for cell in worst_all:
        print(f"  {cell:<32} {worst_all[cell]:>7.3f} {worst_plant[cell]:>7.3f}")

    told = {"honest": overall["mean"]}
    if rt.setpoints:
        for request in ("held", "applied", "bare"):
            r = score(rt, everything, requested(rt, everything, request, held), x_std, top5, samples)
            told[request] = r["mean"]
            table = ev.regime_table(r["mean"][..., :n], r["band"], everything, cell_of, scale, plant)
            print(f"\ntold otherwise, {request} ({REQUESTS[request]}):")
            print("\n".join(ev.regime_lines(table, card["sample_minutes"])))
    perfect = {**requested(rt, everything, "honest", held), "d_fut": everything.x_fut[..., rt.disturbances]}
    told["true influent"] = score(rt, everything, perfect, x_std, top5, 0)["mean"]
    # Which cells' shortfall is the influent nobody knows ahead (rain), and which is the model's own.
    table = ev.regime_table(told["true influent"][..., :n], None, everything, cell_of, scale, plant)
    print("\ndiagnostic, the honest request with the true future influent as its forecast (no caller has it):")
    print("\n".join(ev.regime_lines(table, card["sample_minutes"])))
    h0 = int(horizons[0])
    print(
        f"\nplant pooled skill at {h0 * steps_h:g} h per regime/policy, as the model is told more or less "
        "(honest: the headline; every other column a diagnostic, with what no caller has):"
    )
    print(f"{'':<32} " + " ".join(f"{k:>14}" for k in told))
    for cell in dict.fromkeys(cells.tolist()):
        k = cells == cell
        naive = [ev.persistence(everything)[k][..., plant], ev.seasonal_naive(everything)[k][..., plant]]
        truth = everything.x_fut[k][..., plant]
        skills = [ev.pooled_skill(f[k][..., plant], naive, truth, scale[plant])[h0 - 1] for f in told.values()]
        print(f"{cell:<32} " + " ".join(f"{v:>14.3f}" for v in skills))

    # Sensor gaps: one measured variable per window missing. Against naive forecasts given the same gaps (the
    # skill: the target's), and against the complete history's (what the gap costs the forecast itself; a
    # diagnostic, since the naive references lose by the gap too).
    print(
        "\npooled skill (all variables) with sensor gaps in the history, one measured variable per window; against "
        "naive forecasts with the same gaps, and (complete references) against the complete history's:"
    )
    gapped = {"complete": regimes["all"]["pooled_skill_all"]}
    for case in ("last_2h", "quarter"):
        w = with_gap(everything, case, card["sample_minutes"], n)
        r = score(rt, w, requested(rt, w, "honest", held), x_std, top5, 0)
        gapped[case] = ev.regime_table(r["mean"][..., :n], None, w, cell_of, scale, plant)["all"]["pooled_skill_all"]
        gapped[f"{case}, complete references"] = ev.regime_table(
            r["mean"][..., :n], None, everything, cell_of, scale, plant
        )["all"]["pooled_skill_all"]
    for case, skill in gapped.items():
        print(f"  {case:<30} " + " / ".join(f"{v:.3f}" for v in skill.values()) + f"  (steps {', '.join(skill)})")
    checks = []
    first = next(iter(gapped["complete"]))
    complete, gap = gapped["complete"][first], gapped["last_2h"][first]
    # As a share of the complete history's skill, from its size: a skill at or below 0 turned the ratio over.
    cost = (complete - gap) / abs(complete) if complete else (math.inf if gap < complete else 0.0)
    what = f"one sensor's last 2 h missing: 15-min pooled skill below the complete history's by <= {TARGET_GAP_COST}"
    checks.append((what, cost, cost <= TARGET_GAP_COST))
    if rt.looped:
        print(
            "\nwhat the loops will apply, forecast where the honest request left it to them"
            " (RMSE; last value / yesterday):"
        )
        closed = np.isnan(requested(rt, everything, "honest", held)["u_fut"][:, 0])
        day = 1440 // card["sample_minutes"]
        for j, c in enumerate(rt.looped):
            k = closed[:, c]
            if not k.any():  # no held-out window leaves it to its loop: nothing to score
                continue
            fc, truth = overall["mean"][k][..., n + j], everything.u_fut[k][..., c]
            last = everything.u_hist[k][:, -1:, c]
            steps = [s for s in (1, 20, 96) if s <= fc.shape[1]]

            cells_ = []
            for s in steps:
                at = everything.u_hist.shape[1] - 1 + s - day  # the same clock time a day before
                # Yesterday where the history holds it, else the last value (training.evaluate.seasonal_naive's rule).
                yest = everything.u_hist[k][:, at, c] if at >= 0 and s <= day else last[:, 0]
                err = [rmse(f, truth[:, s - 1]) for f in (fc[:, s - 1], last[:, 0], yest)]
                cells_.append(f"{s * steps_h:g} h {err[0]:.4g} ({err[1]:.4g} / {err[2]:.4g})")
                # A forecast worse than a naive one is a defect, the loops' as much as the measurements'.
                what = f"{rt.controls[c]} (left to its loop) at {s * steps_h:g} h: RMSE / better naive's <= 1"
                checks.append((what, err[0] / max(min(err[1:]), 1e-12), err[0] <= min(err[1:])))
            print(f"  {rt.controls[c]:<8} [{catalog.controls[c].unit}] {int(k.sum())} windows: " + "; ".join(cells_))
            if overall["loop_band"] is not None:
                # Its quantiles are answered as the measurements' are: the same coverage target holds.
                band_c = overall["loop_band"][k][..., j : j + 1]
                covered = [ev.interval_coverage(band_c[:, :, s - 1 : s], truth[:, s - 1 : s, None]) for s in steps]
                cover = ev.interval_coverage(band_c, truth[..., None])
                at = ", ".join(f"{s * steps_h:g} h {100 * v:.1f}%" for s, v in zip(steps, covered, strict=True))
                print(f"  {'':<8} 80% band coverage: every lead time {100 * cover:.1f}% ({at})")
                # Per cell a diagnostic: validation holds few of the cells where the blowers saturate most.
                in_cell = {cl: cells[k] == cl for cl in dict.fromkeys(cells[k].tolist())}
                by_cell = [
                    f"{cl} {100 * ev.interval_coverage(band_c[r], truth[r][..., None]):.1f}%"
                    for cl, r in in_cell.items()
                ]
                print(f"  {'':<8} by cell: " + ", ".join(by_cell))
                what = f"{rt.controls[c]} (left to its loop): 80% coverage in 75-85%"
                checks.append((what, cover, TARGET_COVERAGE[0] <= cover <= TARGET_COVERAGE[1]))
    for cell in dict.fromkeys(cells.tolist()):
        if not cell.endswith("/constant_setpoints"):
            continue
        for lp in loops(card) or []:
            if lp.get("measurement") in names:
                j = names.index(lp["measurement"])
                ratio = loop_ratio(overall["mean"], everything, cells == cell, j)
                what = f"{cell}: {lp['measurement']} RMSE / better naive's <= {TARGET_LOOP_RATIO}"
                checks.append((what, ratio, ratio <= TARGET_LOOP_RATIO))

    print(f"\nrelative RMSE at step {h0}, influent (disturbance) vs plant variables:")
    for sc, r in results.items():
        rel = r["rel"][h0 - 1]
        worst = max(plant, key=lambda i: rel[i])
        print(
            f"{sc:<{width}} influent {100 * rel[influent].mean():5.1f}%  plant {100 * np.median(rel[plant]):5.1f}% "
            f"(median; worst {names[worst]} {100 * rel[worst]:.0f}%)"
        )
    val = heldout_windows([data[sc] for sc in ids["val"]], t.history, t.horizon, **cut_args)
    steps = (1, *(int(h) for h in horizons))  # one step ahead: the sample-to-sample noise
    floor = influent_floor(data, ids, val, everything, influent, scalers(card)[:2], t.history, steps)
    pers_rel = ev.relative_rmse(ev.error_table(ev.persistence(everything), everything.x_fut))
    print(
        "\ninfluent from its own past (direct ridge on the last day and the clock, fitted on the training "
        "scenarios), relative RMSE on all held-out windows:"
    )
    print(f"{'variable':<9} " + " ".join(f"{'h' + str(h) + ' persist/ridge/kovae':>28}" for h in steps))
    for j, i in enumerate(influent):
        cells_ = [
            f"{100 * pers_rel[h - 1, i]:>8.1f}% {100 * floor[h][j]:>7.1f}% {100 * overall['rel'][h - 1, i]:>7.1f}%"
            for h in steps
        ]
        print(f"{names[i]:<9} " + " ".join(f"{c:>28}" for c in cells_))

    for cell, r in regimes.items():
        if cell == "all":
            continue
        checks.append((f"{cell}: pooled skill >= 0 at every lead time (all)", worst_all[cell], worst_all[cell] >= 0))
        checks.append(
            (f"{cell}: pooled skill >= 0 at every lead time (plant)", worst_plant[cell], worst_plant[cell] >= 0)
        )
        for step, target in TARGET_POOLED.items():
            for kind in ("all", "plant"):
                if step in r[f"pooled_skill_{kind}"]:
                    value = r[f"pooled_skill_{kind}"][step]
                    checks.append((f"{cell}: {kind} pooled skill at step {step} >= {target}", value, value >= target))
        cover = r["coverage_80"]
        checks.append((f"{cell}: 80% coverage in 75-85%", cover, TARGET_COVERAGE[0] <= cover <= TARGET_COVERAGE[1]))
    checks.append(("80% band values outside the physical bounds <= 1%", outside, outside <= 0.01))
    print("\ntargets (honest request):")
    for what, value, met in checks:
        print(f"  {'met    ' if met else 'NOT MET'}  {what}: {value:.3f}")
    print(f"{sum(m for _, _, m in checks)} of {len(checks)} met")


def rmse(forecast: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error over the windows that have both."""
    return float(np.sqrt(np.nanmean((forecast - truth) ** 2)))


if __name__ == "__main__":
    main()
