"""The service under hostile or careless use: each test reproduces one defect found by probing it.

Real servers (``python -m service``) on 127.0.0.1 with a real tiny model; no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelcard.card import CardError, read_card, write_card
from modelcard.store import LOCK_FILE, POINTER, current_version, list_versions, remove_stale, set_current, version_dir
from service import forecasting
from service.decode import decode
from service.request import ForecastRequest
from service.settings import Settings
from tests.conftest import ROOT, clone_version, wait_for
from tests.test_service import ADMIN, _metric, arrays, make_body, problem_fields


def strict_json(text: str) -> object:
    """Parse as strict JSON: NaN, Infinity and -Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def truncated_clone(store: Path, version: str, name: str) -> str:
    """A version whose ONNX file is cut short but whose card (itself resealed) carries the cut file's checksum:
    it passes both checksums and only ONNX Runtime can tell that it is broken."""
    clone_version(store, version, name)
    onnx = store / name / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    card = read_card(store / name, verify=False)
    card["onnx"]["sha256"] = hashlib.sha256(onnx.read_bytes()).hexdigest()
    write_card(store / name, card)
    return name


# ----------------------------------------------------------------------------- 1, 7: the registry


def test_a_model_onnx_runtime_cannot_parse_is_refused_and_the_poller_lives_on(serve, store_copy) -> None:
    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.1", KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    (store / POINTER).write_text(truncated_clone(store, version, "v-truncated") + "\n")
    assert wait_for(lambda: (s.client.get("/readyz").json()["refused"] or {}).get("version") == "v-truncated")
    ready = s.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == version  # the old model keeps serving
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "v-truncated" in r.json()["detail"]
    problem_fields(r)
    # The poller is still alive: a good version is picked up.
    (store / POINTER).write_text(clone_version(store, version, "v-good") + "\n")
    assert wait_for(lambda: s.client.get("/readyz").json()["model_version"] == "v-good")
    assert _metric(s.client.get("/metrics").text, 'kovae_model_reloads_total{outcome="failure"}') >= 2


def test_start_up_on_a_model_onnx_runtime_cannot_parse_keeps_the_process_up(serve, store_copy) -> None:
    store, version = store_copy
    (store / POINTER).write_text(truncated_clone(store, version, "v-truncated") + "\n")
    s = serve(store)
    assert s.client.get("/healthz").status_code == 200
    r = s.client.get("/readyz")
    assert r.status_code == 503 and r.json()["refused"]["version"] == "v-truncated"


def test_a_card_naming_another_version_is_refused_once_not_every_poll(serve, store_copy) -> None:
    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.1")
    clone_version(store, version, "v-mislabelled")
    card = read_card(store / "v-mislabelled", verify=False)
    card["version"] = "something-else"
    write_card(store / "v-mislabelled", card)  # checksum and all: only the name is wrong
    (store / POINTER).write_text("v-mislabelled\n")
    assert wait_for(lambda: s.client.get("/readyz").json()["refused"] is not None)
    time.sleep(1.5)  # 15 polls
    metrics = s.client.get("/metrics").text
    assert _metric(metrics, 'kovae_model_reloads_total{outcome="failure"}') == 1
    assert _metric(metrics, 'kovae_model_reloads_total{outcome="success"}') == 1  # only the start-up load
    assert s.client.get("/readyz").json()["model_version"] == version


def test_a_refused_version_is_retried_once_its_folder_appears(serve, store_copy) -> None:
    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.1")
    (store / POINTER).write_text("v-later\n")  # CURRENT first, the folder after (a careless deploy script)
    assert wait_for(lambda: (s.client.get("/readyz").json()["refused"] or {}).get("version") == "v-later")
    clone_version(store, version, "v-later")
    assert wait_for(lambda: s.client.get("/readyz").json()["model_version"] == "v-later")


