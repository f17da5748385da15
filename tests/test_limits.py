"""Every per-request cost bounded before it is paid: size rules on the raw body, error lists, the answer's size.

Real servers (``python -m service``) on 127.0.0.1 with the real tiny model, and the codecs run in-process on
the real ONNX Runtime model. Each test reproduces one finding of the second hostile audit (issue 31).
"""

from __future__ import annotations

import dataclasses
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


class _Counted(np.ndarray):
    """An array that counts the elements read out of it by indexing or slicing: the work of the code that reads
    a scanned body's structure, measured without a clock."""

    read = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        _Counted.read += np.size(out)
        return out


def _counted_structure(body: bytes):
    s = structure(body)
    assert s is not None
    for f in dataclasses.fields(s):
        if isinstance(getattr(s, f.name), np.ndarray):
            setattr(s, f.name, getattr(s, f.name).view(_Counted))
    return s


def _plans_everywhere(n_series: int, arrays: int = 8) -> bytes:
    """The reviewer's body, n_series long: series of nothing but arrays of one object at plans' level."""
    series = "{" + ",".join(['"plans":[{}]'] * arrays) + "}"
    return ('{"horizon":8,"series":[' + ",".join([series] * n_series) + "]}").encode()


def test_a_large_bodys_plans_are_found_for_work_in_proportion_to_it(monkeypatch) -> None:
    """Naming every array at plans' level cost O(body) each (an index counted from the array's start; every
    level-5 container looked at): quadratic, 6 s for the 444 kB body of 1000 series of 34 such arrays, paid
    before any limit refused it. Ten times the series may take about ten times the work, not a hundred; so may
    ten times the oversized arrays, of which only the 20 listed are named."""
    from service import scan
    from service.parse import plan_spans

    def work(n_series: int) -> int:
        s = _counted_structure(_plans_everywhere(n_series))
        _Counted.read = 0
        spans = plan_spans(s)
        assert list(spans) == list(range(n_series))  # each series' last "plans" array, one empty object
        assert all(len(v) == 1 and v[0][1][1] == v[0][1][0] + 1 for v in spans.values())
        return _Counted.read

    small, large = work(100), work(1000)
    assert 0 < large <= 12 * small, (small, large)

    monkeypatch.setattr(scan, "structure", _counted_structure)
    limits = SizeLimits(values=10**7, array=1000, members=34, string_bytes=2048, depth=8)

    def oversized(n_arrays: int) -> int:
        body = ('{"horizon":8,"x":[' + ",".join(["[" + ",".join(["0"] * 1001) + "]"] * n_arrays) + "]}").encode()
        _Counted.read = 0
        with pytest.raises(ProblemError) as exc:
            check_sizes(body, limits)
        assert exc.value.count == n_arrays and len(exc.value.errors) == LISTED
        assert [e["field"] for e in exc.value.errors] == [f"x[{k}]" for k in range(LISTED)]
        return _Counted.read

    small, large = oversized(40), oversized(400)
    assert 0 < large <= 12 * small, (small, large)


class _SlicedBytes(bytes):
    """A body that counts the bytes sliced out of it."""

    sliced = 0

    def __getitem__(self, key):  # type: ignore[override]
        out = super().__getitem__(key)
        _SlicedBytes.sliced += len(out) if isinstance(key, slice) else 1
        return out


def test_values_after_one_key_are_named_for_work_in_proportion_to_them() -> None:
    """Whether a string is the key of what follows it was read from the body sliced up to that value: many
    values after one string with no key between (``{"k" [{}][{}]...``, malformed, every size within its limit)
    each copied the body up to itself, 15 s for 1.2 MB. Ten times the values may take about ten times the bytes."""
    from service.parse import plan_spans

    def sliced(n: int) -> int:
        s = structure(('{"series":[{"k" ' + "[{}]" * n + "}]}").encode())
        assert s is not None
        s.body = _SlicedBytes(s.body)
        _SlicedBytes.sliced = 0
        assert plan_spans(s) == {}  # none is at "plans"
        return _SlicedBytes.sliced

    small, large = sliced(1000), sliced(10_000)
    assert large <= 12 * max(small, 1), (small, large)


