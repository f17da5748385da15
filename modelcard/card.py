"""The model card: the one contract between training, export and serving (numpy only: no torch, no web).

Training writes it once; export adds the ONNX facts; the service only reads it. Variable names, units,
scalers, history and horizon limits and the operator's eigenvalues are never re-derived elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import numpy as np

CARD_FILE = "card.json"
CARD_SUM_FILE = "card.sha256"
"""The card's SHA-256 beside it, in ``sha256sum`` format: the service serves only a card that matches it."""
ONNX_FILE = "model.onnx"
CARD_VERSION = 3  # 2: variables.calendar (clock inputs); 3: per-variable bounds and training_range
READABLE_CARD_VERSIONS = (1, 2, 3)  # 1 has no calendar inputs; 1-2 have no bounds (then nothing is refused)
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY


class CardError(ValueError):
    """A model card or its ONNX file is missing, malformed or does not match its checksum."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable: fsync the folder itself (POSIX)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target, fsync, rename, fsync the folder: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600: other users (a service account) must read it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stability_summary(A: np.ndarray, sample_minutes: float) -> dict[str, Any]:
    """Eigenvalues of A in float64 with modulus, decay time constant and oscillation period in hours."""
    eig = np.linalg.eigvals(np.asarray(A, dtype=np.float64))
    eig = eig[np.lexsort((-eig.imag, -np.abs(eig)))]
    dt_h = sample_minutes / 60.0
    modes = []
    for lam in eig:
        mod = float(abs(lam))
        decay = math.inf if mod >= 1 else (-dt_h / math.log(mod) if mod > 0 else 0.0)
        angle = abs(math.atan2(lam.imag, lam.real))
        period = 2 * math.pi * dt_h / angle if angle > 1e-12 else None
        modes.append(
            {
                "real": float(lam.real),
                "imag": float(lam.imag),
                "modulus": mod,
                "decay_hours": None if math.isinf(decay) else decay,
                "period_hours": period,
            }
        )
    rho = float(np.max(np.abs(eig))) if len(eig) else 0.0
    periods = sorted({round(m["period_hours"], 3) for m in modes if m["period_hours"] is not None}, reverse=True)
    finite_decays = [m["decay_hours"] for m in modes if m["decay_hours"] is not None]
    return {
        "eigenvalues": modes,
        "spectral_radius": rho,
        "stability_margin": 1.0 - rho,
        "stable": rho < 1.0,
        "slowest_decay_hours": max(finite_decays) if finite_decays else None,
        "oscillation_periods_hours": periods,
    }


def write_card(version_dir: Path, card: dict[str, Any]) -> None:
    """Write the card and its checksum file beside it (``card.sha256``, as ``sha256sum`` writes it). Over a sealed
    card (a card upgraded or re-exported in place) the checksum file first vouches for both the old card and the
    new one, then the card is replaced, then the old card's line goes: a write stopped anywhere leaves a card its
    checksum file vouches for (stopped between the two files, the new card was refused for good)."""
    folder = Path(version_dir)
    data = json.dumps(card, indent=1, sort_keys=False).encode()
    try:
        old = hashlib.sha256((folder / CARD_FILE).read_bytes()).hexdigest()
        sealed = old in _sealed_digests((folder / CARD_SUM_FILE).read_text())
    except (OSError, UnicodeDecodeError):
        sealed = False
    if sealed:
        new = hashlib.sha256(data).hexdigest()
        atomic_write(folder / CARD_SUM_FILE, f"{new}  {CARD_FILE}\n{old}  {CARD_FILE}\n".encode())
    atomic_write(folder / CARD_FILE, data)
    _write_seal(folder, data)


def _sealed_digests(text: str) -> list[str]:
    """The digests a checksum file lists (one per line; two while a card is rewritten, ``write_card``)."""
    return [line.split()[0] for line in text.splitlines() if line.split()]


def seal_card(version_dir: Path) -> str:
    """Write ``card.sha256`` for the card as it stands (a version written before cards had checksums); returns
    the digest. Check the card first: from now on the service serves exactly these bytes."""
    data = (Path(version_dir) / CARD_FILE).read_bytes()
    return _write_seal(Path(version_dir), data)


def _write_seal(version_dir: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    atomic_write(version_dir / CARD_SUM_FILE, f"{digest}  {CARD_FILE}\n".encode())
    return digest


def _check_seal(version_dir: Path, data: bytes, required: bool) -> None:
    """The card's bytes against ``card.sha256``: a mismatch is refused; a missing file only when ``required``."""
    where = f"{version_dir.name}/{CARD_SUM_FILE}"
    try:
        text = (version_dir / CARD_SUM_FILE).read_text()
    except FileNotFoundError:
        if required:
            raise CardError(
                f"{where}: missing (a card written before cards had checksums: check it, then run "
                f"python -m modelcard seal <store>/{version_dir.name})"
            ) from None
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"{where}: unreadable ({type(exc).__name__})") from None
    digests = _sealed_digests(text)
    expected = digests[0] if digests else ""
    actual = hashlib.sha256(data).hexdigest()
    if actual not in digests:
        raise CardError(
            f"{version_dir.name}/{CARD_FILE}: SHA-256 {actual[:12]}... does not match {CARD_SUM_FILE}'s "
            f"{expected[:12]}... (the card was changed after it was written)"
        )


