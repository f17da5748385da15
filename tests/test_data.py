"""The BSM1 dataset: real (short) simulations, cache, atomic writes, validation, splits and windows."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from modelcard.card import atomic_write
from plant import scenarios as S
from plant.catalog import CONTROL_NAMES, MEASUREMENT_NAMES
from training import data as D
from training.config import ConfigError, load_config


def test_tiny_dataset_shapes_and_values(tiny_cfg, tiny_data) -> None:
    ids = [sc.id for sc in S.scenarios(tiny_cfg.data)]
    held_out = ["bsm2-01@moving_setpoints", "bsm2-01@open_loop_excited"]
    held_out += ["bsm2-02@constant_setpoints", "bsm2-02@open_loop_excited"]
    assert list(tiny_data) == ids == ["dry", "rain", "bsm2-00", *held_out]
    expected = round((tiny_cfg.data.scenario_days - tiny_cfg.data.warmup_days) * 96)
    for sd in tiny_data.values():
        assert abs(len(sd.t_minutes) - expected) <= 1
        assert sd.x.shape[1] == len(MEASUREMENT_NAMES) and sd.u.shape[1] == len(CONTROL_NAMES)
        assert np.all(np.isfinite(sd.x)) and np.all(np.isfinite(sd.u))
        assert np.all(np.diff(sd.t_minutes) == 15)
    # Times stay on the influent's clock (day 0 at midnight), so the time of day can be a model input.
    for sc in S.scenarios(tiny_cfg.data):
        sd = tiny_data[sc.id]  # every scenario, not the last one of the loop above
        first = (sc.start_day + tiny_cfg.data.warmup_days) * 1440 + 15
        assert sd.t_minutes[0] == pytest.approx(first)
        q_in = sd.x[:, 0]
        assert np.all(q_in > 1000) and np.all(sd.x[:, 10:15] >= -1e-6)  # flows in m3/d; effluent >= 0
        klas, qintr = sd.u[:, :3], sd.u[:, 3]
        assert np.all((klas >= 0) & (klas <= 240)) and np.all((qintr >= 0) & (qintr <= 5 * 18446))
        assert len(np.unique(np.round(klas[:, 2]))) > 3  # the excitation actually moves


def test_manifest_records_config_versions_and_rows(tiny_cfg, tiny_data) -> None:
    manifest = json.loads((Path(tiny_cfg.data.cache_dir) / "manifest.json").read_text())
    assert manifest["config_hash"] == S.config_hash(tiny_cfg.data)
    assert manifest["versions"]["bsm2-python"] == "0.0.16"
    assert {k: v["rows"] for k, v in manifest["scenarios"].items()} == {
        k: len(v.t_minutes) for k, v in tiny_data.items()
    }


def test_regime_labels_survive_caching(tmp_path: Path, tiny_cfg, tiny_data) -> None:
    manifest = json.loads((Path(tiny_cfg.data.cache_dir) / "manifest.json").read_text())
    for sc in S.scenarios(tiny_cfg.data):
        assert tiny_data[sc.id].regime == sc.regime and tiny_data[sc.id].group == sc.group
        assert manifest["scenarios"][sc.id]["regime"] == sc.regime
    assert {sd.regime for sd in tiny_data.values()} == {"normal", "storm"}
    # Loaded back from a file, and a file whose regime is not one of ours is refused by name.
    path = tmp_path / "storm.npz"
    S.save_scenario(path, tiny_data["bsm2-01@moving_setpoints"], [])
    assert S.load_scenario(path).regime == "storm"
    S.save_scenario(path, replace(tiny_data["bsm2-01@moving_setpoints"], regime="flood"), [])
    with pytest.raises(S.DataError, match=r"storm\.npz: regime 'flood'"):
        S.load_scenario(path)


def test_storm_and_stress_scenarios_apply_their_episodes(tiny_cfg) -> None:
    """A storm scenario's influent carries extra flow; a stress scenario's KLa stays under the blower's cap."""
    cfg = replace(tiny_cfg.data, scenario_days=1.0, warmup_days=0.05, storms_per_week=30.0)
    base = S.scenarios(cfg)[2]  # bsm2-00, normal
    normal, _ = S.simulate_scenario(cfg, base)
    storm, notes = S.simulate_scenario(cfg, replace(base, regime="storm"))
    assert any(n["kind"] == "storm" for n in notes)
    assert storm.x[:, 0].max() > 1.3 * normal.x[:, 0].max()  # Q_in
    inlet = 1.1 * normal.x[:, 0].max()  # the plant's inlet passes no more; the rest overflows upstream
    capped, _ = S.simulate_scenario(replace(cfg, max_inflow=inlet), replace(base, regime="storm"))
    assert capped.x[:, 0].max() == pytest.approx(inlet)
    cfg = replace(cfg, warmup_days=0.0)
    stress, notes = S.simulate_scenario(cfg, replace(base, regime="stress"))
    low = next(n for n in notes if n["kind"] == "low_aeration")
    minutes = stress.t_minutes - base.start_day * 1440
    inside = (minutes > low["start_day"] * 1440 + 15) & (minutes <= (low["start_day"] * 1440 + low["hours"] * 60))
    assert inside.sum() > 0 and np.all(stress.u[inside, :3] <= low["kla_cap"] + 1e-9)


