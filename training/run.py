"""Retrain the KoVAE forecaster end to end: ``python -m training.run [--preset tiny] [section.field=value ...]``.

Read this file first: it is the whole run, one stage per module.

1. ``training.prepare``: load (or simulate) the data, fit scalers on the training scenarios, cut windows.
2. ``training.loop``: train with the multi-step forecast loss (checkpoints, resume, NaN guard).
3. ``training.calibrate``: fit the residual fading and the interval width on validation.
4. ``training.scoring``: evaluate against baselines on the held-out scenarios; ``training.report``: metrics,
   plots and report.md.
5. ``training.publish``: export to ONNX into ``<run dir>/export/<version>``; the version enters the model store
   and becomes current only if it beats the version being served, or, with none served, scores >= 0 (or with
   --force; --no-promote stores it only).

Each plant catalog has a store of its own: ``models/`` holds the simulated BSM1 plant's models, any other
catalog's go to ``models/<catalog name>`` (``default_store``), so a plant's first model is served (where it at
least ties the naive forecasts: a gate score >= 0) and its next ones are compared with it, never with another
plant's.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from modelcard.card import CardError
from modelcard.store import check_store_serves, check_version_name
from training.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from plant.catalog import Catalog


def run_catalog(cfg: RunConfig) -> Catalog | None:
    """The catalog a run trains on: the one given, else the one the data were imported with (read from the
    import's manifest), else BSM1's; None where it cannot be read (stage 1 reports why)."""
    from plant.catalog import BSM1, CatalogError, catalog_from_dict, load_catalog

    try:
        if cfg.data.catalog:
            return load_catalog(cfg.data.catalog)
        if cfg.data.source == "historian":
            manifest = json.loads((Path(cfg.data.cache_dir) / "manifest.json").read_text())
            return catalog_from_dict(manifest["catalog"])
    except (OSError, ValueError, KeyError, TypeError, CatalogError):
        return None
    return BSM1


def default_store(catalog: Catalog | None) -> Path:
    """``models`` for the built-in BSM1 catalog (or one that cannot be read), ``models/<name>`` for any other."""
    from plant.catalog import model_store

    return Path("models") if catalog is None else model_store(catalog)


def new_version_name(preset: str) -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + f"-{preset}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (section.field=value): see training/config.py or `--show-config`.",
    )
    parser.add_argument("--preset", default="default", help="tiny (CI, ~1 min) or default")
    parser.add_argument("--config", help="TOML file with [data], [model] and [train] tables")
    parser.add_argument(
        "--store",
        help="model store folder (default: models for the BSM1 catalog, models/<catalog name> for a plant's own)",
    )
    parser.add_argument(
        "--version", help="name of the new version (default: the --run-dir folder's name, else UTC time and preset)"
    )
    parser.add_argument("--run-dir", help="where checkpoints and logs go (default: runs/<version>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--force", action="store_true", help="promote even if it does not beat the served model")
    parser.add_argument("--no-promote", action="store_true", help="add the version to the store but never promote it")
    parser.add_argument("--catalog", help="the plant's catalog (TOML); default: the built-in BSM1 catalog")
    parser.add_argument(
        "--data", help="a folder written by `python -m training.data import` (default: simulate BSM1 scenarios)"
    )
    parser.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.epochs=5 model.z_dim=32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.catalog:
        overrides.append(f"data.catalog={args.catalog}")
    if args.data:
        overrides += ["data.source=historian", f"data.cache_dir={args.data}"]
    try:
        cfg = load_config(args.preset, args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.show_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.resume and not args.run_dir:
        print("error: --resume needs --run-dir (the folder of the interrupted run)", file=sys.stderr)
        return 2
    if args.force and args.no_promote:
        print("error: --force promotes past the gate and --no-promote never promotes: give one", file=sys.stderr)
        return 2
    version = args.version or (Path(args.run_dir).name if args.run_dir else new_version_name(args.preset))
    try:
        check_version_name(version)  # refused now, not after the whole run
    except CardError as exc:
        source = "--version" if args.version else "--run-dir's folder name (the version's, unless --version names one)"
        print(f"error: {source}: {exc}", file=sys.stderr)
        return 2
    catalog = run_catalog(cfg)
    store, run_dir = Path(args.store) if args.store else default_store(catalog), Path(args.run_dir or f"runs/{version}")
    for flag, folder in (("--store", store), ("--run-dir", run_dir)):
        problem = folder_problem(folder)
        if problem:  # found now, not as NotADirectoryError after the whole run
            print(f"error: {flag} {folder}: {problem}", file=sys.stderr)
            return 2
    if (store / version).exists():
        print(f"error: version {version} already exists in {store}", file=sys.stderr)
        return 2
    if catalog is not None:
        try:  # refused now, not at the gate after the whole run
            check_store_serves(store, catalog.name, version)
        except CardError as exc:
            print(f"error: --store {store}: {exc}; this catalog's is {default_store(catalog)}", file=sys.stderr)
            return 2
    if args.resume and not (run_dir / "checkpoints").is_dir():
        print(f"error: --resume: {run_dir} holds no checkpoints (no run was started there)", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:  # one run per folder at a time, held for the whole run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"error: another run is writing {run_dir}: wait for it, or give another --run-dir", file=sys.stderr)
            return 2
        # Under the lock (a live run's checkpoint is no earlier run's), before the data are prepared (minutes),
        # and before a new run overwrites the checkpoint.
        problem = checkpoint_problem(run_dir, cfg, resume=args.resume)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        objective = None if catalog is None else catalog.optimizer
        if objective is not None and objective.setpoints and not cfg.model.setpoint_inputs:  # now, not at the end
            from training.publish import NO_LOOPS_NO_ADVICE

            print(f"note: {NO_LOOPS_NO_ADVICE}", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a TERM stops the run as Ctrl-C does
        try:
            return run(args, cfg, version, store, run_dir)
        except KeyboardInterrupt:
            given = sys.argv[1:] if argv is None else argv
            if not (run_dir / "checkpoints").is_dir():  # stopped before its first epoch ended: nothing to resume
                again = shlex.join(["python", "-m", "training.run", *(a for a in given if a != "--resume")])
                print(f"interrupted before the first checkpoint, nothing to resume; rerun: {again}", file=sys.stderr)
                return 130
            again = resume_command(given, run_dir)
            print(
                f"interrupted: {run_dir} keeps the last checkpoint (every train.checkpoint_every epochs), nothing in "
                f"the store is half-written; resume with: {again}",
                file=sys.stderr,
            )
            return 130


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be a folder (it, or the nearest of its parents that exists, is a file); None if it
    can."""
    for path in (folder, *folder.parents):
        if path.exists():
            if path.is_dir():
                return None
            return "is a file, not a folder" if path == folder else f"{path} is a file, not a folder"
    return None


def checkpoint_problem(run_dir: Path, cfg: RunConfig, *, resume: bool) -> str | None:
    """Why a run cannot start in ``run_dir`` as asked, checked before any work; None if it can. Without --resume,
    a checkpoint there is an earlier run's progress, which a new run would overwrite. With it, the checkpoint
    must be readable and hold this run's settings (``training.loop.check_resumed_config``)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not resume:
        if last.exists():
            return (
                f"--run-dir {run_dir} holds a run's checkpoint ({last}), which a new run would overwrite: add "
                "--resume to continue that run, or choose another --run-dir"
            )
        return None
    from training.loop import TrainingFailed, check_resumed_config, read_checkpoint  # torch: seconds to import

    try:
        check_resumed_config(read_checkpoint(last).get("config", {}), cfg.to_dict())
    except TrainingFailed as exc:
        return str(exc)
    return None


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command that resumes an interrupted run: its own arguments, with --run-dir and --resume."""
    args = list(argv)
    if not any(a == "--run-dir" or a.startswith("--run-dir=") for a in args):
        args += ["--run-dir", str(run_dir)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "-m", "training.run", *args])


