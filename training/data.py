"""Training data: a run's scenarios (simulated or imported) and the (history, future) windows cut from them.

``python -m training.data [--preset tiny] [--config FILE] [section.field=value ...]`` generates (or reuses)
every scenario of the config (``plant.scenarios``) and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plant.catalog import BSM1, Catalog, load_catalog
from plant.scenarios import DataError, ScenarioData, config_hash, generate, scenarios, splits, summary_table
from training.config import ConfigError, RunConfig, load_config


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
    them) and something to score: at most ``max_missing`` of the history's values missing, all variables
    together (one analyser out is masked, not a reason to lose the window: ``mask_out``), and at least one
    future target."""
    missing = np.isnan(np.concatenate([x_hist, u_hist], 1)).mean()
    return bool(missing <= max_missing and np.isfinite(u_fut).all() and np.isfinite(x_fut).any())


def yesterday_steps(horizon: int, day: int) -> np.ndarray:
    """(horizon,) for each lead, the step of same-time-yesterday relative to the origin (the history's end, 0 the
    first future step): the latest sample at the same clock time before it, a day earlier, or two past a day's
    lead (one day back was after the origin). What ``x_prev_day`` holds, and what a gap in the history hides from
    it (``training.gaps.with_gap``)."""
    k = np.arange(horizon)
    return k - day * (k // day + 1)


def refused_history(x_hist: np.ndarray, u_hist: np.ndarray, max_missing: float) -> bool:
    """Whether the service would refuse this history: a measurement's or control's values more than
    ``max_missing`` of them missing (``service.inputs``: at most int(max_missing * length) nulls)."""
    allowed = int(max_missing * len(x_hist))
    return bool((np.isnan(x_hist).sum(0) > allowed).any() or (np.isnan(u_hist).sum(0) > allowed).any())


def mask_out(x_hist: np.ndarray, x_fut: np.ndarray, max_missing: float) -> np.ndarray:
    """The future targets, with those whose history is more than ``max_missing`` missing (an analyser out) set
    to missing: the window still trains and scores every other variable, and the model is never asked to
    forecast a variable it has hardly seen (the service refuses such a history too)."""
    out = np.isnan(x_hist).mean(0) > max_missing
    if not out.any():
        return x_fut
    x_fut = x_fut.copy()
    x_fut[:, out] = np.nan
    return x_fut


def make_windows(
    data: list[ScenarioData],
    history: int,
    horizon: int,
    stride: int = 1,
    max_windows: int | None = None,
    *,
    steps_per_day: int = 96,
    max_missing: float = 0.5,
    as_served: bool = False,
) -> Windows:
    """Slide over each scenario separately, so no window straddles two scenarios. A variable whose history is
    mostly missing is masked in that window (``mask_out``); windows with too much missing data overall
    (``usable``) are dropped and counted. ``as_served``: a window the service would refuse (a variable's history
    more than ``max_missing`` missing) is dropped and counted instead of masked: held-out scores are of requests
    the service answers."""
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
            if gappy and as_served and refused_history(window[0], window[1], max_missing):
                dropped += 1
                continue
            if gappy:
                window = window[0], window[1], mask_out(window[0], window[2], max_missing), window[3]
                if not usable(*window, max_missing):
                    dropped += 1
                    continue
            for key, part in zip(("xh", "uh", "xf", "uf"), window, strict=True):
                parts[key].append(part)
            parts["sh"].append(sd.s[s:e])
            parts["sf"].append(sd.s[e : e + horizon])
            prev = np.full((horizon, sd.x.shape[1]), np.nan)
            idx = e + yesterday_steps(horizon, day)
            ok = idx >= 0
            prev[ok] = sd.x[idx[ok]]
            parts["xd"].append(prev)
            t_last.append(float(sd.t_minutes[e - 1]))
            ids.append(sd.id)
    if not parts["xh"]:
        longest = max((len(sd.t_minutes) for sd in data), default=0)
        if longest >= history + horizon:  # windows fit, and every one lacked too much data
            raise DataError(
                f"no window of {history}+{horizon} steps of {', '.join(sd.id for sd in data)} has enough data: all "
                f"{dropped} lack more than data.max_missing ({max_missing:g}) of a variable's history or a future "
                "control (a sensor out for most of it?): import a stretch where it reported, or raise data.max_missing"
            )
        raise DataError(
            f"no window of {history}+{horizon} steps (train.history + train.horizon) fits the scenarios given, the "
            f"longest {longest} steps: shorten train.history or train.horizon"
        )
    arrays = (np.stack(parts[k]).astype(np.float32) for k in ("xh", "uh", "xf", "uf", "sh", "sf", "xd"))
    return Windows(*arrays, np.array(t_last), np.array(ids), dropped)


def heldout_windows(
    data: list[ScenarioData],
    history: int,
    horizon: int,
    max_windows: int,
    steps_per_day: int = 96,
    max_missing: float = 0.5,
) -> Windows:
    """Validation and test windows: a forecast every horizon / 8 steps (3 h for a 24-h horizon), capped per
    scenario, only of histories the service would take (``max_missing``: the card's ``max_missing_share``,
    ``data.max_missing``). Training's evaluation and ``bench/accuracy.py`` both cut them here, so they score the
    same windows."""
    return make_windows(
        data,
        history,
        horizon,
        max(1, horizon // 8),
        max_windows,
        steps_per_day=steps_per_day,
        max_missing=max_missing,
        as_served=True,
    )


def load_data(cfg: RunConfig) -> tuple[Catalog, dict[str, ScenarioData], dict[str, tuple[str, ...]], str]:
    """(catalog, scenarios, splits, data hash): simulated BSM1 scenarios, or a folder a historian export was
    imported into (``data.source = "historian"``; with ``data.catalog``, it must have been imported with it)."""
    d = cfg.data
    if d.source == "historian":
        from plant.historian import load_dataset

        catalog, data, manifest = load_dataset(Path(d.cache_dir), load_catalog(d.catalog) if d.catalog else None)
        check_blocks_apart(manifest, cfg, d.cache_dir)
        return catalog, data, {k: tuple(v) for k, v in manifest["splits"].items()}, manifest["config_hash"]
    if d.catalog and load_catalog(d.catalog).to_dict() != BSM1.to_dict():
        raise ConfigError(f"data.catalog {d.catalog} is not BSM1's: import its data (data.source = historian)")
    return BSM1, generate(d), splits(d), config_hash(d)


def check_blocks_apart(manifest: dict, cfg: RunConfig, folder: str) -> None:
    """An import drops history + horizon samples between its train, validation and test blocks, so that no
    window's history sees another block's future. A run with longer windows than the import was made for would
    score on what it trained on: refused, with the command that fits."""
    need, gap = cfg.train.history + cfg.train.horizon, int(manifest.get("gap_between_splits", 0))
    if need > gap:
        source = manifest.get("imported_path", manifest.get("imported_from", "EXPORT.csv"))
        catalog = cfg.data.catalog or "YOUR_CATALOG.toml"
        shares = manifest.get("shares", {})
        split = "".join(f" --{k} {shares[k]:g}" for k in ("val", "test") if k in shares)
        again = (
            f"python -m training.data import {source} --catalog {catalog} --out {folder} "
            f"--history {cfg.train.history} --horizon {cfg.train.horizon}{split}"
        )
        raise ConfigError(
            f"{folder} was imported for history + horizon = {gap} samples, this run's are {cfg.train.history} + "
            f"{cfg.train.horizon}: import it again for this run's windows: {again}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    if argv[:1] == ["export-table"]:
        return export_table_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m training.data",
        description="The BSM1 plant dataset: simulate scenarios (or reuse the cache), split them, print a summary.",
        epilog="Also: `python -m training.data import SOURCE --catalog CATALOG` (a plant's historian export) and "
        "`python -m training.data export-table OUT.csv` (simulated scenarios in that format).",
    )
    parser.add_argument("--preset", default="default", help="tiny or default")
    parser.add_argument("--config", help="TOML file with a [data] table")
    parser.add_argument("overrides", nargs="*", help="data.field=value, e.g. data.workers=1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides).data
        splits(cfg)
        if cfg.source != "bsm1":
            raise ConfigError(
                "data.source=historian: this command simulates BSM1; a plant's export is read by "
                "python -m training.data import SOURCE --catalog CATALOG"
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for setting in (o.partition("=")[0] for o in args.overrides if not o.startswith("data.")):
        # Accepted (a script may pass training.run's settings to both), but said: they change no simulation.
        print(f"note: {setting} is a training setting; the simulation does not read it", file=sys.stderr)
    start = time.perf_counter()
    data = generate(cfg)
    print(summary_table(data))
    print(f"\nsplits: {json.dumps({k: list(v) for k, v in splits(cfg).items()})}")
    print(f"cache: {cfg.cache_dir} (config hash {config_hash(cfg)}), {time.perf_counter() - start:.1f} s")
    return 0


def import_main(argv: list[str]) -> int:
    """``python -m training.data import SOURCE --catalog CATALOG``: a historian export into training data. It
    reads the whole file once and reports every problem; the history and horizon its blocks are kept apart for
    come from the training preset (and --config) the data will be trained with."""
    from plant.catalog import CatalogError
    from plant.export_values import ImportRefused, describe
    from plant.historian import import_table, load_dataset, simulated_cache

    parser = argparse.ArgumentParser(prog="python -m training.data import", description=import_main.__doc__)
    parser.add_argument("source", help="a wide CSV or Parquet file: a timestamp column, one column per variable")
    parser.add_argument("--catalog", required=True, help="the plant's catalog (TOML)")
    parser.add_argument("--out", help="where the imported data go (default: data_cache/import-<file name>)")
    parser.add_argument("--preset", default="default", help="the training preset (tiny or default): history, horizon")
    parser.add_argument("--config", help="the training's TOML file, if it sets train.history or train.horizon")
    parser.add_argument("--history", type=int, help="history length the model will take (default: the preset's)")
    parser.add_argument("--horizon", type=int, help="longest horizon the model will forecast (default: the preset's)")
    parser.add_argument("--val", type=float, default=0.15, help="share of the time for validation")
    parser.add_argument("--test", type=float, default=0.15, help="share of the time for the test block")
    args = parser.parse_args(argv)
    if args.history is not None and args.history < 2:
        parser.error(f"--history must be at least 2 samples: {args.history}")
    if args.horizon is not None and args.horizon < 1:
        parser.error(f"--horizon must be at least 1 sample: {args.horizon}")
    if not (0 <= args.val < 1 and 0 <= args.test < 1 and args.val + args.test < 1):  # NaN fails too
        parser.error(
            f"--val and --test are shares of the time in [0, 1) that leave some for training: {args.val}, {args.test}"
        )
    source = Path(args.source)
    out = Path(args.out or f"data_cache/import-{source.stem}")
    if simulated_cache(out):
        print(f"refused: {out} holds simulated BSM1 data, not an import: give another --out", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        train = load_config(args.preset, args.config).train
        history = train.history if args.history is None else args.history
        horizon = train.horizon if args.horizon is None else args.horizon
        catalog = load_catalog(args.catalog)
        manifest = import_table(source, catalog, out, history=history, horizon=horizon, shares=(args.val, args.test))
        _, data, _ = load_dataset(out, catalog)
    except (ConfigError, CatalogError, ImportRefused, DataError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder without write permission: the import before is left as it was
        where = exc.filename or out
        print(
            f"error: {where}: {exc.strerror or exc} (importing into {out}: what it held is as it was)", file=sys.stderr
        )
        return 1
    print(summary_table(data, catalog))
    repairs = manifest["repairs"]
    print(
        f"\nrepaired ({len(repairs)}):"
        if repairs
        else "\nrepaired: nothing (no missing code, stuck sensor or DST hour)"
    )
    for r in repairs:
        print(f"  {describe(r)}")
    print("\nmissing after resampling and bridging (share of samples):")
    for name, r in manifest["missing"].items():
        print(f"  {name:<12} {100 * r['missing_share']:5.1f}%  ({r['bridged_samples']} samples bridged)")
    blocks = ", ".join(f"{k} {v['from']} .. {v['to']}" for k, v in manifest["scenarios"].items())
    print(f"\nblocks: {blocks}; {manifest['gap_between_splits']} samples dropped between them")
    print(
        f"the plant's clock (the calendar's input): wall time in {catalog.timezone} (the catalog's timezone, UTC "
        "where it names none), whatever offset the export writes"
    )
    print(f"(history {history} + horizon {horizon} samples, the {args.preset} preset's unless given)")
    print(
        f"imported {manifest['records']} records (one every {manifest['record_minutes']:g} minutes, the median) "
        f"into {out} in {time.perf_counter() - start:.1f} s"
    )
    config = f" --config {args.config}" if args.config else ""
    print(f"train on it: python -m training.run --preset {args.preset}{config} --catalog {args.catalog} --data {out}")
    return 0


def export_table_main(argv: list[str]) -> int:
    """``python -m training.data export-table OUT``: simulated scenarios as a historian export, with faults."""
    from plant.example_export import EXAMPLE_CATALOG, export_plant, export_table

    parser = argparse.ArgumentParser(prog="python -m training.data export-table", description=export_table_main.__doc__)
    parser.add_argument("out", help="the CSV file to write")
    parser.add_argument("--preset", default="tiny", help="the data preset whose scenarios are exported")
    parser.add_argument(
        "--scenarios",
        nargs="*",
        help="scenario ids in time order (default: each BSM2 window once, under its first policy, in time order)",
    )
    parser.add_argument(
        "--plant",
        action="store_true",
        help=f"as the example plant's SCADA writes it ({EXAMPLE_CATALOG.relative_to(Path(__file__).parents[1])}): "
        "tags, local time, error codes, a stuck analyser, an outage",
    )
    parser.add_argument("--no-faults", action="store_true", help="exact values: no noise, dropouts, stuck or spikes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.plant and args.no_faults:
        parser.error("--plant writes the example plant's export with its faults; --no-faults is for the plain table")
    out = Path(args.out)
    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):  # found now, not after the simulation
        where = "is a folder" if out.is_dir() else f"is in {out.parent}, a file"
        print(f"error: OUT {out} {where}: give the CSV file to write", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.preset).data
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    known = [s.id for s in scenarios(cfg)]  # checked before anything is simulated
    windows: dict[str, str] = {}  # each BSM2 window once: the same influent twice would replay it in the export
    for i in known:
        if i.startswith("bsm2-"):
            windows.setdefault(i.partition("@")[0], i)
    ids = args.scenarios or list(windows.values())
    unknown = [i for i in ids if i not in known]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; the preset has {known}", file=sys.stderr)
        return 2
    data = generate(cfg)
    if args.plant:
        truth = export_plant([data[i] for i in ids], Path(args.out), args.seed)
        print(f"wrote {args.out}: {truth['rows']} rows of the example plant ({EXAMPLE_CATALOG.name}), with")
        print(f"  codes {json.dumps(truth['codes'])}")
        print(f"  a stuck analyser: {json.dumps(truth['stuck'])}, an outage: {json.dumps(truth['outage'])}")
        print(f"  {len(truth['repeated_hour_rows'])} rows in the hour the autumn DST change repeats")
        return 0
    counts = export_table([data[i] for i in ids], BSM1, Path(args.out), args.seed, faults=not args.no_faults)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