def test_the_reviewers_body_is_refused_as_it_was() -> None:
    """444 kB of 1000 series of 34 "plans" arrays each (under the 8 MB limit): the same 422 as before."""
    from service.parse import plan_spans

    raw = _plans_everywhere(1000, arrays=34)
    assert len(raw) == 444_024
    spans = plan_spans(structure(raw))
    assert list(spans) == list(range(1000)) and spans[0] == [(0, (462, 463))] and spans[999] == [(0, (444018, 444019))]
    limits = SizeLimits(values=600_000, array=1000, members=34, string_bytes=2048, depth=8)  # a model of 17 names
    with pytest.raises(ProblemError) as exc:
        parse(raw, limits)
    assert (exc.value.status, exc.value.title, exc.value.count) == (422, "Invalid request body", 3)
    assert exc.value.detail == (
        "series[0].timestamps: Field required; series[0].measurements: Field required; "
        "series[0].controls: Field required"
    )


@pytest.mark.parametrize(
    ("opening", "closing", "field"),
    [("{", "}", "<no key>"), ('{"a": 1, ', "}", "<no key>"), ("{", ', "b": 2}', "<no key>"), ('{"a": ', "}", "a")],
)
def test_an_oversized_array_without_a_key_is_named_so(opening: str, closing: str, field: str) -> None:
    """A large body's sizes are checked before the parser sees it: an array with no key before it in an object
    (malformed JSON) raised IndexError there, a 500, or was named after the next member's key."""
    raw = (opening + "[" + ",".join(["0"] * 1001) + "]" + closing + " " * 70_000).encode()
    limits = SizeLimits(values=600_000, array=1000, members=34, string_bytes=2048, depth=8)
    with pytest.raises(ProblemError) as exc:
        parse(raw, limits)
    assert exc.value.status == 422 and [e["field"] for e in exc.value.errors] == [field]


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


# ----------------------------------------------------------------------------- the work of one ONNX call


