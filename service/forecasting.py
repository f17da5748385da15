"""Running a decoded request through the model, in pieces small enough to bound memory and to let other
requests through between them; each piece hands back its series (or plans) already encoded as JSON.

Between the codecs: ``decode`` makes the arrays, this runs them, ``encode`` writes the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from modelcard.runtime import ModelRuntime
from service import metrics
from service.encode import (
    SMALL_ANSWER,
    SeriesResult,
    encode_plans,
    encode_series,
    envelope,
    forecast_bytes,
    series_with_plans,
)
from service.problems import ProblemError
from service.request import DecodedRequest

PIECE_BYTES = 2_000_000
"""Plans' JSON per piece: bounds the Python lists alive at once while a series' plans are encoded, and the time
pydantic-core holds the interpreter writing them (~20 ms for 2 MB)."""

Fragment = tuple[int, int, bytes]
"""(series index, piece of that series, JSON): a series without plans is one piece; with plans, several."""


def plan(d: DecodedRequest, chunk_work: int) -> list[list[int]]:
    """Series indices per piece of work: series of one history length, together at most ``chunk_work``
    sample steps (a single series with more samples is one piece, its samples drawn in chunks). The series
    with plans are left out: ``plan_pieces`` splits each into its own pieces."""
    per_series = max(d.samples, 1) * d.horizon
    group = max(1, chunk_work // per_series)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(d.x_hist):
        if d.facts[i].plan_names is None:
            by_length.setdefault(len(x), []).append(i)
    return [idx[k : k + group] for idx in by_length.values() for k in range(0, len(idx), group)]


def plan_pieces(d: DecodedRequest, i: int, chunk_work: int, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """(first, stop) plans of series ``i`` per piece: at most ``piece_bytes`` of JSON, and with samples at most
    ``chunk_work`` sample steps (means alone run all in one call: the runtime decodes them step by step)."""
    n_plans, facts = len(d.u_fut[i]), d.facts[i]
    per_plan = forecast_bytes(len(facts.outputs), len(d.quantiles), d.horizon) if facts.plan_forecasts else 1
    step = max(1, piece_bytes // per_plan)
    if d.samples and facts.plan_forecasts:
        step = min(step, max(1, chunk_work // (d.samples * d.horizon)))
    return [(k, min(k + step, n_plans)) for k in range(0, n_plans, step)]


def run_series(
    rt: ModelRuntime, d: DecodedRequest, series: list[int], rng: np.random.Generator, chunk_work: int
) -> dict[int, SeriesResult]:
    """Mean and quantiles of some series. Samples are drawn ``chunk_work`` sample steps at a time and
    reduced to quantiles here, so memory stays bounded whatever the request asked for."""
    x = np.stack([d.x_hist[i] for i in series])
    u = np.stack([d.u_hist[i] for i in series])
    uf = np.stack([d.u_fut[i] for i in series])
    last = np.array([d.last_minute[i] for i in series])
    df = np.stack([d.d_fut[i] for i in series])
    sp = {"s_hist": np.stack([d.s_hist[i] for i in series]), "s_fut": np.stack([d.s_fut[i] for i in series])}
    if d.samples == 0:
        mean = rt.predict(x, u, uf, last, d_fut=df, **sp).mean
        return {i: SeriesResult(mean[j], None) for j, i in enumerate(series)}
    per_call = max(1, chunk_work // (len(series) * d.horizon))
    mean, drawn = None, []
    for start in range(0, d.samples, per_call):
        fc = rt.predict(x, u, uf, last, min(per_call, d.samples - start), rng, d_fut=df, **sp)
        mean = fc.mean if mean is None else mean
        drawn.append(fc.samples)
    samples = np.concatenate(drawn, 1)  # (series, samples, H, outputs)
    qs = np.quantile(samples, d.quantiles, axis=1)  # (Q, series, H, outputs)
    return {i: SeriesResult(mean[j], qs[:, j]) for j, i in enumerate(series)}


def run_plans(
    rt: ModelRuntime, d: DecodedRequest, i: int, first: int, stop: int, rng: np.random.Generator
) -> SeriesResult:
    """Plans ``first``..``stop`` of series ``i`` under its one history: the encoder runs once per call. Without
    the plans' forecasts in the answer (plan_forecasts false) no samples are drawn: their quantiles would be
    dropped."""
    s_fut = d.s_fut[i] if d.s_fut[i].ndim == 2 else d.s_fut[i][first:stop]  # shared, or each plan's own
    fc = rt.predict_plans(
        d.x_hist[i],
        d.u_hist[i],
        d.u_fut[i][first:stop],
        d.last_minute[i],
        d.samples if d.facts[i].plan_forecasts else 0,
        rng,
        d.d_fut[i],
        d.s_hist[i],
        s_fut,
    )
    qs = None if fc.samples is None else np.quantile(fc.samples, d.quantiles, axis=1)  # (Q, plans, H, outputs)
    return SeriesResult(fc.mean, qs)


def pieces(
    rt: ModelRuntime, d: DecodedRequest, chunk_work: int, piece_bytes: int = PIECE_BYTES
) -> Iterator[Callable[[], list[Fragment]]]:
    """Zero-argument callables, one per piece, to be run in order: each forecasts its series (or some plans
    of one series) and returns them as JSON fragments, so that no single step of a large request holds the
    interpreter or much memory for long."""
    rng = np.random.default_rng(d.seed)
    for series in plan(d, chunk_work):

        def piece(series: list[int] = series) -> list[Fragment]:
            results = run_series(rt, d, series, rng, chunk_work)
            return [(i, 0, encode_series(rt, d.quantiles, i, d.facts[i], res)) for i, res in results.items()]

        yield piece
    for i, facts in enumerate(d.facts):
        if facts.plan_names is None:
            continue
        for k, (first, stop) in enumerate(plan_pieces(d, i, chunk_work, piece_bytes)):

            def plans_piece(i: int = i, k: int = k, first: int = first, stop: int = stop) -> list[Fragment]:
                res = run_plans(rt, d, i, first, stop, rng)
                return [(i, k, encode_plans(rt, d.quantiles, i, d.facts[i], first, res))]

            yield plans_piece


def answer(rt: ModelRuntime, d: DecodedRequest, fragments: list[Fragment]) -> list[bytes]:
    """The answer's bytes, in order, from every piece's fragments: the envelope around the series, a series
    with plans around its plans."""
    by_series: dict[int, list[tuple[int, bytes]]] = {}
    for i, k, data in fragments:
        by_series.setdefault(i, []).append((k, data))
    head, tail = envelope(rt, d.horizon)
    parts = [head]
    for i, facts in enumerate(d.facts):
        if i:
            parts.append(b",")
        ordered = [data for _, data in sorted(by_series[i], key=lambda kd: kd[0])]
        if facts.plan_names is None:
            parts += ordered
            continue
        before, after = series_with_plans(facts)
        parts.append(before)
        for k, data in enumerate(ordered):
            parts += [b",", data] if k else [data]
        parts.append(after)
    parts.append(tail)
    return parts


class AnswerBudget:
    """The bytes of the large answers (``SMALL_ANSWER`` or more, predicted from the decoded request) this worker is
    computing or sending at once. Each request's answer was bounded, but not how many: eight 1,000-plan answers
    at once took a worker from 200 to 580 MB, past a 512 MiB container's limit, where the kernel kills every
    request in flight. A large request past the budget is refused 503 (Retry-After) before any inference (its body,
    parsed one at a time, is the cost already paid); a request alone always passes (the budget below one answer
    would refuse it for ever), and small answers are never counted, so they keep flowing beside the large ones.
    Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def reserve(self, size: int) -> int:
        """Hold ``size`` bytes for an answer (0 for a small one), or refuse it (503): what to release later."""
        if size < SMALL_ANSWER:
            return 0
        if self.used and self.used + size > self.limit:
            metrics.ERRORS.labels("forecast_busy").inc()
            detail = (
                f"{self.used / 1e6:.0f} MB of large answers are being computed or sent by this worker, and this one "
                f"(about {size / 1e6:.0f} MB) would pass KOVAE_MAX_ANSWERS_IN_FLIGHT_BYTES: try again shortly"
            )
            raise ProblemError(503, "Service busy", detail=detail, headers={"Retry-After": "1"})
        self.used += size
        metrics.ANSWER_BYTES_IN_FLIGHT.set(self.used)
        return size

    def release(self, size: int) -> None:
        self.used -= size
        metrics.ANSWER_BYTES_IN_FLIGHT.set(self.used)

    async def release_later(self, size: int) -> None:
        """``release`` as an answer's background task: async, so Starlette runs it on the event loop, where the
        budget is reserved (a plain function would run in a worker thread, racing the reservations)."""
        self.release(size)
