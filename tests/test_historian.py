"""A plant's own data: catalogs, the historian import (resampling, gaps, refusals, DST), training with missing
data, and a model of another plant served by the real service."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch

from plant import example_export as example
from plant import export_reader as export
from plant import export_values
from plant import historian as hist
from plant.catalog import BSM1, CatalogError, catalog_from_dict, load_catalog
from plant.scenarios import DataError, load_scenario

BERLIN_CATALOG = """
name = "small"
sample_minutes = 15
timezone = "Europe/Berlin"

[[variables]]
name = "flow"
unit = "m3/d"
description = "influent flow"
role = "disturbance"
min = 0
max = 100000
max_gap_minutes = 30

[[variables]]
name = "oxygen"
column = "DO [mg/l]"
unit = "g O2/m3"
description = "dissolved oxygen"
role = "measurement"
min = 0
max = 20

[[variables]]
name = "air"
unit = "1/d"
description = "aeration"
role = "control"
min = 0
max = 360
"""


@pytest.fixture
def small(tmp_path: Path):
    path = tmp_path / "small.toml"
    path.write_text(BERLIN_CATALOG)
    return load_catalog(path)


def write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.write_text("timestamp,flow,DO [mg/l],air\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


def regular(start: datetime, n: int, minutes: int = 15) -> list[tuple[str, str, str, str]]:
    return [((start + timedelta(minutes=minutes * k)).isoformat(), f"{1000 + k}", "2.0", "100") for k in range(n)]


def test_bsm1_catalog_file_is_the_simulators() -> None:
    assert len(BSM1.targets) == 17 and BSM1.control_names == ("KLa_3", "KLa_4", "KLa_5", "Q_intr")
    assert [v.name for v in BSM1.targets if v.role == "disturbance"] == ["Q_in", "COD_in", "TSS_in", "SNH_in"]
    assert catalog_from_dict(BSM1.to_dict()).to_dict() == BSM1.to_dict()  # card round trip


def test_catalog_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BERLIN_CATALOG.replace('role = "measurement"', 'role = "sensor"'))
    with pytest.raises(CatalogError, match=r"bad\.toml: variable 2 \(oxygen\): role 'sensor'"):
        load_catalog(bad)
    bad.write_text(BERLIN_CATALOG.replace('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"'))
    with pytest.raises(CatalogError, match="unknown time zone 'Mars/Olympus'"):
        load_catalog(bad)
    bad.write_text(BERLIN_CATALOG.replace("max = 20", "max = -1"))
    with pytest.raises(CatalogError, match=r"oxygen\): min 0.0 must be below max -1.0"):
        load_catalog(bad)
    # A 5-minute plant would train with its "yesterday" 8 h back and its daily modes three times a day.
    bad.write_text(BERLIN_CATALOG.replace("sample_minutes = 15", "sample_minutes = 5"))
    with pytest.raises(CatalogError, match=r"bad\.toml: sample_minutes must be 15, got 5: the model counts"):
        load_catalog(bad)


def test_catalog_refuses_unknown_keys_at_every_level_by_name(tmp_path: Path) -> None:
    """A misspelt setting is never ignored: at the top level, in a variable and in a loop, the key is named with
    the closest known one."""
    bad = tmp_path / "bad.toml"
    bad.write_text('timestamp_colum = "Time"\n' + BERLIN_CATALOG)
    with pytest.raises(
        CatalogError, match=r"bad\.toml: unknown key\(s\) 'timestamp_colum' \(did you mean 'timestamp_column'"
    ):
        load_catalog(bad)
    bad.write_text(BERLIN_CATALOG.replace("max = 20", "max = 20\nmax_flat_minute = 60"))
    with pytest.raises(CatalogError, match=r"variable 2 \(oxygen\): unknown key\(s\) 'max_flat_minute' \(did you"):
        load_catalog(bad)
    setpoint = '[[variables]]\nname = "o2_sp"\nunit = "g/m3"\ndescription = "DO setpoint"\nrole = "setpoint"\n'
    setpoint += "min = 0\nmax = 5\n"
    bad.write_text(BERLIN_CATALOG + setpoint + '[[loops]]\ncontroll = "air"\nsetpoint = "o2_sp"\n')
    with pytest.raises(CatalogError, match=r"loop 1: unknown key\(s\) 'controll' \(did you mean 'control'"):
        load_catalog(bad)
    for line, message in [
        ('timestamp_format = "dd.mm.yyyy"', r"timestamp_format 'dd\.mm\.yyyy' is not one of iso8601, epoch_seconds"),
        ("missing_codes = [true]", r"missing code True is neither a number nor a text"),
        ('missing_codes = "Bad"', r"missing_codes must be a list"),
        ('timestamp_column = "flow"', r"timestamp_column 'flow' is also a variable's column"),
    ]:
        bad.write_text(line + "\n" + BERLIN_CATALOG)
        with pytest.raises(CatalogError, match=message):
            load_catalog(bad)
    bad.write_text(BERLIN_CATALOG.replace('name = "small"', 'name = "Klaeranlage Nord"'))
    with pytest.raises(CatalogError, match=r"name 'Klaeranlage Nord' must be letters.*models/<name>"):
        load_catalog(bad)


def test_export_settings_and_flat_limits_round_trip_through_the_card_dict(tmp_path: Path) -> None:
    path = tmp_path / "plant.toml"
    text = 'timestamp_column = "Time"\ntimestamp_format = "epoch_seconds"\nmissing_codes = [-9999, "Bad", "1e6"]\n'
    path.write_text(text + BERLIN_CATALOG.replace("max = 20", "max = 20\nmax_flat_minutes = 90\nmissing_codes = [99]"))
    cat = load_catalog(path)
    assert cat.missing_codes == (-9999.0, "Bad", 1e6)  # a text that reads as a number is that number
    d = cat.to_dict()
    assert d["timestamp_column"] == "Time" and d["timestamp_format"] == "epoch_seconds"
    oxygen = d["measurements"][1]
    assert oxygen["max_flat_minutes"] == 90 and oxygen["missing_codes"] == [99.0]  # the card's variable entries
    assert catalog_from_dict(d).to_dict() == d


def test_fast_is_a_yes_or_no_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "plant.toml"
    path.write_text(BERLIN_CATALOG.replace("max = 20", "max = 20\nfast = true"))
    d = load_catalog(path).to_dict()
    assert d["measurements"][1]["fast"] is True and "fast" not in d["measurements"][0]
    assert catalog_from_dict(d).to_dict() == d
    path.write_text(BERLIN_CATALOG.replace("max = 20", 'max = 20\nfast = "yes"'))
    with pytest.raises(CatalogError, match=r"variable 2 \(\w+\): fast must be true or false, not 'yes'"):
        load_catalog(path)


def test_round_trip_simulate_export_import_gives_the_same_arrays(tmp_path: Path, tiny_data) -> None:
    """Simulated scenarios written as a historian export (exact values) and imported again: the same x, u and
    clock wherever nothing was dropped, and missing exactly where the scenarios leave a gap in time."""
    scenarios = [tiny_data[i] for i in EXAMPLE_SCENARIOS]
    table = tmp_path / "plant.csv"
    example.export_table(scenarios, BSM1, table, faults=False)
    manifest = hist.import_table(table, BSM1, tmp_path / "imported", history=16, horizon=16)
    x = np.concatenate([s.x for s in scenarios])
    u = np.concatenate([s.u for s in scenarios])
    minutes = np.concatenate([s.t_minutes for s in scenarios])
    parts = [load_scenario(tmp_path / "imported" / f"{k}.npz") for k in ("train", "val", "test")]
    imported = np.concatenate([p.t_minutes for p in parts])
    week = 7 * 1440
    for p in parts:
        for j, clock in enumerate(p.t_minutes):
            at = np.flatnonzero(np.isclose(minutes % week, clock % week))
            if len(at) == 0:  # a gap between scenarios: missing, never invented
                assert np.isnan(p.x[j]).all()
                continue
            assert np.allclose(p.x[j], x[at[0]], rtol=1e-8) and np.allclose(p.u[j], u[at[0]], rtol=1e-8)
    assert np.isclose(imported % week, minutes[0] % week).any()  # the clock is the scenarios' clock
    assert manifest["gap_between_splits"] == 32 and manifest["catalog"] == BSM1.to_dict() | {
        "optimizer": BSM1.optimizer.to_dict()
    }


def test_resampling_averages_each_interval_and_bridges_only_short_gaps(tmp_path: Path, small) -> None:
    t0 = datetime(2026, 5, 4, tzinfo=UTC)
    rows = []
    for k in range(0, 60 * 24):  # one record a minute, irregular: some minutes missing, some doubled
        if 300 <= k < 330 or 600 <= k < 700:
            continue  # a 30-minute and a 100-minute outage of everything
        rows.append(((t0 + timedelta(minutes=k, seconds=20)).isoformat(), f"{k}", "1.5", "100"))
    table = export.read_table(write_csv(tmp_path / "irregular.csv", rows), small)
    grid, _, values, report = hist.resample(table, small)
    assert np.all(np.diff(grid) == 900)
    # The value at t is the mean over (t - 15 min, t]: minutes 0..14 (at :20 s) land in the first slot.
    first = int(np.argmax(np.isfinite(values[:, 0])))
    assert values[first, 0] == pytest.approx(np.mean(np.arange(0, 15)))
    flow = values[:, 0]
    # 30-minute gap: 2 empty slots, bridged (max_gap_minutes = 30); the 100-minute one stays missing.
    assert np.isnan(flow).sum() in (6, 7) and report["flow"]["bridged_samples"] == 2
    assert np.isnan(values[:, 1]).sum() == np.isnan(flow).sum() + 2  # oxygen: no bridging allowed
    assert report["oxygen"]["missing_share"] > report["flow"]["missing_share"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("2026-05-04T00:00:00+00:00", "1000", "abc", "100")], r"row 2 column DO \[mg/l\]: cannot parse 'abc'"),
        ([("2026-05-04T00:00:00+00:00", "1000", "25", "100")], r"row 2 column DO \[mg/l\]: 25 is outside oxygen"),
        ([("2026-05-04T00:00:00+00:00", "inf", "2", "100")], r"row 2 column flow: 'inf' is not a finite number"),
        ([("2026-05-04T00:00:00+00:00", "1000", "2", "-Infinity")], r"row 2 column .*: '-Infinity' is not a finite"),
        ([("2026-05-04T00:00:00+00:00", "-3", "2", "100")], r"row 2 column flow: -3 is outside"),
        ([("yesterday", "1000", "2", "100")], r"row 2 column timestamp: cannot parse timestamp 'yesterday'"),
        (
            [("2026-05-04T00:15:00+00:00", "1", "2", "3"), ("2026-05-04T00:15:00+00:00", "1", "2", "3")],
            r"row 3 column timestamp: .* repeats row 2",
        ),
        (
            [("2026-05-04T00:15:00+00:00", "1", "2", "3"), ("2026-05-04T00:00:00+00:00", "1", "2", "3")],
            r"row 3 column timestamp: .* goes back in time from row 2",
        ),
        (
            [("2026-10-25T02:30:00", "1", "2", "3")],
            r"row 2 column timestamp: 2026-10-25T02:30:00 is repeated by the DST change",
        ),
        (
            [("2026-03-29T02:30:00", "1", "2", "3")],
            r"row 2 column timestamp: 2026-03-29T02:30:00 does not exist in Europe/Berlin",
        ),
    ],
)
def test_each_refusal_names_file_row_and_column(tmp_path: Path, small, rows, message) -> None:
    path = write_csv(tmp_path / "export.csv", rows)
    with pytest.raises(export.ImportRefused, match=r"export\.csv: " + message):
        export.read_table(path, small)


def test_one_run_reports_every_problem_with_file_row_column_and_value(tmp_path: Path, small) -> None:
    """Issue 30: one import run lists every refusal; the unit hint only where a factor of a common unit brings
    the value inside the bounds, the code hint for an error code, neither for a value just outside."""
    rows = regular(datetime(2026, 5, 4, tzinfo=UTC), 12)
    rows[1] = (rows[1][0], "1000", "Bad", "100")
    rows[2] = (rows[2][0], "1000", "-9999", "100")
    rows[3] = (rows[3][0], "1000", "2500", "100")
    rows[4] = (rows[4][0], "1000", "25", "100")
    rows[5] = (rows[5][0], "1e6", "2", "100")
    rows[6] = ("yesterday", "1000", "2", "100")
    rows[8] = (rows[7][0], "1000", "2", "100")
    rows[9] = (rows[9][0], "1000", "2")  # type: ignore[assignment]
    with pytest.raises(export.ImportRefused) as caught:
        export.read_table(write_csv(tmp_path / "export.csv", rows), small)
    text = str(caught.value)
    expected = [
        r"export\.csv: 8 problem\(s\); nothing was imported",
        r"export\.csv: row 3 column DO \[mg/l\]: cannot parse 'Bad' \(if the historian writes it for a missing value, "
        r"list it in the catalog's missing_codes\)",
        r"export\.csv: row 4 column DO \[mg/l\]: -9999 is outside oxygen's physical bounds \[0, 20\] g O2/m3 "
        r"\(a historian error code\? list it in the catalog's missing_codes\)\n",
        r"row 5 column DO \[mg/l\]: 2500 is outside .* \(2500 / 1000 = 2\.5 is inside them: a wrong unit\?\)",
        r"row 6 column DO \[mg/l\]: 25 is outside oxygen's physical bounds \[0, 20\] g O2/m3\n",
        r"row 7 column flow: 1e\+06 is outside flow's physical bounds .* \(a historian error code\?",
        r"row 8 column timestamp: cannot parse timestamp 'yesterday'",
        r"row 10 column timestamp: \S+ repeats row 9's",
        r"row 11 has 3 fields, the header 4",
    ]
    for pattern in expected:
        assert re.search(pattern, text), pattern
    assert text.count("wrong unit") == 1

    many = regular(datetime(2026, 5, 4, tzinfo=UTC), 130)
    many = [(t, f, "Bad" if k >= 10 else o, a) for k, (t, f, o, a) in enumerate(many)]
    with pytest.raises(export.ImportRefused) as caught:
        export.read_table(write_csv(tmp_path / "many.csv", many), small)
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("120 problem(s); nothing was imported") and len(lines) == 1 + export_values.SHOWN + 1
    assert lines[1].startswith(f"  {tmp_path / 'many.csv'}: row 12 column DO [mg/l]: cannot parse 'Bad'")
    assert lines[-1] == "  and 70 more: 70 values that do not parse in column DO [mg/l]"


def test_missing_codes_numbers_and_texts_are_read_as_missing_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "codes.toml"
    oxygen_codes = 'max = 20\nmissing_codes = [99, "Comm Fail"]'
    path.write_text('missing_codes = [-9999, "Bad"]\n' + BERLIN_CATALOG.replace("max = 20", oxygen_codes))
    catalog = load_catalog(path)
    rows = regular(datetime(2026, 5, 4, tzinfo=UTC), 10)
    rows[1] = (rows[1][0], "-9999.0", " bad ", "100")  # the catalog's codes in every column; texts case-folded
    rows[2] = (rows[2][0], "1000", "99", "-9999")
    rows[3] = (rows[3][0], "1000", "Comm Fail", "100")
    rows[4] = (rows[4][0], "1000", "Bad", "100")
    table = export.read_table(write_csv(tmp_path / "export.csv", rows), catalog)
    assert np.isnan(table.values["flow"]).sum() == 1 and np.isnan(table.values["air"]).sum() == 1
    assert np.flatnonzero(np.isnan(table.values["oxygen"])).tolist() == [1, 2, 3, 4]
    counted = {(r["column"], r["code"]): (r["records"], r["first_row"], r["last_row"]) for r in table.repairs}
    assert counted == {
        ("flow", -9999.0): (1, 3, 3),
        ("DO [mg/l]", "Bad"): (2, 3, 6),
        ("DO [mg/l]", 99.0): (1, 4, 4),
        ("DO [mg/l]", "Comm Fail"): (1, 5, 5),
        ("air", -9999.0): (1, 4, 4),
    }
    rows[5] = (rows[5][0], "1000", "2", "Comm Fail")  # oxygen's own code, not the aeration's
    with pytest.raises(export.ImportRefused, match=r"row 7 column air: cannot parse 'Comm Fail'"):
        export.read_table(write_csv(tmp_path / "export.csv", rows), catalog)
    # An overflow the historian writes as inf is refused, unless the catalog lists it as its code.
    rows[5] = (rows[5][0], "inf", "2", "100")
    with pytest.raises(export.ImportRefused, match=r"row 7 column flow: 'inf' is not a finite number"):
        export.read_table(write_csv(tmp_path / "export.csv", rows), catalog)
    path.write_text('missing_codes = [-9999, "Bad", "inf"]\n' + BERLIN_CATALOG.replace("max = 20", oxygen_codes))
    table = export.read_table(write_csv(tmp_path / "export.csv", rows), load_catalog(path))
    assert np.isnan(table.values["flow"]).sum() == 2
    assert {(r["column"], r["code"]) for r in table.repairs} >= {("flow", float("inf"))}


def test_a_stuck_sensor_is_set_to_missing_and_reported(tmp_path: Path) -> None:
    """Identical values for longer than max_flat_minutes (missing cells inside do not end the run): all but
    the first set to missing; a run just as long as the limit, or in a column without one, stays."""
    path = tmp_path / "flat.toml"
    path.write_text(BERLIN_CATALOG.replace("max = 20", "max = 20\nmax_flat_minutes = 60"))
    catalog = load_catalog(path)
    t0 = datetime(2026, 5, 4, tzinfo=UTC)
    rows = []
    for k in range(300):
        oxygen = "2.5" if 20 <= k <= 110 else ("3.5" if 150 <= k <= 210 else f"{2 + 0.001 * k:.3f}")
        rows.append(((t0 + timedelta(minutes=k)).isoformat(), "1000", "" if k == 50 else oxygen, "100"))
    table = export.read_table(write_csv(tmp_path / "export.csv", rows), catalog)
    gone = np.flatnonzero(np.isnan(table.values["oxygen"]))
    assert gone.tolist() == list(range(21, 111))  # row 50 was empty; 150..210 is exactly 60 minutes: kept
    assert np.isfinite(table.values["flow"]).all() and np.isfinite(table.values["air"]).all()
    [stuck] = table.repairs
    assert stuck["kind"] == "stuck" and stuck["column"] == "DO [mg/l]" and stuck["value"] == 2.5
    assert (stuck["first_row"], stuck["last_row"], stuck["records"], stuck["minutes"]) == (22, 112, 89, 90.0)
    assert "stuck at 2.5 for 1.5 h (rows 22-112" in export_values.describe(stuck)


def test_timestamp_column_and_format_come_from_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "plant.toml"
    t0 = datetime(2026, 10, 24, 23, 30, tzinfo=UTC)  # 01:30 CEST; the clocks go back at 01:00 UTC
    times = [t0 + timedelta(minutes=15 * k) for k in range(8)]
    for fmt, cells in [
        ("epoch_seconds", [f"{t.timestamp():.0f}" for t in times]),
        (
            "%d.%m.%Y %H:%M:%S%z",
            [t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%d.%m.%Y %H:%M:%S%z") for t in times],
        ),
    ]:
        path.write_text(f'timestamp_column = "Time"\ntimestamp_format = "{fmt}"\n' + BERLIN_CATALOG)
        csv = tmp_path / "export.csv"
        csv.write_text("Time,flow,DO [mg/l],air\n" + "".join(f"{c},1000,2,100\n" for c in cells))
        table = export.read_table(csv, load_catalog(path))
        assert table.utc.tolist() == [t.timestamp() for t in times]
        assert sorted(set(np.diff(table.clock).tolist())) == [-45.0, 15.0]  # the plant's clock goes back
    csv.write_text("timestamp,flow,DO [mg/l],air\n" + "".join(f"{c},1000,2,100\n" for c in cells))
    with pytest.raises(export.ImportRefused, match=r"export\.csv: no 'Time' column \(the catalog's timestamp_column"):
        export.read_table(csv, load_catalog(path))


def test_missing_column_is_refused(tmp_path: Path, small) -> None:
    path = tmp_path / "short.csv"
    path.write_text("timestamp,flow,air\n2026-05-04T00:00:00+00:00,1,2\n")
    with pytest.raises(
        export.ImportRefused, match=r"short\.csv: the catalog's column 'DO \[mg/l\]' is not in the file"
    ):
        export.read_table(path, small)
    # A renamed tag, or one with a trailing space: the column meant is named, and repr shows the space.
    path.write_text("timestamp,flow,DO [mg/l] ,air\n2026-05-04T00:00:00+00:00,1,2,3\n")
    with pytest.raises(export.ImportRefused, match=r"'DO \[mg/l\]' is not in the file \(is it 'DO \[mg/l\] '\?\)"):
        export.read_table(path, small)
    with pytest.raises(export.ImportRefused, match=r"nothing\.parquet: cannot read \(No such file\)"):
        export.read_table(tmp_path / "nothing.parquet", small)


def test_the_unit_hint_names_every_conversion_that_fits_the_column() -> None:
    """A recycle flow exported in m3/d was hinted '/ 1000' (the first factor that fit one value), a temperature in
    kelvin likewise; then an inflow in m3/d only '/ 3.6' (nearest the middle), not the true '/ 24'. Every factor of
    the unit's kind that brings the value well inside is named, nearest the middle of the bounds first."""
    from plant.catalog import Variable

    recycle, temperature = Variable("recycle", "m3/h", "", 0, 5000), Variable("temp", "degC", "", 0, 40)
    assert export_values.bounds_hint(21689.2, recycle, 21000.0) == (
        " (21689.2 / 24 = 903.7, / 60 = 361.5 or / 100 = 216.9 is inside them: a wrong unit?)"
    )
    assert (
        export_values.bounds_hint(289.85, temperature, 290.0)
        == " (289.85 - 273.15 = 16.7 is inside them: a wrong unit?)"
    )
    inflow = Variable("inflow", "m3/h", "", 0, 10000)
    assert export_values.bounds_hint(20016.0, inflow, 23600.0) == (
        " (20016 / 3.6 = 5560, / 24 = 834, / 60 = 333.6 or / 100 = 200.2 is inside them: a wrong unit?)"
    )
    oxygen = Variable("oxygen", "g O2/m3", "", 0, 20)  # a concentration: no per-time factor
    assert export_values.bounds_hint(2500.0, oxygen, 2500.0) == " (2500 / 1000 = 2.5 is inside them: a wrong unit?)"


