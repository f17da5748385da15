"""The variable catalog: names, units and meaning of every measured and manipulated series.

This is the one place the plant's variables are defined. Training copies it into the model card, and
export and the service read it from there, never from here.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_MINUTES = 15
"""Sampling period of every series, in minutes."""


@dataclass(frozen=True)
class Variable:
    name: str
    unit: str
    description: str
    min: float  # physical bounds: a value outside them is a sensor or unit fault, never plant behaviour
    max: float


MEASUREMENTS: tuple[Variable, ...] = (
    Variable("Q_in", "m3/d", "influent flow rate", 0, 250_000),
    Variable("COD_in", "g COD/m3", "influent total COD", 0, 10_000),
    Variable("TSS_in", "g SS/m3", "influent total suspended solids", 0, 10_000),
    Variable("SNH_in", "g N/m3", "influent ammonium", 0, 500),
    Variable("SNO_2", "g N/m3", "nitrate in reactor 2 (anoxic)", 0, 100),
    Variable("SO_3", "g O2/m3", "dissolved oxygen in reactor 3", 0, 20),
    Variable("SO_4", "g O2/m3", "dissolved oxygen in reactor 4", 0, 20),
    Variable("SO_5", "g O2/m3", "dissolved oxygen in reactor 5", 0, 20),
    Variable("SNH_5", "g N/m3", "ammonium in reactor 5", 0, 500),
    Variable("TSS_5", "g SS/m3", "suspended solids in reactor 5", 0, 30_000),
    Variable("SNH_eff", "g N/m3", "effluent ammonium", 0, 500),
    Variable("SNO_eff", "g N/m3", "effluent nitrate", 0, 100),
    Variable("TSS_eff", "g SS/m3", "effluent suspended solids", 0, 10_000),
    Variable("COD_eff", "g COD/m3", "effluent total COD", 0, 10_000),
    Variable("TN_eff", "g N/m3", "effluent total nitrogen (SNO + Kjeldahl N)", 0, 500),
    Variable("blanket", "m", "sludge blanket height in the settler", 0, 5),
)
"""Forecast targets x, measured at each sample time. Bounds: concentrations and flows are never negative;
the upper limits are far beyond any operation (dissolved oxygen above saturation, KLa above the BSM1 aerators'
360 1/d, the internal recycle above 5 x the design flow; the blanket: bsm2-python's estimate reaches 4.01 m in
the 4 m settler, so 5 m)."""

CONTROLS: tuple[Variable, ...] = (
    Variable("KLa_3", "1/d", "oxygen transfer coefficient of reactor 3", 0, 360),
    Variable("KLa_4", "1/d", "oxygen transfer coefficient of reactor 4", 0, 360),
    Variable("KLa_5", "1/d", "oxygen transfer coefficient of reactor 5", 0, 360),
    Variable("Q_intr", "m3/d", "internal recycle flow from reactor 5 to reactor 1", 0, 92_230),
)
"""Manipulated inputs u. The value at sample time t is the mean applied over the interval ending at t."""

MEASUREMENT_NAMES = tuple(v.name for v in MEASUREMENTS)
CONTROL_NAMES = tuple(v.name for v in CONTROLS)


def influent_positions(descriptions: list[str]) -> list[int]:
    """Positions of the influent measurements (a disturbance the plant does not control) among measurements
    described as in this catalog; benches split the error by it, reading the descriptions from a card or here."""
    return [i for i, d in enumerate(descriptions) if d.startswith("influent")]


def variable_dict(v: Variable, *, bounds: bool = True) -> dict[str, object]:
    out: dict[str, object] = {"name": v.name, "unit": v.unit, "description": v.description}
    if bounds:
        out["bounds"] = {"min": v.min, "max": v.max}
    return out


def catalog_dict(*, bounds: bool = True) -> dict[str, object]:
    """The catalog as plain JSON-ready data (stored in the model card, and without bounds in data files).

    Data files and their cache keys leave the bounds out: they do not change what is simulated.
    """
    return {
        "sample_minutes": SAMPLE_MINUTES,
        "measurements": [variable_dict(v, bounds=bounds) for v in MEASUREMENTS],
        "controls": [variable_dict(v, bounds=bounds) for v in CONTROLS],
    }
