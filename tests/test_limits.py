"""Every per-request cost bounded before it is paid: size rules on the raw body, error lists, the answer's size.

Real servers (``python -m service``) on 127.0.0.1 with the real tiny model, and the codecs run in-process on
the real ONNX Runtime model. Each test reproduces one finding of the second hostile audit (issue 31).
"""

from __future__ import annotations

import json
import random

import jiter
import numpy as np
import pytest

from service import forecasting
from service.decode import decode
from service.encode import SeriesShape, answer_bytes
from service.parse import parse, size_limits
from service.problems import LISTED, ProblemError
from service.scan import SizeLimits, check_sizes, keys_only, structure
from service.settings import Settings
from tests.test_service import make_body, problem_fields


def post(server, body: dict | bytes):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.client.post("/forecast", content=content, headers={"content-type": "application/json"})


# ----------------------------------------------------------------------------- H1: bodies within the byte limit


def test_millions_of_quantiles_get_one_small_answer(server, rt) -> None:
    """7.8 MB of zeros in quantiles (inside the 8 MB limit) answered a 533 MB 422 listing every zero."""
    body = json.dumps(make_body(rt) | {"quantiles": [0] * 2_600_000}).encode()
    assert len(body) < Settings().max_body_bytes
    r = post(server, body)
    assert r.status_code == 422 and len(r.content) < 10_000, len(r.content)
    assert problem_fields(r) == ["quantiles"]
    assert "2600000 items" in r.json()["detail"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b, n: b["series"][0]["measurements"].update({f"x{k}": [1.0] for k in range(n)}), "measurements"),
        (lambda b, n: b["series"][0].update(id="x" * n), "series[0].id"),
        (lambda b, n: b["series"][0]["controls"].update(KLa_3=["x"] * n), "controls.KLa_3"),
    ],
    ids=["unknown keys", "long string", "strings in a list"],
)
def test_size_rules_come_before_any_value_is_read(server, rt, mutate, field) -> None:
    """Unknown measurement keys (209 MB answer) or ["x", "x", ...] in a list: one error naming the field."""
    body = make_body(rt)
    mutate(body, 200_000)
    r = post(server, body)
    assert r.status_code == 422 and len(r.content) < 10_000, len(r.content)
    fields = problem_fields(r)
    assert len(fields) == 1 and field in fields[0], fields


def test_problems_are_listed_up_to_20_and_counted(server, rt) -> None:
    body = make_body(rt, n_series=30)
    for s in body["series"]:
        s["measurements"]["Q_in"] = [-1.0] * len(s["measurements"]["Q_in"])
    r = post(server, body)
    assert r.status_code == 422
    problem = r.json()
    assert len(problem["errors"]) == LISTED and problem["error_count"] == 30
    assert problem["errors"][0]["field"] == "series[0].measurements.Q_in[0]"
    assert problem["detail"].endswith("(and 10 more problems)")


def test_too_many_quantiles_is_one_problem_not_one_per_quantile(server, rt) -> None:
    r = post(server, make_body(rt) | {"quantiles": [0.0] * 500})
    assert r.status_code == 422
    assert problem_fields(r) == ["quantiles"] and "500 quantiles; at most 9" in r.json()["detail"]


def test_values_in_all_are_bounded(serve, trained_store, rt) -> None:
    s = serve(trained_store[0], KOVAE_MAX_VALUES="5000")
    r = post(s, make_body(rt, n_series=20))
    assert r.status_code == 422 and problem_fields(r) == ["body"]
    assert "a request may hold at most 5000" in r.json()["detail"]
    assert post(s, make_body(rt)).status_code == 200


# ----------------------------------------------------------------------------- the raw-body scan


