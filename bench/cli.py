"""What every benchmark's command line shares: the model version it measures, checked before any work."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelcard.card import CardError, read_card
from modelcard.store import resolve_version
from training.config import ConfigError, RunConfig, config_from_dict, with_overrides


def served_version(parser: argparse.ArgumentParser, store: Path, version: str | None = None) -> str:
    """``version`` if given, else the one the store's CURRENT names; a missing store or version stops the bench
    with one line (exit 2) before it simulates, trains or copies anything."""
    try:
        return resolve_version(store, version)
    except CardError as exc:
        parser.error(str(exc))


def version_config(parser: argparse.ArgumentParser, store: Path, version: str, overrides: list[str]) -> RunConfig:
    """The version's training config with ``section.field=value`` overrides (e.g. a data cache folder); a bad
    override stops the bench in one line (exit 2) before any work."""
    try:
        return with_overrides(config_from_dict(read_card(Path(store) / version)["training"]["config"]), overrides)
    except ConfigError as exc:
        parser.error(str(exc))