def test_a_version_refused_for_its_plans_graph_is_retried_once_that_file_is_whole(serve, store_copy) -> None:
    """A copy that had written the card and model.onnx but not yet all of plans.onnx: refused, then served once the
    file is complete (the poller watched only the card, its checksum and model.onnx)."""
    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.1")
    clone_version(store, version, "v-copying")
    plans = store / "v-copying" / "plans.onnx"
    whole = plans.read_bytes()
    plans.write_bytes(whole[: len(whole) // 2])
    (store / POINTER).write_text("v-copying\n")
    assert wait_for(lambda: (s.client.get("/readyz").json()["refused"] or {}).get("version") == "v-copying")
    plans.write_bytes(whole)
    assert wait_for(lambda: s.client.get("/readyz").json()["model_version"] == "v-copying")


# ----------------------------------------------------------------------------- 2, 12: the store


@pytest.mark.parametrize("pointer", ["../../x", "/etc", "..", ".tmp-v1", "a/b"])
def test_current_cannot_leave_the_store(serve, store_copy, tmp_path, pointer) -> None:
    store, version = store_copy
    outside = tmp_path / "x"
    clone_version(store, version, "x")
    (store / "x").rename(outside)  # a valid version, but outside the store
    (store / POINTER).write_text(pointer + "\n")
    with pytest.raises(CardError):
        current_version(store)
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    r = s.client.get("/readyz")
    assert r.status_code == 503 and r.json()["refused"] is not None
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "not a version name" in r.json()["detail"]
    assert str(tmp_path) not in r.text


def test_version_folders_are_resolved_inside_the_store(store_copy, tmp_path) -> None:
    store, version = store_copy
    (store / "escape").symlink_to(tmp_path)
    with pytest.raises(CardError, match="outside the model store"):
        version_dir(store, "escape")
    with pytest.raises(CardError):
        set_current(store, "../" + version)


def test_staging_leftovers_are_not_versions_and_are_cleaned(store_copy) -> None:
    store, version = store_copy
    shutil_copy = clone_version(store, version, "tmp-name")
    (store / shutil_copy).rename(store / ".tmp-crashed")
    (store / ".CURRENT.abc123.tmp").write_text("half")
    assert ".tmp-crashed" not in list_versions(store) and version in list_versions(store)
    assert remove_stale(store) == []  # fresh: might belong to a live writer
    old = time.time() - 7200
    for name in (".tmp-crashed", ".CURRENT.abc123.tmp"):
        os.utime(store / name, (old, old))
    assert remove_stale(store) == [".CURRENT.abc123.tmp", ".tmp-crashed"]
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".")) in ([], [LOCK_FILE])  # the lock stays


def test_error_texts_name_no_absolute_path(serve, store_copy) -> None:
    store, version = store_copy
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    clone_version(store, version, "v-corrupt")
    (store / "v-corrupt" / "model.onnx").write_bytes(b"not a model")
    (store / POINTER).write_text("v-corrupt\n")
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "v-corrupt/model.onnx" in r.json()["detail"]
    assert str(store) not in r.text and str(store.resolve()) not in r.text
    with pytest.raises(CardError) as exc:
        read_card(store / "v-corrupt")
    assert str(store) not in str(exc.value)


# ----------------------------------------------------------------------------- 3, 4: numbers


@pytest.mark.parametrize(
    ("where", "value"),
    [("measurements", 1e39), ("measurements", -1e39), ("controls", 1e300), ("future_controls", 1e39)],
)
def test_values_beyond_float32_are_refused_not_answered_with_nan(server, rt, where, value) -> None:
    body = make_body(rt)
    name = rt.measurements[3] if where == "measurements" else rt.controls[2]
    body["series"][0][where][name][5] = value
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422, r.text[:300]
    assert f"series[0].{where}.{name}[5]" in problem_fields(r)


@pytest.mark.parametrize(
    ("where", "name", "value", "words"),
    [
        ("measurements", "Q_in", -5.0, "below the physical minimum 0"),
        ("measurements", "SNH_eff", -0.1, "below the physical minimum 0"),
        ("controls", "KLa_5", 5000.0, "above the physical maximum 360"),
        ("controls", "KLa_3", -1e9, "below the physical minimum 0"),
        ("future_controls", "Q_intr", -1.0, "below the physical minimum 0"),
        ("measurements", "SO_5", 1e39, "above the physical maximum 20"),  # beyond float32: "not finite" before
        ("controls", "KLa_3", -1e300, "below the physical minimum 0"),
    ],
)
def test_inputs_outside_physical_bounds_are_refused_naming_field_and_index(
    server, rt, where, name, value, words
) -> None:
    body = make_body(rt)
    body["series"][0][where][name][2] = value
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422
    assert f"series[0].{where}.{name}[2]" in problem_fields(r)
    assert words in r.json()["detail"]