def test_cache_is_reused(tiny_cfg, tiny_data) -> None:
    paths = [S.scenario_path(tiny_cfg.data, sc) for sc in S.scenarios(tiny_cfg.data)]
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = S.generate(tiny_cfg.data, progress=False)
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert np.array_equal(again["rain"].x, tiny_data["rain"].x)
    # One more later window changes no other scenario's content, so nothing else is simulated again.
    more = replace(tiny_cfg.data, later_windows=(*tiny_cfg.data.later_windows, 5))
    assert set(paths) < {S.scenario_path(more, sc) for sc in S.scenarios(more)}


def test_simulation_is_deterministic_for_a_seed(tiny_cfg) -> None:
    cfg = replace(tiny_cfg.data, scenario_days=0.3, warmup_days=0.05)
    sc = S.scenarios(cfg)[2]  # bsm2-00
    a, _ = S.simulate_scenario(cfg, sc)
    b, _ = S.simulate_scenario(cfg, sc)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.u, b.u)
    other = replace(sc, seed=sc.seed + 1)
    c, _ = S.simulate_scenario(cfg, other)
    assert not np.array_equal(a.u, c.u)


def test_seeds_differ_per_scenario(tiny_cfg) -> None:
    seeds = [sc.seed for sc in S.scenarios(tiny_cfg.data)]
    assert len(set(seeds)) == len(seeds)


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "scenario.npz"
    atomic_write(target, b"old complete content")

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["scenario.npz"]


def test_load_names_the_file_and_the_problem(tmp_path: Path, tiny_data) -> None:
    sd = tiny_data["dry"]
    good = tmp_path / "good.npz"
    S.save_scenario(good, sd, [])
    assert np.array_equal(S.load_scenario(good).x, sd.x)

    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:100])
    with pytest.raises(S.DataError, match=r"broken\.npz: unreadable"):
        S.load_scenario(broken)

    nan = tmp_path / "nan.npz"
    bad = replace(sd, x=sd.x.copy())
    bad.x[5, 3] = np.nan
    S.save_scenario(nan, bad, [])
    with pytest.raises(S.DataError, match=r"nan\.npz: x has non-finite values"):
        S.load_scenario(nan)

    washout = tmp_path / "washout.npz"
    bad = replace(sd, x=sd.x.copy())
    bad.x[7, MEASUREMENT_NAMES.index("blanket")] = 2425.19  # bsm2-python's blanket estimate once (defect 5)
    S.save_scenario(washout, bad, [])
    with pytest.raises(S.DataError, match=r"washout\.npz: blanket is 2425.19 m at row 7, outside its physical bounds"):
        S.load_scenario(washout)

    short = tmp_path / "short.npz"
    S.save_scenario(short, replace(sd, x=sd.x[:, :5]), [])
    with pytest.raises(S.DataError, match=r"short\.npz: shapes"):
        S.load_scenario(short)