def check_seal(version_dir: Path) -> None:
    """The card's bytes against ``card.sha256`` (where there is one), the graphs not read: what a re-export checks
    before it rewrites a graph and the card's checksums of it, so that it never seals a card edited by hand."""
    version_dir = Path(version_dir)
    try:
        data = (version_dir / CARD_FILE).read_bytes()
    except OSError:
        return  # read_card names what is wrong with it
    _check_seal(version_dir, data, required=False)


def read_card(version_dir: Path, *, verify: bool = True, sealed: bool = False) -> dict[str, Any]:
    """Read a version's card; with ``verify`` also check it against ``card.sha256`` (when there is one) and
    model.onnx against the card's SHA-256. ``sealed``: the checksum file must be there (what is served).

    Messages name files as ``<version>/<file>``, never by absolute path: they reach API clients.
    """
    version_dir = Path(version_dir)
    where = f"{version_dir.name}/{CARD_FILE}"
    try:
        data = (version_dir / CARD_FILE).read_bytes()
    except FileNotFoundError:
        raise CardError(f"{where}: no model card") from None
    except OSError as exc:
        raise CardError(f"{where}: unreadable ({type(exc).__name__})") from None
    if verify or sealed:
        _check_seal(version_dir, data, required=sealed)
    try:
        card = json.loads(data)
    except ValueError as exc:
        raise CardError(f"{where}: unreadable ({type(exc).__name__})") from None
    if not isinstance(card, dict):
        raise CardError(f"{where}: not a JSON object")
    for key in ("version", "variables", "scaling", "history", "max_horizon", "stability", "onnx"):
        if key not in card:
            raise CardError(f"{where}: missing field {key!r}")
    if card.get("card_version") not in READABLE_CARD_VERSIONS:
        raise CardError(f"{where}: card_version {card.get('card_version')} is not one of {READABLE_CARD_VERSIONS}")
    if verify:
        onnx_bytes(version_dir, card)
        if isinstance(card["onnx"], dict) and card["onnx"].get("plans_file"):
            onnx_bytes(version_dir, card, "plans")  # the service loads and checks it too
    return card


