"""A plant's own data: import a historian export into the training data format.

``python -m training.data import SOURCE --catalog CATALOG [--preset P] [--out DIR]`` reads a wide CSV or Parquet
table (the catalog's timestamp column, one column per catalog variable), resamples it to the catalog's sample
period, keeps gaps as gaps, splits it into contiguous train / validation / test blocks and writes them as cached
scenarios with a manifest, the format ``python -m training.run --catalog CATALOG --data DIR`` trains on.

One run reports everything. The import reads the whole file (``plant.export_reader``) and collects what it refuses
(the first 50 listed, each with file, row, column and value, the rest counted), and writes nothing then: a value
that does not parse, a value outside the catalog's physical bounds (with a unit hint only where a common factor
brings it inside, a code hint where it looks like a historian's error code), a timestamp that does not parse,
repeats or goes back, a local time without offset that the spring change skips, or that the autumn change repeats
where neither the neighbours' offsets nor the records' order tell which of the two hours it is. What it repairs is
listed in its report and manifest: a declared missing code read as missing, a stuck sensor's flat line set to
missing, the repeated autumn hour placed by the order of its records. ``plant.example_export`` writes worked
examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zoneinfo
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import atomic_write, fsync_dir, hold_forward, sha256_file
from plant.catalog import Catalog, catalog_from_dict
from plant.export_reader import CLOCK_EPOCH_S, Table, read_table
from plant.export_values import ImportRefused
from plant.scenarios import DataError, ScenarioData, load_scenario, save_scenario

MAX_GRID_YEARS = 20  # a longer export is refused before its grid is allocated (memory: years x variables)
IMPORT_FILES = ("manifest.json", "train.npz", "val.npz", "test.npz")  # what an import folder holds


def resample(table: Table, catalog: Catalog) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, dict]]:
    """Onto the catalog's grid: the value at t is the mean of the records in (t - period, t], the convention of
    the simulator's controls. Empty intervals stay missing, except gaps up to the variable's max_gap_minutes,
    bridged by linear interpolation. Returns (utc grid seconds, clock minutes, values (n, variables), report)."""
    period = catalog.sample_minutes * 60
    first = math.ceil(table.utc[0] / period) * period
    last = math.ceil(table.utc[-1] / period) * period
    if (last - first) / period + 1 > MAX_GRID_YEARS * 365.25 * 86400 / period:
        when = [datetime.fromtimestamp(t, UTC).isoformat() for t in (table.utc[0], table.utc[-1])]
        raise ImportRefused(
            f"the export spans {(last - first) / (365.25 * 86400):.0f} years (row {table.rows[0]} at {when[0]} to "
            f"row {table.rows[-1]} at {when[1]} UTC), more than {MAX_GRID_YEARS}: a mistyped timestamp? or import a "
            "shorter period"
        )
    grid = np.arange(first, last + period, period, dtype=np.float64)
    slot = np.ceil(table.utc / period).astype(np.int64) - int(first // period)  # interval (t - period, t]
    out = np.full((len(grid), len(catalog.variables)), np.nan)
    report: dict[str, dict] = {}
    for j, v in enumerate(catalog.variables):
        col = table.values[v.name]
        ok = np.isfinite(col)
        sums = np.bincount(slot[ok], weights=col[ok], minlength=len(grid))
        counts = np.bincount(slot[ok], minlength=len(grid))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        missing_before = int(np.isnan(out[:, j]).sum())
        bridge(out[:, j], int(v.max_gap_minutes // catalog.sample_minutes), hold=v.fill == "hold")
        report[v.name] = {
            "missing_share": float(np.isnan(out[:, j]).mean()),
            "bridged_samples": missing_before - int(np.isnan(out[:, j]).sum()),
        }
    # Clock minutes of each grid point in the plant's local time: the zone's UTC offset at that instant (the last
    # record's offset put a grid point inside an outage across a DST change an hour off).
    tz = zoneinfo.ZoneInfo(catalog.timezone)
    offsets = np.array([datetime.fromtimestamp(t, tz).utcoffset().total_seconds() for t in grid])  # type: ignore[union-attr]
    clock = (grid + offsets - CLOCK_EPOCH_S) / 60
    return grid, clock, out, report


def record_minutes(table: Table) -> float:
    """The export's median interval between records, in minutes."""
    return float(np.median(np.diff(table.utc))) / 60 if len(table.utc) > 1 else 0.0


