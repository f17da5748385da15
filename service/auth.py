"""API keys: what a caller presents, and whether it is one of the configured keys. The routes (``service.app``)
decide which keys each route wants; this only reads headers and compares."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.requests import Request

from service.problems import ProblemError

CHALLENGE = {"WWW-Authenticate": 'ApiKey realm="kovae-forecast", header="X-API-Key", Bearer realm="kovae-forecast"'}
"""A 401 names the schemes it takes (RFC 9110): the key in the X-API-Key header, or as a bearer token."""


def presented_keys(request: Request) -> list[str]:
    """The keys a caller sends: the X-API-Key header, and an ``Authorization: Bearer`` token (what a Prometheus,
    which cannot send other headers, scrapes a protected /metrics with); either may let it in. Whitespace around
    a header's value is no part of it (RFC 9110 5.5), in either header."""
    keys = [request.headers.get("x-api-key", "").strip()]
    parts = request.headers.get("authorization", "").split(None, 1)  # any whitespace after the scheme
    if len(parts) == 2 and parts[0].lower() == "bearer":
        keys.append(parts[1].strip())
    return [k for k in keys if k]


def key_ok(given: list[str], keys: list[SecretStr]) -> bool:
    """Constant-time comparison of every key given against every configured key."""
    ok = False
    for g in given:
        for key in keys:
            ok |= hmac.compare_digest(g.encode(), key.get_secret_value().encode())
    return ok


def require_key(request: Request, keys: list[SecretStr], which: str = "") -> None:
    """A 401 (with the challenge) unless the request presents one of ``keys``; ``which``: "admin " for the admin
    keys' wording."""
    if not key_ok(presented_keys(request), keys):
        detail = f"send a valid {which}X-API-Key header (or Authorization: Bearer <key>)"
        raise ProblemError(401, "Missing or invalid API key", detail=detail, headers=CHALLENGE)