def onnx_bytes(version_dir: Path, card: dict[str, Any], which: str = "") -> bytes:
    """The version's ONNX file (``which="plans"``: its plans graph), read once and checked against the card's
    SHA-256. The caller loads these very bytes (not the path again), so what runs is what was verified.
    """
    file_key, sha_key = (f"{which}_file", f"{which}_sha256") if which else ("file", "sha256")
    name = f"{Path(version_dir).name}/{card['onnx'][file_key]}"
    try:
        data = (Path(version_dir) / card["onnx"][file_key]).read_bytes()
    except FileNotFoundError:
        raise CardError(f"{name}: missing") from None
    except OSError as exc:
        raise CardError(f"{name}: unreadable ({type(exc).__name__})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != card["onnx"][sha_key]:
        raise CardError(f"{name}: SHA-256 {actual[:12]}... does not match the card's {card['onnx'][sha_key][:12]}...")
    return data


def scalers(card: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_mean, x_std, u_mean, u_std) as float32 arrays, in catalog order."""
    m, c = card["variables"]["measurements"], card["variables"]["controls"]

    def arr(items: list[dict[str, Any]], key: str) -> np.ndarray:
        return np.array([v[key] for v in items], dtype=np.float32)

    return arr(m, "mean"), arr(m, "std"), arr(c, "mean"), arr(c, "std")


def role_items(card: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """The card's variables of ``role``: "measurements", "controls", or "setpoint_inputs" (its ``variables``; none
    for models without setpoint inputs)."""
    entry = card["variables"].get(role, [])
    return entry["variables"] if isinstance(entry, dict) else entry


def bounds(card: dict[str, Any], role: str) -> tuple[np.ndarray, np.ndarray]:
    """Physical (min, max) per variable of ``role`` (``role_items``), float64, catalog order.

    Cards before version 3 carry none: then (-inf, inf), and only non-finite values are refused.
    """
    items = role_items(card, role)
    lo = np.array([v.get("bounds", {}).get("min", -np.inf) for v in items], dtype=np.float64)
    hi = np.array([v.get("bounds", {}).get("max", np.inf) for v in items], dtype=np.float64)
    return lo, hi


def training_range(card: dict[str, Any], role: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(min, max) seen in the training data per variable of ``role``; None for cards that do not record it."""
    items = role_items(card, role)
    if not all("training_range" in v for v in items):
        return None
    lo = np.array([v["training_range"]["min"] for v in items], dtype=np.float64)
    hi = np.array([v["training_range"]["max"] for v in items], dtype=np.float64)
    return lo, hi


@dataclass(frozen=True)
class Calendar:
    """Known inputs read off the clock: sin/cos harmonics of the day and of the week.

    The influent follows a daily and a weekly cycle (weekend flows are ~15% lower), so the time of every
    future step is a known input, like the planned controls. Clock times are minutes since Monday 00:00, local
    time. Training and serving both compute the features here, so they cannot drift apart.
    """

    daily: int = 0
    weekly: int = 0

    @property
    def size(self) -> int:
        return 2 * (self.daily + self.weekly)

    def features(self, minutes: np.ndarray) -> np.ndarray:
        """(*minutes.shape, size) float32: day sin 1..n, day cos 1..n, then the same for the week."""
        minutes = np.asarray(minutes, dtype=np.float64)
        parts = []
        for harmonics, period in ((self.daily, MINUTES_PER_DAY), (self.weekly, MINUTES_PER_WEEK)):
            angles = (2 * np.pi * (minutes % period) / period)[..., None] * np.arange(1, harmonics + 1)
            parts += [np.sin(angles), np.cos(angles)]
        return np.concatenate(parts, -1).astype(np.float32)

    def to_card(self) -> dict[str, Any]:
        periods = (("day", self.daily), ("week", self.weekly))
        names = [f"{p}_{f}_{k}" for p, n in periods for f in ("sin", "cos") for k in range(1, n + 1)]
        return {
            "daily_harmonics": self.daily,
            "weekly_harmonics": self.weekly,
            "features": names,
            "formula": "sin/cos(2 pi k m / P), m = minutes since Monday 00:00 mod P, P = 1 day and 1 week",
            "clock": CALENDAR_CLOCK,
            "where": "appended to the scaled controls, in this order",
        }

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Calendar:
        """The card's calendar; none for cards written before it existed (card_version 1)."""
        cal = card["variables"].get("calendar", {})
        daily = cal.get("daily_harmonics", cal.get("harmonics", 0))  # "harmonics": early version-2 cards (daily only)
        return cls(int(daily), int(cal.get("weekly_harmonics", 0)))