def check_interval(table: Table, catalog: Catalog, source: Path) -> float:
    """Refuse an export coarser than the catalog's sample period that its variables' max_gap_minutes do not
    bridge: an hourly export imported "successfully" and left no training window (three of every four samples
    missing). Returns the median record interval in minutes."""
    median = record_minutes(table)
    if median <= catalog.sample_minutes:
        return median
    empty = math.ceil(median / catalog.sample_minutes - 1e-9) - 1  # grid samples between two records
    short = [
        f"{v.source_column!r} ({v.name}, max_gap_minutes {v.max_gap_minutes:g})"
        for v in catalog.variables
        if v.role != "setpoint" and int(v.max_gap_minutes // catalog.sample_minutes) < empty
    ]
    if short:
        raise ImportRefused(
            f"{source}: its records are {median:g} minutes apart (the median interval), coarser than the catalog's "
            f"sample_minutes ({catalog.sample_minutes}); between two records {empty} sample(s) would stay missing in "
            f"{', '.join(short)}: export every {catalog.sample_minutes} minutes or finer, or let max_gap_minutes "
            f"bridge {empty * catalog.sample_minutes} minutes"
        )
    return median


def bridge(col: np.ndarray, max_steps: int, *, hold: bool = False) -> None:
    """In place: linear interpolation across interior gaps of at most ``max_steps`` samples (longer ones stay
    gaps), or with ``hold`` each value carried on for at most ``max_steps`` samples, after the last record too
    (``modelcard.card.hold_forward``: the service holds a request's values alike)."""
    if hold:
        hold_forward(col, max_steps)
        return
    for a, b in pairwise(np.flatnonzero(~np.isnan(col))):
        if 1 < b - a <= max_steps + 1:
            col[a + 1 : b] = np.interp(np.arange(a + 1, b), [a, b], [col[a], col[b]])


def split_blocks(n: int, shares: tuple[float, float], gap: int) -> dict[str, slice]:
    """Contiguous blocks: train, then validation, then test, with ``gap`` samples dropped between them so that
    no window (history + horizon) straddles two."""
    n_val, n_test = round(n * shares[0]), round(n * shares[1])
    n_train = n - n_val - n_test - 2 * gap
    if min(n_train, n_val, n_test) <= gap:
        raise ImportRefused(
            f"{n} samples are too few for train, validation and test blocks of more than {gap} samples each "
            f"(with {gap} dropped between them)"
        )
    a = n_train
    b = a + gap + n_val
    return {"train": slice(0, a), "val": slice(a + gap, b), "test": slice(b + gap, n)}


def check_measured(
    values: np.ndarray, grid: np.ndarray, blocks: dict[str, slice], catalog: Catalog, source: Path
) -> None:
    """Refuse a measurement, disturbance or control without one value in a block (a dead transmitter, an analyser
    installed later): in the train block a model cannot learn it, and training went on to a model no service can
    load; a target without one value in the validation or test block cannot be scored there, and a control
    without one there left training to fail later without naming it."""
    problems = []
    for j, v in enumerate(catalog.variables):
        for block, sl in blocks.items():
            # A setpoint is left to training: it needs one only where the model reads setpoints (prepare says so).
            if v.role != "setpoint" and not np.isfinite(values[sl, j]).any():
                first, last = (datetime.fromtimestamp(grid[i], UTC).isoformat() for i in (sl.start, sl.stop - 1))
                problems.append(
                    f"  column {v.source_column!r} ({v.name}) has no value in the {block} block ({first} .. {last})"
                )
    if problems:
        raise ImportRefused(
            f"{source}: {len(problems)} problem(s); nothing was imported\n" + "\n".join(problems) + "\n  import a "
            "period in which it was measured, or leave it out of the catalog"
        )


def import_table(
    source: Path,
    catalog: Catalog,
    out_dir: Path,
    *,
    history: int,
    horizon: int,
    shares: tuple[float, float] = (0.15, 0.15),
) -> dict[str, Any]:
    """Import ``source`` into ``out_dir``: one scenario per split block, and manifest.json (with the catalog,
    the history and horizon the blocks are separated for, the repairs, the missing share per variable and a
    data hash). The folder is written beside ``out_dir``, checked as training will load it, and only then put in
    place of the import there: a refused or interrupted import leaves the one before intact. Returns the
    manifest."""
    check_out(out_dir)
    table = read_table(source, catalog)
    interval = check_interval(table, catalog, source)
    try:
        grid, clock, values, report = resample(table, catalog)
    except ImportRefused as exc:
        raise ImportRefused(f"{source}: {exc}") from None
    pos = {v.name: j for j, v in enumerate(catalog.variables)}
    x = values[:, [pos[n] for n in catalog.target_names]]
    u = values[:, [pos[n] for n in catalog.control_names]]
    sp = values[:, [pos[n] for n in catalog.setpoint_names]]
    blocks = split_blocks(len(grid), shares, history + horizon)
    check_measured(values, grid, blocks, catalog, source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.importing-"))
    try:
        manifest = write_import(work, source, catalog, table, grid, clock, (x, u, sp), blocks, report, shares)
        manifest |= {"history": history, "horizon": horizon, "gap_between_splits": history + horizon}
        manifest["record_minutes"] = interval
        atomic_write(work / "manifest.json", json.dumps(manifest, indent=2).encode())
        load_dataset(work, catalog)  # what training reads, checked before it replaces anything
        replace_folder(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone after the swap; a refused import's half folder
    return manifest


def write_import(
    work: Path,
    source: Path,
    catalog: Catalog,
    table: Table,
    grid: np.ndarray,
    clock: np.ndarray,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    blocks: dict[str, slice],
    report: dict[str, dict],
    shares: tuple[float, float],
) -> dict[str, Any]:
    """The block files in ``work``; returns the manifest's entries (each file with its sha256, so that a folder
    holding another import's file is refused on load)."""
    x, u, sp = arrays
    scenarios, digest = {}, hashlib.sha256()
    for name, sl in blocks.items():
        sd = ScenarioData(name, clock[sl], x[sl], u[sl], sp[sl], 0, "historian", name)
        path = work / f"{name}.npz"
        save_scenario(path, sd, [], catalog)
        data = path.read_bytes()
        digest.update(data)
        first, last = (datetime.fromtimestamp(grid[i], UTC).isoformat() for i in (sl.start, sl.stop - 1))
        scenarios[name] = {
            "file": path.name,
            "rows": len(sd.t_minutes),
            "from": first,
            "to": last,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {
        "source": "historian",
        "imported_from": source.name,
        "imported_path": str(source),
        "shares": {"val": shares[0], "test": shares[1]},
        # With its [optimizer] table (not part of the catalog's identity), so that a run without --catalog has it.
        "catalog": catalog.to_dict() | ({"optimizer": catalog.optimizer.to_dict()} if catalog.optimizer else {}),
        "config_hash": digest.hexdigest()[:16],
        "sample_minutes": catalog.sample_minutes,
        "records": len(table.utc),
        "splits": {k: [k] for k in blocks},
        "scenarios": scenarios,
        "repairs": table.repairs,
        "missing": report,
    }


def check_out(out_dir: Path) -> None:
    """An import replaces the whole ``out_dir``: refuse a file there, and a folder holding anything but an
    import's files (``--out .`` would have been swept away, a simulated cache overwritten)."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ImportRefused(f"{folder}: is a file, not a folder: give --out a folder (new, or an earlier import)")
    if not out_dir.is_dir():
        return
    if simulated_cache(out_dir):
        raise ImportRefused(f"{out_dir} holds simulated BSM1 data, not an import: give another --out")
    leftover = re.compile(r"\..+\.tmp")  # an interrupted atomic_write's
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in IMPORT_FILES and not leftover.fullmatch(p.name))
    if other:
        raise ImportRefused(
            f"{out_dir}: holds {', '.join(map(repr, other[:5]))}{' ...' if len(other) > 5 else ''}, not only an "
            "import's files; an import replaces the whole folder: give another --out"
        )


def replace_folder(new: Path, out_dir: Path) -> None:
    """Put ``new`` in place of ``out_dir`` by renames: the old folder is moved aside until the new one is in,
    and removed only then (put back if the second rename fails)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.replaced-"))
        os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def imported(manifest: Any) -> bool:
    """Whether a data folder's manifest is an import's (it names the plant's catalog); simulated BSM1 scenarios'
    does not."""
    return isinstance(manifest, dict) and "catalog" in manifest


def simulated_cache(folder: Path) -> bool:
    """Whether ``folder`` holds simulated BSM1 scenarios, which an import must not overwrite."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return not imported(manifest)


def load_dataset(folder: Path, catalog: Catalog | None = None) -> tuple[Catalog, dict[str, Any], dict[str, Any]]:
    """An imported dataset: (catalog, scenarios by id, manifest). With ``catalog``, refuse data imported with
    another one."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{folder}: no readable manifest.json ({exc}); import with python -m training.data import"
        ) from None
    if not imported(manifest):
        raise DataError(f"{folder} holds simulated BSM1 data, not an import: train on it without --data")
    stored = catalog_from_dict(manifest["catalog"], f"{folder}/manifest.json")
    if catalog is not None and stored.to_dict() != catalog.to_dict():
        raise DataError(f"{folder}: imported with another catalog ({stored.name}); import it again with this one")
    data = {}
    for sid, entry in manifest["scenarios"].items():
        path = folder / entry["file"]
        # An import from before the manifest kept each file's digest has none: its row count is still checked.
        if "sha256" in entry and path.is_file() and sha256_file(path) != entry["sha256"]:
            raise DataError(
                f"{path}: not the file this import wrote (its sha256 differs from manifest.json's): a folder mixed "
                "from two imports, or changed since; import again"
            )
        data[sid] = load_scenario(path, stored)
        if len(data[sid].t_minutes) != entry.get("rows", len(data[sid].t_minutes)):
            raise DataError(
                f"{path}: {len(data[sid].t_minutes)} rows, manifest.json says {entry['rows']}: a folder mixed from "
                "two imports; import again"
            )
    # The catalog given is the same plant; its [optimizer] table is the one to train with (an import from before
    # the manifest kept the table has none).
    return catalog or stored, data, manifest
