"""One target group's queue of outbox rows (``GroupQueue``), as the delivery
engine (``gateway.delivery``) holds it: at most ``MAX_IN_MEMORY`` rows in
memory, the rest paged in from the store."""

from __future__ import annotations

from collections import deque

from gateway.ids import GroupRef
from gateway.store.base import OutboxItem

MAX_IN_MEMORY = 2000


class GroupQueue:
    """The rows of one target group in sequence order and its worker's state."""

    __slots__ = ("target", "items", "overflow", "reloading", "side", "done_seq", "running", "rewake", "released")

    def __init__(self, target: GroupRef) -> None:
        self.target = target
        self.items: deque[OutboxItem] = deque()
        self.overflow = False  # more rows wait in the store than are held here
        self.reloading = False
        self.side: list[OutboxItem] = []
        self.done_seq = 0  # highest seq taken off this queue
        self.running = False
        self.rewake = False  # woken while a page was being read: read again
        self.released = False  # this node no longer owns the group (cluster)

