"""``python -m modelcard seal FOLDER...``: write ``card.sha256`` beside the card of versions written before cards
had checksums (the service serves only a card that matches one). New versions get it from ``write_card``.

Check a card before sealing it: from then on its bytes are what the service accepts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelcard.card import CardError, read_card, seal_card
from modelcard.validate import card_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelcard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seal = sub.add_parser("seal", help="write card.sha256 for version folders (their ONNX checksums checked first)")
    seal.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        try:
            problems = card_problems(read_card(folder, verify=True))
        except CardError as exc:
            print(f"{folder}: not sealed: {exc}")
            failed += 1
            continue
        if problems:
            print(f"{folder}: not sealed: {'; '.join(problems)}")
            failed += 1
            continue
        print(f"{folder}: card.sha256 {seal_card(folder)[:12]}...")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
