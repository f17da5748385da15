"""Issue 30 in the service: local times read in the plant's time zone as the import reads them (DST included), and
a stuck sensor warned about. Real servers (``python -m service``) on 127.0.0.1 serving the tiny model with its
card's catalog set to Europe/Berlin and a ``max_flat_minutes`` on SNH_eff, as a plant's catalog would set them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from modelcard.card import read_card, write_card
from service.problems import Errors
from service.request import ISO_8601
from service.times import read_times
from tests.test_service import make_body, problem_fields

BERLIN = ZoneInfo("Europe/Berlin")
AMSTERDAM = ZoneInfo("Europe/Amsterdam")  # +00:19:32 (summer +01:19:32) until 1937-07-01, then +00:20 (+01:20)
STEP = timedelta(minutes=15)


@pytest.fixture
def berlin(serve, store_copy):
    """A server of the tiny model whose card says the plant is in Europe/Berlin and SNH_eff's analyser is stuck
    after 2 h of one value."""
    store, version = store_copy
    card = read_card(store / version, verify=False)
    card["catalog"]["timezone"] = "Europe/Berlin"
    next(v for v in card["variables"]["measurements"] if v["name"] == "SNH_eff")["max_flat_minutes"] = 120.0
    write_card(store / version, card)
    return serve(store)


def body_at(rt, instants: list[datetime], local: bool, horizon: int = 8) -> dict:
    """make_body's history at these instants: as Berlin local times without offset, or with their offsets."""
    body = make_body(rt, horizon=horizon)
    stamps = [t.astimezone(BERLIN) for t in instants]
    body["series"][0]["timestamps"] = [(t.replace(tzinfo=None) if local else t).isoformat() for t in stamps]
    return body


def answer(server, body: dict) -> dict:
    r = server.client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    return r.json()["series"][0]


def test_a_local_history_is_read_in_the_plants_zone_and_answered_with_its_offset(berlin, server, rt) -> None:
    """A winter history without offsets is Berlin time: the same forecast and the same answer times as with
    +01:00 written out, never labelled Z. The UTC model's card reads the same texts as UTC, as before."""
    L = rt.card["history"]["length"]
    instants = [datetime(2026, 1, 12, 6, tzinfo=UTC) + STEP * k for k in range(L)]
    local, explicit = answer(berlin, body_at(rt, instants, True)), answer(berlin, body_at(rt, instants, False))
    assert local == explicit
    assert all(t.endswith("+01:00") for t in local["timestamps"])
    first = datetime.fromisoformat(local["timestamps"][0])
    assert first == instants[-1] + STEP and first.utcoffset() == timedelta(hours=1)
    # The same instants sent in UTC (Z): the plant's wall clock all the same, so the same forecast (it was the
    # forecast of a history an hour earlier in the day); the answer's times in the request's own offset.
    body = body_at(rt, instants, False)
    body["series"][0]["timestamps"] = [t.isoformat().replace("+00:00", "Z") for t in instants]
    in_utc = answer(berlin, body)
    assert in_utc["forecast"] == local["forecast"] and all(
        t.endswith("Z") or "+00:00" in t for t in in_utc["timestamps"]
    )
    # The last instant a UTC text can name, in the plant's zone, is past the year 9999: a 422, not a 500.
    end = datetime(9999, 12, 31, 23, 30, tzinfo=UTC)
    body["series"][0]["timestamps"] = [(end - STEP * (L - 1 - k)).isoformat() for k in range(L)]
    body["series"][0]["future_controls"] = {k: v[:1] for k, v in body["series"][0]["future_controls"].items()}
    r = berlin.client.post("/forecast", json=body | {"horizon": 1})
    assert r.status_code == 422 and "the plant's zone" in r.text and f"series[0].timestamps[{L - 1}]" in r.text
    as_utc = answer(server, body_at(rt, instants, True))  # the tiny model's own card: UTC
    assert datetime.fromisoformat(as_utc["timestamps"][0]) == first + timedelta(hours=1)
    assert as_utc["forecast"] == local["forecast"]  # the same wall clock: the same calendar inputs


def test_a_local_history_across_the_autumn_change_is_placed_by_its_order(berlin, rt) -> None:
    """01:00 .. 02:45 (summer time), 02:00 .. 02:45 again (winter time), 03:00 ..: read as the instants they
    are. Before, it was refused as 'not 15 minutes after the previous timestamp'."""
    L = rt.card["history"]["length"]
    instants = [datetime(2026, 10, 24, 23, tzinfo=UTC) + STEP * k for k in range(L)]
    body = body_at(rt, instants, True)
    stamps = body["series"][0]["timestamps"]
    assert stamps[4] == stamps[8] == "2026-10-25T02:00:00"  # the repeated hour, twice
    assert answer(berlin, body) == answer(berlin, body_at(rt, instants, False))


def test_a_horizon_across_the_spring_change_is_answered_in_the_zones_offsets(berlin, rt) -> None:
    L, H = rt.card["history"]["length"], rt.max_horizon
    instants = [datetime(2026, 3, 29, 1, tzinfo=UTC) - STEP * (L - k) for k in range(L)]  # ends 01:45 CET
    local, explicit = answer(berlin, body_at(rt, instants, True, H)), answer(berlin, body_at(rt, instants, False, H))
    assert local["forecast"] == explicit["forecast"]
    assert local["timestamps"][0] == "2026-03-29T03:00:00+02:00"  # 02:00 CET does not exist: 03:00 CEST
    assert explicit["timestamps"][0] == "2026-03-29T02:00:00+01:00"  # the request's own offset, kept
    assert [datetime.fromisoformat(t) for t in local["timestamps"]] == [
        datetime.fromisoformat(t) for t in explicit["timestamps"]
    ]


