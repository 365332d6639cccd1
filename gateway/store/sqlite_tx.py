"""The SQLite store's transaction face: ``SqliteTx`` (the ``Tx`` protocol over
a sqlite3 connection) and ``SqliteJobs``, what the query mixins need of the
store. See ``gateway.store.sqlite``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from gateway.store.base import ModerationEntry, OutboxItem

T = TypeVar("T")

_OUTBOX_COLS = "seq, platform, grp, event_id, type, origin, created, pending, body, occurred"


def _item(row: Sequence[Any]) -> OutboxItem:
    return OutboxItem(seq=row[0], target=GroupRef(PlatformName(row[1]), GroupId(row[2])),
                      event_id=EventId(row[3]), type=row[4], origin=PlatformName(row[5]),
                      created=row[6], pending=row[7], body=bytes(row[8]), occurred=row[9])


class SqliteTx:
    """``Tx`` over a sqlite3 connection inside an open transaction."""

    __slots__ = ("c",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn

    def first_seen(self, platform: PlatformName, event_id: EventId, now: float) -> bool:
        cur = self.c.execute("INSERT OR IGNORE INTO processed (platform, event_id, seen) VALUES (?, ?, ?)",
                             (platform, event_id, now))
        return cur.rowcount == 1

    def lookup(self, platform: PlatformName, grp: str, kind: str, native: str) -> tuple[CanonicalId, int] | None:
        row = self.c.execute("SELECT canonical, sent FROM id_map WHERE platform = ? AND grp = ? AND kind = ? AND native = ?",
                             (platform, grp, kind, native)).fetchone()
        return (CanonicalId(row[0]), row[1]) if row else None

    def native_for(self, canonical: CanonicalId, platform: PlatformName, grp: str, kind: str) -> tuple[NativeId, int] | None:
        row = self.c.execute("SELECT native, sent FROM id_map WHERE canonical = ? AND platform = ? AND grp = ? AND kind = ?"
                             " ORDER BY sent LIMIT 1", (canonical, platform, grp, kind)).fetchone()
        return (NativeId(row[0]), row[1]) if row else None

    def map(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId, how: int) -> bool:
        return self.c.execute("INSERT OR IGNORE INTO id_map (platform, grp, kind, native, canonical, sent)"
                              " VALUES (?, ?, ?, ?, ?, ?)", (platform, grp, kind, native, canonical, how)).rowcount == 1

    def enqueue(self, target: GroupRef, event_id: EventId, type: str, origin: PlatformName,
                created: float, pending: str | None, body: bytes, occurred: float | None = None) -> int:
        cur = self.c.execute("INSERT INTO outbox (platform, grp, event_id, type, origin, created, pending, body,"
                             " occurred) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (target.platform, target.group, event_id, type, origin, created, pending, body,
                              occurred))
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def set_membership(self, platform: PlatformName, grp: GroupId, actor: CanonicalId,
                       state: str, role: str | None, now: float) -> None:
        self.c.execute("INSERT INTO memberships (platform, grp, actor, state, role, updated) VALUES (?, ?, ?, ?, ?, ?)"
                       " ON CONFLICT (platform, grp, actor) DO UPDATE SET state = excluded.state,"
                       " role = COALESCE(excluded.role, memberships.role), updated = excluded.updated",
                       (platform, grp, actor, state, role, now))

    def log_moderation(self, e: ModerationEntry) -> None:
        self.c.execute("INSERT INTO moderation_log (time, link, platform, grp, action, subject, moderator, reason,"
                       " category, event_id, subject_identity, subject_name, moderator_identity)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (e.time, e.link, e.platform, e.grp, e.action, e.subject, e.moderator, e.reason,
                        e.category, e.event_id, e.subject_identity, e.subject_name, e.moderator_identity))

    def set_ban(self, link: LinkName, actor: CanonicalId, banned: bool, now: float) -> None:
        if banned:
            self.c.execute("INSERT OR IGNORE INTO bans (link, actor, since) VALUES (?, ?, ?)", (link, actor, now))
        else:
            self.c.execute("DELETE FROM bans WHERE link = ? AND actor = ?", (link, actor))


    def remap(self, platform: PlatformName, grp: str, kind: str, native: str, canonical: CanonicalId) -> None:
        self.c.execute("INSERT INTO id_map (platform, grp, kind, native, canonical, sent) VALUES (?, ?, ?, ?, ?, 0)"
                       " ON CONFLICT (platform, grp, kind, native) DO UPDATE SET canonical = excluded.canonical,"
                       " sent = 0", (platform, grp, kind, native, canonical))

    def declare_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str,
                      now: float) -> None:
        self.c.execute("INSERT OR IGNORE INTO aliases (platform, native, aka_platform, aka_native, declared)"
                       " VALUES (?, ?, ?, ?, ?)", (platform, native, aka_platform, aka_native, now))

    def has_alias(self, platform: PlatformName, native: str, aka_platform: str, aka_native: str) -> bool:
        return self.c.execute("SELECT 1 FROM aliases WHERE platform = ? AND native = ? AND aka_platform = ?"
                              " AND aka_native = ?", (platform, native, aka_platform, aka_native)).fetchone() is not None


    def record_author(self, message: CanonicalId, author: CanonicalId) -> None:
        self.c.execute("INSERT OR IGNORE INTO authorship (author, message) VALUES (?, ?)", (author, message))

    def messages_by(self, author: CanonicalId) -> list[CanonicalId]:
        return [CanonicalId(r[0]) for r in
                self.c.execute("SELECT message FROM authorship WHERE author = ?", (author,))]

    def copies(self, canonical: CanonicalId, kind: str) -> list[tuple[PlatformName, str, NativeId, int]]:
        return [(PlatformName(r[0]), r[1], NativeId(r[2]), r[3]) for r in self.c.execute(
            "SELECT platform, grp, native, sent FROM id_map WHERE canonical = ? AND kind = ? ORDER BY sent",
            (canonical, kind))]

    def set_consent(self, actor: CanonicalId, state: str, now: float) -> None:
        self.c.execute("INSERT INTO consent (actor, state, updated) VALUES (?, ?, ?) ON CONFLICT (actor)"
                       " DO UPDATE SET state = excluded.state, updated = excluded.updated", (actor, state, now))


    def remember_sent(self, fingerprint: bytes, now: float) -> None:
        self.c.execute("INSERT OR REPLACE INTO sent_fingerprints (fingerprint, sent) VALUES (?, ?)",
                       (fingerprint, now))

    def sent_since(self, fingerprint: bytes, since: float) -> bool:
        return self.c.execute("SELECT 1 FROM sent_fingerprints WHERE fingerprint = ? AND sent >= ?",
                              (fingerprint, since)).fetchone() is not None


class SqliteJobs:
    """What the query mixins (``sqlite_outbox``, ``sqlite_records``) need of
    ``SqliteStore``: running a job in its transaction."""

    def _submit(self, fn: Callable[[SqliteTx], T]) -> asyncio.Future[T]:
        raise NotImplementedError
