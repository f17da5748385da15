"""Reading a plant's historian export into one checked table: its records (CSV or Parquet) and its timestamps
(time zone, DST, order); each column's values are checked and repaired by ``plant.export_values`` (missing codes,
decimal commas, physical bounds with unit hints, stuck sensors), and every refusal is collected in one pass.
``plant.historian`` resamples the table and writes the dataset.
"""

from __future__ import annotations

import csv
import difflib
import math
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.card import local_instants
from plant.catalog import Catalog
from plant.export_values import ImportRefused, Problems, check_bounds, read_values, remove_flat_runs

CLOCK_EPOCH = datetime(1970, 1, 5)  # a Monday: clock minutes count from here, so the week's calendar is right
CLOCK_EPOCH_S = CLOCK_EPOCH.replace(tzinfo=UTC).timestamp()
# Longer between two records is a mistyped timestamp (2062 for 2026), not an outage: the grid would span decades.
MAX_RECORD_GAP_DAYS = 31


@dataclass
class Table:
    """A historian export read into memory: UTC instants, local clock minutes and one float column each."""

    utc: np.ndarray  # (n,) seconds since 1970 UTC, strictly increasing
    clock: np.ndarray  # (n,) local wall-clock minutes since CLOCK_EPOCH (the calendar's input)
    values: dict[str, np.ndarray]  # variable name -> (n,) float, NaN where missing
    rows: np.ndarray  # (n,) the file's row number of each record (for messages)
    repairs: list[dict[str, Any]] = field(default_factory=list)  # what was read as missing or placed, and where


def read_table(path: Path, catalog: Catalog) -> Table:
    """Read a wide CSV or Parquet export in one pass; every problem of the file is reported at once. Only the
    catalog's columns are kept in memory: an export of hundreds of tags costs what its few catalog columns do."""
    wanted = [catalog.timestamp_column, *(v.source_column for v in catalog.variables)]
    columns, rows, broken = read_records(path, wanted)
    if not len(rows):
        raise ImportRefused(f"{path}: no records below the header")
    problems = Problems(path)
    for i, fields in broken.items():  # a wrong number of fields: refused once, read no further
        problems.add(
            "rows with a wrong number of fields", rows[i], -1, f"has {fields[0]} fields, the header {fields[1]}"
        )
    repairs: list[dict[str, Any]] = []
    utc, offset = read_times(columns[0], rows, catalog, problems, repairs, set(broken))
    values = {}
    for c, v in enumerate(catalog.variables, start=1):
        values[v.name] = read_values(columns[c], rows, v, c, catalog, problems, repairs)
        check_bounds(values[v.name], rows, v, c, problems)
    problems.raise_if_any()
    for v in catalog.variables:
        if v.max_flat_minutes > 0:
            repairs += remove_flat_runs(values[v.name], utc, rows, v, catalog.timezone, catalog.sample_minutes)
    return Table(utc, (utc + offset - CLOCK_EPOCH_S) / 60, values, rows, repairs)


def check_header(path: Path, header: list[str], wanted: list[str]) -> list[int]:
    """The position in ``header`` of each ``wanted`` column (the timestamp column first, then the catalog's);
    a column absent, or present twice (which of the two is the tag?), is refused by name."""
    if not header:
        raise ImportRefused(f"{path}: the file is empty (no header row)")
    time_col = wanted[0]
    absent = [col for col in wanted[1:] if col not in header]
    if time_col not in header or absent:
        why = [f"no {time_col!r} column (the catalog's timestamp_column)"] if time_col not in header else []
        for col in absent:  # a renamed tag, or a trailing space only repr shows
            close = difflib.get_close_matches(col, header, n=1, cutoff=0.6)
            why.append(
                f"the catalog's column {col!r} is not in the file" + (f" (is it {close[0]!r}?)" if close else "")
            )
        hint = ""
        if len(header) == 1 and ";" in header[0]:
            hint = "; the header holds ';': write the export comma-separated, with '.' as the decimal mark"
        raise ImportRefused(f"{path}: {'; '.join(why)} (columns: {', '.join(map(repr, header))}){hint}")
    twice = [col for col in wanted if header.count(col) > 1]
    if twice:
        where = "; ".join(
            f"{col!r} is column {' and '.join(str(i + 1) for i, h in enumerate(header) if h == col)}" for col in twice
        )
        raise ImportRefused(
            f"{path}: the header names a column twice ({where}): which one holds the data is unknown; export each "
            "tag once"
        )
    return [header.index(col) for col in wanted]