def test_a_setpoint_logged_only_when_it_changes_is_held(tmp_path: Path) -> None:
    """A historian that records a setpoint only on change left it 95% missing (linear bridging ramps a step, and
    only across short gaps); fill = "hold" carries each value on, up to max_gap_minutes, past the last record too."""
    catalog_path = tmp_path / "held.toml"
    catalog_path.write_text(
        BERLIN_CATALOG
        + '[[variables]]\nname = "o2_sp"\nunit = "g O2/m3"\ndescription = "DO setpoint"\nrole = "setpoint"\n'
        + 'min = 0\nmax = 5\nmax_gap_minutes = 1440\nfill = "hold"\n'
    )
    catalog = load_catalog(catalog_path)
    assert catalog_from_dict(catalog.to_dict()).variables[-1].fill == "hold"
    rows = [(t, f, o, a, "") for t, f, o, a in regular(datetime(2026, 5, 4, tzinfo=UTC), 12)]
    rows[0] = (*rows[0][:4], "2.0")
    rows[5] = (*rows[5][:4], "1.5")  # changed at the sixth record, then never logged again
    path = tmp_path / "held.csv"
    path.write_text("timestamp,flow,DO [mg/l],air,o2_sp\n" + "\n".join(",".join(r) for r in rows) + "\n")
    _, _, values, _ = hist.resample(export.read_table(path, catalog), catalog)
    assert values[:, -1].tolist() == [2.0] * 5 + [1.5] * 7  # a step, not a ramp
    # The service holds a request's nulls the same way, before counting them as gaps.
    from service.inputs import Inputs, named_values
    from service.problems import Errors

    role = Inputs(["o2_sp"], (np.array([0.0]), np.array([5.0])), ["g O2/m3"], None, hold=np.array([96]))
    sent = {"o2_sp": [2.0, None, None, None, None, 1.5, None, None]}
    errors = Errors()
    assert named_values(sent, role, "series[0].setpoints", errors).ravel().tolist() == [2.0] * 5 + [1.5] * 3
    assert not errors.listed
    with pytest.raises(CatalogError, match=r"fill = \"hold\" and max_flat_minutes contradict each other"):
        catalog_from_dict(
            {
                **catalog.to_dict(),
                "measurements": [{**catalog.to_dict()["measurements"][0], "fill": "hold", "max_flat_minutes": 60}],
            }
        )
    with pytest.raises(CatalogError, match=r"fill 'ramp' is not one of linear, hold"):
        catalog_from_dict(
            {**catalog.to_dict(), "measurements": [{**catalog.to_dict()["measurements"][0], "fill": "ramp"}]}
        )