def known_inputs(
    u: np.ndarray,
    minutes: np.ndarray,
    card_scalers: tuple[np.ndarray, np.ndarray],
    calendar: Calendar,
    disturbances: np.ndarray | None = None,
    setpoints: np.ndarray | None = None,
    looped: list[int] | tuple[int, ...] = (),
) -> np.ndarray:
    """The graph's known-input rows (..., n_u): z-scored controls, (models with loops) a flag per ``looped``
    control, (models with setpoint inputs) ``optional_columns(setpoints)``, the calendar features of the same
    steps, then (models with disturbance inputs) ``optional_columns(disturbances)``. The plan (controls, flags,
    setpoints) leads: the decoder reads it.

    A looped control's future is NaN where the caller leaves it to its loop: its column reads 0 (the training
    mean) and its flag 0; given, the flag is 1. Training, export and the service all build the model's u this
    way. ``card_scalers`` is (u_mean, u_std); ``setpoints`` and ``disturbances`` come z-scored, NaN where not
    known.
    """
    u_mean, u_std = card_scalers
    scaled = ((u - u_mean) / u_std).astype(np.float32)
    parts = [scaled]
    if len(looped):
        given = np.isfinite(scaled[..., looped])
        scaled[..., looped] = np.where(given, scaled[..., looped], 0.0)
        parts.append(given.astype(np.float32))
    if setpoints is not None:
        parts.append(optional_columns(setpoints))
    parts.append(calendar.features(minutes))
    if disturbances is not None:
        parts.append(optional_columns(disturbances))
    return np.concatenate(parts, -1)


def loops(card: dict[str, Any]) -> list[dict[str, str]]:
    """The card's feedback loops (``variables.loops``): each names the control it drives, its setpoint and the
    measurement it holds. A request may leave a looped control's future to its loop; the model then forecasts
    the control too (after the measurements, in this order). Models without loops: none."""
    return list(card["variables"].get("loops", []))


def output_names(card: dict[str, Any]) -> list[str]:
    """What the graph forecasts, in its order: the measurements, then each looped control (``loops``)."""
    return [v["name"] for v in card["variables"]["measurements"]] + [loop["control"] for loop in loops(card)]


def fast_outputs(variables: dict[str, Any]) -> list[int]:
    """Positions among the outputs (``output_names``) of those that settle within a sample of a control move,
    from a card's ``variables`` (a catalog's dict): each measurement marked ``fast``, each loop's measurement, and
    each looped control (its loop sets it from the setpoint at once). The decoder reads the plan for these only
    (``model.decoder_fast_only``)."""
    names = [v["name"] for v in variables["measurements"]]
    held = {loop.get("measurement") for loop in variables.get("loops", [])}
    fast = [i for i, v in enumerate(variables["measurements"]) if v.get("fast") or v["name"] in held]
    return fast + [len(names) + j for j in range(len(variables.get("loops", [])))]


def exogenous_outputs(variables: dict[str, Any]) -> list[int]:
    """Positions among the outputs of those no plan can move, from a card's ``variables``: the disturbances
    (role ``disturbance``, BSM1's influent). Decoded from the latent coordinates the plan does not drive
    (``model.exogenous_modes``)."""
    return [i for i, v in enumerate(variables["measurements"]) if v.get("role") == "disturbance"]


def looped_controls(card: dict[str, Any]) -> list[int]:
    """Positions among the card's controls of the looped ones (``loops`` order)."""
    names = [v["name"] for v in card["variables"]["controls"]]
    return [names.index(loop["control"]) for loop in loops(card)]


def loop_limits(variables: dict[str, Any]) -> list[tuple[float, float]]:
    """Each loop's controller output limits (``loops`` order), from a card's ``variables`` (a catalog's dict): its
    ``output_min`` / ``output_max``, else the bounds of the control it drives."""
    bounds = {v["name"]: v.get("bounds", {}) for v in variables["controls"]}
    out = []
    for loop in variables.get("loops", []):
        own = bounds[loop["control"]]
        out.append((float(loop.get("output_min", own["min"])), float(loop.get("output_max", own["max"]))))
    return out