def test_inputs_outside_the_training_range_are_answered_with_a_warning(server, rt) -> None:
    body = make_body(rt)
    j = rt.measurements.index("SNH_in")
    lo, hi = rt.x_range[0][j], rt.x_range[1][j]
    body["series"][0]["measurements"]["SNH_in"][-1] = hi + 0.5 * (hi - lo)  # inside [0, 500]
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    warnings = r.json()["series"][0]["warnings"]
    assert [w["variable"] for w in warnings] == ["SNH_in"]
    assert warnings[0]["field"] == "series[0].measurements.SNH_in" and warnings[0]["beyond"] == pytest.approx(0.5)
    plain = server.client.post("/forecast", json=make_body(rt)).json()
    assert plain["series"][0]["warnings"] == []
    # An influent forecast beyond anything seen in training is an extrapolation too.
    told = make_body(rt)
    told["series"][0]["future_disturbances"] = {"SNH_in": [float(hi + 0.5 * (hi - lo))] * told["horizon"]}
    warnings = server.client.post("/forecast", json=told).json()["series"][0]["warnings"]
    assert [(w["kind"], w["field"]) for w in warnings] == [("training_range", "series[0].future_disturbances.SNH_in")]


def test_forecasts_stay_within_physical_bounds_and_say_where_they_were_held(server, rt) -> None:
    """Near-zero concentrations with a wide interval: the lower quantiles would go negative."""
    body = make_body(rt, horizon=rt.max_horizon)
    for name in ("SNO_2", "SNO_eff", "SO_3", "SO_4", "SO_5"):
        body["series"][0]["measurements"][name] = [0.0] * len(body["series"][0]["timestamps"])
    body.update(quantiles=[0.01, 0.5, 0.99], samples=200, seed=3)
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    out = strict_json(r.text)["series"][0]
    for name, fc in out["forecast"].items():
        j = rt.measurements.index(name)
        lo, hi = rt.x_bounds[0][j], rt.x_bounds[1][j]
        for values in [fc["mean"], *fc["quantiles"].values()]:
            assert lo <= min(values) and max(values) <= hi, name
    assert out["clipped"], "some lower quantile of a zero concentration must have been held at 0"
    assert all(c["bound"] in ("min", "max") and c["values"] > 0 for c in out["clipped"])
    raw = rt.predict(*arrays(body, rt)).mean[0]
    clipped_means = {c["variable"] for c in out["clipped"] if c["output"] == "mean"}
    assert clipped_means == {n for j, n in enumerate(rt.measurements) if np.any(raw[:, j] < rt.x_bounds[0][j])}


def test_every_answer_is_strict_json(server, rt) -> None:
    bodies = [make_body(rt, n_series=2, horizon=rt.max_horizon, seed=k) for k in range(4)]
    for body in bodies:
        body.update(quantiles=[0.1, 0.9])
        r = server.client.post("/forecast", json=body)
        assert r.status_code == 200, r.text
        strict_json(r.text)


# ----------------------------------------------------------------------------- 5: bounded work


def test_work_above_the_limit_is_refused(serve, trained_store, rt) -> None:
    s = serve(trained_store[0], KOVAE_MAX_WORK="10000")
    body = make_body(rt, n_series=8, horizon=rt.max_horizon)
    body.update(quantiles=[0.5], samples=100)
    assert s.client.post("/forecast", json=body | {"samples": 50}).status_code == 200  # 8 x 50 x 16 = 6,400
    r = s.client.post("/forecast", json=body)
    assert r.status_code == 422 and "samples" in problem_fields(r)
    assert "exceeds the limit" in r.json()["detail"]


