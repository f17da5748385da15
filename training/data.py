"""The BSM1 plant dataset: simulate scenarios, cache them, split by scenario, cut windows.

``python -m training.data [--preset tiny] [--config FILE] [section.field=value ...]`` generates (or reuses)
every scenario of the config and prints a summary table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelcard.card import atomic_write
from training.catalog import BSM1, SAMPLE_MINUTES, Catalog, load_catalog
from training.config import ConfigError, DataConfig, RunConfig, load_config
from training.executor import is_cluster, run_all

if TYPE_CHECKING:
    from training.bsm1 import FeedbackLoop

# 2: lagged return-sludge flow set at start-up; 3: t_minutes on the influent clock; 4: regimes; 5: the blanket kept
# in the settler (training.bsm1.blanket_height)
FORMAT_VERSION = 6


class DataError(ValueError):
    """A scenario file is missing, corrupt or does not match the catalog."""


REGIMES = ("normal", "storm", "stress")
"""How a scenario's plant is run: normal operation (dry weather and the BSM2 influent's own weather), with
added storms (or the rain file), or with stress episodes (low aeration, overload)."""


@dataclass(frozen=True)
class Scenario:
    id: str  # "dry", "rain" or "bsm2-NN" (the NN-th window of the BSM2 influent)
    influent: str  # key of training.bsm1.INFLUENT_FILES
    start_day: float
    days: float
    seed: int
    regime: str  # one of REGIMES
    later: bool = False  # from after every training window (an unseen later period)

    @property
    def group(self) -> str:
        """What evaluation reports it under: its regime, or "later" for a later period."""
        return "later" if self.later else self.regime


@dataclass
class ScenarioData:
    id: str
    t_minutes: np.ndarray  # (n,) minutes on the influent's clock: day 0 starts at midnight, on a Monday
    x: np.ndarray  # (n, catalog targets), NaN where missing (imported data only)
    u: np.ndarray  # (n, catalog controls)
    s: np.ndarray  # (n, catalog setpoints), NaN where not logged
    seed: int
    regime: str
    group: str


def scenarios(cfg: DataConfig) -> list[Scenario]:
    """Every scenario of a config, each with its own seed derived from the config seed and its id."""
    out = [Scenario("dry", "dry", 0.0, cfg.scenario_days, _seed(cfg.seed, "dry"), "normal")]
    out.append(Scenario("rain", "rain", 0.0, cfg.scenario_days, _seed(cfg.seed, "rain"), "storm"))
    for w in [*range(cfg.bsm2_windows), *cfg.later_windows]:
        sid, later = f"bsm2-{w:02d}", w >= cfg.bsm2_windows
        regime = "normal" if later else cfg.regime_cycle[w % len(cfg.regime_cycle)]
        out.append(Scenario(sid, "bsm2", w * cfg.scenario_days, cfg.scenario_days, _seed(cfg.seed, sid), regime, later))
    return out


def _seed(base: int, scenario_id: str) -> int:
    return int(np.random.SeedSequence([base, zlib.crc32(scenario_id.encode())]).generate_state(1)[0])


def package_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("bsm2-python", "numpy", "scipy")}


def scenario_key(cfg: DataConfig, sc: Scenario) -> str:
    """Hash of everything that determines a scenario's content (not its split or the cache location)."""
    how = asdict(cfg)
    where = ("cache_dir", "workers", "executor", "source", "catalog", "max_missing")  # not what is simulated
    # Which windows exist and how they are split changes no scenario's content (its own window and its "later"
    # flag are in ``sc``), so adding a window or moving one between splits simulates nothing again.
    for name in (*where, "val_scenarios", "test_scenarios", "bsm2_windows", "later_windows", "seed"):
        how.pop(name)
    spec = {
        "format": FORMAT_VERSION,
        "scenario": asdict(sc),
        "how": how,
        "sample_minutes": SAMPLE_MINUTES,
        "catalog": BSM1.data_dict(),
        "versions": package_versions(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def piecewise(
    n: int, rng: np.random.Generator, hold_minutes: tuple[float, float], draw: Callable[[], float]
) -> np.ndarray:
    """A per-minute series of levels, each drawn by ``draw`` and held for a random time within ``hold_minutes``."""
    out = np.empty(n)
    i = 0
    while i < n:
        hold = int(rng.integers(int(hold_minutes[0]), int(hold_minutes[1]) + 1))
        out[i : i + hold] = draw()
        i += hold
    return out


def bsm2_design_influent(start_day: float, days: float, scale: bool) -> tuple[np.ndarray, list[object]]:
    """A window of the BSM2 influent, brought to BSM1's design load (the dry influent's mean flow and
    flow-weighted concentrations) when ``scale``."""
    from training import bsm1

    data, repairs = bsm1.load_influent("bsm2")
    if scale:
        data = data * bsm1.design_load_factors(data, bsm1.load_influent("dry")[0])
    return bsm1.influent_window(data, start_day, days), repairs


@dataclass
class Operation:
    """How one scenario's plant is run, drawn from its seed before anything is simulated: the influent (with its
    storms and overload), the scheduled controls, the feedback loops (their setpoints and excitation), the
    actuator caps of a low-aeration episode and the operator's sludge wastage."""

    influent: np.ndarray
    controls: np.ndarray  # (minutes, controls) the open-loop schedule; the loops replace their own column
    loops: list[FeedbackLoop]
    caps: np.ndarray  # (minutes, controls), NaN: no cap
    wastage: float
    notes: list[dict[str, object]]  # influent repairs and episodes, for the scenario file


def operation(cfg: DataConfig, sc: Scenario) -> Operation:
    """Draw how the scenario's plant is run. DO in reactor 5 and nitrate in reactor 2 follow moving setpoints
    under PI control (with excitation on the loop outputs), KLa3 and KLa4 move open loop, and the operator sets
    the sludge wastage for the season. Storm scenarios add seeded storms to the influent; stress scenarios an
    overload and a low-aeration episode. The same scenario always draws the same operation."""
    from training import bsm1

    if sc.influent == "bsm2":
        influent, repairs = bsm2_design_influent(sc.start_day, sc.days, cfg.design_load)
    else:
        influent, repairs = bsm1.load_influent(sc.influent)
    rng = np.random.default_rng(sc.seed)
    n = round(sc.days * bsm1.MINUTES_PER_DAY)
    episodes: list[dict[str, float | str]] = []
    if sc.regime == "storm" and sc.influent != "rain":
        for storm in bsm1.random_storms(sc.days, rng, cfg.storms_per_week):
            influent = bsm1.add_storm(influent, storm)
            episodes.append({"kind": "storm", **asdict(storm)})
    influent = bsm1.cap_inflow(influent, cfg.max_inflow)
    caps = np.full((n, 4), np.nan)
    if sc.regime == "stress":
        start, hours, factor = rng.uniform(cfg.warmup_days, sc.days - 1), rng.uniform(12, 48), rng.uniform(1.4, 2.0)
        influent = bsm1.add_overload(influent, start, hours, factor)
        episodes.append({"kind": "overload", "start_day": start, "hours": hours, "factor": factor})
        start, hours, cap = rng.uniform(cfg.warmup_days, sc.days - 0.5), rng.uniform(4, 24), rng.uniform(20, 60)
        first = int(start * bsm1.MINUTES_PER_DAY)
        caps[first : first + int(hours * 60), :3] = cap
        episodes.append({"kind": "low_aeration", "start_day": start, "hours": hours, "kla_cap": cap})

    def setpoints(lo_hi: tuple[float, float]) -> np.ndarray:
        return piecewise(n, rng, (cfg.setpoint_hours[0] * 60, cfg.setpoint_hours[1] * 60), lambda: rng.uniform(*lo_hi))

    def dither(amplitude: float) -> np.ndarray:
        draw = lambda: rng.uniform(-amplitude, amplitude) if rng.random() < cfg.dither_share else 0.0  # noqa: E731
        return piecewise(n, rng, cfg.dither_minutes, draw)

    do, no = bsm1.do_loop(setpoints(cfg.do_setpoints)), bsm1.nitrate_loop(setpoints(cfg.no_setpoints))
    do.dither, no.dither = dither(cfg.dither_kla), dither(cfg.dither_qintr)
    hold = (cfg.hold_hours[0] * 60, cfg.hold_hours[1] * 60)
    controls = np.tile(np.array(bsm1.DEFAULT_CONTROLS), (n, 1))
    for j, (lo, hi) in enumerate(cfg.kla_ranges):
        controls[:, j] = piecewise(n, rng, hold, lambda lo=lo, hi=hi: rng.uniform(lo, hi))
    temperature = float(np.mean(influent[:, 1 + bsm1.TEMP]))
    wastage = bsm1.seasonal_wastage(temperature, cfg.wastage, cfg.wastage_temperatures)
    notes = [asdict(r) for r in repairs] + episodes + [{"kind": "wastage", "m3_per_day": wastage}]
    return Operation(influent, controls, [do, no], caps, wastage, notes)


def simulate_scenario(cfg: DataConfig, sc: Scenario) -> tuple[ScenarioData, list[dict[str, object]]]:
    """Simulate one scenario the way the plant is run (``operation``), then drop the warm-up. u records the
    controls actually applied."""
    from training import bsm1

    op = operation(cfg, sc)
    t, x, u = bsm1.simulate(
        op.influent,
        op.controls,
        SAMPLE_MINUTES,
        stabilize=cfg.stabilize,
        loops=op.loops,
        caps=op.caps,
        wastage=op.wastage,
    )
    keep = t > cfg.warmup_days * bsm1.MINUTES_PER_DAY
    # Keep the influent's clock (not minutes since the first sample): day 0 is a Monday at midnight
    # (weekend flows are lowest on days 5 and 6), and the time of day and week are known inputs.
    t = t[keep] + sc.start_day * bsm1.MINUTES_PER_DAY
    sp = setpoints_at(op, sc, t)
    return ScenarioData(sc.id, t, x[keep], u[keep], sp, sc.seed, sc.regime, sc.group), op.notes


def loop_setpoints(cfg: DataConfig, sc: Scenario, t_minutes: np.ndarray) -> np.ndarray:
    """``setpoints_at`` for a scenario's operation drawn again (cheap next to simulating it)."""
    return setpoints_at(operation(cfg, sc), sc, t_minutes)


def setpoints_at(op: Operation, sc: Scenario, t_minutes: np.ndarray) -> np.ndarray:
    """(len(t_minutes), loops): each feedback loop's setpoint at the scenario's samples, as the mean over the
    sample's interval (the way u records the controls), in the catalog's setpoint order (DO, then nitrate)."""
    from training import bsm1

    per_minute = np.stack([loop.setpoint for loop in op.loops], 1)
    minutes = np.round(t_minutes - sc.start_day * bsm1.MINUTES_PER_DAY).astype(int)  # each interval's end
    return np.stack([per_minute[m - SAMPLE_MINUTES : m].mean(0) for m in minutes])


def scenario_path(cfg: DataConfig, sc: Scenario) -> Path:
    return Path(cfg.cache_dir) / f"{sc.id}-{scenario_key(cfg, sc)}.npz"


def save_scenario(path: Path, sd: ScenarioData, notes: list[dict[str, object]], catalog: Catalog = BSM1) -> None:
    """One scenario file: arrays, and in ``meta`` its regime, the influent repairs and the episodes applied."""
    import io

    meta = {
        "format": FORMAT_VERSION,
        "scenario": sd.id,
        "seed": sd.seed,
        "regime": sd.regime,
        "group": sd.group,
        "catalog": catalog.data_dict(),
        "notes": notes,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, t_minutes=sd.t_minutes, x=sd.x, u=sd.u, s=sd.s, meta=np.array(json.dumps(meta)))
    atomic_write(path, buf.getvalue())


def load_scenario(path: Path, catalog: Catalog = BSM1) -> ScenarioData:
    """Load and validate one scenario file; every problem names the file. Imported (historian) data may have
    missing values (NaN) and an hour's jump of the local clock at a DST change; simulated data have neither."""
    try:
        with np.load(path, allow_pickle=False) as z:
            t, x, u, sp, meta = z["t_minutes"], z["x"], z["u"], z["s"], json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as exc:  # zip, key or JSON errors all mean a corrupt file
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: format {meta.get('format')}, expected {FORMAT_VERSION} (regenerate the cache)")
    if meta.get("catalog") != catalog.data_dict():
        raise DataError(f"{path}: its variables do not match the catalog {catalog.name} (regenerate the cache)")
    n = len(t)
    shapes = (len(catalog.targets), len(catalog.controls), len(catalog.setpoints))
    if (x.shape, u.shape, sp.shape) != tuple((n, k) for k in shapes):
        raise DataError(f"{path}: shapes t{t.shape} x{x.shape} u{u.shape} s{sp.shape} do not match the catalog")
    imported = meta.get("regime") == "historian"
    for name, arr in (("t_minutes", t), ("x", x), ("u", u), ("s", sp)):
        bad = np.isinf(arr) if imported and name != "t_minutes" else ~np.isfinite(arr)
        if np.any(bad):
            raise DataError(f"{path}: {name} has non-finite values")
    for arr, variables in ((x, catalog.targets), (u, catalog.controls), (sp, catalog.setpoints)):
        for j, v in enumerate(variables):
            out = np.flatnonzero((arr[:, j] < v.min) | (arr[:, j] > v.max))  # NaN (a gap) is neither
            if out.size:
                raise DataError(
                    f"{path}: {v.name} is {arr[out[0], j]:g} {v.unit} at row {out[0]}, outside its physical bounds "
                    f"[{v.min:g}, {v.max:g}] ({out.size} value(s) in all; a simulator defect, regenerate the cache)"
                )
    step = catalog.sample_minutes
    allowed = (step, step - 60, step + 60) if imported else (step,)
    if n > 1 and not np.all(np.isin(np.round(np.diff(t), 6), allowed)):
        raise DataError(f"{path}: samples are not {step} minutes apart")
    if meta.get("regime") not in (*REGIMES, "historian"):
        raise DataError(f"{path}: regime {meta.get('regime')!r} is not one of {REGIMES}")
    return ScenarioData(meta["scenario"], t, x, u, sp, int(meta["seed"]), meta["regime"], meta["group"])


def _simulate(task: tuple[DataConfig, Scenario]) -> tuple[ScenarioData, list[dict[str, object]], float]:
    """One scenario, anywhere (a local process or a Dask worker): the data come back, the caller writes them."""
    cfg, sc = task
    start = time.perf_counter()
    sd, repairs = simulate_scenario(cfg, sc)
    return sd, repairs, time.perf_counter() - start


def generate(cfg: DataConfig, *, progress: bool = True) -> dict[str, ScenarioData]:
    """Simulate every scenario not yet cached (``data.executor``: local processes or a Dask cluster), write each
    as it arrives, then load and validate all."""
    todo = [sc for sc in scenarios(cfg) if not scenario_path(cfg, sc).exists()]
    if todo:
        where = cfg.executor if is_cluster(cfg.executor) else f"{cfg.workers} local worker(s)"
        if progress:
            print(f"simulating {len(todo)} scenario(s) on {where}...", file=sys.stderr)
        by_id = {sc.id: sc for sc in todo}
        results = run_all(_simulate, [(cfg, sc) for sc in todo], cfg.executor, cfg.workers)
        for done, (sd, notes, secs) in enumerate(results, 1):
            save_scenario(scenario_path(cfg, by_id[sd.id]), sd, notes)
            if progress:
                print(f"  [{done}/{len(todo)}] {sd.id}: {len(sd.t_minutes)} samples in {secs:.1f} s", file=sys.stderr)
    data = {sc.id: load_scenario(scenario_path(cfg, sc)) for sc in scenarios(cfg)}
    write_manifest(cfg, data)
    return data


def config_hash(cfg: DataConfig) -> str:
    keys = sorted(scenario_key(cfg, sc) for sc in scenarios(cfg))
    spec = {"scenarios": keys, "val": cfg.val_scenarios, "test": cfg.test_scenarios}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(cfg: DataConfig, data: dict[str, ScenarioData]) -> dict[str, object]:
    manifest = {
        "config_hash": config_hash(cfg),
        "versions": package_versions(),
        "sample_minutes": SAMPLE_MINUTES,
        "splits": {k: list(v) for k, v in splits(cfg).items()},
        "scenarios": {
            sc.id: {
                "file": scenario_path(cfg, sc).name,
                "rows": len(data[sc.id].t_minutes),
                "seed": sc.seed,
                "regime": sc.regime,
                "group": sc.group,
            }
            for sc in scenarios(cfg)
        },
    }
    atomic_write(Path(cfg.cache_dir) / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def splits(cfg: DataConfig) -> dict[str, tuple[str, ...]]:
    """Split by whole scenarios: test and validation as configured, everything else trains."""
    ids = [sc.id for sc in scenarios(cfg)]
    for name in (*cfg.val_scenarios, *cfg.test_scenarios):
        if name not in ids:
            raise ConfigError(f"split names scenario {name!r}, which the config does not generate ({ids})")
    if set(cfg.val_scenarios) & set(cfg.test_scenarios):
        raise ConfigError("a scenario cannot be in both data.val_scenarios and data.test_scenarios")
    held = set(cfg.val_scenarios) | set(cfg.test_scenarios)
    train = tuple(i for i in ids if i not in held)
    if not train:
        raise ConfigError("no scenario is left for training")
    return {"train": train, "val": tuple(cfg.val_scenarios), "test": tuple(cfg.test_scenarios)}


@dataclass
class Windows:
    """(history, future) pairs cut from whole scenarios; x and u in engineering units, NaN where missing."""

    x_hist: np.ndarray  # (N, L, nx)
    u_hist: np.ndarray  # (N, L, nu)
    x_fut: np.ndarray  # (N, H, nx)
    u_fut: np.ndarray  # (N, H, nu)
    s_hist: np.ndarray  # (N, L, ns) loop setpoints, NaN where not known
    s_fut: np.ndarray  # (N, H, ns)
    x_prev_day: np.ndarray  # (N, H, nx): the same clock times one day earlier (seasonal naive), NaN if unknown
    t_last: np.ndarray  # (N,) clock minutes of the last history sample (calendar inputs)
    scenario: np.ndarray  # (N,) id of the scenario each window was cut from
    dropped: int = 0  # windows left out for missing data (too little history, future controls or targets)


def usable(x_hist: np.ndarray, u_hist: np.ndarray, x_fut: np.ndarray, u_fut: np.ndarray, max_missing: float) -> bool:
    """A window trains or scores only with most of its history, every future control (the caller always sends
    them) and something to score: missing history at most ``max_missing`` per variable, no variable's history
    missing entirely, and at least one future target."""
    missing = np.isnan(np.concatenate([x_hist, u_hist], 1)).mean(0)
    return bool(missing.max() <= max_missing and np.isfinite(u_fut).all() and np.isfinite(x_fut).any())


def make_windows(
    data: list[ScenarioData],
    history: int,
    horizon: int,
    stride: int = 1,
    max_windows: int | None = None,
    *,
    steps_per_day: int = 96,
    max_missing: float = 0.5,
) -> Windows:
    """Slide over each scenario separately, so no window straddles two scenarios. Windows with too much missing
    data (``usable``) are dropped and counted."""
    day = steps_per_day
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xh", "uh", "xf", "uf", "sh", "sf", "xd")}
    t_last: list[float] = []
    ids: list[str] = []
    dropped = 0
    for sd in data:
        n = len(sd.t_minutes)
        starts = np.arange(0, n - history - horizon + 1, stride)
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
        gappy = bool(np.isnan(sd.x).any() or np.isnan(sd.u).any())
        for s in starts:
            e = s + history
            window = sd.x[s:e], sd.u[s:e], sd.x[e : e + horizon], sd.u[e : e + horizon]
            if gappy and not usable(*window, max_missing):
                dropped += 1
                continue
            for key, part in zip(("xh", "uh", "xf", "uf"), window, strict=True):
                parts[key].append(part)
            parts["sh"].append(sd.s[s:e])
            parts["sf"].append(sd.s[e : e + horizon])
            prev = np.full((horizon, sd.x.shape[1]), np.nan)
            idx = np.arange(e, e + horizon) - day
            ok = idx >= 0
            prev[ok] = sd.x[idx[ok]]
            parts["xd"].append(prev)
            t_last.append(float(sd.t_minutes[e - 1]))
            ids.append(sd.id)
    if not parts["xh"]:
        raise DataError(f"no window of {history}+{horizon} steps fits the scenarios given ({dropped} dropped)")
    arrays = (np.stack(parts[k]).astype(np.float32) for k in ("xh", "uh", "xf", "uf", "sh", "sf", "xd"))
    return Windows(*arrays, np.array(t_last), np.array(ids), dropped)


def heldout_windows(
    data: list[ScenarioData], history: int, horizon: int, max_windows: int, steps_per_day: int = 96
) -> Windows:
    """Validation and test windows: a forecast every horizon / 8 steps (3 h for a 24-h horizon), capped per
    scenario. Training's evaluation and ``bench/accuracy.py`` both cut them here, so they score the same windows."""
    return make_windows(data, history, horizon, max(1, horizon // 8), max_windows, steps_per_day=steps_per_day)


def load_data(cfg: RunConfig) -> tuple[Catalog, dict[str, ScenarioData], dict[str, tuple[str, ...]], str]:
    """(catalog, scenarios, splits, data hash): simulated BSM1 scenarios, or a folder a historian export was
    imported into (``data.source = "historian"``; with ``data.catalog``, it must have been imported with it)."""
    d = cfg.data
    if d.source == "historian":
        from training.historian import load_dataset

        catalog, data, manifest = load_dataset(Path(d.cache_dir), load_catalog(d.catalog) if d.catalog else None)
        return catalog, data, {k: tuple(v) for k, v in manifest["splits"].items()}, manifest["config_hash"]
    if d.catalog and load_catalog(d.catalog).to_dict() != BSM1.to_dict():
        raise ConfigError(f"data.catalog {d.catalog} is not BSM1's: import its data (data.source = historian)")
    return BSM1, generate(d), splits(d), config_hash(d)


def summary_table(data: dict[str, ScenarioData], catalog: Catalog = BSM1) -> str:
    """Rows, per-variable ranges and missing counts over all scenarios, then each group's share of the samples
    and, where the catalog has them, its effluent ammonium and nitrate percentiles (is the plant nitrifying?)."""
    x = np.concatenate([d.x for d in data.values()])
    u = np.concatenate([d.u for d in data.values()])
    sp = np.concatenate([d.s for d in data.values()])
    lines = [f"{len(data)} scenarios, {len(x)} rows at {catalog.sample_minutes} min", ""]
    lines.append(f"{'variable':<14} {'unit':<10} {'min':>11} {'mean':>11} {'max':>11} {'missing':>8}")
    variables = [*catalog.targets, *catalog.controls, *catalog.setpoints]
    for var, col in zip(variables, np.concatenate([x, u, sp], 1).T, strict=True):
        if np.isnan(col).all():  # a setpoint never logged
            lines.append(f"{var.name:<14} {var.unit:<10} {'-':>11} {'-':>11} {'-':>11} {len(col):>8}")
            continue
        lines.append(
            f"{var.name:<14} {var.unit:<10} {np.nanmin(col):>11.3f} {np.nanmean(col):>11.3f} "
            f"{np.nanmax(col):>11.3f} {int(np.isnan(col).sum()):>8}"
        )
    names = list(catalog.target_names)
    shown = [n for n in ("SNH_eff", "SNO_eff") if n in names]
    lines += ["", "regime coverage (group: later = a later period, operated normally); percentiles 10/50/90:"]
    lines.append(f"{'group':<8} {'scenarios':>9} {'share':>6}" + "".join(f"  {n + ' 10/50/90':>20}" for n in shown))
    for group in dict.fromkeys(d.group for d in data.values()):
        part = [d for d in data.values() if d.group == group]
        xg = np.concatenate([d.x for d in part])
        cells = ["/".join(f"{v:.1f}" for v in np.nanpercentile(xg[:, names.index(n)], [10, 50, 90])) for n in shown]
        lines.append(f"{group:<8} {len(part):>9} {len(xg) / len(x):>6.1%}" + "".join(f"  {c:>20}" for c in cells))
    lines.append("")
    lines += [f"{sid:<8} {d.group:<7} rows {len(d.t_minutes)}" for sid, d in data.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    if argv[:1] == ["export-table"]:
        return export_table_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m training.data",
        description=__doc__.splitlines()[0],
        epilog="Also: `python -m training.data import SOURCE --catalog CATALOG` (a plant's historian export) and "
        "`python -m training.data export-table OUT.csv` (simulated scenarios in that format).",
    )
    parser.add_argument("--preset", default="default", help="tiny or default")
    parser.add_argument("--config", help="TOML file with a [data] table")
    parser.add_argument("overrides", nargs="*", help="data.field=value, e.g. data.bsm2_windows=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides).data
        splits(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    data = generate(cfg)
    print(summary_table(data))
    print(f"\nsplits: {json.dumps({k: list(v) for k, v in splits(cfg).items()})}")
    print(f"cache: {cfg.cache_dir} (config hash {config_hash(cfg)}), {time.perf_counter() - start:.1f} s")
    return 0


def import_main(argv: list[str]) -> int:
    """``python -m training.data import SOURCE --catalog CATALOG``: a historian export into training data."""
    from training.catalog import CatalogError, load_catalog
    from training.historian import ImportRefused, import_table, load_dataset

    parser = argparse.ArgumentParser(prog="python -m training.data import", description=import_main.__doc__)
    parser.add_argument("source", help="a wide CSV or Parquet file: a timestamp column, one column per variable")
    parser.add_argument("--catalog", required=True, help="the plant's catalog (TOML)")
    parser.add_argument("--out", help="where the imported data go (default: data_cache/import-<file name>)")
    parser.add_argument("--history", type=int, default=96, help="history length the model will take (samples)")
    parser.add_argument("--horizon", type=int, default=96, help="longest horizon the model will forecast")
    parser.add_argument("--val", type=float, default=0.15, help="share of the time for validation")
    parser.add_argument("--test", type=float, default=0.15, help="share of the time for the test block")
    args = parser.parse_args(argv)
    source = Path(args.source)
    out = Path(args.out or f"data_cache/import-{source.stem}")
    start = time.perf_counter()
    try:
        catalog = load_catalog(args.catalog)
        manifest = import_table(
            source, catalog, out, history=args.history, horizon=args.horizon, shares=(args.val, args.test)
        )
        _, data, _ = load_dataset(out, catalog)
    except (CatalogError, ImportRefused, DataError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(summary_table(data, catalog))
    print("\nmissing after resampling and bridging (share of samples):")
    for name, r in manifest["missing"].items():
        print(f"  {name:<12} {100 * r['missing_share']:5.1f}%  ({r['bridged_samples']} samples bridged)")
    blocks = ", ".join(f"{k} {v['from']} .. {v['to']}" for k, v in manifest["scenarios"].items())
    print(f"\nblocks: {blocks}; {manifest['gap_between_splits']} samples dropped between them")
    print(f"imported {manifest['records']} records into {out} in {time.perf_counter() - start:.1f} s")
    print(f"train on it: python -m training.run --catalog {args.catalog} --data {out}")
    return 0


def export_table_main(argv: list[str]) -> int:
    """``python -m training.data export-table OUT``: simulated scenarios as a historian export, with faults."""
    from training.historian import export_table

    parser = argparse.ArgumentParser(prog="python -m training.data export-table", description=export_table_main.__doc__)
    parser.add_argument("out", help="the CSV file to write")
    parser.add_argument("--preset", default="tiny", help="the data preset whose scenarios are exported")
    parser.add_argument(
        "--scenarios", nargs="*", help="scenario ids in time order (default: every BSM2 window, consecutive in time)"
    )
    parser.add_argument("--no-faults", action="store_true", help="exact values: no noise, dropouts, stuck or spikes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.preset).data
    data = generate(cfg)
    ids = args.scenarios or [i for i in data if i.startswith("bsm2-")]
    unknown = [i for i in ids if i not in data]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; the preset has {list(data)}", file=sys.stderr)
        return 2
    counts = export_table([data[i] for i in ids], BSM1, Path(args.out), args.seed, faults=not args.no_faults)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