@pytest.fixture
def amsterdam(serve, store_copy):
    """A server of the tiny model whose card says the plant is in Europe/Amsterdam, whose offsets had seconds."""
    store, version = store_copy
    card = read_card(store / version, verify=False)
    card["catalog"]["timezone"] = "Europe/Amsterdam"
    write_card(store / version, card)
    return serve(store)


def test_answer_times_name_their_instants_where_the_zones_offset_has_seconds(amsterdam, rt) -> None:
    """A local history in Amsterdam, 1937, with a horizon across its change from +01:19:32 to +01:20 on 1 July.
    pydantic writes an offset to the minute: 23:34:32+01:19 named an instant 32 s off. An offset with seconds is
    no RFC 3339 (nor may a request send one), so those times are written in UTC; the others in the zone's
    offset, as ever. Each answer time is the instant its step stands for, and can be sent back as a timestamp."""
    L, H = rt.card["history"]["length"], 8
    instants = [datetime(1937, 6, 30, 22, tzinfo=UTC) - STEP * (L - 1 - k) for k in range(L)]
    body = make_body(rt, horizon=H)
    body["series"][0]["timestamps"] = [t.astimezone(AMSTERDAM).replace(tzinfo=None).isoformat() for t in instants]
    times = answer(amsterdam, body)["timestamps"]
    assert [datetime.fromisoformat(t) for t in times] == [instants[-1] + STEP * (k + 1) for k in range(H)]
    assert all(re.match(ISO_8601, t) for t in times), times
    assert times[:2] == ["1937-06-30T22:15:00Z", "1937-06-30T22:30:00Z"]  # at +01:19:32
    assert times[2] == "1937-07-01T00:05:00+01:20"  # 22:45 UTC: the change was at midnight local, 22:40:28 UTC
    # An offset with seconds in a request (Python's isoformat writes one) is no ISO 8601 offset: refused, named.
    body["series"][0]["timestamps"] = [t.astimezone(AMSTERDAM).isoformat() for t in instants]
    r = amsterdam.client.post("/forecast", json=body)
    assert r.status_code == 422 and "+01:19:32" in body["series"][0]["timestamps"][0]
    assert "series[0].timestamps[0]" in r.text and "not an ISO 8601 date-time" in r.text


def test_local_times_that_cannot_be_placed_are_refused_naming_the_index(berlin, rt) -> None:
    L = rt.card["history"]["length"]
    once = make_body(rt)  # the repeated hour exported once: 02:45 summer time, then 03:00 winter time
    once["series"][0]["timestamps"] = [
        (datetime(2026, 10, 25, 1) + STEP * k).isoformat() for k in range(L)
    ]  # 01:00 .. 05:45 on the wall clock, no hour twice
    r = berlin.client.post("/forecast", json=once)
    assert r.status_code == 422 and problem_fields(r) == ["series[0].timestamps[8]"]
    assert "Europe/Berlin" in r.json()["errors"][0]["message"]

    skipped = make_body(rt)
    skipped["series"][0]["timestamps"] = [(datetime(2026, 3, 29, 0) + STEP * k).isoformat() for k in range(L)]
    r = berlin.client.post("/forecast", json=skipped)
    assert r.status_code == 422 and problem_fields(r) == ["series[0].timestamps[8]"]
    assert "does not exist in Europe/Berlin" in r.json()["errors"][0]["message"]


def test_a_history_wholly_in_the_repeated_hour_is_ambiguous() -> None:
    """Five-minute samples, all between 02:00 and 02:45 local: either pass of the hour fits them."""
    stamps = [(datetime(2026, 10, 25, 2) + timedelta(minutes=5 * k)).isoformat() for k in range(10)]
    errors = Errors()
    assert read_times(stamps, "series[0].timestamps", 5, BERLIN, errors) is None
    assert errors.listed[0]["field"] == "series[0].timestamps[0]"
    assert "nothing in the history tells which of the two hours" in errors.listed[0]["message"]
    stamps[-1] = "2026-10-25T02:45:00+01:00"  # one offset decides it: the second pass
    times = read_times(stamps, "series[0].timestamps", 5, BERLIN, Errors())
    assert times is not None and times[0].utcoffset() == timedelta(hours=1)


def test_a_stuck_sensor_is_warned_about_not_refused(berlin, server, rt) -> None:
    """SNH_eff at one value for 12 samples (165 minutes from first to last, a gap inside them) with a card allowing
    120: answered, with a flat warning naming the variable, its length and where it lies. 8 samples (105
    minutes) are no warning, nor is the same run on a card that sets no max_flat_minutes."""
    body = make_body(rt)
    snh = body["series"][0]["measurements"]["SNH_eff"]
    snh[2:14] = [5.0] * 12
    snh[8] = None
    out = answer(berlin, body)
    flat = [w for w in out["warnings"] if w["kind"] == "flat"]
    assert len(flat) == 1
    w = flat[0]
    assert (w["variable"], w["field"]) == ("SNH_eff", "series[0].measurements.SNH_eff")
    assert (w["minutes"], w["first_index"], w["last_index"], w["value"]) == (165.0, 2, 13, 5.0)
    assert w["max_flat_minutes"] == 120.0 and "stuck" in w["message"]
    assert np.isfinite(out["forecast"]["SNH_eff"]["mean"]).all()
    assert not [w for w in answer(server, body)["warnings"] if w["kind"] == "flat"]
    snh[2:14] = [5.0] * 8 + [float(v) for v in range(4)]
    assert not [w for w in answer(berlin, body)["warnings"] if w["kind"] == "flat"]
