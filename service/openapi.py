"""Write the app's OpenAPI document to openapi.json and openapi.yaml: ``python -m service.openapi [FILE]``.

The document states the served model's limits (history length, horizon, variables and physical bounds), so it
is written for the model the store's CURRENT names (``KOVAE_MODEL_STORE``, default ``models``); a test keeps
both files equal to what a server of the committed default model serves. The YAML (the same document, for
readers and tools that prefer it) needs pyyaml, from the dev extra: the service itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.app import create_app
from service.registry import ReloadError
from service.settings import Settings


def spec() -> dict:
    app = create_app(Settings(poll_interval_s=0))
    app.state.registry.reload()
    return app.openapi()


def as_yaml(document: dict[str, Any]) -> str:
    """The document as YAML, keys in the JSON's order, every value written out (no anchors)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(document, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.openapi",
        description=__doc__.splitlines()[0] + " The document holds the limits of the model KOVAE_MODEL_STORE's "
        "CURRENT names (default: models).",
    )
    parser.add_argument("target", nargs="?", default="openapi.json", help="JSON file to write (default: openapi.json)")
    target = Path(parser.parse_args(argv).target)
    if target.suffix != ".json":  # the YAML goes beside it, under the same name: a .yaml target would be both
        parser.error(f"the target is the JSON file (its YAML is written beside it): {target} does not end in .json")
    if not target.parent.is_dir():
        parser.error(f"no folder {target.parent} to write {target.name} into")
    try:
        document = spec()
    except ReloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target.write_text(json.dumps(document, indent=2) + "\n")
    target.with_suffix(".yaml").write_text(as_yaml(document))
    print(f"wrote {target} and {target.with_suffix('.yaml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
