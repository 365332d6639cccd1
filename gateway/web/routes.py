"""The public HTTP routes: site events (dispatched to the platform's
adapter), ``/metrics``, ``/healthz``, ``/readyz`` and the public moderation
log. ``gateway.web.server.web_app`` adds them; each handler reads the running
gateway through ``GatewayView``."""

from __future__ import annotations

from aiohttp import web

from gateway import transparency
from gateway.ids import PlatformName
from gateway.ingress import STORE_RETRY_AFTER
from gateway.problem import problem
from gateway.web.view import GatewayView


def add_routes(app: web.Application, gw: GatewayView) -> None:
    """Called by ``gateway.web.server.web_app``: the public routes on ``app``."""
    routes = PublicRoutes(gw)
    app.router.add_post("/v1/platforms/{name}/events", routes.platform_events)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    app.router.add_get("/v1/moderation-log", routes.moderation_log)


class PublicRoutes:
    """The handlers, each reading the running gateway ``gw``."""

    def __init__(self, gw: GatewayView) -> None:
        self.gw = gw

    async def platform_events(self, request: web.Request) -> web.StreamResponse:
        """A site's events: handed to its platform's adapter."""
        adapter = self.gw.adapters.get(PlatformName(request.match_info["name"]))
        if adapter is None:
            return problem(404, f"unknown platform {request.match_info['name']!r}", "unknown-platform")
        return await adapter.handle_events(request)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.gw.metrics.render(), headers={"Content-Type": self.gw.metrics.content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready (200) while this node can take events: started, its store
        reachable, its cluster leases valid. A platform that is down (broker
        unreachable) does not make the node unready, since every node sees the
        same broker and other platforms still work: it is listed under
        ``platforms`` and sets ``degraded``. ``?strict`` makes a platform that
        is down answer 503 too (for monitors that read only the status)."""
        gw = self.gw
        store_error = gw.store.unavailable()
        ready = gw.ready and store_error is None and (gw.cluster is None or gw.cluster.healthy)
        platforms = {name: {"up": up, **({"reason": why} if not up else {})}
                     for name, (up, why) in sorted(gw.platform_state.items())}
        degraded = not all(up for up, _ in gw.platform_state.values())
        body: dict[str, object] = {"ready": ready, "degraded": degraded,
                                   "node": gw.node if gw.cluster else "embedded",
                                   "store": {"reachable": store_error is None,
                                             **({"error": store_error} if store_error else {})},
                                   "platforms": platforms,
                                   "queues": gw.delivery.owners(), "undelivered": gw.outbox_depth}
        if gw.cluster is not None:
            status = gw.cluster.status()
            try:  # the whole cluster's view: which node delivers which partition now
                owners = await gw.store.cluster_owners()
                status["owners"] = {str(part): node for part, node in owners.items()}
            except Exception as exc:  # the store is unreachable: say so, and the leases will tell
                status["owners_error"] = str(exc) or type(exc).__name__
            body["cluster"] = status
        ok = ready and not (degraded and "strict" in request.query)
        headers = {} if ok else {"Retry-After": str(STORE_RETRY_AFTER)}
        return web.json_response(body, status=200 if ok else 503, headers=headers)

    async def moderation_log(self, request: web.Request) -> web.Response:
        """The public transparency log: every moderation action the gateway carried,
        each person in it only as their identity level allows (``gateway.transparency``)."""
        try:
            after = int(request.query.get("after", "0"))
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return problem(400, "after and limit are whole numbers", "bad-query")
        entries = await self.gw.store.moderation_log(after, limit, request.query.get("link"))
        return web.json_response({"entries": [transparency.public(e) for e in entries]})
