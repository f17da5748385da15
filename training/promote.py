"""Serve a stored version, list versions, or add one: ``python -m training.promote [VERSION] [--add DIR]``.

- no argument: list the versions, each with its held-out score and the promotion gate's verdict (* = current);
- ``VERSION``: point models/CURRENT at it (also rollback), after its card and ONNX checksum are verified;
- ``--add DIR``: copy a version folder (e.g. ``runs/<version>/export/<version>`` of a run the gate did not
  promote) into the store, whole or not at all; with ``--promote`` also serve it.

The switch is an atomic rewrite of CURRENT; running services pick it up on their next poll (or POST
/admin/reload).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modelcard.card import CardError, check_seal, read_card
from modelcard.store import (
    GATE_FILE,
    add_version,
    current_version,
    list_versions,
    remove_stale,
    resolve_version,
    set_current,
)


def describe(store: Path, version: str) -> str:
    """'score 0.4212, gate: passed (why)' for a version, from its card and gate.json."""
    try:
        card = read_card(store / version, verify=False)
        check_seal(store / version)
    except CardError as exc:
        return f"unreadable or changed by hand ({exc})"
    score = card.get("metrics", {}).get("score")
    text = f"score {score:.4f}" if isinstance(score, int | float) else "score -"
    try:
        gate = json.loads((store / version / GATE_FILE).read_text())
    except (OSError, ValueError):
        return f"{text}, gate: not recorded"
    verdict = "passed" if gate.get("passed") else ("forced" if gate.get("forced") else "not passed")
    return f"{text}, gate: {verdict} ({gate.get('why', '')})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.promote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("version", nargs="?", help="version to serve; omit to list versions")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    parser.add_argument("--add", metavar="DIR", help="copy this version folder into the store")
    parser.add_argument("--promote", action="store_true", help="with --add: also serve the added version")
    args = parser.parse_args(argv)
    if args.promote and not args.add:
        parser.error("--promote serves the version --add adds; to serve a stored version, name it: promote VERSION")
    if args.add and args.version:
        parser.error(f"give {args.version} or --add, not both (--add DIR --promote adds and serves DIR's version)")
    store = Path(args.store)
    if store.exists() and not store.is_dir():
        print(f"error: --store {store} is a file, not a model store folder", file=sys.stderr)
        return 2
    for name in remove_stale(store):
        print(f"removed {name} (left by an interrupted write)", file=sys.stderr)
    try:
        current = current_version(store)
    except CardError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        current = None
    if args.add:
        try:
            added = add_version(store, Path(args.add))
        except CardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"added {added} to {store}")
        if not args.promote:
            return 0
        args.version = added
    if args.version is None:
        if not store.is_dir():
            print(f"error: no model store at {store} (--store names the folder that holds CURRENT)", file=sys.stderr)
            return 2
        if not list_versions(store):
            print(f"no versions in {store}; add one with --add DIR")
        for v in list_versions(store):
            print(("* " if v == current else "  ") + f"{v}  {describe(store, v)}")
        return 0
    try:
        set_current(store, resolve_version(store, args.version))  # a name not in the store is named with those there
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"current: {args.version} (was {current})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
