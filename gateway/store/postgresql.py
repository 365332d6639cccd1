"""The shared store: PostgreSQL through asyncpg, for one node or a cluster of them.

Worker threads. The ``Tx`` face is synchronous (the pipeline asks
``tx.first_seen(...)`` and uses the answer at once), so the store runs
``pool`` worker threads, each with its own event loop (uvloop when present)
and its own asyncpg connection, and the ``Tx`` methods call
``loop.run_until_complete`` on that loop, which is not running. Every call
(a ``transact`` and every async method) becomes a job on one shared queue; a
worker takes up to ``MAX_JOBS_PER_COMMIT`` jobs and runs them in ONE
transaction, each inside its own savepoint so that a failing job rolls back
alone (as ``SqliteStore`` does), commits, and settles the jobs' futures on the
caller's loop. A serialization failure, a deadlock or a lost connection makes
the worker roll back and run the whole batch again (reconnecting first if
needed): a job is never lost silently, but its function may run more than once.

An unreachable server. When the worker cannot reconnect, it fails the jobs of
its batch with ``StoreUnavailable`` instead of waiting for the server (a
caller answers at once: intake says 503 and Retry-After), marks the store
unavailable (``unavailable()`` says why, for ``/readyz``), and from then on
every call fails at once until a worker, trying to connect every
``PROBE_INTERVAL``, reaches the server again. Nothing committed is lost; what
failed was not done (or, cut during its commit, may have been: callers retry
only idempotent work).

The outbox horizon. Several nodes insert into the outbox at once and one node
at a time delivers a target group, paging with a cursor. A plain sequence is
not enough: a transaction can commit a lower ``seq`` after a higher one was
read, and the reader would never look back. So each row records the id of the
transaction that wrote it (``tx``, a ``xid8``), and ``outbox_page`` returns
only rows of transactions older than every transaction still running
(``pg_snapshot_xmin``), in ``(tx, seq)`` order: those rows are final, nothing
can later appear behind the cursor. ``OutboxItem.seq`` stays one increasing
int for the delivery engine: the PostgreSQL store hands out the packed
position ``(tx << 64) | seq`` and unpacks it in ``complete`` and
``dead_letter``. Dead letters keep the plain row ``seq`` (what the admin API
lists and replays).

Cluster leases. ``cluster_tick`` keeps ``cluster_nodes`` (who is alive) and
``cluster_leases`` (who owns each partition until when) on the database's
clock, never a node's.
"""

from __future__ import annotations

import asyncio
import collections.abc
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import msgspec

from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from gateway.store.base import (
    ClusterView,
    DeadLetter,
    Mapping,
    ModerationEntry,
    OutboxItem,
    Store,
    StoreUnavailable,
    check_state_key,
    prefix_end,
    refuse_newer_schema,
)
from gateway.store.jobs import Job, settle

try:
    import uvloop
    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    _new_loop = asyncio.new_event_loop

T = TypeVar("T")
log = logging.getLogger("civic.store")

MAX_JOBS_PER_COMMIT = 60
"""Each job runs in its own savepoint, and PostgreSQL caches at most 64
subtransactions per transaction before every session on the server slows
down (subtransaction overflow); one job may carry a whole batch of events."""
SEQ_BITS = 64
SEQ_MASK = (1 << SEQ_BITS) - 1
HORIZON_WAIT = 1.0
"""Longest time ``outbox_page`` waits for transactions that were running when it
was called to finish (their rows, once final, belong in the page)."""
CONNECT_TIMEOUT = 10.0
PROBE_INTERVAL = 0.5
"""Seconds between two connection attempts of an idle worker while the server is unreachable."""
RETRY_MIN, RETRY_MAX = 0.01, 2.0
PRUNE_STEP = 2000
MIGRATION_LOCK = int.from_bytes(b"civicmig", "big")
_OUTBOX_COLS = "seq, platform, grp, event_id, type, origin, created, pending, body, occurred"
_OUTBOX_GROUPS = """
WITH RECURSIVE g AS (
    (SELECT platform, grp FROM outbox ORDER BY platform, grp LIMIT 1)
    UNION ALL
    SELECT n.platform, n.grp FROM g, LATERAL (
        SELECT o.platform, o.grp FROM outbox o WHERE (o.platform, o.grp) > (g.platform, g.grp)
        ORDER BY o.platform, o.grp LIMIT 1) n
)
SELECT platform, grp FROM g"""
"""The groups with undelivered rows, one index probe per group (every node asks
every second; ``SELECT DISTINCT`` would read the whole index of a big backlog)."""


