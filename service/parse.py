"""A /forecast request from its JSON bytes, every cost of reading it bounded before it is paid.

First the size rules on the raw bytes of any body from 64 kB on (``service.scan``: no array, object, string
or nesting larger than any field takes, no more values than ``KOVAE_MAX_VALUES``), then pydantic-core's strict
parse, which stops at the first bad item of each list, then a check for keys given twice. pydantic-core holds
the interpreter while it parses (57 ms for 1,000 plans of 96 steps); a large body's plans are parsed one plan
at a time, so that other requests get the interpreter between them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jiter
import numpy as np
from pydantic import ValidationError

from modelcard.runtime import ModelRuntime
from service.problems import Errors, ProblemError
from service.request import TIME_EXAMPLE, ForecastRequest, PlanIn, SeriesIn
from service.scan import SizeLimits, Structure, check_sizes, keys_only
from service.settings import Settings

MAX_DEPTH = 8
"""Nesting of the deepest field (series[].plans[].future_controls.<name>[] is 7 deep), and one to spare."""
MAX_STRING_BYTES = 2048
"""An id or plan name of 128 characters, each written as escapes, fits."""
SCAN_FROM = 64_000
"""Bodies from this many bytes on are scanned before they are parsed; a smaller one holds at most ~32,000 values
(~2 ms of parsing), and the scan's own cost (~0.5 ms for a day of history) would outweigh what it saves."""
PLANS_ALONE = 256_000
"""Bodies from this many bytes on have their plans parsed one by one."""
DUPLICATE = re.compile(r'duplicate key "(.*)" at line')
PLANS_PATH = re.compile(r"^series\[(\d+)\]\.plans$")


def size_limits(rt: ModelRuntime | None, settings: Settings) -> SizeLimits:
    """The raw body's size rules: the largest array and object any field of a request to this model takes."""
    lengths = [settings.max_series, settings.max_plans, settings.max_quantiles]
    names = [len(SeriesIn.model_fields), len(ForecastRequest.model_fields)]
    if rt is not None:
        lengths += [rt.card["history"]["max"], rt.max_horizon]
        names += [len(rt.measurements), len(rt.controls), len(rt.setpoints)]
    # Twice the variables: a few unknown names still get their own message ("unknown variable") after parsing.
    return SizeLimits(
        values=settings.max_values,
        array=max(lengths),
        members=2 * max(names),
        string_bytes=MAX_STRING_BYTES,
        depth=MAX_DEPTH,
    )


def parse(body: bytes, limits: SizeLimits) -> ForecastRequest:
    """The request from JSON bytes: size rules, strict parse (~10x cheaper than json.loads plus validation),
    then jiter (the same parser) for keys given twice, which pydantic-core silently resolves to the last; for a
    large body only over its keys."""
    structure = check_sizes(body, limits) if len(body) >= SCAN_FROM else None
    plans = plan_spans(structure) if structure is not None and len(body) >= PLANS_ALONE else {}
    errors = Errors()
    req = validate(ForecastRequest, without(body, structure, plans) if plans else body, (), errors)
    for i, spans in plans.items():
        if req is None or errors.count:
            break
        parsed = []
        for k, (a, b) in spans:  # one plan at a time: other requests get the interpreter in between
            plan = validate(PlanIn, body[a : b + 1], ("series", i, "plans", k), errors)
            if plan is None:
                break  # as the whole-body parse does: the first plan at fault speaks for the rest
            parsed.append(plan)
        req.series[i].plans = parsed
    errors.raise_if_any("Invalid request body")
    refuse_duplicate_keys(body, structure)
    assert req is not None
    return req


def refuse_duplicate_keys(body: bytes, structure: Structure | None) -> None:
    """A 422 for a key given twice in one object, which pydantic-core silently resolves to the last: jiter (the
    same parser) over the body, or over a scanned body's keys only."""
    checked = keys_only(structure) if structure is not None else body
    try:
        jiter.from_json(checked, catch_duplicate_keys=True)
    except ValueError as exc:  # 'Detected duplicate key "horizon" at line 1 column 40'
        m = DUPLICATE.search(str(exc))
        msg = f'duplicate key "{m.group(1)}": a key may appear once in an object' if m else str(exc)
        field = duplicate_field(checked, m.group(1) if m else None)
        raise ProblemError(422, "Invalid request body", [{"field": field, "message": msg}]) from None


