"""Deliveries to fediverse inboxes, one durable queue per inbox host.

The core hands the adapter one group's events in order; a hosted group then
has followers on many servers, and one server that is down must neither hold
up the others nor the group's queue in the core. So ``deliver`` only writes
one item per inbox into this queue (in the adapter's state, in the gateway's
store: it survives a crash and is shared by a cluster's nodes) and returns;
a worker per host sends them, in order per host:

* signed POST (``sign``), ``2xx`` done;
* ``4xx`` other than 401, 408 and 429 is not retried (Mastodon's
  "unsalvageable"): the item is dropped and counted;
* anything else is retried on Mastodon's schedule, ``attempts**4 + 15 +
  rand(0.5 * attempts**4)`` seconds (2-3 days in all), until ``retry_max_age``;
* a circuit breaker per host: after ``BREAKER_FAILURES`` failures in a row
  the host is left alone for ``BREAKER_COOL_DOWN`` seconds.

In a cluster one node at a time works each host (``leads("ap-out/<host>")``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import msgspec

from gateway.adapter import AdapterState
from gateway.netguard import FetchError

log = logging.getLogger("civic.activitypub")

PREFIX = "out:"
BREAKER_FAILURES = 10
BREAKER_COOL_DOWN = 60.0
SCAN = 50
RESUME_SCAN = 10_000
"""Queued items read to find the hosts with work (they come sorted by host)."""
RETRIED_4XX = frozenset({401, 408, 429})


class OutItem(msgspec.Struct, frozen=True):
    inbox: str
    body: bytes
    actor: str
    """Who signs it (an actor id of the gateway's)."""
    created: float
    attempts: int = 0
    next_try: float = 0.0


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(OutItem).decode

Post = Callable[[OutItem], Awaitable[int]]
"""Sends one item, returns the HTTP status (raises FetchError when there was none)."""


def retry_delay(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1`` (Mastodon's DeliveryWorker schedule)."""
    base = attempts ** 4 + 15
    return base + random.uniform(0, 0.5 * attempts ** 4)


def host_of(url: str) -> str:
    return urlsplit(url).netloc.lower()


class Counters(msgspec.Struct):
    delivered: int = 0
    retried: int = 0
    dropped: int = 0
    """Refused for good by the receiving server (unsalvageable 4xx)."""
    expired: int = 0
    """Given up after ``retry_max_age``."""


class HostQueues:
    def __init__(self, state: AdapterState, post: Post, *, leads: Callable[[str], bool] = lambda key: True,
                 retry_max_age: float = 3 * 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.post = post
        self.leads = leads
        self.retry_max_age = retry_max_age
        self.clock = clock
        self.counts = Counters()
        self._hosts: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._breaker: dict[str, tuple[int, float]] = {}  # host -> (failures in a row, open until)
        self._seq = 0
        self._closing = False

    async def enqueue(self, items: list[OutItem]) -> None:
        """Store ``items`` durably, then wake their hosts' workers."""
        batch: dict[str, bytes | None] = {}
        for item in items:
            self._seq += 1
            key = f"{PREFIX}{host_of(item.inbox)}:{time.time_ns():020d}{self._seq % 1000:03d}{random.getrandbits(24):06x}"
            batch[key] = _encode(item)
        if batch:
            await self.state.put(batch)
        for item in items:
            self._kick(host_of(item.inbox))

    async def resume(self) -> None:
        """Start workers for every host with items waiting (after a start)."""
        hosts = {key[len(PREFIX):].rsplit(":", 1)[0] for key, _ in await self.state.scan(PREFIX, limit=RESUME_SCAN)}
        for host in hosts:
            self._kick(host)

    async def watch(self, every: float = 30.0) -> None:
        """``resume`` now and every ``every`` seconds: in a cluster another node
        may have queued items for a host this node leads."""
        while not self._closing:
            try:
                await self.resume()
            except Exception:  # the store may be busy; next time
                log.exception("looking for queued deliveries failed")
            await asyncio.sleep(every)

    def pending_hosts(self) -> int:
        return len(self._hosts)

    def _kick(self, host: str) -> None:
        ev = self._wake.setdefault(host, asyncio.Event())
        ev.set()
        task = self._hosts.get(host)
        if (task is None or task.done()) and not self._closing:
            self._hosts[host] = asyncio.get_running_loop().create_task(self._work(host), name=f"ap-out-{host}")

    async def close(self) -> None:
        self._closing = True
        for task in self._hosts.values():
            task.cancel()
        for task in self._hosts.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._hosts.clear()

    async def _work(self, host: str) -> None:
        wake = self._wake[host]
        prefix = f"{PREFIX}{host}:"
        while not self._closing:
            wake.clear()
            rows = await self.state.scan(prefix, limit=SCAN)
            if not rows:
                return  # nothing queued for this host (any more)
            if not self.leads(f"ap-out/{host}"):
                await self._wait(wake, 5.0)  # another node delivers to it; look again later
                continue
            failures, open_until = self._breaker.get(host, (0, 0.0))
            now = self.clock()
            if open_until > now:
                await self._wait(wake, open_until - now)
                continue
            wait = None
            for key, raw in rows:
                item = _decode(raw)
                now = self.clock()
                if item.next_try > now:
                    wait = item.next_try - now  # keep the host's order: nothing after it goes first
                    break
                status = await self._send(item)
                if status is not None and 200 <= status < 300:
                    await self.state.put({key: None})
                    self.counts.delivered += 1
                    self._breaker.pop(host, None)
                    continue
                if status is not None and 400 <= status < 500 and status not in RETRIED_4XX:
                    await self.state.put({key: None})
                    self.counts.dropped += 1
                    log.warning("delivery to %s refused for good (HTTP %s); dropped", item.inbox, status)
                    continue
                failures += 1
                self._breaker[host] = (failures, now + BREAKER_COOL_DOWN if failures >= BREAKER_FAILURES else 0.0)
                if now - item.created > self.retry_max_age:
                    await self.state.put({key: None})
                    self.counts.expired += 1
                    log.warning("delivery to %s given up after %d attempts", item.inbox, item.attempts + 1)
                    continue
                delay = retry_delay(item.attempts + 1)
                await self.state.put({key: _encode(msgspec.structs.replace(
                    item, attempts=item.attempts + 1, next_try=now + delay))})
                self.counts.retried += 1
                log.info("delivery to %s failed (%s); retry %d in %.0f s", item.inbox, status or "no answer",
                         item.attempts + 1, delay)
                wait = delay
                break
            if wait is not None:
                await self._wait(wake, wait)

    async def _send(self, item: OutItem) -> int | None:
        try:
            return await self.post(item)
        except FetchError as exc:
            if not exc.transient:
                return exc.status or 400  # refused before sending (address, size): not worth retrying
            log.info("delivery to %s: %s", item.inbox, exc)
            return None

    @staticmethod
    async def _wait(wake: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(wake.wait(), timeout=max(0.0, min(seconds, 300.0)))
        except asyncio.TimeoutError:
            pass
