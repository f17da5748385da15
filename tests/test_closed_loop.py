"""bench/closed_loop.py (the CLI, the service in the loop) and bench/closed_loop_plant.py (the plant under a
strategy): the closed-loop bench runs end to end on a short tiny-preset configuration, through the real service,
applies what the service answers, and compares against the default strategy run from the very same state."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench import closed_loop as bench
from bench import closed_loop_plant as loop_plant
from modelcard.card import read_card
from modelcard.objective import card_objective
from modelcard.store import current_version
from plant import bsm1
from plant.catalog import BSM1, SAMPLE_MINUTES
from plant.operation import operation, standard_controls
from training.config import config_from_dict, load_config

HOURS = 3
CARD_PRICES = loop_plant.Prices(20.0, 100.0, 20.0, 0.0)  # the BSM1 catalog's objective (plant/catalogs/bsm1.toml)


@pytest.fixture(scope="module")
def bench_run(trained_store: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    """One short run of the bench on the tiny model: the dry window, 0.25 day of history after the warm-up,
    three hours with the service in the loop."""
    store, version = trained_store
    out = tmp_path_factory.mktemp("closed-loop") / "results.json"
    argv = ["--store", str(store), "--version", version, "--influents", "dry", "--history-days", "0.25"]
    args = bench.parse_args([*argv, "--hours", str(HOURS), "--json", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results, summary = bench.run(args)
    cfg = config_from_dict(json.loads((store / version / "config.json").read_text())).data
    return results, summary, printed.getvalue(), out, cfg


@pytest.mark.slow
def test_the_bench_runs_end_to_end_through_the_service(bench_run) -> None:
    """One call per hour, every figure positive and finite, the statuses the contract names; the table, the
    verdict and the JSON written."""
    results, summary, printed, out, _ = bench_run
    (r,) = results
    assert len(r.calls) == HOURS == len(r.advised.advice) == len(r.default.advice)
    assert all(c.status in ("improved", "current_is_best", "infeasible") for c in r.calls)
    assert all(0 < c.seconds < bench.TIMEOUT_S and np.isfinite(c.solver_seconds) for c in r.calls)
    for outcome in (r.default, r.advised):
        figures = outcome.figures()
        assert all(np.isfinite(v) for v in figures.values()), figures
        assert figures["aeration"] > 0 and figures["pumping"] > 0 and figures["eqi"] > 0
        assert 0 <= figures["snh_over"] <= 1 and 0 <= figures["tn_over"] <= 1
        assert len(outcome.x) == outcome.first + HOURS * loop_plant.HOUR
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(summary))
    (window,) = written["influents"]
    assert window["calls"]["count"] == HOURS and sum(window["calls"]["status"].values()) == HOURS
    assert set(window["targets"]) == {"aeration", "SNH_eff", "TN_eff", "EQI"} and "optimize_p95_s" in written
    assert "verdict:" in printed and "/optimize p95 over 3 calls" in printed


@pytest.mark.slow
def test_the_plant_runs_the_answers_first_hour(bench_run) -> None:
    """Each hour the loops follow the setpoints of the answer's first hour (a setpoint the plan leaves out keeps
    the default schedule's), and an open-loop control the plan gives is applied as given."""
    results, *_ = bench_run
    (r,) = results
    advised = r.advised
    for i, call in enumerate(r.calls):
        hour = slice(advised.first + i * loop_plant.HOUR, advised.first + (i + 1) * loop_plant.HOUR)
        plan = call.answer.get("plan") or {}
        for j, name in enumerate(BSM1.setpoint_names):
            given = (plan.get("setpoints") or {}).get(name)
            want = given[: loop_plant.HOUR] if given else [loop_plant.DEFAULT_SETPOINTS[name]] * loop_plant.HOUR
            np.testing.assert_allclose(advised.s[hour, j], want, rtol=1e-12, err_msg=f"hour {i}, {name}")
        for name, values in (plan.get("controls") or {}).items():
            j = BSM1.control_names.index(name)
            if j not in (loop.control for loop in r.case.run.loops):
                np.testing.assert_allclose(advised.u[hour, j], values[: loop_plant.HOUR], rtol=1e-12)


