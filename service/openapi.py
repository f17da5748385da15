"""Write the app's OpenAPI document to openapi.yaml: ``python -m service.openapi``.

The file is JSON, which is valid YAML 1.2, so no YAML library is needed; a test keeps it equal to what the
running app serves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings


def spec() -> dict:
    return create_app(Settings(poll_interval_s=0)).openapi()


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "openapi.yaml")
    target.write_text(json.dumps(spec(), indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
