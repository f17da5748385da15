"""Write the app's OpenAPI document to openapi.json: ``python -m service.openapi [FILE]``.

The document states the served model's limits (history length, horizon, variables and physical bounds), so it
is written for the model the store's CURRENT names (``KOVAE_MODEL_STORE``, default ``models``); a test keeps
it equal to what a server of the committed default model serves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.app import create_app
from service.settings import Settings


def spec() -> dict:
    app = create_app(Settings(poll_interval_s=0))
    app.state.registry.reload()
    return app.openapi()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="openapi.json", help="file to write (default: openapi.json)")
    target = Path(parser.parse_args(argv).target)
    target.write_text(json.dumps(spec(), indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
