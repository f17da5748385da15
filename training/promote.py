"""Point the served model at a stored version: ``python -m training.promote VERSION`` (also rollback).

The switch is an atomic rewrite of models/CURRENT after the version's card and ONNX checksum are verified;
running services pick it up on their next poll (or POST /admin/reload).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelcard.card import CardError
from modelcard.store import current_version, list_versions, remove_stale, set_current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.promote", description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", help="version to serve; omit to list versions")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    args = parser.parse_args(argv)
    store = Path(args.store)
    for name in remove_stale(store):
        print(f"removed {name} (left by an interrupted write)", file=sys.stderr)
    try:
        current = current_version(store)
    except CardError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        current = None
    if args.version is None:
        for v in list_versions(store):
            print(("* " if v == current else "  ") + v)
        return 0
    if args.version not in list_versions(store):
        print(f"error: no version {args.version!r} in {store}; have {', '.join(list_versions(store))}", file=sys.stderr)
        return 2
    try:
        set_current(store, args.version)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"current: {args.version} (was {current})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
