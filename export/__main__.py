"""``python -m export --version V [--store models]``: re-export a stored version's weights to ONNX.

Rebuilds the KoVAE from the version's ``weights.pt`` and ``card.json``, checks parity, and rewrites
``model.onnx`` and the card (with its new checksum) only if parity holds. ``training.run`` calls the same
``export_version`` for every new version.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelcard.card import CardError, check_seal
from modelcard.store import version_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="version folder name in the store")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    args = parser.parse_args(argv)
    from export.onnx_export import ParityError, export_version, load_model  # torch: after --help

    try:
        folder = version_dir(Path(args.store), args.version)  # a version name, inside the store
        check_seal(folder)  # a card edited by hand is refused, never sealed again
        model, card = load_model(folder, verify=False)  # the graphs' old checksums may be stale: not checked
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not os.access(folder, os.W_OK):
        print(f"error: {folder} is not writable: nothing was exported", file=sys.stderr)
        return 2
    try:
        card = export_version(model, card, folder)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: writing {args.version} failed ({exc.strerror or exc})", file=sys.stderr)
        return 1
    st = card["stability"]
    print(
        f"exported {args.version}: parity {card['onnx']['parity_max_abs_error']:.2e}, spectral radius "
        f"{st['spectral_radius']:.6f}, slowest decay {st['slowest_decay_hours']:.1f} h, "
        f"sha256 {card['onnx']['sha256'][:12]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