def optional_columns(values: np.ndarray) -> np.ndarray:
    """(..., 2 n) known-input columns for inputs a caller may or may not send, from their z-scored values
    (..., n), NaN where not known: the value (0 when not known), then a flag (1 = known). Disturbances: measured
    in the history, and in the future an influent forecast the caller sends, or nothing. Setpoints: whatever
    the caller sends of the loops' setpoints, history and plan."""
    known = np.isfinite(values)
    return np.concatenate([np.where(known, values, 0.0), known], -1).astype(np.float32)


def last_observed_step(x: np.ndarray) -> np.ndarray:
    """(..., L, n) -> (..., n): the index of each variable's last step that is not missing (NaN), -1 where none
    is."""
    seen = ~np.isnan(x)
    last = x.shape[-2] - 1 - np.argmax(seen[..., ::-1, :], axis=-2)
    return np.where(seen.any(-2), last, -1)


def last_observed(x: np.ndarray) -> np.ndarray:
    """(..., L, n) -> (..., n): each variable's last value that is not missing (NaN) over the L steps, NaN where
    none is. Persistence after a sensor gap, and what holding a control means after one."""
    last = last_observed_step(x)
    value = np.take_along_axis(x, np.maximum(last, 0)[..., None, :], axis=-2)[..., 0, :]
    return np.where(last >= 0, value, np.nan)


CALENDAR_CLOCK = (
    "the plant's wall-clock time in catalog.timezone at each instant, whatever UTC offset it is written with"
)
"""How the calendar reads a timestamp (API 1.9: before, in the timestamp's own offset): GET /model says it for
every card, older ones included (``service.app``)."""


def hold_forward(col: np.ndarray, max_steps: int) -> None:
    """In place: each value carried on over the missing (NaN) samples after it, at most ``max_steps`` of them
    (also after the last value): a setpoint a historian logs only when it changes holds until it does. The import
    (``plant.historian``) and the service (``service.inputs``) hold a catalog's ``fill = "hold"`` variables alike."""
    seen = np.flatnonzero(~np.isnan(col))
    for a, b in zip(seen, [*seen[1:], len(col)], strict=True):
        col[a + 1 : min(b, a + 1 + max_steps)] = col[a]


def hold_steps(items: list[dict[str, Any]], step_minutes: int) -> np.ndarray | None:
    """Per card or catalog entry, how many samples a ``fill = "hold"`` value is carried on (its max_gap_minutes);
    0 for the others; None where none holds."""
    steps = [int(float(v.get("max_gap_minutes") or 0) // step_minutes) if v.get("fill") == "hold" else 0 for v in items]
    return np.array(steps) if any(steps) else None


def local_instants(t: datetime, zone: tzinfo) -> tuple[datetime, ...]:
    """The instants (in UTC) a wall-clock time ``t`` (naive) of ``zone`` may mean: one; both passes of an hour the
    autumn change repeats (earlier first); or none, for one the spring change skips. The import
    (``plant.export_reader``) and the service (``service.times``) read a plant's local timestamps alike. (In UTC
    because Python compares and subtracts two times of one zone on the wall clock, DST ignored.)"""
    first, second = t.replace(tzinfo=zone, fold=0).astimezone(UTC), t.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) != t:  # a skipped time comes back as another wall-clock time
        return ()
    return (first,) if first == second else tuple(sorted((first, second)))


def minutes_since_monday(t: datetime) -> float:
    """Clock position of a timestamp on its own wall clock, the calendar's input (callers pass the plant's: the
    same instant written in UTC or with another offset must give the same calendar)."""
    return t.weekday() * MINUTES_PER_DAY + t.hour * 60 + t.minute + t.second / 60


def window_clock(last_minute: np.ndarray, history: int, horizon: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Clock minutes of every history and future step, from the time of each window's last history sample.

    last_minute (batch,) -> history (batch, history) ending at last_minute, future (batch, horizon) after it.
    """
    last = np.asarray(last_minute, dtype=np.float64)[:, None]
    hist = last + step * np.arange(1 - history, 1)
    fut = last + step * np.arange(1, horizon + 1)
    return hist, fut
