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
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from modelcard.card import atomic_write
from training.catalog import CONTROL_NAMES, MEASUREMENT_NAMES, SAMPLE_MINUTES, catalog_dict
from training.config import ConfigError, DataConfig, load_config
from training.executor import is_cluster, run_all

FORMAT_VERSION = 3  # 2: lagged return-sludge flow set at start-up; 3: t_minutes on the influent clock


class DataError(ValueError):
    """A scenario file is missing, corrupt or does not match the catalog."""


@dataclass(frozen=True)
class Scenario:
    id: str  # "dry", "rain" or "bsm2-NN"
    influent: str  # key of training.bsm1.INFLUENT_FILES
    start_day: float
    days: float
    seed: int


@dataclass
class ScenarioData:
    id: str
    t_minutes: np.ndarray  # (n,) minutes on the influent's clock: day 0 starts at midnight, on a Monday
    x: np.ndarray  # (n, len(MEASUREMENTS))
    u: np.ndarray  # (n, len(CONTROLS))
    seed: int


def scenarios(cfg: DataConfig) -> list[Scenario]:
    """Every scenario of a config, each with its own seed derived from the config seed and its id."""
    specs = [("dry", "dry", 0.0), ("rain", "rain", 0.0)]
    specs += [(f"bsm2-{w:02d}", "bsm2", w * cfg.scenario_days) for w in range(cfg.bsm2_windows)]
    return [Scenario(sid, src, start, cfg.scenario_days, _seed(cfg.seed, sid)) for sid, src, start in specs]


def _seed(base: int, scenario_id: str) -> int:
    return int(np.random.SeedSequence([base, zlib.crc32(scenario_id.encode())]).generate_state(1)[0])


def package_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("bsm2-python", "numpy", "scipy")}


