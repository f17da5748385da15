"""The variable catalog: names, units and meaning of every measured and manipulated series.

This is the one place the plant's variables are defined. Training copies it into the model card, and
export and the service read it from there, never from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SAMPLE_MINUTES = 15
"""Sampling period of every series, in minutes."""


@dataclass(frozen=True)
class Variable:
    name: str
    unit: str
    description: str


MEASUREMENTS: tuple[Variable, ...] = (
    Variable("Q_in", "m3/d", "influent flow rate"),
    Variable("COD_in", "g COD/m3", "influent total COD"),
    Variable("TSS_in", "g SS/m3", "influent total suspended solids"),
    Variable("SNH_in", "g N/m3", "influent ammonium"),
    Variable("SNO_2", "g N/m3", "nitrate in reactor 2 (anoxic)"),
    Variable("SO_3", "g O2/m3", "dissolved oxygen in reactor 3"),
    Variable("SO_4", "g O2/m3", "dissolved oxygen in reactor 4"),
    Variable("SO_5", "g O2/m3", "dissolved oxygen in reactor 5"),
    Variable("SNH_5", "g N/m3", "ammonium in reactor 5"),
    Variable("TSS_5", "g SS/m3", "suspended solids in reactor 5"),
    Variable("SNH_eff", "g N/m3", "effluent ammonium"),
    Variable("SNO_eff", "g N/m3", "effluent nitrate"),
    Variable("TSS_eff", "g SS/m3", "effluent suspended solids"),
    Variable("COD_eff", "g COD/m3", "effluent total COD"),
    Variable("TN_eff", "g N/m3", "effluent total nitrogen (SNO + Kjeldahl N)"),
    Variable("blanket", "m", "sludge blanket height in the settler"),
)
"""Forecast targets x, measured at each sample time."""

CONTROLS: tuple[Variable, ...] = (
    Variable("KLa_3", "1/d", "oxygen transfer coefficient of reactor 3"),
    Variable("KLa_4", "1/d", "oxygen transfer coefficient of reactor 4"),
    Variable("KLa_5", "1/d", "oxygen transfer coefficient of reactor 5"),
    Variable("Q_intr", "m3/d", "internal recycle flow from reactor 5 to reactor 1"),
)
"""Manipulated inputs u. The value at sample time t is the mean applied over the interval ending at t."""

MEASUREMENT_NAMES = tuple(v.name for v in MEASUREMENTS)
CONTROL_NAMES = tuple(v.name for v in CONTROLS)


def influent_positions(descriptions: list[str]) -> list[int]:
    """Positions of the influent measurements (a disturbance the plant does not control) among measurements
    described as in this catalog; benches split the error by it, reading the descriptions from a card or here."""
    return [i for i, d in enumerate(descriptions) if d.startswith("influent")]


def catalog_dict() -> dict[str, object]:
    """The catalog as plain JSON-ready data (stored in data files and the model card)."""
    return {
        "sample_minutes": SAMPLE_MINUTES,
        "measurements": [asdict(v) for v in MEASUREMENTS],
        "controls": [asdict(v) for v in CONTROLS],
    }