def test_samples_without_quantiles_are_not_drawn(rt) -> None:
    req = ForecastRequest.model_validate_json(json.dumps(make_body(rt) | {"samples": 1000}))
    assert decode(req, rt, Settings()).samples == 0
    req = ForecastRequest.model_validate_json(json.dumps(make_body(rt) | {"samples": 1000, "quantiles": [0.5]}))
    assert decode(req, rt, Settings()).samples == 1000


def test_a_small_request_is_answered_while_a_large_one_runs(serve, trained_store, rt) -> None:
    """A large request runs in pieces on its own lane: small requests sent meanwhile are answered within a small
    share of one piece's time. On one shared lane each would wait for the piece running (the second and third a
    whole one: the large's next piece is queued while the first small runs), which slipping in between pieces
    alone cannot hide."""
    store, _ = trained_store
    # 16 series of 1,000 samples per piece, one ONNX call each: 4 pieces of ~0.8 s each (the small requests: ~0.05 s).
    H, L = rt.max_horizon, rt.card["history"]["length"]
    s = serve(store, KOVAE_CHUNK_WORK=str(forecasting.steps(16 * 1001, 16 * L, H, H)))
    large = make_body(rt, n_series=64, horizon=rt.max_horizon)
    large.update(quantiles=[0.1, 0.9], samples=1000)
    small = make_body(rt, horizon=4)
    done: dict[str, float] = {}

    def send_large() -> None:
        with httpx.Client(base_url=s.url, timeout=120) as client:
            assert client.post("/forecast", json=large).status_code == 200
        done["large"] = time.monotonic()

    thread = threading.Thread(target=send_large)
    started = time.monotonic()
    thread.start()
    time.sleep(0.3)
    latencies = []
    for _ in range(3):
        sent = time.monotonic()
        assert s.client.post("/forecast", json=small).status_code == 200
        latencies.append(time.monotonic() - sent)
    done["small"] = time.monotonic()
    thread.join(timeout=120)
    assert done["small"] < done["large"]
    piece = (done["large"] - started) / 4  # an upper estimate: the whole request's time over its pieces
    assert max(latencies) < 0.4 * piece, (latencies, piece)


