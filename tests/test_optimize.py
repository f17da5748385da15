"""Setpoint advice: the search on a synthetic plant whose optimum is known, the objective in catalog and card, and
POST /optimize on a real server with the tiny model."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from modelcard.card import read_card, write_card
from modelcard.objective import EffluentLimit, Objective
from modelcard.runtime import Forecast
from optimizer.search import Search, Situation, Spread, optimize
from plant.catalog import BSM1, BSM1_CATALOG, CatalogError, catalog_from_dict
from plant.example_export import EXAMPLE_CATALOG
from tests.test_service import problem_fields

# ----------------------------------------------------------------------------- a plant with a known optimum

Z = np.linspace(-2.0, 2.0, 41)  # the synthetic plant's "samples": fixed draws, so its quantiles are exact
SIGMA = 0.5


class LinearPlant:
    """Stands in for a model runtime: effluent ammonium = load(t) - 2 x DO setpoint, the air its DO loop needs
    = 50 x DO setpoint, the ammonium's spread SIGMA x Z. Under the limit q90(SNH_eff) <= 4, the cheapest DO at
    each hour is the lowest that keeps every step of the hour within it."""

    step_minutes = 15

    def __init__(self, load: np.ndarray) -> None:
        self.load = load
        self.setpoints, self.controls, self.outputs = ["SO_5_setpoint"], ["KLa_5"], ["SNH_eff", "KLa_5"]

    def predict_plans(self, x_hist, u_hist, plans, last_minute, n_samples=0, rng=None, d_fut=None, s_hist=None,
                      s_fut=None) -> Forecast:  # fmt: skip
        do = s_fut[..., 0]  # (P, H)
        mean = np.stack([self.load - 2 * do, 50 * do], -1)
        samples = None
        if n_samples:
            samples = mean[:, None] + np.stack([SIGMA * Z, 0 * Z], -1)[None, :, None, :]
        return Forecast(mean, samples)


def synthetic(load: np.ndarray, current_do: float, price: float = 1e4) -> tuple[LinearPlant, Situation, Objective]:
    H = len(load)
    sit = Situation(
        x_hist=np.zeros((4, 1)),
        u_hist=np.zeros((4, 1)),
        s_hist=np.full((4, 1), current_do),
        last_minute=0.0,
        d_fut=None,
        u_held=np.full((H, 1), np.nan),  # KLa_5 left to its loop
        s_held=None,
    )
    objective = Objective(
        block_minutes=60,
        control_minutes=None,
        setpoints={"SO_5_setpoint": (0.5, 3.0)},
        controls={},
        limits=(EffluentLimit("SNH_eff", 0.9, 4.0, price),),
        aeration_kw={"KLa_5": 0.25},
        pumping_kw={},
    )
    return LinearPlant(load), sit, objective


def optimum(load: np.ndarray) -> np.ndarray:
    """The cheapest DO per hour: each step's q90 = load - 2 DO + SIGMA q90(Z) <= 4, within [0.5, 3]."""
    need = (load + SIGMA * np.quantile(Z, 0.9) - 4.0) / 2
    return np.clip(need.reshape(-1, 4).max(1), 0.5, 3.0)


def test_the_search_finds_a_synthetic_plants_known_optimum() -> None:
    load = 5 + 3 * np.sin(2 * np.pi * np.arange(24) / 24)  # 6 hours, each hour its own need
    rt, sit, objective = synthetic(load, current_do=3.0)
    advice = optimize(rt, sit, objective, 24, Search(samples=len(Z)), [0.5])  # type: ignore[arg-type]
    assert advice.status == "improved" and advice.plan.feasible
    planned = advice.plan.s[::4, 0]
    best = optimum(load)
    assert np.abs(planned - best).max() < 0.1, (planned, best)
    best_kwh = 0.25 * 50 * np.repeat(best, 4).sum() * 0.25
    assert advice.plan.energy["total"] == pytest.approx(best_kwh, rel=0.03)
    assert advice.current.energy["total"] == pytest.approx(0.25 * 50 * 3.0 * 24 * 0.25)
    assert (advice.plan.s[:, 0].reshape(-1, 4) == planned[:, None]).all()  # piecewise constant per hour
    assert advice.plan.limits[0].excess == 0


