"""The KoVAE against MamKO and the forecasters a data team would pick, on the same windows and requests.

``python bench/peers.py [--store models] [--version V] [--quick] [--out bench_out/peers] [section.field=value ...]``

Rebuilds the version's data from its own card (``training.prepare``: the same scalers, training, validation and
held-out windows, the same known inputs), trains each peer (``bench/peers_models.py``: MamKO, a GRU seq2seq, a
LightGBM direct multi-horizon model) on the training windows, told what plants tell as the KoVAE was
(``training.loop.with_requests``), and scores every model on the held-out windows with the product's own metric
functions (``training.scoring.scored_table``, ``training.evaluate``): per regime x operating policy cell, the pooled
skill against the better naive forecast at 15 min, 5 h and 24 h (the tiny preset: its longest step), all and
plant variables, in the honest request and (diagnostic) told every control's true future ("applied"); 80%
coverage where a model gives intervals (the KoVAE); training time; forecast time per window; and the plant
team's own figure, the mean relative error (RMSE / mean |true|) over the top-5 variables, beside which their
guide's 14.6% for MamKO can be read. The KoVAE is the served model through ONNX Runtime, as the service runs it.

Then the counterfactual check of ``bench/counterfactual.py`` for every model (the sign of the change of SO_5,
SNH_eff and SNO_2 under +-30% KLa_5 and Q_intr, and a DO setpoint +-0.5, against the branched simulator), a
comparison plot (one held-out window per regime) and the targets: the KoVAE ahead of every peer at 5 h and 24 h
on every cell in the honest request, else where a peer wins and by how much; its sign share at least each
peer's. ``--quick``: tiny sizes, for the tests. The default sizes are meant to finish within an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench import counterfactual as cf
from bench.accuracy import requested
from bench.cli import served_version, version_config
from bench.peers_models import DEFAULT, QUICK, LightGBMDirect, Sizes, TorchPeer, make_peers
from modelcard.runtime import Forecast, ModelRuntime
from plant.executor import run_all
from training import evaluate as ev
from training.config import RunConfig
from training.data import Windows
from training.prepare import Prepared, prepare
from training.scoring import scored_table, top5_indices

SCORED_REQUESTS = ("honest", "applied")  # the headline, and the diagnostic with every control's true future
NAIVE = ("persistence", "seasonal_naive")
TARGET_STEPS = (20, 96)  # 5 h and 24 h: where the KoVAE must lead (a shorter model: its longest step)
PLOT_VARIABLES = ("SNH_eff", "SO_5", "SNO_2", "Q_in")


@dataclass
class Scored:
    """One model's figures: per request its regime x policy table (``scored_table``) and the guide's figure."""

    name: str
    train_seconds: float | None
    forecast_ms: float  # per window, honest request, mean forecast
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    guide: dict[str, dict[str, float]] = field(default_factory=dict)  # request -> headline step -> rel error
    honest_mean: np.ndarray | None = None  # kept for the plot


def load(store: Path, version: str, cfg: RunConfig) -> tuple[ModelRuntime, RunConfig, Prepared]:
    """The version's runtime, its training config (``bench.cli.version_config``) and its prepared data."""
    return ModelRuntime(store / version), cfg, prepare(cfg)


CHUNK = 128  # windows per forecast call: every model's memory bounded whatever the number of windows