def test_the_scan_reads_strings_escapes_and_nesting_right() -> None:
    tricky = {
        "series": [{"id": 'a,b]}["\\', "measurements": {'x"y': [1, 2, 3], "z": []}}],
        "quantiles": [0.1] * 12,
        "deep": [[[[1]]]],
    }
    body = json.dumps(tricky).encode()
    s = structure(body)
    assert s is not None
    arrays = sorted(int(n) for n, a in zip(s.items, s.is_array, strict=True) if a)
    assert arrays == [1, 1, 1, 1, 1, 1, 3, 12]  # series, deep x4 (one item each), z (empty: 1), x"y, quantiles
    limits = SizeLimits(values=100, array=10, members=10, string_bytes=100, depth=8)
    with pytest.raises(ProblemError) as exc:
        check_sizes(body, limits)
    assert exc.value.errors == [{"field": "quantiles", "message": "12 items; no field of a request takes more than 10"}]
    with pytest.raises(ProblemError) as exc:
        check_sizes(body, SizeLimits(100, 100, 100, 100, depth=3))
    assert [e["field"] for e in exc.value.errors] == ["series[0].measurements"]  # the first too deep
    with pytest.raises(ProblemError) as exc:
        check_sizes(body, SizeLimits(100, 100, 100, string_bytes=8, depth=8))
    assert [e["field"] for e in exc.value.errors] == ["series[0].id", "series[0].measurements", "quantiles"]
    with pytest.raises(ProblemError) as exc:
        check_sizes(json.dumps({"deep": [[[[1]]]]}).encode(), SizeLimits(100, 100, 100, 100, depth=3))
    assert [e["field"] for e in exc.value.errors] == ["deep[0][0]"]


def test_keys_only_keeps_every_key_and_finds_every_duplicate() -> None:
    """The duplicate-key check of a large body reads only its keys; it must find what the full body shows."""
    rng = random.Random(0)
    for _ in range(200):
        keys = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))]
        inner = ", ".join(f'"{k}": [{rng.random()}, "x,{{]"]' for k in keys)
        body = f'{{"series": [{{"id": "q\\"", {inner}}}], "v": [1, 2]}}'.encode()
        s = structure(body)
        assert s is not None

        def duplicated(data: bytes) -> bool:
            try:
                jiter.from_json(data, catch_duplicate_keys=True)
            except ValueError:
                return True
            return False

        assert duplicated(keys_only(s)) == duplicated(body) == (len(set(keys)) < len(keys))


def test_a_duplicate_key_in_a_large_body_is_refused(server, rt) -> None:
    body = make_body(rt, n_series=45)
    text = json.dumps(body)
    assert len(text) > 256_000  # the large-body path: the check runs over the keys alone
    text = text.replace('"id": "plant-5"', '"id": "plant-5", "id": "again"')
    r = post(server, text.encode())
    assert r.status_code == 422 and 'duplicate key "id"' in r.json()["detail"]
    assert r.json()["errors"] == [
        {"field": "series[5].id", "message": 'duplicate key "id": a key may appear once in an object'}
    ]


# ----------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("stamp", ["1772540100", "1772540100.5", "20260301T0015", "2026-03-01"])
def test_timestamps_are_iso_8601_only(server, rt, stamp) -> None:
    body = make_body(rt)
    body["series"][0]["timestamps"][3] = stamp
    r = post(server, body)
    assert r.status_code == 422 and problem_fields(r) == ["series[0].timestamps[3]"]
    assert "ISO 8601" in r.json()["detail"]


def test_iso_8601_spellings_are_read_alike(server, rt) -> None:
    body = make_body(rt)
    answers = []
    spellings = (lambda t: t, lambda t: t.replace("+00:00", "Z"), lambda t: t.replace("T", "t").replace("+00:00", "z"))
    for spell in spellings:
        body["series"][0]["timestamps"] = [spell(t) for t in make_body(rt)["series"][0]["timestamps"]]
        r = post(server, body)
        assert r.status_code == 200, r.text
        answers.append(r.json()["series"][0])
    assert answers[0] == answers[1] == answers[2]


# ----------------------------------------------------------------------------- H2: the answer's size


def _plans_body(rt, n_plans: int, horizon: int) -> dict:
    body = make_body(rt, horizon=horizon)
    s = body["series"][0]
    s["plans"] = [{"name": f"p{k}", "future_controls": s["future_controls"]} for k in range(n_plans)]
    del s["future_controls"]
    return body


def test_the_answer_size_is_refused_before_any_work(serve, trained_store, rt) -> None:
    """1,000 plans x 9 quantiles answered 299 MB after 12-18 s; within the work limit, it must be refused."""
    s = serve(trained_store[0], KOVAE_MAX_ANSWER_BYTES="2000000")
    body = _plans_body(rt, 200, rt.max_horizon) | {"quantiles": [0.1, 0.5, 0.9], "samples": 1}
    r = post(s, body)
    assert r.status_code == 422 and problem_fields(r) == ["series[].plan_forecasts"]
    detail = r.json()["detail"]
    assert "the answer would be about" in detail and '"plan_forecasts": false' in detail
    summaries = post(s, body | {"series": [body["series"][0] | {"plan_forecasts": False}]})
    assert summaries.status_code == 200 and len(summaries.content) < 2_000_000


