"""What-if pairs for training: the simulated plant branched at origins of the training scenarios and run on under
two plans that differ in one control or setpoint, from the very same state.

Windows of a plant's own history teach what follows what under its operating policy; under a DO loop more air
comes with more ammonium, and a model can learn that correlation instead of the effect of air. A pair answers
the question an operator asks (KLa_5 at +20% against -20% from here: what changes?) with the plant's own answer,
so a loss on the difference of the model's two forecasts (``training.loop.pair_loss``) teaches each control's
effect apart from the load. The plans are those of ``bench/counterfactual.py`` with random sizes: a control (KLa_5
or Q_intr) scaled up and down with every loop off and every other control held, or, on a plant under its loops,
a loop's setpoint shifted up and down with the loops on. Each scenario's pairs are cached beside its data.

A second stream (``data.whatif_blower_every_hours``), on plants under their loops only, holds the blowers of
tanks 3 and 4 or turns both down while the loops run: what ``POST /optimize`` advises. Under a DO loop the air
taken from tanks 3 and 4 comes back in tank 5 (the loop raises KLa_5), which no other pair or policy shows: the
model without them answered 11% of that air (``bench/counterfactual.py``), so advice saved less than it said.
It is cached apart, so adding it simulates the first stream's pairs again nowhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from modelcard.card import atomic_write
from plant import bsm1
from plant.branching import Plan, run_with_branches
from plant.catalog import BSM1, SAMPLE_MINUTES
from plant.config import DataConfig
from plant.executor import is_cluster, run_all
from plant.operation import OPEN_LOOP, Scenario, operation, setpoints_at
from plant.scenarios import DataError, read_cache_file, scenario_key, scenarios

FORMAT_VERSION = 1
KLA3, KLA4, KLA5, QINTR = (BSM1.control_names.index(c) for c in ("KLa_3", "KLa_4", "KLa_5", "Q_intr"))
# What a pair moves: a control open loop (its index) or a loop's setpoint with the loops on (its name).
OPEN_MOVES = {"KLa_5": KLA5, "Q_intr": QINTR}
CLOSED_MOVES = ("SO_5_setpoint", "SNO_2_setpoint")
SETPOINT_FLOOR = {"SO_5_setpoint": 0.3, "SNO_2_setpoint": 0.2}  # g/m3: a shifted setpoint stays above this
BLOWERS = "KLa_3,4"  # the move of a blower pair: tanks 3 and 4 held (a) or turned down together (b), loops on
BLOWER_SETTINGS = "whatif_blower_"  # the blower stream's own settings (DataConfig)


@dataclass
class WhatIf:
    """One scenario's pairs: the history up to each origin (the base run, as the scenario's data have it) and
    after it the plant under plan "up" (a) and plan "down" (b)."""

    scenario: str
    origin: np.ndarray  # (pairs,) index of the last history sample among the scenario's kept samples
    t_last: np.ndarray  # (pairs,) clock minutes of the last history sample
    x_hist: np.ndarray  # (pairs, history, measurements)
    u_hist: np.ndarray  # (pairs, history, controls)
    s_hist: np.ndarray  # (pairs, history, setpoints), NaN where no loop runs
    move: np.ndarray  # (pairs,) str: the control or setpoint the pair moves
    closed: np.ndarray  # (pairs,) bool: the loops stay on (a setpoint plan); else every loop off
    x_a: np.ndarray  # (pairs, steps, measurements)
    x_b: np.ndarray
    u_a: np.ndarray  # (pairs, steps, controls) applied
    u_b: np.ndarray
    s_a: np.ndarray  # (pairs, steps, setpoints) in the catalog's order, NaN where no loop runs
    s_b: np.ndarray

    def __len__(self) -> int:
        return len(self.origin)


def enabled(cfg: DataConfig) -> bool:
    """Pairs need the simulator: the built-in plant only (a historian's plant cannot be branched)."""
    return (cfg.whatif_every_hours > 0 or cfg.whatif_blower_every_hours > 0) and cfg.source == "bsm1"


def pair_steps(cfg: DataConfig) -> int:
    return round(cfg.whatif_hours * 60 / SAMPLE_MINUTES)


def draw_plans(
    cfg: DataConfig, closed: bool, setpoints: dict[str, float], rng: np.random.Generator
) -> tuple[str, bool, list[Plan]]:
    """The two plans of one origin: a control scaled by 1 +- f, or (a plant under its loops, at a share
    ``whatif_setpoint_share`` of its origins) a loop's setpoint shifted by +- d, within its floor."""
    if closed and rng.random() < cfg.whatif_setpoint_share:
        name = CLOSED_MOVES[int(rng.integers(len(CLOSED_MOVES)))]
        lo, hi = cfg.whatif_do_shift if name == "SO_5_setpoint" else cfg.whatif_no_shift
        d = min(rng.uniform(lo, hi), max(setpoints[name] - SETPOINT_FLOOR[name], 0.05))
        return name, True, [Plan("up", True, shifts={name: d}), Plan("down", True, shifts={name: -d})]
    name = list(OPEN_MOVES)[int(rng.integers(len(OPEN_MOVES)))]
    f = rng.uniform(*cfg.whatif_factor)
    j = OPEN_MOVES[name]
    return name, False, [Plan("up", False, {j: 1 + f}), Plan("down", False, {j: 1 - f})]


def draw_blowers(cfg: DataConfig, rng: np.random.Generator) -> tuple[str, bool, list[Plan]]:
    """The two plans of a blower pair: tanks 3 and 4 as scheduled, or both turned down by f, the loops on."""
    f = rng.uniform(*cfg.whatif_blower_factor)
    return BLOWERS, True, [Plan("up", True), Plan("down", True, {KLA3: 1 - f, KLA4: 1 - f})]


@dataclass(frozen=True)
class Stream:
    """What sets one stream of pairs apart: how often it branches, its random draws, its plans, the settings its
    cache key holds and its cache files' prefix."""

    every_hours: Callable[[DataConfig], float]
    seed_tag: int  # the stream's draws: np.random.default_rng([scenario seed, seed_tag])
    draw: Callable[[DataConfig, bool, dict[str, float], np.random.Generator], tuple[str, bool, list[Plan]]]
    keyed: Callable[[str], bool]  # the DataConfig fields its pairs depend on (their cache key)
    prefix: str


STREAMS = {
    "main": Stream(
        lambda cfg: cfg.whatif_every_hours,
        7,
        draw_plans,
        # every what-if setting but the blower stream's: its keys are those from before it
        lambda k: k.startswith("whatif_") and not k.startswith(BLOWER_SETTINGS),
        "whatif",
    ),
    "blowers": Stream(
        lambda cfg: cfg.whatif_blower_every_hours,
        8,
        lambda cfg, closed, now, rng: draw_blowers(cfg, rng),
        lambda k: k.startswith(BLOWER_SETTINGS) or k == "whatif_hours",
        "whatif-blowers",
    ),
}


def simulate_pairs(cfg: DataConfig, sc: Scenario, history: int, stream: str = "main") -> WhatIf:
    """Run the scenario as ``plant.scenarios.simulate_scenario`` does, branched every ``whatif_every_hours``
    (the blower stream: ``whatif_blower_every_hours``, on a plant under its loops) from ``history`` samples
    after its warm-up on."""
    op = operation(cfg, sc)
    per_hour = 60 // SAMPLE_MINUTES
    warm = round(cfg.warmup_days * bsm1.MINUTES_PER_DAY / SAMPLE_MINUTES)
    kind = STREAMS[stream]
    every, steps = max(1, round(kind.every_hours(cfg) * per_hour)), pair_steps(cfg)
    origins = list(range(warm + history - 1, len(op.controls) // SAMPLE_MINUTES - steps - 1, every))
    rng = np.random.default_rng([sc.seed, kind.seed_tag])
    names = BSM1.setpoint_names
    drawn: dict[int, tuple[str, bool]] = {}
    closed = bool(op.loops)

    def plans_at(k: int) -> list[Plan]:
        # The loops' setpoints at the origin's minute, as the schedule (or a cascade's start) has them.
        minute = (k + 1) * SAMPLE_MINUTES - 1
        now = {loop.name: float(loop.setpoint[minute]) for loop in op.loops}
        move, is_closed, plans = kind.draw(cfg, closed, now, rng)
        drawn[k] = (move, is_closed)
        return plans

    b = run_with_branches(op, origins, plans_at, steps, SAMPLE_MINUTES, stabilize=cfg.stabilize)
    flat = (len(b.origins) * steps, len(op.loops))
    s_a, s_b = (setpoints_at(b.s_plan[p].reshape(flat), op.loops, names) for p in ("up", "down"))
    shape = (len(b.origins), steps, len(names))
    hist = np.array(b.origins)[:, None] + np.arange(1 - history, 1)
    return WhatIf(
        sc.id,
        np.array(b.origins) - warm,
        b.t[b.origins] + sc.start_day * bsm1.MINUTES_PER_DAY,
        b.x[hist],
        b.u[hist],
        setpoints_at(b.s, op.loops, names)[hist],
        np.array([drawn[k][0] for k in b.origins]),
        np.array([drawn[k][1] for k in b.origins], bool),
        b.x_plan["up"],
        b.x_plan["down"],
        b.u_plan["up"],
        b.u_plan["down"],
        s_a.reshape(shape),
        s_b.reshape(shape),
    )


def pairs_path(cfg: DataConfig, sc: Scenario, history: int, stream: str = "main") -> Path:
    """The cache file of one scenario's pairs of one stream, keyed by what that stream's pairs depend on."""
    kind = STREAMS[stream]
    how = {k: v for k, v in asdict(cfg).items() if kind.keyed(k)}
    spec = {"format": FORMAT_VERSION, "scenario": scenario_key(cfg, sc), "how": how, "history": history}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / f"{kind.prefix}-{sc.id}-{key}.npz"


def save_pairs(path: Path, w: WhatIf) -> None:
    buf = io.BytesIO()
    arrays = {k: v for k, v in asdict(w).items() if k != "scenario"}
    np.savez_compressed(buf, **arrays, meta=np.array(json.dumps({"format": FORMAT_VERSION, "scenario": w.scenario})))
    atomic_write(path, buf.getvalue())


def load_pairs(path: Path) -> WhatIf:
    keys = tuple(f.name for f in fields(WhatIf) if f.name != "scenario")
    arrays, meta = read_cache_file(path, FORMAT_VERSION, keys)
    w = WhatIf(str(meta["scenario"]), **arrays)
    for name in ("x_a", "x_b", "u_a", "u_b"):
        if not np.isfinite(getattr(w, name)).all():
            raise DataError(f"{path}: {name} has non-finite values")
    return w


def _simulate(task: tuple[DataConfig, Scenario, int, str]) -> tuple[WhatIf, str, float]:
    cfg, sc, history, stream = task
    start = time.perf_counter()
    return simulate_pairs(cfg, sc, history, stream), stream, time.perf_counter() - start


def generate_pairs(cfg: DataConfig, ids: tuple[str, ...], history: int, *, progress: bool = True) -> list[WhatIf]:
    """The pairs of the scenarios ``ids`` (the training ones), simulated where not cached: the first stream's
    (none when ``data.whatif_every_hours`` is 0), then the blower stream's (plants under their loops only; none
    when ``data.whatif_blower_every_hours`` is 0)."""
    if not enabled(cfg):
        return []
    chosen = [sc for sc in scenarios(cfg) if sc.id in ids]
    looped = [sc for sc in chosen if sc.policy not in OPEN_LOOP] if cfg.whatif_blower_every_hours > 0 else []
    main = chosen if cfg.whatif_every_hours > 0 else []
    wanted = [(sc, "main") for sc in main] + [(sc, "blowers") for sc in looped]
    todo = [(sc, stream) for sc, stream in wanted if not pairs_path(cfg, sc, history, stream).exists()]
    if todo:
        where = cfg.executor if is_cluster(cfg.executor) else f"{cfg.workers} local worker(s)"
        if progress:
            print(f"simulating what-if pairs of {len(todo)} scenario(s) and stream(s) on {where}...", file=sys.stderr)
        by_id = {sc.id: sc for sc, _ in todo}
        results = run_all(_simulate, [(cfg, sc, history, stream) for sc, stream in todo], cfg.executor, cfg.workers)
        for done, (w, stream, secs) in enumerate(results, 1):
            save_pairs(pairs_path(cfg, by_id[w.scenario], history, stream), w)
            if progress:
                print(
                    f"  [{done}/{len(todo)}] {w.scenario} ({stream}): {len(w)} pairs in {secs:.1f} s", file=sys.stderr
                )
    return [load_pairs(pairs_path(cfg, sc, history, stream)) for sc, stream in wanted]
