"""Worked examples of a historian export, written from simulated scenarios (``python -m training.data export-table``).

``export_table``: the catalog's own columns, ISO timestamps with UTC offsets, and the faults of real sensors
(noise, dropouts, a stuck sensor, spikes). ``export_plant``: an export as a plant's SCADA historian writes one,
for the example plant of ``plant/catalogs/example.toml``: tag names and the plant's units, a ``Time`` column in
local time without offset across the autumn DST change, 5-minute records and later 1-minute ones (analysers
updating every 5 minutes), the historian's error codes (-9999, 1e6, "Bad", "I/O Timeout"), an analyser stuck for a
day and an analyser outage. Its import is the README's walk from an export to a served model and the tests'
fixture; what it returns is the ground truth an import report is checked against.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import atomic_write
from plant.catalog import BSM1, Catalog, load_catalog
from plant.scenarios import ScenarioData

EXAMPLE_CATALOG = Path(__file__).with_name("catalogs") / "example.toml"
# The example plant's tags: catalog variable -> (the BSM1 series it is written from, factor to the tag's unit)
EXAMPLE_SOURCES = {
    "inflow": ("Q_in", 1 / 24),  # m3/d -> m3/h
    "nh4_in": ("SNH_in", 1.0),
    "no3_bb2": ("SNO_2", 1.0),
    "o2_bb5": ("SO_5", 1.0),
    "nh4_bb5": ("SNH_5", 1.0),
    "nh4_out": ("SNH_eff", 1.0),
    "no3_out": ("SNO_eff", 1.0),
    "temp_bb5": ("T_5", 1.0),
    "air_bb5": ("KLa_5", 12.5),  # Nm3/h of air per 1/d of KLa: the blower's curve, taken as linear
    "recycle": ("Q_intr", 1 / 24),
    "o2_sp_bb5": ("SO_5_setpoint", 1.0),
}
ANALYSERS = ("nh4_in", "no3_bb2", "nh4_bb5", "nh4_out", "no3_out")  # a new value every 5 minutes


def export_table(
    data: list[ScenarioData],
    catalog: Catalog,
    path: Path,
    seed: int = 0,
    *,
    faults: bool = True,
) -> dict[str, int]:
    """Write scenarios (in time order) as a historian export: one row per sample, a timestamp with its UTC offset
    in the catalog's zone (the scenarios' day 0 is midnight there on Monday 2 March 2026, so that an import with
    the same catalog reads the scenarios' own clock), and the faults of real sensors when ``faults``:
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
    zone = zoneinfo.ZoneInfo(catalog.timezone)
    monday = datetime(2026, 3, 2, tzinfo=zone).astimezone(UTC)  # the scenarios' day 0, 4 weeks before a DST change
    minutes = np.concatenate([d.t_minutes for d in data])
    lines = [",".join(["timestamp", *[v.source_column for v in columns]])]
    for i in range(n):
        t = (monday + timedelta(minutes=float(minutes[i]))).astimezone(zone)
        cells = ["" if np.isnan(val) else f"{val:.9g}" for val in values[i]]
        lines.append(",".join([t.isoformat(), *cells]))
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return counts


