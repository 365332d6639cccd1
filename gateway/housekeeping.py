"""The gateway's periodic chores, each a loop the runtime spawns in its task
group at start (and the group cancels at stop): recount the undelivered rows,
hand freed memory back, forget old echo fingerprints and inbound event ids,
and in a cluster reload bans and consent now and then whatever the bus said.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from gateway.intake import release_memory
from gateway.metrics import Metrics
from gateway.pipeline import ECHO_WINDOW
from gateway.store import Store
from gateway.store.base import StoreUnavailable

if TYPE_CHECKING:
    from gateway.cluster import Cluster
    from gateway.ingress import Ingress

log = logging.getLogger("civic.gateway")

PROCESSED_RETENTION = 14 * 86400.0
"""How long inbound event ids are remembered (longer than any sender retries)."""
MEMORY_RELEASE_INTERVAL = 10.0
"""Seconds between hand-backs of freed memory to the system (``gateway.intake.release_memory``):
after a crowd of refused uploads the gateway shrinks back within about this time."""
STATE_RELOAD_INTERVAL = 30.0
"""Seconds between reloads of bans and consent in a cluster, whatever the bus said."""
TICK = 2.0
"""Seconds between two rounds of chores."""


class Housekeeping:
    """Built by the runtime with the parts it looks after; ``platforms`` are
    the configured platform names (one queue-depth gauge each)."""

    def __init__(self, store: Store, metrics: Metrics, ingress: Ingress, platforms: Iterable[str],
                 cluster: Cluster | None) -> None:
        self.store = store
        self.metrics = metrics
        self.ingress = ingress
        self.platforms = tuple(platforms)
        self.cluster = cluster

    async def refresh_depth(self) -> None:
        """Recount the undelivered rows (the ingress's 429 threshold, the queue-depth gauges)."""
        counts = await self.store.outbox_counts()
        self.ingress.outbox_depth = sum(counts.values())
        for name in self.platforms:
            self.metrics.queue_depth.labels(name).set(counts.get(name, 0))

    async def run(self) -> None:
        """Every ``TICK`` seconds until cancelled; a failed round is logged, the next one runs."""
        last_prune = last_fingerprints = last_trim = 0.0
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.refresh_depth()
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


async def reload_now_and_then(reload: Callable[[], Awaitable[None]]) -> None:
    """In a cluster: ``reload`` bans and consent every ``STATE_RELOAD_INTERVAL``
    seconds, in case a bus hint was lost; until cancelled."""
    while True:
        await asyncio.sleep(STATE_RELOAD_INTERVAL)
        try:
            await reload()
        except Exception as exc:
            log.warning("reloading bans and consent failed: %s", exc)