@pytest.mark.slow
def test_the_default_strategy_is_a_plain_simulation(bench_run) -> None:
    """The bench's default run (warm-up, history and the evaluated hours) is bit for bit the plant simulated
    start to end under BSM1's default strategy without saves or restores, and its energy and EQI are that run's
    (to the summation order)."""
    results, _, _, _, cfg = bench_run
    (r,) = results
    op = operation(cfg, r.case.scenario)
    n = round(r.case.scenario.days * bsm1.MINUTES_PER_DAY)
    loops = [bsm1.do_loop(np.full(n, 2.0)), bsm1.nitrate_loop(np.full(n, 1.0))]
    run = bsm1.Run(
        op.influent, standard_controls(n), stabilize=cfg.stabilize, loops=loops, caps=op.caps, wastage=op.wastage
    )
    x = np.array([run.advance()[0] for _ in range(len(r.default.x))])
    np.testing.assert_array_equal(x, r.default.x)
    evaluated = slice(r.default.first * 15, len(x) * 15)
    np.testing.assert_allclose(run.plant.sim.perf_factors_all[evaluated, 1].mean(), r.default.aeration, rtol=1e-12)
    np.testing.assert_allclose(run.plant.sim.eqi_all[evaluated].mean(), r.default.eqi, rtol=1e-12)


def test_a_strategy_leaves_nothing_behind() -> None:
    """Without a service: an advisor that sends the default setpoints, run after a lower DO setpoint from the
    same saved state, gives the default run bit for bit (the restore leaks nothing, the advice is applied); the
    lower DO setpoint runs the plant at it and saves air."""
    cfg = replace(load_config("tiny").data, scenario_days=1.0)
    case = loop_plant.prepare(cfg, "dry", 0.25, HOURS / 24)
    default = loop_plant.run_strategy(case, loop_plant.default_strategy)
    lower = loop_plant.run_strategy(case, loop_plant.fixed_do(1.0))
    defaults = loop_plant.Advice(
        {name: [value] * loop_plant.HOUR for name, value in loop_plant.DEFAULT_SETPOINTS.items()}
    )
    same = loop_plant.run_strategy(case, lambda history: defaults)
    for a in ("x", "u", "s"):
        np.testing.assert_array_equal(getattr(same, a), getattr(default, a))
    assert same.figures() == default.figures()
    do = BSM1.setpoint_names.index("SO_5_setpoint")
    np.testing.assert_array_equal(lower.s[lower.first :, do], 1.0)
    assert lower.aeration < default.aeration