def test_the_current_plan_is_answered_when_it_is_already_the_cheapest() -> None:
    load = np.full(16, 3.0)  # the limit holds at any DO: the lowest bound is the optimum, and the plant is there
    rt, sit, objective = synthetic(load, current_do=0.5)
    advice = optimize(rt, sit, objective, 16, Search(samples=len(Z)), [0.5])  # type: ignore[arg-type]
    assert advice.status == "current_is_best"
    assert advice.plan is advice.current and (advice.plan.s[:, 0] == 0.5).all()


def test_an_unreachable_limit_is_reported_with_its_excess() -> None:
    load = np.full(8, 12.0)  # even DO 3 leaves q90 = 12 - 6 + 0.64 above 4
    rt, sit, objective = synthetic(load, current_do=2.0, price=1e6)
    advice = optimize(rt, sit, objective, 8, Search(samples=len(Z)), [0.5])  # type: ignore[arg-type]
    check = advice.plan.limits[0]
    q90 = SIGMA * np.quantile(Z, 0.9)
    assert not advice.plan.feasible and check.limit.variable == "SNH_eff"
    # At a high price per unit above the limit, the plan spends air to bring the excess down: the most DO.
    assert advice.status == "improved" and np.allclose(advice.plan.s[:, 0], 3.0)
    assert check.excess == pytest.approx(12 - 6 + q90 - 4)
    assert advice.current.limits[0].excess == pytest.approx(12 - 4 + q90 - 4)


def test_the_expected_time_above_a_limit_counts_the_samples_above_it() -> None:
    spread = Spread([[np.array([[-1.0, -3.0], [0.0, -3.0], [1.0, -3.0]])]])  # 3 samples, 2 steps
    above = spread.above(0, np.array([[3.5, 3.5], [4.5, 8.0]]), 4.0)
    assert above.tolist() == [[1 / 3, 0.0], [2 / 3, 1.0]]  # 2.5 3.5 4.5 | 3.5 4.5 5.5, and 5 at step 2
    assert spread.margin(0, 0.5).tolist() == [0.0, -3.0]


def test_an_hour_price_buys_time_below_the_limit() -> None:
    """Excess at no price, time above at a high one: the plan keeps every step's samples below the limit."""
    load = np.full(8, 6.0)
    rt, sit, objective = synthetic(load, current_do=1.0, price=0.0)
    objective = replace(objective, limits=(EffluentLimit("SNH_eff", 0.9, 4.0, 0.0, hour_price_kwh=1e4),))
    advice = optimize(rt, sit, objective, 8, Search(samples=len(Z)), [0.5])  # type: ignore[arg-type]
    assert advice.status == "improved" and advice.plan.limits[0].hours_above == 0
    # At DO 1 the mean is at the limit: 20 of the 41 samples above it at each of 8 quarter-hours.
    assert advice.current.limits[0].hours_above == pytest.approx(8 * 0.25 * 20 / 41)
    need = (6 + SIGMA * Z.max() - 4) / 2  # the DO that keeps the highest sample at the limit
    assert np.all(advice.plan.s[:, 0] >= need - 1e-9) and np.all(advice.plan.s[:, 0] < need + 0.1)


@pytest.mark.parametrize("seed", range(4))
def test_moves_that_cost_more_than_they_save_are_not_advised(seed: int) -> None:
    load = np.full(8, 3.0)  # any DO meets the limit: lower saves energy
    rt, sit, objective = synthetic(load, current_do=2.0)
    free = optimize(rt, sit, objective, 8, Search(samples=len(Z), seed=seed), [0.5])  # type: ignore[arg-type]
    costly = optimize(rt, sit, replace(objective, move_kwh=1e4), 8, Search(samples=len(Z), seed=seed), [0.5])  # type: ignore[arg-type]
    assert free.status == "improved" and np.allclose(free.plan.s[:, 0], 0.5, atol=0.1)
    assert costly.status == "current_is_best" and np.all(costly.plan.s[:, 0] == 2.0)
    assert costly.score == costly.current_score


# ----------------------------------------------------------------------------- the objective in catalog and card


