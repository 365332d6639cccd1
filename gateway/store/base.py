"""The store interface: everything the gateway must not lose.

Two faces. ``Tx`` is the synchronous view of one open transaction, used by the
pipeline's planning code so that deduplication, id mapping, routing and the
outbox insert of an event commit together or not at all. ``Store`` is the
asynchronous face the rest of the core uses; ``transact`` runs a planning
function inside a transaction (implementations group-commit concurrent calls).
"""

from __future__ import annotations

import abc
import collections.abc
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import msgspec
from msgspec import Struct

from gateway.errors import GatewayError
from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from schemas.v1 import EVENT_TYPES

T = TypeVar("T")


_encode_body = msgspec.msgpack.Encoder().encode


class SchemaTooNew(GatewayError):
    """The database holds a migration this code does not ship: a newer
    civic-gateway wrote it, and this one must not read or change it."""


def refuse_newer_schema(applied: collections.abc.Iterable[int], known: Sequence[tuple[int, str]]) -> None:
    """Called by each backend's migration step, before it applies anything:
    raise ``SchemaTooNew`` if ``applied`` (the database's migration numbers)
    has one above the highest of ``known`` (the migrations shipped here).
    An older gateway would otherwise run on tables it does not understand
    (and a later upgrade would find them changed behind its back)."""
    newest = max(applied, default=0)
    knows = max((v for v, _ in known), default=0)
    if newest > knows:
        raise SchemaTooNew(f"this database was written by a newer civic-gateway (schema {newest}, this version "
                           f"knows up to {knows}): upgrade civic-gateway or restore a backup")


def encode_payload(payload: object) -> bytes:
    """The outbox body of a schema payload (msgpack); ``OutboxItem.payload`` reads it back."""
    return _encode_body(payload)


class OutboxItem(Struct, frozen=True, gc=False):
    """One event waiting for one target group."""

    seq: int
    target: GroupRef
    event_id: EventId
    type: str
    origin: PlatformName
    created: float
    pending: str | None
    """Canonical message ids to translate at delivery time (their target id
    may only be known once earlier deliveries finish), in the storage form of
    ``gateway.idmap.encode_pending``, which also reads it back."""
    body: bytes
    """The payload, msgpack, ids already in the target's terms where known."""
    occurred: float | None = None
    """When the event happened at its origin (None: as ``created``)."""
    decoded: Any = None
    """The payload object ``body`` was encoded from, on items the pipeline of
    this process made (never stored): delivery takes it instead of decoding
    what was just encoded. None on items read from the store."""

    def payload(self) -> Any:
        """The payload in its schema type (``schemas.v1.EVENT_TYPES[type]``):
        ``decoded`` where this process made the item, else the body decoded;
        for an adapter's own follow-up (``gateway.adapter.Followup``, a type
        that is no schema event type), the body as it is (bytes)."""
        if self.decoded is not None:
            return self.decoded
        decoder = _body_decoders.get(self.type)
        return self.body if decoder is None else decoder.decode(self.body)


_body_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in EVENT_TYPES.items()}


class DeadLetter(Struct, frozen=True):
    item: OutboxItem
    error: str
    attempts: int
    failed_at: float


class Mapping(Struct, frozen=True, gc=False):
    """A native id a delivery created: (platform, grp, kind, native) -> canonical."""

    platform: PlatformName
    grp: GroupId
    kind: str
    native: NativeId
    canonical: CanonicalId


class ModerationEntry(Struct, frozen=True):
    """One row of the public moderation log, as stored. It keeps no name that
    the person's identity level does not allow; ``gateway.transparency.public``
    is what the world sees of it."""

    time: float
    link: LinkName
    platform: PlatformName
    grp: GroupId
    action: str
    subject: str
    moderator: str | None
    reason: str | None
    category: str | None
    event_id: EventId
    seq: int = 0
    subject_identity: str | None = None
    """The identity level of the member acted on (None: a message alone, or a
    row from before migration 0007); ``gateway.transparency`` shows them by it."""
    subject_name: str | None = None
    """Their name, kept only when their level lets the log show it."""
    moderator_identity: str | None = None
    """The moderator's level; ``moderator`` holds their name only when identified."""


STATE_KEY_MAX = 512
"""Longest adapter state key, in characters (an index entry PostgreSQL can always take)."""


def check_state_key(key: str) -> str:
    """``key`` if it can be an adapter state key; ``ValueError`` saying why not.
    Keys are text up to ``STATE_KEY_MAX`` characters without NUL (which
    PostgreSQL text cannot hold), the same on every store."""
    if not isinstance(key, str):
        raise ValueError(f"adapter state key {key!r}: must be a string")
    if len(key) > STATE_KEY_MAX:
        raise ValueError(f"adapter state key {key[:40]!r}...: longer than {STATE_KEY_MAX} characters")
    if "\x00" in key:
        raise ValueError(f"adapter state key {key!r}: contains NUL")
    return key


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (in code
    point order), so that a prefix scan is the index range ``[prefix, end)``;
    None when there is none (the empty prefix, or only the highest code points)."""
    chars = list(prefix)
    while chars:
        nxt = ord(chars.pop()) + 1
        if 0xD800 <= nxt <= 0xDFFF:  # surrogates are no text either store can hold
            nxt = 0xE000
        if nxt <= sys.maxunicode:
            return "".join(chars) + chr(nxt)
    return None


class ClusterView(Struct, frozen=True):
    """What one ``Store.cluster_tick`` found: the partitions this node owns now."""

    owned: frozenset[int]
    nodes: tuple[str, ...]
    """The live nodes (seen within the lease ttl), sorted."""
    epoch: float
    """The database's clock at the tick (seconds since the epoch); leases run from it."""


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
