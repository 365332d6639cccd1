"""Error answers as RFC 9457 problem documents (``application/problem+json``).

Every error answer of the site API (``/v1/platforms/{name}/events``), the
admin API and ``/v1/moderation-log`` is one: ``type`` (a URI naming the kind
of problem, ``about:blank`` when the status says it all), ``title`` (the same
for every problem of that type), ``status``, ``detail`` (this occurrence, in
words) and extension members: ``error`` (the same sentence as ``detail``,
kept for clients written before problem documents), ``field`` (the JSON path
of the offending value inside the event, e.g. ``$.data.author.id``) and
``index`` (the event's position in a batch) where there is one. The
middleware does the same for what the router refuses (404, 405) and for any
``HTTPException`` a handler raises. docs/webhook.md lists the types.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

CONTENT_TYPE = "application/problem+json"
BASE = "urn:civic-gateway:problem:"
TITLES = {
    "invalid-event": "The event does not match the schema",
    "malformed-json": "The body is not valid JSON",
    "bad-signature": "The request is not signed by the platform's secret",
    "body-too-large": "The body is larger than the gateway accepts",
    "body-timeout": "The body did not arrive in time",
    "busy": "The gateway is busy; retry after the Retry-After seconds",
    "unsupported-media-type": "Wrong Content-Type",
    "unknown-platform": "No platform of that name",
    "bad-query": "A query parameter is not valid",
    "unauthorized": "Missing or wrong bearer token",
    "invalid-request": "The request body is not valid",
}
"""The problem types the gateway uses, by their last part (``urn:civic-gateway:problem:<name>``)."""


def problem(status: int, detail: str, kind: str | None = None, *, headers: Mapping[str, str] | None = None,
            **extra: Any) -> web.Response:
    """The answer for one problem. ``kind`` is a key of ``TITLES`` (None:
    ``about:blank`` with the status's reason phrase as title); ``extra``
    members with a None value are left out."""
    doc: dict[str, Any] = {
        "type": BASE + kind if kind else "about:blank",
        "title": TITLES[kind] if kind else _reason(status),
        "status": status,
        "detail": detail,
        "error": detail,
    }
    doc.update((k, v) for k, v in extra.items() if v is not None)
    return web.Response(body=orjson.dumps(doc), status=status, content_type=CONTENT_TYPE, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn an ``HTTPException`` with an error status (the router's 404 and
    405, aiohttp's own 413 from ``client_max_size``) into a problem document,
    keeping its headers (``Allow`` of a 405)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            detail = f"nothing is served at {request.path}"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
        else:
            detail = exc.text or exc.reason
            if detail.startswith(f"{exc.status}: "):  # aiohttp's default text
                detail = detail[len(f"{exc.status}: "):]
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return problem(exc.status, detail, headers=keep)
