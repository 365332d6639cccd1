"""An adapter's durable key-value space: the interface (``AdapterState``) and
its two implementations, ``MemoryState`` (tests, one process) and
``StoreState`` (the gateway's store, shared by a cluster's nodes). Imported
through ``gateway.adapter`` and ``gateway.kit``."""

from __future__ import annotations

import abc
import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from gateway.store.base import check_state_key

if TYPE_CHECKING:
    from gateway.store.base import Store


class AdapterState(abc.ABC):
    """A platform adapter's own durable key-value space (sync tokens, snapshots
    of policy lists, ids it has seen): kept across restarts and shared by the
    nodes of a cluster. Keys are text (at most 512 characters, no NUL); values
    are bytes (encode them yourself, e.g. with msgspec)."""

    @abc.abstractmethod
    async def get(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of those of ``keys`` that are set (missing ones are left out)."""

    async def get_one(self, key: str) -> bytes | None:
        return (await self.get([key])).get(key)

    @abc.abstractmethod
    async def put(self, items: Mapping[str, bytes | None]) -> None:
        """Set each key (None deletes it), all or nothing."""

    @abc.abstractmethod
    async def scan(self, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        """(key, value) of the first ``limit`` keys starting with ``prefix``, in key (code point) order."""

    @abc.abstractmethod
    async def setdefault(self, key: str, value: bytes) -> bytes:
        """The value of ``key``, set to ``value`` first if it has none,
        atomically (of nodes racing, one wins and every one reads that value)."""

    @abc.abstractmethod
    async def prune(self, prefix: str, older_than: float) -> int:
        """Delete the keys starting with ``prefix`` last written before
        ``older_than`` (Unix seconds); how many were deleted."""


class MemoryState(AdapterState):
    """``AdapterState`` in memory, gone at exit: for unit tests and adapters
    built without a gateway. Checks keys as the store does, so a test catches
    a key the store would refuse."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._values: dict[str, bytes] = {}
        self._keys: list[str] = []  # sorted, for scans
        self._written: dict[str, float] = {}
        self._clock = clock

    async def setdefault(self, key: str, value: bytes) -> bytes:
        if check_state_key(key) not in self._values:
            await self.put({key: value})
        return self._values[key]

    async def prune(self, prefix: str, older_than: float) -> int:
        old = [k for k, v in await self.scan(prefix, limit=len(self._keys) + 1) if self._written[k] < older_than]
        await self.put(dict.fromkeys(old))
        return len(old)

    async def get(self, keys: Sequence[str]) -> dict[str, bytes]:
        return {k: self._values[k] for k in keys if check_state_key(k) in self._values}

    async def put(self, items: Mapping[str, bytes | None]) -> None:
        for k in items:
            check_state_key(k)
        for k, v in items.items():
            if v is None:
                self._written.pop(k, None)
                if self._values.pop(k, None) is not None:
                    del self._keys[bisect.bisect_left(self._keys, k)]
            else:
                if k not in self._values:
                    bisect.insort(self._keys, k)
                self._values[k] = bytes(v)
                self._written[k] = self._clock()

    async def scan(self, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for k in self._keys[bisect.bisect_left(self._keys, check_state_key(prefix)):]:
            if len(out) >= limit or not k.startswith(prefix):
                break
            out.append((k, self._values[k]))
        return out


class StoreState(AdapterState):
    """``AdapterState`` in the gateway's store (``adapter_state``), scoped to one platform."""

    def __init__(self, store: "Store", platform: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.platform = platform
        self.clock = clock

    async def get(self, keys: Sequence[str]) -> dict[str, bytes]:
        return await self.store.state_get(self.platform, keys)

    async def put(self, items: Mapping[str, bytes | None]) -> None:
        await self.store.state_put(self.platform, items, self.clock())

    async def scan(self, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        return await self.store.state_scan(self.platform, prefix, limit)

    async def setdefault(self, key: str, value: bytes) -> bytes:
        return await self.store.state_setdefault(self.platform, key, value, self.clock())

    async def prune(self, prefix: str, older_than: float) -> int:
        return await self.store.state_prune(self.platform, prefix, older_than)

