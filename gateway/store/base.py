"""The store interface: everything the gateway must not lose.

Two faces. ``Tx`` is the synchronous view of one open transaction, used by the
pipeline's planning code so that deduplication, id mapping, routing and the
outbox insert of an event commit together or not at all. ``Store`` is the
asynchronous face the rest of the core uses; ``transact`` runs a planning
function inside a transaction (implementations group-commit concurrent calls).

Where it is: the records and key rules are in ``gateway.store.records`` (and
importable from here); this module holds ``Tx``, ``Store`` and
``StoreUnavailable``.
"""

from __future__ import annotations

import abc
import collections.abc
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from gateway.store.records import (
    STATE_KEY_MAX,
    ClusterView,
    DeadLetter,
    Mapping,
    ModerationEntry,
    OutboxItem,
    SchemaTooNew,
    check_state_key,
    encode_payload,
    prefix_end,
    refuse_newer_schema,
)

__all__ = ["STATE_KEY_MAX", "ClusterView", "DeadLetter", "Mapping", "ModerationEntry", "OutboxItem", "SchemaTooNew",
           "Store", "StoreUnavailable", "Tx", "check_state_key", "encode_payload", "prefix_end",
           "refuse_newer_schema"]

T = TypeVar("T")


class Tx(Protocol):
    """One open transaction (synchronous; runs on the store's own worker)."""

    def first_seen(self, platform: PlatformName, event_id: EventId, now: float) -> bool:
        """Record an inbound event id; False if it was recorded before."""

    def lookup(self, platform: PlatformName, grp: str, kind: str, native: str) -> tuple[CanonicalId, int] | None:
        """Canonical id of a native id, and how the platform came by it (ids.ORIGIN, COPY or SENT)."""

    def native_for(self, canonical: CanonicalId, platform: PlatformName, grp: str, kind: str) -> tuple[NativeId, int] | None:
        """The platform's id for a canonical id, best first (ORIGIN, then COPY, then SENT), and how."""

    def map(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId, how: int) -> bool:
        """Record a mapping; an existing one for the same native id is kept (and False returned)."""

    def enqueue(self, target: GroupRef, event_id: EventId, type: str, origin: PlatformName,
                created: float, pending: str | None, body: bytes, occurred: float | None = None) -> int:
        """Append to the target group's queue; returns the sequence number."""

    def set_membership(self, platform: PlatformName, grp: GroupId, actor: CanonicalId,
                       state: str, role: str | None, now: float) -> None: ...

    def log_moderation(self, entry: ModerationEntry) -> None: ...

    def set_ban(self, link: LinkName, actor: CanonicalId, banned: bool, now: float) -> None: ...

    def remap(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId) -> None:
        """Point a native id at another canonical id (an account move), as the platform's own id."""

    def declare_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str,
                      now: float) -> None:
        """Record that an account says it is also another account."""

    def has_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str) -> bool: ...

    def record_author(self, message: CanonicalId, author: CanonicalId) -> None: ...

    def messages_by(self, author: CanonicalId) -> list[CanonicalId]:
        """Every message the gateway carried for this person."""

    def copies(self, canonical: CanonicalId, kind: str) -> list[tuple[PlatformName, str, NativeId, int]]:
        """Every (platform, grp, native, how) a canonical id is mapped to."""

    def set_consent(self, actor: CanonicalId, state: str, now: float) -> None: ...

    def remember_sent(self, fingerprint: bytes, now: float) -> None:
        """Record that an event with this fingerprint was just sent to a group."""

    def sent_since(self, fingerprint: bytes, since: float) -> bool:
        """Whether an event with this fingerprint was sent at ``since`` or later."""


class StoreUnavailable(Exception):
    """The store's server cannot be reached now (``Store.unavailable`` says
    why). The call failed rather than wait for the server to return; its
    effect is not known when the connection broke during the commit, so
    callers retry only what is idempotent (intake deduplicates by event id)."""