def test_a_decimal_comma_is_named_as_such(tmp_path: Path, small) -> None:
    """A quoted comma-separated export with decimal commas was told to list 761,7996 as a missing code."""
    path = tmp_path / "comma.csv"
    path.write_text('timestamp,flow,DO [mg/l],air\n2026-05-04T00:00:00+00:00,"761,7996",2,100\n')
    with pytest.raises(export.ImportRefused, match=r"cannot parse '761,7996' \(a decimal comma: write the export with"):
        export.read_table(path, small)


def test_an_empty_file_and_a_semicolon_export_are_named_as_such(tmp_path: Path, small) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(export.ImportRefused, match=r"empty\.csv: the file is empty \(no header row\)"):
        export.read_table(empty, small)
    german = tmp_path / "german.csv"
    german.write_text("timestamp;flow;DO [mg/l];air\n2026-05-04T00:00:00+00:00;1000;2,5;100\n")
    with pytest.raises(export.ImportRefused, match=r"german\.csv: no 'timestamp' column .*the header holds ';'"):
        export.read_table(german, small)


def test_impossible_windows_and_a_simulated_cache_are_refused_by_name(tmp_path: Path, capsys) -> None:
    """--history -30 imported overlapping blocks, --val nan crashed, --history 0 was the preset's silently; an
    import into the simulated cache overwrote its manifest, and training on that cache as an import crashed."""
    from training.data import main as data_main

    catalog = str(example.EXAMPLE_CATALOG)
    for flags, words in (
        (["--history", "-30"], "--history must be at least 2"),
        (["--history", "0"], "--history must be at least 2"),
        (["--horizon", "0"], "--horizon must be at least 1"),
        (["--val", "nan"], "--val and --test are shares"),
        (["--val", "0.6", "--test", "0.5"], "--val and --test are shares"),
    ):
        with pytest.raises(SystemExit):
            data_main(["import", "never-read.csv", "--catalog", catalog, *flags])
        assert words in capsys.readouterr().err
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = '{"config_hash": "x", "splits": {}, "scenarios": {}}'  # what training.data writes: no catalog
    (cache / "manifest.json").write_text(manifest)
    assert data_main(["import", "never-read.csv", "--catalog", catalog, "--out", str(cache)]) == 2
    assert "holds simulated BSM1 data, not an import" in capsys.readouterr().err
    assert (cache / "manifest.json").read_text() == manifest
    with pytest.raises(DataError, match="holds simulated BSM1 data, not an import"):
        hist.load_dataset(cache)


