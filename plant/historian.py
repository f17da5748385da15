"""A plant's own data: import a historian export into the training data format, and write one from the simulator.

``python -m training.data import SOURCE --catalog CATALOG [--out DIR]`` reads a wide CSV or Parquet table (a
``timestamp`` column, one column per catalog variable), resamples it to the catalog's sample period, keeps gaps
as gaps, splits it into contiguous train / validation / test blocks and writes them as cached scenarios with a
manifest, the format ``python -m training.run --catalog CATALOG --data DIR`` trains on.

``python -m training.data export-table OUT.csv`` writes simulator scenarios in that import format, with the
faults real sensors have (noise, dropouts, a stuck sensor, spikes): the worked example of the README.

What an import refuses, always naming the file, row and column: a value that does not parse, a value outside
the catalog's physical bounds (usually a wrong unit), a timestamp that does not parse, repeats or goes back, and
a local time without UTC offset that a DST change makes ambiguous or impossible.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import atomic_write
from plant.catalog import Catalog, catalog_from_dict
from plant.scenarios import DataError, ScenarioData, load_scenario, save_scenario

TIMESTAMP_COLUMN = "timestamp"
CLOCK_EPOCH = datetime(1970, 1, 5)  # a Monday: clock minutes count from here, so the week's calendar is right
MISSING = {"", "nan", "NaN", "NA", "null", "None"}


class ImportRefused(ValueError):
    """The export cannot be trusted as it is; the message names the file, row and column."""


@dataclass
class Table:
    """A historian export read into memory: UTC instants, local clock minutes and one float column each."""

    utc: np.ndarray  # (n,) seconds since 1970 UTC, strictly increasing
    clock: np.ndarray  # (n,) local wall-clock minutes since CLOCK_EPOCH (the calendar's input)
    values: dict[str, np.ndarray]  # variable name -> (n,) float, NaN where missing
    rows: np.ndarray  # (n,) the file's row number of each record (for messages)


def parse_time(text: str, tz: zoneinfo.ZoneInfo, where: str) -> datetime:
    """An ISO timestamp; without a UTC offset it is read in ``tz``, refusing a DST repeat or gap."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ImportRefused(f"{where}: cannot parse timestamp {text!r} (ISO 8601 expected)") from None
    if t.tzinfo is not None:
        return t
    first, second = t.replace(tzinfo=tz, fold=0), t.replace(tzinfo=tz, fold=1)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != t:
        raise ImportRefused(f"{where}: {text} does not exist in {tz.key} (skipped by the DST change)")
    if first.utcoffset() != second.utcoffset():
        raise ImportRefused(
            f"{where}: {text} is repeated by the DST change in {tz.key} (give timestamps with UTC offsets)"
        )
    return first


def clock_minutes(t: datetime) -> float:
    """Wall-clock minutes since CLOCK_EPOCH in the timestamp's own offset: what the service reads off a request."""
    return (t.replace(tzinfo=None) - CLOCK_EPOCH).total_seconds() / 60


def read_table(path: Path, catalog: Catalog) -> Table:
    """Read a wide CSV or Parquet export; every variable of the catalog must have its column."""
    tz = zoneinfo.ZoneInfo(catalog.timezone)
    if path.suffix.lower() in (".parquet", ".pq"):
        header, records, first_row = _parquet_records(path)
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                records = list(reader)
        except OSError as exc:
            raise ImportRefused(f"{path}: cannot read ({exc.strerror})") from None
        first_row = 2  # the header is row 1
    if TIMESTAMP_COLUMN not in header:
        raise ImportRefused(f"{path}: no {TIMESTAMP_COLUMN!r} column (columns: {', '.join(header)})")
    missing = [v.source_column for v in catalog.variables if v.source_column not in header]
    if missing:
        raise ImportRefused(f"{path}: the catalog's column(s) {', '.join(missing)} are not in the file")
    it = header.index(TIMESTAMP_COLUMN)
    cols = {v.name: header.index(v.source_column) for v in catalog.variables}
    n = len(records)
    utc, clock = np.empty(n), np.empty(n)
    values = {name: np.full(n, np.nan) for name in cols}
    for r, rec in enumerate(records):
        row = r + first_row
        if len(rec) != len(header):
            raise ImportRefused(f"{path}: row {row} has {len(rec)} fields, the header {len(header)}")
        t = rec[it] if isinstance(rec[it], datetime) else parse_time(str(rec[it]), tz, f"{path}: row {row}")
        if t.tzinfo is None:
            t = parse_time(t.isoformat(), tz, f"{path}: row {row}")
        utc[r], clock[r] = t.timestamp(), clock_minutes(t)
        for name, c in cols.items():
            cell = rec[c]
            if cell is None or (isinstance(cell, str) and cell.strip() in MISSING):
                continue
            try:
                value = float(cell)
            except (TypeError, ValueError):
                raise ImportRefused(f"{path}: row {row} column {header[c]}: cannot parse {cell!r}") from None
            if not math.isfinite(value):
                continue  # NaN in a Parquet float column: missing
            values[name][r] = value
    rows = np.arange(first_row, first_row + n)
    _check_order(path, utc, rows, records, it)
    _check_bounds(path, catalog, values, rows)
    return Table(utc, clock, values, rows)