class Store(abc.ABC):
    """Durable state. Implementations: ``gateway.store.sqlite.SqliteStore`` and
    ``gateway.store.postgresql.PostgresStore``."""

    on_retry: Callable[[], None] | None = None
    """Called (from the store's worker) before a rolled-back batch runs again,
    so that callers drop what they cached from the attempt that was undone."""

    def unavailable(self) -> str | None:
        """Why the store cannot take transactions now (its server unreachable),
        or None when it can; cheap, no I/O. While it says why, calls fail at
        once with ``StoreUnavailable`` instead of waiting, and the store looks
        for the server by itself. A local file (SQLite) is never unavailable."""
        return None

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def transact(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a transaction; when this returns the effect is durable.
        If ``fn`` raises, its effect is rolled back and the error re-raised."""

    @abc.abstractmethod
    def backlog(self) -> int:
        """Transactions waiting to run (for load shedding); cheap, no I/O."""

    @abc.abstractmethod
    async def outbox_groups(self) -> list[GroupRef]:
        """Every target group with undelivered events."""

    @abc.abstractmethod
    async def outbox_page(self, target: GroupRef, after_seq: int, limit: int) -> list[OutboxItem]:
        """Undelivered events of one group after ``after_seq``, oldest first."""

    @abc.abstractmethod
    async def outbox_counts(self) -> dict[PlatformName, int]: ...

    @abc.abstractmethod
    async def complete(self, seqs: Sequence[int], mappings: Sequence[Mapping],
                       followups: Sequence[OutboxItem] = ()) -> list[OutboxItem]:
        """Delivered: remove these outbox rows, record the ids the targets
        created (as ids.COPY) and append ``followups`` (their ``seq`` ignored)
        to the end of their target groups' queues, in order, all in one
        transaction; returns the follow-ups as queued (with their ``seq``)."""

    @abc.abstractmethod
    async def natives(self, platform: PlatformName, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        """Batch ``native_for`` (for translating at delivery time)."""

    @abc.abstractmethod
    async def dead_letter(self, item: OutboxItem, error: str, attempts: int, now: float) -> None:
        """Move an outbox row to the dead letters."""

    @abc.abstractmethod
    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def dead_letter_count(self) -> int: ...

    @abc.abstractmethod
    async def replay(self, seqs: Sequence[int] | None) -> list[OutboxItem]:
        """Move dead letters (all when ``seqs`` is None) back to the end of their
        queues, keeping their event ids; returns the new outbox items."""

    @abc.abstractmethod
    async def moderation_log(self, after_seq: int = 0, limit: int = 100,
                             link: str | None = None) -> list[ModerationEntry]: ...

    @abc.abstractmethod
    async def bans(self) -> set[tuple[LinkName, CanonicalId]]: ...

    @abc.abstractmethod
    async def withdrawn(self) -> set[CanonicalId]:
        """People who withdrew their consent."""

    @abc.abstractmethod
    async def setting(self, key: str, default: Callable[[], str]) -> str:
        """A persistent setting; created from ``default()`` on first use."""

    # -- adapter state: a key-value space per platform ----------------------------------------
    @abc.abstractmethod
    async def state_get(self, platform: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of those of ``keys`` that are set (missing keys are left out)."""

    @abc.abstractmethod
    async def state_put(self, platform: str, items: collections.abc.Mapping[str, bytes | None], now: float) -> None:
        """Set each key to its value (``updated = now``), or delete it where the
        value is None; all in one transaction. Keys: see ``check_state_key``."""

    @abc.abstractmethod
    async def state_scan(self, platform: str, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        """(key, value) of the first ``limit`` keys that start with ``prefix``, in
        key order: by code point, the same on every store."""

    @abc.abstractmethod
    async def state_setdefault(self, platform: str, key: str, value: bytes, now: float) -> bytes:
        """The value of ``key``, set to ``value`` first if it has none, atomically:
        of nodes racing to set it, one wins and all read the winner's value."""

    @abc.abstractmethod
    async def state_prune(self, platform: str, prefix: str, older_than: float) -> int:
        """Delete the keys starting with ``prefix`` last written before
        ``older_than`` (Unix seconds); how many were deleted."""

    @abc.abstractmethod
    async def prune_fingerprints(self, older_than: float) -> int:
        """Forget fingerprints of events sent before ``older_than``; returns how many."""

    @abc.abstractmethod
    async def prune_processed(self, older_than: float) -> int:
        """Forget inbound event ids seen before ``older_than``; returns how many."""

    # -- a cluster of nodes (PostgreSQL only) ---------------------------------------------------
    async def cluster_tick(self, node: str, partitions: int, ttl: float) -> ClusterView:
        """Called by each node of a cluster every tick (``gateway.cluster``): in one
        transaction, on the database's clock, record that ``node`` is alive, renew
        its partition leases for ``ttl`` seconds, give back what is above its fair
        share (``ceil(partitions / live nodes)``) and claim free or expired
        partitions up to that share. Returns what the node owns now."""
        raise NotImplementedError("a cluster needs a PostgreSQL store")

    async def cluster_leave(self, node: str) -> None:
        """Called by a node on a clean shutdown: release its leases at once and
        forget the node (the others take its partitions on their next tick)."""
        raise NotImplementedError("a cluster needs a PostgreSQL store")

    async def cluster_owners(self) -> dict[int, str]:
        """The current owner of each partition with an unexpired lease (for health
        and status pages)."""
        raise NotImplementedError("a cluster needs a PostgreSQL store")
