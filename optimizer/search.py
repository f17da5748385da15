"""The plan that costs the least energy within the effluent limits, searched with the model itself.

A plan holds each decided variable (the loops' setpoints, e.g. the DO and the anoxic nitrate, and any open-loop
control the objective names, e.g. a blower's output) constant over blocks (an hour), within its bounds. Its
energy is the objective's linear formula over the horizon, with each looped control at its forecast (the air the
DO loop will need) and each open-loop control at the plan's value. Its limits are on forecast quantiles (the 90%
quantile of effluent ammonium at most 4 g N/m3 at every step), each with a price: the kWh a plan may spend to
bring its quantile one unit lower for an hour where it is above the limit. A high price makes a limit hard; a
finite one says what a dry-weather ammonium peak that no air within bounds prevents is worth, so the plan spends
air where it buys the most and saves it where it buys little, and the answer says the limit cannot be met and by
how much. The price counts from the limit, never from what holding the setpoints would do: a plan that lowered
the air yesterday is no excuse to lower it again today.

The search is a pattern search over the plans graph, which runs one history under hundreds of plans with the
encoder run once: each sweep tries every decided variable one step up and one step down over each span of
blocks, all in one batch, takes every move that helped (or the best one alone if together they do not), and
grows or halves each step by how its moves fared. Quantiles need sampled forecasts, 30-100 times the cost of a
mean, so plans are ranked on their mean plus each limit's margin (quantile minus mean, per step) from a sampled
forecast of the current plan, widened after two sweeps by the best plan's own (a lower DO widens the ammonium's
spread), and the answer's plan and the current one are scored on their own samples. Why not a convex problem in
the latent state: the decoder and the loops' output limits are not linear, and a search over the model itself is
as exact as the model on every plan it ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from modelcard.objective import EffluentLimit, Objective
from modelcard.runtime import ModelRuntime

RANDOM_BATCH = 500  # plans per forecast call of the random search
IMPROVEMENT = 1e-3  # a plan's score must beat holding's by this much (units: holding's energy) to be advised
BACK_OFF = (0.75, 0.5, 0.25)  # shares of the way from holding to the search's plan tried where it breaks a limit


@dataclass(frozen=True)
class Situation:
    """One series as the runtime takes it (``service.decode``): its history and the plan held over the horizon."""

    x_hist: np.ndarray  # (L, n_x)
    u_hist: np.ndarray  # (L, n_u)
    s_hist: np.ndarray | None  # (L, n_s), NaN where not sent
    last_minute: float
    d_fut: np.ndarray | None  # (H, n_d), NaN where no forecast
    u_held: np.ndarray  # (H, n_u): the open-loop controls' plan, NaN where a loop decides
    s_held: np.ndarray | None  # (H, n_s): the setpoints' plan if sent, NaN where not


@dataclass(frozen=True)
class Search:
    """The pattern search's settings."""

    sweeps: int = 14  # rounds of moves at most
    groups: int = 12  # spans of consecutive blocks a move shifts together (at most; the card's 12 blocks: 1 h each)
    step: float = 0.25  # the first move, as a share of each bound's width; halved when no move helps
    min_step: float = 0.03  # the search ends when every step is below this share
    samples: int = 100  # sampled forecasts for the quantiles (margins and the final check)
    seed: int = 0
    # "pattern", or "random": this many plans drawn uniformly within the bounds, the brute force the pattern
    # search is judged against (bench/optimize.py)
    method: str = "pattern"
    random_plans: int = 8000


