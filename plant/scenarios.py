"""The simulated plant's dataset: the scenarios of a data config, simulated, cached, validated and split.

Each scenario (``plant.operation.Scenario``) is simulated under its operation and cached as one file named by a
hash of everything that determines its content (``scenario_key``), so a scenario is simulated once and reused
until that changes. ``generate`` fills the cache (local processes or a Dask cluster, ``data.executor``) and writes
a manifest; ``splits`` assigns whole scenarios to train, validation and test. Imported historian data
(``plant.historian``) are stored in the same scenario file format.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
import zoneinfo
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import numpy as np

from modelcard.card import atomic_write
from plant import bsm1
from plant.catalog import BSM1, SAMPLE_MINUTES, Catalog
from plant.config import ConfigError, DataConfig
from plant.executor import is_cluster, run_all
from plant.operation import POLICIES, REGIMES, Scenario, operation, setpoints_at

# 2: lagged return-sludge flow set at start-up; 3: t_minutes on the influent clock; 4: regimes; 5: the blanket kept
# in the settler (plant.bsm1.blanket_height); 6: the loops' setpoints; 7: operating policies
FORMAT_VERSION = 7


class DataError(ValueError):
    """A scenario file is missing, corrupt or does not match the catalog."""


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
    policy: str = "historian"  # how the plant was run (plant.operation.POLICIES), "historian" for imports


def scenarios(cfg: DataConfig) -> list[Scenario]:
    """Every scenario of a config, each with its own seed derived from the config seed and its id.

    A window ("dry", "rain", "bsm2-NN") trains under its policy from ``data.policy_cycle``, unless validation or
    test name it: an entry "ID@POLICY" runs that window under that policy (one window may be held out under
    several), a plain "ID" under its cycle policy. A held-out window never trains."""
    cycle = cfg.policy_cycle
    windows = [
        ("dry", "dry", 0.0, "normal", False, cycle[0]),
        ("rain", "rain", 0.0, "storm", False, cycle[1 % len(cycle)]),
    ]
    for w in [*range(cfg.bsm2_windows), *cfg.later_windows]:
        later = w >= cfg.bsm2_windows
        regime = "normal" if later else cfg.regime_cycle[w % len(cfg.regime_cycle)]
        windows.append((f"bsm2-{w:02d}", "bsm2", w * cfg.scenario_days, regime, later, cycle[w % len(cycle)]))
    named = [name.partition("@") for name in (*cfg.val_scenarios, *cfg.test_scenarios)]
    out = []
    for base, influent, start, regime, later, policy in windows:
        runs = [(base + at + pol, pol or policy) for b, at, pol in named if b == base]
        for sid, pol in runs or [(base, policy)]:
            out.append(Scenario(sid, influent, start, cfg.scenario_days, _seed(cfg.seed, sid), regime, later, pol))
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
    # Nor does the policy cycle: a scenario's own policy is in ``sc``.
    # Nor do the what-if pairs, cached apart (plant.whatif).
    split = ("val_scenarios", "test_scenarios", "bsm2_windows", "later_windows", "seed", "policy_cycle")
    for name in [*where, *split, *(k for k in how if k.startswith("whatif_"))]:
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


def simulate_scenario(cfg: DataConfig, sc: Scenario) -> tuple[ScenarioData, list[dict[str, object]]]:
    """Simulate one scenario the way the plant is run (``operation``), then drop the warm-up. u records the
    controls actually applied."""
    op = operation(cfg, sc)
    t, x, u, s = bsm1.simulate(
        op.influent,
        op.controls,
        SAMPLE_MINUTES,
        stabilize=cfg.stabilize,
        loops=op.loops,
        cascades=op.cascades,
        caps=op.caps,
        wastage=op.wastage,
    )
    keep = t > cfg.warmup_days * bsm1.MINUTES_PER_DAY
    # Keep the influent's clock (not minutes since the first sample): day 0 is a Monday at midnight
    # (weekend flows are lowest on days 5 and 6), and the time of day and week are known inputs.
    t = t[keep] + sc.start_day * bsm1.MINUTES_PER_DAY
    sp = setpoints_at(s[keep], op.loops, BSM1.setpoint_names)
    return ScenarioData(sc.id, t, x[keep], u[keep], sp, sc.seed, sc.regime, sc.group, sc.policy), op.notes


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
        "policy": sd.policy,
        "catalog": catalog.data_dict(),
        "notes": notes,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, t_minutes=sd.t_minutes, x=sd.x, u=sd.u, s=sd.s, meta=np.array(json.dumps(meta)))
    atomic_write(path, buf.getvalue())


def read_cache_file(path: Path, version: int, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """(arrays, meta) of one cached ``.npz`` (a scenario, or its what-if pairs) of format ``version``; a file
    missing, corrupt, without one of ``keys`` or of another format is a ``DataError`` naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in keys}
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as exc:  # zip, key or JSON errors all mean a corrupt file
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != version:
        raise DataError(f"{path}: format {meta.get('format')}, expected {version} (regenerate the cache)")
    return arrays, meta


