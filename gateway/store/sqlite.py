"""The embedded store: SQLite in WAL mode with group commit.

Every call becomes a job. Jobs are collected and run in ONE transaction (each
inside its own savepoint, so one failing job rolls back alone) and committed
once: under load hundreds of requests share a commit, which is what makes a
durable ``202`` cheap.

Where jobs run depends on what a commit costs:

* ``synchronous = "normal"`` (the default): a commit appends to the WAL in the
  OS page cache and never waits for the disk, so the batch runs on the event
  loop itself, once per loop iteration (``call_soon``). Measured here, handing
  each batch to a thread cost more CPU and latency than the statements (the
  hand-off and the GIL ping-pong, see shared/research/performance.md).
  Checkpoints, which do wait for the disk, run on a separate connection in a
  background thread (PASSIVE: they never block the writer), so the loop never
  waits for an fsync.
* ``synchronous = "full"``: every commit waits for the disk, so batches run on
  a worker thread and the loop only waits on a future.

Durability: WAL with ``synchronous=NORMAL`` keeps every commit through a
process crash (``SIGKILL``); ``"full"`` also survives a power cut.
"""

from __future__ import annotations

import asyncio
import collections.abc
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import msgspec

from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from gateway.store.base import (
    DeadLetter,
    Mapping,
    ModerationEntry,
    OutboxItem,
    Store,
    check_state_key,
    prefix_end,
    refuse_newer_schema,
)
from gateway.store.jobs import Job, settle

T = TypeVar("T")
log = logging.getLogger("civic.store")

MAX_JOBS_PER_COMMIT = 512
CHECKPOINT_INTERVAL = 0.25
WAL_TRUNCATE_BYTES = 4 * 1024 * 1024
_OUTBOX_COLS = "seq, platform, grp, event_id, type, origin, created, pending, body, occurred"
STATE_GET_CHUNK = 500
"""Keys per ``IN (...)`` of ``state_get`` (old SQLite builds take at most 999 parameters)."""


def migrations() -> list[tuple[int, str]]:
    """Numbered migrations shipped with the package, in order."""
    found = []
    for entry in resources.files("gateway.store").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


PRIVATE_MODE = 0o600
"""Mode of the files the store creates: they hold the ActivityPub private key
and people's ids, so no other user of the machine may read them."""


def create_private(path: str) -> None:
    """Called before SQLite first opens ``path``: create the file (if missing)
    with ``PRIVATE_MODE``. SQLite would create it 0644 (less the umask); it
    gives the ``-wal`` and ``-shm`` files it makes the mode of the main file,
    so those follow. A file that cannot be created is left to sqlite3.connect
    to report."""
    if path == ":memory:" or not path:
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_MODE))
    except OSError:
        pass


def warn_if_shared(path: str) -> list[str]:
    """Called at open: log a warning for each of the database's files (main,
    ``-wal``, ``-shm``) that other users may access (a file from before files
    were made private, or one copied with a loose mode); returns those files."""
    loose = []
    for f in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(f).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            loose.append(f)
            log.warning("%s is readable by other users (mode %04o) and holds the gateway's private keys: "
                        "run `chmod 600 %s`", f, mode, f)
    return loose


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


