"""The ingest path: what an adapter's ``ctx.ingest(events)`` runs.

Refuse when overloaded, prepare every event, store them all in one
transaction (deduplicated, routed, queued), hand the new outbox rows to
delivery, count. ``gateway.runtime`` builds one ``Ingress`` per gateway, hands
its ``ingest`` to every adapter, and sets ``pipeline``, ``cluster`` and
``ready`` as it starts and stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway.adapter import Inbound, IngestResult, Overloaded
from gateway.metrics import Metrics
from gateway.store import Store
from gateway.store.base import OutboxItem, StoreUnavailable

if TYPE_CHECKING:
    from gateway.cluster import Cluster
    from gateway.config import GatewaySettings
    from gateway.pipeline import Pipeline

log = logging.getLogger("civic.gateway")

STORE_BACKLOG_LIMIT = 5000
"""Transactions waiting for the store above which ingress answers 503."""
STORE_RETRY_AFTER = 5
"""Retry-After (seconds) of the 503 intake answers while the store is unreachable."""
STATE_TYPES = frozenset({"civic.moderation.action", "civic.membership.changed", "civic.profile.updated",
                         "civic.account.moved"})
"""Event types that can change bans, consent or account mappings (other nodes reload theirs)."""
UNLINKED_WARN_MAX = 10_000
"""Groups no link names that are each warned about once; past this many, no more."""


class Ingress:
    """Takes events from adapters into the store. ``hand_over`` is the
    runtime's: it gives committed outbox rows to delivery (or to their owners
    in a cluster)."""

    def __init__(self, store: Store, metrics: Metrics, settings: GatewaySettings,
                 hand_over: Callable[[Sequence[OutboxItem]], None]) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.hand_over = hand_over
        self.pipeline: Pipeline | None = None
        """Set by the runtime's ``start`` (events are refused until then)."""
        self.cluster: Cluster | None = None
        """Set by the runtime when the store is shared: told when bans or consent may have changed."""
        self.ready = False
        """Whether events are taken: from the end of ``start`` until ``stop`` begins."""
        self.outbox_depth = 0
        """Undelivered outbox rows, as last counted (``gateway.housekeeping``) plus those added since."""
        self._unlinked_warned: set[tuple[str, str]] = set()
        self._running = 0
        self._idle: asyncio.Event | None = None

    async def ingest(self, events: Sequence[Inbound]) -> IngestResult:
        """Store ``events`` durably (deduplicated, routed, queued) and hand the
        new outbox rows to delivery. Called by adapters; raises ``Overloaded``."""
        self._running += 1
        try:
            return await self._ingest(events)
        finally:
            self._running -= 1
            if self._running == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self, timeout: float) -> int:
        """Called by the runtime's ``stop``: take no more events and wait (at
        most ``timeout`` seconds) for the ingests under way, which an adapter
        may have shielded from its own cancellation, so that what they commit
        is handed to delivery before it stops. Returns how many still run."""
        self.ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._running and loop.time() < deadline:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), deadline - loop.time())
            except TimeoutError:
                break
            finally:
                self._idle = None
        return self._running

    async def _ingest(self, events: Sequence[Inbound]) -> IngestResult:
        if not self.ready or self.pipeline is None:
            raise Overloaded(503, 5, "the gateway is starting")
        if (why := self.store.unavailable()) is not None:
            raise Overloaded(503, STORE_RETRY_AFTER, f"the gateway's database is unreachable ({why}); retry later")
        if self.store.backlog() > STORE_BACKLOG_LIMIT:
            raise Overloaded(503, 1, "the store is busy; retry shortly")
        if self.outbox_depth > self.settings.max_backlog:
            raise Overloaded(429, 30, "too many undelivered events; retry later")
        pipeline = self.pipeline
        # On the loop: handing batches to threads to sanitise looked cheaper, but
        # the threads' Python parts fought the loop for the GIL (batch relay
        # 14k -> 9k msg/s under py-spy); nh3 takes about 4 us a message.
        prepared = [pipeline.prepare(e) for e in events]
        try:
            outcomes = await self.store.transact(lambda tx: pipeline.apply_all(tx, prepared))
        except StoreUnavailable as exc:  # not stored (or, cut at its commit, stored once: a retry is a duplicate)
            pipeline.invalidate()
            raise Overloaded(503, STORE_RETRY_AFTER, f"the gateway's database is unreachable ({exc}); "
                                                     "retry later") from None
        except Exception:
            pipeline.invalidate()
            raise
        pipeline.commit(outcomes)  # only now: a failed commit leaves bans and consent as they were
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
            self.outbox_depth += len(items)
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
