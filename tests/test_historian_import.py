"""The historian import's edges: a refused or interrupted import keeps the one before, catalog mistakes named as
such, and exports that are mistyped, coarse, wide, quoted wrong, nanosecond-stamped or cross a DST change in an
outage or in a zone whose clock moves by half an hour."""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from plant import export_reader as export
from plant import historian as hist
from plant.catalog import CatalogError, load_catalog
from plant.scenarios import DataError

PLANT_CATALOG = """
name = "review-plant"
sample_minutes = 15
timezone = "Europe/Berlin"
timestamp_column = "Time"
missing_codes = [-9999]

[[variables]]
name = "nh4"
column = "NH4"
unit = "mg/l"
description = "ammonium"
role = "measurement"
min = 0
max = 100
max_gap_minutes = 30

[[variables]]
name = "air"
column = "AIR"
unit = "Nm3/h"
description = "air"
role = "control"
min = 0
max = 1000
max_gap_minutes = 30
"""


def catalog(tmp_path: Path, text: str = PLANT_CATALOG, name: str = "plant.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_catalog(path)


def export_csv(
    path: Path,
    start: datetime,
    days: float,
    *,
    step: float = 5,
    zone: str = "Europe/Berlin",
    local: bool = True,
    cells=None,
    extra: int = 0,
) -> Path:
    """A ``Time,NH4,AIR`` export every ``step`` minutes from ``start`` (UTC), local times without offset or UTC
    with one; ``cells(i, t)`` may give a record's (nh4, air) texts, None to leave the record out."""
    tz = ZoneInfo(zone)
    lines = ["Time,NH4,AIR" + "".join(f",TAG{k:03d} [unit]" for k in range(extra))]
    for i in range(int(days * 1440 / step)):
        t = start + timedelta(minutes=step * i)
        values = cells(i, t) if cells else (f"{2 + math.sin(i / 20):.4f}", f"{100 + 50 * math.cos(i / 30):.3f}")
        if values is None:
            continue
        stamp = t.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if local else t.isoformat()
        lines.append(",".join([stamp, *values]) + "".join(f",{k * 0.1 + i:.2f}" for k in range(extra)))
    path.write_text("\n".join(lines) + "\n")
    return path


START = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)  # midnight in Berlin


