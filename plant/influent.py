"""BSM1's influent: the files shipped with bsm2-python (read, with their defects repaired or refused), a window
of them, BSM2's influent scaled to BSM1's design load, and what the scenarios add to it (storms, overloads, an
inlet's capacity).

Rows are bsm2-python's: time in days, then the 21 ASM1 stream components (``SI`` ... ``TEMP`` below are their
columns less one).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import numpy as np

log = logging.getLogger(__name__)

# Column indices of the 21 ASM1 stream components used by bsm2-python.
SI, SS, XI, XS, XBH, XBA, XP, SO, SNO, SNH, SND, XND, SALK, TSS, Q, TEMP = range(16)

INFLUENT_FILES = {
    # name: (file shipped with bsm2-python, factor that converts its Q column to m3/d)
    "dry": ("dryinfluent.csv", 1.0),
    "rain": ("raininfluent.csv", 1000.0),
    "bsm2": ("dyninfluent_bsm2.csv", 1.0),
}


@contextmanager
def root_logging_kept() -> Iterator[None]:
    """Around anything that may import bsm2-python first: on import it adds two handlers to the root logger
    (stdout and tqdm), and with them every warning of ours was printed twice (and a service's JSON log lines
    once more as plain text). The root logger's handlers and level are put back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class InfluentError(ValueError):
    """An influent file is malformed beyond what we repair."""


@dataclass(frozen=True)
class Repair:
    row: int  # 0-based row in the file
    column: int
    raw: str
    value: float


def parse_influent_rows(rows: list[list[str]], source: str, q_factor: float) -> tuple[np.ndarray, list[Repair]]:
    """Parse influent CSV rows into an (n, 22) array with Q in m3/d, repairing doubled decimal points.

    A field such as ``30.044.50`` (a thousands separator pasted into a decimal) is read as ``30.04450``, and
    the repair is accepted only when the result lies within 15% of the mean of its valid neighbours.
    Anything else that does not parse is refused with the row and column named.
    """
    repairs: list[Repair] = []
    out = np.full((len(rows), 22), np.nan)
    pending: list[tuple[int, int, str, float]] = []
    for r, row in enumerate(rows):
        if len(row) != 22:
            raise InfluentError(f"{source}: row {r} has {len(row)} columns, expected 22")
        for c, field in enumerate(row):
            try:
                out[r, c] = float(field)
            except ValueError:
                head, dot, tail = field.strip().partition(".")
                candidate = head + dot + tail.replace(".", "")
                try:
                    value = float(candidate)
                except ValueError:
                    raise InfluentError(f"{source}: row {r} column {c}: cannot parse {field!r}") from None
                pending.append((r, c, field, value))
    for r, c, field, value in pending:
        neighbours = [out[k, c] for k in (r - 2, r - 1, r + 1, r + 2) if 0 <= k < len(rows)]
        neighbours = [v for v in neighbours if np.isfinite(v)]
        if not neighbours or abs(value - np.mean(neighbours)) > 0.15 * abs(np.mean(neighbours)):
            raise InfluentError(
                f"{source}: row {r} column {c}: {field!r} repaired to {value} does not fit its neighbours "
                f"{neighbours}; refusing to guess"
            )
        out[r, c] = value
        repairs.append(Repair(r, c, field, value))
        log.warning("%s: repaired row %d column %d: %r -> %g", source, r, c, field, value)
    out[:, 1 + Q] *= q_factor
    median_q = float(np.median(out[:, 1 + Q]))
    if not 5_000 <= median_q <= 100_000:
        raise InfluentError(f"{source}: median flow {median_q:.0f} m3/d is implausible; unit of Q is wrong")
    if np.any(np.diff(out[:, 0]) <= 0):
        raise InfluentError(f"{source}: time column is not strictly increasing")
    return out, repairs


