"""A request's timestamps: read as the import reads a plant's export, and the forecast's times after them.

A timestamp with a UTC offset is that instant. One without an offset is the plant's local time, in its
catalog's time zone (the card's ``catalog.timezone``, as ``plant.export_reader`` reads an export). Either way the
model's calendar reads the plant's wall clock at that instant (``service.decode``), as training read it: a
history sent in UTC gets the forecast of the same history in local time.

Across the autumn change a local hour happens twice: a history is a regular series in real time, so each
repeated local time is placed by the order of its neighbours (02:45, 02:00 is the second pass of the hour).
A local time the spring change skips, and a history that lies wholly in the repeated hour (nothing tells which
pass it is), are refused naming the index.

The answer's times are in the request's own offset: after a last timestamp with an offset, in that offset;
after one without, in the plant's zone with its offset written out (``+01:00``, ``+02:00`` across a change),
never as a bare local time, which the repeated hour would make ambiguous. Where the zone's offset has seconds
(historical ones: Amsterdam's +00:19:32 before 1937), which RFC 3339 cannot write, that time is in UTC (``Z``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from itertools import pairwise

from modelcard.card import local_instants
from service.problems import Errors

Candidates = tuple[datetime, ...]  # the instants (in UTC) a timestamp may mean: one, two (repeated) or none


def parse_stamp(text: str) -> datetime:
    """ISO 8601 text (``T`` or a space, ``Z`` or an offset, in either case) to a datetime (naive if no offset)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.fromisoformat(text.upper())  # "t" and "z" are ISO 8601 too


def candidates(t: datetime, zone: tzinfo) -> Candidates:
    """The instants ``t`` may mean, in UTC: itself if it has an offset; a local time in ``zone``: one instant,
    both passes of an hour the autumn change repeats (earlier first), or none for one the spring change skips
    (``modelcard.card.local_instants``)."""
    if t.tzinfo is not None:
        return (t.astimezone(UTC),)
    return local_instants(t, zone)


def read_times(stamps: list[str], where: str, step: int, zone: tzinfo, errors: Errors) -> list[datetime] | None:
    """Aware datetimes, ``step`` minutes apart in real time, each on its own clock (a local time: ``zone``'s,
    placed by its neighbours where it is repeated); None after the first timestamp at fault."""
    parsed = []
    for k, text in enumerate(stamps):
        try:
            parsed.append(parse_stamp(text))
        except ValueError as exc:
            # Python's own words, except where they are its internals (an offset's timedelta repr).
            why = "its UTC offset is not under 24 hours (e.g. +01:00)" if "timedelta" in str(exc) else str(exc)
            errors.add(f"{where}[{k}]", f"not a valid date-time: {why}")
            return None
    gap = timedelta(minutes=step)
    try:
        if zone is UTC or all(t.tzinfo is not None for t in parsed):  # one instant each: no placing needed
            instants = [t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in parsed]
            bad = next((j + 1 for j, (a, b) in enumerate(pairwise(instants)) if b - a != gap), None)
            if bad is not None:
                errors.add(f"{where}[{bad}]", f"not {step} minutes after the previous timestamp")
                return None
        else:
            instants = place(parsed, stamps, where, step, zone, errors)
            if instants is None:
                return None
        return [t if t.tzinfo is not None else i.astimezone(zone) for t, i in zip(parsed, instants, strict=True)]
    except OverflowError:
        errors.add(where, "a timestamp lies too near the year 1 or 9999 to be read in UTC")
        return None


def place(
    parsed: list[datetime], stamps: list[str], where: str, step: int, zone: tzinfo, errors: Errors
) -> list[datetime] | None:
    """The UTC instant of each timestamp of a history with local times: forwards, the instants each may mean
    that lie a step after one the previous may mean; then backwards from the last, now certain."""
    gap = timedelta(minutes=step)
    zone_name = getattr(zone, "key", str(zone))
    alive: list[Candidates] = []
    for k, t in enumerate(parsed):
        cands = candidates(t, zone)
        if not cands:
            errors.add(f"{where}[{k}]", f"{stamps[k]} does not exist in {zone_name} (skipped by the DST change)")
            return None
        kept = cands if k == 0 else tuple(c for c in cands if c - gap in alive[-1])
        if not kept:
            errors.add(
                f"{where}[{k}]",
                f"not {step} minutes after the previous timestamp (a time without UTC offset is the plant's local "
                f"time in {zone_name}, GET /model: catalog.timezone; across a DST change a regular local history "
                "skips an hour in spring and passes one twice in autumn)",
            )
            return None
        alive.append(kept)
    if len(alive[-1]) > 1:
        k = next(j for j, c in enumerate(alive) if len(c) > 1)
        errors.add(
            f"{where}[{k}]",
            f"{stamps[k]} is repeated by the DST change in {zone_name}, and nothing in the history tells which of "
            "the two hours it is (give timestamps with UTC offsets)",
        )
        return None
    n = len(parsed)
    return [alive[-1][0] - gap * (n - 1 - k) for k in range(n)]


def future_times(times: list[datetime], horizon: int, step: int, where: str, errors: Errors) -> list[datetime] | None:
    """The ``horizon`` forecast times after the last history time, on its clock: its fixed offset, or the plant's
    zone (whose offset may change over the horizon: counted in UTC, written on the zone's clock)."""
    last, clock = times[-1].astimezone(UTC), times[-1].tzinfo
    assert clock is not None  # read_times answers aware times only
    try:
        return [on_clock(last + timedelta(minutes=step * (k + 1)), clock) for k in range(horizon)]
    except OverflowError:
        errors.add(f"{where}.timestamps[{len(times) - 1}]", f"{horizon} steps after it lie beyond the year 9999")
        return None


def on_clock(instant: datetime, clock: tzinfo) -> datetime:
    """``instant`` (in UTC) on ``clock``, or left in UTC where the clock's offset has seconds (Amsterdam's
    +00:19:32 before 1937, Monrovia's -00:44:30 before 1972): RFC 3339 writes offsets to the minute (pydantic
    wrote +00:19, naming an instant 32 s off), and a request may not send such an offset back."""
    local = instant.astimezone(clock)
    offset = local.utcoffset()
    return local if offset is not None and offset % timedelta(minutes=1) == timedelta(0) else instant