def test_the_bsm1_energy_formula_is_bsm2_pythons() -> None:
    from bsm2_python.bsm2.init import asm1init_bsm1 as asm1
    from bsm2_python.bsm2.init import plantperformanceinit_bsm1 as pp
    from bsm2_python.bsm2.plantperformance import PlantPerformance

    obj = BSM1.optimizer
    assert obj is not None
    kla = np.array([0.0, 0.0, 200.0, 180.0, 120.0])
    volumes = np.array([asm1.VOL1, asm1.VOL2, asm1.VOL3, asm1.VOL4, asm1.VOL5])
    sosat = np.array([asm1.SOSAT1, asm1.SOSAT2, asm1.SOSAT3, asm1.SOSAT4, asm1.SOSAT5])
    ours = sum(obj.aeration_kw[n] * v for n, v in zip(("KLa_3", "KLa_4", "KLa_5"), kla[2:], strict=True))
    assert ours == pytest.approx(PlantPerformance.aerationenergy_step(kla, volumes, sosat))  # kW
    q_intr = 61_000.0
    pumped = PlantPerformance.pumpingenergy_step(np.array([q_intr, asm1.QR, asm1.QW]), pp.PP_PAR[10:13])
    assert obj.pumping_kw["Q_intr"] * q_intr + obj.constant_kw == pytest.approx(pumped)


def catalog_data() -> dict:
    with open(BSM1_CATALOG, "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda o: o["setpoints"].update(KLa_5=[0, 100]), "optimizer.setpoints.KLa_5"),
        (lambda o: o.update(controls={"KLa_5": [0, 100]}), "optimizer.controls.KLa_5"),  # looped: its loop decides
        (lambda o: o["limits"].append({"variable": "SNH_ef", "quantile": 0.9, "max": 4}), "optimizer.limits[2]"),
        (lambda o: o["limits"][0].update(quantile=1.5), "optimizer.limits[0].quantile"),
        (lambda o: o["aeration_kw"].update(KLa_9=1.0), "optimizer.aeration_kw.KLa_9"),
        (lambda o: o.update(block_minutes=20), "optimizer.block_minutes"),
        (lambda o: o.update(blocks=2), "optimizer.blocks"),
    ],
)
def test_a_catalog_objective_naming_what_the_plant_lacks_is_refused_by_name(change, named: str) -> None:
    data = catalog_data()
    change(data["optimizer"])
    with pytest.raises(CatalogError, match=named.replace("[", r"\[").replace("]", r"\]")):
        catalog_from_dict(data, "bsm1.toml")


def test_the_trained_card_keeps_the_objective_within_its_training_range(trained_store, rt) -> None:
    objective = rt.card["optimizer"]
    assert [m["variable"] for m in objective["limits"]] == ["SNH_eff", "TN_eff"]
    for key, names, (lo, hi) in (
        ("setpoints", rt.setpoints, rt.s_range),
        ("controls", rt.controls, rt.u_range),
    ):
        for name, (a, b) in objective[key].items():
            j = names.index(name)
            assert lo[j] - 1e-9 <= a < b <= hi[j] + 1e-9


# ----------------------------------------------------------------------------- POST /optimize


def optimize_body(rt, data, horizon: int = 16, at: int = 120) -> dict:
    """One day of a tiny scenario run under its loops, its setpoints' history included, the open-loop controls
    held."""
    sc = next(d for d in data.values() if np.isfinite(d.s).all() and d.policy == "constant_setpoints")
    L = rt.card["history"]["length"]
    sl = slice(at - L, at)
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    return {
        "horizon": horizon,
        "seed": 1,
        "series": {
            "timestamps": [(t0 + timedelta(minutes=float(m))).isoformat() for m in sc.t_minutes[sl]],
            "measurements": {n: sc.x[sl, j].tolist() for j, n in enumerate(rt.measurements)},
            "controls": {n: sc.u[sl, j].tolist() for j, n in enumerate(rt.controls)},
            "setpoints": {n: sc.s[sl, j].tolist() for j, n in enumerate(rt.setpoints)},
            "hold_controls": True,
        },
    }


