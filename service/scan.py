"""Size rules on a raw JSON body, checked before it is parsed: a body within the byte limit can still hold
millions of values, and parsing them holds the interpreter (pydantic-core keeps the GIL while it builds
Python objects: 2.6 million zeros took 0.2 s, during which no other request moved).

The scan finds the body's structure with NumPy, whose array passes mostly run without the GIL: strings,
arrays and objects, each container's item count and nesting level. It refuses a body whose any array,
object, string or nesting is larger than any field of the request takes, or that holds more values in all
than ``values``, naming the first container at fault by its path (``series[0].measurements.Q_in``). Malformed
JSON passes through: the parser names the byte where it breaks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from service.problems import LISTED, Errors

OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT, COMMA = 1, 2, 3, 4, 5
CODES = np.zeros(256, np.int8)
for _char, _code in zip(b"[]{},", (OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT, COMMA), strict=True):
    CODES[_char] = _code
QUOTE, BACKSLASH = ord('"'), ord("\\")


@dataclass(frozen=True)
class SizeLimits:
    values: int  # JSON values in the whole body
    array: int  # items in any one array
    members: int  # members of any one object
    string_bytes: int  # bytes of any one string, as sent (escapes included)
    depth: int  # nesting of arrays and objects


@dataclass
class Structure:
    """A well-formed body's containers, in order of level then position (so a level's containers are
    contiguous and in body order)."""

    body: bytes
    open_pos: np.ndarray  # byte offset of each container's opening bracket
    close_pos: np.ndarray
    level: np.ndarray  # 1 for the outermost container
    is_array: np.ndarray
    items: np.ndarray  # commas + 1: items of an array, members of an object (1 for an empty one)
    leaf: np.ndarray  # holds no container (an array of numbers, strings, ...)
    tok: np.ndarray  # byte offsets of every bracket, brace and comma outside strings, in body order
    tok_comma_level: np.ndarray  # per token: its container's level if it is a comma, else 0
    string_start: np.ndarray  # offsets of each string's opening and closing quote, in body order
    string_end: np.ndarray
    _level_commas: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)  # ``_commas``

    @property
    def values(self) -> int:
        """Values in the body, counted as every array item and object member (each counts once)."""
        return int(self.items.sum()) + 1

    def path(self, pos: int) -> str:
        """The field at byte ``pos`` (a container's opening bracket or a string's opening quote), as the request's
        errors name fields: ``series[0].measurements.Q_in``."""
        return self.paths(np.array([pos]))[0]

    def paths(self, pos: np.ndarray) -> list[str]:
        """``path`` of each offset in ``pos``, for a few binary searches each: an array's index is found among
        its level's commas (``_commas``), not counted from the array's start, so naming every container of a
        large body costs in proportion to their number, not to it times the body's size."""
        pos = np.asarray(pos, np.int64).reshape(-1)
        holders = []  # per level from 1: the container there that holds each pos, -1 where none does
        held = np.ones(len(pos), bool)
        for lvl in range(1, self._top + 1):
            lo, hi = np.searchsorted(self.level, [lvl, lvl + 1])
            k = lo + np.searchsorted(self.open_pos[lo:hi], pos) - 1  # the last container opened before pos
            held &= (k >= lo) & (pos < self.close_pos[np.maximum(k, 0)])
            if not held.any():
                break
            holders.append(np.where(held, k, -1))
        out = np.full(len(pos), "", object)
        for i, k in enumerate(holders):
            rows = np.flatnonzero(k >= 0)
            # A container names what starts at pos, or the container at the next level that holds it.
            child = holders[i + 1][rows] if i + 1 < len(holders) else np.full(len(rows), -1)
            at = np.where(child >= 0, self.open_pos[np.maximum(child, 0)], pos[rows])
            at, first, inverse = np.unique(at, return_index=True, return_inverse=True)  # one container names each
            out[rows] += self._labels(k[rows][first], i + 1, at)[inverse.reshape(-1)]
        return [p.lstrip(".") or "body" for p in out]

    @cached_property
    def _top(self) -> int:
        return int(self.level.max(initial=0))

    def _commas(self, lvl: int) -> np.ndarray:
        """The offsets of the commas of the containers of level ``lvl`` (as ``tok_comma_level`` holds it), in body
        order: one pass over the tokens per level asked for."""
        if lvl not in self._level_commas:
            self._level_commas[lvl] = self.tok[self.tok_comma_level == lvl]
        return self._level_commas[lvl]

    def _labels(self, k: np.ndarray, lvl: int, at: np.ndarray) -> np.ndarray:
        """How containers ``k`` (of level ``lvl``) name what starts at ``at``: ``[index]`` in an array, ``.key``
        in an object."""
        labels = np.empty(len(k), object)
        arrays = self.is_array[k]
        if arrays.any():
            # The level's commas between a container's opening and pos are that container's own.
            commas = self._commas(lvl)
            n = np.searchsorted(commas, at[arrays]) - np.searchsorted(commas, self.open_pos[k[arrays]])
            labels[arrays] = [f"[{int(c)}]" for c in n]
        if not arrays.all():
            labels[~arrays] = self._keys(self.open_pos[k[~arrays]], at[~arrays])
        return labels

    def _keys(self, start: np.ndarray, at: np.ndarray) -> list[str]:
        """``.key`` for what starts at each ``at`` in the objects opened at ``start``; ``.<no key>`` for a value
        with no key before it (a body the parser will refuse: its sizes are checked first, and named)."""
        n = len(self.string_start)
        if n == 0:
            return [NO_KEY] * len(at)
        j = np.searchsorted(self.string_end, at) - 1  # the string just before at: its key, if a colon follows
        key = (j >= 0) & (self.string_start[np.maximum(j, 0)] > start)
        after = self.string_end[np.maximum(j, 0)] + 1
        colon_end: dict[int, int] = {}  # after a string: where its ":" and the blanks around it end (-1: no ":")
        for r in np.flatnonzero(key):
            # Matched once per string, never sliced up to at: many values after one string (no key between, a
            # malformed body) each copied the body up to itself, 15 s for 1.2 MB.
            a = int(after[r])
            if a not in colon_end:
                m = COLON.match(self.body, a)
                colon_end[a] = -1 if m is None else m.end()
            key[r] = colon_end[a] == at[r]
        own = ~key & (j + 1 < n) & (self.string_start[np.minimum(j + 1, n - 1)] == at)  # at is a key itself
        j = np.where(key, j, np.minimum(j + 1, n - 1))
        ends = zip(self.string_start[j].tolist(), self.string_end[j].tolist(), strict=True)
        raw = [self.body[a : b + 1] if named_ else None for (a, b), named_ in zip(ends, key | own, strict=True)]
        labels: dict[bytes, str] = {}
        return [NO_KEY if r is None else labels[r] if r in labels else labels.setdefault(r, _key_label(r)) for r in raw]