def test_dst_in_both_directions(tmp_path: Path, small) -> None:
    """Spring: local times without offset skip 02:00-03:00 and stay 15 minutes apart in real time. Autumn: the
    repeated hour comes with offsets. The grid is uniform in real time; the clock (the calendar's input) jumps
    an hour forward in spring and back in autumn, as the plant's wall clocks do."""
    spring = [(f"2026-03-29T01:{m:02d}:00", "1000", "2", "100") for m in (0, 15, 30, 45)]
    spring += [(f"2026-03-29T03:{m:02d}:00", "1000", "2", "100") for m in (0, 15, 30)]
    table = export.read_table(write_csv(tmp_path / "spring.csv", spring), small)
    assert np.all(np.diff(table.utc) == 900)
    assert sorted(set(np.diff(table.clock).tolist())) == [15.0, 75.0]
    zone = small.timezone
    start = datetime(2026, 10, 25, 0, 0, tzinfo=UTC)  # 02:00 CEST; the clocks go back at 01:00 UTC
    autumn = [
        (
            (start + timedelta(minutes=15 * k)).astimezone(ZoneInfo(zone)).isoformat(),
            "1",
            "2",
            "3",
        )
        for k in range(12)
    ]
    table = export.read_table(write_csv(tmp_path / "autumn.csv", autumn), small)
    assert np.all(np.diff(table.utc) == 900)
    assert sorted(set(np.diff(table.clock).tolist())) == [-45.0, 15.0]
    grid, clock, values, _ = hist.resample(table, small)
    assert sorted(set(np.diff(clock).tolist())) == [-45.0, 15.0]  # the grid keeps the jump back
    assert np.all(np.diff(grid) == 900) and np.isfinite(values).all()