def test_work_stops_when_the_client_goes_away(serve, trained_store, rt) -> None:
    store, _ = trained_store
    s = serve(store, KOVAE_CHUNK_WORK="256")
    large = make_body(rt, n_series=64, horizon=rt.max_horizon)
    large.update(quantiles=[0.1, 0.9], samples=1000)
    with httpx.Client(base_url=s.url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/forecast", json=large)
    assert wait_for(lambda: _metric(s.client.get("/metrics").text, "kovae_forecasts_cancelled_total") == 1)


def test_a_request_still_running_when_the_shutdown_grace_ends_gets_a_503_not_a_500(serve, trained_store, rt) -> None:
    """On SIGTERM uvicorn cancels what is still running after KOVAE_SHUTDOWN_GRACE_S: that was a 500 and an ERROR
    traceback ("Exception in ASGI application"), paging on every rolling update; now a 503 to send again."""
    store, _ = trained_store
    s = serve(store, KOVAE_CHUNK_WORK="256", KOVAE_SHUTDOWN_GRACE_S="0.5")
    large = make_body(rt, n_series=64, horizon=rt.max_horizon)  # seconds of work, in small pieces
    large.update(quantiles=[0.1, 0.9], samples=1000)
    answer: dict[str, httpx.Response] = {}

    def send_large() -> None:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            answer["large"] = client.post("/forecast", json=large)

    thread = threading.Thread(target=send_large)
    thread.start()
    time.sleep(1.0)
    log = s.stop()  # SIGTERM, as an orchestrator sends it
    thread.join(timeout=60)
    r = answer["large"]
    assert r.status_code == 503 and r.json()["title"] == "Service shutting down", r.text[:300]
    assert "shutdown_cancelled" in log and "Exception in ASGI application" not in log and "Traceback" not in log


# ----------------------------------------------------------------------------- 6, 9: the protocol


def test_far_future_timestamps_are_refused(server, rt) -> None:
    body = make_body(rt)
    L = len(body["series"][0]["timestamps"])
    end = datetime(9999, 12, 31, 23, 45, tzinfo=UTC)
    body["series"][0]["timestamps"] = [(end - timedelta(minutes=15 * (L - 1 - k))).isoformat() for k in range(L)]
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422 and f"series[0].timestamps[{L - 1}]" in problem_fields(r)


def test_an_offset_past_a_day_is_named_in_words_not_pythons(server, rt) -> None:
    body = make_body(rt)
    body["series"][0]["timestamps"][0] = "2026-03-01T00:00:00+99:00"
    r = server.client.post("/forecast", json=body)
    assert problem_fields(r) == ["series[0].timestamps[0]"]
    assert "UTC offset is not under 24 hours" in r.text and "timedelta" not in r.text


def test_head_answers_as_get_without_a_body_and_no_answer_is_cached(server) -> None:
    """A HEAD where GET is supported (RFC 9110) was a 405; health, the served version and forecasts are each
    request's own, so no cache may keep them."""
    for path in ("/healthz", "/readyz", "/model", "/metrics"):
        get, head = server.client.get(path), server.client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert get.headers["cache-control"] == head.headers["cache-control"] == "no-store"
    assert server.client.head("/forecast").status_code == 405  # a POST route, as GET would be
    assert server.client.post("/forecast", json={}).headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.update(horizon="4"), "horizon"),
        (lambda b: b.update(horizon=4.0), "horizon"),
        (lambda b: b["series"][0]["measurements"]["SO_5"].__setitem__(0, True), "series[0].measurements.SO_5[0]"),
        (lambda b: b["series"][0]["measurements"]["SO_5"].__setitem__(1, "1.5"), "series[0].measurements.SO_5[1]"),
        (lambda b: b["series"][0].update(hold_controls="true"), "series[0].hold_controls"),
    ],
)
def test_strict_types(server, rt, mutate, field) -> None:
    body = make_body(rt)
    mutate(body)
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 422 and field in problem_fields(r)


