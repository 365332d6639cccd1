"""The id map's delivery-time half: finish what the fan-out left pending.

When the pipeline enqueues an event, a message it refers to may be known on
the target only under the gateway's stand-in id (an earlier copy not delivered
yet, or delivered but its target id not recorded yet). The outbox row names
those messages (``pending``); just before sending, ``Completion.payloads``
swaps in the ids the target has named since. ``learned`` turns what a
delivery reported (stand-in id -> the target's own) into id rows for
``Store.complete`` and remembers them, so that the next batch of the same
group needs no store read. Used by ``gateway.delivery`` only.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingT
from collections.abc import Sequence
from typing import Any

from msgspec.structs import replace

from gateway.idmap.refs import decode_pending
from gateway.ids import MESSAGE, CanonicalId, GroupRef, NativeId
from gateway.store.base import Mapping, OutboxItem, Store

COPY_CACHE_MAX = 200_000
REF_FIELDS = ("id", "reply_to", "thread", "message")
"""The payload fields that hold message ids (``schemas.v1``)."""


class Completion:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._copies: dict[tuple[str, str, str], NativeId] = {}

    async def payloads(self, batch: Sequence[OutboxItem]) -> list[Any]:
        """The payload of each item of one group's batch, with every pending
        message id replaced by the target's own where it is known now. An item
        made by this process carries its payload decoded (not read back from
        its body); one paged in from the store is decoded here."""
        want: set[str] = set()
        for item in batch:
            if item.pending:
                want.update(decode_pending(item.pending))
        found: dict[str, str] = {}
        if want:
            target = batch[0].target
            missing = []
            for c in want:
                hit = self._copies.get((target.platform, target.group, c))
                if hit is not None:
                    found[c] = hit
                else:
                    missing.append(c)
            if missing:
                rows = await self.store.natives(target.platform, target.group, MESSAGE, missing)
                for c, (native, _how) in rows.items():
                    found[c] = native
        out = []
        for item in batch:
            payload: Any = item.payload()
            if item.pending and found:
                changes = {f: found[v] for f in REF_FIELDS
                           if isinstance(v := getattr(payload, f, None), str) and v in found}
                if changes:
                    payload = replace(payload, **changes)
            out.append(payload)
        return out

    def learned(self, target: GroupRef, native_ids: MappingT[str, NativeId]) -> list[Mapping]:
        """The id rows of what a delivery to ``target`` reported: the gateway's
        id it sent -> the id the target gave the copy (kept as ``ids.COPY``)."""
        maps = []
        for sent, native in native_ids.items():
            if not isinstance(native, str) or not native or sent == native:
                continue
            maps.append(Mapping(target.platform, target.group, MESSAGE, NativeId(native), CanonicalId(sent)))
            if len(self._copies) > COPY_CACHE_MAX:
                self._copies.clear()
            self._copies[(target.platform, target.group, sent)] = NativeId(native)
        return maps


__all__ = ["Completion", "REF_FIELDS"]
