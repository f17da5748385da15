"""Checking and repairing the values of a historian export, column by column: missing codes and empty cells,
decimal commas, physical bounds with a hint at a wrong unit or an error code, stuck sensors, and the report's
line for every repair of the import (a DST placement too). It is apart from ``plant.export_reader`` (the file,
its records and timestamps) because what a value means (units, codes, a sensor's behaviour) changes for other
reasons than how an export is laid out. The refusals both collect (``ImportRefused``, ``Problems``) live here,
so imports flow one way: export_reader imports this module, never the reverse.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from plant.catalog import Catalog, MissingCode, Variable

MISSING = {"", "nan", "NaN", "NA", "null", "None"}  # empty cells: missing without a word
DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")  # 761,7996: a European export's number
SHOWN = 50  # refusals listed one by one; the rest are counted
UNIT_FACTORS = (1000.0, 3.6, 24.0, 60.0, 100.0, 1440.0, 3600.0, 86400.0)  # mg/g, m3/h-l/s, per day-hour-minute, %
PLAIN_FACTORS = (1000.0, 100.0)  # mg/g, l/m3, %: any unit; the others are per-time (m3/h - l/s, per day-hour-minute)
RATE_UNIT = re.compile(r"/\s*(s|sec|min|h|hr|d|day)\b|\b(s|min|h|d)\s*(-1|\^-1|⁻¹)")  # m3/h, 1/d, h-1
TEMPERATURE_UNIT = re.compile(r"°|deg\s*C|^\s*C\s*$|celsius|kelvin|^\s*K\s*$", re.IGNORECASE)
MASS_UNIT = re.compile(r"g|l|m3|%|mol|ppm", re.IGNORECASE)  # a concentration or amount: no time, no kelvin
KELVIN = 273.15  # a temperature in K where the catalog has degrees C


class ImportRefused(ValueError):
    """The export cannot be trusted as it is; the message lists every problem with file, row, column and value."""


class Problems:
    """What an import refuses, collected over the whole file so that one run reports all of it: the first
    ``SHOWN`` by row are listed, the rest counted by kind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept: dict[str, list[tuple[int, int, str]]] = {}  # kind -> its first SHOWN (row, column, message)
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, row: int, column: int, message: str) -> None:
        """``kind`` counts it ("values outside o2's bounds in column X"); ``message`` follows "row N "."""
        self.counts[kind] += 1
        kept = self.kept.setdefault(kind, [])
        if len(kept) < SHOWN:  # each kind keeps its first SHOWN by row, so the first SHOWN overall are among them
            kept.append((row, column, message))

    def raise_if_any(self) -> None:
        if not self.counts:
            return
        listed = sorted(item for kept in self.kept.values() for item in kept)[:SHOWN]
        total = sum(self.counts.values())
        lines = [f"{self.path}: {total} problem(s); nothing was imported"]
        lines += [f"  {self.path}: row {row} {message}" for row, _, message in listed]
        if total > len(listed):
            shown = Counter(kind for kind, kept in self.kept.items() for item in kept if item in listed)
            rest = [f"{n - shown[kind]} {kind}" for kind, n in self.counts.items() if n > shown[kind]]
            lines.append(f"  and {total - len(listed)} more: {'; '.join(rest)}")
        raise ImportRefused("\n".join(lines))


def read_values(
    cells: list[Any],
    rows: np.ndarray,
    v: Variable,
    c: int,
    catalog: Catalog,
    problems: Problems,
    repairs: list[dict[str, Any]],
) -> np.ndarray:
    """One column as floats, NaN where empty or a declared missing code (counted per code for the report)."""
    numbers, texts = catalog.codes_for(v)
    out = np.full(len(cells), np.nan)
    seen: dict[MissingCode, list[int]] = {}  # code -> [count, first row, last row]
    for i, cell in enumerate(cells):
        code: MissingCode | None = None
        if cell is None:
            continue
        if isinstance(cell, str):
            text = cell.strip()
            if text in MISSING:
                continue
            code = texts.get(text.casefold())
        if code is None:
            try:
                value = float(cell)
                # No sensor reads infinity: a historian's overflow, unless the catalog lists it as a code.
                unread = f"{cell!r} is not a finite number" if math.isinf(value) and value not in numbers else ""
            except (TypeError, ValueError):
                unread = f"cannot parse {cell!r}"
            if unread:
                decimal_comma = isinstance(cell, str) and DECIMAL_COMMA.fullmatch(cell.strip())
                hint = (
                    "a decimal comma: write the export with '.' as the decimal mark"
                    if decimal_comma
                    else "if the historian writes it for a missing value, list it in the catalog's missing_codes"
                )
                problems.add(
                    f"values that do not parse in column {v.source_column}",
                    rows[i],
                    c,
                    f"column {v.source_column}: {unread} ({hint})",
                )
                continue
            if math.isnan(value):
                continue  # NaN in a Parquet float column: missing
            if value not in numbers:
                out[i] = value
                continue
            code = value
        count = seen.setdefault(code, [0, int(rows[i]), 0])
        count[0] += 1
        count[2] = int(rows[i])
    for code, (count, first, last) in seen.items():
        repairs.append(
            {
                "kind": "missing_code",
                "variable": v.name,
                "column": v.source_column,
                "code": code,
                "records": count,
                "first_row": first,
                "last_row": last,
            }
        )
    return out


