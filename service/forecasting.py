"""Running a decoded request through the model, in pieces small enough to bound memory and to let other
requests through between them; each piece hands back its series (or plans) already encoded as JSON.

Between the codecs: ``decode`` makes the arrays, this runs them, ``encode`` writes the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from modelcard.runtime import Forecast, ModelRuntime
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


def steps(trajectories: int, history: int, horizon: int, max_horizon: int) -> int:
    """The cost of an ONNX call in steps, the unit of KOVAE_CHUNK_WORK (which bounds each call, and below which a
    request runs on the fast lane): each trajectory the call rolls out (a forecast's mean, and each of its samples,
    for every series or plan in the call) counts its ``horizon`` plus half the model's ``max_horizon``, and the
    encoder counts each ``history`` step it reads (every series' history; a plans call's one history).

    The graph unrolls every trajectory over the card's maximum horizon and slices the requested horizon after
    (``export.onnx_export.ForecastGraph``), so a horizon of 1 still pays the whole rollout: counting samples x horizon
    alone put 64 series x 128 samples x horizon 1 (2.5 s) at 8,192, on the fast lane as one call. On the default
    model (one thread) a rollout step costs about half a decoded one and a history step about one: 500 samples of one
    series take 0.10 s at horizon 1 and 0.35 s at 96 (25,000 and 72,000 steps), 32 series' means 0.03 s with 64
    history steps and 0.06 s with 256 (3,600 and 9,800): 4 to 8 us a step. The plans graph decodes its steps more
    cheaply (1,000 plans' means at horizon 96: 0.28 s for 144,000 steps): there the count is an upper bound."""
    return trajectories * (horizon + max_horizon // 2) + history


def request_steps(d: DecodedRequest, max_horizon: int) -> int:
    """The whole request's ``steps``, as if it ran in one call: at most KOVAE_CHUNK_WORK, it runs on the fast lane
    (its series in one call per history length, its plans' pieces each a call). A series counts its mean and samples
    and its history; a series with plans each plan's mean and samples (none drawn without the plans' forecasts) and
    its one history."""
    total = 0
    for i, x in enumerate(d.x_hist):
        if d.facts[i].plan_names is None:
            total += steps(d.samples + 1, len(x), d.horizon, max_horizon)
        else:
            total += steps(len(d.u_fut[i]) * (plan_samples(d, i) + 1), len(x), d.horizon, max_horizon)
    return total


def plan_samples(d: DecodedRequest, i: int) -> int:
    """Samples drawn for each plan of series ``i``: none without the plans' forecasts in the answer (plan_forecasts
    false), whose quantiles would be dropped."""
    return d.samples if d.facts[i].plan_forecasts else 0


def plan(d: DecodedRequest, chunk_work: int, max_horizon: int) -> list[list[int]]:
    """Series indices per piece of work: series of one history length, together at most ``chunk_work`` ``steps``
    with all their samples (a single series past it is one piece, its samples drawn in several calls: ``run_series``).
    The series with plans are left out: ``plan_pieces`` splits each into its own pieces."""
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(d.x_hist):
        if d.facts[i].plan_names is None:
            by_length.setdefault(len(x), []).append(i)
    groups = []
    for length, idx in by_length.items():
        group = max(1, chunk_work // steps(d.samples + 1, length, d.horizon, max_horizon))
        groups += [idx[k : k + group] for k in range(0, len(idx), group)]
    return groups


def plan_pieces(
    d: DecodedRequest, i: int, chunk_work: int, max_horizon: int, piece_bytes: int = PIECE_BYTES
) -> list[tuple[int, int]]:
    """(first, stop) plans of series ``i`` per piece: at most ``piece_bytes`` of JSON and at most ``chunk_work``
    ``steps`` (one plan a piece where one alone is more)."""
    n_plans, facts = len(d.u_fut[i]), d.facts[i]
    per_plan = forecast_bytes(len(facts.outputs), len(d.quantiles), d.horizon) if facts.plan_forecasts else 1
    step = max(1, piece_bytes // per_plan)
    history, per_plan_steps = len(d.x_hist[i]), steps(plan_samples(d, i) + 1, 0, d.horizon, max_horizon)
    step = min(step, max(1, (chunk_work - history) // per_plan_steps))
    return [(k, min(k + step, n_plans)) for k in range(0, n_plans, step)]


def samples_per_call(chunk_work: int, trajectories: int, history: int, horizon: int, max_horizon: int) -> int:
    """Samples of each of ``trajectories`` forecasts one call of at most ``chunk_work`` ``steps`` draws beside their
    means, after encoding ``history`` steps in all; at least one."""
    return max(1, (chunk_work - history) // (trajectories * steps(1, 0, horizon, max_horizon)) - 1)


def drawn_in_calls(
    call: Callable[[int], Forecast], samples: int, per_call: int, quantiles: list[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mean, quantiles (Q, forecasts, H, outputs) or None without samples) of ``samples`` samples drawn
    ``per_call`` at a time by ``call(k)``, a forecast with k samples (the first call's mean kept): memory and each
    call's time stay bounded whatever the request asked for."""
    mean, drawn = None, []
    for start in range(0, max(samples, 1), per_call):
        fc = call(min(per_call, samples - start))
        mean = fc.mean if mean is None else mean
        if fc.samples is not None:
            drawn.append(fc.samples)
    assert mean is not None  # one call at least
    return mean, np.quantile(np.concatenate(drawn, 1), quantiles, axis=1) if drawn else None


def run_series(
    rt: ModelRuntime, d: DecodedRequest, series: list[int], rng: np.random.Generator, chunk_work: int
) -> dict[int, SeriesResult]:
    """Mean and quantiles of some series. Samples are drawn in calls of at most ``chunk_work`` ``steps`` (each call
    rolls the means out again beside its samples, and encodes the histories again; at least one sample a call) and
    reduced to quantiles here (``drawn_in_calls``)."""
    x = np.stack([d.x_hist[i] for i in series])
    u = np.stack([d.u_hist[i] for i in series])
    uf = np.stack([d.u_fut[i] for i in series])
    last = np.array([d.last_minute[i] for i in series])
    df = np.stack([d.d_fut[i] for i in series])
    sp = {"s_hist": np.stack([d.s_hist[i] for i in series]), "s_fut": np.stack([d.s_fut[i] for i in series])}
    per_call = samples_per_call(chunk_work, len(series), len(series) * x.shape[1], d.horizon, rt.max_horizon)
    mean, qs = drawn_in_calls(
        lambda k: rt.predict(x, u, uf, last, k, rng, d_fut=df, **sp), d.samples, per_call, d.quantiles
    )
    return {i: SeriesResult(mean[j], None if qs is None else qs[:, j]) for j, i in enumerate(series)}


def run_plans(
    rt: ModelRuntime, d: DecodedRequest, i: int, first: int, stop: int, rng: np.random.Generator, chunk_work: int
) -> SeriesResult:
    """Plans ``first``..``stop`` of series ``i`` under its one history: the encoder runs once per call. Without
    the plans' forecasts in the answer (plan_forecasts false) no samples are drawn (``plan_samples``); with more
    samples than one call of ``chunk_work`` ``steps`` holds (``plan_pieces`` gives such a plan a piece of its
    own), they are drawn in several calls, as a series' are (``drawn_in_calls``)."""
    s_fut = d.s_fut[i] if d.s_fut[i].ndim == 2 else d.s_fut[i][first:stop]  # shared, or each plan's own
    per_call = samples_per_call(chunk_work, stop - first, len(d.x_hist[i]), d.horizon, rt.max_horizon)

    def call(k: int) -> Forecast:
        plans = d.u_fut[i][first:stop]
        return rt.predict_plans(
            d.x_hist[i], d.u_hist[i], plans, d.last_minute[i], k, rng, d.d_fut[i], d.s_hist[i], s_fut
        )

    return SeriesResult(*drawn_in_calls(call, plan_samples(d, i), per_call, d.quantiles))


def pieces(
    rt: ModelRuntime, d: DecodedRequest, chunk_work: int, piece_bytes: int = PIECE_BYTES
) -> Iterator[Callable[[], list[Fragment]]]:
    """Zero-argument callables, one per piece, to be run in order: each forecasts its series (or some plans
    of one series) and returns them as JSON fragments, so that no single step of a large request holds the
    interpreter or much memory for long: each ONNX call is at most ``chunk_work`` ``steps``."""
    rng = np.random.default_rng(d.seed)
    for series in plan(d, chunk_work, rt.max_horizon):

        def piece(series: list[int] = series) -> list[Fragment]:
            results = run_series(rt, d, series, rng, chunk_work)
            return [(i, 0, encode_series(rt, d.quantiles, i, d.facts[i], res)) for i, res in results.items()]

        yield piece
    for i, facts in enumerate(d.facts):
        if facts.plan_names is None:
            continue
        for k, (first, stop) in enumerate(plan_pieces(d, i, chunk_work, rt.max_horizon, piece_bytes)):

            def plans_piece(i: int = i, k: int = k, first: int = first, stop: int = stop) -> list[Fragment]:
                res = run_plans(rt, d, i, first, stop, rng, chunk_work)
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