def migrations() -> list[tuple[int, str]]:
    """Numbered PostgreSQL migrations shipped with the package, in order (the
    same numbers as the SQLite dialect, ``gateway.store.sqlite.migrations``)."""
    return [(v, sql) for v, _name, sql in migration_files()]


def migration_files() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of each PostgreSQL migration, in order."""
    found = []
    for entry in resources.files("gateway.store").joinpath("migrations_pg").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


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


class _Retry(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


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


async def _migrate(conn: asyncpg.Connection) -> None:
    """Apply pending migrations, one node at a time (a session advisory lock)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations"
                           " (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        known = migrations()
        refuse_newer_schema(done, known)
        for version, sql in known:
            if version in done:
                continue
            log.info("applying store migration %04d (PostgreSQL)", version)
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, applied)"
                                   " VALUES ($1, extract(epoch FROM clock_timestamp()))", version)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class _Worker:
    """One thread, one event loop, one connection: runs batches of jobs."""

    def __init__(self, store: PostgresStore, index: int) -> None:
        self.store = store
        self.index = index
        self.finished = 0  # written by this worker's thread only
        self.commits = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: asyncpg.Connection | None = None
        self.thread: threading.Thread | None = None
        self._connect_error: str | None = None

    def start(self, ready: asyncio.Future[None]) -> None:
        self.thread = threading.Thread(target=self._main, args=(ready,), name=f"civic-pg-{self.index}", daemon=True)
        self.thread.start()

    def _main(self, ready: asyncio.Future[None]) -> None:
        self.loop = loop = _new_loop()
        try:
            self.conn = loop.run_until_complete(self.store._connect())
            if self.index == 0:
                loop.run_until_complete(_migrate(self.conn))
        except BaseException as exc:  # reported to open()
            self._disconnect()
            loop.close()
            self.store._to_loop(settle, [(ready, False, exc)])
            return
        self.store._to_loop(settle, [(ready, True, None)])
        jobs = self.store._jobs
        stop = False
        while not stop:
            if self.conn is None and self.store._down is not None:
                try:  # no server: look for it now and then, whether or not work comes
                    job = jobs.get(timeout=PROBE_INTERVAL)
                except queue.Empty:
                    self._reconnect(quiet=True)
                    continue
            else:
                job = jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    nxt = jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            results = self._run_batch(batch)
            self.finished += len(batch)
            self.store._to_loop(settle, results)
        self._disconnect()
        loop.close()

    def _run_batch(self, batch: list[Job]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        delay = RETRY_MIN
        failures = 0
        while True:
            try:
                results = self._attempt(batch)
            except _Retry as retry:
                exc: BaseException = retry.cause
            except BaseException as other:
                if not _retryable(other) and self.conn is not None and not self.conn.is_closed():
                    # BEGIN or COMMIT itself failed, not one job: the batch fails as a whole.
                    log.error("store transaction failed: %s", other)
                    self._rollback()
                    return [(job.future, False, other) for job in batch]
                exc = other
            else:
                self.commits += 1
                return results
            failures += 1
            if self.store._closing and failures >= 3:
                log.error("store transaction of %d jobs failed while closing: %s", len(batch), exc)
                self._rollback()
                return [(job.future, False, exc) for job in batch]
            level = logging.INFO if isinstance(exc, asyncpg.exceptions.TransactionRollbackError) else logging.WARNING
            if self.store._down is not None:
                level = logging.DEBUG  # the outage was logged once
            log.log(level, "store transaction of %d jobs failed (%s: %s); retrying", len(batch),
                    type(exc).__name__, exc)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX)
            if not self._rollback() and not self._reconnect(quiet=self.store._down is not None):
                # The server is gone, not just this connection: fail now rather
                # than hold every caller until it returns (nothing was committed,
                # unless the connection broke during the commit itself).
                why = self._connect_error or f"{type(exc).__name__}: {exc}"
                self.store._set_down(why)
                if self.store.on_retry is not None:
                    self.store.on_retry()  # what the attempt cached is void
                unavailable = StoreUnavailable(f"PostgreSQL unreachable: {why}")
                return [(job.future, False, unavailable) for job in batch]
            if self.store.on_retry is not None:
                self.store.on_retry()

    def _attempt(self, batch: list[Job]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        conn, loop = self.conn, self.loop
        if conn is None or loop is None:
            raise _Retry(ConnectionError("not connected to PostgreSQL"))
        run = loop.run_until_complete
        tx = PgTx(run, conn)
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        run(conn.execute("BEGIN; SAVEPOINT job"))
        for job in batch:
            try:
                value = job.fn(tx)
            except BaseException as exc:  # whatever it raised is its caller's, not the batch's
                if tx.broken is not None:
                    raise _Retry(tx.broken) from exc
                run(conn.execute("ROLLBACK TO SAVEPOINT job"))
                results.append((job.future, False, exc))
                continue
            if tx.broken is not None:  # the job caught a fatal error and went on
                raise _Retry(tx.broken)
            try:
                run(conn.execute("RELEASE SAVEPOINT job; SAVEPOINT job"))
            except asyncpg.PostgresError as exc:
                if _retryable(exc) or conn.is_closed():
                    raise
                # The job caught a statement error and returned: its work is void.
                run(conn.execute("ROLLBACK TO SAVEPOINT job"))
                results.append((job.future, False, exc))
                continue
            results.append((job.future, True, value))
        run(conn.execute("RELEASE SAVEPOINT job; COMMIT"))
        return results

    def _rollback(self) -> bool:
        """Roll back whatever is open; False if the connection is unusable."""
        conn, loop = self.conn, self.loop
        if conn is None or loop is None or conn.is_closed():
            return False
        try:
            if conn.is_in_transaction():
                loop.run_until_complete(conn.execute("ROLLBACK"))
            return True
        except Exception as exc:
            log.warning("rollback failed: %s", exc)
            return False

    def _reconnect(self, quiet: bool = False) -> bool:
        """A new connection; False (and ``_connect_error`` says why) when the
        server cannot be reached. ``quiet``: the outage is known, do not log."""
        self._disconnect()
        assert self.loop is not None
        try:
            self.conn = self.loop.run_until_complete(self.store._connect())
        except Exception as exc:  # the next attempt fails again and waits longer
            self._connect_error = f"{type(exc).__name__}: {exc}"
            (log.debug if quiet else log.warning)("reconnecting to PostgreSQL failed: %s", self._connect_error)
            self.conn = None
            return False
        self._connect_error = None
        self.store._set_reachable()
        return True

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None or conn.is_closed() or self.loop is None:
            if conn is not None:
                conn.terminate()
            return
        try:
            self.loop.run_until_complete(conn.close(timeout=2))
        except Exception:
            conn.terminate()


_SNAPSHOT = "SELECT pg_snapshot_xmin(s), pg_snapshot_xmax(s) FROM pg_current_snapshot() AS s"
_PAGE = (f"SELECT {_OUTBOX_COLS}, tx FROM outbox WHERE platform = $1 AND grp = $2"
         " AND tx < pg_snapshot_xmin(pg_current_snapshot()) AND (tx, seq) > ($3::xid8, $4::bigint)"
         " ORDER BY tx, seq LIMIT $5")

_STATE_SCAN_TO_END = "SELECT key, value FROM adapter_state WHERE platform = $1 AND key >= $2 ORDER BY key LIMIT $3"
_STATE_SCAN = ("SELECT key, value FROM adapter_state WHERE platform = $1 AND key >= $2 AND key < $4"
               " ORDER BY key LIMIT $3")


def _setting_lock(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"civic-setting\x00{key}".encode(), digest_size=8).digest(), "big",
                          signed=True)