def check_bounds(col: np.ndarray, rows: np.ndarray, v: Variable, c: int, problems: Problems) -> None:
    bad = np.flatnonzero((col < v.min) | (col > v.max))
    typical = float(np.median(col[bad])) if len(bad) else 0.0  # the level of what is out, for the unit hint
    kind = f"values outside {v.name}'s physical bounds in column {v.source_column}"
    for i in bad:
        value = float(col[i])
        problems.add(
            kind,
            rows[i],
            c,
            f"column {v.source_column}: {value:g} is outside {v.name}'s physical bounds [{v.min:g}, {v.max:g}] "
            f"{v.unit}{bounds_hint(value, v, typical)}",
        )


def looks_like_code(value: float) -> bool:
    """-9999, 99999, 1e6, -1e30: the powers of ten and all-nines numbers historians write for "no value"."""
    a = abs(value)
    if a < 999 or a != math.floor(a):
        return False
    if a > 1e300:
        return True
    return any(float(10 ** round(math.log10(b))) == b for b in (a, a + 1))


def bounds_hint(value: float, v: Variable, typical: float) -> str:
    """Why a value may be outside the bounds: an error code, or a wrong unit where a common factor (or kelvin's
    offset) brings it inside them, only for values far outside (more than the bounds' width beyond them). Every
    conversion that brings it inside them, clear of their edges (1% of their width), is named, the one that brings
    the ``typical`` (median) value outside the bounds nearest their middle first: naming that one alone said
    / 3.6 for a flow in m3/d where the catalog has m3/h (/ 24). Per-time factors only for a rate's unit (m3/h,
    1/d), kelvin only for a temperature's (an unknown or empty unit: all)."""
    if looks_like_code(value):
        return " (a historian error code? list it in the catalog's missing_codes)"
    width, middle = v.max - v.min, (v.min + v.max) / 2
    if v.min - width <= value <= v.max + width:
        return ""
    rate, temperature = RATE_UNIT.search(v.unit), TEMPERATURE_UNIT.search(v.unit)
    known = rate or temperature or MASS_UNIT.search(v.unit)
    factors = [f for f in UNIT_FACTORS if (f in PLAIN_FACTORS and not temperature) or rate or not known]
    conversions = [(f"/ {f:g}", lambda x, f=f: x / f) for f in factors]
    conversions += [(f"x {f:g}", lambda x, f=f: x * f) for f in factors]
    if temperature or not known:
        conversions += [(f"- {KELVIN:g}", lambda x: x - KELVIN)]
    edge = 0.01 * width
    fits = sorted(
        (abs(convert(typical) - middle), name, convert(value))
        for name, convert in conversions
        if v.min + edge <= convert(value) <= v.max - edge
    )
    if not fits:
        return ""
    named = [f"{name} = {scaled:.4g}" for _, name, scaled in fits]
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"
    return f" ({value:g} {listed} is inside them: a wrong unit?)"


def remove_flat_runs(
    col: np.ndarray, utc: np.ndarray, rows: np.ndarray, v: Variable, zone: str, sample_minutes: float = 15
) -> list[dict[str, Any]]:
    """A stuck sensor: identical values over more than ``v.max_flat_minutes`` (from the run's first record to its
    last; missing cells in between do not end it, but a gap longer than the import bridges does: the same value
    before and after a night's outage is no stuck sensor). Its first record is kept (the last value really
    measured), the rest set to missing, in place. Returns one repair per run."""
    idx = np.flatnonzero(np.isfinite(col))
    if len(idx) < 2:
        return []
    vals = col[idx]
    outage = np.diff(utc[idx]) > max(v.max_gap_minutes, sample_minutes) * 60
    change = np.flatnonzero((vals[1:] != vals[:-1]) | outage) + 1
    starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(idx)]]) - 1
    long = utc[idx[ends]] - utc[idx[starts]] > v.max_flat_minutes * 60
    tz = zoneinfo.ZoneInfo(zone)
    out = []
    for a, b in zip(idx[starts[long]], idx[ends[long]], strict=True):
        span = col[a + 1 : b + 1]
        n = int(np.isfinite(span).sum())
        out.append(
            {
                "kind": "stuck",
                "variable": v.name,
                "column": v.source_column,
                "value": float(col[a]),
                "first_row": int(rows[a]),
                "last_row": int(rows[b]),
                "from": datetime.fromtimestamp(utc[a], tz).isoformat(),
                "to": datetime.fromtimestamp(utc[b], tz).isoformat(),
                "minutes": float((utc[b] - utc[a]) / 60),
                "records": n,
            }
        )
        span[:] = np.nan
    return out


def describe(repair: dict[str, Any]) -> str:
    """One line of the import's report for a repair."""
    r, rows = repair, f"rows {repair['first_row']}-{repair['last_row']}"
    if r["kind"] == "missing_code":
        code = f"{r['code']:g}" if isinstance(r["code"], float) else repr(r["code"])
        return f"column {r['column']}: {code} read as missing in {r['records']} record(s), {rows}"
    if r["kind"] == "stuck":
        return (
            f"column {r['column']}: stuck at {r['value']:g} for {r['minutes'] / 60:.1f} h ({rows}, {r['from']} .. "
            f"{r['to']}, longer than its max_flat_minutes): {r['records']} record(s) after the first set to missing"
        )
    return (
        f"column {r['column']}: {rows} lie in the hour the DST change repeats in {r['zone']}: placed by their order, "
        f"{r['first_hour']} before the clocks went back and {r['second_hour']} after"
    )