def kovae_forecast(
    rt: ModelRuntime, p: Prepared, w: Windows, request: str, samples: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The served KoVAE's mean (N, H, outputs) and, with ``samples``, the 80% band of the targets, in
    engineering units, told ``request`` exactly as ``bench/accuracy.py`` tells it."""
    scored, n = p.scored(w), p.n_targets
    told = requested(rt, scored, request, p.held_by_scenario())
    given = {k: v for k, v in told.items() if k != "u_fut"}
    rng = np.random.default_rng(0)
    means, bands = [], []
    for i in range(0, len(scored.x_hist), CHUNK):  # 1,404 windows x 100 samples at once held 24 GB
        part = slice(i, i + CHUNK)
        args = (scored.x_hist[part], scored.u_hist[part], told["u_fut"][part], scored.t_last[part])
        f = rt.predict(*args, samples, rng, **{k: v[part] for k, v in given.items()})
        means.append(f.mean)
        bands.append(ev.sample_band(f.samples[..., :n]) if samples else None)
    return np.concatenate(means), (np.concatenate(bands) if samples else None)


def peer_forecast(peer: TorchPeer | LightGBMDirect, p: Prepared, w: Windows, request: str) -> np.ndarray:
    """A peer's forecast (N, H, nx) in engineering units, from the same known inputs as the KoVAE's."""
    u_hist, u_fut = p.inputs(w, request=request)
    x_hist = p.nx(w.x_hist)
    parts = [
        peer.forecast(x_hist[i : i + CHUNK], u_hist[i : i + CHUNK], u_fut[i : i + CHUNK])
        for i in range(0, len(x_hist), CHUNK)
    ]
    return p.dx(np.concatenate(parts))


def guide_figure(p: Prepared, mean: np.ndarray, w: Windows) -> dict[str, float]:
    """The plant team's figure: mean over the top-5 variables of RMSE / mean |true| at each headline step
    (``ev.headline``'s rel_rmse_top5, as the product's report prints it)."""
    scored, n = p.scored(w), p.n_targets
    table = ev.error_table(mean[..., :n], scored.x_fut)
    reference = ev.error_table(ev.persistence(scored), scored.x_fut)
    return {h: v["rel_rmse_top5"] for h, v in ev.headline(table, reference, p.x_std[:n], top5_indices(p)).items()}


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def score_models(
    rt: ModelRuntime, p: Prepared, peers: list[TorchPeer | LightGBMDirect], samples: int
) -> dict[str, Scored]:
    """Every model on the held-out windows, each request: the tables the bench prints."""
    w = p.test
    N = len(w.x_hist)
    scored = p.scored(w)
    (_, kovae_s) = timed(kovae_forecast, rt, p, w, "honest")  # the mean alone: the scored call draws samples too
    results = {"kovae": Scored("kovae", rt.card["training"].get("seconds"), 1e3 * kovae_s / N)}
    honest = {}  # each peer's honest forecast, timed once and scored below
    for peer in peers:
        honest[peer.name], seconds = timed(peer_forecast, peer, p, w, "honest")
        results[peer.name] = Scored(peer.name, peer.train_seconds, 1e3 * seconds / N)
    for name in NAIVE:
        results[name] = Scored(name, 0.0, 0.0)
    naive = {"persistence": ev.persistence(scored), "seasonal_naive": ev.seasonal_naive(scored)}
    for request in SCORED_REQUESTS:
        mean, band = kovae_forecast(rt, p, w, request, samples if request == "honest" else 0)
        forecasts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {"kovae": (mean, band)}
        forecasts |= {
            peer.name: (honest[peer.name] if request == "honest" else peer_forecast(peer, p, w, request), None)
            for peer in peers
        }
        forecasts |= {name: (f, None) for name, f in naive.items()}
        for name, (m, b) in forecasts.items():
            results[name].tables[request] = scored_table(p, m, b, w)
            results[name].guide[request] = guide_figure(p, m, w)
            if request == "honest":
                results[name].honest_mean = m
    return results


def table_lines(results: dict[str, Scored], request: str, minutes: int) -> list[str]:
    """Per cell and model: pooled skill (all, plant) at each step, 80% coverage, training and forecast time,
    and the guide's figure at the headline steps."""
    first = next(iter(results.values()))
    steps = list(first.tables[request]["all"]["pooled_skill_all"])
    heads = list(first.guide[request])
    lead = [f"{int(s) * minutes / 60:g}h" for s in steps]
    head = ["cell", "model", *[f"all {x}" for x in lead], *[f"plant {x}" for x in lead], "cover80"]
    head += ["train s", "ms/win", *[f"relerr {int(h) * minutes / 60:g}h" for h in heads]]
    rows = []
    for cell in first.tables[request]:
        for name, r in results.items():
            t = r.tables[request][cell]
            cover = "-" if t["coverage_80"] is None else f"{100 * t['coverage_80']:.1f}%"
            train = "-" if r.train_seconds is None else f"{r.train_seconds:.1f}"
            rows.append(
                [cell if name == "kovae" else "", name]
                + [f"{t['pooled_skill_all'][s]:.3f}" for s in steps]
                + [f"{t['pooled_skill_plant'][s]:.3f}" for s in steps]
                + [cover, train, f"{r.forecast_ms:.2f}"]
                + ([f"{100 * r.guide[request][h]:.1f}%" for h in heads] if cell == "all" else ["" for _ in heads])
            )
    width = max(len(head[0]), *(len(r[0]) for r in rows))
    return [" ".join([f"{r[0]:<{width}}", f"{r[1]:<15}", *(f"{c:>11}" for c in r[2:])]) for r in [head, *rows]]


def target_steps(steps: list[str]) -> list[str]:
    """The steps the KoVAE must lead at: 5 h and 24 h where reached, else the longest."""
    return [s for s in steps if int(s) in TARGET_STEPS] or [steps[-1]]


def lead_checks(results: dict[str, Scored], peers: list[str]) -> list[tuple[str, bool]]:
    """Per cell, target step and kind (all, plant), the KoVAE against every peer in the honest request: met,
    or which peer wins and by how much."""
    kovae = results["kovae"].tables["honest"]
    out = []
    for cell, t in kovae.items():
        if cell == "all":
            continue
        for kind in ("all", "plant"):
            key = f"pooled_skill_{kind}"
            for step in target_steps(list(t[key])):
                mine = t[key][step]
                best = max(peers, key=lambda n: results[n].tables["honest"][cell][key][step])
                theirs = results[best].tables["honest"][cell][key][step]
                what = f"{cell} {kind} step {step}: kovae {mine:.3f}"
                if mine >= theirs:
                    out.append((f"{what} >= every peer (best {best} {theirs:.3f})", True))
                else:
                    out.append((f"{what} < {best} {theirs:.3f}: {best} wins by {theirs - mine:.3f}", False))
    return out


# ----------------------------------------------------------------------------- counterfactual


class PeerRuntime:
    """A peer behind ``ModelRuntime.predict``'s signature, so ``bench/counterfactual.forecasts`` asks it exactly
    what it asks the served KoVAE: engineering-unit arrays in, the mean of x's columns out."""

    def __init__(self, peer: TorchPeer | LightGBMDirect, p: Prepared) -> None:
        self.peer, self.p = peer, p
        self.looped = list(p.looped)

    def predict(
        self,
        x_hist: np.ndarray,
        u_hist: np.ndarray,
        u_fut: np.ndarray,
        last_minute: np.ndarray,
        s_hist: np.ndarray | None = None,
        s_fut: np.ndarray | None = None,
    ) -> Forecast:
        p, (N, L), H = self.p, x_hist.shape[:2], u_fut.shape[1]
        x = np.concatenate([x_hist, u_hist[..., self.looped]], -1)
        ns = len(p.catalog.setpoint_names)
        s_hist = np.full((N, L, ns), np.nan) if s_hist is None else s_hist
        s_fut = np.full((N, H, ns), np.nan) if s_fut is None else s_fut
        nan = np.full((N, H, x.shape[-1]), np.nan)
        w = Windows(x, u_hist, nan, u_fut, s_hist, s_fut, nan, last_minute, np.array(["counterfactual"] * N))
        # "applied": the arrays as given (a looped control NaN where the plan left it to its loop).
        return Forecast(peer_forecast(self.peer, p, w, "applied"), None)


def counterfactual_signs(
    models: dict[str, Any], rt: ModelRuntime, cfg: RunConfig, scenarios: list[str], origins: int, every: int
) -> dict[str, dict[str, float]]:
    """Per model, the sign share (``cf.pair_scores``) of each pair's named variable at the longest lead (5 h
    where reached), both plants pooled, against the simulator's branches; "mean" is their mean."""
    horizon = min(cf.HORIZON, rt.max_horizon)
    tasks = [cf.Task(cfg.data, sc, base, origins, every, horizon) for sc in scenarios for base in ("closed", "open")]
    runs = list(run_all(cf.simulate, tasks, "local", 1))
    history = int(rt.card["history"]["length"])
    names = list(rt.outputs)
    out: dict[str, dict[str, float]] = {}
    for model_name, model in models.items():
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for _, branched, clock in runs:
            fc = cf.forecasts(model, branched, clock, history)
            for label, up, down, wanted in cf.PAIRS[: cf.TARGET_PAIRS]:  # the targets' pairs only
                if up not in fc:
                    continue
                for name in wanted:
                    j = names.index(name)
                    pred = fc[up][:, horizon - 1, j] - fc[down][:, horizon - 1, j]
                    true = branched.x_plan[up][:, horizon - 1, j] - branched.x_plan[down][:, horizon - 1, j]
                    parts.setdefault(f"{label}: {name}", []).append((pred, true))
        signs = {}
        for key, pairs in parts.items():
            pred, true = np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])
            name = key.rpartition(": ")[2]
            signs[key] = cf.pair_scores(pred, true, float(rt.out_std[names.index(name)]))["sign"]
        finite = [v for v in signs.values() if np.isfinite(v)]
        signs["mean"] = float(np.mean(finite)) if finite else float("nan")
        out[model_name] = signs
    return out