def test_a_refused_or_interrupted_import_leaves_the_import_before_intact(tmp_path: Path, monkeypatch, capsys) -> None:
    """An import wrote its block files into --out one by one: one interrupted after train.npz (a full disk) left
    the folder mixing two imports, and load_dataset accepted it. Now it is written beside, checked and swapped in;
    a folder whose files are not the ones its manifest names is refused."""
    from training.data import main as data_main

    cat = catalog(tmp_path)
    out = tmp_path / "imp"
    first = hist.import_table(export_csv(tmp_path / "a.csv", START, 4), cat, out, history=20, horizon=16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = hist.save_scenario

    def disk_full_at_the_second_file(path, *args, **kwargs):  # the disk fills while val.npz is written
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, *args, **kwargs)

    monkeypatch.setattr(hist, "save_scenario", disk_full_at_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        hist.import_table(export_csv(tmp_path / "b.csv", START, 6), cat, out, history=20, horizon=16)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no half folder left
    _, data, manifest = hist.load_dataset(out, cat)
    assert manifest == first and len(data["train"].t_minutes) == first["scenarios"]["train"]["rows"]

    # A second import replaces the first whole; a file from the first one put back in is refused by name.
    second = tmp_path / "imp2"
    hist.import_table(export_csv(tmp_path / "b.csv", START, 6), cat, second, history=20, horizon=16)
    hist.import_table(tmp_path / "b.csv", cat, out, history=20, horizon=16)
    assert (out / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    (out / "val.npz").write_bytes(before["val.npz"])
    with pytest.raises(DataError, match=r"val\.npz: not the file this import wrote"):
        hist.load_dataset(out, cat)

    # --out naming a file, or a folder holding other things: one line, nothing touched.
    catalog_path = str(tmp_path / "plant.toml")
    (tmp_path / "a-file").write_text("x")
    code = data_main(["import", str(tmp_path / "a.csv"), "--catalog", catalog_path, "--out", str(tmp_path / "a-file")])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith(f"refused: {tmp_path / 'a-file'}: is a file, not a folder")
        and err.count("\n") == 1
    )
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    code = data_main(["import", str(tmp_path / "a.csv"), "--catalog", catalog_path, "--out", str(tmp_path / "work")])
    assert code == 2 and "holds 'notes.txt', not only an import's files" in capsys.readouterr().err
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_a_nan_missing_code_is_refused_as_such(tmp_path: Path) -> None:
    """missing_codes = [-9999, "NaN"] made every import fail with "imported with another catalog" (NaN != NaN
    after the manifest's JSON round trip); NaN cells are missing anyway."""
    text = PLANT_CATALOG.replace("missing_codes = [-9999]", 'missing_codes = [-9999, "NaN"]')
    with pytest.raises(CatalogError, match=r"plant\.toml: missing code 'NaN' is NaN: leave it out"):
        catalog(tmp_path, text)
    with pytest.raises(CatalogError, match=r"variable 1 \(nh4\): missing code nan is NaN"):
        catalog(tmp_path, PLANT_CATALOG.replace("max = 100\n", "max = 100\nmissing_codes = [nan]\n"))


def test_variables_written_as_one_table_or_a_list_are_named(tmp_path: Path) -> None:
    """[variables] instead of [[variables]] (or variables = ["nh4"]) raised a bare ValueError traceback."""
    single = PLANT_CATALOG.replace("[[variables]]", "[variables]", 1).split("[[variables]]")[0]
    with pytest.raises(CatalogError, match=r"variables must be \[\[variables\]\] tables.*not one table"):
        catalog(tmp_path, single)
    listed = PLANT_CATALOG.split("[[variables]]")[0] + 'variables = ["nh4"]\n'
    with pytest.raises(CatalogError, match=r"write \[\[variables\]\] \(double brackets\) above each, not \['nh4'\]"):
        catalog(tmp_path, listed)


def test_a_zone_name_in_the_timestamp_format_is_refused(tmp_path: Path) -> None:
    """%Z parsed 'CEST' on a machine in Berlin and failed elsewhere, and strptime ignored the zone it read."""
    text = 'timestamp_format = "%d.%m.%Y %H:%M:%S %Z"\n' + PLANT_CATALOG
    with pytest.raises(CatalogError, match=r"has %Z, a zone name .* use %z for an offset"):
        catalog(tmp_path, text)
    catalog(tmp_path, 'timestamp_format = "%d.%m.%Y %H:%M:%S %z"\n' + PLANT_CATALOG)  # an offset: read as such


def test_a_mistyped_year_is_refused_naming_both_records(tmp_path: Path) -> None:
    """One last record in 2062 made the grid span 36 years: the val block then had no value (a misleading
    refusal), and 9026 ran out of memory. Records more than a month apart are refused, with both rows."""
    cat = catalog(tmp_path)
    path = export_csv(tmp_path / "typo.csv", START, 4)
    path.write_text(path.read_text() + "2062-03-06 00:00:00,2.1,120\n")
    with pytest.raises(export.ImportRefused) as refused:
        hist.import_table(path, cat, tmp_path / "out", history=20, horizon=16)
    assert re.search(
        r"typo\.csv: row 1154 column Time: 2062-03-06 00:00:00 is 13149 days after row 1153's 2026-03-05 23:55:00 "
        r"\(more than 31\): a mistyped timestamp\?",
        str(refused.value),
    )
    assert not (tmp_path / "out").exists()
    # Records 20 days apart over 25 years: no gap too long, but a grid too large, refused before it is allocated.
    sparse = tmp_path / "sparse.csv"
    days = [datetime(2000, 1, 1) + timedelta(days=20 * k) for k in range(457)]
    sparse.write_text("Time,NH4,AIR\n" + "".join(f"{t:%Y-%m-%d %H:%M:%S},2,100\n" for t in days))
    with pytest.raises(export.ImportRefused, match=r"the export spans 25 years \(row 2 at 1999-12-31T23:00:00"):
        hist.resample(export.read_table(sparse, cat), cat)


def test_a_control_never_measured_in_a_later_block_is_refused_by_name(tmp_path: Path) -> None:
    """A control without values in the validation or test block was imported, and training failed later
    without naming it: its future is every window's input there."""
    cat = catalog(tmp_path)
    end = START + timedelta(days=3, hours=9)
    path = export_csv(tmp_path / "deadctl.csv", START, 4, cells=lambda i, t: ("2.0", "120" if t < end else "-9999"))
    with pytest.raises(export.ImportRefused, match=r"column 'AIR' \(air\) has no value in the test block \(2026-03"):
        hist.import_table(path, cat, tmp_path / "out", history=20, horizon=16)


def test_a_column_named_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    """An export with NH4 twice was read from the first silently; which one is the tag is unknown."""
    cat = catalog(tmp_path)
    path = tmp_path / "dup.csv"
    path.write_text("Time,NH4,AIR,NH4\n2026-03-02 00:00:00,2.0,150,-5\n")
    with pytest.raises(
        export.ImportRefused, match=r"dup\.csv: the header names a column twice \('NH4' is column 2 and 4\)"
    ):
        export.read_table(path, cat)
    path.write_text("Time,NH4,AIR,Time\n2026-03-02 00:00:00,2.0,150,x\n")
    with pytest.raises(export.ImportRefused, match=r"'Time' is column 1 and 4"):
        export.read_table(path, cat)


def test_a_stray_quote_is_named_with_its_line(tmp_path: Path) -> None:
    """A stray quote made the rest of the file one field: "field larger than field limit" was reported as "not
    a UTF-8 CSV file"."""
    cat = catalog(tmp_path)
    lines = [f"2026-03-02 {h:02d}:{m:02d}:00,2.0,150,{'x' * 200}" for h in range(24) for m in range(60)]
    lines[5] = lines[5].replace("2.0", '"2.0', 1)
    path = tmp_path / "quote.csv"
    path.write_text("Time,NH4,AIR,comment\n" + "\n".join(lines) + "\n")
    with pytest.raises(export.ImportRefused) as refused:
        export.read_table(path, cat)
    message = str(refused.value)
    assert message.startswith(f"{path}: line 7: not a well-formed CSV record (field larger than field limit")
    assert "an unmatched '\"' there?" in message and "UTF-8" not in message


def test_parquet_with_nanosecond_timestamps_reads_only_the_catalogs_columns(tmp_path: Path) -> None:
    """Nanosecond timestamps (pandas' default) crashed the import with a traceback, even in a column the catalog
    does not name: every column was converted, outside the refusal's try."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cat = catalog(tmp_path)
    t0 = np.datetime64("2026-03-02T00:00:00", "ns")
    times = t0 + np.arange(96 * 4) * np.timedelta64(15 * 60 * 10**9 + 7, "ns")  # a sub-microsecond part
    columns = {
        "Time": pa.array(times, pa.timestamp("ns", tz="UTC")),
        "NH4": pa.array(np.full(len(times), 2.0)),
        "AIR": pa.array(np.full(len(times), 120.0)),
        "logged": pa.array(times + np.timedelta64(3, "ns"), pa.timestamp("ns")),
    }
    pq.write_table(pa.table(columns), tmp_path / "ns.parquet")
    table = export.read_table(tmp_path / "ns.parquet", cat)
    assert table.utc[0] == datetime(2026, 3, 2, tzinfo=UTC).timestamp() and np.allclose(np.diff(table.utc), 900)
    assert set(table.values) == {"nh4", "air"}


def test_only_the_catalogs_columns_are_kept_while_reading(tmp_path: Path) -> None:
    """An export of hundreds of tags was kept whole in memory (every cell a Python string) to read two: the
    catalog's columns alone are kept, so a wide export costs about what a narrow one does."""
    cat = catalog(tmp_path)
    narrow = export_csv(tmp_path / "narrow.csv", START, 2, step=1)
    wide = export_csv(tmp_path / "wide.csv", START, 2, step=1, extra=100)
    peaks = []
    for path in (narrow, wide):
        tracemalloc.start()
        export.read_table(path, cat)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert wide.stat().st_size > 20 * narrow.stat().st_size
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_an_hourly_export_is_refused_naming_its_interval(tmp_path: Path, capsys) -> None:
    """An hourly export imported "successfully" with three of every four samples missing: no training window.
    Refused with its median interval, unless max_gap_minutes bridges it; the import reports the interval."""
    from training.data import main as data_main

    cat = catalog(tmp_path)
    path = export_csv(tmp_path / "hourly.csv", START, 20, step=60)
    with pytest.raises(export.ImportRefused) as refused:
        hist.import_table(path, cat, tmp_path / "out", history=20, horizon=16)
    assert re.search(
        r"hourly\.csv: its records are 60 minutes apart \(the median interval\), coarser than the catalog's "
        r"sample_minutes \(15\); between two records 3 sample\(s\) would stay missing in 'NH4' \(nh4, max_gap_minutes "
        r"30\), 'AIR' \(air",
        str(refused.value),
    )
    bridged = catalog(tmp_path, PLANT_CATALOG.replace("max_gap_minutes = 30", "max_gap_minutes = 60"), "wide-gap.toml")
    manifest = hist.import_table(path, bridged, tmp_path / "out", history=20, horizon=16)
    assert manifest["record_minutes"] == 60
    out = str(tmp_path / "out2")
    assert data_main(["import", str(path), "--catalog", str(tmp_path / "wide-gap.toml"), "--out", out]) == 0
    assert "records (one every 60 minutes, the median)" in capsys.readouterr().out


def test_the_same_value_either_side_of_an_outage_is_not_a_stuck_sensor(tmp_path: Path) -> None:
    """A flat run went on across a 10-hour outage: the same reading before and after it was set to missing as a
    stuck sensor. A gap longer than the import bridges ends the run; a real flat line still counts."""
    cat = catalog(tmp_path, PLANT_CATALOG.replace("max = 100\n", "max = 100\nmax_flat_minutes = 120\n"))
    outage = (START + timedelta(hours=30), START + timedelta(hours=40))

    def cells(i: int, t: datetime):
        if outage[0] <= t < outage[1]:
            return None
        nh4 = "2.5" if outage[0] - timedelta(minutes=90) <= t < outage[1] + timedelta(minutes=90) else f"{2 + i / 1e4}"
        return nh4, "100"

    table = export.read_table(export_csv(tmp_path / "flat.csv", START, 4, cells=cells), cat)
    assert np.isfinite(table.values["nh4"]).all() and table.repairs == []
    stuck = lambda i, t: ("3.5" if 100 <= i <= 200 else f"{2 + i / 1e4}", "100")  # noqa: E731 (8 h flat)
    table = export.read_table(export_csv(tmp_path / "stuck.csv", START, 4, cells=stuck), cat)
    assert [r["kind"] for r in table.repairs] == ["stuck"]


def test_the_clock_inside_an_outage_across_a_dst_change_is_the_zones(tmp_path: Path) -> None:
    """The clock of a grid point took the UTC offset of the last record before it: inside an outage across the
    autumn change the plant's clock was an hour off. It is the zone's wall time at every grid point."""
    cat = catalog(tmp_path, PLANT_CATALOG.replace("max_gap_minutes = 30", "max_gap_minutes = 0"))
    start = datetime(2026, 10, 23, 22, 0, tzinfo=UTC)
    outage = (datetime(2026, 10, 24, 20, 0, tzinfo=UTC), datetime(2026, 10, 25, 6, 0, tzinfo=UTC))

    def cells(i: int, t: datetime):
        return None if outage[0] <= t < outage[1] else ("2.0", f"{100 + i % 7}")

    table = export.read_table(export_csv(tmp_path / "gap.csv", start, 3, local=False, cells=cells), cat)
    grid, clock, _, _ = hist.resample(table, cat)
    berlin = ZoneInfo("Europe/Berlin")
    wall = [
        (datetime.fromtimestamp(t, berlin).replace(tzinfo=None) - export.CLOCK_EPOCH).total_seconds() / 60 for t in grid
    ]
    assert np.array_equal(clock, wall)
    assert sorted(set(np.diff(clock).tolist())) == [-45.0, 15.0]


@pytest.mark.parametrize(
    ("zone", "start"),
    [
        ("Australia/Lord_Howe", datetime(2026, 4, 3, tzinfo=UTC)),  # +11:00 -> +10:30 on 5 April
        ("America/Caracas", datetime(2016, 4, 30, tzinfo=UTC)),  # -4:30 -> -4:00 on 1 May 2016
    ],
)
def test_a_zone_whose_clock_moves_by_half_an_hour_imports_and_loads(tmp_path: Path, zone: str, start) -> None:
    """Lord Howe's DST change is 30 minutes, Caracas moved 30 minutes once: such imports were written, then
    refused by load_dataset ("samples are not 15 minutes apart", only 15 +- 60 allowed)."""
    cat = catalog(tmp_path, PLANT_CATALOG.replace('"Europe/Berlin"', f'"{zone}"'))
    path = export_csv(tmp_path / "zone.csv", start, 4, zone=zone, local=False)
    hist.import_table(path, cat, tmp_path / "out", history=20, horizon=16)
    _, data, _ = hist.load_dataset(tmp_path / "out", cat)
    steps = {float(s) for sd in data.values() for s in np.diff(sd.t_minutes)}
    assert steps == {15.0, 15.0 + (30 if zone == "America/Caracas" else -30)}


def test_load_dataset_refuses_a_manifest_whose_file_has_other_rows(tmp_path: Path) -> None:
    """An import from before the manifest kept each file's digest is still checked by its row count."""
    cat = catalog(tmp_path)
    out = tmp_path / "imp"
    hist.import_table(export_csv(tmp_path / "a.csv", START, 4), cat, out, history=20, horizon=16)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["scenarios"].values():
        entry.pop("sha256", None)
    manifest["scenarios"]["test"]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"test\.npz: \d+ rows, manifest\.json says \d+: a folder mixed"):
        hist.load_dataset(out, cat)