def test_splits_are_disjoint_whole_scenarios(tiny_cfg) -> None:
    s = S.splits(tiny_cfg.data)
    assert not set(s["train"]) & set(s["val"]) and not set(s["train"]) & set(s["test"])
    assert not set(s["val"]) & set(s["test"])
    default = load_config("default").data
    ds = S.splits(default)
    by_id = {sc.id: sc for sc in S.scenarios(default)}
    # Every regime the product is judged on is held out: normal dry operation, rain or storm, a later period.
    assert {by_id[i].group for i in ds["test"]} == {"normal", "storm", "later"}
    # Held-out scenarios are run under the operating policies (``ID@POLICY``); the BSM1 files are among them.
    assert {"rain", "dry"} <= {i.split("@")[0] for i in ds["test"]}
    # A later period comes after every training window; stress is in training (a minority) and validation.
    last_train = max(by_id[i].start_day for i in ds["train"])
    assert all(by_id[i].start_day > last_train for i in ds["test"] if by_id[i].group == "later")
    shares = {g: sum(by_id[i].regime == g for i in ds["train"]) / len(ds["train"]) for g in S.REGIMES}
    assert shares["normal"] > 0.5 and 0 < shares["stress"] < shares["storm"] < shares["normal"]
    assert set(ds["train"]) | set(ds["val"]) | set(ds["test"]) == {sc.id for sc in S.scenarios(default)}


def test_windows_never_straddle_scenarios(tiny_data) -> None:
    a, b = tiny_data["dry"], tiny_data["rain"]
    w = D.make_windows([a, b], history=16, horizon=8, stride=1)
    per = len(a.t_minutes) - 24 + 1
    assert len(w.x_hist) == per + len(b.t_minutes) - 24 + 1
    assert np.allclose(w.x_hist[per - 1, 0], a.x[per - 1]) and np.allclose(w.x_fut[per - 1, -1], a.x[-1])
    assert np.allclose(w.x_hist[per, 0], b.x[0])
    assert np.isnan(w.x_prev_day[0]).all()  # no day before the scenario's start
    assert w.t_last[0] == a.t_minutes[15] and w.t_last[per] == b.t_minutes[15]


