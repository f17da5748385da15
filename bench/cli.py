"""What every benchmark's command line shares: the model version it measures, checked before any work."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelcard.card import CardError
from modelcard.store import resolve_version


def served_version(parser: argparse.ArgumentParser, store: Path, version: str | None = None) -> str:
    """``version`` if given, else the one the store's CURRENT names; a missing store or version stops the bench
    with one line (exit 2) before it simulates, trains or copies anything."""
    try:
        return resolve_version(store, version)
    except CardError as exc:
        parser.error(str(exc))