def load_influent(name: str) -> tuple[np.ndarray, list[Repair]]:
    """Load a shipped influent file by name ('dry', 'rain', 'bsm2') with Q in m3/d."""
    if name not in INFLUENT_FILES:
        raise InfluentError(f"unknown influent {name!r}; choose from {sorted(INFLUENT_FILES)}")
    filename, q_factor = INFLUENT_FILES[name]
    with root_logging_kept():  # resources.files imports the package
        path = resources.files("bsm2_python") / "data" / filename
    with path.open(encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    return parse_influent_rows(rows, filename, q_factor)


def influent_window(data: np.ndarray, start_day: float, days: float) -> np.ndarray:
    """Rows covering [start_day, start_day + days], time shifted to start at 0.

    bsm2-python scans the whole influent array at every step, so a window keeps a 609-day file fast.
    """
    t = data[:, 0]
    first = int(np.searchsorted(t, start_day, side="right")) - 1
    last = int(np.searchsorted(t, start_day + days, side="left")) + 1
    if first < 0 or last >= len(t) + 1 or t[min(last, len(t) - 1)] < start_day + days - 1e-9:
        raise InfluentError(f"window {start_day}..{start_day + days} d is outside the influent ({t[0]}..{t[-1]} d)")
    window = data[first : last + 1].copy()
    window[:, 0] -= start_day
    window[0, 0] = max(window[0, 0], 0.0)
    return window


DESIGN_COMPONENTS = (SI, SS, XI, XS, XBH, XBA, XP, SO, SNO, SNH, SND, XND, SALK, TSS)


def design_load_factors(influent: np.ndarray, design: np.ndarray) -> np.ndarray:
    """Per column (flow and each component), the factor that brings ``influent``'s mean flow and flow-weighted
    mean concentrations to those of ``design``; time, temperature and unlisted columns keep factor 1.

    BSM2's influent is raw sewage for a larger plant with a primary clarifier (flow 21,022 m3/d, particulate
    COD 1.8 times BSM1's design); fed to BSM1 unchanged it overloads the plant and stops nitrification.
    """
    factors = np.ones(influent.shape[1])
    q_in, q_design = influent[:, 1 + Q], design[:, 1 + Q]
    factors[1 + Q] = q_design.mean() / q_in.mean()
    for c in DESIGN_COMPONENTS:
        mean_in = (influent[:, 1 + c] * q_in).sum() / q_in.sum()
        mean_design = (design[:, 1 + c] * q_design).sum() / q_design.sum()
        factors[1 + c] = mean_design / mean_in if mean_in > 0 else 1.0
    return factors


SOLUBLE = (SI, SS, SO, SNO, SNH, SND, SALK)
"""Dissolved components: rain water carries none of them, so a storm dilutes them (their load is unchanged)."""
PARTICULATE = (XI, XS, XBH, XBA, XP, XND, TSS)
"""Particulate components: the sewer's deposits are flushed out at the front of a storm, then diluted."""


@dataclass(frozen=True)
class Storm:
    """A rain event on top of dry-weather sewage: extra flow rising and falling over ``hours``, peaking at
    ``peak_factor`` times the dry flow, with a first flush multiplying the particulate load by ``flush_factor``
    at the front and fading with a time constant of ``flush_hours``."""

    start_day: float
    hours: float
    peak_factor: float
    flush_factor: float = 1.0
    flush_hours: float = 2.0


def add_storm(influent: np.ndarray, storm: Storm) -> np.ndarray:
    """The influent (rows: time in days, then the 21 stream components) with a storm added.

    Flow is multiplied by 1 + (peak - 1) sin^2 over the event. Dissolved concentrations are divided by the same
    ratio, so their load (concentration x flow) is conserved; particulate concentrations follow the first-flush
    load. Temperature and the other columns are unchanged.
    """
    out = influent.copy()
    days = (out[:, 0] - storm.start_day) / (storm.hours / 24)
    inside = (days >= 0) & (days <= 1)
    ratio = 1 + (storm.peak_factor - 1) * np.where(inside, np.sin(np.pi * np.clip(days, 0, 1)) ** 2, 0.0)
    since = np.maximum(out[:, 0] - storm.start_day, 0) * 24  # hours
    flush = 1 + (storm.flush_factor - 1) * np.where(inside, np.exp(-since / storm.flush_hours), 0.0)
    out[:, 1 + Q] *= ratio
    for c in SOLUBLE:
        out[:, 1 + c] /= ratio
    for c in PARTICULATE:
        out[:, 1 + c] *= flush / ratio
    return out


def random_storms(
    days: float,
    rng: np.random.Generator,
    per_week: float = 1.0,
    hours: tuple[float, float] = (3.0, 36.0),
    peak: tuple[float, float] = (1.5, 4.0),
    flush: tuple[float, float] = (1.0, 3.0),
) -> list[Storm]:
    """Seeded storms of varied size, duration and timing over ``days`` (Poisson count, uniform start times)."""
    n = int(rng.poisson(per_week * days / 7))
    starts = np.sort(rng.uniform(0, days, n))
    return [
        Storm(float(s), float(rng.uniform(*hours)), float(rng.uniform(*peak)), float(rng.uniform(*flush)))
        for s in starts
    ]


def add_overload(influent: np.ndarray, start_day: float, hours: float, factor: float) -> np.ndarray:
    """An overload episode (a septage or industrial discharge): every concentration but temperature multiplied
    by ``factor`` over [start_day, start_day + hours / 24]; flow unchanged, so the load rises by ``factor``."""
    out = influent.copy()
    inside = (out[:, 0] >= start_day) & (out[:, 0] <= start_day + hours / 24)
    for c in (*SOLUBLE, *PARTICULATE):
        out[inside, 1 + c] *= factor
    return out


def cap_inflow(influent: np.ndarray, capacity: float) -> np.ndarray:
    """The influent the plant receives when its inlet passes at most ``capacity`` m3/d: flow above it overflows
    upstream (a combined sewer overflow or a storm tank) with the same composition, so concentrations are kept
    and only the load above the capacity leaves. Without it, two overlapping storms on a rainy BSM2 day once sent
    272,000 m3/d (15 times the design flow) to the plant."""
    out = influent.copy()
    out[:, 1 + Q] = np.minimum(out[:, 1 + Q], capacity)
    return out
