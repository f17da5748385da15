"""A plant's own data: catalogs, the historian import (resampling, gaps, refusals, DST), training with missing
data, and a model of another plant served by the real service."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch

from plant import historian as hist
from plant.catalog import BSM1, CatalogError, catalog_from_dict, load_catalog
from plant.scenarios import load_scenario

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


def test_round_trip_simulate_export_import_gives_the_same_arrays(tmp_path: Path, tiny_data) -> None:
    """Simulated scenarios written as a historian export (exact values) and imported again: the same x, u and
    clock wherever nothing was dropped, and missing exactly where the scenarios leave a gap in time."""
    scenarios = [tiny_data[i] for i in ("bsm2-00", "bsm2-01", "bsm2-02")]
    table = tmp_path / "plant.csv"
    hist.export_table(scenarios, BSM1, table, faults=False)
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
    assert manifest["gap_between_splits"] == 32 and manifest["catalog"] == BSM1.to_dict()


def test_resampling_averages_each_interval_and_bridges_only_short_gaps(tmp_path: Path, small) -> None:
    t0 = datetime(2026, 5, 4, tzinfo=UTC)
    rows = []
    for k in range(0, 60 * 24):  # one record a minute, irregular: some minutes missing, some doubled
        if 300 <= k < 330 or 600 <= k < 700:
            continue  # a 30-minute and a 100-minute outage of everything
        rows.append(((t0 + timedelta(minutes=k, seconds=20)).isoformat(), f"{k}", "1.5", "100"))
    table = hist.read_table(write_csv(tmp_path / "irregular.csv", rows), small)
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
        ([("2026-05-04T00:00:00+00:00", "-3", "2", "100")], r"row 2 column flow: -3 is outside"),
        ([("yesterday", "1000", "2", "100")], r"row 2: cannot parse timestamp 'yesterday'"),
        (
            [("2026-05-04T00:15:00+00:00", "1", "2", "3"), ("2026-05-04T00:15:00+00:00", "1", "2", "3")],
            r"row 3 column timestamp: .* repeats row 2",
        ),
        (
            [("2026-05-04T00:15:00+00:00", "1", "2", "3"), ("2026-05-04T00:00:00+00:00", "1", "2", "3")],
            r"row 3 column timestamp: .* goes back in time from row 2",
        ),
        ([("2026-10-25T02:30:00", "1", "2", "3")], r"row 2: 2026-10-25T02:30:00 is repeated by the DST change"),
        ([("2026-03-29T02:30:00", "1", "2", "3")], r"row 2: 2026-03-29T02:30:00 does not exist in Europe/Berlin"),
    ],
)
def test_each_refusal_names_file_row_and_column(tmp_path: Path, small, rows, message) -> None:
    path = write_csv(tmp_path / "export.csv", rows)
    with pytest.raises(hist.ImportRefused, match=r"export\.csv: " + message):
        hist.read_table(path, small)


def test_missing_column_is_refused(tmp_path: Path, small) -> None:
    path = tmp_path / "short.csv"
    path.write_text("timestamp,flow,air\n2026-05-04T00:00:00+00:00,1,2\n")
    with pytest.raises(hist.ImportRefused, match=r"short\.csv: the catalog's column\(s\) DO \[mg/l\] are not"):
        hist.read_table(path, small)


def test_dst_in_both_directions(tmp_path: Path, small) -> None:
    """Spring: local times without offset skip 02:00-03:00 and stay 15 minutes apart in real time. Autumn: the
    repeated hour comes with offsets. The grid is uniform in real time; the clock (the calendar's input) jumps
    an hour forward in spring and back in autumn, as the plant's wall clocks do."""
    spring = [(f"2026-03-29T01:{m:02d}:00", "1000", "2", "100") for m in (0, 15, 30, 45)]
    spring += [(f"2026-03-29T03:{m:02d}:00", "1000", "2", "100") for m in (0, 15, 30)]
    table = hist.read_table(write_csv(tmp_path / "spring.csv", spring), small)
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
    table = hist.read_table(write_csv(tmp_path / "autumn.csv", autumn), small)
    assert np.all(np.diff(table.utc) == 900)
    assert sorted(set(np.diff(table.clock).tolist())) == [-45.0, 15.0]
    grid, clock, values, _ = hist.resample(table, small)
    assert sorted(set(np.diff(clock).tolist())) == [-45.0, 15.0]  # the grid keeps the jump back
    assert np.all(np.diff(grid) == 900) and np.isfinite(values).all()


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


@pytest.mark.slow
def test_another_plant_trains_exports_and_is_served(tmp_path: Path, tiny_data, serve) -> None:
    """A plant with 7 forecast variables and 2 controls under its own names (read from columns named as the
    historian names them): imported, trained with the tiny preset, exported, and answered by the real service
    with no code change."""
    from training.run import main

    table = tmp_path / "plant.csv"
    hist.export_table([tiny_data[i] for i in ("bsm2-00", "bsm2-01", "bsm2-02")], BSM1, table, seed=1)
    mapping = [
        ("influent_flow", "Q_in", "disturbance"),
        ("nh4_in", "SNH_in", "disturbance"),
        ("no3_anoxic", "SNO_2", "measurement"),
        ("do_last_tank", "SO_5", "measurement"),
        ("nh4_last_tank", "SNH_5", "measurement"),
        ("nh4_out", "SNH_eff", "measurement"),
        ("no3_out", "SNO_eff", "measurement"),
        ("blower", "KLa_5", "control"),
        ("recycle_pump", "Q_intr", "control"),
    ]
    by_name = {v.name: v for v in [*BSM1.targets, *BSM1.controls]}
    entries = [
        f'[[variables]]\nname = "{new}"\ncolumn = "{old}"\nunit = "{by_name[old].unit}"\n'
        f'description = "{by_name[old].description}"\nrole = "{role}"\nmin = {by_name[old].min}\n'
        f"max = {by_name[old].max}\nmax_gap_minutes = 30\n"
        for new, old, role in mapping
    ]
    catalog = tmp_path / "plant.toml"
    catalog.write_text('name = "plant-b"\nsample_minutes = 15\ntimezone = "Europe/Berlin"\n\n' + "\n".join(entries))
    data = tmp_path / "imported"
    from training.data import main as data_main

    assert (
        data_main(
            ["import", str(table), "--catalog", str(catalog), "--out", str(data), "--history", "16", "--horizon", "16"]
        )
        == 0
    )
    store = tmp_path / "store"
    args = ["--preset", "tiny", "--catalog", str(catalog), "--data", str(data), "--store", str(store)]
    assert main([*args, "--run-dir", str(tmp_path / "runs" / "b1")]) == 0
    card = json.loads((store / "b1" / "card.json").read_text())
    assert [v["name"] for v in card["variables"]["measurements"]] == [m[0] for m in mapping[:7]]
    assert [v["role"] for v in card["variables"]["controls"]] == ["control", "control"]
    report = (store / "b1" / "report.md").read_text()
    assert "Missing data" in report  # the faults of the export: dropouts

    server = serve(store)
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    L, H = card["history"]["length"], 4
    mean = {v["name"]: v["mean"] for v in [*card["variables"]["measurements"], *card["variables"]["controls"]]}
    body = {
        "horizon": H,
        "series": [
            {
                "timestamps": [(t0 + timedelta(minutes=15 * k)).isoformat() for k in range(L)],
                "measurements": {m[0]: [mean[m[0]]] * L for m in mapping[:7]},
                "controls": {m[0]: [mean[m[0]]] * L for m in mapping[7:]},
                "hold_controls": True,
            }
        ],
    }
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    forecast = r.json()["series"][0]["forecast"]
    assert set(forecast) == {m[0] for m in mapping[:7]} and len(forecast["nh4_out"]["mean"]) == H
    assert server.client.get("/model").json()["version"] == "b1"


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
    from_csv = hist.read_table(write_csv(tmp_path / "export.csv", rows), small)
    from_parquet = hist.read_table(tmp_path / "export.parquet", small)
    assert np.array_equal(from_parquet.utc, from_csv.utc) and np.array_equal(from_parquet.clock, from_csv.clock)
    for name in ("flow", "oxygen", "air"):
        assert np.array_equal(from_parquet.values[name], from_csv.values[name], equal_nan=True)
    assert np.isnan(from_parquet.values["oxygen"][[1, 4]]).all()