def test_optimize_answers_a_plan_within_bounds_with_its_forecast_energy_and_limits(server, rt, tiny_data) -> None:
    body = optimize_body(rt, tiny_data)
    body["series"]["id"] = "line-2"
    r = server.client.post("/optimize", json=body)
    assert r.status_code == 200, r.text
    a = r.json()
    H, objective = body["horizon"], rt.card["optimizer"]
    assert a["model_version"] == rt.version and a["status"] in ("improved", "current_is_best")
    assert a["id"] == "line-2"  # echoed, as /forecast echoes it
    plan = a["plan"]
    assert len(plan["timestamps"]) == H and set(plan["setpoints"]) == set(objective["setpoints"])
    for name, values in {**plan["setpoints"], **plan["controls"]}.items():
        lo, hi = (objective["setpoints"] | objective["controls"])[name]
        v = np.array(values).reshape(-1, plan["block_minutes"] // rt.step_minutes)
        assert (v == v[:, :1]).all()
        if a["status"] == "improved":
            assert lo - 1e-9 <= v.min() and v.max() <= hi + 1e-9
        else:  # holding: where the plant is now, inside the bounds or not
            assert (v == plan["current"][name]).all()
    forecast = a["forecast"]["variables"]
    assert {"SNH_eff", "TN_eff", "KLa_5", "Q_intr"} <= set(forecast)
    assert set(forecast["SNH_eff"]["quantiles"]) == {"0.1", "0.5", "0.9"} and len(forecast["KLa_5"]["mean"]) == H
    e = a["energy"]
    for side in ("plan", "current"):
        assert e[side]["total"] == pytest.approx(e[side]["aeration"] + e[side]["pumping"] + e[side]["constant"])
    assert e["saving"] == pytest.approx(e["current"]["total"] - e["plan"]["total"])
    if a["status"] == "current_is_best":
        assert e["saving"] == 0
    assert [m["variable"] for m in a["limits"]] == ["SNH_eff", "TN_eff"]
    assert a["feasible"] == all(m["met"] for m in a["limits"])
    assert a["solver"]["plans_evaluated"] > 10 and 0 < a["solver"]["seconds"] < 30
    metrics = server.client.get("/metrics").text
    assert "kovae_optimize_total{" in metrics and "kovae_optimize_duration_seconds_count 1.0" in metrics
    assert 'route="/optimize"' in metrics  # its own label in the request metrics, not "other"


def test_optimize_advises_the_do_alone_with_the_nitrate_loop_not_in_effect(server, rt, tiny_data) -> None:
    """No nitrate setpoint sent: its control is held (hold_controls) and not forecast; the DO is advised."""
    body = optimize_body(rt, tiny_data)
    body["series"]["setpoints"].pop("SNO_2_setpoint")
    body["objective"] = {"setpoints": {"SO_5_setpoint": rt.card["optimizer"]["setpoints"]["SO_5_setpoint"]}}
    body["quantiles"] = [0.25]
    r = server.client.post("/optimize", json=body)
    assert r.status_code == 200, r.text
    a = r.json()
    assert set(a["plan"]["setpoints"]) == {"SO_5_setpoint"} and "KLa_5" in a["forecast"]["variables"]
    assert "Q_intr" not in a["forecast"]["variables"]
    assert set(a["forecast"]["variables"]["SNH_eff"]["quantiles"]) == {"0.25", "0.9"}  # and the limits' own


def test_holding_a_control_with_a_gap_holds_its_last_value(server, rt, tiny_data) -> None:
    """A decided control whose last history value is missing is held at its last value, not at 0."""
    body = optimize_body(rt, tiny_data)
    series = body["series"]
    last = series["controls"]["KLa_3"][-2]
    series["controls"]["KLa_3"][-1] = None
    series.pop("hold_controls")
    series["future_controls"] = {}  # KLa_3 and KLa_4 are the plan's, KLa_5 and Q_intr their loops'
    a = server.client.post("/optimize", json=body).json()
    assert a["plan"]["current"]["KLa_3"] == pytest.approx(last)


def test_optimize_reports_a_limit_no_plan_can_meet(server, rt, tiny_data) -> None:
    body = optimize_body(rt, tiny_data)
    body["objective"] = {"limits": [{"variable": "SNH_eff", "quantile": 0.9, "max": 1e-3}]}
    a = server.client.post("/optimize", json=body).json()
    (limit,) = a["limits"]
    assert not a["feasible"] and limit["variable"] == "SNH_eff" and not limit["met"]
    assert limit["excess"] == pytest.approx(limit["worst"] - 1e-3) and limit["excess"] > 0
    assert limit["worst_at"] in a["plan"]["timestamps"]


def test_optimize_answers_the_current_plan_when_it_is_already_the_cheapest(server, rt, tiny_data) -> None:
    """Energy on KLa_3 alone, which the plan decides and which is at its lower bound already: holding it is best."""
    body = optimize_body(rt, tiny_data)
    j = rt.controls.index("KLa_3")
    kla3 = float(rt.u_range[0][j] + rt.u_range[1][j]) / 2  # inside what the model saw
    body["series"]["controls"]["KLa_3"] = [kla3] * len(body["series"]["timestamps"])
    body["objective"] = {
        "setpoints": {},
        "controls": {"KLa_3": [kla3, float(rt.u_range[1][rt.controls.index("KLa_3")])]},
        "limits": [],
        "aeration_kw": {"KLa_3": 1.0},
        "pumping_kw": {},
        "constant_kw": 0.0,
    }
    a = server.client.post("/optimize", json=body).json()
    assert a["status"] == "current_is_best" and a["feasible"] and a["energy"]["saving"] == 0
    assert a["plan"]["controls"]["KLa_3"] == [kla3] * body["horizon"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["objective"].update(limits=[{"variable": "SNH_ef", "quantile": 0.9, "max": 4}]),
         "objective.limits[0].variable"),
        (lambda b: b["objective"].update(setpoints={"SO_5_setpoint": [0.01, 3.0]}),
         "objective.setpoints.SO_5_setpoint"),
        (lambda b: b["series"].update(future_setpoints={"SO_5_setpoint": [2.0] * 16}),
         "series.future_setpoints.SO_5_setpoint"),
        (lambda b: b["series"]["setpoints"].pop("SNO_2_setpoint"), "series.setpoints.SNO_2_setpoint"),
        (lambda b: b["series"].update(plans=[]), "series.plans"),
        (lambda b: b.update(horizon=10_000), "horizon"),
        # Plans of that many steps were built for the open-loop controls before the horizon was checked: 1e12
        # steps a MemoryError (500), 2**63 an OverflowError (500), 3e8 4.9 GB on the event loop.
        (lambda b: (b["series"].pop("hold_controls", None), b["series"].update(future_controls={}),
                    b.update(horizon=10**12)), "horizon"),
        (lambda b: (b["series"].pop("hold_controls", None), b["series"].update(future_controls={}),
                    b.update(horizon=2**63)), "horizon"),
        (lambda b: b["objective"].update(block_minutes=7), "objective.block_minutes"),
        (lambda b: b.update(quantiles=[0.5, 1.5]), "quantiles[1]"),
        (lambda b: b.update(quantiles=[0.0]), "quantiles[0]"),  # as /forecast: strictly between 0 and 1
        (lambda b: b.update(quantiles=[0.5, 0.5]), "quantiles[1]"),  # and none twice
        (lambda b: b["objective"].update(control_minutes=10**22), "objective.control_minutes"),  # a 500 before
        (lambda b: b["objective"].update(block_minutes=10**22), "objective.block_minutes"),
        (lambda b: b["objective"].update(constant_kw=1e308), "objective.constant_kw"),
        (lambda b: b["objective"].update(limits=[{"variable": "SNH_eff", "quantile": 0.9, "max": -1e300}]),
         "objective.limits[0].max"),
        (lambda b: b["series"]["setpoints"].update(SO_5_setpoint=[None] * 40), "series.setpoints.SO_5_setpoint"),
    ],
)  # fmt: skip
def test_a_bad_optimize_request_is_refused_naming_the_field(server, rt, tiny_data, change, field: str) -> None:
    body = optimize_body(rt, tiny_data)
    body["objective"] = {}
    change(body)
    r = server.client.post("/optimize", json=body)
    assert r.status_code == 422, r.text
    assert field in problem_fields(r)