def export_plant(
    data: list[ScenarioData],
    path: Path,
    seed: int = 0,
    *,
    catalog: Catalog | None = None,
    start: datetime = datetime(2026, 10, 21),
    fine_from_day: float = 2.0,
    outage_days: float = 0.5,
    stuck_hours: float = 24.0,
) -> dict[str, Any]:
    """Write scenarios, back to back from ``start`` (local time in the catalog's zone), as the example plant's
    historian exports them (module docstring): 5-minute records until ``fine_from_day``, 1-minute ones after;
    1% noise and short dropouts on the sensors; ``nh4_out`` stuck for ``stuck_hours`` at 10% of the span,
    ``no3_out`` out for ``outage_days`` from 30%; -9999 in ``o2_bb5``, 1e6 in ``nh4_in``, "Bad" in ``nh4_bb5``
    and "I/O Timeout" in every analyser for 10 minutes. Returns the ground truth: rows, the codes written per
    column, the stuck run's rows and the records after its first, the rows of the repeated DST hour."""
    catalog = catalog or load_catalog(EXAMPLE_CATALOG)
    rng = np.random.default_rng(seed)
    zone = zoneinfo.ZoneInfo(catalog.timezone)
    names = [*BSM1.target_names, *BSM1.control_names, *BSM1.setpoint_names]
    series = np.concatenate([np.concatenate([d.x, d.u, d.s], 1) for d in data])  # (samples, BSM1 variables)
    sample_min = 15.0 * np.arange(len(series))
    step = np.where(np.arange(sample_min[-1] + 1) < fine_from_day * 1440, 5, 1)
    record_min = np.arange(sample_min[-1] + 1)[np.arange(sample_min[-1] + 1) % step == 0]
    n = len(record_min)
    columns = list(catalog.variables)
    values = np.empty((n, len(columns)))
    for j, v in enumerate(columns):
        source, factor = EXAMPLE_SOURCES[v.name]
        values[:, j] = factor * np.interp(record_min, sample_min, series[:, names.index(source)])
    cells = np.empty((n, len(columns)), dtype=object)
    sensors = [j for j, v in enumerate(columns) if v.role in ("measurement", "disturbance")]
    values[:, sensors] *= 1 + 0.01 * rng.standard_normal((n, len(sensors)))
    for j, v in enumerate(columns):
        cells[:, j] = [f"{max(val, v.min):.4g}" for val in values[:, j]]
    col = {v.name: j for j, v in enumerate(columns)}
    at = {frac: int(np.searchsorted(record_min, frac * record_min[-1])) for frac in (0.1, 0.3, 0.45, 0.5, 0.55, 0.65)}
    for name in ANALYSERS:  # in the 1-minute part an analyser writes every 5th minute only
        cells[(record_min % 5 != 0), col[name]] = ""
    for _ in range(max(1, n // 2000)):  # short dropouts, away from the faults placed below
        j, i = rng.choice(sensors), int(rng.integers(at[0.65] + 100, n))
        cells[i : i + int(rng.integers(1, 20)), j] = ""
    within = (record_min >= record_min[at[0.3]]) & (record_min < record_min[at[0.3]] + outage_days * 1440)
    cells[within, col["no3_out"]] = ""
    stuck = (record_min >= record_min[at[0.1]]) & (record_min <= record_min[at[0.1]] + stuck_hours * 60)
    j = col["nh4_out"]
    cells[stuck & (cells[:, j] != ""), j] = cells[at[0.1], j]
    codes = [("o2_bb5", at[0.45], 12, "-9999"), ("nh4_in", at[0.5], 8, "1000000"), ("nh4_bb5", at[0.55], 5, "Bad")]
    codes += [(name, at[0.65], 10, "I/O Timeout") for name in ANALYSERS]
    written: dict[str, dict[str, int]] = {}
    for name, i, count, code in codes:
        rows = [r for r in range(i, n) if cells[r, col[name]] != ""][:count]
        cells[rows, col[name]] = code
        written.setdefault(columns[col[name]].source_column, {})[code] = count
    # The stuck run as an import sees it: identical non-empty cells, extended over equal neighbours.
    filled = np.flatnonzero(cells[:, j] != "")
    k0 = k1 = int(np.searchsorted(filled, at[0.1]))
    while k0 > 0 and cells[filled[k0 - 1], j] == cells[at[0.1], j]:
        k0 -= 1
    while k1 + 1 < len(filled) and cells[filled[k1 + 1], j] == cells[at[0.1], j]:
        k1 += 1
    first = datetime(start.year, start.month, start.day, start.hour, start.minute, tzinfo=zone).astimezone(UTC)
    local = [(first + timedelta(minutes=float(m))).astimezone(zone) for m in record_min]
    repeated = [r + 2 for r, t in enumerate(local) if t.replace(fold=1 - t.fold).utcoffset() != t.utcoffset()]
    lines = [",".join([catalog.timestamp_column, *[f'"{v.source_column}"' for v in columns]])]
    lines += [",".join([t.strftime("%Y-%m-%d %H:%M:%S"), *row]) for t, row in zip(local, cells, strict=True)]
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return {
        "rows": n,
        "codes": written,
        "stuck": {
            "column": columns[j].source_column,
            "first_row": int(filled[k0]) + 2,
            "last_row": int(filled[k1]) + 2,
            "records": k1 - k0,
        },
        "outage": {"column": columns[col["no3_out"]].source_column, "records": int(within.sum())},
        "repeated_hour_rows": repeated,
    }
