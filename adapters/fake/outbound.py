"""Outbound: the fake platform itself, in memory. It takes native events,
gives each an id of its own, and remembers everything.

``sent`` is every native event the adapter sent, repeats included, in order
(as a test would read a real platform's access log); ``timeline`` is what
the platform shows: a repeat of a transaction (the same ``key``) is answered
with the id it got the first time and is not shown twice. A test can make the
next deliveries fail (``fail_next``) to see the gateway retry or give up.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from adapters.fake import encode
from gateway.kit import Capabilities, Delivery, DeliveryResult, NativeId, PermanentDeliveryError, TransientDeliveryError


class FakePlatform:
    def __init__(self, id_prefix: str, caps: Capabilities) -> None:
        self.id_prefix = id_prefix
        self.caps = caps
        self.sent: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.not_carried: list[Delivery] = []
        """Deliveries the platform could not carry at all (``encode`` gave None)."""
        self._ids: dict[str, str] = {}  # key (the gateway's event id) -> the platform's id
        self._counter = itertools.count(1)
        self._failures: list[tuple[bool, float | None]] = []

    def new_id(self) -> str:
        """A fresh id in the platform's own scheme."""
        return f"{self.id_prefix}:{next(self._counter)}"

    def fail_next(self, n: int = 1, *, permanent: bool = False, retry_after: float | None = None) -> None:
        """Make the next ``n`` deliveries fail (transiently, or permanently)."""
        self._failures.extend([(permanent, retry_after)] * n)

    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """Take ``batch``, or fail as told; the ids the platform made for the
        messages created (gateway id -> native id)."""
        if self._failures:
            permanent, retry_after = self._failures.pop(0)
            if permanent:
                raise PermanentDeliveryError("the fake platform refuses this delivery (told to)")
            raise TransientDeliveryError("the fake platform is down (told to)", retry_after=retry_after)
        ids: dict[str, NativeId] = {}
        for d in batch:
            native = encode.encode(d, self.caps)
            if native is None:
                self.not_carried.append(d)
                continue
            event_id = self.take(native)
            if native["op"] == "post" and d.type == "civic.message.created":
                ids[d.payload.id] = NativeId(event_id)
        return DeliveryResult(ids=ids)

    def take(self, native: dict[str, Any]) -> str:
        """Record ``native``; its id (the first one for a repeated ``key``)."""
        key = native["key"]
        first = key not in self._ids
        if first:
            self._ids[key] = self.new_id()
        event = {**native, "id": self._ids[key]}
        if event["op"] == "post":
            event["data"] = {**event["data"], "msg": event["id"]}  # a new post is named by the platform's id
        self.sent.append(event)
        if first:
            self.timeline.append(event)
        return event["id"]