def test_the_series_rules_of_forecast_are_answered_in_optimizes_own_terms(server, rt, tiny_data) -> None:
    """A value /forecast's decoding refuses is named as /optimize's one series has it, never as series[0]."""
    body = optimize_body(rt, tiny_data)
    body["series"]["measurements"]["SO_5"][3] = -1.0
    r = server.client.post("/optimize", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["title"] == "Invalid optimize request"
    assert problem_fields(r) == ["series.measurements.SO_5[3]"] and "series[0]" not in problem["detail"]


def test_optimize_answers_the_warnings_and_gaps_of_its_history(server, rt, tiny_data) -> None:
    """Advice built on a sensor down now, or on an input outside the training range, says so in its answer."""
    body = optimize_body(rt, tiny_data)
    series = body["series"]
    series["measurements"]["SO_5"][-8:] = [None] * 8
    j = rt.measurements.index("SNH_in")
    lo, hi = rt.x_range[0][j], rt.x_range[1][j]
    series["measurements"]["SNH_in"][-1] = float(hi + 0.5 * (hi - lo))  # inside the physical [0, 500]
    r = server.client.post("/optimize", json=body)
    assert r.status_code == 200, r.text
    a = r.json()
    kinds = {(w["kind"], w["variable"], w["field"]) for w in a["warnings"]}
    assert ("stale", "SO_5", "series.measurements.SO_5") in kinds
    assert ("training_range", "SNH_in", "series.measurements.SNH_in") in kinds
    assert a["gaps"] == {"SO_5": 8}


def test_the_published_optimize_schema_takes_what_the_service_takes(server, rt, tiny_data) -> None:
    """openapi.json's /optimize request: its series is /forecast's without plans, whose future_controls require
    none of what the card's objective decides (the schema required KLa_3 and KLa_4, which the service refuses
    there), and its horizon and quantiles carry the limits the service checks. A request whose own objective
    leaves the blowers alone sends their plan, and the schema takes that too."""
    import jsonschema

    spec = server.client.get("/openapi.json").json()
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/OptimizeRequest", "components": spec["components"]}
    )
    body = optimize_body(rt, tiny_data)
    body["series"].pop("hold_controls")
    body["series"]["future_controls"] = {}  # KLa_3, KLa_4: the plan's; KLa_5, Q_intr: their loops'
    assert list(validator.iter_errors(body)) == []
    assert server.client.post("/optimize", json=body).status_code == 200
    planned = [float(v) for v in body["series"]["controls"]["KLa_3"][-body["horizon"] :]]
    body["series"]["future_controls"] = {"KLa_3": planned, "KLa_4": planned}
    assert server.client.post("/optimize", json=body).status_code == 422  # the card's objective decides them
    body["objective"] = {"controls": {}}
    assert list(validator.iter_errors(body)) == []
    assert server.client.post("/optimize", json=body).status_code == 200
    req = spec["components"]["schemas"]["OptimizeRequest"]["properties"]
    assert req["horizon"]["maximum"] == rt.max_horizon and req["quantiles"]["maxItems"] >= 3