def test_duplicate_json_keys_are_refused(server, rt) -> None:
    text = json.dumps(make_body(rt, horizon=4))
    text = text.replace('"horizon": 4', '"horizon": 4, "horizon": 8')
    r = server.client.post("/forecast", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and 'duplicate key "horizon"' in r.json()["detail"]
    assert problem_fields(r) == ["horizon"]  # the key named where it is, not "body"
    body = make_body(rt, horizon=4)
    plan = body["series"][0].pop("future_controls")
    body["series"][0]["plans"] = [{"name": f"p{k}", "future_controls": plan} for k in range(3)]
    text = json.dumps(body).replace('"name": "p1"', '"name": "p1", "name": "again"')
    r = server.client.post("/forecast", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and problem_fields(r) == ["series[0].plans[1].name"]
    # The field is where the key the message names is given twice, not the first object with any repeat.
    text = json.dumps(make_body(rt, horizon=4)).replace('"id": "plant-0"', '"id": "plant-0", "id": "x"')
    text = text[:-1] + ', "horizon": 8}'
    r = server.client.post("/forecast", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and problem_fields(r) == ["series[0].id"] and 'key "id"' in r.json()["detail"]


def test_close_quantiles_keep_their_own_keys_and_repeats_are_refused(server, rt) -> None:
    body = make_body(rt) | {"quantiles": [0.1234567, 0.1234568], "samples": 50, "seed": 1}
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200
    assert set(r.json()["series"][0]["forecast"]["SO_5"]["quantiles"]) == {"0.1234567", "0.1234568"}
    r = server.client.post("/forecast", json=body | {"quantiles": [0.5, 0.5]})
    assert r.status_code == 422 and "quantiles[1]" in problem_fields(r)


def test_a_seed_makes_quantiles_repeatable(server, rt) -> None:
    body = make_body(rt, horizon=8) | {"quantiles": [0.1, 0.9], "samples": 64}
    a, b, c = (server.client.post("/forecast", json=body | {"seed": s}).json() for s in (7, 7, 8))
    q = lambda out: out["series"][0]["forecast"]["SO_5"]["quantiles"]  # noqa: E731
    assert q(a) == q(b) and q(a) != q(c)


def test_only_json_bodies_are_taken(server, rt) -> None:
    text = json.dumps(make_body(rt))
    r = server.client.post("/forecast", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    problem_fields(r)


def test_405_names_the_allowed_methods(server) -> None:
    r = server.client.get("/forecast")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    problem_fields(r)


def test_the_published_schema_states_the_model_limits(server, rt) -> None:
    spec = server.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    ts = schemas["SeriesIn"]["properties"]["timestamps"]
    assert (ts["minItems"], ts["maxItems"]) == (rt.card["history"]["min"], rt.card["history"]["max"])
    assert schemas["ForecastRequest"]["properties"]["horizon"]["maximum"] == rt.max_horizon
    assert schemas["SeriesIn"]["properties"]["measurements"]["required"] == rt.measurements
    # A history may hold gaps (null), within each input's physical bounds; the future controls may not.
    so5 = schemas["SeriesIn"]["properties"]["measurements"]["properties"]["SO_5"]["items"]["anyOf"]
    assert so5 == [{"type": "number", "minimum": 0.0, "maximum": 20.0}, {"type": "null"}]
    kla5 = schemas["SeriesIn"]["properties"]["controls"]["properties"]["KLa_5"]["items"]["anyOf"]
    assert {"type": "null"} in kla5
    plan = schemas["SeriesIn"]["properties"]["future_controls"]["anyOf"][0]["properties"]["KLa_5"]["items"]
    assert plan["type"] == "number"
    assert spec["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert spec["paths"]["/forecast"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]


# ----------------------------------------------------------------------------- 10, 11: exposure, connections


def test_no_page_loads_scripts_from_a_cdn_and_info_can_be_protected(serve, trained_store) -> None:
    store, _ = trained_store
    s = serve(store, KOVAE_API_KEYS='["k1"]', KOVAE_PROTECT_INFO="true")
    assert s.client.get("/docs").status_code == 404
    for path in ("/model", "/metrics"):
        assert s.client.get(path).status_code == 401
        assert s.client.get(path, headers={"x-api-key": "k1"}).status_code == 200
        # A Prometheus sends no other header: the key as a bearer token (its scrape config's authorization).
        assert s.client.get(path, headers={"authorization": "Bearer k1"}).status_code == 200
        for wrong in ("Bearer k2", "Bearer", "Basic k1", "k1"):
            assert s.client.get(path, headers={"authorization": wrong}).status_code == 401, wrong
        for right in ({"authorization": "bearer\tk1"}, {"x-api-key": "", "authorization": "Bearer k1"}):
            assert s.client.get(path, headers=right).status_code == 200, right  # either header may let it in
    assert s.client.get("/readyz").status_code == 200  # probes stay open
    # Whitespace around a header's value is no part of it (httpx will not send it: a raw request).
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as conn:
        conn.sendall(b"GET /model HTTP/1.1\r\nHost: x\r\nx-api-key: k1 \r\nconnection: close\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_connections_that_send_no_request_are_closed(serve, trained_store) -> None:
    store, _ = trained_store
    s = serve(store, KOVAE_HEADER_TIMEOUT_S="1")
    silent = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
    slow = socket.create_connection(("127.0.0.1", s.port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    for conn in [*silent, slow]:
        conn.settimeout(10)
    start = time.monotonic()
    for i, part in enumerate([b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"]):
        time.sleep(0.4)
        try:
            slow.sendall(part)
        except OSError:
            assert i > 0
            break
    closed = [conn.recv(1) == b"" for conn in silent]
    try:
        slow_closed = slow.recv(1024) == b""
    except ConnectionResetError:
        slow_closed = True
    for conn in [*silent, slow]:
        conn.close()
    assert all(closed) and slow_closed and time.monotonic() - start < 10
    assert s.client.get("/healthz").status_code == 200  # a normal client is unaffected


# ----------------------------------------------------------------------------- 8: several workers


def test_reload_reaches_every_worker_and_gauges_count_live_workers(serve, store_copy, rt, tmp_path) -> None:
    store, version = store_copy
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    s = serve(
        store,
        KOVAE_WORKERS="2",
        KOVAE_ADMIN_API_KEYS='["admin-secret"]',
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        TMPDIR=str(tmp_path),
    )
    runtime = next(tmp_path.glob("kovae-*"))
    assert wait_for(lambda: len(list((runtime / "workers").glob("*.json"))) == 2)
    # A worker killed and restarted: its old gauge must not linger once the version changes.
    victim = int(sorted((runtime / "workers").glob("*.json"))[0].stem)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len([p for p in (runtime / "workers").glob("*.json") if p.stem != str(victim)]) == 2)
    (store / POINTER).write_text(clone_version(store, version, "v2") + "\n")
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200, r.text
    workers = r.json()["workers"]
    assert len(workers) == 2 and {w["version"] for w in workers.values()} == {"v2"}
    answers = [s.client.get("/readyz").json()["model_version"] for _ in range(40)]
    assert set(answers) == {"v2"}
    text = s.client.get("/metrics").text
    assert _metric(text, 'kovae_model_info{version="v2"}') == 1
    assert _metric(text, f'kovae_model_info{{version="{version}"}}') == 0
    # A version refused: every worker tries it and says why in its /readyz (the other one said nothing, with the
    # poller off, until CURRENT changed again).
    (store / POINTER).write_text("no-such-version\n")
    assert s.client.post("/admin/reload", headers=ADMIN).status_code == 409

    def refused_by_both(name: str) -> bool:
        states = [json.loads(p.read_text()) for p in (runtime / "workers").glob("*.json")]
        return len(states) == 2 and all((w["refused"] or {}).get("version") == name for w in states)

    assert wait_for(lambda: refused_by_both("no-such-version"))
    # A version refused for a damaged graph, then repaired: the answer waits for each worker's answer to this
    # reload. It took the other worker's refusal of the same version, from the reload before, for an answer, and
    # said 200 while that worker still served v2.
    v3 = clone_version(store, version, "v3")
    graph = store / v3 / json.loads((store / v3 / "card.json").read_text())["onnx"]["file"]
    good = graph.read_bytes()
    graph.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    (store / POINTER).write_text(v3 + "\n")
    assert s.client.post("/admin/reload", headers=ADMIN).status_code == 409
    assert wait_for(lambda: refused_by_both(v3))
    graph.write_bytes(good)
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert {w["version"] for w in r.json()["workers"].values()} == {v3}, r.text
    # Two reloads at once (a client's retry, a second operator): each worker's answer to the newer one answers
    # the older one too. The first waited 5 s for an answer to its own token and said 503.
    (store / POINTER).write_text(clone_version(store, version, "v4") + "\n")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: s.client.post("/admin/reload", headers=ADMIN), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert all({w["version"] for w in a.json()["workers"].values()} == {"v4"} for a in answers)
    s.stop()
    assert not runtime.exists()  # the shared folder goes with the server


FREED_TWICE = """
import json, sys
import numpy as np
from service.memory import fix_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
done = fix_mmap_threshold()
base = rss()
a = np.ones(2_000_000); del a  # 16 MB, mapped and freed: glibc raised its threshold to 16 MB
b = np.ones(2_000_000); del b  # the next one came from the heap and stayed resident
print(json.dumps({"done": done, "kept_mib": rss() - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def test_a_workers_large_arrays_go_back_to_the_system_once_freed() -> None:
    """After the first large block freed, glibc served the next ones from the heap, and kept them: the probe's
    server held 332 MiB after its large requests, 424 MiB for eight 1,000-plan requests at once (the Deployment's
    limit is 512 MiB). Fixed, a freed 16 MB array leaves nothing resident; an operator's setting is left alone."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", FREED_TWICE], cwd=ROOT, env=env, capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert result["done"] == "fixed at 32 MB" and result["kept_mib"] < 4, result
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", FREED_TWICE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert json.loads(out.stdout)["done"] == "left as MALLOC_MMAP_THRESHOLD_ sets it"