def zone_step(zone: str, clock_minutes: float) -> float:
    """How far ``zone``'s clock moves (minutes; 0: not at all) around the local time ``clock_minutes`` (since
    1970-01-05), as an imported plant's clock jumps at a DST change: an hour in most zones, 30 minutes in
    Australia/Lord_Howe, once 30 in America/Caracas."""
    tz = zoneinfo.ZoneInfo(zone)
    near = datetime(1970, 1, 5, tzinfo=UTC) + timedelta(minutes=clock_minutes)  # within the offset of the instant
    before, after = ((near + timedelta(days=d)).astimezone(tz).utcoffset() for d in (-1, 1))
    return (after - before).total_seconds() / 60  # type: ignore[operator]


def load_scenario(path: Path, catalog: Catalog = BSM1) -> ScenarioData:
    """Load and validate one scenario file; every problem names the file. Imported (historian) data may have
    missing values (NaN) and an hour's jump of the local clock at a DST change; simulated data have neither."""
    arrays, meta = read_cache_file(path, FORMAT_VERSION, ("t_minutes", "x", "u", "s"))
    t, x, u, sp = (arrays[k] for k in ("t_minutes", "x", "u", "s"))
    if meta.get("catalog") != catalog.data_dict():
        raise DataError(f"{path}: its variables do not match the catalog {catalog.name} (regenerate the cache)")
    n = len(t)
    shapes = (len(catalog.targets), len(catalog.controls), len(catalog.setpoints))
    if (x.shape, u.shape, sp.shape) != tuple((n, k) for k in shapes):
        raise DataError(f"{path}: shapes t{t.shape} x{x.shape} u{u.shape} s{sp.shape} do not match the catalog")
    imported = meta.get("regime") == "historian"
    for name, arr in (("t_minutes", t), ("x", x), ("u", u), ("s", sp)):
        # Gaps (NaN) only in imported data, and in the setpoints, which an open-loop plant does not have.
        gappy = (imported and name != "t_minutes") or name == "s"
        bad = np.isinf(arr) if gappy else ~np.isfinite(arr)
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
    steps = np.round(np.diff(t), 6)
    odd = np.flatnonzero(~np.isin(steps, allowed))
    if imported:  # a zone whose clock moves by 30 minutes (Lord Howe) or once by 30 (Caracas, 2016)
        odd = [i for i in odd if steps[i] - step != zone_step(catalog.timezone, float(t[i]))]
    if len(odd):
        raise DataError(f"{path}: samples are not {step} minutes apart (row {odd[0] + 1}: {steps[odd[0]]:g})")
    if meta.get("regime") not in (*REGIMES, "historian"):
        raise DataError(f"{path}: regime {meta.get('regime')!r} is not one of {REGIMES}")
    if meta.get("policy") not in (*POLICIES, "historian"):
        raise DataError(f"{path}: policy {meta.get('policy')!r} is not one of {tuple(POLICIES)}")
    policy = meta["policy"]
    return ScenarioData(meta["scenario"], t, x, u, sp, int(meta["seed"]), meta["regime"], meta["group"], policy)


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
                "policy": sc.policy,
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
    for kind in ("group", "policy"):
        if kind == "policy":
            lines += ["", "operating policy coverage (plant.operation.POLICIES); percentiles 10/50/90:"]
        head = f"{kind:<20} {'scenarios':>9} {'share':>6}"
        lines.append(head + "".join(f"  {n + ' 10/50/90':>20}" for n in shown))
        for value in dict.fromkeys(getattr(d, kind) for d in data.values()):
            part = [d for d in data.values() if getattr(d, kind) == value]
            xg = np.concatenate([d.x for d in part])
            cells = ["/".join(f"{v:.1f}" for v in np.nanpercentile(xg[:, names.index(n)], [10, 50, 90])) for n in shown]
            share = f"{value:<20} {len(part):>9} {len(xg) / len(x):>6.1%}"
            lines.append(share + "".join(f"  {c:>20}" for c in cells))
    lines.append("")
    lines += [f"{sid:<28} {d.group:<7} {d.policy:<20} rows {len(d.t_minutes)}" for sid, d in data.items()]
    return "\n".join(lines)
