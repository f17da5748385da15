"""The versioned model store: ``models/<version>/`` folders and a ``CURRENT`` pointer file.

A version is added whole (``add_version``) and its weights never change (``python -m export`` may re-export a
version's graph from those weights, rewriting ``model.onnx`` and the card's checksum in place). Promotion and
rollback only rewrite the pointer, atomically, under the store's lock (``store_lock``), which every writer of the
pointer takes, and every rename of a new version into place. Every name read from CURRENT is checked against the
version pattern and resolved inside the store, so the pointer cannot send a reader elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelcard.card import CARD_FILE, CardError, atomic_write, fsync_dir, read_card
from modelcard.validate import check_card

POINTER = "CURRENT"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GATE_FILE = "gate.json"
"""The promotion gate's verdict on a version (written by training.publish, listed by training.promote)."""
STAGING_PREFIX = ".tmp-"
"""A version being written lives in ``.tmp-<version>-<random>`` until it is renamed into place."""
LOCK_FILE = ".lock"
ANY: Any = object()
"""``set_current(..., replacing=ANY)``: whatever CURRENT names now is replaced (an operator's promotion or
rollback)."""


class StoreChanged(CardError):
    """CURRENT no longer names the version a promotion was decided against (a rollback or another promotion
    meanwhile): the promotion is not made."""


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """The store's exclusive lock (``flock`` on ``<store>/.lock``), held while CURRENT is compared and rewritten
    and while a version is renamed into place: two writers never interleave there."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    try:  # read-only: flock needs no more, and a lock file another user created (a root container) stays usable
        fd = os.open(store / LOCK_FILE, os.O_CREAT | os.O_RDONLY, 0o644)
    except OSError as exc:
        raise CardError(f"{store / LOCK_FILE}: cannot be opened to lock the store ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_version_name(version: str) -> str:
    if not VERSION_RE.match(version) or ".." in version:
        raise CardError(f"{version[:80]!r} is not a version name (letters, digits, '.', '_', '-'; at most 64)")
    return version


def version_dir(store: Path, version: str) -> Path:
    """The folder of ``version``, which must be a valid name and lie inside the store (no links out of it)."""
    check_version_name(version)
    root = Path(store).resolve()
    path = (root / version).resolve()
    if path.parent != root:
        raise CardError(f"version {version!r} resolves outside the model store")
    return path


def check_card_names_folder(folder: Path, card: dict) -> str:
    """The card's version, which must be its folder's name: a copied folder whose card was not renamed would
    otherwise be served, listed and compared under another version's name."""
    version = str(card["version"])
    if Path(folder).name != version:
        raise CardError(f"{Path(folder).name}/{CARD_FILE} names version {version!r}, not its folder's")
    return version


def current_version(store: Path) -> str | None:
    """The version CURRENT names; None if there is no pointer. Raises CardError for a name that is no version."""
    try:
        name = (Path(store) / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"{POINTER} is unreadable ({type(exc).__name__})") from None
    return check_version_name(name) if name else None


def resolve_version(store: Path, version: str | None = None) -> str:
    """The version a command was told to use, else the one CURRENT names, checked to be in the store: raises
    CardError with what is wrong (no store, no such version and which there are, nothing current)."""
    store = Path(store)
    if not store.is_dir():
        raise CardError(f"no model store at {store} (a folder holding CURRENT and the versions)")
    version, versions = version or current_version(store), list_versions(store)
    have = ", ".join(versions) or "none"
    if version is None:
        raise CardError(f"no version given and none is current in {store}; have {have}")
    if version not in versions:
        raise CardError(f"no version {version!r} in {store}; have {have}")
    return version


