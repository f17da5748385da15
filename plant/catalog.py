"""Plant catalogs: the variables a model sees, read from a TOML file (``plant/catalogs/bsm1.toml`` is ours).

A catalog names every series of a plant: name, source column, unit, description, role, physical bounds and the
longest gap an import may bridge. Training copies it into the model card, and export and the service read it
from there, never from here. Roles:

- ``measurement``: a plant state, forecast (effluent ammonium, dissolved oxygen, ...);
- ``disturbance``: measured but not controlled, forecast too (the influent);
- ``control``: a planned input; the caller sends its future values;
- ``setpoint``: a feedback loop's setpoint (the DO a KLa loop holds): the caller may send its history and planned
  future values, and where it does not the model forecasts without them. Under feedback control the setpoint,
  not the applied KLa, is what the plant's control system plans.

The forecast targets x are the measurements and disturbances in file order; the controls u follow, then the
setpoints s.

``[[loops]]`` declare the plant's feedback loops: which control each drives (``KLa_5``), from which setpoint
(``SO_5_setpoint``), holding which measurement (``SO_5``). A plant under a loop knows the setpoint, never the
loop's future output: a request may leave a looped control's future to its loop, and the model then forecasts
the control too (the aeration a setpoint plan will need).
"""

from __future__ import annotations

import tomllib
import zoneinfo
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ROLES = ("measurement", "disturbance", "control", "setpoint")
BSM1_CATALOG = Path(__file__).with_name("catalogs") / "bsm1.toml"


class CatalogError(ValueError):
    """A catalog file is missing, malformed or inconsistent; the message names the file and the entry."""


@dataclass(frozen=True)
class Variable:
    name: str
    unit: str
    description: str
    min: float  # physical bounds: a value outside them is a sensor or unit fault, never plant behaviour
    max: float
    role: str = "measurement"
    column: str = ""  # the column of a historian export ("": the name)
    max_gap_minutes: float = 0.0  # an import bridges gaps up to this long by linear interpolation

    @property
    def source_column(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class Loop:
    """A feedback loop: ``control`` follows a controller that holds ``measurement`` at ``setpoint``."""

    control: str
    setpoint: str
    measurement: str = ""  # the measurement it holds ("": not among the catalog's variables)


@dataclass(frozen=True)
class Catalog:
    name: str
    sample_minutes: int
    timezone: str  # IANA name: how an import reads timestamps without a UTC offset
    variables: tuple[Variable, ...]
    loops: tuple[Loop, ...] = ()

    @property
    def targets(self) -> tuple[Variable, ...]:
        """Forecast targets x: measurements and disturbances, in file order."""
        return tuple(v for v in self.variables if v.role in ("measurement", "disturbance"))

    @property
    def controls(self) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables if v.role == "control")

    @property
    def setpoints(self) -> tuple[Variable, ...]:
        """Loop setpoints: optional known inputs (role setpoint)."""
        return tuple(v for v in self.variables if v.role == "setpoint")

    @property
    def setpoint_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.setpoints)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.targets)

    @property
    def control_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.controls)

    @property
    def steps_per_day(self) -> int:
        return 24 * 60 // self.sample_minutes

    def disturbance_positions(self) -> list[int]:
        """Positions among the targets of the disturbances (role disturbance: the influent)."""
        return [i for i, v in enumerate(self.targets) if v.role == "disturbance"]

    def plant_positions(self) -> list[int]:
        """Positions among the targets of the plant's own states (role measurement), the influent left out."""
        return [i for i, v in enumerate(self.targets) if v.role == "measurement"]

    def to_dict(self, *, bounds: bool = True) -> dict[str, Any]:
        """JSON-ready: stored in model cards and data manifests (``setpoints`` only where the plant has some)."""
        out = {
            "name": self.name,
            "sample_minutes": self.sample_minutes,
            "timezone": self.timezone,
            "measurements": [variable_dict(v, bounds=bounds) for v in self.targets],
            "controls": [variable_dict(v, bounds=bounds) for v in self.controls],
        }
        if self.setpoints:
            out["setpoints"] = [variable_dict(v, bounds=bounds) for v in self.setpoints]
        if self.loops:
            out["loops"] = [loop_dict(loop) for loop in self.loops]
        return out

    def data_dict(self) -> dict[str, Any]:
        """What determines a data file's columns (names, units, meaning, period): stored in every cached
        scenario and part of its cache key. Roles and bounds are left out: they do not change the data."""

        def plain(vs: tuple[Variable, ...]) -> list[dict[str, str]]:
            return [{"name": v.name, "unit": v.unit, "description": v.description} for v in vs]

        out: dict[str, Any] = {
            "sample_minutes": self.sample_minutes,
            "measurements": plain(self.targets),
            "controls": plain(self.controls),
        }
        if self.setpoints:
            out["setpoints"] = plain(self.setpoints)
        return out


def variable_dict(v: Variable, *, bounds: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"name": v.name, "unit": v.unit, "description": v.description, "role": v.role}
    if v.column and v.column != v.name:
        out["column"] = v.column
    if bounds:
        out["bounds"] = {"min": v.min, "max": v.max}
        out["max_gap_minutes"] = v.max_gap_minutes
    return out


def loop_dict(loop: Loop) -> dict[str, str]:
    out = {"control": loop.control, "setpoint": loop.setpoint}
    return {**out, "measurement": loop.measurement} if loop.measurement else out