def test_the_plants_clock_is_its_zones_however_the_export_writes_the_instants(tmp_path: Path, small) -> None:
    """The same instants written in UTC, with Berlin's offsets and as Berlin local times give the same clock (the
    calendar's input): a UTC export (Parquet's usual) trained on a day 1-2 h off, without a word."""
    start = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # across the autumn change
    instants = [start + timedelta(minutes=15 * k) for k in range(24)]
    clocks = []
    for name, text in (
        ("utc", lambda t: t.isoformat().replace("+00:00", "Z")),
        ("offset", lambda t: t.astimezone(ZoneInfo(small.timezone)).isoformat()),
        ("local", lambda t: naive(t)),
    ):
        rows = [(text(t), "1000", "2.0", "100") for t in instants]
        table = export.read_table(write_csv(tmp_path / f"{name}.csv", rows), small)
        assert np.all(table.utc == [t.timestamp() for t in instants])
        clocks.append(hist.resample(table, small)[1])
    assert np.array_equal(clocks[0], clocks[1]) and np.array_equal(clocks[1], clocks[2])
    local_midnight = datetime(2026, 10, 25, 0, 0) - export.CLOCK_EPOCH  # 22:00 UTC is Berlin's midnight (CEST)
    assert clocks[0][0] == local_midnight.total_seconds() / 60


