"""The forecast service, run for real (``python -m service`` on 127.0.0.1) with a real exported model."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelcard import runtime as runtime_module
from modelcard.runtime import SAMPLE_ROWS, ModelRuntime, one_plan_held
from modelcard.store import POINTER, current_version
from tests.conftest import ROOT, clone_version

ADMIN = {"x-api-key": "admin-secret"}


def make_body(rt: ModelRuntime, n_series: int = 1, horizon: int = 8, seed: int = 0) -> dict:
    """A realistic request: history values drawn around the card's scalers, within the training range."""
    rng = np.random.default_rng(seed)
    L = rt.card["history"]["length"]
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    series = []
    for i in range(n_series):
        x = np.clip(rt.x_mean + rt.x_std * 0.3 * rng.standard_normal((L, len(rt.x_mean))), *rt.x_range)
        u = np.clip(rt.u_mean + rt.u_std * 0.3 * rng.standard_normal((L, len(rt.u_mean))), *rt.u_range)
        uf = np.clip(rt.u_mean + rt.u_std * 0.3 * rng.standard_normal((horizon, len(rt.u_mean))), *rt.u_range)
        series.append(
            {
                "id": f"plant-{i}",
                "timestamps": [(t0 + timedelta(minutes=15 * k)).isoformat() for k in range(L)],
                "measurements": {n: x[:, j].tolist() for j, n in enumerate(rt.measurements)},
                "controls": {n: u[:, j].tolist() for j, n in enumerate(rt.controls)},
                "future_controls": {n: uf[:, j].tolist() for j, n in enumerate(rt.controls)},
            }
        )
    return {"series": series, "horizon": horizon}


def arrays(body: dict, rt: ModelRuntime) -> tuple[np.ndarray, ...]:
    """The runtime's inputs for a request body, the clock time read straight from the last timestamp."""
    s = body["series"]
    x = np.stack([np.stack([d["measurements"][n] for n in rt.measurements], 1) for d in s])
    u = np.stack([np.stack([d["controls"][n] for n in rt.controls], 1) for d in s])
    uf = np.stack([np.stack([d["future_controls"][n] for n in rt.controls], 1) for d in s])
    last = [datetime.fromisoformat(d["timestamps"][-1]) for d in s]
    return x, u, uf, np.array([t.weekday() * 1440 + t.hour * 60 + t.minute for t in last])


def problem_fields(r: httpx.Response) -> list[str]:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body = r.json()
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == r.status_code
    assert "Traceback" not in r.text
    return [e["field"] for e in body.get("errors", [])]