NO_KEY = ".<no key>"
COLON = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")  # JSON's blanks around a key's colon


def _key_label(raw: bytes) -> str:
    """``.key`` for a key as sent, quotes included (escapes read; a long key cut short)."""
    try:
        key = str(json.loads(raw))
    except ValueError:
        key = raw[1:-1].decode("utf-8", "replace")
    return "." + (key if len(key) <= 40 else key[:37] + "...")


def _unescaped(a: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """The quotes that end or start a string: those not preceded by an odd run of backslashes."""
    slashes = np.flatnonzero(a == BACKSLASH)
    if len(slashes) == 0:
        return quotes
    run_start = np.ones(len(slashes), bool)
    run_start[1:] = np.diff(slashes) != 1
    first = np.maximum.accumulate(np.where(run_start, np.arange(len(slashes)), 0))  # each backslash's run start
    k = np.searchsorted(slashes, quotes) - 1  # the backslash just before each quote, if any
    before = (k >= 0) & (slashes[np.maximum(k, 0)] == quotes - 1)
    run = np.where(before, np.maximum(k, 0) - first[np.maximum(k, 0)] + 1, 0)
    return quotes[run % 2 == 0]


def structure(body: bytes) -> Structure | None:
    """The body's containers and strings; None when the brackets or quotes do not pair up (malformed JSON)."""
    a = np.frombuffer(body, np.uint8)
    quotes = _unescaped(a, np.flatnonzero(a == QUOTE))
    if len(quotes) % 2:
        return None
    s_start, s_end = quotes[0::2], quotes[1::2]
    toggle = np.zeros(len(a) + 1, np.int8)
    toggle[s_start], toggle[s_end] = 1, -1
    codes = CODES[a]
    codes[np.cumsum(toggle[:-1], dtype=np.int8).view(bool)] = 0  # brackets and commas inside strings
    tok = np.flatnonzero(codes)
    kind = codes[tok]
    is_open = (kind == OPEN_ARRAY) | (kind == OPEN_OBJECT)
    is_close = (kind == CLOSE_ARRAY) | (kind == CLOSE_OBJECT)
    depth = np.cumsum(is_open.astype(np.int32) - is_close, dtype=np.int32)
    if len(tok) == 0 or depth.min() < 0 or depth[-1] != 0:
        return None
    level = np.where(is_close, depth + 1, depth)  # the level of the container each token opens, closes or is in
    if level.min() < 1:
        return None  # a comma outside every container
    order = np.argsort(level, kind="stable")  # by level, then body order: a level's containers do not nest
    first, last = np.flatnonzero(is_open[order]), np.flatnonzero(is_close[order])
    if len(first) != len(last):
        return None
    opens, closes = order[first], order[last]
    if np.any(kind[opens] + 1 != kind[closes]):
        return None  # "[}" and the like
    # In level order only a container's own commas lie between its brackets.
    commas = last - first - 1
    return Structure(
        body=body,
        open_pos=tok[opens],
        close_pos=tok[closes],
        level=level[opens],
        is_array=kind[opens] == OPEN_ARRAY,
        items=commas + 1,
        leaf=closes - opens - 1 == commas,  # in body order too, nothing but its commas between its brackets
        tok=tok,
        tok_comma_level=np.where(kind == COMMA, level, 0).astype(np.int8),
        string_start=s_start,
        string_end=s_end,
    )


def check_sizes(body: bytes, limits: SizeLimits) -> Structure | None:
    """Raise a 422 ProblemError (via ``Errors``) naming the containers that break ``limits``, first by
    position: nesting, then arrays, objects and strings, then the body's values in all. Returns the structure
    (None for malformed JSON, left to the parser)."""
    s = structure(body)
    if s is None:
        return None
    errors = Errors()
    deep = np.flatnonzero(s.level > limits.depth)
    if len(deep):
        k = deep[np.argmin(s.open_pos[deep])]
        errors.add(s.path(int(s.open_pos[k])), f"nested deeper than {limits.depth} arrays and objects")
        errors.raise_if_any("Request too large")
    big = (s.is_array & (s.items > limits.array)) | (~s.is_array & (s.items > limits.members))
    for k in np.flatnonzero(big)[np.argsort(s.open_pos[big], kind="stable")]:
        kind, limit = ("items", limits.array) if s.is_array[k] else ("members", limits.members)
        field = s.path(int(s.open_pos[k])) if len(errors.listed) < LISTED else ""  # only the listed are named
        errors.add(field, f"{s.items[k]} {kind}; no field of a request takes more than {limit}")
    lengths = s.string_end - s.string_start - 1
    for k in np.flatnonzero(lengths > limits.string_bytes):
        field = s.path(int(s.string_start[k])) if len(errors.listed) < LISTED else ""
        errors.add(field, f"a string of {lengths[k]} bytes; at most {limits.string_bytes}")
    if not len(errors) and s.values > limits.values:
        errors.add("body", f"{s.values} values; a request may hold at most {limits.values}: send fewer series or plans")
    errors.raise_if_any("Request too large")
    return s


def keys_only(s: Structure) -> bytes:
    """The body with the contents of every array that holds no container left out: what is left has every
    object key, so a duplicate-key check of it costs a fraction of one of the whole body."""
    leaf = s.leaf & s.is_array & (s.close_pos > s.open_pos + 1)
    toggle = np.zeros(len(s.body) + 1, np.int8)
    toggle[s.open_pos[leaf] + 1], toggle[s.close_pos[leaf]] = 1, -1
    dropped = np.cumsum(toggle[:-1], dtype=np.int8).view(bool)
    return np.frombuffer(s.body, np.uint8)[~dropped].tobytes()