def test_bad_configs_are_refused_with_a_clear_message(tiny_cache, capsys) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting data\.nope"):
        load_config("tiny", overrides=["data.nope=1"])
    with pytest.raises(ConfigError, match=r"unknown setting model\.h_dimm; did you mean model\.h_dim\?"):
        load_config("tiny", overrides=["model.h_dimm=8"])
    with pytest.raises(ConfigError, match=r"data\.kla_ranges"):
        load_config("tiny", overrides=["data.kla_ranges=[[0,300],[0,240],[0,240]]"])
    with pytest.raises(ConfigError, match="beyond BSM2's 609 days"):
        load_config("default", overrides=["data.bsm2_windows=50"])
    with pytest.raises(ConfigError, match=r"data\.later_windows must come after"):
        load_config("default", overrides=["data.later_windows=[5]"])
    with pytest.raises(ConfigError, match=r"data\.regime_cycle"):
        load_config("tiny", overrides=['data.regime_cycle=["normal","flood"]'])
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config("tiny", overrides=["epochs=3"])
    # Values that would train nothing, or fail after the first epoch, are refused before any work.
    for override, named in [
        ("model.dropout=2", r"model\.dropout must be in \[0, 1\): 2\.0"),
        ("model.dropout=1", r"model\.dropout"),
        ("train.checkpoint_every=0", r"train\.checkpoint_every >= 1"),
        ("train.lr=nan", r"train\.lr must be a positive number"),
        ("train.min_lr=1", r"train\.min_lr in \[0, lr\]"),
        ("model.h_dim=0", r"model\.h_dim >= 1"),
        ("train.epochs=-1", r"train\.epochs >= 1 .*: 20, 16, -1, "),
        # A traceback, or a misleading "no window fits", after the data were prepared; NaN printed as no JSON.
        ("train.window_stride=0", r"train\.window_stride >= 1"),
        ("train.max_eval_windows=0", r"train\.max_eval_windows >= 1"),
        ("train.curriculum_start=0", r"train\.curriculum_start must be in 1\.\.train\.horizon"),
        ("train.beta=-1", r"loss weights must be >= 0 .*train\.beta"),
        ("train.quantiles=[0.9,0.1]", r"train\.quantiles must be a non-empty increasing list"),
        ("model.seasonal_check=0", r"model\.seasonal_check >= 1"),
        ("data.whatif_hours=nan", r"data\.whatif_hours must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=named):
            load_config("tiny", overrides=[override])
    bad_toml = tiny_cache + "-bad.toml"
    Path(bad_toml).write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"config section train must be a table"):
        load_config("tiny", bad_toml)
    Path(bad_toml).write_text("[train]\nepochs = true\n")  # int(True): one epoch, silently
    with pytest.raises(ConfigError, match=r"train\.epochs: expected a number, got True"):
        load_config("tiny", bad_toml)
    # A list the preset leaves empty still takes numbers (it compared "40" with 2 and crashed).
    assert load_config("tiny", overrides=["data.later_windows=[40]"]).data.later_windows == (40,)
    from training.run import main as run_main

    assert run_main(["--preset", "tiny", "--version", "d v1", f"data.cache_dir={tiny_cache}"]) == 2
    cfg = load_config("tiny", overrides=[f"data.cache_dir={tiny_cache}", 'data.test_scenarios=["bsm2-09"]'])
    with pytest.raises(ConfigError, match="bsm2-09"):
        S.splits(cfg.data)
    assert D.main(["--preset", "tiny", 'data.val_scenarios=["dry"]', 'data.test_scenarios=["dry"]']) == 2
    assert D.main(["--preset", "tiny", "data.source=historian"]) == 2  # it simulated BSM1 regardless
    assert "python -m training.data import SOURCE" in capsys.readouterr().err
    assert D.main(["--preset", "tiny", f"data.cache_dir={tiny_cache}", "model.h_dim=8"]) == 0  # from the cache
    assert "note: model.h_dim is a training setting; the simulation does not read it" in capsys.readouterr().err


def test_one_analyser_out_is_masked_and_the_window_kept(tiny_data) -> None:
    """Issue 30: a day without one analyser costs no window of the other variables; that analyser is masked
    (its future too, where its history is mostly missing). Windows whose history is mostly missing overall, or
    without their future controls, are still dropped."""
    sd = replace(tiny_data["dry"], x=tiny_data["dry"].x.copy(), u=tiny_data["dry"].u.copy())
    j = MEASUREMENT_NAMES.index("SNH_eff")
    sd.x[40:140, j] = np.nan  # the effluent ammonium analyser out for 25 h
    w = D.make_windows([sd], history=16, horizon=8)
    assert w.dropped == 0 and len(w.x_hist) == len(sd.t_minutes) - 24 + 1
    others = np.delete(np.arange(sd.x.shape[1]), j)
    inside = w.x_fut[60]  # history rows 60-75: the analyser entirely out
    assert np.isnan(inside[:, j]).all() and np.isfinite(inside[:, others]).all()
    half = w.x_fut[126]  # history rows 126-141: 14 of 16 missing -> masked; future rows 142-149 measured
    assert np.isnan(half[:, j]).all() and np.isfinite(sd.x[142:150, j]).all()
    assert np.isfinite(w.x_fut[132][:, j]).all()  # history 132-147: half missing is not mostly: kept as measured
    sd.x[150:171], sd.u[150:171] = np.nan, np.nan  # the whole plant's historian down for 5 h 15 min
    w = D.make_windows([sd], history=16, horizon=8)
    # Dropped: a future control missing (starts 127-154) or more than half of the history missing (143-162).
    assert w.dropped == 162 - 127 + 1 and len(w.x_hist) == len(sd.t_minutes) - 24 + 1 - w.dropped


def test_export_table_and_executors_refuse_before_any_simulation(tmp_path: Path, capsys) -> None:
    """An unknown scenario was named only after the preset's scenarios were simulated, an unknown preset was a
    traceback, --no-faults beside --plant was dropped, and any --executor but tcp:// ran locally."""
    import argparse

    from plant.executor import executor_arg

    out = str(tmp_path / "x.csv")
    assert D.main(["export-table", out, "--scenarios", "nope"]) == 2
    assert "unknown scenario(s) ['nope']" in capsys.readouterr().err
    assert D.main(["export-table", out, "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main(["export-table", out, "--plant", "--no-faults"])
    assert "--no-faults is for the plain table" in capsys.readouterr().err
    assert not Path(out).exists()
    assert executor_arg("local") == "local" and executor_arg("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    for bad in ("bogus", "tcp//host:1", "tcp://"):
        with pytest.raises(argparse.ArgumentTypeError):
            executor_arg(bad)


def _series(n: int, nx: int = 2) -> S.ScenarioData:
    """A small scenario whose values are their own step index: a window's numbers say where they came from."""
    steps = np.arange(n, dtype=np.float64)
    x = np.repeat(steps[:, None], nx, 1)
    return S.ScenarioData("s", steps * 15, x, x[:, :1].copy(), np.full((n, 0), np.nan), 0, "historian", "historian")


def test_yesterday_past_a_days_lead_is_a_sample_before_the_origin() -> None:
    """Same-time-yesterday, the reference forecasts are scored against, read the step a day before each lead: past
    a day's lead that is after the origin, the very truth it is scored on (96 of 192 leads at a 48-h horizon)."""
    from training.data import make_windows

    day, history, horizon = 4, 6, 10
    w = make_windows([_series(40)], history, horizon, steps_per_day=day)
    origin = w.x_hist[:, -1, 0]  # the last history step's index
    assert np.all(np.nan_to_num(w.x_prev_day[..., 0], nan=-1) <= origin[:, None])
    k = np.arange(1, horizon + 1)  # the lead's clock time: the same modulo a day
    seen = np.isfinite(w.x_prev_day[..., 0])
    assert np.all(((w.x_prev_day[..., 0] - (origin[:, None] + k)) % day == 0)[seen])


def test_held_out_windows_are_requests_the_service_would_answer() -> None:
    """Held-out windows masked a variable whose history was mostly missing and scored the rest, where the
    service refuses that request (more than the card's max_missing_share of a variable missing): the scores were
    of requests no caller gets answered. Held out, such a window is now dropped and counted."""
    from training.data import heldout_windows, make_windows

    sd = _series(200)
    sd.x[60:120, 1] = np.nan  # an analyser out for 60 steps
    kept = make_windows([sd], 40, 8, max_missing=0.5)  # training: masked, the window kept (the same stride, 1)
    held = heldout_windows([sd], 40, 8, 10**6, steps_per_day=96, max_missing=0.5)
    refused = (np.isnan(kept.x_hist[..., 1]).sum(1) > 20).sum()
    assert refused > 0 and len(held.x_hist) == len(kept.x_hist) - refused and held.dropped == refused
    assert (np.isnan(held.x_hist[..., 1]).sum(1) <= 20).all()


def test_a_gapped_history_hides_its_samples_from_yesterdays_reference_too() -> None:
    """Sensor-gap scoring blanked the history but not same-time-yesterday, which the reference reads from the
    same samples: at leads 22-24 h the reference still saw the last 2 h the gap took from the forecast."""
    from training.data import make_windows
    from training.gaps import with_gap

    w = make_windows([_series(300)], 128, 96, stride=20)
    gapped = with_gap(w, "last_2h", 15, 2)
    for i in range(len(w.x_hist)):
        j = int(np.flatnonzero(np.isnan(gapped.x_hist[i, -1]))[0])  # the sensor that is down
        hidden = np.isnan(gapped.x_prev_day[i, :, j]) & ~np.isnan(w.x_prev_day[i, :, j])
        assert np.flatnonzero(hidden).tolist() == list(range(88, 96))  # yesterday's values of the gap's 2 h
        assert not (np.isnan(gapped.x_prev_day[i]) & ~np.isnan(w.x_prev_day[i]))[:, 1 - j].any()