@dataclass
class Spread:
    """Per limit, sets of residuals (samples minus their mean, (S, H)) of sampled forecasts: where a plan's mean
    forecast goes, its samples are taken to go (the spread moves with the mean). Several sets (the current plan's,
    the best plan's) count at their widest."""

    residuals: list[list[np.ndarray]]

    def margin(self, k: int, quantile: float) -> np.ndarray:
        """Limit ``k``'s quantile minus the mean per step: (H,)."""
        return np.max([np.quantile(r, quantile, axis=0) for r in self.residuals[k]], axis=0)

    def above(self, k: int, mean: np.ndarray, limit: float) -> np.ndarray:
        """The share of samples above ``limit`` per plan and step of means (P, H): (P, H)."""
        return np.max([(r[None] > (limit - mean)[:, None, :]).mean(1) for r in self.residuals[k]], axis=0)

    def widened(self, other: Spread) -> Spread:
        return Spread([a + b for a, b in zip(self.residuals, other.residuals, strict=True)])


@dataclass
class LimitCheck:
    limit: EffluentLimit
    worst: float  # the quantile's highest value over the horizon
    worst_step: int
    excess: float  # how far the worst step is above the limit (0: met)
    binding_steps: list[int]  # steps where the quantile is within 2% of the limit or above it
    hours_above: float = 0.0  # expected hours above the limit (the share of samples above it, summed over steps)


@dataclass
class Outcome:
    """A plan with its forecast, energy and limits."""

    u: np.ndarray  # (H, n_u): every control, NaN where a loop decides
    s: np.ndarray  # (H, n_s): every setpoint, NaN where not given
    mean: np.ndarray  # (H, n_out)
    quantiles: np.ndarray  # (Q, H, n_out), at ``levels``
    levels: list[float]
    energy: dict[str, float]  # kWh over the horizon: aeration, pumping, constant, total
    limits: list[LimitCheck]
    blocks: np.ndarray  # (blocks, decisions): the decided values
    spread: Spread  # its own samples' residuals per limit

    @property
    def feasible(self) -> bool:
        return all(c.excess == 0 for c in self.limits)


@dataclass
class Advice:
    status: str  # "improved" or "current_is_best"
    plan: Outcome
    current: Outcome
    sweeps: int
    plans_evaluated: int
    seconds: float
    score: float = 0.0  # the plan's: energy relative to holding's, plus its limits' and moves' cost
    current_score: float = 0.0


