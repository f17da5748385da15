"""Write the app's OpenAPI document to openapi.json: ``python -m service.openapi [FILE]``.

The document states the served model's limits (history length, horizon, variables and physical bounds), so it
is written for the model the store's CURRENT names (``KOVAE_MODEL_STORE``, default ``models``); a test keeps
it equal to what a server of the committed default model serves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings


def spec() -> dict:
    app = create_app(Settings(poll_interval_s=0))
    app.state.registry.reload()
    return app.openapi()


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "openapi.json")
    target.write_text(json.dumps(spec(), indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