def read_records(path: Path, wanted: list[str]) -> tuple[list[list[Any]], np.ndarray, dict[int, tuple[int, int]]]:
    """(cells of each ``wanted`` column, the file's row number of each record, and the records with a wrong
    number of fields: index -> (fields, header's)) of a CSV or Parquet file; a blank line is no record."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return _parquet_records(path, wanted)
    columns: list[list[Any]] = [[] for _ in wanted]
    rows: list[int] = []
    broken: dict[int, tuple[int, int]] = {}
    start = 1  # the line the record being read starts on (a quoted field may span lines)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            at = check_header(path, header, wanted)
            width = len(header)
            start = reader.line_num + 1
            for row, rec in enumerate(reader, start=2):  # the header is row 1
                start = reader.line_num + 1  # where the next record starts: a csv.Error is raised reading it
                if not rec:
                    continue
                if len(rec) != width:
                    broken[len(rows)] = (len(rec), width)
                    rec = [""] * width
                rows.append(row)
                for cells, i in zip(columns, at, strict=True):
                    cells.append(rec[i])
    except OSError as exc:
        raise ImportRefused(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ImportRefused(f"{path}: not a UTF-8 CSV file ({exc})") from None
    except csv.Error as exc:
        raise ImportRefused(
            f"{path}: line {start}: not a well-formed CSV record ({exc}): an unmatched '\"' there? a quote opens a "
            "field that runs on until the next quote"
        ) from None
    return columns, np.array(rows, dtype=np.int64), broken


def _parquet_records(path: Path, wanted: list[str]) -> tuple[list[list[Any]], np.ndarray, dict[int, tuple[int, int]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportRefused(f"{path}: reading Parquet needs pyarrow (pip install -e '.[train]')") from None
    try:
        check_header(path, pq.read_schema(path).names, wanted)
        table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))  # only the catalog's columns
    except ImportRefused:
        raise
    except OSError as exc:
        if not path.is_file():
            raise ImportRefused(f"{path}: cannot read (No such file)") from None
        raise ImportRefused(f"{path}: unreadable Parquet ({exc})") from None
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise ImportRefused(f"{path}: unreadable Parquet ({exc})") from None
    columns = []
    for name in wanted:
        column = table.column(name)
        try:
            if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
                # Python's datetime holds microseconds: a sub-microsecond part is nothing on a 15-minute grid.
                column = column.cast(pa.timestamp("us", tz=column.type.tz), safe=False)
            columns.append(column.to_pylist())
        except Exception as exc:  # pyarrow's conversion errors (a type Python cannot hold)
            raise ImportRefused(f"{path}: column {name!r} ({column.type}) cannot be read ({exc})") from None
    return columns, np.arange(1, table.num_rows + 1), {}  # row 1: the first record


# ----------------------------------------------------------------------------- timestamps and DST


def read_times(
    cells: list[Any],
    rows: np.ndarray,
    catalog: Catalog,
    problems: Problems,
    repairs: list[dict[str, Any]],
    broken: set[int],
) -> tuple[np.ndarray, np.ndarray]:
    """(UTC seconds, UTC offset seconds of the plant's clock) per record. The plant's clock is the catalog's zone's
    wall clock at that instant, however the export writes it (local, with an offset, in UTC). A local time without
    offset is read in the catalog's zone; one that the autumn change repeats is placed by its neighbours
    (``place_repeated``)."""
    tz = zoneinfo.ZoneInfo(catalog.timezone)
    col, fmt = catalog.timestamp_column, catalog.timestamp_format
    n = len(cells)
    utc, offset = np.full(n, np.nan), np.zeros(n)
    repeated = np.full((n, 4), np.nan)  # a repeated local time's (first, second) instants and offsets
    for i, cell in enumerate(cells):
        where = f"column {col}: "
        if i in broken:
            continue
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            problems.add("records without a timestamp", rows[i], -1, where + "no timestamp")
            continue
        try:
            t = parse_timestamp(cell, fmt)
        except (ValueError, TypeError, OverflowError, OSError):
            expected = {"iso8601": "ISO 8601", "epoch_seconds": "seconds since 1970 UTC"}.get(fmt, repr(fmt))
            problems.add(
                "timestamps that do not parse",
                rows[i],
                -1,
                where + f"cannot parse timestamp {cell!r} ({expected} expected)",
            )
            continue
        if isinstance(t, float):  # epoch seconds: the plant's clock is the zone's local time at that instant
            utc[i], offset[i] = t, _offset(datetime.fromtimestamp(t, tz))
            continue
        if t.tzinfo is not None:  # that instant; the plant's clock is still its zone's (a UTC export reads the same)
            try:
                utc[i], offset[i] = t.timestamp(), _offset(t.astimezone(tz))
            except OverflowError:
                problems.add("timestamps out of range", rows[i], -1, where + f"{cell} is too near the year 1 or 9999")
            continue
        instants = [u.astimezone(tz) for u in local_instants(t, tz)]
        if not instants:
            problems.add(
                "local times skipped by the DST change",
                rows[i],
                -1,
                where + f"{cell} does not exist in {tz.key} (skipped by the DST change)",
            )
        elif len(instants) == 2:
            first, second = instants
            repeated[i] = first.timestamp(), second.timestamp(), _offset(first), _offset(second)
        else:
            utc[i], offset[i] = instants[0].timestamp(), _offset(instants[0])
    place_repeated(utc, offset, repeated, rows, cells, tz.key, col, problems, repairs)
    check_order(utc, rows, cells, col, problems)
    return utc, offset


def parse_timestamp(cell: Any, fmt: str) -> datetime | float:
    """A datetime (aware where the cell has an offset) or, for ``epoch_seconds``, UTC seconds."""
    if isinstance(cell, datetime):  # Parquet timestamps
        return cell
    if fmt == "epoch_seconds":
        value = float(cell)
        datetime.fromtimestamp(value, UTC)  # out of range raises
        if not math.isfinite(value):
            raise ValueError(cell)
        return value
    text = str(cell).strip()
    return datetime.fromisoformat(text) if fmt == "iso8601" else datetime.strptime(text, fmt)


def _offset(t: datetime) -> float:
    delta = t.utcoffset()
    return delta.total_seconds() if delta is not None else 0.0


def place_repeated(
    utc: np.ndarray,
    offset: np.ndarray,
    repeated: np.ndarray,
    rows: np.ndarray,
    cells: list[Any],
    zone: str,
    col: str,
    problems: Problems,
    repairs: list[dict[str, Any]],
) -> None:
    """Place local times of the hour the autumn change repeats. In a run of such records the first k are in the
    first hour and the rest in the second (real time never goes back); the k that keeps every timestamp, with
    its neighbours', strictly increasing is the answer. Only when several k do (one pass of the hour exported,
    nothing around it with an offset) is the run refused: nothing then tells the two hours apart."""
    amb = np.flatnonzero(np.isfinite(repeated[:, 0]))
    if not len(amb):
        return
    blocks = np.split(amb, np.flatnonzero(np.diff(amb) > 1) + 1)
    known = np.flatnonzero(np.isfinite(utc))
    for b in blocks:
        u0, u1 = repeated[b, 0], repeated[b, 1]
        n = len(b)
        before, after = known[known < b[0]], known[known > b[-1]]
        prev = utc[before[-1]] if len(before) else -np.inf
        nxt = utc[after[0]] if len(after) else np.inf
        rising0 = np.concatenate([[True], np.cumprod(np.diff(u0) > 0).astype(bool)])  # u0[:k] increasing, k >= 1
        rising1 = np.concatenate([np.cumprod((np.diff(u1) > 0)[::-1]).astype(bool)[::-1], [True]])  # u1[k:], k < n
        k = np.arange(n + 1)
        ok = np.concatenate([[True], rising0]) & np.concatenate([rising1, [True]])
        first = np.where(k > 0, u0[0], u1[0])
        last = np.where(k < n, u1[-1], u0[-1])
        ok &= (prev < first) & (last < nxt)
        ok[1:n] &= u0[: n - 1] < u1[1:]  # the junction: the first hour's last record before the second's first
        valid = np.flatnonzero(ok)
        if len(valid) == 1:
            split = int(valid[0])
            fold = (np.arange(n) >= split).astype(int)
            utc[b] = repeated[b, fold]
            offset[b] = repeated[b, 2 + fold]
            repairs.append(
                {
                    "kind": "dst_repeated_hour",
                    "column": col,
                    "zone": zone,
                    "first_row": int(rows[b[0]]),
                    "last_row": int(rows[b[-1]]),
                    "first_hour": split,
                    "second_hour": n - split,
                }
            )
            continue
        why = (
            "neither its neighbours' offsets nor the order of the records tell which of the two hours it is"
            if len(valid)
            else "in either hour it would go back in time from its neighbours"
        )
        for i in b:
            problems.add(
                "local times repeated by the DST change that cannot be placed",
                rows[i],
                -1,
                f"column {col}: {cells[i]} is repeated by the DST change in {zone}, and {why} "
                "(give timestamps with UTC offsets)",
            )


def check_order(utc: np.ndarray, rows: np.ndarray, cells: list[Any], col: str, problems: Problems) -> None:
    """Each timestamp must come after the previous one (records whose time is unknown are skipped), and no more
    than ``MAX_RECORD_GAP_DAYS`` after it: one mistyped year made a grid of decades, refused as a block without
    data or ending in an out-of-memory traceback."""
    known = np.flatnonzero(np.isfinite(utc))
    steps = np.diff(utc[known])
    for j in np.flatnonzero(steps > MAX_RECORD_GAP_DAYS * 86400):
        a, b = known[j], known[j + 1]
        days = steps[j] / 86400
        problems.add(
            "timestamps far from the previous record",
            rows[b],
            -1,
            f"column {col}: {cells[b]} is {days:.{0 if days >= 100 else 1}f} days after row {rows[a]}'s {cells[a]} "
            f"(more than {MAX_RECORD_GAP_DAYS}): a mistyped timestamp? (an outage that long: import the periods "
            "either side separately)",
        )
    for j in np.flatnonzero(steps <= 0):
        a, b = known[j], known[j + 1]
        what = "repeats" if steps[j] == 0 else "goes back in time from"
        problems.add(
            "timestamps out of order",
            rows[b],
            -1,
            f"column {col}: {cells[b]} {what} row {rows[a]}'s {cells[a]} (timestamps must increase)",
        )
