"""Delivery: one ordered queue per target group, drained by one worker each.

A queue holds the outbox rows of one target group in sequence order (at most
``MAX_IN_MEMORY`` in memory; the rest stays in the store and is paged in). Its
worker sends the head of the queue as one batch, at most one batch in flight
per group, so order holds per group while groups proceed in parallel. After a
success it moves on at once and records the completion in the background,
together with the follow-up deliveries the adapter asked for
(``DeliveryResult.followups``: queued as ordinary rows of their own target
groups in the same transaction, so a crash in between redelivers a few events
with the same ids, which targets drop, and loses no follow-up); after a
transient failure it waits (the target adapter's ``RETRY`` schedule,
``gateway.retry``, ``Retry-After`` honoured) and sends the same batch again;
a permanent failure isolates the bad event and dead-letters it, and the queue
goes on. An event that cannot be encoded for the target (``UNENCODABLE``: an
encoder's ``ValueError``, ``OverflowError`` ...) is a permanent failure too:
retrying it would block its queue for good. Any other unexpected error is
retried like a transient one, and given up on the schedule like one.

The wait between attempts is what keeps a failing target from being hammered
(one attempt in flight per group, then a growing pause): for fediverse
servers, each one a target group ``inbox:<host>``, it plays the part of a
circuit breaker.

Where it is: ``delivery_queue`` (one group's queue, ``GroupQueue``) and
``delivery_records`` (recording completions, follow-up rows, dead-letter
reasons); this module holds the engine and its per-group worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from msgspec.structs import replace

from gateway.adapter import Adapter, Delivery, Followup
from gateway.delivery_queue import MAX_IN_MEMORY, GroupQueue
from gateway.delivery_records import COMPLETION_RETRY, Completions, followup_row, permanent_reason
from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.idmap import Completion
from gateway.ids import GroupRef, NativeId, PlatformName
from gateway.metrics import Metrics
from gateway.retry import DEFAULT, RetrySchedule
from gateway.store.base import OutboxItem, Store, StoreUnavailable
from gateway.tasks import TaskGroup

log = logging.getLogger("civic.delivery")

__all__ = ["COMPLETION_RETRY", "MAX_IN_MEMORY", "RETRY_WARN_AFTER", "UNENCODABLE", "DeliveryEngine"]

RETRY_WARN_AFTER = 5
"""Failed attempts of one batch logged at INFO; from this many on, at WARNING."""
UNENCODABLE = (ValueError, OverflowError, TypeError, msgspec.MsgspecError)
"""What an encoder raises for an event it cannot write (a time out of range, a
stored payload that no longer decodes): the same every time, so not retried.
(ValueError covers UnicodeError and msgspec's DecodeError.)"""


class DeliveryEngine:
    """Owns the per-group queues. ``submit`` is called by ingress with the rows
    it just committed; ``start`` pages in what an earlier run left undelivered."""

    def __init__(self, store: Store, adapters: dict[PlatformName, Adapter], metrics: Metrics, tasks: TaskGroup, *,
                 retry_max_delay: float = 300.0, retry_max_age: float = 3 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.adapters = adapters
        self.metrics = metrics
        self.tasks = tasks
        self.retry_max_delay = retry_max_delay
        self.retry_max_age = retry_max_age
        self.clock = clock
        self._queues: dict[GroupRef, GroupQueue] = {}
        self.hand_over: Callable[[Sequence[OutboxItem]], None] = self.submit
        """Where committed follow-ups go: ``submit`` alone; in a cluster the
        gateway sets its own ``hand_over`` (a wake-up to each group's owner)."""
        self._completions = Completions(store, tasks, lambda items: self.hand_over(items))
        self._ids = Completion(store)  # the id map's delivery-time half
        self._stopping = False
        self._wake = asyncio.Event()
        self.owns: Callable[[GroupRef], bool] | None = None
        """In a cluster: whether this node delivers a group now (None: every group)."""

    # -- feeding the queues -------------------------------------------------------------
    async def start(self) -> None:
        for target in await self.store.outbox_groups():
            q = self._queue(target)
            q.overflow = True  # everything is in the store; page it in
            self._kick(q)

    def submit(self, items: Sequence[OutboxItem]) -> None:
        for item in items:
            q = self._queue(item.target)
            if q.reloading:
                q.side.append(item)
            elif q.overflow:
                pass  # in the store; the next page picks it up
            elif len(q.items) >= MAX_IN_MEMORY:
                q.overflow = True
            else:
                if q.items and item.seq < q.items[-1].seq:
                    q.items.append(item)
                    q.items = deque(sorted(q.items, key=lambda i: i.seq))
                else:
                    q.items.append(item)
            self._kick(q)

    async def send(self, platform: PlatformName, followups: Sequence[Followup]) -> None:
        """``AdapterContext.send``: queue an adapter's deliveries to its own
        platform's targets, durably, then hand them to delivery."""
        now = self.clock()
        rows = [followup_row(platform, f, now) for f in followups]
        if not rows:
            return

        def run(tx: Any) -> list[OutboxItem]:
            return [replace(r, seq=tx.enqueue(r.target, r.event_id, r.type, r.origin, r.created, None, r.body))
                    for r in rows]
        self.hand_over(await self.store.transact(run))

    def wake(self, target: GroupRef) -> None:
        """New rows for ``target`` are committed (in a cluster, maybe by another
        node): page them in from the store, in the store's order."""
        q = self._queue(target)
        if q.reloading:
            q.rewake = True
        else:
            q.overflow = True
        self._kick(q)

    def release(self, which: Callable[[GroupRef], bool]) -> None:
        """Stop delivering these groups (another node owns them now). A batch
        in flight finishes; nothing more is sent from their queues."""
        for target in [t for t in self._queues if which(t)]:
            q = self._queues.pop(target)
            q.released = True  # its worker records the batch in flight, then stops

    def _queue(self, target: GroupRef) -> GroupQueue:
        q = self._queues.get(target)
        if q is None:
            q = self._queues[target] = GroupQueue(target)
        return q

    def _kick(self, q: GroupQueue) -> None:
        if not q.running and not self._stopping:
            q.running = True
            self.tasks.spawn(self._work(q), f"deliver {q.target}")

    def pending(self) -> int:
        """Events held in memory for delivery (the store may hold more)."""
        return sum(len(q.items) for q in self._queues.values())

    def owners(self) -> dict[str, int]:
        return {str(t): len(q.items) for t, q in self._queues.items() if q.items or q.overflow}

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._completions.stopping = True
        await self._completions.idle.wait()

    # -- the worker ------------------------------------------------------------------
    async def _reload(self, q: GroupQueue) -> None:
        q.reloading = True
        try:
            page = await self.store.outbox_page(q.target, q.done_seq, MAX_IN_MEMORY)
        finally:
            q.reloading = False
        side, q.side = q.side, []
        q.overflow = len(page) >= MAX_IN_MEMORY or q.rewake
        q.rewake = False
        last = page[-1].seq if page else q.done_seq
        q.items = deque(page)
        if not q.overflow:
            q.items.extend(i for i in side if i.seq > last)

    async def _work(self, q: GroupQueue) -> None:
        adapter = self.adapters.get(q.target.platform)
        try:
            if adapter is None:
                log.error("no adapter for platform %s; %s waits in the store", q.target.platform, q.target)
                return
            size_limit = max(1, adapter.capabilities.batch_max)
            schedule = adapter.retry_schedule
            isolate = 0  # after a permanent failure of a batch: send one by one
            attempts = 0
            retry_n = 0  # a retry sends exactly the batch that failed (same webhook-id)
            store_failures = 0
            while not self._stopping and not q.released:
                if not q.items:
                    if not q.overflow:
                        break
                    try:
                        await self._reload(q)
                    except Exception as exc:  # the store is unreachable (it fails fast): read again later
                        store_failures += 1
                        (log.debug if isinstance(exc, StoreUnavailable) else log.warning)(
                            "reading the queue of %s failed: %s", q.target, exc)
                        await self._sleep(self._backoff(DEFAULT, store_failures, None))
                        continue
                    store_failures = 0
                    if not q.items:
                        break
                n = 1 if isolate else min(retry_n or size_limit, len(q.items))
                batch = [q.items[i] for i in range(n)]
                try:
                    deliveries = await self._prepare(batch)
                    result = await adapter.deliver(deliveries)
                    followups = [followup_row(q.target.platform, f, self.clock()) for f in result.followups]
                except TransientDeliveryError as exc:
                    attempts += 1
                    retry_n = n
                    self.metrics.retries.labels(q.target.platform).inc()
                    if self._gives_up(schedule, attempts, batch[0]):
                        await self._dead(q, batch[0], f"gave up after {attempts} attempts: {exc}", attempts)
                        attempts = retry_n = 0
                        continue
                    delay = self._backoff(schedule, attempts, exc.retry_after)
                    # The first retries are routine; a target still refusing after
                    # RETRY_WARN_AFTER attempts needs a person to look at it.
                    (log.info if attempts < RETRY_WARN_AFTER else log.warning)(
                        "delivery to %s failed (%s); retry %d in %.1fs", q.target, exc, attempts, delay,
                        extra={"platform": q.target.platform, "group": q.target.group,
                               "event_id": batch[0].event_id, "attempts": attempts, "error": str(exc)})
                    await self._sleep(delay)
                    continue
                except (PermanentDeliveryError, *UNENCODABLE) as exc:
                    if n > 1:
                        isolate = n  # find the bad event: one by one
                        continue
                    await self._dead(q, batch[0], permanent_reason(exc, q.target), attempts + 1)
                    attempts = retry_n = 0
                    isolate = max(0, isolate - 1)
                    continue
                except Exception as exc:  # an adapter bug must not stop the queue for good
                    attempts += 1
                    retry_n = n
                    log.exception("adapter %s failed delivering to %s", q.target.platform, q.target)
                    self.metrics.retries.labels(q.target.platform).inc()
                    if self._gives_up(schedule, attempts, batch[0]):
                        await self._dead(q, batch[0], f"gave up after {attempts} attempts: "
                                                      f"{type(exc).__name__}: {exc}", attempts)
                        attempts = retry_n = 0
                        continue
                    await self._sleep(self._backoff(schedule, attempts, None))
                    continue
                attempts = retry_n = 0
                isolate = max(0, isolate - n) if isolate else 0
                self._delivered(q, batch, result.ids, followups)
        finally:
            q.running = False
            if (q.items or q.overflow) and not self._stopping and not q.released and adapter is not None:
                self._kick(q)  # work arrived while the worker was finishing

    def _backoff(self, schedule: RetrySchedule, attempts: int, retry_after: float | None) -> float:
        return schedule.delay(attempts, retry_after, max_delay=self.retry_max_delay, rand=random.uniform)

    def _gives_up(self, schedule: RetrySchedule, attempts: int, item: OutboxItem) -> bool:
        return schedule.gives_up(attempts, self.clock() - item.created, max_age=self.retry_max_age)

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass

    def _delivered(self, q: GroupQueue, batch: list[OutboxItem], native_ids: dict[str, NativeId],
                   followups: Sequence[OutboxItem] = ()) -> None:
        now = self.clock()
        platform = q.target.platform
        for _ in batch:
            q.items.popleft()
        q.done_seq = batch[-1].seq
        maps = self._ids.learned(q.target, native_ids)
        self._completions.add([i.seq for i in batch], maps, followups)
        hist = self.metrics.latency.labels(platform)
        types: dict[str, int] = {}
        for item in batch:
            types[item.type] = types.get(item.type, 0) + 1
            hist.observe(max(0.0, now - item.created))
        for etype, n in types.items():
            self.metrics.events_out.labels(platform, etype).inc(n)

    async def _dead(self, q: GroupQueue, item: OutboxItem, error: str, attempts: int) -> None:
        try:
            await self.store.dead_letter(item, error, attempts, self.clock())
        except Exception as exc:  # e.g. the store is unreachable: the event stays queued and is tried again
            log.warning("could not dead-letter %s for %s (%s); it stays queued", item.event_id, q.target, exc)
            await self._sleep(min(self.retry_max_delay, 5.0))
            return
        # A person must act: fix the target, then replay (docs/operations.md).
        log.error("dead-lettered %s for %s after %d attempts: %s", item.event_id, q.target, attempts, error,
                  extra={"platform": q.target.platform, "group": q.target.group, "event_id": item.event_id,
                         "attempts": attempts, "error": error})
        if q.items and q.items[0].seq == item.seq:
            q.items.popleft()
        q.done_seq = max(q.done_seq, item.seq)
        self.metrics.dead_lettered.labels(q.target.platform).inc()
        self.metrics.dead_letters.inc()

    async def _prepare(self, batch: list[OutboxItem]) -> list[Delivery]:
        """The batch as the adapter takes it, target ids completed by the id map."""
        payloads = await self._ids.payloads(batch)
        return [Delivery(item.event_id, item.target.group, item.type, payload,
                         item.occurred if item.occurred is not None else item.created, item.origin)
                for item, payload in zip(batch, payloads)]