def test_a_variable_never_measured_in_a_block_is_refused_by_name(tmp_path: Path, small) -> None:
    """A dead transmitter ("Bad" in every row) was imported without a word; training then ran to a model whose card
    no service could load (its scaler NaN). Refused, naming the column and the block."""
    rows = [(t, f, "", a) for t, f, _, a in regular(datetime(2026, 5, 4, tzinfo=UTC), 400)]
    with pytest.raises(export.ImportRefused) as refused:
        hist.import_table(write_csv(tmp_path / "dead.csv", rows), small, tmp_path / "out", history=8, horizon=4)
    message = str(refused.value)
    assert "column 'DO [mg/l]' (oxygen) has no value in the train block (2026-05-04" in message
    assert "has no value in the val block" in message and "has no value in the test block" in message
    assert "flow" not in message.split("\n", 1)[1] and not (tmp_path / "out").exists()
    # A setpoint never logged is left to training (it needs one only where the model reads setpoints).
    with_setpoint = tmp_path / "sp.toml"
    with_setpoint.write_text(
        BERLIN_CATALOG
        + '[[variables]]\nname = "o2_sp"\nunit = "g O2/m3"\ndescription = "DO setpoint"\nrole = "setpoint"\n'
        + "min = 0\nmax = 5\n"
    )
    alive = [(t, f, "2.0", a, "") for t, f, _, a in rows]
    path = tmp_path / "no_setpoint.csv"
    path.write_text("timestamp,flow,DO [mg/l],air,o2_sp\n" + "\n".join(",".join(r) for r in alive) + "\n")
    hist.import_table(path, load_catalog(with_setpoint), tmp_path / "sp-out", history=8, horizon=4)
    # Measured in training but not after: a target the test block cannot score.
    rows = [(t, f, "2.0" if k < 300 else "", a) for k, (t, f, _, a) in enumerate(rows)]
    with pytest.raises(export.ImportRefused, match=r"\(oxygen\) has no value in the test block"):
        hist.import_table(write_csv(tmp_path / "late.csv", rows), small, tmp_path / "out", history=8, horizon=4)


def naive(t: datetime) -> str:
    return t.astimezone(ZoneInfo("Europe/Berlin")).replace(tzinfo=None).isoformat()


def test_the_repeated_autumn_hour_is_placed_from_its_neighbours(tmp_path: Path, small) -> None:
    """Issue 30: local times without offset that the autumn change repeats are placed by the order of the
    records (the clock going back marks the second hour) or by neighbours that carry offsets."""
    start = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # 00:00 CEST
    every = [start + timedelta(minutes=5 * k) for k in range(60)]  # to 04:55 CET: 02:00-02:55 twice
    table = export.read_table(write_csv(tmp_path / "naive.csv", [(naive(t), "1000", "2", "100") for t in every]), small)
    assert table.utc.tolist() == [t.timestamp() for t in every]
    [placed] = table.repairs
    assert (placed["first_row"], placed["last_row"], placed["first_hour"], placed["second_hour"]) == (26, 49, 12, 12)
    assert "placed by their order, 12 before the clocks went back and 12 after" in export_values.describe(placed)
    grid, clock, _, _ = hist.resample(table, small)
    assert np.all(np.diff(grid) == 900) and sorted(set(np.diff(clock).tolist())) == [-45.0, 15.0]

    for offset, hour in (("+02:00", 0), ("+01:00", 1)):  # one record without offset between two with
        rows = [
            (f"2026-10-25T02:15:00{offset}", "1", "2", "3"),
            ("2026-10-25T02:30:00", "1", "2", "3"),
            (f"2026-10-25T02:45:00{offset}", "1", "2", "3"),
        ]
        table = export.read_table(write_csv(tmp_path / "mixed.csv", rows), small)
        assert np.all(np.diff(table.utc) == 900) and table.repairs[0]["second_hour"] == hour


def test_the_repeated_hour_is_refused_only_when_nothing_tells_which_it_is(tmp_path: Path, small) -> None:
    """One pass of the repeated hour exported (the historian lost the other), nothing around it with an
    offset: either hour keeps the records in order, so each of its rows is refused by name."""
    times = ["01:45", "02:00", "02:15", "02:30", "02:45", "03:00"]
    rows = [(f"2026-10-25T{t}:00", "1000", "2", "100") for t in times]
    with pytest.raises(export.ImportRefused) as caught:
        export.read_table(write_csv(tmp_path / "one-pass.csv", rows), small)
    text = str(caught.value)
    assert "4 problem(s)" in text
    for row, t in zip(range(3, 7), times[1:5], strict=True):
        assert (
            f"row {row} column timestamp: 2026-10-25T{t}:00 is repeated by the DST change in Europe/Berlin, and "
            "neither its neighbours' offsets nor the order of the records tell which of the two hours it is"
        ) in text