def _parquet_records(path: Path) -> tuple[list[str], list[list[Any]], int]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportRefused(f"{path}: reading Parquet needs pyarrow (pip install -e '.[train]')") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise ImportRefused(f"{path}: unreadable Parquet ({exc})") from None
    header = table.column_names
    columns = [table.column(name).to_pylist() for name in header]
    return header, [list(rec) for rec in zip(*columns, strict=True)], 1  # row 1: the first record


def _check_order(path: Path, utc: np.ndarray, rows: np.ndarray, records: list, it: int) -> None:
    steps = np.diff(utc)
    for bad, what in ((steps == 0, "repeats"), (steps < 0, "goes back in time from")):
        if bad.any():
            j = int(np.argmax(bad))
            raise ImportRefused(
                f"{path}: row {rows[j + 1]} column {TIMESTAMP_COLUMN}: {records[j + 1][it]} {what} row {rows[j]}'s "
                f"{records[j][it]} (timestamps must increase)"
            )


def _check_bounds(path: Path, catalog: Catalog, values: dict[str, np.ndarray], rows: np.ndarray) -> None:
    for v in catalog.variables:
        col = values[v.name]
        out = (col < v.min) | (col > v.max)
        if out.any():
            j = int(np.argmax(out))
            raise ImportRefused(
                f"{path}: row {rows[j]} column {v.source_column}: {col[j]:g} is outside {v.name}'s physical bounds "
                f"[{v.min:g}, {v.max:g}] {v.unit} ({int(out.sum())} value(s) in all; a wrong unit?)"
            )


def resample(table: Table, catalog: Catalog) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, dict]]:
    """Onto the catalog's grid: the value at t is the mean of the records in (t - period, t], the convention of
    the simulator's controls. Empty intervals stay missing, except gaps up to the variable's max_gap_minutes,
    bridged by linear interpolation. Returns (utc grid seconds, clock minutes, values (n, variables), report)."""
    period = catalog.sample_minutes * 60
    first = math.ceil(table.utc[0] / period) * period
    last = math.ceil(table.utc[-1] / period) * period
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
        bridge(out[:, j], int(v.max_gap_minutes // catalog.sample_minutes))
        report[v.name] = {
            "missing_share": float(np.isnan(out[:, j]).mean()),
            "bridged_samples": missing_before - int(np.isnan(out[:, j]).sum()),
        }
    # Clock minutes of each grid point in the plant's local time: the UTC offset of the export's own record in
    # (or last before) that interval, so the plant's clock is what its historian wrote.
    epoch = CLOCK_EPOCH.replace(tzinfo=UTC).timestamp()
    offsets = table.clock - (table.utc - epoch) / 60
    nearest = np.clip(np.searchsorted(table.utc, grid, side="right") - 1, 0, len(table.utc) - 1)
    clock = (grid - epoch) / 60 + offsets[nearest]
    return grid, clock, out, report


def bridge(col: np.ndarray, max_steps: int) -> None:
    """Linear interpolation, in place, across interior gaps of at most ``max_steps`` samples."""
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
    the missing share per variable and a data hash). Returns the manifest."""
    table = read_table(source, catalog)
    grid, clock, values, report = resample(table, catalog)
    pos = {v.name: j for j, v in enumerate(catalog.variables)}
    x = values[:, [pos[n] for n in catalog.target_names]]
    u = values[:, [pos[n] for n in catalog.control_names]]
    sp = values[:, [pos[n] for n in catalog.setpoint_names]]
    blocks = split_blocks(len(grid), shares, history + horizon)
    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios, digest = {}, hashlib.sha256()
    for name, sl in blocks.items():
        sd = ScenarioData(name, clock[sl], x[sl], u[sl], sp[sl], 0, "historian", name)
        path = out_dir / f"{name}.npz"
        save_scenario(path, sd, [], catalog)
        digest.update(path.read_bytes())
        first, last = (datetime.fromtimestamp(grid[i], UTC).isoformat() for i in (sl.start, sl.stop - 1))
        scenarios[name] = {"file": path.name, "rows": len(sd.t_minutes), "from": first, "to": last}
    manifest = {
        "source": "historian",
        "imported_from": source.name,
        "catalog": catalog.to_dict(),
        "config_hash": digest.hexdigest()[:16],
        "sample_minutes": catalog.sample_minutes,
        "records": len(table.utc),
        "splits": {k: [k] for k in blocks},
        "gap_between_splits": history + horizon,
        "scenarios": scenarios,
        "missing": report,
    }
    atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def load_dataset(folder: Path, catalog: Catalog | None = None) -> tuple[Catalog, dict[str, Any], dict[str, Any]]:
    """An imported dataset: (catalog, scenarios by id, manifest). With ``catalog``, refuse data imported with
    another one."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{folder}: no readable manifest.json ({exc}); import with python -m training.data import"
        ) from None
    stored = catalog_from_dict(manifest["catalog"], f"{folder}/manifest.json")
    if catalog is not None and stored.to_dict() != catalog.to_dict():
        raise DataError(f"{folder}: imported with another catalog ({stored.name}); import it again with this one")
    data = {sid: load_scenario(folder / entry["file"], stored) for sid, entry in manifest["scenarios"].items()}
    return stored, data, manifest