def test_optimize_writes_its_times_as_forecast_does(server, rt, tiny_data) -> None:
    body = optimize_body(rt, tiny_data)
    advice = server.client.post("/optimize", json=body).json()
    forecast = server.client.post("/forecast", json={"series": [body["series"]], "horizon": body["horizon"]})
    assert forecast.status_code == 200, forecast.text
    assert advice["plan"]["timestamps"] == forecast.json()["series"][0]["timestamps"]


def test_a_model_without_an_objective_answers_409(serve, store_copy, rt, tiny_data) -> None:
    store, version = store_copy
    folder = Path(store) / version
    card = read_card(folder)
    card.pop("optimizer")
    write_card(folder, card)
    server = serve(store)
    r = server.client.post("/optimize", json=optimize_body(rt, tiny_data))
    assert r.status_code == 409 and "optimizer" in r.json()["detail"]
    assert json.loads(server.client.get("/model").text).get("optimizer") is None


def test_a_version_without_a_plans_graph_answers_409(serve, store_copy, rt, tiny_data) -> None:
    """``upgrade_card --optimizer`` gives an objective to a version exported before the plans graph, which the
    search runs on: it answered 500."""
    store, version = store_copy
    folder = Path(store) / version
    card = read_card(folder)
    for key in ("plans_file", "plans_sha256"):
        card["onnx"].pop(key, None)
    write_card(folder, card)
    r = serve(store).client.post("/optimize", json=optimize_body(rt, tiny_data))
    assert r.status_code == 409 and "no plans graph" in r.json()["detail"], r.text