def direct_forecast(version_dir: Path, x: np.ndarray, u: np.ndarray, uf: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The measurements' mean forecast from model.onnx run by ONNX Runtime itself, its inputs built by hand as the
    card describes them (not through ModelRuntime, which the service runs): every control planned, no setpoints
    sent, no influent forecast, held within the measurements' physical bounds."""
    import onnxruntime as ort

    card = json.loads((version_dir / "card.json").read_text())
    v = card["variables"]
    x_mean, x_std = (np.array([m[k] for m in v["measurements"]]) for k in ("mean", "std"))
    u_mean, u_std = (np.array([c[k] for c in v["controls"]]) for k in ("mean", "std"))
    looped = [[c["name"] for c in v["controls"]].index(loop["control"]) for loop in v["loops"]]
    dist = [[m["name"] for m in v["measurements"]].index(n) for n in v["disturbance_inputs"]["variables"]]
    n_setpoints, step = len(v["setpoint_inputs"]["variables"]), card["sample_minutes"]
    out_mean, out_std = np.concatenate([x_mean, u_mean[looped]]), np.concatenate([x_std, u_std[looped]])

    def known(controls: np.ndarray, minutes: np.ndarray, dist_z: np.ndarray, dist_known: float) -> np.ndarray:
        """Scaled controls, a flag per looped control (given), setpoints (value, flag: not sent), the calendar,
        the disturbances (value, flag)."""
        calendar = []
        for name in v["calendar"]["features"]:  # e.g. day_sin_2: sin(2 pi 2 m / P)
            period, fn, k = name.split("_")
            p = 1440 if period == "day" else 7 * 1440
            calendar.append(getattr(np, fn)(2 * np.pi * int(k) * (minutes % p) / p))
        given = np.ones((*controls.shape[:2], len(looped)))
        unknown = np.zeros((*controls.shape[:2], 2 * n_setpoints))
        flags = np.full(dist_z.shape, dist_known)
        return np.concatenate([(controls - u_mean) / u_std, given, unknown, np.stack(calendar, -1), dist_z, flags], -1)

    L, H = x.shape[1], uf.shape[1]
    t_hist = last[:, None] + step * np.arange(1 - L, 1)
    t_fut = last[:, None] + step * np.arange(1, H + 1)
    feeds = {
        "x_hist": (np.concatenate([x, u[..., looped]], -1) - out_mean) / out_std,
        "u_hist": known(u, t_hist, (x[..., dist] - x_mean[dist]) / x_std[dist], 1.0),
        "u_fut": known(uf, t_fut, np.zeros((len(x), H, len(dist))), 0.0),
        "noise": np.zeros((len(x), 0, H, card["model"]["z_dim"])),
    }
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (mean,) = sess.run(["mean"], {k: a.astype(np.float32) for k, a in feeds.items()})
    lo, hi = (np.array([m["bounds"][k] for m in v["measurements"]]) for k in ("min", "max"))
    return np.clip((mean * out_std + out_mean)[..., : len(x_mean)], lo, hi)


def test_forecast_matches_a_direct_onnx_runtime_call(server, rt, trained_store) -> None:
    """The service's forecast is the exported graph's, checked against ONNX Runtime run on inputs normalised by
    hand from the card: a scaling or column-order slip shared by ModelRuntime and the service would show."""
    store, version = trained_store
    body = make_body(rt, n_series=3, horizon=12)
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_version"] == rt.version and out["stability"]["stable"] is True
    assert out["stability"]["spectral_radius"] == rt.card["stability"]["spectral_radius"]
    # Every control planned: the measurements answered, no looped control.
    expected = direct_forecast(store / version, *arrays(body, rt))
    for i, s in enumerate(out["series"]):
        assert s["id"] == f"plant-{i}"
        got = np.stack([s["forecast"][n]["mean"] for n in rt.measurements], 1)
        assert np.allclose(got, expected[i], rtol=1e-5, atol=1e-6)
        last = datetime.fromisoformat(body["series"][i]["timestamps"][-1])
        assert [datetime.fromisoformat(t) for t in s["timestamps"]] == [
            last + timedelta(minutes=15 * (k + 1)) for k in range(12)
        ]


def test_time_of_day_and_week_are_inputs_read_in_the_plant_clock(serve) -> None:
    """Same history a week later: same forecast. Six hours or a day later: another forecast, since the cycles
    follow the plant's clock. The same instants written in another UTC offset: the same forecast, since the
    plant's clock is its card's zone's (it was the offset's, so a client writing UTC shifted the plant's day).
    Runs on the committed default model (the tiny one has no weekly inputs)."""
    store = Path(__file__).resolve().parents[1] / "models"
    server = serve(store)
    rt = ModelRuntime(store / current_version(store))
    assert rt.calendar.daily > 0 and rt.calendar.weekly > 0
    from modelcard.card import CALENDAR_CLOCK

    assert server.client.get("/model").json()["variables"]["calendar"]["clock"] == CALENDAR_CLOCK

    def forecast(shift: timedelta, tz: timezone = UTC) -> np.ndarray:
        body = make_body(rt, horizon=8)
        ts = body["series"][0]["timestamps"]
        body["series"][0]["timestamps"] = [(datetime.fromisoformat(t) + shift).astimezone(tz).isoformat() for t in ts]
        r = server.client.post("/forecast", json=body)
        assert r.status_code == 200, r.text
        return np.array(r.json()["series"][0]["forecast"]["Q_in"]["mean"])

    base = forecast(timedelta(0))
    assert np.allclose(forecast(timedelta(days=7)), base, rtol=1e-6)
    assert not np.allclose(forecast(timedelta(hours=6)), base, rtol=1e-3)
    assert not np.allclose(forecast(timedelta(days=1)), base, rtol=1e-3)
    assert np.allclose(forecast(timedelta(0), timezone(timedelta(hours=6))), base, rtol=1e-6)


def test_quantiles_and_hold_controls(server, rt) -> None:
    body = make_body(rt, horizon=rt.max_horizon)
    series = body["series"][0]
    last = {n: [series["controls"][n][-1]] * rt.max_horizon for n in rt.controls}
    explicit = server.client.post("/forecast", json={**body, "series": [{**series, "future_controls": last}]})
    assert explicit.status_code == 200, explicit.text
    del series["future_controls"]
    series["hold_controls"] = True
    r = server.client.post("/forecast", json={**body, "quantiles": [0.1, 0.5, 0.9], "samples": 64})
    assert r.status_code == 200, r.text
    fc = r.json()["series"][0]["forecast"]
    for name in rt.measurements:
        q = {k: np.array(v) for k, v in fc[name]["quantiles"].items()}
        assert set(q) == {"0.1", "0.5", "0.9"} and len(q["0.5"]) == rt.max_horizon
        assert np.all(q["0.1"] <= q["0.5"] + 1e-9) and np.all(q["0.5"] <= q["0.9"] + 1e-9)
        assert np.any(q["0.9"] > q["0.1"])
        assert fc[name]["mean"] == pytest.approx(explicit.json()["series"][0]["forecast"][name]["mean"], rel=1e-6)


@pytest.mark.parametrize(
    ("mutate", "status", "field"),
    [
        (lambda b: b["series"][0]["measurements"].pop("SO_5"), 422, "series[0].measurements.SO_5"),
        (lambda b: b["series"][0]["measurements"].update(SO_9=[1.0]), 422, "series[0].measurements.SO_9"),
        (lambda b: b["series"][0]["controls"]["KLa_5"].pop(), 422, "series[0].controls.KLa_5"),
        (lambda b: b["series"][0]["future_controls"]["Q_intr"].append(1.0), 422, "series[0].future_controls.Q_intr"),
        (
            lambda b: b["series"][0]["timestamps"].__setitem__(3, "2026-03-01T00:50:00+00:00"),
            422,
            "series[0].timestamps[3]",
        ),
        (lambda b: b["series"][0]["timestamps"].__setitem__(1, "not a time"), 422, "series[0].timestamps[1]"),
        (lambda b: b.update(horizon=10_000), 422, "horizon"),
        (lambda b: b.update(horizon=0), 422, "horizon"),
        (lambda b: b.update(quantiles=[0.5, 1.5]), 422, "quantiles[1]"),
        (lambda b: b.update(samples=10**6, quantiles=[0.5]), 422, "samples"),
        (lambda b: b.update(series=b["series"] * 65), 422, "series"),
        (lambda b: b.update(series=[]), 422, "series"),
        (lambda b: b.update(extra=1), 422, "extra"),
        (lambda b: b["series"][0].pop("future_controls"), 422, "series[0].future_controls"),
    ],
)
def test_bad_requests_get_a_problem_naming_the_field(server, rt, mutate, status, field) -> None:
    body = make_body(rt)
    mutate(body)
    r = server.client.post("/forecast", json=body)
    assert r.status_code == status, r.text
    assert field in problem_fields(r)


def test_timestamps_of_the_wrong_length_are_named_rather_than_every_array(server, rt) -> None:
    """One timestamp short: the fault is the timestamps', not each of the arrays that agree with one another."""
    body = make_body(rt)
    body["series"][0]["timestamps"].pop()
    assert rt.card["history"]["min"] <= len(body["series"][0]["timestamps"])
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422, r.text
    assert problem_fields(r) == ["series[0].timestamps"]
    assert f"has {rt.card['history']['length']} values" in r.json()["detail"]
    body["series"][0]["measurements"].pop("SO_5")  # and what else is wrong is still named
    body["series"][0].pop("future_controls")
    r = server.client.post("/forecast", json=body)
    fields = ["series[0].timestamps", "series[0].measurements.SO_5", "series[0].future_controls"]
    assert r.status_code == 422 and problem_fields(r) == fields


def test_non_finite_values_malformed_json_and_huge_bodies(server, rt) -> None:
    body = make_body(rt)
    text = json.dumps(body).replace(str(body["series"][0]["measurements"]["SO_3"][2]), "NaN", 1)
    r = server.client.post("/forecast", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "series[0].measurements.SO_3[2]" in problem_fields(r)
    r = server.client.post("/forecast", content=b'{"series": [', headers={"content-type": "application/json"})
    assert r.status_code == 422
    problem_fields(r)
    r = server.client.post("/forecast", content=b"x" * 9_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    problem_fields(r)
    # Chunked, with no Content-Length to check up front: the limit holds on the bytes received.
    chunks = (b"x" * 1_000_000 for _ in range(9))
    r = server.client.post("/forecast", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "content-length" not in r.request.headers
    problem_fields(r)
    assert server.client.get("/no/such/route").status_code == 404


def test_api_keys(serve, trained_store, rt) -> None:
    store, _ = trained_store
    s = serve(store, KOVAE_API_KEYS='["k1", "k2"]')
    body = make_body(rt)
    assert s.client.post("/forecast", json=body).status_code == 401
    assert s.client.post("/forecast", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert s.client.post("/forecast", json=body, headers={"x-api-key": "k2"}).status_code == 200
    r = s.client.post("/admin/reload", headers={"x-api-key": "k1"})
    assert r.status_code == 403  # no admin keys configured: admin is disabled, forecast keys do not open it
    problem_fields(r)
    assert s.client.get("/healthz").status_code == 200  # probes stay open


def test_model_endpoint_reports_stability(server, rt) -> None:
    card = server.client.get("/model").json()
    assert card["version"] == rt.version
    st = card["stability"]
    assert (
        st["stable"]
        and 0 < st["spectral_radius"] < 1
        and st["stability_margin"] == pytest.approx(1 - st["spectral_radius"])
    )
    assert {"real", "imag", "modulus", "decay_hours", "period_hours"} <= set(st["eigenvalues"][0])
    assert [v["name"] for v in card["variables"]["measurements"]] == rt.measurements
    assert card["variables"]["measurements"][0]["unit"] == "m3/d"
    assert "operator" not in card
    # How this service reads the clock, whatever an older card wrote ("each timestamp's own UTC offset": API 1.8).
    from modelcard.card import CALENDAR_CLOCK

    assert card["variables"]["calendar"]["clock"] == CALENDAR_CLOCK


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_reload_success_and_refusal_of_a_corrupt_model(serve, store_copy, rt) -> None:
    store, version = store_copy
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    assert s.client.post("/admin/reload").status_code == 401
    r = s.client.post("/admin/reload", headers=ADMIN).json()
    assert {k: r[k] for k in ("model_version", "changed")} == {"model_version": version, "changed": False}

    clone_version(store, version, "v2")
    (store / POINTER).write_text("v2\n")
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert {k: r.json()[k] for k in ("model_version", "changed")} == {"model_version": "v2", "changed": True}
    assert s.client.get("/readyz").json()["model_version"] == "v2"

    clone_version(store, version, "v3-corrupt")
    onnx_path = store / "v3-corrupt" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10] + b"0123456789")
    (store / POINTER).write_text("v3-corrupt\n")
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "v3-corrupt" in r.json()["detail"]
    ready = s.client.get("/readyz").json()
    assert (ready["status"], ready["model_version"], ready["refused"]["version"]) == ("ready", "v2", "v3-corrupt")
    assert s.client.post("/forecast", json=make_body(rt)).json()["model_version"] == "v2"
    metrics = s.client.get("/metrics").text
    assert _metric(metrics, 'kovae_model_reloads_total{outcome="failure"}') == 1
    assert _metric(metrics, 'kovae_model_info{version="v2"}') == 1
    assert _metric(metrics, f'kovae_model_info{{version="{version}"}}') == 0
    assert "reload of v3-corrupt refused" in s.stop()


def test_poller_picks_up_a_new_current_version(serve, store_copy) -> None:
    import time

    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.2")
    clone_version(store, version, "v-polled")
    (store / POINTER).write_text("v-polled\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and s.client.get("/readyz").json()["model_version"] != "v-polled":
        time.sleep(0.1)
    assert s.client.get("/readyz").json()["model_version"] == "v-polled"


def test_not_ready_until_a_model_arrives(serve, trained_store, tmp_path, rt) -> None:
    store, version = trained_store
    empty = tmp_path / "empty-store"
    empty.mkdir()
    s = serve(empty, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    assert s.client.get("/healthz").status_code == 200
    r = s.client.get("/readyz")
    assert r.status_code == 503 and r.json()["model_version"] is None
    r = s.client.post("/forecast", json=make_body(rt))
    assert r.status_code == 503
    problem_fields(r)
    assert s.client.post("/admin/reload", headers=ADMIN).status_code == 409
    shutil.copytree(store / version, empty / version)
    (empty / POINTER).write_text(version)
    assert s.client.post("/admin/reload", headers=ADMIN).status_code == 200
    assert s.client.get("/readyz").status_code == 200
    assert current_version(empty) == version


def test_metrics_are_exposed_and_counted(server, rt) -> None:
    before = server.client.get("/metrics").text
    server.client.post("/forecast", json=make_body(rt, n_series=2, horizon=8))
    server.client.post("/forecast", json={"horizon": 1})
    text = server.client.get("/metrics").text
    ok = 'kovae_http_requests_total{method="POST",route="/forecast",status_class="2xx"}'
    bad = 'kovae_http_requests_total{method="POST",route="/forecast",status_class="4xx"}'
    assert _metric(text, ok) == _metric(before, ok) + 1
    assert _metric(text, bad) == _metric(before, bad) + 1
    assert _metric(text, 'kovae_errors_total{type="invalid_request"}') >= 1
    assert _metric(text, "kovae_forecast_batch_size_sum") >= 2
    assert _metric(text, "kovae_inference_duration_seconds_count") >= 1
    assert 'kovae_http_request_duration_seconds_bucket{le="0.01",route="/forecast",status_class="2xx"}' in text
    assert _metric(text, "kovae_model_spectral_radius") == pytest.approx(rt.card["stability"]["spectral_radius"])


def test_several_workers_share_metrics(serve, trained_store, rt, tmp_path) -> None:
    """Every request and every /metrics read on a fresh connection, so they land on either worker: each page
    must count all of them, not only those of the worker that renders it."""
    store, _ = trained_store
    s = serve(store, KOVAE_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    ok = 'kovae_http_requests_total{method="POST",route="/forecast",status_class="2xx"}'
    body = make_body(rt)
    for _ in range(12):
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/forecast", json=body).status_code == 200
    for _ in range(8):
        with httpx.Client(base_url=s.url, timeout=30) as c:
            page = c.get("/metrics").text
            assert _metric(page, ok) == 12
            # Both workers serve: the supervisor's own gauges (0) must not count as a worker's.
            assert _metric(page, "kovae_model_ready") == 1 and _metric(page, "kovae_model_refused") == 0


def test_openapi_json_and_yaml_are_what_the_app_serves(serve) -> None:
    """The committed documents, JSON and YAML, are what a server of the committed default model serves (limits
    included), and the YAML is what the generator writes for it."""
    import yaml

    from service.openapi import as_yaml

    server = serve(ROOT / "models")
    served = server.client.get("/openapi.json").json()
    checked_in = json.loads((ROOT / "openapi.json").read_text())
    assert checked_in == served, "run `python -m service.openapi` and commit openapi.json and openapi.yaml"
    yaml_text = (ROOT / "openapi.yaml").read_text()
    assert yaml.safe_load(yaml_text) == served, "run `python -m service.openapi` and commit openapi.yaml"
    assert yaml_text == as_yaml(served)
    assert served["info"]["version"]


def test_the_openapi_writer_refuses_a_target_it_would_overwrite_or_cannot_write(tmp_path, monkeypatch, capsys) -> None:
    """spec.yaml was written as JSON and then overwritten by its YAML; a missing folder or store was a traceback."""
    from service.openapi import main

    for target, words in ((tmp_path / "spec.yaml", "does not end in .json"), (tmp_path / "no" / "x.json", "no folder")):
        with pytest.raises(SystemExit):
            main([str(target)])
        assert words in capsys.readouterr().err
    monkeypatch.setenv("KOVAE_MODEL_STORE", str(tmp_path / "nostore"))
    assert main([str(tmp_path / "spec.json")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "spec.json").exists()


def test_the_service_finds_the_committed_model_from_any_folder(tmp_path) -> None:
    """No KOVAE_MODEL_STORE and another working folder: the project's own models/ is served, and the log says
    which store was used."""
    from tests.conftest import Server

    s = Server(None, cwd=tmp_path)
    try:
        ready = s.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model_version"] == current_version(ROOT / "models")
    finally:
        log = s.stop()
    assert f"model store: {ROOT / 'models'} (the project's models folder)" in log


def test_every_log_line_is_json_with_the_request_id(serve, trained_store, rt) -> None:
    store, _ = trained_store
    s = serve(store)
    assert s.client.post("/forecast", json=make_body(rt), headers={"x-request-id": "ok-1"}).status_code == 200
    assert s.client.post("/forecast", json={"horizon": 1}, headers={"x-request-id": "bad-1"}).status_code == 422
    # An id that is not printable ASCII is replaced (it came back as the UTF-8 of its bytes: another id).
    odd = s.client.get("/healthz", headers={"x-request-id": "\xe9\xe9<b>".encode("latin-1")}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", odd), odd
    lines = [json.loads(line) for line in s.stop().splitlines() if line.strip()]  # every line parses
    access = {e["request_id"]: e for e in lines if e.get("event") == "request"}
    assert {k: access["ok-1"][k] for k in ("method", "path", "status")} == {
        "method": "POST",
        "path": "/forecast",
        "status": 200,
    }
    assert access["bad-1"]["status"] == 422 and access["bad-1"]["duration_ms"] > 0
    refused = [e for e in lines if e.get("event") == "refused" and e["request_id"] == "bad-1"]
    assert refused and "series" in refused[0]["message"]
    assert any(e["logger"].startswith("uvicorn") for e in lines)  # uvicorn's own lines are JSON too


def test_every_route_has_its_own_metrics_label() -> None:
    """The middleware labels metrics by route from a list of its own (anything else is "other", so a scanner
    cannot explode the label's values): a route added to the app and not to that list would be counted as
    "other" and vanish from the dashboard and the alerts."""
    from service.app import create_app
    from service.middleware import ROUTES
    from service.settings import Settings

    app = create_app(Settings(model_store=ROOT / "models"))
    assert {r.path for r in app.routes} == ROUTES


def test_service_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, service.app, service.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_schemathesis_all_checks(server) -> None:
    """Property-based requests generated from the served OpenAPI spec, with every check: no 5xx, responses that
    conform to the published schema (status codes, content types, headers, bodies), 405s with Allow, and
    invalid data rejected. Two checks cannot apply here: positive_data_acceptance (equal array lengths and
    15-minute spacing are not expressible in JSON Schema, so schema-valid bodies are still refused) and
    ignored_auth (the key is sent as a blanket header; test_api_keys covers authentication)."""
    import re
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance,ignored_auth",
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        "150",
        "--workers",
        "1",
        "-H",
        "x-api-key: admin-secret",
        "--seed",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    ran = re.search(r"(\d+) generated, \1 passed", out.stdout)
    assert ran and int(ran.group(1)) >= 150, out.stdout[-2000:]


def test_unexpected_errors_become_a_problem_without_internals() -> None:
    """Whatever escapes a route: a 500 problem+json with the request id, no exception text, and a metric."""
    import asyncio

    from service import metrics
    from service.app import ObserveMiddleware

    async def broken_route(scope, receive, send) -> None:
        raise RuntimeError("secret internal detail")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=ObserveMiddleware(broken_route, max_body_bytes=100))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get("/forecast", headers={"x-request-id": "req-42"})

    before = metrics.ERRORS.labels("internal")._value.get()
    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    problem_fields(r)
    assert "secret" not in r.text and r.json()["request_id"] == "req-42"
    assert metrics.ERRORS.labels("internal")._value.get() == before + 1


def test_sensor_gaps_in_the_history_are_forecast_through_up_to_the_cards_limit(server, rt) -> None:
    """null marks a missing sample: a sensor down for the last steps and a control missing at the end still get
    a forecast, and the response says which inputs had gaps. Holding controls holds the last value before a gap.
    Beyond the card's share (history.max_missing_share): a 422 naming the variable and how much is missing."""
    share = rt.max_missing_share
    assert share == 0.5
    body = make_body(rt, horizon=4)
    s = body["series"][0]
    L = len(s["timestamps"])
    sensor, control = rt.measurements[-1], rt.controls[0]
    s["measurements"][sensor][L - L // 8 :] = [None] * (L // 8)
    s["controls"][control][-1] = None
    del s["future_controls"]
    s["hold_controls"] = True
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["series"][0]
    assert out["gaps"] == {sensor: L // 8, control: 1}
    assert all(np.isfinite(v["mean"]).all() for v in out["forecast"].values())
    # The sensor down now is named, with its last value and how old it is; the control is not a sensor.
    (stale,) = [w for w in out["warnings"] if w["kind"] == "stale"]
    assert stale["variable"] == sensor and stale["field"] == f"series[0].measurements.{sensor}"
    assert stale["last_index"] == L - L // 8 - 1 and stale["minutes"] == L // 8 * rt.step_minutes
    assert stale["value"] == s["measurements"][sensor][L - L // 8 - 1]
    counted = f'kovae_input_warnings_total{{kind="stale",variable="{sensor}"}}'
    assert _metric(server.client.get("/metrics").text, counted) >= 1  # which sensors are down, for the dashboard
    # Held controls: the last value before the gap, as if it had been sent for the future.
    explicit = json.loads(json.dumps(body))
    held = s["controls"][control][-2]
    explicit["series"][0]["hold_controls"] = False
    explicit["series"][0]["future_controls"] = {
        n: [held if n == control else s["controls"][n][-1]] * 4 for n in rt.controls
    }
    again = server.client.post("/forecast", json=explicit)
    assert again.json()["series"][0]["forecast"] == out["forecast"]

    too_many = int(share * L) + 1
    fresh = make_body(rt, horizon=4)["series"][0]["measurements"][sensor]
    s["measurements"][sensor] = [None] * too_many + fresh[too_many:]
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422
    err = next(e for e in r.json()["errors"] if e["field"] == f"series[0].measurements.{sensor}")
    assert f"{too_many} of {L} values missing" in err["message"] and f"at most {int(share * L)}" in err["message"]
    body["series"][0]["hold_controls"] = False
    body["series"][0]["future_controls"] = {n: [None] * 4 for n in rt.controls}  # the plan must be complete
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422 and "future_controls" in r.text


def test_quantiles_without_samples_draw_what_the_intervals_were_fitted_for(serve, trained_store, rt) -> None:
    """No samples in the request: the card's calibration.samples are drawn (the width was fitted for that
    many), or KOVAE_DEFAULT_SAMPLES where it is set."""
    store, _ = trained_store
    body = {**make_body(rt, horizon=4), "quantiles": [0.1, 0.9], "seed": 5}

    def quantiles(server, samples: int | None) -> dict:
        req = body if samples is None else {**body, "samples": samples}
        r = server.client.post("/forecast", json=req)
        assert r.status_code == 200, r.text
        # SO_5: the tiny model's ammonium bands reach both physical bounds, whatever the samples
        return r.json()["series"][0]["forecast"]["SO_5"]["quantiles"]

    fitted = rt.calibration_samples
    assert fitted == rt.card["calibration"]["samples"]
    server = serve(store)
    assert quantiles(server, None) == quantiles(server, fitted) != quantiles(server, fitted + 5)
    other = serve(store, KOVAE_DEFAULT_SAMPLES="7")
    assert quantiles(other, None) == quantiles(other, 7) != quantiles(other, fitted)


def test_many_plans_run_in_chunks_each_as_its_own_series(rt) -> None:
    """Plans with samples run SAMPLE_ROWS trajectories at a time: every plan's mean and samples are what the
    ordinary graph gives the history repeated, in order, with the same noise (without samples: one run)."""
    rng = np.random.default_rng(3)
    L, H, n = rt.card["history"]["length"], 6, SAMPLE_ROWS + 45
    x = rt.x_mean + 0.2 * rt.x_std * rng.standard_normal((L, len(rt.x_mean)))
    u = rt.u_mean + 0.2 * rt.u_std * rng.standard_normal((L, len(rt.u_mean)))
    plans = rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((n, H, len(rt.u_mean)))
    for samples in (0, 3):
        got = rt.predict_plans(x, u, plans, 600.0, samples, np.random.default_rng(7))
        xs, us = np.repeat(x[None], n, 0), np.repeat(u[None], n, 0)
        want = rt.predict(xs, us, plans, np.full(n, 600.0), samples, np.random.default_rng(7))
        assert got.mean.shape == (n, H, len(rt.outputs))
        assert np.allclose(got.mean, want.mean, rtol=1e-5, atol=1e-5 * rt.out_std)
        if samples:
            assert got.samples.shape == want.samples.shape
            assert np.allclose(got.samples, want.samples, rtol=1e-5, atol=1e-5 * rt.out_std)


def test_plans_with_other_plans_held_answer_as_separate_series(rt, monkeypatch) -> None:
    """The plans graph rolls out one plan held for all plans. Setpoint plans whose setpoints have no history and
    differ at their first step each have their own (held at their first value): the runtime then runs them as
    separate series, and they answer what the ordinary graph gives each (the plans graph would not)."""
    rng = np.random.default_rng(4)
    L, H, n = rt.card["history"]["length"], 6, 5
    x = rt.x_mean + 0.2 * rt.x_std * rng.standard_normal((L, len(rt.x_mean)))
    u = rt.u_mean + 0.2 * rt.u_std * rng.standard_normal((L, len(rt.u_mean)))
    plans = np.repeat(rt.u_mean + 0.3 * rt.u_std * rng.standard_normal((1, H, len(rt.u_mean))), n, 0)
    plans[..., rt.looped] = np.nan  # left to their loops
    s_fut = np.repeat((rt.s_mean + rt.s_std * np.linspace(-1, 1, n)[:, None])[:, None], H, 1)  # (n, H, setpoints)
    assert one_plan_held(u, plans, None, np.broadcast_to(s_fut[:1], s_fut.shape))  # alike
    assert not one_plan_held(u, plans, None, s_fut)
    assert one_plan_held(u, plans, np.repeat(s_fut[0, :1], L, 0), s_fut)  # the history holds them: held alike
    xs, us = np.repeat(x[None], n, 0), np.repeat(u[None], n, 0)
    want = rt.predict(xs, us, plans, np.full(n, 600.0), s_fut=s_fut).mean
    got = rt.predict_plans(x, u, plans, 600.0, s_fut=s_fut).mean
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * rt.out_std)
    monkeypatch.setattr(runtime_module, "one_plan_held", lambda *a: True)
    graph = rt.predict_plans(x, u, plans, 600.0, s_fut=s_fut).mean
    assert not np.allclose(graph, want, rtol=1e-3, atol=1e-3 * rt.out_std)


def test_plans_roll_one_history_out_under_many_control_plans(serve, trained_store, rt) -> None:
    """A series with plans answers one forecast per plan, in order, each the forecast the same history would
    get with that plan as its future_controls, with a summary per variable. Mixing plans with future_controls,
    repeated names and more plans than the limit are refused; the work bound counts every plan."""
    store, _ = trained_store
    server = serve(store, KOVAE_MAX_PLANS="3", KOVAE_MAX_WORK="100")
    H = 4
    body = make_body(rt, horizon=H)
    series = body["series"][0]
    first = series.pop("future_controls")
    second = {n: [v * 0.9 for v in values] for n, values in first.items()}
    series["plans"] = [{"name": "as planned", "future_controls": first}, {"name": "less", "future_controls": second}]
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["series"][0]
    assert [p["name"] for p in out["plans"]] == ["as planned", "less"] and out["forecast"] == {}
    for plan, controls in zip(out["plans"], (first, second), strict=True):
        single = json.loads(json.dumps(body))
        single["series"][0].pop("plans")
        single["series"][0]["future_controls"] = controls
        alone = server.client.post("/forecast", json=single).json()["series"][0]["forecast"]
        for name, f in plan["forecast"].items():
            assert np.allclose(f["mean"], alone[name]["mean"], rtol=1e-5, atol=1e-6)
            summary = plan["summary"][name]
            assert summary["mean"] == pytest.approx(np.mean(f["mean"])) and summary["final"] == f["mean"][-1]
            assert summary["min"] <= summary["mean"] <= summary["max"]
    assert out["plans"][0]["forecast"] != out["plans"][1]["forecast"]  # the plans differ, so do the forecasts

    # An influent forecast reaches every plan, as it reaches a series with future_controls.
    influent = {"Q_in": [float(rt.x_mean[0] * 1.5)] * H}
    with_influent = json.loads(json.dumps(body))
    with_influent["series"][0]["future_disturbances"] = influent
    planned = server.client.post("/forecast", json=with_influent).json()["series"][0]["plans"][0]["forecast"]
    single = json.loads(json.dumps(with_influent))
    single["series"][0].pop("plans")
    single["series"][0]["future_controls"] = first
    alone = server.client.post("/forecast", json=single).json()["series"][0]["forecast"]
    assert np.allclose(planned["SNH_eff"]["mean"], alone["SNH_eff"]["mean"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(planned["SNH_eff"]["mean"], out["plans"][0]["forecast"]["SNH_eff"]["mean"], rtol=1e-6)

    # Summaries only: the same summaries and clip notes, no forecasts.
    brief = json.loads(json.dumps(body))
    brief["series"][0]["plan_forecasts"] = False
    short = server.client.post("/forecast", json=brief).json()["series"][0]["plans"]
    assert [p["forecast"] for p in short] == [{}, {}]
    # Their clip notes are the mean's: no samples are drawn for quantiles the answer would not hold.
    full = [(p["summary"], [c for c in p["clipped"] if c["output"] == "mean"]) for p in out["plans"]]
    assert [(p["summary"], p["clipped"]) for p in short] == full

    def refused(change: dict, field: str) -> str:
        bad = json.loads(json.dumps(body))
        bad["series"][0].update(change)
        r = server.client.post("/forecast", json=bad)
        assert r.status_code == 422, r.text
        return next(e["message"] for e in r.json()["errors"] if e["field"] == field)

    assert "one of" in refused({"future_controls": first}, "series[0].future_controls")
    assert "repeat: less" in refused(
        {"plans": [{"name": "less", "future_controls": first}, {"name": "less", "future_controls": second}]},
        "series[0].plans",
    )
    many = [{"name": f"p{k}", "future_controls": first} for k in range(4)]
    assert "4 plans exceed 3" in refused({"plans": many}, "series[0].plans")
    r = server.client.post("/forecast", json={**body, "quantiles": [0.5], "samples": 20})  # 2 plans x 20 x 4 > 100
    assert r.status_code == 422 and "forecasts x samples x horizon = 2 x 20 x 4" in r.text
    # Without the plans' forecasts in the answer no samples are drawn (their quantiles would be dropped), so none
    # count against the work: the means alone, 2 plans x 4 steps.
    r = server.client.post("/forecast", json={**brief, "quantiles": [0.5], "samples": 20})
    assert r.status_code == 200, r.text
    assert r.json()["series"][0]["plans"] == short


def test_an_influent_forecast_is_an_optional_known_input(server, rt) -> None:
    """future_disturbances carries a forecast of any of the card's disturbance inputs (the influent): the model
    takes it (another forecast than without it, the same as the runtime gives for it), and a variable that is
    not a disturbance input, a wrong length or a value outside the physical bounds is refused by name."""
    names = rt.card["variables"]["disturbance_inputs"]["variables"]
    assert names == ["Q_in", "COD_in", "TSS_in", "SNH_in"]
    H = 4
    body = make_body(rt, horizon=H)
    without = server.client.post("/forecast", json=body).json()["series"][0]["forecast"]
    q = float(rt.x_mean[0] * 1.5)
    body["series"][0]["future_disturbances"] = {"Q_in": [q] * H}
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    given = r.json()["series"][0]["forecast"]
    assert not np.allclose(given["SNH_eff"]["mean"], without["SNH_eff"]["mean"], rtol=1e-6)
    x, u, uf, last = arrays(body, rt)
    d_fut = np.full((1, H, len(names)), np.nan)
    d_fut[0, :, 0] = q
    direct = rt.predict(x, u, uf, last, d_fut=d_fut).mean[0]
    assert np.allclose(given["SNH_eff"]["mean"], direct[:, rt.measurements.index("SNH_eff")], rtol=1e-5)
    for change, field, words in (
        ({"SO_5": [1.0] * H}, "series[0].future_disturbances.SO_5", "not a disturbance input"),
        ({"Q_in": [q] * (H + 1)}, "series[0].future_disturbances.Q_in", "expected 4"),
        ({"Q_in": [-5.0] * H}, "series[0].future_disturbances.Q_in[0]", "below the physical minimum"),
    ):
        body["series"][0]["future_disturbances"] = change
        r = server.client.post("/forecast", json=body)
        assert r.status_code == 422
        assert any(e["field"] == field and words in e["message"] for e in r.json()["errors"]), r.text


def test_loop_setpoints_are_optional_known_inputs(server, rt) -> None:
    """setpoints (history) and future_setpoints (plan) carry any of the card's loop setpoints: the model takes
    them as the runtime does (another forecast than without them), in a plans request too, and a name that is
    no setpoint, a wrong length or a value outside the physical bounds is refused by name."""
    names = [v["name"] for v in rt.card["variables"]["setpoint_inputs"]["variables"]]
    assert names == ["SO_5_setpoint", "SNO_2_setpoint"]
    H, L = 4, rt.card["history"]["length"]
    body = make_body(rt, horizon=H)
    without = server.client.post("/forecast", json=body).json()["series"][0]["forecast"]
    do_hist = [2.0] * (L - 8) + [None] * 8  # not logged lately: unknown there
    body["series"][0]["setpoints"] = {"SO_5_setpoint": do_hist}
    body["series"][0]["future_setpoints"] = {"SO_5_setpoint": [2.5] * H, "SNO_2_setpoint": [1.0] * H}
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    given = r.json()["series"][0]["forecast"]
    means = {n: np.array(given[n]["mean"]) for n in rt.measurements}
    assert not np.allclose(np.stack([without[n]["mean"] for n in rt.measurements]), np.stack(list(means.values())))
    x, u, uf, last = arrays(body, rt)
    s_hist = np.full((1, L, 2), np.nan)
    s_hist[0, :, 0] = np.array(do_hist, dtype=float)
    s_fut = np.stack([np.full(H, 2.5), np.full(H, 1.0)], 1)[None]
    direct = np.clip(rt.predict(x, u, uf, last, s_hist=s_hist, s_fut=s_fut).mean[0], *rt.out_bounds)[:, : len(means)]
    assert np.allclose(np.stack(list(means.values()), 1), direct, rtol=1e-5, atol=1e-6)
    one = dict(body["series"][0])
    one["plans"] = [{"name": "as planned", "future_controls": one.pop("future_controls")}]
    r = server.client.post("/forecast", json={**body, "series": [one]})
    assert r.status_code == 200, r.text
    planned = r.json()["series"][0]["plans"][0]["forecast"]
    assert np.allclose(np.stack([planned[n]["mean"] for n in rt.measurements], 1), direct, rtol=1e-5, atol=1e-6)
    for where, change, field, words in (
        ("future_setpoints", {"SO_5": [1.0] * H}, "series[0].future_setpoints.SO_5", "not a setpoint input"),
        ("future_setpoints", {"SO_5_setpoint": [1.0] * 5}, "series[0].future_setpoints.SO_5_setpoint", "expected 4"),
        ("setpoints", {"SNO_2_setpoint": [-1.0] * L}, "series[0].setpoints.SNO_2_setpoint[0]", "physical minimum"),
    ):
        bad = json.loads(json.dumps(body))
        bad["series"][0][where] = change
        r = server.client.post("/forecast", json=bad)
        assert r.status_code == 422
        assert any(e["field"] == field and words in e["message"] for e in r.json()["errors"]), r.text
