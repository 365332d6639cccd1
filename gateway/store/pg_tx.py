"""The PostgreSQL store's transaction face: ``PgTx`` (the ``Tx`` protocol over one
worker's connection), the packed outbox position (``pack_seq`` / ``unpack_seq``),
and which errors make a worker run its whole batch again (``_retryable``).
See ``gateway.store.postgresql`` for how the pieces fit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg

from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from gateway.store.base import ModerationEntry, OutboxItem

T = TypeVar("T")

SEQ_BITS = 64
SEQ_MASK = (1 << SEQ_BITS) - 1
_OUTBOX_COLS = "seq, platform, grp, event_id, type, origin, created, pending, body, occurred"


def pack_seq(tx: int, seq: int) -> int:
    """The outbox position the store hands out: transaction id, then row seq."""
    return (tx << SEQ_BITS) | seq


def unpack_seq(position: int) -> tuple[int, int]:
    """(tx, row seq) of a packed outbox position (a plain row seq gives tx 0)."""
    return position >> SEQ_BITS, position & SEQ_MASK


def _item(row: Sequence[Any], seq: int | None = None) -> OutboxItem:
    return OutboxItem(seq=row[0] if seq is None else seq, target=GroupRef(PlatformName(row[1]), GroupId(row[2])),
                      event_id=EventId(row[3]), type=row[4], origin=PlatformName(row[5]),
                      created=row[6], pending=row[7], body=bytes(row[8]), occurred=row[9])


def _rowcount(status: str) -> int:
    """The row count of a command status string ("DELETE 12", "INSERT 0 1")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _retryable(exc: BaseException) -> bool:
    """Errors after which the whole batch is run again (not the job's fault)."""
    return isinstance(exc, (asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
                            asyncpg.exceptions.PostgresConnectionError,
                            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
                            asyncpg.exceptions.CannotConnectNowError,
                            OSError, asyncio.TimeoutError))