def test_the_simulator_oracle_leaks_none_of_its_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle runs every candidate on the plant branched from its state: its run is bit for bit a replay of
    its own choices without branches, the choices are from its grid, and each branch is scored on what it did:
    with only air to pay, the least air; with ammonium costly, tanks 3 and 4 at full air."""
    cfg = replace(load_config("tiny").data, scenario_days=1.0)
    case = loop_plant.prepare(cfg, "dry", 0.25, 2 / 24)
    oracle = loop_plant.run_strategy(case, loop_plant.simulator_oracle(case, CARD_PRICES, look_hours=1))
    replayed = iter(oracle.advice)
    replay = loop_plant.run_strategy(case, lambda history: next(replayed))
    for a in ("x", "u", "s"):
        np.testing.assert_array_equal(getattr(replay, a), getattr(oracle, a))
    for advice in oracle.advice:
        assert advice.setpoints["SO_5_setpoint"][0] in loop_plant.ORACLE_DO
        assert advice.controls["KLa_3"][0] in loop_plant.ORACLE_KLA34
    # Air alone: the least of it. Ammonium at a million kWh per g/m3 and hour from zero: tanks 3 and 4 at full air.
    free = loop_plant.run_strategy(
        case, loop_plant.simulator_oracle(case, loop_plant.Prices(0.0, 0.0, 0.0, 0.0), look_hours=1)
    )
    assert all(a.setpoints["SO_5_setpoint"][0] == min(loop_plant.ORACLE_DO) for a in free.advice)
    assert all(a.controls["KLa_3"][0] == min(loop_plant.ORACLE_KLA34) for a in free.advice)
    monkeypatch.setattr(loop_plant, "SNH_LIMIT", 0.0)
    eager = loop_plant.Prices(snh_unit=1e6, snh_hour=0.0, tn_unit=0.0, tn_hour=0.0)
    most = loop_plant.run_strategy(case, loop_plant.simulator_oracle(case, eager, look_hours=1))
    assert all(a.controls["KLa_3"][0] == max(loop_plant.ORACLE_KLA34) for a in most.advice)


def test_the_simulator_oracle_prices_are_the_cards_unless_given() -> None:
    """Without ``--oracle-prices`` the oracle scores with the served card's limit prices (one contract, one
    place); a limit the objective does not set costs nothing."""
    store = Path(__file__).resolve().parents[1] / "models"
    card = read_card(store / current_version(store))
    limits = {m["variable"]: m for m in card["optimizer"]["limits"]}
    objective = card_objective(card)
    assert objective is not None
    prices = loop_plant.Prices.of(objective)
    assert prices == loop_plant.Prices(
        limits["SNH_eff"]["price_kwh"],
        limits["SNH_eff"].get("hour_price_kwh", 0.0),
        limits["TN_eff"]["price_kwh"],
        limits["TN_eff"].get("hour_price_kwh", 0.0),
    )
    assert prices == CARD_PRICES  # the catalog's, as the test above uses
    no_tn = replace(objective, limits=tuple(m for m in objective.limits if m.variable != "TN_eff"))
    assert loop_plant.Prices.of(no_tn) == replace(prices, tn_unit=0.0, tn_hour=0.0)


@pytest.mark.slow
def test_the_simulator_oracle_looks_no_further_than_the_simulation() -> None:
    """BSM1's 14-day files hold 20,144 simulated minutes for a schedule of 20,160: in the last hour of the dry
    window the oracle's look-ahead stops where the simulator does (it ran past it: an IndexError)."""
    cfg = load_config("default").data
    probe = loop_plant.prepare(cfg, "dry", 0.0, 1 / 24)
    last = probe.run.n_samples  # samples the simulator holds
    assert last * SAMPLE_MINUTES < len(probe.run.controls)
    history_days = (last - loop_plant.HOUR) / loop_plant.DAY - cfg.warmup_days
    case = loop_plant.prepare(cfg, "dry", history_days, 1 / 24)
    assert case.samples == loop_plant.HOUR
    outcome = loop_plant.run_strategy(case, loop_plant.simulator_oracle(case, CARD_PRICES))
    (advice,) = outcome.advice
    assert advice.setpoints["SO_5_setpoint"][0] in loop_plant.ORACLE_DO
    assert np.isfinite(outcome.aeration) and outcome.aeration > 0


def test_storm_and_later_name_the_held_out_windows() -> None:
    """``storm`` is the config's held-out BSM2 window with added storms, ``later`` its held-out later window; a
    window held out under BSM1's constant setpoints is taken under them."""
    default = load_config("default").data
    assert loop_plant.resolve(default, "storm").id.startswith("bsm2-14@")
    assert loop_plant.resolve(default, "later").id == "bsm2-36@constant_setpoints"
    assert loop_plant.resolve(default, "dry").id == "dry@constant_setpoints"
    tiny = load_config("tiny").data
    assert loop_plant.resolve(tiny, "storm").id.startswith("bsm2-01@")
    with pytest.raises(SystemExit, match="no later window"):
        loop_plant.resolve(tiny, "later")


def test_arguments_that_would_be_ignored_or_misread_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--hours silently replaced --days, --oracle-prices without --oracle was ignored, and --objective abc was
    "invalid loads value"."""
    for argv, words in (
        (["--days", "3", "--hours", "6"], "not allowed with argument"),
        (["--oracle-prices", "1", "2", "3", "4"], "give --oracle too"),
        (["--oracle-hours", "12"], "give --oracle too"),
        (["--objective", "abc"], "not JSON"),
        (["--objective", "[1]"], "a JSON object is needed"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert words in capsys.readouterr().err, argv
    args = bench.parse_args(["--oracle", "--oracle-hours", "12"])
    assert args.oracle_hours == 12 and bench.parse_args([]).oracle_hours == 6 and bench.parse_args([]).days == 7.0