def run(args: argparse.Namespace, cfg: RunConfig, version: str, store: Path, run_dir: Path) -> int:
    """The five stages, in order (the module's docstring)."""
    # Imported here, after the arguments are checked: torch and the simulator take seconds to import.
    import numpy as np

    from export.onnx_export import ParityError
    from modelcard.store import current_version
    from plant.catalog import CatalogError
    from plant.scenarios import DataError, splits
    from training.calibrate import calibrate
    from training.loop import TrainingFailed, train
    from training.prepare import prepare
    from training.publish import build_card, export_candidate, promote_if_better
    from training.report import kept_epoch, print_headline, write_outputs
    from training.scoring import evaluate_all

    try:
        if cfg.data.source == "bsm1":
            splits(cfg.data)
        p = prepare(cfg)  # 1. data
    except (ConfigError, CatalogError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    dropped = ", ".join(f"{k} {v}" for k, v in p.dropped.items() if v)
    print(
        f"data ({p.catalog.name}): {len(p.train.x_hist)} train / {len(p.val.x_hist)} val / {len(p.test.x_hist)} test "
        f"windows" + (f" (dropped for missing data: {dropped})" if dropped else ""),
        file=sys.stderr,
    )
    # 2. training
    try:
        model, log = train(cfg, p, run_dir, resume=args.resume)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    train_seconds = sum(row["seconds"] for row in log)  # epoch times, also right after a --resume
    # 3. calibration
    calib = calibrate(model, p, cfg)
    # 4. evaluation and report
    metrics, kept = evaluate_all(model, p, cfg, calib)
    metrics.update(training_seconds=train_seconds, calibration=calib, log=log, kept_epoch=kept_epoch(log)["epoch"])
    outputs = ["log.csv", *write_outputs(run_dir, version, metrics, calib, train_seconds, kept, p)]
    print_headline(metrics, calib, p.catalog)
    # 5. export, store, promotion gate
    card = build_card(version, cfg, p, metrics, calib, train_seconds)
    try:
        candidate = export_candidate(run_dir, version, model, card, p, cfg, outputs)
    except ParityError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    print(f"exported version {version} to {candidate}", file=sys.stderr)
    rc = promote_if_better(
        store, candidate, metrics["score"], p, cfg, force=args.force, never=args.no_promote, regimes=metrics["regimes"]
    )
    if rc == 0 and current_version(store) == version:
        print(
            f"serve it: KOVAE_MODEL_STORE={store} python -m service (a service of {store} loads it on its next poll)",
            file=sys.stderr,
        )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