def scenario_key(cfg: DataConfig, sc: Scenario) -> str:
    """Hash of everything that determines a scenario's content (not its split or the cache location)."""
    spec = {
        "format": FORMAT_VERSION,
        "scenario": asdict(sc),
        "warmup_days": cfg.warmup_days,
        "stabilize": cfg.stabilize,
        "kla_ranges": cfg.kla_ranges,
        "qintr_range": cfg.qintr_range,
        "hold_hours": cfg.hold_hours,
        "sample_minutes": SAMPLE_MINUTES,
        "catalog": catalog_dict(bounds=False),
        "versions": package_versions(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def simulate_scenario(cfg: DataConfig, sc: Scenario) -> tuple[ScenarioData, list[dict[str, object]]]:
    """Simulate one scenario with random piecewise-constant control moves; drop the warm-up."""
    from training import bsm1

    data, repairs = bsm1.load_influent(sc.influent)
    influent = bsm1.influent_window(data, sc.start_day, sc.days) if sc.influent == "bsm2" else data
    rng = np.random.default_rng(sc.seed)
    n_steps = round(sc.days * bsm1.MINUTES_PER_DAY)
    hold = (int(cfg.hold_hours[0] * 60), int(cfg.hold_hours[1] * 60))
    controls = bsm1.control_schedule(n_steps, rng, [*cfg.kla_ranges, cfg.qintr_range], hold)
    t, x, u = bsm1.simulate(influent, controls, SAMPLE_MINUTES, stabilize=cfg.stabilize)
    keep = t > cfg.warmup_days * bsm1.MINUTES_PER_DAY
    # Keep the influent's clock (not minutes since the first sample): day 0 is a Monday at midnight
    # (weekend flows are lowest on days 5 and 6), and the time of day and week are known inputs.
    t = t[keep] + sc.start_day * bsm1.MINUTES_PER_DAY
    return ScenarioData(sc.id, t, x[keep], u[keep], sc.seed), [asdict(r) for r in repairs]


def scenario_path(cfg: DataConfig, sc: Scenario) -> Path:
    return Path(cfg.cache_dir) / f"{sc.id}-{scenario_key(cfg, sc)}.npz"


def save_scenario(path: Path, sd: ScenarioData, repairs: list[dict[str, object]]) -> None:
    import io

    meta = {
        "format": FORMAT_VERSION,
        "scenario": sd.id,
        "seed": sd.seed,
        "catalog": catalog_dict(bounds=False),
        "repairs": repairs,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, t_minutes=sd.t_minutes, x=sd.x, u=sd.u, meta=np.array(json.dumps(meta)))
    atomic_write(path, buf.getvalue())


def load_scenario(path: Path) -> ScenarioData:
    """Load and validate one scenario file; every problem names the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            t, x, u, meta = z["t_minutes"], z["x"], z["u"], json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as exc:  # zip, key or JSON errors all mean a corrupt file
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if meta.get("catalog") != catalog_dict(bounds=False):
        raise DataError(f"{path}: catalog does not match training.catalog (regenerate the cache)")
    n = len(t)
    if x.shape != (n, len(MEASUREMENT_NAMES)) or u.shape != (n, len(CONTROL_NAMES)):
        raise DataError(f"{path}: shapes t{t.shape} x{x.shape} u{u.shape} do not match the catalog")
    for name, arr in (("t_minutes", t), ("x", x), ("u", u)):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: {name} has non-finite values")
    if n > 1 and not np.allclose(np.diff(t), SAMPLE_MINUTES):
        raise DataError(f"{path}: samples are not {SAMPLE_MINUTES} minutes apart")
    return ScenarioData(meta["scenario"], t, x, u, int(meta["seed"]))


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
        for done, (sd, repairs, secs) in enumerate(results, 1):
            save_scenario(scenario_path(cfg, by_id[sd.id]), sd, repairs)
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
            sc.id: {"file": scenario_path(cfg, sc).name, "rows": len(data[sc.id].t_minutes), "seed": sc.seed}
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
    """(history, future) pairs cut from whole scenarios; x and u in engineering units."""

    x_hist: np.ndarray  # (N, L, nx)
    u_hist: np.ndarray  # (N, L, nu)
    x_fut: np.ndarray  # (N, H, nx)
    u_fut: np.ndarray  # (N, H, nu)
    x_prev_day: np.ndarray  # (N, H, nx): the same clock times one day earlier (seasonal naive), NaN if unknown
    t_last: np.ndarray  # (N,) clock minutes of the last history sample (calendar inputs)
    scenario: np.ndarray  # (N,) id of the scenario each window was cut from


def make_windows(
    data: list[ScenarioData], history: int, horizon: int, stride: int = 1, max_windows: int | None = None
) -> Windows:
    """Slide over each scenario separately, so no window straddles two scenarios."""
    day = 24 * 60 // SAMPLE_MINUTES
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xh", "uh", "xf", "uf", "xd")}
    t_last: list[float] = []
    ids: list[str] = []
    for sd in data:
        n = len(sd.t_minutes)
        starts = np.arange(0, n - history - horizon + 1, stride)
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
        for s in starts:
            e = s + history
            parts["xh"].append(sd.x[s:e])
            parts["uh"].append(sd.u[s:e])
            parts["xf"].append(sd.x[e : e + horizon])
            parts["uf"].append(sd.u[e : e + horizon])
            prev = np.full((horizon, sd.x.shape[1]), np.nan)
            idx = np.arange(e, e + horizon) - day
            ok = idx >= 0
            prev[ok] = sd.x[idx[ok]]
            parts["xd"].append(prev)
            t_last.append(float(sd.t_minutes[e - 1]))
            ids.append(sd.id)
    if not parts["xh"]:
        raise DataError(f"no window of {history}+{horizon} steps fits the scenarios given")
    arrays = (np.stack(parts[k]).astype(np.float32) for k in ("xh", "uh", "xf", "uf", "xd"))
    return Windows(*arrays, np.array(t_last), np.array(ids))


def heldout_windows(data: list[ScenarioData], history: int, horizon: int, max_windows: int) -> Windows:
    """Validation and test windows: a forecast every horizon / 8 steps (3 h for a 24-h horizon), capped per
    scenario. Training's evaluation and ``bench/accuracy.py`` both cut them here, so they score the same windows."""
    return make_windows(data, history, horizon, max(1, horizon // 8), max_windows)


def summary_table(data: dict[str, ScenarioData]) -> str:
    """Rows, per-variable ranges and NaN counts over all scenarios."""
    x = np.concatenate([d.x for d in data.values()])
    u = np.concatenate([d.u for d in data.values()])
    from training.catalog import CONTROLS, MEASUREMENTS

    lines = [f"{len(data)} scenarios, {len(x)} rows at {SAMPLE_MINUTES} min", ""]
    lines.append(f"{'variable':<10} {'unit':<10} {'min':>11} {'mean':>11} {'max':>11} {'NaN':>5}")
    for var, col in [*zip(MEASUREMENTS, x.T, strict=True), *zip(CONTROLS, u.T, strict=True)]:
        lines.append(
            f"{var.name:<10} {var.unit:<10} {np.nanmin(col):>11.3f} {np.nanmean(col):>11.3f} "
            f"{np.nanmax(col):>11.3f} {int(np.isnan(col).sum()):>5}"
        )
    lines.append("")
    lines += [f"{sid:<8} rows {len(d.t_minutes)}" for sid, d in data.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    raise SystemExit(main())