# ----------------------------------------------------------------------------- plot


def plot(p: Prepared, results: dict[str, Scored], out: Path) -> Path:
    """One held-out window per regime (the middle one of its windows): the truth over the end of the history
    and the horizon, and each model's forecast (honest request), in engineering units; one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, minutes = p.test, p.catalog.sample_minutes
    names = p.catalog.target_names
    variables = [names.index(v) for v in PLOT_VARIABLES if v in names] or top5_indices(p)[:3]
    regimes = list(dict.fromkeys(p.groups[s] for s in w.scenario))
    fig, axes = plt.subplots(
        len(regimes), len(variables), figsize=(4 * len(variables), 3 * len(regimes)), squeeze=False
    )
    L, H = w.x_hist.shape[1], w.x_fut.shape[1]
    shown = min(L, H)
    t_hist = np.arange(1 - shown, 1) * minutes / 60
    t_fut = np.arange(1, H + 1) * minutes / 60
    for r, regime in enumerate(regimes):
        idx = np.flatnonzero([p.groups[s] == regime for s in w.scenario])
        i = int(idx[len(idx) // 2])
        for c, j in enumerate(variables):
            ax = axes[r, c]
            ax.plot(t_hist, w.x_hist[i, -shown:, j], color="black", lw=1.5, label="truth")
            ax.plot(t_fut, w.x_fut[i, :, j], color="black", lw=1.5)
            for name, res in results.items():
                if res.honest_mean is not None:
                    ax.plot(t_fut, res.honest_mean[i, :, j], lw=1, label=name, ls="--" if name in NAIVE else "-")
            unit = p.catalog.targets[j].unit
            ax.set_title(f"{regime} ({w.scenario[i]}): {names[j]}", fontsize=8)
            ax.set_xlabel("hours from the forecast origin")
            ax.set_ylabel(f"{names[j]} [{unit}]")
            ax.axvline(0, color="grey", lw=0.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peers_comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


@dataclass
class Bench:
    """What a run of the bench computed (the tests check the printed figures against it)."""

    rt: ModelRuntime
    p: Prepared
    peers: list[TorchPeer | LightGBMDirect]
    results: dict[str, Scored]
    signs: dict[str, dict[str, float]]
    checks: list[tuple[str, bool]]
    samples: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version", help="default: the served version (models/CURRENT)")
    parser.add_argument("--out", default="bench_out/peers", help="folder for the plot and peers.json")
    parser.add_argument("--quick", action="store_true", help="tiny peers and a short counterfactual (the tests)")
    parser.add_argument("--samples", type=int, help="KoVAE samples for the coverage (default: the card's)")
    parser.add_argument("--epochs", type=int, help="the torch peers' epochs (default: the sizes')")
    parser.add_argument("--scenarios", nargs="*", help="counterfactual windows (default: dry rain bsm2-36)")
    parser.add_argument("--origins", type=int, help="counterfactual origins per window and plant (default 20)")
    parser.add_argument("--every-hours", type=float, default=12.0, help="time between counterfactual origins")
    parser.add_argument("--no-counterfactual", action="store_true")
    parser.add_argument("overrides", nargs="*", help="section.field=value over the card's config (data.cache_dir)")
    args = parser.parse_args(argv)
    args.version = served_version(parser, Path(args.store), args.version)  # checked before any training
    args.config = version_config(parser, Path(args.store), args.version, args.overrides)
    return args


def run(args: argparse.Namespace) -> Bench:
    """Train the peers, score every model, print the tables and targets, write the plot and peers.json."""
    start = time.perf_counter()
    rt, cfg, p = load(Path(args.store), args.version, args.config)
    sizes: Sizes = QUICK if args.quick else DEFAULT
    if args.epochs:
        sizes = Sizes(**{**sizes.__dict__, "epochs": args.epochs})
    samples = args.samples or (8 if args.quick else rt.calibration_samples)
    peers = make_peers(p, sizes)
    for peer in peers:
        peer.fit(p, cfg.train, sizes)
        print(f"trained {peer.name} in {peer.train_seconds:.1f} s", flush=True)
    results = score_models(rt, p, peers, samples)
    minutes = p.catalog.sample_minutes
    print(
        f"\nmodel {rt.version}; {len(p.test.x_hist)} held-out windows, {len(p.train.x_hist)} training windows; "
        f"peers {sizes}"
    )
    print("pooled skill 1 - sqrt(NMSE / NMSE_ref) against the better of persistence and seasonal naive per step;")
    print("relerr: the plant team's figure, RMSE / mean |true| over the top-5 variables (their MamKO: 14.6%)")
    for request in SCORED_REQUESTS:
        print(f"\n{request} request ({'the headline' if request == 'honest' else 'diagnostic'}):")
        print("\n".join(table_lines(results, request, minutes)))

    signs: dict[str, dict[str, float]] = {}
    if not args.no_counterfactual:
        scenarios = args.scenarios or (["bsm2-02"] if args.quick else ["dry", "rain", "bsm2-36"])
        origins = args.origins or (1 if args.quick else 20)
        every = max(1, round(args.every_hours * 60 / minutes))
        models = {"kovae": rt, **{peer.name: PeerRuntime(peer, p) for peer in peers}}
        signs = counterfactual_signs(models, rt, cfg, scenarios, origins, every)
        keys = list(signs["kovae"])
        print(f"\ncounterfactual sign share at {min(cf.HORIZON, rt.max_horizon) * minutes / 60:g} h, both plants:")
        print(f"{'':<40} " + " ".join(f"{m:>9}" for m in signs))
        for key in keys:
            print(f"{key:<40} " + " ".join(f"{signs[m].get(key, float('nan')):>9.2f}" for m in signs))

    print("\ntargets (honest request):")
    checks = lead_checks(results, [peer.name for peer in peers])
    for peer in peers if signs else []:
        mine, theirs = signs["kovae"]["mean"], signs[peer.name]["mean"]
        checks.append((f"counterfactual sign share kovae {mine:.2f} >= {peer.name} {theirs:.2f}", mine >= theirs))
    for what, met in checks:
        print(f"  {'met    ' if met else 'NOT MET'}  {what}")
    print(f"{sum(m for _, m in checks)} of {len(checks)} met")

    out = Path(args.out)
    path = plot(p, results, out)
    summary = {
        "version": rt.version,
        "sizes": sizes.__dict__,
        "models": {
            n: {"train_seconds": r.train_seconds, "forecast_ms": r.forecast_ms, "tables": r.tables, "guide": r.guide}
            for n, r in results.items()
        },
        "counterfactual_sign": signs,
        "targets": [{"what": w, "met": m} for w, m in checks],
    }
    (out / "peers.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplot {path}; figures {out / 'peers.json'}; bench {time.perf_counter() - start:.0f} s")
    return Bench(rt, p, peers, results, signs, checks, samples)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