def test_the_predicted_answer_size_is_close_to_the_real_one(server, rt) -> None:
    n_x = len(rt.measurements)
    cases = [
        (
            make_body(rt, n_series=3, horizon=rt.max_horizon) | {"quantiles": [0.1, 0.9]},
            [SeriesShape(0, True, n_x)] * 3,
            2,
        ),
        (_plans_body(rt, 40, rt.max_horizon), [SeriesShape(40, True, n_x)], 0),
        (_plans_body(rt, 40, 4) | {"quantiles": [0.5]}, [SeriesShape(40, True, n_x)], 1),
    ]
    for body, shapes, q in cases:
        r = post(server, body)
        assert r.status_code == 200, r.text
        predicted = answer_bytes(shapes, q, body["horizon"])
        assert 0.8 < predicted / len(r.content) < 1.3, (predicted, len(r.content))


def test_plans_answered_in_pieces_give_the_same_answer(rt) -> None:
    """A series' plans are encoded a few at a time; the answer is byte for byte the one-piece answer."""
    body = _plans_body(rt, 7, 6) | {"quantiles": [0.2, 0.8], "samples": 5, "seed": 4}
    decoded = decode(parse(json.dumps(body).encode(), size_limits(rt, Settings())), rt, Settings())

    def answer(piece_bytes: int) -> tuple[bytes, int]:
        fragments, n = [], 0
        for piece in forecasting.pieces(rt, decoded, chunk_work=8192, piece_bytes=piece_bytes):
            fragments += piece()
            n += 1
        return b"".join(forecasting.answer(rt, decoded, fragments)), n

    whole, one = answer(10**9)
    parts, many = answer(1)
    assert one == 1 and many == 7
    assert parts == whole
    out = json.loads(whole)["series"][0]
    assert [p["name"] for p in out["plans"]] == [f"p{k}" for k in range(7)]
    assert np.isfinite(out["plans"][6]["forecast"]["SO_5"]["quantiles"]["0.8"]).all()


def test_a_large_bodys_plans_are_parsed_one_by_one_to_the_same_request(rt, monkeypatch) -> None:
    """pydantic-core holds the interpreter while it parses (57 ms for 1,000 plans of 96 steps); a large body's
    plans are parsed one at a time, to the very request the whole-body parse gives, problems named alike. A spy
    on the parser's validate (calling through) shows the plan-by-plan path ran: the same request from the
    whole-body path alone would pass too."""
    from service import parse as parse_module
    from service.parse import PLANS_ALONE
    from service.request import ForecastRequest, PlanIn

    plans_parsed: list[tuple] = []
    real_validate = parse_module.validate

    def spy(model, data, where, errors):
        if model is PlanIn:
            plans_parsed.append(where)
        return real_validate(model, data, where, errors)

    monkeypatch.setattr(parse_module, "validate", spy)
    body = _plans_body(rt, 300, rt.max_horizon)
    body["series"].append(make_body(rt, seed=1)["series"][0])
    raw = json.dumps(body).encode()
    assert len(raw) > PLANS_ALONE
    limits = size_limits(rt, Settings())
    assert parse(raw, limits) == ForecastRequest.model_validate_json(raw)
    assert plans_parsed == [("series", 0, "plans", k) for k in range(300)]
    plans_parsed.clear()
    body = json.loads(raw)  # every plan its own lists
    body["series"][0]["plans"][7]["future_controls"]["KLa_3"][3] = "x"
    body["series"][0]["plans"][9]["extra"] = 1
    with pytest.raises(ProblemError) as exc:
        parse(json.dumps(body).encode(), limits)
    assert exc.value.errors == [
        {"field": "series[0].plans[7].future_controls.KLa_3[3]", "message": "Input should be a valid number"}
    ]
    assert plans_parsed == [("series", 0, "plans", k) for k in range(8)]  # stopped at the first plan at fault


def test_an_answer_too_large_suggests_only_what_would_shrink_it() -> None:
    """A one-step answer was told to ask for "a shorter horizon"."""
    from service.encode import check_answer_size

    shapes = [SeriesShape(400, True, 20)] * 64
    for horizon, suggested in ((1, False), (8, True)):
        with pytest.raises(ProblemError, match="Answer too large") as refused:
            check_answer_size(shapes, 3, horizon, 1_000_000)
        assert ("a shorter horizon" in refused.value.errors[0]["message"]) is suggested
