"""Several nodes as one gateway: who delivers which target group.

Target groups are spread over ``partitions`` (a stable hash of platform and
group). Each partition is owned by one node at a time through a lease in the
shared store (``Store.cluster_tick``): a node renews its leases every tick,
takes a fair share of the free or expired ones and gives back what is above
its share, so a node that joins gets work and a node that dies loses its
partitions when its leases expire (``lease_ttl``, 5 s by default; with a tick
of a quarter of that, its groups move within about 6 s).

Any node accepts ingress (the shared store deduplicates). After an ingress
transaction commits, the node *wakes* each target group it touched: itself
for the groups it owns, the owner over the bus otherwise. The owner pages the
group's undelivered rows from the store in commit order (see the PostgreSQL
store's outbox horizon) and delivers them, one batch in flight per group, so
order holds per group across nodes. Hints can be lost; every node also polls
the store for its groups each ``POLL_INTERVAL``.

A node that cannot renew its leases in time (the store unreachable, the node
stalled) stops delivering before its leases can have expired, so two nodes
deliver the same group at the same time only for the length of one batch in
flight; a redelivery carries the same event id, which sites drop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable, Iterable

import msgspec

from gateway.bus import STATE, WAKE, Bus
from gateway.delivery import DeliveryEngine
from gateway.ids import GroupId, GroupRef, PlatformName
from gateway.metrics import Metrics
from gateway.store.base import Store, StoreUnavailable
from gateway.tasks import TaskGroup

log = logging.getLogger("civic.cluster")

POLL_INTERVAL = 1.0
"""Seconds between two looks at the store for undelivered work of owned groups."""

_wake_codec = msgspec.msgpack.Encoder()
_wake_decoder = msgspec.msgpack.Decoder(list[tuple[str, str]])


def partition_of(target: GroupRef, partitions: int) -> int:
    """The partition of a target group: the same on every node and across restarts."""
    return zlib.crc32(f"{target.platform}\x00{target.group}".encode()) % partitions


class Cluster:
    def __init__(self, node: str, store: Store, bus: Bus, delivery: DeliveryEngine, metrics: Metrics,
                 tasks: TaskGroup, *, partitions: int, lease_ttl: float,
                 on_state: Callable[[], None]) -> None:
        self.node = node
        self.store = store
        self.bus = bus
        self.delivery = delivery
        self.metrics = metrics
        self.tasks = tasks
        self.partitions = partitions
        self.lease_ttl = lease_ttl
        self.tick_interval = max(0.25, lease_ttl / 4)
        self.on_state = on_state
        self.owned: frozenset[int] = frozenset()
        self.nodes: tuple[str, ...] = ()
        self._valid_until = 0.0  # monotonic: past this, leases may have expired
        self._pending_wakes: set[GroupRef] = set()
        self._flush_scheduled = False
        self.last_tick_error: str | None = None
        bus.subscribe(WAKE, self._on_wake)
        bus.subscribe(STATE, self._on_state)
        bus.on_connect = self._on_bus_connect

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.delivery.owns = self.owns
        await self._tick()
        await self.bus.start()
        self.tasks.spawn(self._ticks(), "cluster-leases")
        self.tasks.spawn(self._polls(), "cluster-poll")

    async def stop(self) -> None:
        """Give the partitions back at once (a clean shutdown, no waiting for expiry)."""
        self.owned = frozenset()
        try:
            await self.store.cluster_leave(self.node)
        except Exception as exc:  # the store is gone: the leases expire by themselves
            log.warning("could not release leases: %s", exc)
        await self.bus.stop()

    @property
    def healthy(self) -> bool:
        return time.monotonic() < self._valid_until

    def leads(self, key: str) -> bool:
        """Whether this node holds the one-at-a-time work named ``key`` (same leases as the groups)."""
        return (zlib.crc32(f"lead\x00{key}".encode()) % self.partitions in self.owned
                and time.monotonic() < self._valid_until)

    def owns(self, target: GroupRef) -> bool:
        return partition_of(target, self.partitions) in self.owned and time.monotonic() < self._valid_until

    # -- leases ------------------------------------------------------------------------------
    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            if time.monotonic() >= self._valid_until and self.owned:
                log.warning("leases not renewed in time; stopping delivery of %d partitions", len(self.owned))
                self._set_owned(frozenset())
            await self._tick()

    async def _tick(self) -> None:
        started = time.monotonic()
        try:
            view = await self.store.cluster_tick(self.node, self.partitions, self.lease_ttl)
        except Exception as exc:
            self.last_tick_error = str(exc) or type(exc).__name__
            # An unreachable store was logged once by the store; the leases lapse and the log says so.
            (log.debug if isinstance(exc, StoreUnavailable) else log.warning)(
                "lease renewal failed: %s", self.last_tick_error)
            return
        self.last_tick_error = None
        # The leases run from the database's clock at the tick; measured from
        # before the call, with a margin, they are still ours until then.
        self._valid_until = started + self.lease_ttl * 0.8
        self.nodes = view.nodes
        gained = view.owned - self.owned
        self._set_owned(view.owned)
        self.metrics.cluster_nodes.set(len(view.nodes))
        if gained:
            log.info("node %s now owns %d partitions (+%d); nodes: %s", self.node, len(view.owned), len(gained),
                     ", ".join(view.nodes))
            await self._look(lambda t: partition_of(t, self.partitions) in gained)

    def _set_owned(self, owned: frozenset[int]) -> None:
        lost = self.owned - owned
        self.owned = owned
        self.metrics.partitions_owned.set(len(owned))
        if lost:
            log.info("node %s gave up %d partitions", self.node, len(lost))
            self.delivery.release(lambda t: partition_of(t, self.partitions) in lost)

    # -- finding work ---------------------------------------------------------------------
    async def _polls(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self._look(self.owns)
            except Exception as exc:
                (log.debug if isinstance(exc, StoreUnavailable) else log.warning)("polling the outbox failed: %s", exc)

    async def _look(self, which: Callable[[GroupRef], bool]) -> None:
        for target in await self.store.outbox_groups():
            if which(target) and self.owns(target):
                self.delivery.wake(target)

    def _on_bus_connect(self) -> None:
        self.tasks.spawn(self._look(self.owns), "cluster-look")

    # -- hints ----------------------------------------------------------------------------------
    def announce(self, targets: Iterable[GroupRef]) -> None:
        """New rows are committed for these target groups: wake their owners."""
        for t in targets:
            if self.owns(t):
                self.delivery.wake(t)
            else:
                self._pending_wakes.add(t)
        if self._pending_wakes and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_wakes)

    def _flush_wakes(self) -> None:
        self._flush_scheduled = False
        wakes, self._pending_wakes = self._pending_wakes, set()
        self.bus.publish(WAKE, _wake_codec.encode([(t.platform, t.group) for t in wakes]))

    def _on_wake(self, payload: bytes) -> None:
        try:
            targets = _wake_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed wake hint (%d bytes)", len(payload))
            return
        for platform, group in targets:
            t = GroupRef(PlatformName(platform), GroupId(group))
            if self.owns(t):
                self.delivery.wake(t)

    def state_changed(self) -> None:
        """Bans, consent or account mappings changed here: the other nodes reload theirs."""
        self.bus.publish(STATE, b"")

    def _on_state(self, payload: bytes) -> None:
        self.on_state()

    def status(self) -> dict[str, object]:
        return {"node": self.node, "partitions": self.partitions, "owned": sorted(self.owned),
                "nodes": list(self.nodes), "bus_connected": self.bus.connected,
                "leases_valid": self.healthy, "last_error": self.last_tick_error}
