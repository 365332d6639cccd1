"""The gateway as one object: store, pipeline, delivery, adapters, HTTP server.

``Gateway(config)`` is what ``civic-gateway run`` starts and what tests start
in-process. Lifecycle: ``start()`` opens the store, creates the adapters,
pages undelivered work back in and starts serving; ``stop()`` stops taking
traffic, lets delivery wind down and closes everything.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence

from aiohttp import web

from gateway import admin, registry, transparency
from gateway.adapter import Adapter, AdapterContext, BanRule, Followup, Inbound, IngestResult, Overloaded, StoreState
from gateway.bus import Bus, LocalBus
from gateway.cluster import Cluster
from gateway.config import Config, validate_adapters
from gateway.delivery import DeliveryEngine
from gateway.ids import PlatformName
from gateway.intake import BodyReader, release_memory
from gateway.metrics import Metrics
from gateway.pipeline import ECHO_WINDOW, Pipeline
from gateway.policy import BanRules
from gateway.problem import problem, problem_middleware
from gateway.router import Router
from gateway.store import Store, open_store
from gateway.store.base import OutboxItem, StoreUnavailable
from gateway.tasks import TaskGroup

log = logging.getLogger("civic.gateway")

STORE_BACKLOG_LIMIT = 5000
"""Transactions waiting for the store above which ingress answers 503."""
PROCESSED_RETENTION = 14 * 86400.0
"""How long inbound event ids are remembered (longer than any sender retries)."""
STATE_TYPES = frozenset({"civic.moderation.action", "civic.membership.changed", "civic.profile.updated",
                         "civic.account.moved"})
"""Event types that can change bans, consent or account mappings (other nodes reload theirs)."""
MEMORY_RELEASE_INTERVAL = 10.0
"""Seconds between hand-backs of freed memory to the system (``gateway.intake.release_memory``):
after a crowd of refused uploads the gateway shrinks back within about this time."""
STATE_RELOAD_INTERVAL = 30.0
"""Seconds between reloads of bans and consent in a cluster, whatever the bus said."""
STORE_RETRY_AFTER = 5
"""Retry-After (seconds) of the 503 intake answers while the store is unreachable."""
UNLINKED_WARN_MAX = 10_000
"""Groups no link names that are each warned about once; past this many, no more."""


class Gateway:
    def __init__(self, config: Config, *, find_adapter: Callable[[str], type[Adapter]] = registry.find) -> None:
        validate_adapters(config, find_adapter)
        self.config = config
        self.settings = config.gateway
        self.metrics = Metrics()
        self.tasks = TaskGroup()
        self.router = Router(config.links)
        self.store: Store = open_store(self.settings.database, synchronous=self.settings.synchronous)
        self.node = self.settings.node or f"{socket.gethostname()}-{split_listen(self.settings.listen)[1]}"
        self.cluster: Cluster | None = None  # set below when the store is shared
        self.adapters: dict[PlatformName, Adapter] = {}
        self.read_body = BodyReader(self.settings.body_budget, self.settings.body_timeout, self.metrics)
        self.pipeline: Pipeline | None = None
        self._ban_rules: dict[PlatformName, tuple[BanRule, ...]] = {}
        self._ban_matcher: BanRules | None = None
        self.platform_state: dict[PlatformName, tuple[bool, str]] = {}
        """Per platform: (up, why not), as its adapter last reported (``AdapterContext.set_up``)."""
        self._unlinked_warned: set[tuple[str, str]] = set()
        for name, pc in config.platforms.items():
            cls = find_adapter(pc.kind)
            self.adapters[name] = cls(AdapterContext(name=name, config=pc.adapter_config, ingest=self.ingest,
                                                     metrics=self.metrics, gateway_source=self.settings.source,
                                                     node=self.node, leads=self._leads,
                                                     state=StoreState(self.store, name),
                                                     set_ban_rules=functools.partial(self.set_ban_rules, name),
                                                     read_body=self.read_body,
                                                     groups=tuple(g.group for g in self.router.groups()
                                                                  if g.platform == name),
                                                     set_up=functools.partial(self.set_platform_up, name),
                                                     send=functools.partial(self._send_own, name)))
            if name not in self.platform_state:
                self.set_platform_up(name, True, "")
        self.delivery = DeliveryEngine(self.store, self.adapters, self.metrics, self.tasks,
                                       retry_max_delay=self.settings.retry_max_delay,
                                       retry_max_age=self.settings.retry_max_age)
        self.delivery.hand_over = self.hand_over  # follow-ups of deliveries: to their groups' owners
        # A shared (PostgreSQL) store means ownership by lease and wake-ups by
        # bus, even for one node: rows are delivered in the store's commit order.
        if self.settings.database.startswith(("postgresql://", "postgres://")):
            bus: Bus
            if self.settings.bus == "local":
                bus = LocalBus()
            else:
                from gateway.bus_mqtt import MqttBus

                bus = MqttBus(self.settings.bus, self.node)
            self.cluster = Cluster(self.node, self.store, bus, self.delivery, self.metrics, self.tasks,
                                   partitions=self.settings.partitions, lease_ttl=self.settings.lease_ttl,
                                   on_state=self._state_changed_elsewhere)
        self.metrics.store_up.set_function(lambda: 0 if self.store.unavailable() else 1)  # read at each scrape
        self.ready = False
        self._outbox_depth = 0
        self._runner: web.AppRunner | None = None

    # -- ingress --------------------------------------------------------------------------
    async def ingest(self, events: Sequence[Inbound]) -> IngestResult:
        """Store ``events`` durably (deduplicated, routed, queued) and hand the
        new outbox rows to delivery. Called by adapters; raises ``Overloaded``."""
        if not self.ready or self.pipeline is None:
            raise Overloaded(503, 5, "the gateway is starting")
        if (why := self.store.unavailable()) is not None:
            raise Overloaded(503, STORE_RETRY_AFTER, f"the gateway's database is unreachable ({why}); retry later")
        if self.store.backlog() > STORE_BACKLOG_LIMIT:
            raise Overloaded(503, 1, "the store is busy; retry shortly")
        if self._outbox_depth > self.settings.max_backlog:
            raise Overloaded(429, 30, "too many undelivered events; retry later")
        pipeline = self.pipeline
        # On the loop: handing batches to threads to sanitise looked cheaper, but
        # the threads' Python parts fought the loop for the GIL (batch relay
        # 14k -> 9k msg/s under py-spy); nh3 takes about 4 us a message.
        prepared = [pipeline.prepare(e) for e in events]
        try:
            outcomes = await self.store.transact(lambda tx: [pipeline.apply(tx, e) for e in prepared])
        except StoreUnavailable as exc:  # not stored (or, cut at its commit, stored once: a retry is a duplicate)
            pipeline.invalidate()
            raise Overloaded(503, STORE_RETRY_AFTER, f"the gateway's database is unreachable ({exc}); "
                                                     "retry later") from None
        except Exception:
            pipeline.invalidate()
            raise
        accepted = duplicates = 0
        counts: Counter[tuple[str, str, str]] = Counter()
        items = []
        statuses = []
        for ev, out in zip(prepared, outcomes):
            if out.status == "duplicate":
                duplicates += 1
                counts["dropped", ev.platform, "duplicate"] += 1
                statuses.append("duplicate")
                continue
            accepted += 1
            counts["in", ev.platform, ev.type] += 1
            statuses.append("accepted" if out.status == "accepted" else out.reason or "dropped")
            if out.status == "dropped":
                counts["dropped", ev.platform, out.reason or "unknown"] += 1
                if out.reason == "unlinked":
                    self._warn_unlinked(ev.platform, ev.group)
            for reason in out.degraded:
                counts["degraded", reason, ""] += 1
            items.extend(out.items)
        if items:
            self._outbox_depth += len(items)
            self.hand_over(items)
        if self.cluster is not None and any(ev.type in STATE_TYPES for ev in prepared):
            self.cluster.state_changed()
        m = self.metrics
        for (kind, a, b), n in counts.items():
            if kind == "in":
                m.events_in.labels(a, b).inc(n)
            elif kind == "dropped":
                m.dropped.labels(a, b).inc(n)
            else:
                m.degraded.labels(a).inc(n)
        return IngestResult(accepted=accepted, duplicates=duplicates, outcomes=tuple(statuses))

    def _warn_unlinked(self, platform: str, group: str) -> None:
        """Once per group: its events are dropped because no link names it
        (a typo in the config, or a group the site should not send)."""
        key = (platform, group)
        if key in self._unlinked_warned or len(self._unlinked_warned) > UNLINKED_WARN_MAX:
            return
        self._unlinked_warned.add(key)
        if len(self._unlinked_warned) > UNLINKED_WARN_MAX:
            log.warning("more than %d groups that no link names sent events; not naming more of them",
                        UNLINKED_WARN_MAX)
            return
        log.warning("events of %s group %r are dropped: no link names that group (counted in"
                    " civic_dropped_total{reason=\"unlinked\"}; warned once)", platform, group,
                    extra={"platform": platform, "group": group, "reason": "unlinked"})

    def set_platform_up(self, platform: PlatformName, up: bool, reason: str = "") -> None:
        """What an adapter's ``ctx.set_up`` calls: record whether ``platform``
        can move events now, for ``/readyz`` and ``civic_platform_up``; log changes."""
        reason = "" if up else (reason or "down")
        before = self.platform_state.get(platform)
        self.platform_state[platform] = (up, reason)
        self.metrics.platform_up.labels(platform).set(1 if up else 0)
        if before is None or before == (up, reason):
            return
        if up:
            log.info("platform %s is up again", platform, extra={"platform": platform})
        elif before[0]:
            log.warning("platform %s is down: %s", platform, reason, extra={"platform": platform, "reason": reason})

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        key = await self.store.setting("ghost_key", lambda: os.urandom(32).hex())
        bans = await self.store.bans()
        self.pipeline = Pipeline(self.router, {n: a.capabilities for n, a in self.adapters.items()},
                                 bytes.fromhex(key), bans, await self.store.withdrawn())
        self.pipeline.set_ban_rules(self._ban_matcher)  # what adapters set before there was a pipeline
        self.store.on_retry = self.pipeline.invalidate
        self.metrics.dead_letters.set(await self.store.dead_letter_count())
        await self._refresh_depth()
        # Take events from here on: an adapter that starts may be handed a
        # backlog at once (an MQTT broker resends what was not acknowledged).
        self.ready = True
        for adapter in self.adapters.values():
            await adapter.start()
        if self.cluster is None:
            await self.delivery.start()
        else:
            await self.cluster.start()
            self.tasks.spawn(self._reload_state_now_and_then(), "cluster-state")
        self.tasks.spawn(self._housekeeping(), "housekeeping")
        log.info("gateway started", extra={"platforms": sorted(self.adapters), "links": len(self.router.links)})

    async def stop(self) -> None:
        self.ready = False
        await self.delivery.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.tasks.close()
        for adapter in self.adapters.values():
            await adapter.stop()
        await self.store.close()

    async def _refresh_depth(self) -> None:
        counts = await self.store.outbox_counts()
        self._outbox_depth = sum(counts.values())
        for name in self.adapters:
            self.metrics.queue_depth.labels(name).set(counts.get(name, 0))

    def set_ban_rules(self, platform: PlatformName, rules: Sequence[BanRule]) -> None:
        """Replace all the ban rules ``platform`` contributes (what its adapter's
        ``ctx.set_ban_rules`` calls). The rules of every platform together apply
        to what enters from any platform, from the next event on."""
        rules = tuple(rules)
        matcher = BanRules(r for rs in {**self._ban_rules, platform: rules}.values() for r in rs)  # checks kinds
        if rules:
            self._ban_rules[platform] = rules
        else:
            self._ban_rules.pop(platform, None)
        self._ban_matcher = matcher if matcher else None
        if self.pipeline is not None:
            self.pipeline.set_ban_rules(self._ban_matcher)
        self.metrics.ban_rules.labels(platform).set(len(rules))
        log.info("platform %s now contributes %d ban rules (%d in all)", platform, len(rules), len(matcher),
                 extra={"platform": platform, "ban_rules": len(rules)})

    def _leads(self, key: str) -> bool:
        return self.cluster is None or self.cluster.leads(key)

    def hand_over(self, items: Sequence[OutboxItem]) -> None:
        """Committed outbox rows go to delivery: straight into the queues of one
        process, or as a wake-up to each group's owner in a cluster."""
        if self.cluster is None:
            self.delivery.submit(items)
        else:
            self.cluster.announce({item.target for item in items})

    async def _send_own(self, platform: PlatformName, followups: Sequence[Followup]) -> None:
        await self.delivery.send(platform, followups)  # AdapterContext.send

    def _state_changed_elsewhere(self) -> None:
        self.tasks.spawn(self._reload_state(), "reload-state")

    async def _reload_state(self) -> None:
        """Another node changed bans, consent or account mappings: take the store's."""
        if self.pipeline is None:
            return
        bans, withdrawn = await self.store.bans(), await self.store.withdrawn()
        self.pipeline.bans = bans
        self.pipeline.withdrawn = withdrawn
        self.pipeline.invalidate()

    async def _reload_state_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(STATE_RELOAD_INTERVAL)
            try:
                await self._reload_state()
            except Exception as exc:
                log.warning("reloading bans and consent failed: %s", exc)

    async def _housekeeping(self) -> None:
        last_prune = last_fingerprints = last_trim = 0.0
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._refresh_depth()
                if release_memory is not None and time.time() - last_trim > MEMORY_RELEASE_INTERVAL:
                    last_trim = time.time()
                    release_memory()
                if self.cluster is not None:
                    self.metrics.bus_connected.set(1 if self.cluster.bus.connected else 0)
                if time.time() - last_fingerprints > 60:
                    last_fingerprints = time.time()
                    await self.store.prune_fingerprints(time.time() - ECHO_WINDOW)
                if time.time() - last_prune > 3600:
                    last_prune = time.time()
                    pruned = await self.store.prune_processed(time.time() - PROCESSED_RETENTION)
                    if pruned:
                        log.info("forgot %d old inbound event ids", pruned)
            except StoreUnavailable:
                pass  # the store logged the outage once; /readyz says so
            except Exception:
                log.exception("housekeeping failed")

    # -- HTTP ----------------------------------------------------------------------------------
    def web_app(self) -> web.Application:
        max_body = max((getattr(pc.adapter_config, "max_body", 0) for pc in self.config.platforms.values()),
                       default=0)
        app = web.Application(client_max_size=max(max_body, 1024 * 1024) + 1024, middlewares=[problem_middleware])
        app.router.add_post("/v1/platforms/{name}/events", self._platform_events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/moderation-log", self._moderation_log)
        admin.add_routes(app, self)
        for adapter in self.adapters.values():
            app.router.add_routes(adapter.routes())
        return app

    async def _platform_events(self, request: web.Request) -> web.StreamResponse:
        adapter = self.adapters.get(PlatformName(request.match_info["name"]))
        if adapter is None:
            return problem(404, f"unknown platform {request.match_info['name']!r}", "unknown-platform")
        return await adapter.handle_events(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready (200) while this node can take events: started, its store
        reachable, its cluster leases valid. A platform that is down (broker
        unreachable) does not make the node unready, since every node sees the
        same broker and other platforms still work: it is listed under
        ``platforms`` and sets ``degraded``. ``?strict`` makes a platform that
        is down answer 503 too (for monitors that read only the status)."""
        store_error = self.store.unavailable()
        ready = self.ready and store_error is None and (self.cluster is None or self.cluster.healthy)
        platforms = {name: {"up": up, **({"reason": why} if not up else {})}
                     for name, (up, why) in sorted(self.platform_state.items())}
        degraded = not all(up for up, _ in self.platform_state.values())
        body: dict[str, object] = {"ready": ready, "degraded": degraded,
                                   "node": self.node if self.cluster else "embedded",
                                   "store": {"reachable": store_error is None,
                                             **({"error": store_error} if store_error else {})},
                                   "platforms": platforms,
                                   "queues": self.delivery.owners(), "undelivered": self._outbox_depth}
        if self.cluster is not None:
            status = self.cluster.status()
            try:  # the whole cluster's view: which node delivers which partition now
                owners = await self.store.cluster_owners()
                status["owners"] = {str(part): node for part, node in owners.items()}
            except Exception as exc:  # the store is unreachable: say so, and the leases will tell
                status["owners_error"] = str(exc) or type(exc).__name__
            body["cluster"] = status
        ok = ready and not (degraded and "strict" in request.query)
        headers = {} if ok else {"Retry-After": str(STORE_RETRY_AFTER)}
        return web.json_response(body, status=200 if ok else 503, headers=headers)

    async def _moderation_log(self, request: web.Request) -> web.Response:
        """The public transparency log: every moderation action the gateway carried,
        each person in it only as their identity level allows (``gateway.transparency``)."""
        try:
            after = int(request.query.get("after", "0"))
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return problem(400, "after and limit are whole numbers", "bad-query")
        entries = await self.store.moderation_log(after, limit, request.query.get("link"))
        return web.json_response({"entries": [transparency.public(e) for e in entries]})

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Start the HTTP server (after ``start``); returns the runner to clean up."""
        runner = web.AppRunner(self.web_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, listening_socket(host, port), backlog=1024)
        await site.start()
        self._runner = runner
        return runner

    def check_admin(self, request: web.Request) -> bool:
        token = self.settings.admin_token
        if not token:
            return False
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


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


RECEIVE_BUFFER = 64 * 1024
"""SO_RCVBUF of the connections the HTTP server accepts. The event loop reads
a connection up to 256 KiB at a time, whatever the request: with the kernel's
default (auto-tuned to megabytes), 500 clients that upload 1 MiB bodies and
stall made ~80 MiB appear in the gateway at once, before any handler could
refuse them; with 64 KiB, ~8 MiB. It still lets a 1 MiB body arrive in about a
second over a 100 ms path."""


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
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)
