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

Where it is: ``sqlite_tx`` (``SqliteTx``), ``sqlite_outbox`` (outbox and dead
letters), ``sqlite_records`` (moderation log, bans, settings, adapter state,
pruning), ``sqlite_files`` (migrations, file modes, backup); this module holds
``SqliteStore`` itself: opening, closing, checkpoints and group commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.store.base import Store, refuse_newer_schema
from gateway.store.jobs import Job, settle
from gateway.store.sqlite_files import PRIVATE_MODE, backup, create_private, migrations, warn_if_shared
from gateway.store.sqlite_outbox import SqliteOutbox
from gateway.store.sqlite_records import STATE_GET_CHUNK, SqliteRecords
from gateway.store.sqlite_tx import SqliteTx

__all__ = ["CHECKPOINT_INTERVAL", "MAX_JOBS_PER_COMMIT", "PRIVATE_MODE", "STATE_GET_CHUNK", "WAL_TRUNCATE_BYTES",
           "SqliteStore", "SqliteTx", "backup", "create_private", "migrations", "warn_if_shared"]

T = TypeVar("T")
log = logging.getLogger("civic.store")

MAX_JOBS_PER_COMMIT = 512
CHECKPOINT_INTERVAL = 0.25
WAL_TRUNCATE_BYTES = 4 * 1024 * 1024


class SqliteStore(SqliteOutbox, SqliteRecords, Store):
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
