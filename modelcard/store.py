"""The versioned model store: ``models/<version>/`` folders and a ``CURRENT`` pointer file.

Versions are never modified once written; promotion and rollback only rewrite the pointer, atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

from modelcard.card import CardError, atomic_write, read_card

POINTER = "CURRENT"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def current_version(store: Path) -> str | None:
    try:
        name = (Path(store) / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def list_versions(store: Path) -> list[str]:
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and (p / "card.json").exists())


def set_current(store: Path, version: str) -> None:
    """Point CURRENT at a version after checking its card and ONNX checksum."""
    if not VERSION_RE.match(version):
        raise CardError(f"invalid version name {version!r}")
    read_card(Path(store) / version, verify=True)
    atomic_write(Path(store) / POINTER, (version + "\n").encode())
