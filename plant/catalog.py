"""Plant catalogs: the variables a model sees, read from a TOML file (``plant/catalogs/bsm1.toml`` is ours).

A catalog names every series of a plant: name, source column, unit, description, role, physical bounds, the
longest gap an import may bridge and the longest flat line a sensor may draw. It also says how the plant's
historian writes its export: the timestamp column and format, and the codes it writes for a missing value.
Training copies it into the model card, and export and the service read it from there, never from here. Roles:

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

import difflib
import math
import re
import tomllib
import zoneinfo
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from modelcard.objective import Objective, PlantNames, objective_problems

ROLES = ("measurement", "disturbance", "control", "setpoint")
FILLS = ("linear", "hold")  # how an import bridges a gap (Variable.fill)
BSM1_CATALOG = Path(__file__).with_name("catalogs") / "bsm1.toml"
# The one sample interval a model trains on: its daily modes, yesterday's lag, its blends and the report's lead
# times are counted in 15-minute steps (training.model.STEPS_PER_DAY, training.evaluate).
TRAINED_SAMPLE_MINUTES = 15
TIMESTAMP_FORMATS = ("iso8601", "epoch_seconds")  # or a strptime pattern, e.g. "%d.%m.%Y %H:%M:%S"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a catalog's name is also its model store's folder
MissingCode = float | str  # a number or a text a historian writes where it has no value


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
    max_gap_minutes: float = 0.0  # an import bridges gaps up to this long (``fill``)
    # How: "linear" interpolation (a sensor), or "hold" the last value (a setpoint or state the historian logs only
    # when it changes: it holds until the next record, up to max_gap_minutes).
    fill: str = "linear"
    missing_codes: tuple[MissingCode, ...] = ()  # this column's own codes for "no value" (besides the catalog's)
    max_flat_minutes: float = 0.0  # identical values for longer than this are a stuck sensor (0: never checked)
    # Settles within one sample of a control move (dissolved oxygen under its air, anoxic nitrate under the
    # internal recycle): the model's decoder may read the same step's plan for it. Every other variable moves
    # with the controls through the latent dynamics only, so a correlation a loop leaves in the data (more air
    # with more ammonium) cannot be decoded as an instant response. A loop's measurement is fast anyway.
    fast: bool = False
    # A setpoint the plant plans (an operator's, a schedule's); false: one a controller decides from what it
    # measures (an ammonia cascade's DO setpoint), whose future the plant cannot send: an honest request of the
    # plant's own held-out data holds it at its last value.
    planned: bool = True

    @property
    def source_column(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class Loop:
    """A feedback loop: ``control`` follows a controller that holds ``measurement`` at ``setpoint``."""

    control: str
    setpoint: str
    measurement: str = ""  # the measurement it holds ("": not among the catalog's variables)
    # The controller's output limits (the blower's or the pump's range), within the control's bounds; None: the
    # control's bounds. A forecast never lets the loop ask for more (``model.loop_feedback``).
    output_min: float | None = None
    output_max: float | None = None


@dataclass(frozen=True)
class Catalog:
    name: str
    sample_minutes: int
    timezone: str  # IANA name: how an import reads timestamps without a UTC offset
    variables: tuple[Variable, ...]
    loops: tuple[Loop, ...] = ()
    timestamp_column: str = "timestamp"  # the export's time column
    timestamp_format: str = "iso8601"  # iso8601 (with or without UTC offset), epoch_seconds, or a strptime pattern
    missing_codes: tuple[MissingCode, ...] = ()  # codes every column may hold for "no value" (-9999, "Bad", ...)
    # What setpoint advice minimises and under which limits (``[optimizer]``, modelcard.objective); not part of
    # the catalog's identity (``to_dict``): a new energy price changes no data.
    optimizer: Objective | None = field(default=None, compare=False)

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
    def unplanned_setpoints(self) -> tuple[str, ...]:
        """The setpoints a controller decides (``planned = false``): a plant can hold them, not plan them."""
        return tuple(v.name for v in self.setpoints if not v.planned)

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
        # How the export is written: only where it differs from the defaults (the BSM1 catalog's dict is unchanged).
        for key in ("timestamp_column", "timestamp_format"):
            if getattr(self, key) != CATALOG_DEFAULTS[key]:
                out[key] = getattr(self, key)
        if self.missing_codes:
            out["missing_codes"] = list(self.missing_codes)
        return out

    def codes_for(self, v: Variable) -> tuple[frozenset[float], dict[str, str]]:
        """The numbers, and the texts (case-folded, to the code as written), that mean "no value" in ``v``'s
        column: the catalog's codes and the variable's own."""
        codes = (*self.missing_codes, *v.missing_codes)
        return frozenset(c for c in codes if isinstance(c, float)), {
            c.casefold(): c for c in codes if isinstance(c, str)
        }

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
        out["max_flat_minutes"] = v.max_flat_minutes  # the service warns about a longer flat line
        if v.missing_codes:
            out["missing_codes"] = list(v.missing_codes)
    if v.fast:
        out["fast"] = True
    if not v.planned:
        out["planned"] = False
    if v.fill != "linear":  # only where it differs: a catalog's identity stays what it was
        out["fill"] = v.fill
    return out


def loop_dict(loop: Loop) -> dict[str, Any]:
    out: dict[str, Any] = {"control": loop.control, "setpoint": loop.setpoint}
    if loop.measurement:
        out["measurement"] = loop.measurement
    for key in ("output_min", "output_max"):
        if getattr(loop, key) is not None:
            out[key] = getattr(loop, key)
    return out


def parse_loops(entries: list[Any], variables: list[Variable], source: str) -> tuple[Loop, ...]:
    """The ``[[loops]]`` entries, each naming a control, a setpoint and (optionally) a measurement of the
    catalog; every problem names the loop and the field."""
    roles = {v.name: v.role for v in variables}
    bounds = {v.name: (v.min, v.max) for v in variables}
    wanted = {"control": ("control",), "setpoint": ("setpoint",), "measurement": ("measurement", "disturbance")}
    loops = []
    for i, entry in enumerate(entries):
        where = f"{source}: loop {i + 1}"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: expected a table with control, setpoint and measurement")
        unknown_keys(entry, {*wanted, "output_min", "output_max"}, where)
        for key, allowed in wanted.items():
            name = entry.get(key)
            if name is None and key == "measurement":
                continue
            if name is None:
                raise CatalogError(f"{where}: missing {key}")
            if roles.get(str(name)) not in allowed:
                what = f"is a {roles[name]}" if name in roles else "is not a variable of the catalog"
                raise CatalogError(f"{where}: {key} {name!r} {what} (it must name a {' or '.join(allowed)})")
        control = str(entry["control"])
        lo, hi = bounds[control]
        limits = [entry.get("output_min", lo), entry.get("output_max", hi)]
        for key, value in zip(("output_min", "output_max"), limits, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise CatalogError(f"{where}: {key} must be a number within {control}'s bounds {lo} to {hi}")
        if limits[0] >= limits[1]:
            raise CatalogError(f"{where}: output_min {limits[0]} must be below output_max {limits[1]}")
        minimum, maximum = (float(entry[k]) if k in entry else None for k in ("output_min", "output_max"))
        loops.append(Loop(control, str(entry["setpoint"]), str(entry.get("measurement", "")), minimum, maximum))
    for key in ("control", "setpoint"):
        named = [getattr(loop, key) for loop in loops]
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise CatalogError(f"{source}: {key} {', '.join(twice)} is in more than one loop")
    return tuple(loops)


def unknown_keys(given: Any, known: set[str], where: str) -> None:
    """Refuse keys a catalog does not know, by name and with the closest known one: a misspelt setting must
    never be ignored silently."""
    unknown = sorted(set(given) - known)
    if not unknown:
        return
    hints = [
        f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1)) else repr(k)
        for k in unknown
    ]
    raise CatalogError(f"{where}: unknown key(s) {', '.join(hints)}; known: {', '.join(sorted(known))}")


def parse_codes(value: Any, where: str) -> tuple[MissingCode, ...]:
    """``missing_codes``: a list of numbers and texts. A text that reads as a number is that number, so
    ``"-9999"`` and ``-9999`` are the same code (a cell "-9999.0" matches either)."""
    if not isinstance(value, list):
        raise CatalogError(f'{where}: missing_codes must be a list of numbers and texts, e.g. [-9999, "Bad"]')
    codes: list[MissingCode] = []
    for code in value:
        original = code
        if isinstance(code, bool) or not isinstance(code, int | float | str):
            raise CatalogError(f"{where}: missing code {code!r} is neither a number nor a text")
        if isinstance(code, str):
            try:
                code = float(code)
            except ValueError:
                code = code.strip()
                if not code:
                    raise CatalogError(f"{where}: an empty missing code (empty cells are missing anyway)") from None
        if isinstance(code, float | int) and math.isnan(code):
            # NaN never equals itself: as a code it matched nothing, and a manifest's catalog never equalled this.
            raise CatalogError(
                f"{where}: missing code {original!r} is NaN: leave it out (NaN cells are missing anyway)"
            )
        codes.append(float(code) if not isinstance(code, str) else code)
    return tuple(codes)


def finite_number(value: Any, what: str) -> float:
    """A catalog number: finite, and never a bool (TOML's true read as 1.0 went unseen); ValueError names it."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return number


def catalog_from_dict(data: dict[str, Any], source: str = "catalog") -> Catalog:
    """A catalog from TOML (``[[variables]]`` with ``role``) or from a card/manifest (``measurements`` and
    ``controls`` lists); every problem names ``source`` and the entry, unknown keys at every level included."""
    known = {f.name for f in fields(Variable)}
    top = {f.name for f in fields(Catalog)} - {"variables"}
    lists = {"variables"} if "variables" in data else {"measurements", "controls", "setpoints"}
    unknown_keys(data, top | lists, source)
    for key in lists:
        given = data.get(key, [])
        if not isinstance(given, list) or not all(isinstance(entry, dict) for entry in given):
            got = "one table" if isinstance(given, dict) else f"{given!r}"[:60]
            how = (
                "[[variables]] tables, one per variable: write [[variables]] (double brackets) above each"
                if key == "variables"
                else "a list of tables"
            )
            raise CatalogError(f"{source}: {key} must be {how}, not {got}")
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
        unknown_keys(entry, known, where)
        missing = [k for k in ("name", "unit", "description", "min", "max") if k not in entry]
        if missing:
            raise CatalogError(f"{where}: missing {', '.join(missing)}")
        try:
            v = Variable(
                name=str(entry["name"]),
                unit=str(entry["unit"]),
                description=str(entry["description"]),
                min=finite_number(entry["min"], "min"),
                max=finite_number(entry["max"], "max"),
                role=str(entry.get("role", "measurement")),
                column=str(entry.get("column", "")),
                max_gap_minutes=finite_number(entry.get("max_gap_minutes", 0.0), "max_gap_minutes"),
                missing_codes=parse_codes(entry.get("missing_codes", []), where),
                max_flat_minutes=finite_number(entry.get("max_flat_minutes", 0.0), "max_flat_minutes"),
                fast=entry.get("fast", False),
                fill=str(entry.get("fill", "linear")),
                planned=entry.get("planned", True),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CatalogError):
                raise
            raise CatalogError(f"{where}: {exc}") from None
        if not isinstance(v.fast, bool):
            raise CatalogError(f"{where}: fast must be true or false, not {v.fast!r}")
        if not isinstance(v.planned, bool):
            raise CatalogError(f"{where}: planned must be true or false, not {v.planned!r}")
        if not v.planned and v.role != "setpoint":
            raise CatalogError(f"{where}: planned = false is for a setpoint a controller decides, not a {v.role}")
        if v.fill not in FILLS:
            raise CatalogError(f"{where}: fill {v.fill!r} is not one of {', '.join(FILLS)}")
        if v.fill == "hold" and v.max_flat_minutes > 0:  # a held value is a flat line: the hold would undo the check
            raise CatalogError(f'{where}: fill = "hold" and max_flat_minutes contradict each other: give one')
        if v.role not in ROLES:
            raise CatalogError(f"{where}: role {v.role!r} is not one of {', '.join(ROLES)}")
        if not v.min < v.max:
            raise CatalogError(f"{where}: min {v.min} must be below max {v.max}")
        if v.max_gap_minutes < 0 or v.max_flat_minutes < 0:
            raise CatalogError(f"{where}: max_gap_minutes and max_flat_minutes must be >= 0")
        if not v.name.replace("_", "").isalnum():
            raise CatalogError(f"{where}: a name has letters, digits and underscores only")
        variables.append(v)
    sample_minutes = data.get("sample_minutes", 0)
    if isinstance(sample_minutes, bool) or not isinstance(sample_minutes, int):
        raise CatalogError(f"{source}: sample_minutes must be a whole number of minutes, not {sample_minutes!r}")
    cat = Catalog(
        name=str(data.get("name", "plant")),
        sample_minutes=sample_minutes,
        timezone=str(data.get("timezone", "UTC")),
        variables=tuple(variables),
        loops=parse_loops(list(data.get("loops", [])), variables, source),
        timestamp_column=str(data.get("timestamp_column", CATALOG_DEFAULTS["timestamp_column"])),
        timestamp_format=str(data.get("timestamp_format", CATALOG_DEFAULTS["timestamp_format"])),
        missing_codes=parse_codes(data.get("missing_codes", []), source),
    )
    if not NAME_RE.match(cat.name):
        raise CatalogError(
            f"{source}: name {cat.name!r} must be letters, digits, '.', '_' or '-' (at most 64): it also names the "
            "plant's model store, models/<name>"
        )
    if "optimizer" in data:
        cat = replace(cat, optimizer=parse_optimizer(data["optimizer"], cat, source))
    if cat.timestamp_format not in TIMESTAMP_FORMATS and "%" not in cat.timestamp_format:
        raise CatalogError(
            f"{source}: timestamp_format {cat.timestamp_format!r} is not one of {', '.join(TIMESTAMP_FORMATS)} "
            "or a strptime pattern such as '%d.%m.%Y %H:%M:%S'"
        )
    if re.search(r"(?<!%)(?:%%)*%Z", cat.timestamp_format):
        raise CatalogError(
            f"{source}: timestamp_format {cat.timestamp_format!r} has %Z, a zone name (CEST) that strptime reads "
            "differently on each machine and then ignores: use %z for an offset (+02:00), or leave the zone out "
            "(local times are read in the catalog's timezone)"
        )
    if cat.timestamp_column in columns_of(variables):
        raise CatalogError(f"{source}: timestamp_column {cat.timestamp_column!r} is also a variable's column")
    if cat.sample_minutes != TRAINED_SAMPLE_MINUTES:
        raise CatalogError(
            f"{source}: sample_minutes must be {TRAINED_SAMPLE_MINUTES}, got {cat.sample_minutes}: the model counts "
            f"its daily modes, yesterday and its lead times in {TRAINED_SAMPLE_MINUTES}-minute steps (the import "
            "averages a finer export onto them)"
        )
    try:
        zoneinfo.ZoneInfo(cat.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CatalogError(f"{source}: unknown time zone {cat.timezone!r} (an IANA name, e.g. Europe/Berlin)") from None
    names = [v.name for v in variables]
    twice = sorted({n for n in names if names.count(n) > 1})
    columns = columns_of(variables)
    twice += sorted({f"column {c}" for c in columns if columns.count(c) > 1})
    if twice:
        raise CatalogError(f"{source}: named twice: {', '.join(twice)}")
    if not cat.targets or not cat.controls:
        raise CatalogError(f"{source}: needs at least one measurement or disturbance and one control")
    return cat


def plant_names(cat: Catalog) -> PlantNames:
    """What an objective of this plant may name."""
    return PlantNames(
        measurements=cat.target_names,
        controls=cat.control_names,
        setpoints=tuple(loop.setpoint for loop in cat.loops),
        looped=tuple(loop.control for loop in cat.loops),
        sample_minutes=cat.sample_minutes,
    )


def parse_optimizer(data: Any, cat: Catalog, source: str) -> Objective:
    """The ``[optimizer]`` table, each problem named by its key."""
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: optimizer must be a table")
    objective, problems = objective_problems(data, plant_names(cat))
    if problems:
        raise CatalogError(f"{source}: " + "; ".join(f"{f}: {m}" for f, m in problems))
    return objective


def columns_of(variables: list[Variable]) -> list[str]:
    return [v.source_column for v in variables]


CATALOG_DEFAULTS = {f.name: f.default for f in fields(Catalog) if f.name in ("timestamp_column", "timestamp_format")}


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
"""The simulated plant's catalog: the built-in plant's data (plant.scenarios, plant.whatif), and training's
default when no catalog is given."""
SAMPLE_MINUTES = BSM1.sample_minutes
MEASUREMENT_NAMES = BSM1.target_names
CONTROL_NAMES = BSM1.control_names


def model_store(catalog: Catalog) -> Path:
    """Where a catalog's models live: ``models`` for the built-in BSM1 plant, ``models/<name>`` for any other."""
    return Path("models") if catalog.to_dict() == BSM1.to_dict() else Path("models") / catalog.name