class PostgresStore(Store):
    """``Store`` over PostgreSQL (``postgresql://`` DSN); ``pool`` worker threads
    and connections run the jobs; ``horizon_wait``: see ``outbox_page``."""

    def __init__(self, dsn: str, *, pool: int = 2, horizon_wait: float = HORIZON_WAIT) -> None:
        if pool < 1:
            raise ValueError("pool: at least one connection")
        self.dsn = dsn
        self.pool = pool
        self.horizon_wait = horizon_wait
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._closing = False
        self._submitted = 0  # touched by the event loop thread only
        self._finished_before = 0  # jobs finished by workers of an earlier open()
        self._down: str | None = None  # why the server is unreachable (set and cleared by workers)
        self._down_since = 0.0
        self._down_lock = threading.Lock()

    @property
    def commits(self) -> int:
        """Transactions committed by the current workers."""
        return sum(w.commits for w in self._workers)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._workers:
            raise RuntimeError("store is already open")
        self._loop = loop = asyncio.get_running_loop()
        self._jobs = queue.SimpleQueue()
        self._closing = False
        self._down = None
        readies = []
        for i in range(self.pool):
            w = _Worker(self, i)
            ready: asyncio.Future[None] = loop.create_future()
            w.start(ready)
            self._workers.append(w)
            readies.append(ready)
        outcomes = await asyncio.gather(*readies, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self._stop_workers()
            raise failed[0]
        self._open = True

    async def close(self) -> None:
        if not self._workers:
            return
        self._open = False
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        self._closing = True
        for _ in self._workers:
            self._jobs.put(None)  # after every job already queued
        workers, self._workers = self._workers, []

        def join() -> None:
            for w in workers:
                if w.thread is not None:
                    w.thread.join()
        await asyncio.get_running_loop().run_in_executor(None, join)
        self._finished_before += sum(w.finished for w in workers)

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT,
                                     server_settings={"application_name": "civic-gateway"})

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the caller's event loop (from a worker thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that loop is closed: nobody waits for these any more
            pass

    # -- an unreachable server ---------------------------------------------------------------
    def unavailable(self) -> str | None:
        return self._down

    def _set_down(self, why: str) -> None:
        """A worker could not reach the server (from its thread)."""
        with self._down_lock:
            first = self._down is None
            if first:
                self._down_since = time.monotonic()
            self._down = why
        if first:
            log.error("PostgreSQL is unreachable (%s): store calls fail at once, intake answers 503, until it"
                      " answers again", why, extra={"error": why})

    def _set_reachable(self) -> None:
        """A worker reached the server again (from its thread)."""
        with self._down_lock:
            if self._down is None:
                return
            self._down = None
            lasted = time.monotonic() - self._down_since
        log.warning("PostgreSQL is reachable again after %.1f s", lasted,
                    extra={"outage_seconds": round(lasted, 1)})

    # -- the async face ----------------------------------------------------------------------
    def backlog(self) -> int:
        return self._submitted - self._finished_before - sum(w.finished for w in self._workers)

    def _submit(self, fn: Callable[[PgTx], T]) -> asyncio.Future[T]:
        loop = self._loop
        if loop is None or not self._open:
            raise RuntimeError("store is not open")
        if self._down is not None:
            raise StoreUnavailable(f"PostgreSQL unreachable: {self._down}")
        fut: asyncio.Future[T] = loop.create_future()
        self._submitted += 1
        self._jobs.put(Job(fn, fut))
        return fut

    async def transact(self, fn: Callable[[PgTx], T]) -> T:  # type: ignore[override]
        return await self._submit(fn)

    async def outbox_groups(self) -> list[GroupRef]:
        rows = await self._submit(lambda tx: tx.fetch(_OUTBOX_GROUPS))
        return [GroupRef(PlatformName(p), GroupId(g)) for p, g in rows]

    async def outbox_page(self, target: GroupRef, after_seq: int, limit: int) -> list[OutboxItem]:
        """Rows of the group after the packed position ``after_seq``, in
        ``(tx, seq)`` order, only from transactions below the horizon of every
        running one. When the page is short because transactions that were
        already running at the call have not finished, it waits for them (at
        most ``horizon_wait`` seconds, off the workers) and reads again, so a
        page holds every row committed before the call (up to ``limit``)."""
        after_tx, after_row = unpack_seq(after_seq)

        def run(tx: PgTx) -> tuple[int, int, list[OutboxItem]]:
            xmin, xmax = tx.fetchrow(_SNAPSHOT)
            rows = tx.fetch(_PAGE, target.platform, target.group, after_tx, after_row, limit)
            return xmin, xmax, [_item(r, pack_seq(r[10], r[0])) for r in rows]

        deadline = time.monotonic() + self.horizon_wait
        wait_for: int | None = None
        pause = 0.002
        while True:
            xmin, xmax, items = await self._submit(run)
            if wait_for is None:
                wait_for = xmax  # every transaction that committed before this call has a lower id
            if len(items) >= limit or xmin >= wait_for or time.monotonic() >= deadline:
                return items
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def outbox_counts(self) -> dict[PlatformName, int]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT platform, count(*) FROM outbox GROUP BY platform"))
        return {PlatformName(p): n for p, n in rows}

    async def complete(self, seqs: Sequence[int], mappings: Sequence[Mapping],
                       followups: Sequence[OutboxItem] = ()) -> list[OutboxItem]:
        rows = [s & SEQ_MASK for s in seqs]
        # One order on every node, so two nodes recording the same ids cannot deadlock.
        maps = sorted({(m.platform, m.grp, m.kind, m.native, m.canonical) for m in mappings})

        def run(tx: PgTx) -> list[OutboxItem]:
            if rows:
                tx.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", rows)
            if maps:
                tx.executemany("INSERT INTO id_map (platform, grp, kind, native, canonical, sent)"
                               " VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT DO NOTHING", maps)
            return [msgspec.structs.replace(f, seq=tx.enqueue(f.target, f.event_id, f.type, f.origin, f.created,
                                                              f.pending, f.body, f.occurred)) for f in followups]
        return await self._submit(run)

    async def natives(self, platform: PlatformName, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT DISTINCT ON (canonical) canonical, native, sent FROM id_map WHERE canonical = ANY($1::text[])"
            " AND platform = $2 AND grp = $3 AND kind = $4 ORDER BY canonical, sent",
            list(canonicals), platform, grp, kind))
        return {r[0]: (NativeId(r[1]), r[2]) for r in rows}

    async def dead_letter(self, item: OutboxItem, error: str, attempts: int, now: float) -> None:
        row_seq = item.seq & SEQ_MASK

        def run(tx: PgTx) -> None:
            tx.execute("DELETE FROM outbox WHERE seq = $1", row_seq)
            tx.execute(f"INSERT INTO dead_letters ({_OUTBOX_COLS}, error, attempts, failed_at)"
                       " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (seq) DO UPDATE"
                       " SET platform = EXCLUDED.platform, grp = EXCLUDED.grp, event_id = EXCLUDED.event_id,"
                       " type = EXCLUDED.type, origin = EXCLUDED.origin, created = EXCLUDED.created,"
                       " pending = EXCLUDED.pending, body = EXCLUDED.body, occurred = EXCLUDED.occurred,"
                       " error = EXCLUDED.error, attempts = EXCLUDED.attempts, failed_at = EXCLUDED.failed_at",
                       row_seq, item.target.platform, item.target.group, item.event_id, item.type, item.origin,
                       item.created, item.pending, item.body, item.occurred, error[:2000], attempts, now)
        await self._submit(run)

    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[DeadLetter]:
        rows = await self._submit(lambda tx: tx.fetch(
            f"SELECT {_OUTBOX_COLS}, error, attempts, failed_at FROM dead_letters WHERE seq > $1"
            " ORDER BY seq LIMIT $2", after_seq, limit))
        return [DeadLetter(item=_item(r), error=r[10], attempts=r[11], failed_at=r[12]) for r in rows]

    async def dead_letter_count(self) -> int:
        return int(await self._submit(lambda tx: tx.fetchval("SELECT count(*) FROM dead_letters")))

    async def replay(self, seqs: Sequence[int] | None) -> list[OutboxItem]:
        wanted = None if seqs is None else list(dict.fromkeys(int(s) for s in seqs))

        def run(tx: PgTx) -> list[OutboxItem]:
            # DELETE ... RETURNING takes each row once even if two nodes replay at once.
            if wanted is None:
                rows = sorted(tx.fetch(f"DELETE FROM dead_letters RETURNING {_OUTBOX_COLS}"), key=lambda r: r[0])
            else:
                order = {s: i for i, s in enumerate(wanted)}
                rows = sorted(tx.fetch(f"DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])"
                                       f" RETURNING {_OUTBOX_COLS}", wanted), key=lambda r: order[r[0]])
            items = []
            for r in rows:
                old = _item(r)
                seq = tx.enqueue(old.target, old.event_id, old.type, old.origin, old.created, old.pending, old.body,
                                 old.occurred)
                items.append(msgspec.structs.replace(old, seq=seq))
            return items
        return await self._submit(run)

    async def moderation_log(self, after_seq: int = 0, limit: int = 100,
                             link: str | None = None) -> list[ModerationEntry]:
        sql = ("SELECT time, link, platform, grp, action, subject, moderator, reason, category, event_id, seq,"
               " subject_identity, subject_name, moderator_identity FROM moderation_log WHERE seq > $1")
        args: list[Any] = [after_seq]
        if link is not None:
            sql += " AND link = $2"
            args.append(link)
        sql += f" ORDER BY seq LIMIT ${len(args) + 1}"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.fetch(sql, *args))
        return [ModerationEntry(*r) for r in rows]

    async def bans(self) -> set[tuple[LinkName, CanonicalId]]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT link, actor FROM bans"))
        return {(LinkName(a), CanonicalId(b)) for a, b in rows}

    async def withdrawn(self) -> set[CanonicalId]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT actor FROM consent WHERE state = 'withdrawn'"))
        return {CanonicalId(r[0]) for r in rows}

    async def setting(self, key: str, default: Callable[[], str]) -> str:
        def run(tx: PgTx) -> str:
            # Nodes (and workers) creating the same setting at once take turns,
            # so ``default()`` runs once and everyone reads its value.
            tx.execute("SELECT pg_advisory_xact_lock($1)", _setting_lock(key))
            value = tx.fetchval("SELECT value FROM settings WHERE key = $1", key)
            if value is not None:
                return str(value)
            value = default()
            tx.execute("INSERT INTO settings (key, value) VALUES ($1, $2)", key, value)
            return value
        return await self._submit(run)

    async def state_get(self, platform: str, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(check_state_key(k) for k in keys))
        if not wanted:
            return {}
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT key, value FROM adapter_state WHERE platform = $1 AND key = ANY($2::text[])", platform, wanted))
        return {r[0]: bytes(r[1]) for r in rows}

    async def state_put(self, platform: str, items: collections.abc.Mapping[str, bytes | None], now: float) -> None:
        # Sorted: two nodes writing the same keys lock them in one order (no deadlock).
        sets = sorted((platform, check_state_key(k), bytes(v), now) for k, v in items.items() if v is not None)
        deletes = sorted(check_state_key(k) for k, v in items.items() if v is None)

        def run(tx: PgTx) -> None:
            if sets:
                tx.executemany("INSERT INTO adapter_state (platform, key, value, updated) VALUES ($1, $2, $3, $4)"
                               " ON CONFLICT (platform, key) DO UPDATE SET value = EXCLUDED.value,"
                               " updated = EXCLUDED.updated", sets)
            if deletes:
                tx.execute("DELETE FROM adapter_state WHERE platform = $1 AND key = ANY($2::text[])",
                           platform, deletes)
        if sets or deletes:
            await self._submit(run)

    async def state_scan(self, platform: str, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        check_state_key(prefix)
        end = prefix_end(prefix)
        # A range of the primary key (the column's "C" collation: code point order).
        if end is None:
            sql, args = _STATE_SCAN_TO_END, (platform, prefix, limit)
        else:
            sql, args = _STATE_SCAN, (platform, prefix, limit, end)
        rows = await self._submit(lambda tx: tx.fetch(sql, *args))
        return [(r[0], bytes(r[1])) for r in rows]

    async def state_setdefault(self, platform: str, key: str, value: bytes, now: float) -> bytes:
        check_state_key(key)

        def run(tx: PgTx) -> bytes:
            tx.execute("INSERT INTO adapter_state (platform, key, value, updated) VALUES ($1, $2, $3, $4)"
                       " ON CONFLICT (platform, key) DO NOTHING", platform, key, bytes(value), now)
            return bytes(tx.fetchval("SELECT value FROM adapter_state WHERE platform = $1 AND key = $2",
                                     platform, key))
        return await self._submit(run)

    async def state_prune(self, platform: str, prefix: str, older_than: float) -> int:
        check_state_key(prefix)
        end = prefix_end(prefix)
        sql = "DELETE FROM adapter_state WHERE platform = $1 AND key >= $2 AND updated < $3"
        args: list[Any] = [platform, prefix, older_than]
        if end is not None:
            sql += " AND key < $4"
            args.append(end)
        return await self._submit(lambda tx: _rowcount(tx.execute(sql, *args)))

    async def prune_fingerprints(self, older_than: float) -> int:
        return await self._submit(lambda tx: _rowcount(tx.execute(
            "DELETE FROM sent_fingerprints WHERE sent < $1", older_than)))

    async def prune_processed(self, older_than: float) -> int:
        total = 0
        while True:  # small steps: no long transaction, no long wait for other jobs
            n = await self._submit(lambda tx: _rowcount(tx.execute(
                "DELETE FROM processed WHERE (platform, event_id) IN (SELECT platform, event_id FROM processed"
                " WHERE seen < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)", older_than, PRUNE_STEP)))
            total += n
            if n < PRUNE_STEP:
                return total

    # -- cluster leases --------------------------------------------------------------------------
    async def cluster_tick(self, node: str, partitions: int, ttl: float) -> ClusterView:
        def run(tx: PgTx) -> ClusterView:
            now = float(tx.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
            until = now + ttl
            tx.execute("INSERT INTO cluster_nodes (node, seen) VALUES ($1, $2)"
                       " ON CONFLICT (node) DO UPDATE SET seen = EXCLUDED.seen", node, now)
            live = tuple(r[0] for r in tx.fetch("SELECT node FROM cluster_nodes WHERE seen > $1 ORDER BY node",
                                                now - ttl))
            if tx.fetchval("SELECT count(*) FROM cluster_leases WHERE part < $1", partitions) < partitions:
                tx.execute("INSERT INTO cluster_leases (part, owner, expires) SELECT g, NULL, 0"
                           " FROM generate_series(0, $1 - 1) AS g ON CONFLICT (part) DO NOTHING", partitions)
            share = -(-partitions // len(live))
            held = sorted(r[0] for r in tx.fetch(
                "UPDATE cluster_leases SET expires = $2 WHERE owner = $1 AND expires > $3 AND part < $4"
                " RETURNING part", node, until, now, partitions))
            kept, extra = held[:share], held[share:]
            # Above the fair share (a node joined): give the rest back for the newcomer.
            tx.execute("UPDATE cluster_leases SET owner = NULL, expires = 0"
                       " WHERE owner = $1 AND (part = ANY($2::int[]) OR part >= $3)", node, extra, partitions)
            claimed: list[int] = []
            if len(kept) < share:
                claimed = [r[0] for r in tx.fetch(
                    "UPDATE cluster_leases SET owner = $1, expires = $2 WHERE part IN (SELECT part FROM cluster_leases"
                    " WHERE part < $3 AND (owner IS NULL OR expires <= $4) ORDER BY part LIMIT $5"
                    " FOR UPDATE SKIP LOCKED) RETURNING part", node, until, partitions, now, share - len(kept))]
            return ClusterView(owned=frozenset(kept + claimed), nodes=live, epoch=now)
        return await self._submit(run)

    async def cluster_leave(self, node: str) -> None:
        def run(tx: PgTx) -> None:
            tx.execute("UPDATE cluster_leases SET owner = NULL, expires = 0 WHERE owner = $1", node)
            tx.execute("DELETE FROM cluster_nodes WHERE node = $1", node)
        await self._submit(run)

    async def cluster_owners(self) -> dict[int, str]:
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT part, owner FROM cluster_leases WHERE owner IS NOT NULL"
            " AND expires > extract(epoch FROM clock_timestamp()) ORDER BY part"))
        return {r[0]: r[1] for r in rows}