def test_masked_losses_ignore_what_was_not_measured() -> None:
    """Changing a prediction where the target is missing changes nothing; the forecast loss over a batch with
    gaps is the mean over what was measured."""
    from training.config import ModelConfig, TrainConfig
    from training.model import KoVAE, masked_mse

    target = torch.tensor([[1.0, float("nan")], [3.0, 4.0]])
    pred = torch.zeros(2, 2)
    base = masked_mse(pred, target)
    pred[0, 1] = 1e6  # under the mask
    assert masked_mse(pred, target) == base == pytest.approx((1 + 9 + 16) / 3)

    torch.manual_seed(0)
    model = KoVAE(3, 2, ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0)).eval()
    x, u = torch.randn(4, 30, 3), torch.randn(4, 30, 2)
    x_fut = x[:, 20:].clone()
    x_fut[0, :5, 1] = float("nan")
    x_hist = x[:, :20].clone()
    x_hist[1, -6:, 2] = float("nan")  # a sensor gap at the end of one history
    with torch.no_grad():
        losses = model.losses(x_hist, u[:, :20], x_fut, u[:, 20:], TrainConfig())
        served = model.forecast(x_hist, u[:, :20], u[:, 20:], residual_decay=model.residual_decay())
    assert all(torch.isfinite(v) for v in losses.values())
    seen = torch.isfinite(x_fut)
    per_step = torch.where(seen, served - torch.nan_to_num(x_fut), 0.0).pow(2).sum((0, 2)) / seen.sum((0, 2))
    assert float(losses["pred"]) == pytest.approx(float(per_step.mean()), rel=1e-5)
    assert torch.isfinite(served).all()
    # The horizon-step weights come from persistence's error on the training windows: gaps are left out.
    from training.loop import step_weights

    weights = step_weights(x_hist, x_fut, power=1.0)
    assert torch.isfinite(weights).all() and weights.mean() == pytest.approx(1.0)


def test_sensor_gap_augmentation_spares_the_calendar() -> None:
    from training.loop import with_sensor_gaps

    x, u = torch.zeros(200, 16, 3), torch.zeros(200, 16, 2 + 4)  # 2 controls, 4 calendar columns
    gx, gu = with_sensor_gaps(x, u, n_controls=2, share=0.5, gen=torch.Generator().manual_seed(0))
    hit = torch.isnan(gx).any((1, 2)) | torch.isnan(gu).any((1, 2))
    assert 70 < int(hit.sum()) < 130 and not torch.isnan(gu[..., 2:]).any()
    assert torch.isnan(gx[:, -1]).any() and not torch.isnan(x).any()  # some gaps reach the last step; copies


# Three consecutive BSM2 windows of the tiny preset (the held-out two under their policies): a plant that changed
# how it runs along the way, as plants do.
EXAMPLE_SCENARIOS = ("bsm2-00", "bsm2-01@moving_setpoints", "bsm2-02@constant_setpoints")


