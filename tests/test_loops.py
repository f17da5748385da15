"""Closed loops in the contract (issue 29): a request leaves a looped control to its loop and sends the setpoint;
the answer forecasts that control too. Real servers (``python -m service``) on 127.0.0.1 with the real tiny model
(which has the catalog's two loops) and the committed default model (which has none)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelcard.card import CALENDAR_CLOCK
from modelcard.runtime import ModelRuntime
from modelcard.store import current_version, set_current
from service.decode import decode
from service.encode import SeriesShape, answer_bytes
from service.parse import parse, size_limits
from service.problems import ProblemError
from service.settings import Settings
from tests.test_service import ROOT, arrays, make_body, problem_fields

H = 6
LIMITS = size_limits(None, Settings())


def post(server, body: dict):
    return server.client.post("/forecast", json=body)


def errors(r) -> dict[str, str]:
    assert r.status_code == 422, r.text
    problem_fields(r)
    return {e["field"]: e["message"] for e in r.json()["errors"]}


def closed_loop_body(rt: ModelRuntime, do: float = 2.0) -> dict:
    """A plant whose DO loop drives KLa_5: KLa_5's future left out, the DO setpoint's history sent."""
    body = make_body(rt, horizon=H)
    s = body["series"][0]
    s["future_controls"].pop("KLa_5")
    s["setpoints"] = {"SO_5_setpoint": [do] * len(s["timestamps"])}
    return body


def test_a_looped_control_left_out_is_forecast_with_its_unit_quantiles_and_bounds(server, rt) -> None:
    """KLa_5 left to its loop: the answer forecasts the air it will need (1/d, quantiles, within the DO
    controller's output limits [0, 240], inside the physical [0, 360]), the
    setpoint held at its last value over the horizon, exactly what the runtime gives for that request; Q_intr,
    planned, is not forecast. hold_controls leaves the looped control whose setpoint is sent to its loop."""
    assert [loop["control"] for loop in rt.loops] == ["KLa_5", "Q_intr"]
    body = closed_loop_body(rt) | {"quantiles": [0.1, 0.5, 0.9], "samples": 50, "seed": 1}
    r = post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()["series"][0]
    fc = out["forecast"]
    assert list(fc) == [*rt.measurements, "KLa_5"]
    kla = fc["KLa_5"]
    assert kla["unit"] == "1/d" and set(kla["quantiles"]) == {"0.1", "0.5", "0.9"} and len(kla["mean"]) == H
    j = rt.outputs.index("KLa_5")
    lo, hi = rt.out_bounds[0][j], rt.out_bounds[1][j]
    assert (lo, hi) == (0.0, 240.0)  # the loop never runs the blower past its controller's limit
    for values in [kla["mean"], *kla["quantiles"].values()]:
        assert all(lo <= v <= hi for v in values)
    # A DO setpoint the blower cannot hold: no sample of the air past the limit either (they reached 360).
    high = closed_loop_body(rt, do=4.0) | {"quantiles": [0.99], "samples": 100, "seed": 1}
    high["series"][0]["controls"]["KLa_5"] = [235.0] * len(high["series"][0]["timestamps"])
    r = post(server, high)
    assert r.status_code == 200, r.text
    answer = r.json()["series"][0]
    assert max(answer["forecast"]["KLa_5"]["quantiles"]["0.99"]) <= 240.0
    assert {"variable": "KLa_5", "output": "quantiles.0.99", "bound": "max"}.items() <= next(
        c for c in answer["clipped"] if c["variable"] == "KLa_5"
    ).items()  # the samples did go past it: held there, and said so
    assert np.all(np.array(kla["quantiles"]["0.1"]) <= np.array(kla["quantiles"]["0.9"]))

    x, u, uf, last = arrays(make_body(rt, horizon=H), rt)  # the same history and plan, KLa_5 then left out
    uf[0, :, rt.controls.index("KLa_5")] = np.nan
    s_hist = np.full((1, x.shape[1], 2), np.nan)
    s_hist[0, :, 0] = 2.0
    s_fut = np.full((1, H, 2), np.nan)
    s_fut[0, :, 0] = 2.0  # held
    direct = np.clip(rt.predict(x, u, uf, last, s_hist=s_hist, s_fut=s_fut).mean[0], *rt.out_bounds)
    assert np.allclose(kla["mean"], direct[:, j], rtol=1e-5)
    assert np.allclose(fc["SNH_eff"]["mean"], direct[:, rt.outputs.index("SNH_eff")], rtol=1e-5, atol=1e-6)

    # The setpoint's plan at its held value answers alike.
    planned = closed_loop_body(rt)
    planned["series"][0]["future_setpoints"] = {"SO_5_setpoint": [2.0] * H}
    again = post(server, planned).json()["series"][0]["forecast"]
    assert again["KLa_5"]["mean"] == pytest.approx(kla["mean"], rel=1e-6)

    # The answer's size is foretold with KLa_5 counted: a bound between the two sizes refuses only this request.
    n_x, q = len(rt.measurements), len(body["quantiles"])
    limit = answer_bytes([SeriesShape(0, True, n_x)], q, H) + 10
    assert answer_bytes([SeriesShape(0, True, n_x + 1)], q, H) > limit
    settings = Settings(max_answer_bytes=limit)
    decode(
        parse(json.dumps(make_body(rt, horizon=H) | {"quantiles": body["quantiles"]}).encode(), LIMITS), rt, settings
    )
    with pytest.raises(ProblemError, match="Answer too large"):
        decode(parse(json.dumps(body).encode(), LIMITS), rt, settings)

    # hold_controls with the DO setpoint sent: KLa_5 to its loop, every other control held at its last value.
    held = closed_loop_body(rt)
    s = held["series"][0]
    s.pop("future_controls")
    s["hold_controls"] = True
    by_hold = post(server, held).json()["series"][0]["forecast"]
    s.pop("hold_controls")
    s["future_controls"] = {n: [s["controls"][n][-1]] * H for n in rt.controls if n != "KLa_5"}
    explicit = post(server, held).json()["series"][0]["forecast"]
    assert list(by_hold) == [*rt.measurements, "KLa_5"] and by_hold == explicit


def test_leaving_out_an_open_loop_control_or_a_loop_without_its_setpoint_is_refused(server, rt) -> None:
    body = closed_loop_body(rt)
    body["series"][0]["future_controls"].pop("KLa_3")
    msg = errors(post(server, body))["series[0].future_controls.KLa_3"]
    assert "no loop drives KLa_3" in msg and "KLa_5, Q_intr" in msg

    bare = make_body(rt, horizon=H)
    bare["series"][0]["future_controls"].pop("Q_intr")  # no SNO_2_setpoint sent
    msg = errors(post(server, bare))["series[0].future_controls.Q_intr"]
    assert "future_setpoints.SNO_2_setpoint" in msg and "setpoints.SNO_2_setpoint" in msg

    unlogged = closed_loop_body(rt)
    unlogged["series"][0]["setpoints"]["SO_5_setpoint"] = [None] * len(unlogged["series"][0]["timestamps"])
    msg = errors(post(server, unlogged))["series[0].future_controls.KLa_5"]
    assert "holds no value" in msg


def test_a_setpoint_plan_answers_as_the_same_setpoints_sent_as_future_setpoints(server, rt) -> None:
    """DO 1.5, 2.0 and 2.5 compared in one request, KLa_5 left to its loop: each plan answers, to numerical
    precision, what a plain request with those future_setpoints gets, the air each needs among its variables."""
    base = closed_loop_body(rt)
    s = base["series"][0]
    controls = s.pop("future_controls")
    levels = (1.5, 2.0, 2.5)
    s["plans"] = [
        {"name": f"DO {do}", "future_controls": controls, "future_setpoints": {"SO_5_setpoint": [do] * H}}
        for do in levels
    ]
    r = post(server, base)
    assert r.status_code == 200, r.text
    plans = r.json()["series"][0]["plans"]
    assert [p["name"] for p in plans] == ["DO 1.5", "DO 2.0", "DO 2.5"]
    for plan, do in zip(plans, levels, strict=True):
        assert list(plan["forecast"]) == list(plan["summary"]) == [*rt.measurements, "KLa_5"]
        single = json.loads(json.dumps(base))
        one = single["series"][0]
        one.pop("plans")
        one["future_controls"] = controls
        one["future_setpoints"] = {"SO_5_setpoint": [do] * H}
        alone = post(server, single).json()["series"][0]["forecast"]
        for name, f in plan["forecast"].items():
            assert np.allclose(f["mean"], alone[name]["mean"], rtol=1e-5, atol=1e-6), name
    assert plans[0]["forecast"]["KLa_5"] != plans[2]["forecast"]["KLa_5"]


def test_every_plan_of_a_series_gives_the_same_variables(server, rt) -> None:
    base = closed_loop_body(rt)
    s = base["series"][0]
    controls = s.pop("future_controls")
    full = {**controls, "KLa_5": [150.0] * H}
    sp = {"SO_5_setpoint": [2.0] * H}
    s["plans"] = [
        {"name": "loop", "future_controls": controls, "future_setpoints": sp},
        {"name": "air", "future_controls": full, "future_setpoints": sp},
    ]
    msg = errors(post(server, base))["series[0].plans[1]"]
    assert "other variables than plans[0]" in msg and "KLa_5" in msg

    s["plans"] = [{"name": "loop", "future_controls": controls, "future_setpoints": sp}]
    s["future_setpoints"] = sp
    assert "once" in errors(post(server, base))["series[0].plans[0].future_setpoints.SO_5_setpoint"]


def test_the_model_endpoint_describes_the_loops(server, rt) -> None:
    loops = server.client.get("/model").json()["closed_loops"]
    assert loops["loops"][0] == {
        "control": "KLa_5",
        "control_unit": "1/d",
        "setpoint": "SO_5_setpoint",
        "setpoint_unit": "g O2/m3",
        "measurement": "SO_5",
        "may_be_left_out": True,
        "output_limits": [0.0, 240.0],  # the DO controller's limit (the catalog's output_max)
    }
    assert "left out" in loops["rule"]


PRE_LOOPS = "20261130-040540-default"  # the previous default, kept in the committed store for rollback


def test_a_model_without_loops_takes_every_controls_plan_as_before(serve, tmp_path: Path) -> None:
    """A model from before the loops (the previous default) has none: every control's plan is needed ("missing"
    as before), the answer holds the measurements only, and hold_controls with setpoints sent still holds every
    control."""
    store = tmp_path / "models"
    store.mkdir()
    shutil.copytree(ROOT / "models" / PRE_LOOPS, store / PRE_LOOPS)
    set_current(store, PRE_LOOPS)
    rt = ModelRuntime(Path(store) / current_version(store))
    assert rt.loops == [] and rt.outputs == rt.measurements
    server = serve(store)
    described = server.client.get("/model").json()
    assert "closed_loops" not in described
    # Its card says API 1.8's clock ("each timestamp's own UTC offset"); GET /model says the rule the service
    # follows (modelcard.card.CALENDAR_CLOCK: the plant's zone), as it reads every card's calendar.
    assert "own UTC offset" in rt.card["variables"]["calendar"]["clock"]
    assert described["variables"]["calendar"]["clock"] == CALENDAR_CLOCK
    body = closed_loop_body(rt)
    assert errors(post(server, body)) == {"series[0].future_controls.KLa_5": "missing"}
    s = body["series"][0]
    s.pop("future_controls")
    s["hold_controls"] = True
    held = post(server, body)
    assert held.status_code == 200, held.text
    s.pop("hold_controls")
    s["future_controls"] = {n: [s["controls"][n][-1]] * H for n in rt.controls}
    explicit = post(server, body).json()["series"][0]["forecast"]
    assert list(explicit) == rt.measurements and held.json()["series"][0]["forecast"] == explicit
    x, u, uf, last = arrays(body, rt)
    s_hist = np.full((1, x.shape[1], len(rt.setpoints)), np.nan)
    s_hist[0, :, 0] = 2.0
    direct = np.clip(rt.predict(x, u, uf, last, s_hist=s_hist).mean[0], *rt.x_bounds)
    assert np.allclose(np.stack([explicit[n]["mean"] for n in rt.measurements], 1), direct, rtol=1e-5, atol=1e-6)