class Problem:
    """One request's search space and scoring over the runtime."""

    def __init__(self, rt: ModelRuntime, sit: Situation, objective: Objective, horizon: int) -> None:
        self.rt, self.sit, self.obj, self.horizon = rt, sit, objective, horizon
        n_s = len(rt.setpoints)
        self.s_base = np.full((horizon, n_s), np.nan) if sit.s_held is None else sit.s_held.copy()
        # (kind, index, lo, hi, current) per decided variable
        self.decisions: list[tuple[str, int, float, float, float]] = []
        for name, (lo, hi) in objective.setpoints.items():
            j = rt.setpoints.index(name)
            self.decisions.append(("s", j, lo, hi, self._current_setpoint(j, lo, hi)))
        for name, (lo, hi) in objective.controls.items():
            j = rt.controls.index(name)
            self.decisions.append(("u", j, lo, hi, float(sit.u_held[0, j])))
        self.names = list(objective.setpoints) + list(objective.controls)
        self.lo = np.array([d[2] for d in self.decisions])
        self.hi = np.array([d[3] for d in self.decisions])
        self.now = np.array([d[4] for d in self.decisions])
        block_steps = objective.block_minutes // rt.step_minutes
        self.block_of_step = np.arange(horizon) // block_steps
        if objective.control_minutes is not None:  # the last decided block is held to the horizon's end
            last = -(-objective.control_minutes // objective.block_minutes) - 1
            self.block_of_step = np.minimum(self.block_of_step, last)
        self.n_blocks = int(self.block_of_step[-1]) + 1
        self.limit_outputs = [rt.outputs.index(m.variable) for m in objective.limits]
        self.limit_pairs = list(zip(objective.limits, self.limit_outputs, strict=True))
        self.step_hours = rt.step_minutes / 60
        self.evaluated = 0

    def _current_setpoint(self, j: int, lo: float, hi: float) -> float:
        """The setpoint the plant holds now: its plan's first value if sent, else its last in the history."""
        if np.isfinite(self.s_base[0, j]):
            return float(self.s_base[0, j])
        hist = self.sit.s_hist[:, j] if self.sit.s_hist is not None else np.array([])
        seen = hist[np.isfinite(hist)]
        return float(seen[-1]) if len(seen) else (lo + hi) / 2

    def current(self) -> np.ndarray:
        """The current plan as block values (1, blocks, decisions): every decided variable held where it is."""
        return np.broadcast_to(self.now, (1, self.n_blocks, len(self.now))).copy()

    def expand(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block values (P, blocks, decisions) to every plan's controls (P, H, n_u) and setpoints (P, H, n_s)."""
        steps = v[:, self.block_of_step]  # (P, H, decisions)
        u = np.repeat(self.sit.u_held[None], len(v), 0)
        s = np.repeat(self.s_base[None], len(v), 0)
        for k, (kind, j, *_) in enumerate(self.decisions):
            (s if kind == "s" else u)[:, :, j] = steps[:, :, k]
        return u, s

    def forecast(self, v: np.ndarray, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean (P, H, n_out) and samples (P, S, H, n_out) of plans ``v`` (block values)."""
        u, s = self.expand(v)
        sit = self.sit
        fc = self.rt.predict_plans(
            sit.x_hist, sit.u_hist, u, sit.last_minute, samples, rng, sit.d_fut, sit.s_hist, s if s.size else None
        )
        self.evaluated += len(v)
        return fc.mean, fc.samples

    def energy(self, v: np.ndarray, mean: np.ndarray) -> dict[str, np.ndarray]:
        """kWh over the horizon per plan, by group: each control at the plan's value, or its forecast where its
        loop decides it."""
        u, _ = self.expand(v)
        out: dict[str, np.ndarray] = {}
        for group, coefficients in (("aeration", self.obj.aeration_kw), ("pumping", self.obj.pumping_kw)):
            kw = np.zeros(len(v))
            for name, c in coefficients.items():
                j = self.rt.controls.index(name)
                value = u[:, :, j]
                if name in self.rt.outputs:  # a looped control: where the plan leaves it to its loop, the forecast
                    value = np.where(np.isfinite(value), value, mean[:, :, self.rt.outputs.index(name)])
                kw = kw + c * np.clip(value, 0, None).sum(1)
            out[group] = kw * self.step_hours
        out["constant"] = np.full(len(v), self.obj.constant_kw * self.horizon * self.step_hours)
        out["total"] = out["aeration"] + out["pumping"] + out["constant"]
        return out

    def spread(self, mean: np.ndarray, samples: np.ndarray) -> Spread:
        """Each limit's residuals (samples minus mean, (S, H)) of one plan's forecast (1, H, n_out) and samples
        (1, S, H, n_out)."""
        return Spread([[samples[0, :, :, o] - mean[0, None, :, o]] for o in self.limit_outputs])

    def penalty(self, mean: np.ndarray, spread: Spread, reference: float) -> np.ndarray:
        """Per plan (means (P, H, n_out)), what its limits cost in the score, relative to the reference energy:
        each limit's price for every unit its quantile (the mean plus the spread's margin) is above it, per hour,
        and its price per expected hour above it (the mean plus the spread's residuals)."""
        total = np.zeros(len(mean))
        for k, (m, o) in enumerate(self.limit_pairs):
            if m.price_kwh:
                over = np.clip(mean[:, :, o] + spread.margin(k, m.quantile) - m.max, 0, None)  # (P, H)
                total += m.price_kwh * self.step_hours * over.sum(1) / reference
            if m.hour_price_kwh:
                total += m.hour_price_kwh * self.step_hours * spread.above(k, mean[:, :, o], m.max).sum(1) / reference
        return total

    def moves(self, v: np.ndarray) -> np.ndarray:
        """Per plan (P, blocks, decisions), kWh for its moves: ``move_kwh`` per whole bound's width moved, from
        where each variable is now and from block to block."""
        if not self.obj.move_kwh:
            return np.zeros(len(v))
        path = np.concatenate([np.broadcast_to(self.now, (len(v), 1, len(self.now))), v], 1)
        return self.obj.move_kwh * (np.abs(np.diff(path, axis=1)) / (self.hi - self.lo)).sum((1, 2))

    def score(self, o: Outcome, reference: float) -> float:
        """A checked plan's score on its own samples: energy relative to the reference, plus its limits' and
        moves' cost."""
        costs = self.penalty(o.mean[None], o.spread, reference) + self.moves(o.blocks[None]) / reference
        return o.energy["total"] / reference + float(costs[0])

    def outcome(self, v: np.ndarray, mean: np.ndarray, samples: np.ndarray, levels: list[float]) -> Outcome:
        """One plan (1, blocks, decisions), checked against the limits on its own samples."""
        u, s = self.expand(v)
        q = np.quantile(samples[0], levels, axis=0)  # (Q, H, n_out): ``levels`` hold every limit's quantile
        spread = self.spread(mean, samples)
        checks = []
        for k, (m, o) in enumerate(self.limit_pairs):
            qm = q[levels.index(m.quantile), :, o]
            worst = int(np.argmax(qm))
            binding = np.nonzero(qm >= m.max - 0.02 * abs(m.max))[0].tolist()
            hours = float(spread.above(k, mean[:, :, o], m.max).sum()) * self.step_hours
            checks.append(LimitCheck(m, float(qm[worst]), worst, float(max(qm[worst] - m.max, 0.0)), binding, hours))
        energy = {k: float(e[0]) for k, e in self.energy(v, mean).items()}
        return Outcome(u[0], s[0], mean[0], q, levels, energy, checks, v[0], spread)


def optimize(
    rt: ModelRuntime, sit: Situation, objective: Objective, horizon: int, search: Search, levels: list[float]
) -> Advice:
    """The best plan found, the current plan (every decided variable held), and how the search went."""
    start = time.perf_counter()

    # The current plan and the answer's are sampled with the same draws (common random numbers), so that the
    # comparison between them is the plans', not the draws' (100 draws of the same plan score +-0.05 apart).
    def draws() -> np.random.Generator:
        return np.random.default_rng([search.seed, 0])

    rng = np.random.default_rng([search.seed, 1])  # everything else: the random search, the widening
    p = Problem(rt, sit, objective, horizon)
    levels = sorted({*levels, *(m.quantile for m in objective.limits)})
    current = p.current()
    mean, samples = p.forecast(current, search.samples, draws())
    assert samples is not None
    spread = p.spread(mean, samples)
    cur = p.outcome(current, mean, samples, levels)
    reference = max(cur.energy["total"], 1e-9)

    def scored(v: np.ndarray) -> np.ndarray:
        mean = p.forecast(v, 0, rng)[0]
        return (p.energy(v, mean)["total"] + p.moves(v)) / reference + p.penalty(mean, spread, reference)

    best_v, sweeps = np.clip(current, p.lo, p.hi), 0
    best_score = float(scored(best_v)[0])
    if search.method == "random":
        for first in range(0, search.random_plans, RANDOM_BATCH):
            n = min(RANDOM_BATCH, search.random_plans - first)
            v = p.lo + rng.random((n, p.n_blocks, len(p.decisions))) * (p.hi - p.lo)
            scores = scored(v)
            if scores.min() < best_score:
                best_v, best_score = v[int(np.argmin(scores))][None], float(scores.min())
        search = replace(search, sweeps=0)
    groups = np.array_split(np.arange(p.n_blocks), min(p.n_blocks, search.groups))
    # Each (span, decision) has its own step: grown where its move helped, halved where neither direction did.
    step = np.tile(search.step * (p.hi - p.lo), (len(groups), 1))
    floor = search.min_step * (p.hi - p.lo)
    while sweeps < search.sweeps and (step >= floor).any():
        if sweeps == 2 and objective.limits:
            # The spread at the best plan so far (a lower DO widens the ammonium's), then rescored.
            b_mean, b_samples = p.forecast(best_v, search.samples, rng)
            assert b_samples is not None
            spread = spread.widened(p.spread(b_mean, b_samples))
            best_score = float(scored(best_v)[0])
        sweeps += 1
        moves, candidates = [], []
        for g, blocks in enumerate(groups):
            for k in range(len(p.decisions)):
                if step[g, k] < floor[k]:
                    continue
                for sign in (-1.0, 1.0):
                    c = best_v[0].copy()
                    c[blocks, k] = np.clip(c[blocks, k] + sign * step[g, k], p.lo[k], p.hi[k])
                    if not np.array_equal(c, best_v[0]):
                        moves.append((g, k, sign))
                        candidates.append(c)
        gains = best_score - scored(np.stack(candidates)) if candidates else np.zeros(0)
        chosen: dict[tuple[int, int], float] = {}  # (span, decision) -> the better direction's sign
        best_gain: dict[tuple[int, int], float] = {}
        for (g, k, sign), gain in zip(moves, gains, strict=True):
            if gain > best_gain.get((g, k), 0.0):
                best_gain[(g, k)], chosen[(g, k)] = float(gain), sign
        movable = {(g, k) for g, k, _ in moves}
        for g, k in movable - set(chosen):
            step[g, k] /= 2
        for g in range(len(groups)):  # a step that can move neither way (at both bounds) is done
            for k in range(len(p.decisions)):
                if (g, k) not in movable:
                    step[g, k] = 0.0
        if not chosen:
            continue
        # Every improving move at once (their effects are mostly apart in time), or else the single best one.
        combined = best_v[0].copy()
        for (g, k), sign in chosen.items():
            combined[groups[g], k] = np.clip(combined[groups[g], k] + sign * step[g, k], p.lo[k], p.hi[k])
        top = int(np.argmax(gains))
        tried = np.stack([combined, candidates[top]])
        scores = scored(tried)
        i = int(np.argmin(scores))
        if scores[i] < best_score:
            best_v, best_score = tried[i : i + 1], float(scores[i])
            for g, k in chosen if i == 0 else [moves[top][:2]]:
                step[g, k] = min(step[g, k] * 1.5, 0.5 * (p.hi[k] - p.lo[k]))
        else:
            step /= 2
    if np.array_equal(best_v, current):  # nothing moved: holding is the answer, whatever the draws say
        held = p.score(cur, reference)
        seconds = time.perf_counter() - start
        return Advice("current_is_best", cur, cur, sweeps, p.evaluated, seconds, held, held)
    mean, samples = p.forecast(best_v, search.samples, draws())
    assert samples is not None
    plan = p.outcome(best_v, mean, samples, levels)
    if cur.feasible and not plan.feasible:
        # The search ranks plans on their means with a margin from other plans' samples; energy falls as air is
        # cut, so it ends on a plan at that margin's edge, whose own samples then break a limit that holding
        # meets (a plan saving 33% with 0.36 g N/m3 over, advised at the default price). A plan between it and
        # holding is tried on its own samples, the nearest to the search's plan that meets every limit.
        for t in BACK_OFF:
            v = np.clip(current + t * (best_v - current), p.lo, p.hi)
            mean, samples = p.forecast(v, search.samples, draws())
            assert samples is not None
            plan = p.outcome(v, mean, samples, levels)
            if plan.feasible:
                break
        else:
            plan = cur

    # Advised if it scores better than holding, each on its own samples (the same draws).
    scores = [p.score(o, reference) for o in (plan, cur)]
    status = "improved" if scores[0] < scores[1] - IMPROVEMENT else "current_is_best"
    if status == "current_is_best":
        plan = cur
    seconds = time.perf_counter() - start
    score = scores[0] if status == "improved" else scores[1]
    return Advice(status, plan, cur, sweeps, p.evaluated, seconds, score, scores[1])