def test_a_card_without_an_objective_gets_the_catalogs(store_copy, capsys) -> None:
    """``python -m training.upgrade_card --optimizer``: the catalog's objective, its bounds narrowed to the card's
    training range, sealed with the card; a second run leaves the card as it is."""
    from training.upgrade_card import main

    store, version = store_copy
    folder = Path(store) / version
    card = read_card(folder)
    expected = card.pop("optimizer")
    write_card(folder, card)
    assert main(["--store", str(store), "--version", version, "--optimizer"]) == 0
    upgraded = read_card(folder, verify=True)
    assert upgraded["optimizer"] == expected  # what training writes
    before = (folder / "card.json").read_bytes()
    assert main(["--store", str(store), "--version", version, "--optimizer"]) == 0
    assert (folder / "card.json").read_bytes() == before

    # A card at card_version 3 is left as it is (it crashed on the loops' columns); mistakes are one line each.
    assert main(["--store", str(store), "--version", version]) == 0
    assert (folder / "card.json").read_bytes() == before
    assert "left as it is" in capsys.readouterr().out
    for args, words in (
        (["--version", "nope"], "no model card"),
        (["--version", version, "--optimizer", "--catalog", "/nonexistent.toml"], "nonexistent.toml"),
        (["--version", version, "--optimizer", "--catalog", str(EXAMPLE_CATALOG)], "is not"),
    ):
        assert main(["--store", str(store), *args]) in (1, 2)
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_searches_past_the_queue_bound_are_answered_503_and_forecasts_go_on(
    serve, trained_store, rt, tiny_data
) -> None:
    """KOVAE_MAX_OPTIMIZE_WAITING=1: of searches sent at once, those beyond the one running are answered 503 with
    Retry-After, and a forecast sent meanwhile is answered (searches have their own lane)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.test_service import make_body

    store, _ = trained_store
    server = serve(store, KOVAE_MAX_OPTIMIZE_WAITING="1")
    body = optimize_body(rt, tiny_data)
    body["horizon"] = rt.max_horizon

    def post(path: str, payload: dict) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post(path, json=payload)

    with ThreadPoolExecutor(8) as pool:
        searches = [pool.submit(post, "/optimize", body) for _ in range(6)]
        forecast = pool.submit(post, "/forecast", make_body(rt))
        codes = sorted(f.result().status_code for f in searches)
        busy = [f.result() for f in searches if f.result().status_code == 503]
    assert forecast.result().status_code == 200
    assert codes.count(200) >= 1 and busy and set(codes) <= {200, 503}
    assert busy[0].headers["retry-after"] == "1" and "Optimizer busy" in busy[0].text


@pytest.mark.parametrize("price", [None, 1e4])
def test_advice_never_breaks_a_limit_that_holding_meets(price: float | None) -> None:
    """The committed default at an origin of BSM1's dry file (step 400; ``tests/data/dry_step_400.json``), with
    the effluent ammonium's 90% quantile at most 10.5. The search ranks plans on their means with a margin from
    other plans' samples and ended on a plan at that margin's edge: at the default price advised saving 33% with
    0.36 g N/m3 over a limit holding met, and at 1e4 answered holding with nothing saved. Now the plan meets the
    limit, and still saves."""
    from modelcard.runtime import ModelRuntime
    from service.optimize import objective_of, parse_optimize, search_settings, situation_of
    from service.settings import Settings

    root = Path(__file__).resolve().parents[1]
    rt = ModelRuntime(root / "models" / "20261206-105344-default")
    body = json.loads((root / "tests" / "data" / "dry_step_400.json").read_text())
    limit = {"variable": "SNH_eff", "quantile": 0.9, "max": 10.5} | ({"price_kwh": price} if price else {})
    body["objective"] = {"limits": [limit]}
    req = parse_optimize(json.dumps(body).encode(), rt, Settings())
    objective = objective_of(req, rt)
    situation, _ = situation_of(req, rt, Settings(), objective)
    advice = optimize(rt, situation, objective, req.horizon, search_settings(rt, req.seed), sorted(set(req.quantiles)))
    assert advice.current.feasible and advice.plan.feasible
    assert advice.status == "improved" and advice.plan.energy["total"] < 0.9 * advice.current.energy["total"]