# ----------------------------------------------------------------------------- the worked example


def export_table(
    data: list[ScenarioData],
    catalog: Catalog,
    path: Path,
    seed: int = 0,
    *,
    faults: bool = True,
    tz: str = "Europe/Berlin",
) -> dict[str, int]:
    """Write scenarios (in time order) as a historian export: one row per sample, a timestamp with its UTC offset
    in ``tz`` (the scenarios' day 0 is Monday 2 March 2026), and the faults of real sensors when ``faults``:
    1% noise, dropouts of 15 minutes to 6 hours, one sensor stuck for a day, and a few spikes (within bounds).
    Returns counts of what was done."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([d.x for d in data])
    u = np.concatenate([d.u for d in data])
    sp = np.concatenate([d.s for d in data])
    values = np.concatenate([x, u, sp], 1).astype(np.float64)
    columns = [*catalog.targets, *catalog.controls, *catalog.setpoints]

    n = len(values)
    counts = {"rows": n, "dropouts": 0, "stuck_samples": 0, "spikes": 0}
    if faults:
        sensors = list(range(len(catalog.targets)))  # controls and setpoints come from the control system: no faults
        values[:, sensors] *= 1 + 0.01 * rng.standard_normal((n, len(sensors)))
        for _ in range(max(1, n // 500)):
            j, start, length = rng.choice(sensors), rng.integers(0, n), int(rng.integers(1, 25))
            values[start : start + length, j] = np.nan
            counts["dropouts"] += 1
        j, start = rng.choice(sensors), int(rng.integers(0, max(1, n - 96)))
        values[start : start + 96, j] = values[start, j]
        counts["stuck_samples"] = min(96, n - start)
        for _ in range(5):
            j, i = rng.choice(sensors), int(rng.integers(0, n))
            values[i, j] = min(values[i, j] * 3, catalog.targets[j].max)
            counts["spikes"] += 1
        for j, v in enumerate(columns):
            values[:, j] = np.clip(values[:, j], v.min, v.max)
    zone = zoneinfo.ZoneInfo(tz)
    monday = datetime(2026, 3, 2, tzinfo=zone).astimezone(UTC)  # the scenarios' day 0, 4 weeks before a DST change
    minutes = np.concatenate([d.t_minutes for d in data])
    lines = [",".join([TIMESTAMP_COLUMN, *[v.source_column for v in columns]])]
    for i in range(n):
        t = (monday + timedelta(minutes=float(minutes[i]))).astimezone(zone)
        cells = ["" if np.isnan(val) else f"{val:.9g}" for val in values[i]]
        lines.append(",".join([t.isoformat(), *cells]))
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return counts