class PgTx:
    """``Tx`` over one worker's connection inside an open transaction. Also
    offers ``execute`` / ``fetch`` / ``fetchrow`` / ``fetchval`` / ``executemany``
    (asyncpg's, made synchronous) for the store's own queries."""

    __slots__ = ("_run", "conn", "broken")

    def __init__(self, run: Callable[[Coroutine[Any, Any, Any]], Any], conn: asyncpg.Connection) -> None:
        self._run = run
        self.conn = conn
        self.broken: BaseException | None = None
        """Set when a statement failed in a way that dooms the whole batch."""

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self._run(coro)  # type: ignore[no-any-return]
        except BaseException as exc:
            if _retryable(exc) or self.conn.is_closed():
                self.broken = exc
            raise

    def execute(self, sql: str, *args: Any) -> str:
        return self._call(self.conn.execute(sql, *args))

    def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self._call(self.conn.executemany(sql, args))

    def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self._call(self.conn.fetch(sql, *args))

    def fetchrow(self, sql: str, *args: Any) -> Any:
        return self._call(self.conn.fetchrow(sql, *args))

    def fetchval(self, sql: str, *args: Any) -> Any:
        return self._call(self.conn.fetchval(sql, *args))

    # -- the Tx protocol -------------------------------------------------------------------
    def first_seen(self, platform: PlatformName, event_id: EventId, now: float) -> bool:
        # A concurrent insert of the same key (another node) makes this wait for
        # that transaction and then see the conflict, or insert if it rolled back.
        return self.fetchval("INSERT INTO processed (platform, event_id, seen) VALUES ($1, $2, $3)"
                             " ON CONFLICT DO NOTHING RETURNING 1", platform, event_id, now) is not None

    def lookup(self, platform: PlatformName, grp: str, kind: str, native: str) -> tuple[CanonicalId, int] | None:
        row = self.fetchrow("SELECT canonical, sent FROM id_map WHERE platform = $1 AND grp = $2 AND kind = $3"
                            " AND native = $4", platform, grp, kind, native)
        return (CanonicalId(row[0]), row[1]) if row else None

    def native_for(self, canonical: CanonicalId, platform: PlatformName, grp: str, kind: str) -> tuple[NativeId, int] | None:
        row = self.fetchrow("SELECT native, sent FROM id_map WHERE canonical = $1 AND platform = $2 AND grp = $3"
                            " AND kind = $4 ORDER BY sent LIMIT 1", canonical, platform, grp, kind)
        return (NativeId(row[0]), row[1]) if row else None

    def map(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId, how: int) -> bool:
        return self.fetchval("INSERT INTO id_map (platform, grp, kind, native, canonical, sent)"
                             " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1",
                             platform, grp, kind, native, canonical, how) is not None

    def enqueue(self, target: GroupRef, event_id: EventId, type: str, origin: PlatformName,
                created: float, pending: str | None, body: bytes, occurred: float | None = None) -> int:
        row = self.fetchrow("INSERT INTO outbox (platform, grp, event_id, type, origin, created, pending, body,"
                            " occurred) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq, tx",
                            target.platform, target.group, event_id, type, origin, created, pending, body, occurred)
        return pack_seq(row[1], row[0])

    def set_membership(self, platform: PlatformName, grp: GroupId, actor: CanonicalId,
                       state: str, role: str | None, now: float) -> None:
        self.execute("INSERT INTO memberships (platform, grp, actor, state, role, updated)"
                     " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (platform, grp, actor) DO UPDATE SET"
                     " state = EXCLUDED.state, role = COALESCE(EXCLUDED.role, memberships.role),"
                     " updated = EXCLUDED.updated", platform, grp, actor, state, role, now)

    def log_moderation(self, e: ModerationEntry) -> None:
        self.execute("INSERT INTO moderation_log (time, link, platform, grp, action, subject, moderator, reason,"
                     " category, event_id, subject_identity, subject_name, moderator_identity)"
                     " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                     e.time, e.link, e.platform, e.grp, e.action, e.subject, e.moderator, e.reason, e.category,
                     e.event_id, e.subject_identity, e.subject_name, e.moderator_identity)

    def set_ban(self, link: LinkName, actor: CanonicalId, banned: bool, now: float) -> None:
        if banned:
            self.execute("INSERT INTO bans (link, actor, since) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                         link, actor, now)
        else:
            self.execute("DELETE FROM bans WHERE link = $1 AND actor = $2", link, actor)

    def remap(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId) -> None:
        self.execute("INSERT INTO id_map (platform, grp, kind, native, canonical, sent) VALUES ($1, $2, $3, $4, $5, 0)"
                     " ON CONFLICT (platform, grp, kind, native) DO UPDATE SET canonical = EXCLUDED.canonical,"
                     " sent = 0", platform, grp, kind, native, canonical)

    def declare_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str,
                      now: float) -> None:
        self.execute("INSERT INTO aliases (platform, native, aka_platform, aka_native, declared)"
                     " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING", platform, native, aka_platform,
                     aka_native, now)

    def has_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str) -> bool:
        return self.fetchval("SELECT 1 FROM aliases WHERE platform = $1 AND native = $2 AND aka_platform = $3"
                             " AND aka_native = $4", platform, native, aka_platform, aka_native) is not None

    def record_author(self, message: CanonicalId, author: CanonicalId) -> None:
        self.execute("INSERT INTO authorship (author, message) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                     author, message)

    def messages_by(self, author: CanonicalId) -> list[CanonicalId]:
        return [CanonicalId(r[0]) for r in self.fetch("SELECT message FROM authorship WHERE author = $1", author)]

    def copies(self, canonical: CanonicalId, kind: str) -> list[tuple[PlatformName, str, NativeId, int]]:
        return [(PlatformName(r[0]), r[1], NativeId(r[2]), r[3]) for r in self.fetch(
            "SELECT platform, grp, native, sent FROM id_map WHERE canonical = $1 AND kind = $2"
            " ORDER BY sent, platform, grp, native", canonical, kind)]

    def remember_sent(self, fingerprint: bytes, now: float) -> None:
        self.execute("INSERT INTO sent_fingerprints (fingerprint, sent) VALUES ($1, $2) ON CONFLICT (fingerprint)"
                     " DO NOTHING", fingerprint, now)

    def sent_since(self, fingerprint: bytes, since: float) -> bool:
        return self.fetchval("SELECT 1 FROM sent_fingerprints WHERE fingerprint = $1 AND sent >= $2",
                             fingerprint, since) is not None

    def set_consent(self, actor: CanonicalId, state: str, now: float) -> None:
        self.execute("INSERT INTO consent (actor, state, updated) VALUES ($1, $2, $3) ON CONFLICT (actor)"
                     " DO UPDATE SET state = EXCLUDED.state, updated = EXCLUDED.updated", actor, state, now)


class PgJobs:
    """What the query mixins (``pg_outbox``, ``pg_records``) need of
    ``PostgresStore``: running a job in a worker's transaction."""

    def _submit(self, fn: Callable[[PgTx], T]) -> asyncio.Future[T]:
        raise NotImplementedError
