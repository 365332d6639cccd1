"""The operator's admin API under ``/admin/v1``, guarded by ``admin_token``.

GET  /admin/v1/links                    the configured links
GET  /admin/v1/status                   queues, undelivered and dead-letter counts
GET  /admin/v1/dead-letters?after=&limit=   dead letters, oldest first, with the error
POST /admin/v1/dead-letters/replay      body {"seqs": [..]} or {} for all: back to their queues
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from aiohttp import web

from gateway.intake import BodyError
from gateway.problem import problem
from gateway.web.view import GatewayView


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


REPLAY_MAX_BODY = 1024 * 1024
"""Largest replay request read (a list of sequence numbers)."""


def _path_of(message: str) -> str | None:
    """The JSON path a msgspec error names (``... - at `$.seqs[0]```), if any."""
    _, sep, path = message.rpartition(" - at `")
    return path.rstrip("`") if sep else None


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    seqs: list[int] | None = None


def authorized(token: str | None, request: web.Request) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (never, without a token)."""
    if not token:
        return False
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def add_routes(app: web.Application, gw: GatewayView) -> None:
    """Called by ``gateway.web.server.web_app``: the admin routes on ``app``."""
    def guarded(handler: Any) -> Any:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            if not gw.settings.admin_token:
                return problem(404, "the admin API is off: set [gateway] admin_token")
            if not authorized(gw.settings.admin_token, request):
                return problem(401, "missing or wrong bearer token", "unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        return wrapper

    async def links(request: web.Request) -> web.Response:
        return web.json_response({"links": [
            {"name": link.name, "moderation": link.moderation, "reactions": link.reactions,
             "groups": [{"platform": g.platform, "group": g.group} for g in link.groups]}
            for link in gw.router.links]})

    async def status(request: web.Request) -> web.Response:
        counts = await gw.store.outbox_counts()
        return web.json_response({"ready": gw.ready, "undelivered": counts,
                                  "dead_letters": await gw.store.dead_letter_count(),
                                  "queues": gw.delivery.owners()})

    async def dead_letters(request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return problem(400, "after and limit are whole numbers", "bad-query")
        rows = await gw.store.dead_letters(after, limit)
        return web.json_response({"dead_letters": [{
            "seq": d.item.seq, "platform": d.item.target.platform, "group": d.item.target.group,
            "event_id": d.item.event_id, "type": d.item.type, "origin": d.item.origin,
            "created": d.item.created, "error": d.error, "attempts": d.attempts, "failed_at": d.failed_at,
            "data": to_builtins(d.item.payload()),
        } for d in rows]})

    async def replay(request: web.Request) -> web.Response:
        try:
            body = await gw.read_body(request, REPLAY_MAX_BODY)
        except BodyError as exc:
            return problem(exc.status, str(exc), headers=exc.headers)
        try:
            req = msgspec.json.decode(body, type=ReplayRequest) if body.strip() else ReplayRequest()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return problem(400, f"bad request body: {exc}", "invalid-request", field=_path_of(str(exc)))
        items = await gw.store.replay(req.seqs)
        gw.hand_over(items)
        gw.metrics.dead_letters.set(await gw.store.dead_letter_count())
        return web.json_response({"replayed": len(items)})

    app.router.add_get("/admin/v1/links", guarded(links))
    app.router.add_get("/admin/v1/status", guarded(status))
    app.router.add_get("/admin/v1/dead-letters", guarded(dead_letters))
    app.router.add_post("/admin/v1/dead-letters/replay", guarded(replay))