class _Twice(dict):
    """An object of the body with keys given twice (``duplicate_field``)."""

    twice: set[str]


def duplicate_field(body: bytes, key: str | None) -> str:
    """Where ``key`` (any key, if None) is given twice, e.g. ``series[0].plans[50].name`` ("body" if it is not
    found): the bytes jiter checked (a large body's keys alone) read once more with the standard library, which
    hands each object's pairs over whole. Only on this error's path."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in items]
        twice = {k for k in names if names.count(k) > 1} if len(set(names)) < len(names) else set()
        if not twice:
            return dict(items)
        out = _Twice(items)
        out.twice = twice
        return out

    def find(node: Any, path: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if isinstance(node, _Twice) and (key is None or key in node.twice):
            return (*path, key if key is not None else sorted(node.twice)[0])
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for name, child in children:
            if (found := find(child, (*path, name))) is not None:
                return found
        return None

    try:
        found = find(json.loads(body, object_pairs_hook=pairs), ())
    except (ValueError, RecursionError):
        return "body"
    return field_name(found) if found else "body"


def validate(model: Any, data: bytes, where: tuple[Any, ...], errors: Errors) -> Any:
    """``model`` from JSON bytes, or None with its problems (at ``where`` in the request) added to ``errors``."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        for e in exc.errors(include_url=False, include_input=False, include_context=False):
            errors.add(field_name((*where, *e["loc"])), message(e))
        return None


def plan_spans(s: Structure) -> dict[int, list[tuple[int, tuple[int, int]]]]:
    """Series index -> (plan index, (first, last byte)) of each of its plans, for every ``plans`` array made of
    objects only (anything else is left to the whole-body parse, which names it). The arrays at ``plans``'s
    level are checked together (a body of 34,000 of them took 6 s when each was named on its own)."""
    arrays = np.flatnonzero(s.is_array & (s.level == 4))
    lo, hi = np.searchsorted(s.level, [5, 6])
    # The containers of level 5 inside an array are a run of them (a level's containers are in body order).
    first = lo + np.searchsorted(s.open_pos[lo:hi], s.open_pos[arrays])
    last = lo + np.searchsorted(s.open_pos[lo:hi], s.close_pos[arrays])
    objects = np.concatenate(([0], np.cumsum(~s.is_array[lo:hi])))
    n = objects[last - lo] - objects[first - lo]
    only = (n == s.items[arrays]) & (n > 0)  # not an empty list, and nothing but objects
    arrays, first, last = arrays[only], first[only], last[only]
    found: dict[int, int] = {}  # series -> its plans array (the last, when the key is given twice)
    for r, path in enumerate(s.paths(s.open_pos[arrays])):
        if (m := PLANS_PATH.match(path)) is not None:
            found[int(m.group(1))] = r
    out = {}
    for i, r in found.items():
        plans = np.flatnonzero(~s.is_array[first[r] : last[r]]) + first[r]  # its objects
        out[i] = list(enumerate(zip(s.open_pos[plans].tolist(), s.close_pos[plans].tolist(), strict=True)))
    return out


def without(body: bytes, s: Structure | None, plans: dict[int, list]) -> bytes:
    """The body with the given series' plans arrays emptied (their plans are parsed on their own)."""
    if s is None:
        return body
    keep = np.ones(len(body), bool)
    for spans in plans.values():
        first, last = spans[0][1][0], spans[-1][1][1]
        keep[first : last + 1] = False
    return np.frombuffer(body, np.uint8)[keep].tobytes()


def field_name(loc: tuple[Any, ...]) -> str:
    """('series', 0, 'horizon') -> 'series[0].horizon'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def message(error: dict[str, Any]) -> str:
    """pydantic's message, but a timestamp's own words for a time that is not ISO 8601."""
    if error["type"] == "string_pattern_mismatch" and "timestamps" in error["loc"]:
        return f"not an ISO 8601 date-time (e.g. {TIME_EXAMPLE}); numbers are not read as times"
    return error["msg"]