def _call_steps(trajectories: int, history_steps: int, horizon: int, max_horizon: int) -> int:
    """What an ONNX call costs: every trajectory (a mean or a sample) is rolled out over the model's whole
    max_horizon, the graph sliced to the horizon after (a rollout step counts half a decoded one), and the encoder
    reads every history step it is given."""
    return trajectories * (horizon + max_horizon // 2) + history_steps


class _CallRecorder:
    """Stands in for the runtime (the default model's max_horizon, 96): records each ONNX call's cost, answers
    zeros. Deterministic: what is counted is the calls' shapes, not their time."""

    max_horizon = 96

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.drawn = 0  # samples drawn, over every series or plan

    def predict(self, x, u, uf, last, n_samples=0, rng=None, **_) -> object:
        from modelcard.runtime import Forecast

        (n, horizon), L = uf.shape[:2], x.shape[1]
        self.calls.append(_call_steps(n * (n_samples + 1), n * L, horizon, self.max_horizon))
        self.drawn += n * n_samples
        return Forecast(np.zeros((n, horizon, 2)), np.zeros((n, n_samples, horizon, 2)) if n_samples else None)

    def predict_plans(self, x, u, plans, last, n_samples=0, rng=None, *_) -> object:
        from modelcard.runtime import Forecast

        n, horizon = plans.shape[:2]
        self.calls.append(_call_steps(n * (n_samples + 1), len(x), horizon, self.max_horizon))
        self.drawn += n * n_samples
        return Forecast(np.zeros((n, horizon, 2)), np.zeros((n, n_samples, horizon, 2)) if n_samples else None)


def _decoded(n_series: int, history: int, horizon: int, samples: int, plans: int | None = None, forecasts=True):
    """A decoded request of that shape (zeros: only the shapes matter to how it is cut into calls)."""
    from types import SimpleNamespace

    from service.request import DecodedRequest

    d = DecodedRequest(horizon=horizon, quantiles=[0.5] if samples else [], samples=samples)
    for _ in range(n_series):
        d.x_hist.append(np.zeros((history, 2)))
        d.u_hist.append(np.zeros((history, 1)))
        d.u_fut.append(np.zeros((horizon, 1) if plans is None else (plans, horizon, 1)))
        d.last_minute.append(0.0)
        d.d_fut.append(np.zeros((horizon, 0)))
        d.s_hist.append(np.zeros((history, 0)))
        d.s_fut.append(np.zeros((horizon, 0)))
        names = None if plans is None else [f"p{k}" for k in range(plans)]
        d.facts.append(SimpleNamespace(plan_names=names, plan_forecasts=forecasts, outputs=[0, 1]))
    return d


@pytest.mark.parametrize(
    ("shape", "fast"),
    [
        # 64 series x 128 samples x horizon 1, 256 steps of history: 8,192 sample steps, but 2.5 s of work (8,320
        # trajectories, each rolled out over the whole max_horizon); it went to the fast lane as one call, and a
        # small forecast sent meanwhile waited 2 s for it.
        ({"n_series": 64, "history": 256, "horizon": 1, "samples": 128}, False),
        ({"n_series": 1, "history": 128, "horizon": 8, "samples": 1000}, False),  # 8,000 sample steps, 0.35 s
        ({"n_series": 64, "history": 256, "horizon": 1, "samples": 0}, False),  # 64 histories of 256 to encode
        ({"n_series": 1, "history": 128, "horizon": 8, "samples": 0}, True),  # the small forecast: ~0.01 s
        ({"n_series": 2, "history": 128, "horizon": 24, "samples": 20}, True),
        ({"n_series": 1, "history": 128, "horizon": 96, "plans": 1000, "samples": 0, "forecasts": False}, False),
        ({"n_series": 1, "history": 128, "horizon": 12, "plans": 40, "samples": 30}, False),
        # one plan's 1,000 samples were one call of 144,272 steps (a plan is the smallest piece)
        ({"n_series": 1, "history": 128, "horizon": 96, "plans": 3, "samples": 1000}, False),
    ],
)
def test_no_onnx_call_is_larger_than_chunk_work_nor_a_larger_request_on_the_fast_lane(monkeypatch, shape, fast):
    """Each ONNX call of a request is at most KOVAE_CHUNK_WORK steps, counted as the graph works (trajectories
    rolled out over the whole max_horizon, histories encoded), and a request goes to the fast lane only if all of
    it is within that bound; every sample asked for is still drawn, every series and plan answered."""
    monkeypatch.setattr(forecasting, "encode_series", lambda *a: b"{}")
    monkeypatch.setattr(forecasting, "encode_plans", lambda *a: b"{}")
    chunk_work, rt = 8192, _CallRecorder()
    d = _decoded(**shape)
    fragments = [f for piece in forecasting.pieces(rt, d, chunk_work) for f in piece()]
    assert max(rt.calls) <= chunk_work, (len(rt.calls), max(rt.calls))
    n_plans = shape.get("plans") or 1
    drawn_per_plan = d.samples if shape.get("forecasts", True) else 0
    assert rt.drawn == shape["n_series"] * n_plans * drawn_per_plan
    assert {i for i, _, _ in fragments} == set(range(shape["n_series"]))
    whole = sum(_call_steps(n_plans * (drawn_per_plan + 1), shape["history"], d.horizon, 96) for _ in d.x_hist)
    assert forecasting.request_steps(d, rt.max_horizon) == whole
    assert (whole <= chunk_work) is fast
    if fast:
        assert len(rt.calls) == 1  # all of it in one call