def list_versions(store: Path) -> list[str]:
    """Complete versions only: a folder with a valid name and a card (never a staging folder)."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(
        p.name for p in store.iterdir() if p.is_dir() and VERSION_RE.match(p.name) and (p / CARD_FILE).exists()
    )


def set_current(store: Path, version: str, *, replacing: str | None = ANY) -> None:
    """Point CURRENT at a version after checking its name, its card (checksum, servable numbers, the version its
    folder is named for) and its graphs' checksums: what the service would refuse is not promoted. (Which plant
    it forecasts was checked when it entered the store, ``add_version``; a switch between stored versions is also
    a rollback, which must always go.) ``replacing``: the version CURRENT must still name (None: none), else
    StoreChanged and CURRENT is left alone: a gate that scored the served version for minutes must not undo a
    rollback made meanwhile."""
    card = read_card(version_dir(store, version), verify=True, sealed=True)
    check_card_names_folder(Path(store) / version, card)  # the name given, not a link's target
    check_card(card, version)
    with store_lock(store):
        if replacing is not ANY and (now := current_version(store)) != replacing:
            raise StoreChanged(
                f"{POINTER} names {now or 'nothing'}, no longer {replacing or 'nothing'}: changed meanwhile"
            )
        atomic_write(Path(store) / POINTER, (version + "\n").encode())


def plant_of(card: dict) -> str:
    """The name of the catalog whose plant a card's model forecasts."""
    name = card.get("catalog", {}).get("name") if isinstance(card.get("catalog"), dict) else None
    return name if isinstance(name, str) else ""


def check_same_plant(store: Path, card: dict) -> None:
    """A store serves one plant: a version of another catalog than the served version's is not added to it, so
    that a wrong ``--store`` cannot put a plant's model where another plant's callers are served. Each catalog's models
    live in a store of their own (``models/<catalog name>``; BSM1's in ``models``)."""
    check_store_serves(store, plant_of(card), str(card.get("version")))


def check_store_serves(store: Path, plant: str, version: str) -> None:
    """``check_same_plant`` for a ``version`` of catalog ``plant`` that has no card yet (a run checks its store
    before it trains). A served card that cannot be read, or one from before cards named their catalog, does not
    block (a rollback must stay possible)."""
    try:
        served_version = current_version(store)
        served = None if served_version is None else read_card(version_dir(store, served_version), verify=False)
    except CardError:
        return
    if served is None or plant_of(served) == plant or not (plant_of(served) and plant):
        return  # the same plant, or a card too old to name its catalog
    raise CardError(
        f"{store} serves {served_version}, a model of catalog {plant_of(served)!r}; version {version} "
        f"is one of catalog {plant!r}: each catalog's models belong in a store of their own (the one "
        "python -m training.run picks without --store)"
    )


def remove_stale(store: Path, older_than_s: float = 3600.0) -> list[str]:
    """Delete what crashed writers left behind: ``.CURRENT.*.tmp`` files and ``.tmp-<version>`` staging folders
    older than ``older_than_s`` (a live writer's are seconds old). Returns the names removed."""
    store = Path(store)
    if not store.is_dir():
        return []
    cutoff, removed = time.time() - older_than_s, []
    for p in store.iterdir():
        stale_pointer = p.name.startswith(f".{POINTER}.") and p.name.endswith(".tmp")
        if not (stale_pointer or p.name.startswith(STAGING_PREFIX)):
            continue
        try:
            if p.lstat().st_mtime > cutoff:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            continue
    return sorted(removed)


def add_version(store: Path, source: Path) -> str:
    """Copy a complete version folder (card and verified ONNX) into the store under its card's name, through a
    staging folder that is fsync'd and then renamed: the version appears whole or not at all. Never overwrites,
    never adds a card the service would refuse (``check_card``) nor another plant's model (``check_same_plant``)."""
    source = Path(source)
    card = read_card(source, verify=True)
    version = check_version_name(check_card_names_folder(source, card))
    check_card(card, version)  # a version the service would refuse never enters the store
    check_same_plant(store, card)
    store = Path(store)
    if store.exists() and not store.is_dir():
        raise CardError(f"{store} is a file, not a model store folder")
    store.mkdir(parents=True, exist_ok=True)
    target = version_dir(store, version)
    if target.exists():
        raise CardError(f"version {version} is already in the store; versions are never overwritten")
    # A name of its own: a concurrent writer of the same version never removes this one's.
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=store))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        os.utime(staging)  # copytree gave it the source's time: an old source looked stale to remove_stale
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(staging)
        with store_lock(store):
            if target.exists():
                raise CardError(f"version {version} was added to the store meanwhile; versions are never overwritten")
            staging.rename(target)
        fsync_dir(store)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version