def test_the_example_plants_export_imports_in_one_run_and_reports_every_repair(
    tmp_path: Path, tiny_data, capsys
) -> None:
    """Issue 30's export as a plant's historian writes it (tag names, a Time column in naive local time across
    the autumn change, 5- and 1-minute records, -9999, 1e6, "Bad" and "I/O Timeout", a stuck analyser, an
    outage) imports in one run with the example catalog, and its report lists every repair as written."""
    from training.config import ConfigError, load_config
    from training.data import load_data
    from training.data import main as data_main

    csv = tmp_path / "plant.csv"
    truth = example.export_plant([tiny_data[i] for i in EXAMPLE_SCENARIOS], csv)
    out = tmp_path / "imported"
    catalog = str(example.EXAMPLE_CATALOG)
    assert data_main(["import", str(csv), "--catalog", catalog, "--out", str(out), "--preset", "tiny"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    repairs = manifest["repairs"]
    codes = {(r["column"], r["code"]): r["records"] for r in repairs if r["kind"] == "missing_code"}
    written = {
        (column, float(code) if code[-1].isdigit() else code): n
        for column, by_code in truth["codes"].items()
        for code, n in by_code.items()
    }
    assert codes == written and len(written) == 8
    [stuck] = [r for r in repairs if r["kind"] == "stuck"]
    assert {k: stuck[k] for k in truth["stuck"]} == truth["stuck"] and stuck["minutes"] >= 24 * 60
    [dst] = [r for r in repairs if r["kind"] == "dst_repeated_hour"]
    assert [dst["first_row"], dst["last_row"]] == truth["repeated_hour_rows"][::119]
    assert dst["first_hour"] == dst["second_hour"] == 60  # 1-minute records by then
    assert len(repairs) == len(written) + 2
    for r in repairs:
        assert export_values.describe(r) in printed
    assert "history 20 + horizon 16 samples, the tiny preset's" in printed and manifest["gap_between_splits"] == 36
    assert manifest["missing"]["no3_out"]["missing_share"] > 0.08  # the half-day outage of 6 days
    # A run with longer windows than the import was made for is refused, with what to do.
    cfg = load_config("default", overrides=["data.source=historian", f"data.cache_dir={out}"])
    with pytest.raises(ConfigError, match=r"imported for history \+ horizon = 36 samples, this run's are 128 \+ 96"):
        load_data(cfg)
    with pytest.raises(ConfigError) as refused:
        load_data(cfg)
    again = (
        f"python -m training.data import {csv} --catalog YOUR_CATALOG.toml --out {out} --history 128 --horizon 96 "
        "--val 0.15 --test 0.15"
    )
    assert str(refused.value).endswith(again)


@pytest.mark.slow
def test_a_new_plants_first_model_is_served_by_the_readme_flow(
    tmp_path: Path, tiny_data, trained_store, serve, monkeypatch, capsys
) -> None:
    """Issue 30: in a folder whose models/ serves the BSM1 plant, a new plant goes from its export to a served
    model with the README's commands (--force: a first model must beat the naive forecasts, the tiny one does not):
    its models live in models/<catalog name>, its next version
    is compared with its first, and a run told to use BSM1's store says why it is not comparable."""
    from training.data import main as data_main
    from training.promote import main as promote_main
    from training.run import main as run_main

    shutil.copytree(trained_store[0], tmp_path / "models")
    bsm1_current = (tmp_path / "models" / "CURRENT").read_text()
    monkeypatch.chdir(tmp_path)
    example.export_plant([tiny_data[i] for i in EXAMPLE_SCENARIOS], Path("plant.csv"))
    catalog = str(example.EXAMPLE_CATALOG)
    assert data_main(["import", "plant.csv", "--catalog", catalog, "--preset", "tiny"]) == 0
    assert f"--preset tiny --catalog {catalog} --data data_cache/import-plant" in capsys.readouterr().out
    train = ["--preset", "tiny", "--catalog", catalog, "--data", "data_cache/import-plant"]
    # The tiny example's model loses to the naive forecasts in its worst regime: not served as a first model...
    assert run_main([*train, "--run-dir", "runs/p0"]) == 0
    assert "no model was served, but score -" in capsys.readouterr().err
    store = tmp_path / "models" / "example-plant"
    assert not (store / "CURRENT").exists()
    # ... but with the README's --force.
    assert run_main([*train, "--run-dir", "runs/p1", "--force"]) == 0
    assert "serve it: KOVAE_MODEL_STORE=models/example-plant python -m service" in capsys.readouterr().err
    assert (store / "CURRENT").read_text().strip() == "p1"
    assert (tmp_path / "models" / "CURRENT").read_text() == bsm1_current  # BSM1's store untouched

    assert run_main([*train, "--run-dir", "runs/p2", "--no-promote"]) == 0
    gate = json.loads((store / "p2" / "gate.json").read_text())
    assert gate["served_version"] == "p1" and "on the same held-out windows" in gate["why"]
    # BSM1's store named by mistake: refused before training, not even with --force, nor by the promote CLI.
    for force in ([], ["--force"]):
        assert run_main([*train, "--run-dir", "runs/p3", "--store", "models", *force]) == 2
        err = capsys.readouterr().err
        assert "error: --store models: models serves v1, a model of catalog 'bsm1'; version p3 is one of" in err
        assert "this catalog's is models/example-plant" in err
        assert not (tmp_path / "runs" / "p3" / "checkpoints").exists() and not (tmp_path / "models" / "p3").exists()
    assert promote_main(["--store", "models", "--add", str(store / "p2"), "--promote"]) == 2
    assert "each catalog's models belong in a store of their own" in capsys.readouterr().err
    assert not (tmp_path / "models" / "p2").exists()
    assert (tmp_path / "models" / "CURRENT").read_text() == bsm1_current
    card = json.loads((store / "p1" / "card.json").read_text())
    measurements = {v["name"]: v for v in card["variables"]["measurements"]}
    assert list(measurements) == ["inflow", "nh4_in", "no3_bb2", "o2_bb5", "nh4_bb5", "nh4_out", "no3_out", "temp_bb5"]
    assert measurements["nh4_out"]["max_flat_minutes"] == 120 and card["catalog"]["timezone"] == "Europe/Berlin"
    assert "Missing data" in (store / "p1" / "report.md").read_text()
    server = serve(store)
    t0 = datetime(2026, 11, 2, tzinfo=UTC)
    L, H = card["history"]["length"], 4
    mean = {v["name"]: v["mean"] for v in [*card["variables"]["measurements"], *card["variables"]["controls"]]}
    body = {
        "horizon": H,
        "series": [
            {
                "timestamps": [(t0 + timedelta(minutes=15 * k)).isoformat() for k in range(L)],
                "measurements": {name: [mean[name]] * L for name in measurements},
                "controls": {name: [mean[name]] * L for name in ("air_bb5", "recycle")},
                "hold_controls": True,
            }
        ],
    }
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    forecast = r.json()["series"][0]["forecast"]
    assert set(forecast) == set(measurements) and len(forecast["nh4_out"]["mean"]) == H
    assert server.client.get("/model").json()["version"] == "p1"
    # The catalog's [optimizer] reaches the card, narrowed to the data: the new plant gets setpoint advice too.
    lo, hi = card["optimizer"]["setpoints"]["o2_sp_bb5"]
    assert 0.5 <= lo < hi <= 3.0 and card["optimizer"]["aeration_kw"] == {"air_bb5": 0.0198}
    series = {**body["series"][0], "setpoints": {"o2_sp_bb5": [(lo + hi) / 2] * L}}
    r = server.client.post("/optimize", json={"horizon": H, "series": series})
    assert r.status_code == 200, r.text
    advice = r.json()
    assert set(advice["plan"]["setpoints"]) == {"o2_sp_bb5"} and "air_bb5" in advice["forecast"]["variables"]
    assert [m["variable"] for m in advice["limits"]] == ["nh4_out"]


def test_parquet_export_with_nulls_reads_like_csv(tmp_path: Path, small) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = datetime(2026, 5, 4, tzinfo=UTC)
    times = [t0 + timedelta(minutes=15 * k) for k in range(8)]
    flows = [1000.0 + k for k in range(8)]
    oxygen = [2.0, None, 2.2, 2.3, float("nan"), 2.5, 2.6, 2.7]
    table = pa.table({"timestamp": times, "flow": flows, "DO [mg/l]": oxygen, "air": [100.0] * 8})
    pq.write_table(table, tmp_path / "export.parquet")
    rows = [
        (t.isoformat(), str(f), "" if o is None or o != o else str(o), "100")
        for t, f, o in zip(times, flows, oxygen, strict=True)
    ]
    from_csv = export.read_table(write_csv(tmp_path / "export.csv", rows), small)
    from_parquet = export.read_table(tmp_path / "export.parquet", small)
    assert np.array_equal(from_parquet.utc, from_csv.utc) and np.array_equal(from_parquet.clock, from_csv.clock)
    for name in ("flow", "oxygen", "air"):
        assert np.array_equal(from_parquet.values[name], from_csv.values[name], equal_nan=True)
    assert np.isnan(from_parquet.values["oxygen"][[1, 4]]).all()
