"""The gateway as one object: it only wires and runs the parts.

``Gateway(config)`` is what ``civic-gateway run`` starts and what tests start
in-process. It builds, from the configuration: the store, the adapters (each
handed an ``AdapterContext`` whose ``ingest`` is ``gateway.ingress``'s), the
delivery engine, the cluster and its bus when the store is shared, and the
HTTP server (``gateway.web``). Lifecycle: ``start()`` opens the store, builds
the pipeline, starts the adapters and pages undelivered work back in;
``serve()`` listens; ``stop()`` stops taking events, lets delivery record what
it finished, ends every background task and closes everything.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable, Sequence

from aiohttp import web

from gateway import registry
from gateway.adapter import Adapter, AdapterContext, BanRule, Followup, StoreState
from gateway.bus import Bus, LocalBus
from gateway.cluster import Cluster
from gateway.config import Config, validate_adapters
from gateway.delivery import DeliveryEngine
from gateway.housekeeping import Housekeeping, reload_now_and_then
from gateway.ids import PlatformName
from gateway.ingress import Ingress
from gateway.intake import BodyReader
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.policy import Policy
from gateway.router import Router
from gateway.store import Store, open_store
from gateway.store.base import OutboxItem
from gateway.tasks import TaskGroup
from gateway.web.server import serve, split_listen, web_app

log = logging.getLogger("civic.gateway")

INGEST_DRAIN_TIMEOUT = 10.0
"""Seconds ``stop`` waits for ingests under way (their events are being stored) before going on."""


class Gateway:
    def __init__(self, config: Config, *, find_adapter: Callable[[str], type[Adapter]] = registry.find) -> None:
        validate_adapters(config, find_adapter)
        self.config = config
        self.settings = config.gateway
        self.metrics = Metrics()
        self.tasks = TaskGroup()
        """Every background task of the core (delivery, cluster, chores); closed by ``stop``."""
        self.router = Router(config.links)
        self.store: Store = open_store(self.settings.database, synchronous=self.settings.synchronous)
        self.node = self.settings.node or f"{socket.gethostname()}-{split_listen(self.settings.listen)[1]}"
        self.cluster: Cluster | None = None  # set below when the store is shared
        self.adapters: dict[PlatformName, Adapter] = {}
        self.read_body = BodyReader(self.settings.body_budget, self.settings.body_timeout, self.metrics)
        self.ingress = Ingress(self.store, self.metrics, self.settings, self.hand_over)
        self.policy = Policy()
        """Bans, consent and imported ban rules (``gateway.policy.state``), shared with the pipeline."""
        self.platform_state: dict[PlatformName, tuple[bool, str]] = {}
        """Per platform: (up, why not), as its adapter last reported (``AdapterContext.set_up``)."""
        for name, pc in config.platforms.items():
            cls = find_adapter(pc.kind)
            self.adapters[name] = cls(AdapterContext(name=name, config=pc.adapter_config, ingest=self.ingress.ingest,
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
            self.ingress.cluster = self.cluster
        self.housekeeping = Housekeeping(self.store, self.metrics, self.ingress, self.adapters, self.cluster)
        self.metrics.store_up.set_function(lambda: 0 if self.store.unavailable() else 1)  # read at each scrape
        self._runner: web.AppRunner | None = None

    # -- what the ingress holds, as the HTTP side and tests read it --------------------------
    @property
    def ready(self) -> bool:
        """Whether events are taken now: from the end of ``start`` until ``stop`` begins."""
        return self.ingress.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.ingress.ready = value

    @property
    def pipeline(self) -> Pipeline | None:
        return self.ingress.pipeline

    @pipeline.setter
    def pipeline(self, value: Pipeline | None) -> None:
        self.ingress.pipeline = value

    @property
    def outbox_depth(self) -> int:
        return self.ingress.outbox_depth

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
        await self.policy.reload(self.store)  # keeps the ban rules adapters set before there was a pipeline
        self.pipeline = Pipeline(self.router, {n: a.capabilities for n, a in self.adapters.items()},
                                 bytes.fromhex(key), self.policy)
        self.store.on_retry = self.pipeline.invalidate
        self.metrics.dead_letters.set(await self.store.dead_letter_count())
        await self.housekeeping.refresh_depth()
        # Take events from here on: an adapter that starts may be handed a
        # backlog at once (an MQTT broker resends what was not acknowledged).
        self.ready = True
        for adapter in self.adapters.values():
            await adapter.start()
        if self.cluster is None:
            await self.delivery.start()
        else:
            await self.cluster.start()
            self.tasks.spawn(reload_now_and_then(self._reload_state), "cluster-state")
        self.tasks.spawn(self.housekeeping.run(), "housekeeping")
        log.info("gateway started", extra={"platforms": sorted(self.adapters), "links": len(self.router.links)})

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Start the HTTP server (after ``start``); returns its runner (``stop`` cleans it up)."""
        self._runner = await serve(web_app(self), host, port)
        return self._runner

    async def stop(self) -> None:
        """In the order that loses nothing: stop intake (the HTTP server, then
        the ingests under way finish), let delivery record what it finished and
        the cluster give its partitions back, end every background task, stop
        the adapters (their own tasks), close the store."""
        self.ready = False
        if self._runner is not None and self._runner.server is not None:  # not cleaned up by the caller
            await self._runner.cleanup()
        if (left := await self.ingress.drain(INGEST_DRAIN_TIMEOUT)):
            log.warning("stopping with %d ingests still under way; their senders will retry", left)
        await self.delivery.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.tasks.close()
        for adapter in self.adapters.values():
            await adapter.stop()
        await self.store.close()

    # -- what adapters and other nodes change ----------------------------------------------
    def set_ban_rules(self, platform: PlatformName, rules: Sequence[BanRule]) -> None:
        """Replace all the ban rules ``platform`` contributes (what its adapter's
        ``ctx.set_ban_rules`` calls). The rules of every platform together apply
        to what enters from any platform, from the next event on."""
        rules = tuple(rules)
        state = self.policy.set_rules(platform, rules)  # checks kinds before anything changes
        self.metrics.ban_rules.labels(platform).set(len(rules))
        log.info("platform %s now contributes %d ban rules (%d in all)", platform, len(rules),
                 len(state.ban_rules or ()),
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
        await self.policy.reload(self.store)  # a fresh PolicyState
        self.pipeline.invalidate()