class SqliteStore(Store):
    def __init__(self, path: str, *, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.inline = self.synchronous == "NORMAL"
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._tx: SqliteTx | None = None
        self._pending: list[Job] = []
        self._flush_scheduled = False
        self._submitted = 0  # touched by the event loop thread only
        self._finished = 0  # touched by the worker thread only
        self.commits = 0

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        warn_if_shared(self.path)
        create_private(self.path)
        if self.inline:
            conn = self._connect()
            try:
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer thread does it
            conn.execute("PRAGMA busy_timeout = 0")  # never wait on the loop; _flush retries
            self._conn, self._tx = conn, SqliteTx(conn)
            self._stop_checkpoints.clear()
            self._checkpointer = threading.Thread(target=self._checkpoints, name="civic-sqlite-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()
            return
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="civic-sqlite", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._conn is not None:
            if self._pending:
                self._flush()
            self._stop_checkpoints.set()
            if self._checkpointer is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
                self._checkpointer = None
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = self._tx = None
            return
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    def _checkpoints(self) -> None:
        """Copy the WAL back into the database file now and then, off the loop.

        PASSIVE checkpoints never block the writer, but under steady writes
        they rarely catch up at the moment a write begins, which is when
        SQLite starts the WAL over, so the WAL would grow without end. Past
        ``WAL_TRUNCATE_BYTES`` a TRUNCATE checkpoint takes the write lock for
        the time of one sync; the loop does not wait for it (see ``_flush``)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        wal = self.path + "-wal"
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL):
                try:
                    conn.execute("PRAGMA busy_timeout = 0")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if os.path.exists(wal) and os.path.getsize(wal) > WAL_TRUNCATE_BYTES:
                        conn.execute("PRAGMA busy_timeout = 1000")
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                except sqlite3.Error as exc:  # busy now; the next round catches up
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        known = migrations()
        refuse_newer_schema(done, known)
        for version, sql in known:
            if version in done:
                continue
            log.info("applying store migration %04d", version)
            script = sql.replace("DOUBLE PRECISION", "REAL")
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{script}\n;INSERT INTO schema_migrations (version, applied)"
                                   f" VALUES ({version}, julianday('now'));\nCOMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        conn = None
        try:
            conn = self._connect()
            self._migrate(conn)
        except BaseException as exc:  # reported to open()
            if conn is not None:
                conn.close()
            loop.call_soon_threadsafe(ready.set_exception, exc)
            return
        loop.call_soon_threadsafe(ready.set_result, None)
        tx = SqliteTx(conn)
        stop = False
        while not stop:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            while True:
                try:
                    results = self._run_batch(conn, tx, batch)
                    break
                except sqlite3.OperationalError as exc:  # locked past busy_timeout: wait and retry
                    log.warning("store busy (%s); retrying", exc)
                    time.sleep(0.01)
            self._finished += len(batch)
            loop.call_soon_threadsafe(settle, results)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, tx: SqliteTx,
                   batch: list[Job]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")  # sqlite3.OperationalError if busy: the caller retries
        try:
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = job.fn(tx)
                except BaseException as exc:  # whatever it raised is its caller's, not the batch's
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((job.future, False, exc))
                else:
                    conn.execute("RELEASE job")
                    results.append((job.future, True, value))
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:  # the commit itself failed (disk full, I/O error)
            log.error("store transaction failed: %s", exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(job.future, False, exc) for job in batch]
        return results

    # -- the async face ------------------------------------------------------------
    def backlog(self) -> int:
        return len(self._pending) + self._submitted - self._finished

    def _submit(self, fn: Callable[[SqliteTx], T]) -> asyncio.Future[T]:
        loop = self._loop
        if loop is None or (self._conn is None and self._thread is None):
            raise RuntimeError("store is not open")
        fut: asyncio.Future[T] = loop.create_future()
        if self._conn is not None:
            self._pending.append(Job(fn, fut))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
            return fut
        self._submitted += 1
        self._jobs.put(Job(fn, fut))
        return fut

    def _flush(self) -> None:
        """Run every job submitted during this loop iteration in one transaction."""
        self._flush_scheduled = False
        assert self._conn is not None and self._tx is not None
        while self._pending:
            batch = self._pending[:MAX_JOBS_PER_COMMIT]
            try:
                results = self._run_batch(self._conn, self._tx, batch)
            except sqlite3.OperationalError:
                # The checkpointer holds the write lock for a moment (a
                # TRUNCATE checkpoint): try again soon rather than block the loop.
                if self._loop is not None and not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_later(0.002, self._flush)
                return
            del self._pending[:len(batch)]
            settle(results)

    async def transact(self, fn: Callable[[SqliteTx], T]) -> T:  # type: ignore[override]
        return await self._submit(fn)

    async def outbox_groups(self) -> list[GroupRef]:
        rows = await self._submit(lambda tx: tx.c.execute("SELECT DISTINCT platform, grp FROM outbox").fetchall())
        return [GroupRef(PlatformName(p), GroupId(g)) for p, g in rows]

    async def outbox_page(self, target: GroupRef, after_seq: int, limit: int) -> list[OutboxItem]:
        rows = await self._submit(lambda tx: tx.c.execute(
            f"SELECT {_OUTBOX_COLS} FROM outbox WHERE platform = ? AND grp = ? AND seq > ? ORDER BY seq LIMIT ?",
            (target.platform, target.group, after_seq, limit)).fetchall())
        return [_item(r) for r in rows]

    async def outbox_counts(self) -> dict[PlatformName, int]:
        rows = await self._submit(lambda tx: tx.c.execute(
            "SELECT platform, COUNT(*) FROM outbox GROUP BY platform").fetchall())
        return {PlatformName(p): n for p, n in rows}

    async def complete(self, seqs: Sequence[int], mappings: Sequence[Mapping],
                       followups: Sequence[OutboxItem] = ()) -> list[OutboxItem]:
        def run(tx: SqliteTx) -> list[OutboxItem]:
            tx.c.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            if mappings:
                tx.c.executemany("INSERT OR IGNORE INTO id_map (platform, grp, kind, native, canonical, sent)"
                                 " VALUES (?, ?, ?, ?, ?, 1)",
                                 [(m.platform, m.grp, m.kind, m.native, m.canonical) for m in mappings])
            return [msgspec.structs.replace(f, seq=tx.enqueue(f.target, f.event_id, f.type, f.origin, f.created,
                                                              f.pending, f.body, f.occurred)) for f in followups]
        return await self._submit(run)

    async def natives(self, platform: PlatformName, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        def run(tx: SqliteTx) -> dict[str, tuple[NativeId, int]]:
            found = {}
            for c in canonicals:
                hit = tx.native_for(CanonicalId(c), platform, grp, kind)
                if hit:
                    found[c] = hit
            return found
        return await self._submit(run)

    async def dead_letter(self, item: OutboxItem, error: str, attempts: int, now: float) -> None:
        def run(tx: SqliteTx) -> None:
            tx.c.execute("DELETE FROM outbox WHERE seq = ?", (item.seq,))
            tx.c.execute("INSERT OR REPLACE INTO dead_letters (seq, platform, grp, event_id, type, origin, created,"
                         " pending, body, occurred, error, attempts, failed_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (item.seq, item.target.platform, item.target.group, item.event_id, item.type, item.origin,
                          item.created, item.pending, item.body, item.occurred, error[:2000], attempts, now))
        await self._submit(run)

    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[DeadLetter]:
        rows = await self._submit(lambda tx: tx.c.execute(
            f"SELECT {_OUTBOX_COLS}, error, attempts, failed_at FROM dead_letters WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit)).fetchall())
        return [DeadLetter(item=_item(r[:10]), error=r[10], attempts=r[11], failed_at=r[12]) for r in rows]

    async def dead_letter_count(self) -> int:
        return await self._submit(lambda tx: tx.c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    async def replay(self, seqs: Sequence[int] | None) -> list[OutboxItem]:
        def run(tx: SqliteTx) -> list[OutboxItem]:
            if seqs is None:
                rows = tx.c.execute(f"SELECT {_OUTBOX_COLS} FROM dead_letters ORDER BY seq").fetchall()
            else:
                rows = []
                for s in seqs:
                    rows += tx.c.execute(f"SELECT {_OUTBOX_COLS} FROM dead_letters WHERE seq = ?", (s,)).fetchall()
            items = []
            for r in rows:
                old = _item(r)
                tx.c.execute("DELETE FROM dead_letters WHERE seq = ?", (old.seq,))
                seq = tx.enqueue(old.target, old.event_id, old.type, old.origin, old.created, old.pending, old.body,
                                 old.occurred)
                items.append(msgspec.structs.replace(old, seq=seq))
            return items
        return await self._submit(run)

    async def moderation_log(self, after_seq: int = 0, limit: int = 100,
                             link: str | None = None) -> list[ModerationEntry]:
        sql = ("SELECT time, link, platform, grp, action, subject, moderator, reason, category, event_id, seq,"
               " subject_identity, subject_name, moderator_identity FROM moderation_log WHERE seq > ?")
        args: list[Any] = [after_seq]
        if link is not None:
            sql += " AND link = ?"
            args.append(link)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.c.execute(sql, args).fetchall())
        return [ModerationEntry(*r) for r in rows]

    async def bans(self) -> set[tuple[LinkName, CanonicalId]]:
        rows = await self._submit(lambda tx: tx.c.execute("SELECT link, actor FROM bans").fetchall())
        return {(LinkName(a), CanonicalId(b)) for a, b in rows}

    async def withdrawn(self) -> set[CanonicalId]:
        rows = await self._submit(lambda tx: tx.c.execute(
            "SELECT actor FROM consent WHERE state = 'withdrawn'").fetchall())
        return {CanonicalId(r[0]) for r in rows}

    async def setting(self, key: str, default: Callable[[], str]) -> str:
        def run(tx: SqliteTx) -> str:
            row = tx.c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row:
                return str(row[0])
            value = default()
            tx.c.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (key, value))
            return value
        return await self._submit(run)

    async def state_get(self, platform: str, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(check_state_key(k) for k in keys))
        if not wanted:
            return {}

        def run(tx: SqliteTx) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for i in range(0, len(wanted), STATE_GET_CHUNK):
                chunk = wanted[i:i + STATE_GET_CHUNK]
                marks = ", ".join("?" * len(chunk))
                sql = f"SELECT key, value FROM adapter_state WHERE platform = ? AND key IN ({marks})"
                found.update((k, bytes(v)) for k, v in tx.c.execute(sql, (platform, *chunk)))
            return found
        return await self._submit(run)

    async def state_put(self, platform: str, items: collections.abc.Mapping[str, bytes | None], now: float) -> None:
        sets = [(platform, check_state_key(k), bytes(v), now) for k, v in items.items() if v is not None]
        deletes = [(platform, check_state_key(k)) for k, v in items.items() if v is None]

        def run(tx: SqliteTx) -> None:
            if sets:
                tx.c.executemany("INSERT INTO adapter_state (platform, key, value, updated) VALUES (?, ?, ?, ?)"
                                 " ON CONFLICT (platform, key) DO UPDATE SET value = excluded.value,"
                                 " updated = excluded.updated", sets)
            if deletes:
                tx.c.executemany("DELETE FROM adapter_state WHERE platform = ? AND key = ?", deletes)
        if sets or deletes:
            await self._submit(run)

    async def state_scan(self, platform: str, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        check_state_key(prefix)
        end = prefix_end(prefix)
        # A range of the primary key (BINARY collation: code point order), not LIKE or substr.
        sql = "SELECT key, value FROM adapter_state WHERE platform = ? AND key >= ?"
        args: list[Any] = [platform, prefix]
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.c.execute(sql, args).fetchall())
        return [(k, bytes(v)) for k, v in rows]

    async def state_setdefault(self, platform: str, key: str, value: bytes, now: float) -> bytes:
        check_state_key(key)

        def run(tx: SqliteTx) -> bytes:
            tx.c.execute("INSERT OR IGNORE INTO adapter_state (platform, key, value, updated) VALUES (?, ?, ?, ?)",
                         (platform, key, bytes(value), now))
            row = tx.c.execute("SELECT value FROM adapter_state WHERE platform = ? AND key = ?",
                               (platform, key)).fetchone()
            return bytes(row[0])
        return await self._submit(run)

    async def state_prune(self, platform: str, prefix: str, older_than: float) -> int:
        check_state_key(prefix)
        end = prefix_end(prefix)
        sql = "DELETE FROM adapter_state WHERE platform = ? AND key >= ? AND updated < ?"
        args: list[Any] = [platform, prefix, older_than]
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        return int(await self._submit(lambda tx: tx.c.execute(sql, args).rowcount))

    async def prune_fingerprints(self, older_than: float) -> int:
        return await self._submit(lambda tx: tx.c.execute("DELETE FROM sent_fingerprints WHERE sent < ?",
                                                          (older_than,)).rowcount)

    async def prune_processed(self, older_than: float) -> int:
        # Rows arrive in time order, so the oldest have the lowest rowids: delete
        # in small steps from the start of the table (no index on ``seen`` to
        # maintain on every insert, and no long transaction on the loop).
        total = 0
        while True:
            n = await self._submit(lambda tx: tx.c.execute(
                "DELETE FROM processed WHERE rowid IN (SELECT rowid FROM processed WHERE seen < ?"
                " ORDER BY rowid LIMIT 2000)", (older_than,)).rowcount)
            total += n
            if n < 2000:
                return total


def backup(path: str, dest: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Copy the database at ``path`` to ``dest`` consistently while the gateway
    runs (SQLite's online backup: the copy is one committed state, WAL included).
    ``dest`` is created readable by its owner only, like the database."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no database at {path}")
    try:
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        raise FileExistsError(f"{dest} exists; choose a new file name") from None
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = sqlite3.connect(dest)
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        src.backup(out, pages=1024, progress=(lambda _status, remaining, total: progress(total - remaining, total))
                   if progress else None)
    except BaseException:
        out.close()
        os.unlink(dest)  # a half copy must not pass for a backup
        raise
    finally:
        out.close()
        src.close()

