"""Bring a stored version's card up to card_version 3: ``python -m training.upgrade_card --version V``.

Version 3 adds, per variable, the physical bounds (from the catalog) and the training range (min and max over
the version's own training scenarios, regenerated from its stored config and checked against the card's data
hash). The ONNX graph and weights are untouched, so the checksum in the card still holds.

``--optimizer [--catalog PATH]`` instead adds the catalog's objective for setpoint advice (its ``[optimizer]``
table, the bounds narrowed to the card's training range, as training writes it) to a card without one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modelcard.card import CARD_VERSION, CardError, read_card, write_card
from modelcard.store import version_dir
from modelcard.validate import check_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.upgrade_card", description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="version folder name in the store")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    parser.add_argument("--optimizer", action="store_true", help="add the catalog's [optimizer] table only")
    parser.add_argument("--catalog", help="the plant's catalog (TOML) for --optimizer; default: the BSM1 catalog")
    args = parser.parse_args(argv)
    if args.catalog and not args.optimizer:
        parser.error("--catalog is read with --optimizer only")
    from plant.catalog import CatalogError
    from training.config import ConfigError

    try:
        if args.optimizer:
            return add_optimizer(Path(args.store), args.version, args.catalog)
        return upgrade(Path(args.store), args.version)
    except (CardError, CatalogError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def upgrade(store: Path, version: str) -> int:
    """Bounds and training range into a card from before card_version 3; a card at 3 is left as it is."""
    import numpy as np

    from plant.catalog import BSM1
    from plant.scenarios import config_hash
    from training.config import config_from_dict
    from training.prepare import prepare
    from training.publish import card_variables

    folder = version_dir(store, version)
    card = read_card(folder, verify=True)
    if card.get("card_version", 1) >= CARD_VERSION:
        print(f"{version} is at card_version {card['card_version']} already: left as it is")
        return 0
    cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
    if config_hash(cfg.data) != card["data"]["config_hash"]:
        print(f"error: the data this code generates for {version} differ from what it was trained on", file=sys.stderr)
        return 1
    p = prepare(cfg)  # scalers and training range, exactly as training computes them
    cat, var = BSM1.to_dict(), card["variables"]  # a card from before catalogs is BSM1's
    for role, fitted, seen in (("measurements", p.x_mean, p.x_range), ("controls", p.u_mean, p.u_range)):
        if [v["name"] for v in cat[role]] != [v["name"] for v in var[role]]:
            print(f"error: {version} has other {role} than the catalog", file=sys.stderr)
            return 1
        mean = np.array([v["mean"] for v in var[role]])
        std = np.array([v["std"] for v in var[role]])
        if not np.allclose(mean, fitted, rtol=1e-6):
            print(f"error: the regenerated {role} do not match the card's scalers", file=sys.stderr)
            return 1
        var[role] = card_variables(cat[role], mean, std, seen)
    card["card_version"] = CARD_VERSION
    write_card(folder, card)
    print(f"{version}: card_version {CARD_VERSION}, physical bounds and training range added")
    return 0


def add_optimizer(store: Path, version: str, catalog_path: str | None) -> int:
    from plant.catalog import load_catalog
    from training.publish import NO_LOOPS_NO_ADVICE, narrowed_objective, unplannable_setpoints

    folder = version_dir(store, version)
    card = read_card(folder, verify=True)
    cat = load_catalog(catalog_path)
    if cat.name != card["catalog"]["name"]:
        print(f"error: catalog {cat.name} is not {version}'s ({card['catalog']['name']})", file=sys.stderr)
        return 1
    if cat.optimizer is None:
        print(f"error: catalog {cat.name} has no [optimizer] table", file=sys.stderr)
        return 1
    if "optimizer" in card:
        print(f"{version} has an optimizer table already: left as it is")
        return 0
    if unplannable_setpoints(cat.optimizer, card["variables"]):
        print(f"error: {version}: {NO_LOOPS_NO_ADVICE}", file=sys.stderr)
        return 1
    objective = narrowed_objective(cat.optimizer, card["variables"])
    if objective is None:
        print(f"error: {version}'s training data span none of the variables the objective decides", file=sys.stderr)
        return 1
    card["optimizer"] = objective
    check_card(card, version)
    write_card(folder, card)
    print(f"{version}: optimizer table added")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
