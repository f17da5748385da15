"""Client mistakes as RFC 9457 problem+json, with the fields at fault named and the list of them bounded.

However many values of a request are wrong, an answer lists the first ``LISTED`` problems and counts the rest:
a body of a million bad values must not come back as a million error objects (it did: 533 MB).
"""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"
LISTED = 20
"""Problems listed in one answer; ``error_count`` gives how many there were."""


class Errors:
    """Collects a request's problems: keeps the first ``LISTED``, counts them all."""

    def __init__(self) -> None:
        self.listed: list[dict[str, str]] = []
        self.count = 0

    def add(self, field: str, message: str) -> None:
        self.count += 1
        if len(self.listed) < LISTED:
            self.listed.append({"field": field, "message": message})

    def __len__(self) -> int:
        return self.count

    def raise_if_any(self, title: str = "Invalid forecast request") -> None:
        if self.count:
            raise ProblemError(422, title, self.listed, count=self.count)


class ProblemError(Exception):
    """A client mistake, answered as problem+json with ``status``; ``errors`` name the fields (at most
    ``LISTED`` of ``count``), ``headers`` go on the answer (e.g. WWW-Authenticate on a 401)."""

    def __init__(
        self,
        status: int,
        title: str,
        errors: list[dict[str, str]] | None = None,
        detail: str = "",
        *,
        count: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(title)
        self.status, self.title = status, title
        self.errors = (errors or [])[:LISTED]
        self.count = max(count or 0, len(errors or []))
        self.headers = headers or {}
        self.detail = detail or summary(self.errors, self.count) or title


def summary(errors: list[dict[str, str]], count: int) -> str:
    """One line naming the listed problems, and how many more there were."""
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    more = count - len(errors)
    return f"{text} (and {more} more problems)" if more > 0 else text


def problem_body(
    status: int, title: str, detail: str, instance: str, request_id: str, errors: list | None = None, count: int = 0
) -> dict[str, Any]:
    """The problem document; with ``errors``, ``error_count`` says how many problems there were in all."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail or title}
    body["instance"] = instance
    body["request_id"] = request_id
    if errors:
        body["errors"] = errors
        body["error_count"] = max(count, len(errors))
    return body
