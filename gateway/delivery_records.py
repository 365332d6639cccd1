"""What the delivery engine (``gateway.delivery``) writes back to the store:
completed deliveries with their id mappings and follow-ups (``Completions``,
recorded in the background in as few store calls as possible), the outbox row
of a follow-up (``followup_row``) and a dead letter's reason
(``permanent_reason``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from gateway.adapter import Followup
from gateway.errors import PermanentDeliveryError, UnencodableEvent
from gateway.ids import GroupRef, PlatformName
from gateway.store.base import Mapping, OutboxItem, Store, StoreUnavailable
from gateway.tasks import TaskGroup

log = logging.getLogger("civic.delivery")

COMPLETION_RETRY = 1.0
"""Seconds between tries to record completed deliveries while the store is unavailable."""


class Completions:
    """Collects finished deliveries and records them in as few store calls as possible."""

    def __init__(self, store: Store, tasks: TaskGroup, queued: Callable[[Sequence[OutboxItem]], None]) -> None:
        self.store = store
        self.tasks = tasks
        self.queued = queued
        self.seqs: list[int] = []
        self.maps: list[Mapping] = []
        self.followups: list[OutboxItem] = []
        self.flushing = False
        self.stopping = False
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, seqs: Sequence[int], maps: Sequence[Mapping], followups: Sequence[OutboxItem] = ()) -> None:
        self.seqs.extend(seqs)
        self.maps.extend(maps)
        self.followups.extend(followups)
        if not self.flushing:
            self.flushing = True
            self.idle.clear()
            self.tasks.spawn(self._flush(), "delivery-completions")

    async def _flush(self) -> None:
        try:
            while self.seqs or self.maps or self.followups:
                seqs, maps, followups = self.seqs, self.maps, self.followups
                self.seqs, self.maps, self.followups = [], [], []
                try:
                    queued = await self.store.complete(seqs, maps, followups)
                except StoreUnavailable as exc:
                    if self.stopping:
                        log.warning("the store is unavailable: %d completed deliveries were not recorded and will "
                                    "be sent again after the restart, with the same ids", len(seqs))
                        break
                    # The store is away (a PostgreSQL restart): keep the record
                    # and try again, so that what was delivered is not sent twice.
                    self.seqs, self.maps = seqs + self.seqs, maps + self.maps
                    self.followups = followups + self.followups
                    log.debug("recording %d completed deliveries waits for the store: %s", len(seqs), exc)
                    await asyncio.sleep(COMPLETION_RETRY)
                    continue
                except Exception:
                    # Nothing of it was recorded: the deliveries are made again
                    # after a restart, and ask for their follow-ups again.
                    log.exception("recording %d completed deliveries failed; they may be sent again", len(seqs))
                    continue
                if queued:
                    self.queued(queued)
        finally:
            self.flushing = False
            self.idle.set()


def followup_row(platform: PlatformName, f: Followup, now: float) -> OutboxItem:
    """The outbox row of an adapter's follow-up (its seq given by the store).
    Its origin is the platform itself: the adapter made it."""
    if not isinstance(f, Followup) or f.type.startswith("civic."):
        raise TypeError(f"a follow-up must be a gateway.adapter.Followup of the adapter's own type, not {f!r:.200}")
    return OutboxItem(seq=0, target=GroupRef(platform, f.group), event_id=f.event_id, type=f.type, origin=platform,
                      created=now, pending=None, body=f.body)


def permanent_reason(exc: Exception, target: GroupRef) -> str:
    """The dead letter's error: what the adapter said, or for an encoder's own
    exception, that the event cannot be written for the target and why."""
    if isinstance(exc, PermanentDeliveryError) and not isinstance(exc, UnencodableEvent):
        return str(exc)
    what = str(exc) if isinstance(exc, UnencodableEvent) else f"{type(exc).__name__}: {exc}"
    return f"cannot be encoded for {target}: {what}"