def parse_loops(entries: list[Any], variables: list[Variable], source: str) -> tuple[Loop, ...]:
    """The ``[[loops]]`` entries, each naming a control, a setpoint and (optionally) a measurement of the
    catalog; every problem names the loop and the field."""
    roles = {v.name: v.role for v in variables}
    wanted = {"control": ("control",), "setpoint": ("setpoint",), "measurement": ("measurement", "disturbance")}
    loops = []
    for i, entry in enumerate(entries):
        where = f"{source}: loop {i + 1}"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: expected a table with control, setpoint and measurement")
        unknown = set(entry) - set(wanted)
        if unknown:
            raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(wanted)}")
        for key, allowed in wanted.items():
            name = entry.get(key)
            if name is None and key == "measurement":
                continue
            if name is None:
                raise CatalogError(f"{where}: missing {key}")
            if roles.get(str(name)) not in allowed:
                what = f"is a {roles[name]}" if name in roles else "is not a variable of the catalog"
                raise CatalogError(f"{where}: {key} {name!r} {what} (it must name a {' or '.join(allowed)})")
        loops.append(Loop(str(entry["control"]), str(entry["setpoint"]), str(entry.get("measurement", ""))))
    for key in ("control", "setpoint"):
        named = [getattr(loop, key) for loop in loops]
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise CatalogError(f"{source}: {key} {', '.join(twice)} is in more than one loop")
    return tuple(loops)


def catalog_from_dict(data: dict[str, Any], source: str = "catalog") -> Catalog:
    """A catalog from TOML (``[[variables]]`` with ``role``) or from a card/manifest (``measurements`` and
    ``controls`` lists); every problem names ``source`` and the entry."""
    known = {f.name for f in fields(Variable)}
    if "variables" in data:
        entries = list(data["variables"])
    else:
        entries = [{"role": "measurement", **v} for v in data.get("measurements", [])]
        entries += [{**v, "role": "control"} for v in data.get("controls", [])]
        entries += [{**v, "role": "setpoint"} for v in data.get("setpoints", [])]
    variables = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        if isinstance(entry.get("bounds"), dict):
            entry.update(min=entry["bounds"].get("min"), max=entry["bounds"].get("max"))
            entry.pop("bounds")
        where = f"{source}: variable {i + 1} ({entry.get('name', '?')})"
        unknown = set(entry) - known
        if unknown:
            raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = [k for k in ("name", "unit", "description", "min", "max") if k not in entry]
        if missing:
            raise CatalogError(f"{where}: missing {', '.join(missing)}")
        try:
            v = Variable(
                name=str(entry["name"]),
                unit=str(entry["unit"]),
                description=str(entry["description"]),
                min=float(entry["min"]),
                max=float(entry["max"]),
                role=str(entry.get("role", "measurement")),
                column=str(entry.get("column", "")),
                max_gap_minutes=float(entry.get("max_gap_minutes", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise CatalogError(f"{where}: {exc}") from None
        if v.role not in ROLES:
            raise CatalogError(f"{where}: role {v.role!r} is not one of {', '.join(ROLES)}")
        if not v.min < v.max:
            raise CatalogError(f"{where}: min {v.min} must be below max {v.max}")
        if v.max_gap_minutes < 0:
            raise CatalogError(f"{where}: max_gap_minutes must be >= 0")
        if not v.name.replace("_", "").isalnum():
            raise CatalogError(f"{where}: a name has letters, digits and underscores only")
        variables.append(v)
    cat = Catalog(
        name=str(data.get("name", "plant")),
        sample_minutes=int(data.get("sample_minutes", 0)),
        timezone=str(data.get("timezone", "UTC")),
        variables=tuple(variables),
        loops=parse_loops(list(data.get("loops", [])), variables, source),
    )
    if cat.sample_minutes <= 0 or (24 * 60) % cat.sample_minutes:
        raise CatalogError(f"{source}: sample_minutes must divide a day (1440 minutes), got {cat.sample_minutes}")
    try:
        zoneinfo.ZoneInfo(cat.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CatalogError(f"{source}: unknown time zone {cat.timezone!r} (an IANA name, e.g. Europe/Berlin)") from None
    names = [v.name for v in variables]
    twice = sorted({n for n in names if names.count(n) > 1})
    columns = [v.source_column for v in variables]
    twice += sorted({f"column {c}" for c in columns if columns.count(c) > 1})
    if twice:
        raise CatalogError(f"{source}: named twice: {', '.join(twice)}")
    if not cat.targets or not cat.controls:
        raise CatalogError(f"{source}: needs at least one measurement or disturbance and one control")
    return cat


def load_catalog(path: str | Path | None = None) -> Catalog:
    """A catalog file (TOML); none: the built-in BSM1 catalog."""
    path = Path(path) if path else BSM1_CATALOG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML ({exc})") from None
    return catalog_from_dict(data, str(path))


BSM1 = load_catalog(BSM1_CATALOG)
"""The simulated plant's catalog; only the BSM1 source (plant.bsm1, plant.scenarios' simulator) uses it."""
SAMPLE_MINUTES = BSM1.sample_minutes
MEASUREMENTS = BSM1.targets
CONTROLS = BSM1.controls
MEASUREMENT_NAMES = BSM1.target_names
CONTROL_NAMES = BSM1.control_names


def catalog_dict(*, bounds: bool = True) -> dict[str, Any]:
    """The BSM1 catalog as plain data: ``bounds=False`` is its data identity (``Catalog.data_dict``)."""
    return BSM1.to_dict() if bounds else BSM1.data_dict()
