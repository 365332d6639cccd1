"""The HTTP server: the aiohttp application with every route (public,
admin, each adapter's), its listening socket, and the checks ``civic-gateway
run`` and ``demo`` make on the listen address before anything starts."""

from __future__ import annotations

import asyncio
import errno
import socket

from aiohttp import web

from gateway.problem import problem_middleware
from gateway.web import admin, routes
from gateway.web.view import GatewayView

RECEIVE_BUFFER = 64 * 1024
"""SO_RCVBUF of the connections the HTTP server accepts. The event loop reads
a connection up to 256 KiB at a time, whatever the request: with the kernel's
default (auto-tuned to megabytes), 500 clients that upload 1 MiB bodies and
stall made ~80 MiB appear in the gateway at once, before any handler could
refuse them; with 64 KiB, ~8 MiB. It still lets a 1 MiB body arrive in about a
second over a 100 ms path."""


def web_app(gw: GatewayView) -> web.Application:
    """The application ``Gateway.serve`` runs: the public routes, the admin
    API and every adapter's own routes, with problem documents for errors."""
    max_body = max((getattr(pc.adapter_config, "max_body", 0) for pc in gw.config.platforms.values()),
                   default=0)
    app = web.Application(client_max_size=max(max_body, 1024 * 1024) + 1024, middlewares=[problem_middleware])
    routes.add_routes(app, gw)
    admin.add_routes(app, gw)
    for adapter in gw.adapters.values():
        app.router.add_routes(adapter.routes())
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (``listening_socket``); returns the runner to clean up."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.SockSite(runner, listening_socket(host, port), backlog=1024)
        await site.start()
    except BaseException:  # e.g. the port was taken meanwhile: let go of what setup made
        await runner.cleanup()
        raise
    return runner


async def port_taken(host: str, port: int) -> bool:
    """Called by ``civic-gateway run`` and ``demo`` before anything starts (so
    a busy port is reported before the store opens and adapters connect): True
    if another socket holds ``host:port``. Binds the way aiohttp will, then
    lets go; the real bind can still lose a race, which its caller reports the
    same way. Other bind errors are left to the real bind to report."""
    if port == 0:
        return False
    try:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port, reuse_address=True)
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    server.close()
    await server.wait_closed()
    return False


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound, with ``RECEIVE_BUFFER`` (set before
    ``listen`` so that accepted connections inherit it and the TCP window
    scale is agreed accordingly)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def split_listen(listen: str) -> tuple[str, int]:
    """``[gateway] listen`` as (host, port); an empty host is 127.0.0.1."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)
